r"""A VAE with two stochastic layers (Burda et al. 2016's two-layer model).

.. math::

    p(z_2)\,p_\theta(z_1 \mid z_2)\,p_\theta(x \mid z_1), \qquad
    q_\phi(z_1 \mid x)\,q_\phi(z_2 \mid z_1)

with :math:`p(z_2) = N(0, I)` and diagonal Gaussian conditionals given by
networks. Sites ``"z1"`` (next to the data) and ``"z2"`` (top).

References
----------
Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
Sønderby et al. (2016), Ladder Variational Autoencoders.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_from_params
from ..errors import ConfigError

__all__ = ["hierarchical_vae", "hierarchical_guide", "TopEncoder", "TopDecoder"]


def hierarchical_vae(
    decoder: nn.Module, top_decoder: nn.Module, likelihood: nn.Module, top_dim: int
) -> Callable[..., None]:
    r"""Model :math:`p(z_2)\,p(z_1 \mid z_2)\,p(x \mid z_1)`.

    Parameters
    ----------
    decoder : nn.Module
        ``z1 -> `` likelihood parameters.
    top_decoder : nn.Module
        ``z2 -> (loc, scale)`` of :math:`p(z_1 \mid z_2)`, e.g. a
        :class:`ppl_vae.nn.GaussianEncoder` on ``z2``.
    likelihood : nn.Module
        Decoder output -> distribution over ``x``.
    top_dim : int
        Dimension of ``z2``.
    """
    if not isinstance(top_dim, int) or top_dim <= 0:
        raise ConfigError(f"latent dimension must be a positive integer, got {top_dim!r}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(top_dim), 1.0).to_event(1))
            z1 = pyro.sample("z1", gaussian_from_params(top_decoder(z2)))
            pyro.sample("x", likelihood(decoder(z1)), obs=x)

    return model


def hierarchical_guide(encoder: nn.Module, top_encoder: nn.Module) -> Callable[..., None]:
    r"""Bottom-up guide :math:`q(z_1 \mid x)\,q(z_2 \mid z_1)`; both networks return ``(loc, scale)``."""

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", gaussian_from_params(encoder(x)))
            pyro.sample("z2", gaussian_from_params(top_encoder(z1)))

    return guide


class TopEncoder(nn.Module):
    """``x -> (loc, scale)`` of :math:`q(z_2 \\mid z_1 = E_q[z_1 \\mid x])`: the top latent of an input, for pictures."""

    def __init__(self, encoder: nn.Module, top_encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.top_encoder = encoder, top_encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.top_encoder(self.encoder(x)[0])


class TopDecoder(nn.Module):
    """``z2 -> `` likelihood parameters at :math:`z_1 = E[z_1 \\mid z_2]`: decoded top latents, for pictures."""

    def __init__(self, decoder: nn.Module, top_decoder: nn.Module) -> None:
        super().__init__()
        self.decoder, self.top_decoder = decoder, top_decoder

    def forward(self, z2: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.top_decoder(z2)[0])
