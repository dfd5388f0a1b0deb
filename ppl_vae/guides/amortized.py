"""Amortised guides: an encoder network turned into a Pyro guide.

A guide built here samples the same latent site as the model, inside a
``"data"`` plate of the same size, so ``fit`` and every other tool of the
package can pair it with any model written the ppl-vae way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_from_params

__all__ = ["Guide", "amortized_guide", "masking_noise", "delta_guide"]

Guide = Callable[..., None]


def amortized_guide(
    encoder: nn.Module,
    *,
    site: str = "z",
    inputs: Callable[..., Sequence[torch.Tensor]] | None = None,
) -> Guide:
    """Turn ``encoder`` into a guide ``guide(x, ...)`` for latent ``site``.

    Parameters
    ----------
    encoder : nn.Module
        Maps the inputs to ``(loc, scale)`` (diagonal Gaussian), ``(loc,
        scale_tril)`` (full covariance) or a distribution with one event
        dimension; see :class:`ppl_vae.nn.GaussianEncoder`.
    site : str
        Name of the model's latent sample site.
    inputs : callable, optional
        Maps the guide's arguments (the model's) to the encoder's inputs;
        by default they are passed unchanged.

    Examples
    --------
    >>> from ppl_vae.nn import MLP, GaussianEncoder
    >>> guide = amortized_guide(GaussianEncoder(MLP(784, [200], 200), 200, 50))
    """

    def guide(x: torch.Tensor, *args: torch.Tensor) -> None:
        enc_in = (x, *args) if inputs is None else inputs(x, *args)
        q = gaussian_from_params(encoder(*enc_in))
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, q)

    return guide


def masking_noise(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Corruption that zeroes each input entry with probability ``p``."""
    if not 0 <= p < 1:
        raise ValueError(f"masking probability must be in [0, 1), got {p}")

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        return x * (torch.rand_like(x) >= p)

    return corrupt


def delta_guide(
    encoder: nn.Module,
    *,
    site: str = "z",
    corruption: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Guide:
    """A point-estimate guide ``z = encoder(x)``: the encoder of an autoencoder.

    With ``corruption`` (e.g. :func:`masking_noise`) the encoder sees a
    corrupted input while it is in training mode, and the model still
    observes the clean one: a denoising autoencoder (Vincent et al. 2008).
    """

    def guide(x: torch.Tensor) -> None:
        x_in = corruption(x) if corruption is not None and encoder.training else x
        z = encoder(x_in)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, dist.Delta(z).to_event(1))

    return guide
