r"""Models with discrete latent variables, as plain Pyro model functions.

* :func:`bernoulli_vae`: :math:`z \in \{0,1\}^L`, :math:`p(z_l = 1) = 1/2`
  (a sigmoid belief net with one stochastic layer when the decoder is
  linear: 784-200-784 on MNIST).
* :func:`categorical_vae`: :math:`L` one-hot categorical latents of :math:`C`
  classes each, uniform prior (20 x 10 on MNIST).
* :func:`gmm_vae`: a Gaussian-mixture prior :math:`p(c)\,p(z \mid c)`; the
  component :math:`c` is marked for parallel enumeration and summed out by
  ``fit(..., estimator="enum")`` (Pyro's ``TraceEnum_ELBO``).

The guides are in :mod:`ppl_vae.guides.discrete`. Discrete sites have no
pathwise gradient: train these with ``estimator="score"`` (with or without
a baseline), ``"iwae"`` (VIMCO) or ``"relaxed"`` (straight-through
Gumbel-softmax).

References
----------
Neal (1992), Connectionist learning of belief networks. Mnih & Gregor (2014),
Neural Variational Inference and Learning in Belief Networks. Jang, Gu &
Poole (2017), Categorical Reparameterization with Gumbel-Softmax. Dilokthanakul
et al. (2016), Deep Unsupervised Clustering with Gaussian Mixture VAEs.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_mixture
from ..errors import ConfigError

__all__ = [
    "bernoulli_vae",
    "categorical_vae",
    "gmm_vae",
    "GaussianMixturePrior",
    "DISCRETE_MODELS",
    "Model",
]

Model = Callable[..., None]
DISCRETE_MODELS = ("bernoulli-vae", "categorical-vae")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def bernoulli_vae(
    decoder: nn.Module, likelihood: nn.Module, latent_dim: int, prior_prob: float = 0.5
) -> Model:
    r"""A VAE with ``latent_dim`` independent Bernoulli latents: :math:`z_l \sim \mathrm{Bernoulli}(\pi)`.

    ``decoder`` maps ``z`` (float 0/1, ``[..., latent_dim]``) to the
    likelihood's parameters.
    """
    _positive("latent dimension", latent_dim)
    if not 0 < prior_prob < 1:
        raise ConfigError(f"prior probability must be in (0, 1), got {prior_prob}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((latent_dim,), prior_prob)).to_event(1))
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model


def categorical_vae(
    decoder: nn.Module, likelihood: nn.Module, num_latents: int, num_classes: int
) -> Model:
    r"""A VAE with ``num_latents`` one-hot categorical latents of ``num_classes`` classes, uniform prior.

    ``z`` has shape ``[..., num_latents, num_classes]``; the decoder receives
    it flattened to ``[..., num_latents * num_classes]``.
    """
    _positive("number of categorical latents", num_latents)
    _positive("number of classes", num_classes)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            probs = x.new_full((num_latents, num_classes), 1.0 / num_classes)
            z = pyro.sample("z", dist.OneHotCategorical(probs).to_event(1))
            pyro.sample("x", likelihood(decoder(z.flatten(-2))), obs=x)

    return model


class GaussianMixturePrior(nn.Module):
    r"""Learnable mixture :math:`p(c) = \mathrm{softmax}(w)_c`, :math:`p(z \mid c) = N(\mu_c, \mathrm{diag}\,\sigma_c^2)`.

    Calling it returns ``(logits, locs, scales)``; the means start spread
    out (seeded by the global torch seed) so the components differ.
    """

    def __init__(self, num_components: int, latent_dim: int, spread: float = 2.0) -> None:
        super().__init__()
        _positive("number of mixture components", num_components)
        _positive("latent dimension", latent_dim)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(spread * torch.randn(num_components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(num_components, latent_dim))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.logits, self.locs, self.log_scales.exp()

    def marginal(self) -> dist.TorchDistribution:
        """:math:`p(z) = \\sum_c p(c)\\,p(z \\mid c)` as one distribution."""
        logits, locs, scales = self()
        return gaussian_mixture(logits, dist.Normal(locs, scales).to_event(1))


def gmm_vae(
    decoder: nn.Module,
    likelihood: nn.Module,
    prior: GaussianMixturePrior,
    *,
    enumerate: bool = True,
) -> Model:
    r"""A VAE with a Gaussian-mixture prior; the component ``c`` is summed out.

    .. math::

        p(x, z) = \sum_{c} p(c)\, N(z; \mu_c, \sigma_c^2)\, p_\theta(x \mid z)

    With ``enumerate=True`` the model samples ``c`` at a site marked
    ``infer={"enumerate": "parallel"}``: train it with
    ``estimator="enum"`` (``TraceEnum_ELBO`` sums ``c`` out exactly). With
    ``enumerate=False`` the same density is written with the mixture
    marginal; use that model for per-datapoint evaluation
    (:func:`ppl_vae.inference.elbo_per_datapoint` samples, it does not
    enumerate). The guide is any guide of ``z`` alone, e.g.
    :func:`ppl_vae.guides.amortized_guide`.
    """

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            if enumerate:
                logits, locs, scales = prior()
                c = pyro.sample(
                    "c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
                )
                z = pyro.sample("z", dist.Normal(locs[c], scales[c]).to_event(1))
            else:
                z = pyro.sample("z", prior.marginal())
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model
