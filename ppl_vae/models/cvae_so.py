r"""Structured-output CVAE: complete the hidden quadrants of a digit from the visible ones.

The input ``x_in`` is the image with its hidden pixels set to ``-1``; the
output ``y`` is the whole image, of which only the hidden pixels are scored
(the visible ones are known). Three models, each a plain Pyro function over
``(x_in, y)``:

* the deterministic baseline :math:`p_\theta(y \mid x) = \mathrm{Bernoulli}(f_\theta(x))`
  (no latent, empty guide);
* the CVAE :math:`p_\theta(z \mid x)\,p_\theta(y \mid z)` with a conditional
  prior network and a recognition network :math:`q_\phi(z \mid x, y)` as the
  guide. As in Pyro's tutorial the prior network sees the input completed by
  the (frozen) baseline's prediction.

The score is the negative conditional log-likelihood of the hidden pixels,
estimated by importance sampling with the recognition network as proposal
(:func:`conditional_nll`):

.. math::

    -\log p(y \mid x) \approx -\log \frac1K \sum_{k=1}^{K}
    \frac{p_\theta(y \mid z_k)\, p_\theta(z_k \mid x)}{q_\phi(z_k \mid x, y)},
    \qquad z_k \sim q_\phi(\cdot \mid x, y)

References
----------
Sohn, Lee & Yan (2015), Learning Structured Output Representation using Deep
Conditional Generative Models. Pyro's CVAE tutorial
(https://pyro.ai/examples/cvae.html).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_from_params
from ..errors import ConfigError

__all__ = [
    "HIDDEN",
    "visible_mask",
    "mask_quadrants",
    "baseline_model",
    "empty_guide",
    "so_cvae",
    "so_cvae_guide",
]

HIDDEN = -1.0


def visible_mask(num_visible: int, side: int = 28) -> torch.Tensor:
    """Flat bool mask of the visible pixels: 1 = bottom-left, 2 = left half, 3 = all but bottom-right (Pyro's tutorial)."""
    if num_visible not in (1, 2, 3):
        raise ConfigError(f"number of visible quadrants must be 1, 2 or 3, got {num_visible!r}")
    m = torch.zeros(side, side, dtype=torch.bool)
    h = side // 2
    m[h:, :h] = True
    if num_visible >= 2:
        m[:h, :h] = True
    if num_visible == 3:
        m[:h, h:] = True
    return m.flatten()


def mask_quadrants(x: torch.Tensor, num_visible: int) -> torch.Tensor:
    """``x_in``: ``x`` (``[N, side*side]``) with the hidden pixels set to ``-1``."""
    side = math.isqrt(x.shape[-1])
    if side * side != x.shape[-1] or side % 2:
        raise ConfigError(f"quadrants need square images of even side, got {x.shape[-1]} pixels")
    return x.masked_fill(~visible_mask(num_visible, side), HIDDEN)


def _hidden_pixels(x_in: torch.Tensor, logits: torch.Tensor) -> dist.TorchDistribution:
    return dist.Bernoulli(logits=logits).mask(x_in == HIDDEN).to_event(1)


def baseline_model(net: nn.Module) -> Callable[..., None]:
    r"""Deterministic baseline: :math:`y_{\text{hidden}} \sim \mathrm{Bernoulli}(\sigma(f_\theta(x_{\text{in}})))`; fit it with :func:`empty_guide`."""

    def model(x_in: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x_in.shape[0]):
            pyro.sample("y", _hidden_pixels(x_in, net(x_in)), obs=y)

    return model


def empty_guide(x_in: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """The guide of a model without latent variables."""


def _prior_input(x_in: torch.Tensor, baseline: nn.Module | None) -> torch.Tensor:
    if baseline is None:
        return x_in
    with torch.no_grad():
        guess = torch.sigmoid(baseline(x_in))
    return torch.where(x_in == HIDDEN, guess, x_in)


def so_cvae(
    prior_net: nn.Module, generation_net: nn.Module, *, baseline: nn.Module | None = None
) -> Callable[..., None]:
    r"""CVAE :math:`p_\theta(z \mid x)\,p_\theta(y_{\text{hidden}} \mid z)`.

    Parameters
    ----------
    prior_net : nn.Module
        ``x -> (loc, scale)`` of the conditional prior (e.g. a
        :class:`ppl_vae.nn.GaussianEncoder`).
    generation_net : nn.Module
        ``z -> `` Bernoulli logits of every pixel.
    baseline : nn.Module, optional
        A trained baseline network; the prior network then sees the input
        with its hidden pixels filled by the baseline's probabilities. It is
        never trained here (called under ``no_grad``; freeze it with
        ``requires_grad_(False)`` so that ``fit`` does not collect it).
    """

    def model(x_in: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x_in.shape[0]):
            z = pyro.sample("z", gaussian_from_params(prior_net(_prior_input(x_in, baseline))))
            pyro.sample("y", _hidden_pixels(x_in, generation_net(z)), obs=y)

    return model


def so_cvae_guide(recognition_net: nn.Module) -> Callable[..., None]:
    r"""Recognition network :math:`q_\phi(z \mid x, y)`: it sees the complete image ``y``.

    Only for training and evaluation (``y`` given); predictions sample the
    conditional prior (:func:`predict`).
    """

    def guide(x_in: torch.Tensor, y: torch.Tensor) -> None:
        with pyro.plate("data", x_in.shape[0]):
            pyro.sample("z", gaussian_from_params(recognition_net(y)))

    return guide
