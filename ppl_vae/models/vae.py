"""VAE, conditional VAE and (denoising) autoencoder as plain Pyro model functions.

Each factory closes over its networks and returns ``model(x, ...)``: a
function with a ``"data"`` plate that a user could have written by hand. The
code of each is the whole model; read it as documentation.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..distributions import one_hot
from ..errors import ConfigError

__all__ = ["vae", "cvae", "autoencoder", "decode_prior", "Model"]

Model = Callable[..., None]


def check_latent_dim(latent_dim: int) -> None:
    if not isinstance(latent_dim, int) or latent_dim <= 0:
        raise ConfigError(f"latent dimension must be a positive integer, got {latent_dim!r}")


def vae(decoder: nn.Module, likelihood: nn.Module, latent_dim: int) -> Model:
    r"""A VAE's generative model :math:`p(z)\,p_\theta(x \mid z)`, :math:`p(z) = N(0, I)`.

    Parameters
    ----------
    decoder : nn.Module
        Maps ``z`` (``[..., latent_dim]``) to the likelihood's parameters.
    likelihood : callable
        Decoder output -> distribution over ``x`` with one event dimension
        (see :mod:`ppl_vae.models.likelihoods`).
    latent_dim : int
        Dimension of ``z``.

    A beta-VAE is this model trained with ``fit(..., beta=b)``, which weights
    the KL term; the generative model is the same.

    References
    ----------
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    """
    check_latent_dim(latent_dim)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model


def cvae(decoder: nn.Module, likelihood: nn.Module, latent_dim: int, num_classes: int) -> Model:
    r"""Conditional VAE :math:`p(z)\,p_\theta(x \mid z, y)` for a class label ``y``.

    ``model(x, y)`` takes integer labels; the decoder receives
    ``(z, one_hot(y))``, e.g. :class:`ppl_vae.nn.Concat` of an MLP. Generate a
    chosen class with :func:`decode_prior` passing ``cond=one_hot(y, C)``.

    References
    ----------
    Sohn, Lee & Yan (2015), Learning Structured Output Representation using
    Deep Conditional Generative Models.
    """
    check_latent_dim(latent_dim)

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        with pyro.plate("data", y.shape[0]):
            prior = dist.Normal(torch.zeros(latent_dim, device=y.device), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", likelihood(decoder(z, one_hot(y, num_classes))), obs=x)

    return model


def autoencoder(decoder: nn.Module, likelihood: nn.Module, latent_dim: int) -> Model:
    r"""A deterministic autoencoder's decoder side, as a Pyro model.

    ``z`` has a flat (improper) prior and the guide is a point mass at the
    encoder's output (:func:`ppl_vae.guides.delta_guide`), so the ELBO reduces
    to the reconstruction log-likelihood :math:`\log p_\theta(x \mid e(x))`: the
    negative reconstruction loss. It is *not* a bound on :math:`\log p(x)`.
    A denoising autoencoder is the same model with a corrupting guide.
    """
    check_latent_dim(latent_dim)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            flat = dist.ImproperUniform(constraints.real, (), (latent_dim,))
            z = pyro.sample("z", flat)
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model


@torch.no_grad()
def decode_prior(
    decoder: nn.Module,
    likelihood: nn.Module,
    latent_dim: int,
    num_samples: int,
    *,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean of ``p(x | z)`` for ``z`` drawn from the standard-normal prior.

    ``cond`` (``[num_samples, ...]``) is passed to the decoder after ``z``, as
    in :func:`cvae`.
    """
    z = torch.randn(num_samples, latent_dim, generator=generator)
    out = decoder(z) if cond is None else decoder(z, cond)
    return likelihood.mean(out)
