r"""Learned priors over ``z``: the VampPrior, and a VAE with any prior (e.g. a mixture of Gaussians).

A prior is a callable (an ``nn.Module`` or its bound method) returning a
distribution over ``z`` with one event dimension; :func:`vae_with_prior` is
the VAE with that prior in place of :math:`N(0, I)`. A learned mixture of
Gaussians is :class:`ppl_vae.models.GaussianMixturePrior`'s ``marginal``
(its component summed out in closed form); :class:`VampPrior` is the
aggregated guide at learned pseudo-inputs:

.. math::

    p_\lambda(z) = \sum_{k=1}^{K} \pi_k\, N(z; \mu_k, \mathrm{diag}\,\sigma_k^2)
    \quad\text{(mixture)}, \qquad
    p_\lambda(z) = \frac{1}{K} \sum_{k=1}^{K} q_\phi(z \mid u_k)
    \quad\text{(VampPrior)}

Neither has a closed-form KL to the Gaussian guide, so the ELBO is estimated
by Monte Carlo (``estimator="reparam"``).

References
----------
Dilokthanakul et al. (2016), Deep Unsupervised Clustering with Gaussian
Mixture Variational Autoencoders. Tomczak & Welling (2018), VAE with a
VampPrior.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_from_params, gaussian_mixture
from ..errors import ConfigError

__all__ = ["VampPrior", "vae_with_prior"]


def _check_components(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"number of mixture components must be a positive integer, got {k!r}")


class VampPrior(nn.Module):
    """The aggregated guide at ``K`` learned pseudo-inputs: :math:`\\frac1K \\sum_k q(z \\mid u_k)`.

    Parameters
    ----------
    encoder : nn.Module
        The guide's encoder (``x -> (loc, scale)``); shared, not copied.
    pseudo_inputs : tensor ``[K, D]``
        Initial pseudo-inputs, e.g. a random subset of the training data;
        they are trained with the model.
    """

    def __init__(self, encoder: nn.Module, pseudo_inputs: torch.Tensor) -> None:
        super().__init__()
        if pseudo_inputs.dim() != 2:
            raise ConfigError(
                f"pseudo-inputs must be a [K, D] tensor, got shape {tuple(pseudo_inputs.shape)}"
            )
        _check_components(pseudo_inputs.shape[0])
        self.encoder = encoder
        self.pseudo_inputs = nn.Parameter(pseudo_inputs.detach().clone())

    def forward(self) -> dist.TorchDistribution:
        components = gaussian_from_params(self.encoder(self.pseudo_inputs))
        return gaussian_mixture(
            self.pseudo_inputs.new_zeros(self.pseudo_inputs.shape[0]), components
        )


def vae_with_prior(
    decoder: nn.Module, likelihood: nn.Module, prior: Callable[[], dist.TorchDistribution]
) -> Callable[..., None]:
    r"""A VAE :math:`p_\lambda(z)\,p_\theta(x \mid z)` with a learned prior ``prior()``.

    Pair it with :func:`ppl_vae.guides.amortized_guide`. Draw from the
    model with ``prior().sample((n,))`` and the decoder.

    References
    ----------
    Tomczak & Welling (2018), VAE with a VampPrior.
    """

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior())
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model
