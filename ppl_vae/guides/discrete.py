r"""Guides for discrete latents: an encoder's logits turned into a Pyro guide.

:math:`q_\phi(z \mid x)` factorises over the latents (mean field). The same
guide serves the score-function estimators (every baseline), VIMCO
(``"iwae"``) and the straight-through relaxation (``"relaxed"``, which swaps
the sampler of these sites for the Gumbel-softmax one without changing the
guide).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["bernoulli_guide", "categorical_guide", "Guide"]

Guide = Callable[..., None]


def bernoulli_guide(encoder: nn.Module, *, site: str = "z") -> Guide:
    """``q(z | x) = prod_l Bernoulli(z_l; sigmoid(encoder(x)_l))``; the encoder returns logits ``[N, L]``."""

    def guide(x: torch.Tensor) -> None:
        logits = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, dist.Bernoulli(logits=logits).to_event(1))

    return guide


def categorical_guide(
    encoder: nn.Module, num_latents: int, num_classes: int, *, site: str = "z"
) -> Guide:
    """``q(z | x) = prod_l OneHotCategorical(z_l; softmax(logits_l))``; the encoder returns ``[N, L * C]`` logits."""
    if num_latents < 1 or num_classes < 2:
        raise ConfigError(f"need >= 1 latents of >= 2 classes, got {num_latents} x {num_classes}")

    def guide(x: torch.Tensor) -> None:
        logits = encoder(x).reshape(x.shape[0], num_latents, num_classes)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, dist.OneHotCategorical(logits=logits).to_event(1))

    return guide
