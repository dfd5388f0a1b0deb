r"""Stacked denoising autoencoder (Vincent et al. 2010): greedy layer-wise pretraining, then end-to-end fine-tuning.

A deep encoder :math:`x = h_0 \to h_1 \to \dots \to h_L` (sigmoid layers, a linear code
:math:`h_L`) is built one layer at a time. Layer :math:`l` is a denoising autoencoder on
the codes of the layers below: its encoder maps a masked copy of :math:`h_{l-1}` to
:math:`h_l`, its decoder reconstructs the clean :math:`h_{l-1}` (Bernoulli logits for the
binary pixels at :math:`l = 1`, sigmoid means under a unit Gaussian, i.e. squared error,
above), and it is trained with the same :func:`~ppl_vae.inference.fit` as every model
(:func:`~ppl_vae.models.autoencoder` with :func:`~ppl_vae.guides.delta_guide`). Then the
whole stack, encoders in order and decoders mirrored, is fine-tuned end to end as one
denoising autoencoder of :math:`x`. The training steps live in
:mod:`ppl_vae.inference.pretrain` (models do not train themselves).

References
----------
Vincent, Larochelle, Lajoie, Bengio & Manzagol (2010), Stacked denoising autoencoders:
learning useful representations in a deep network with a local denoising criterion. JMLR 11.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..distributions import get_likelihood
from ..errors import ConfigError
from .vae import autoencoder

__all__ = ["StackedAutoencoder", "stacked_autoencoder", "layer_model"]


@dataclass(frozen=True)
class StackedAutoencoder:
    """The layers of a stacked autoencoder and the fine-tuning model.

    ``encoders[l]`` maps :math:`h_l \\to h_{l+1}` and ``decoders[l]`` maps :math:`h_{l+1}` back to
    the parameters of :math:`h_l`; ``encoder`` and ``decoder`` are the whole stacks (sharing
    those modules); ``model`` is the fine-tuning autoencoder, to pair with
    ``delta_guide(encoder, corruption=masking_noise(p))``
    (:func:`ppl_vae.inference.pretrain.stacked_guide`).
    """

    encoders: nn.ModuleList
    decoders: nn.ModuleList
    encoder: nn.Sequential
    decoder: nn.Sequential
    likelihood: nn.Module
    widths: tuple[int, ...]
    model: Callable[..., None]


def stacked_autoencoder(
    data_dim: int, widths: Sequence[int], likelihood: nn.Module
) -> StackedAutoencoder:
    """Layers ``data_dim -> widths[0] -> ... -> widths[-1]`` (the code); ``likelihood`` of the data given the first decoder's output."""
    widths = tuple(widths)
    if len(widths) < 1 or any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ConfigError(f"a stacked autoencoder needs positive layer widths, got {widths}")
    sizes = (data_dim, *widths)
    encoders = nn.ModuleList(
        [nn.Sequential(nn.Linear(a, b), nn.Sigmoid()) for a, b in zip(sizes[:-2], sizes[1:-1])]
        + [nn.Sequential(nn.Linear(sizes[-2], sizes[-1]))]
    )
    decoders = nn.ModuleList(
        [nn.Sequential(nn.Linear(sizes[1], sizes[0]))]
        + [nn.Sequential(nn.Linear(b, a), nn.Sigmoid()) for a, b in zip(sizes[1:-1], sizes[2:])]
    )
    encoder, decoder = nn.Sequential(*encoders), nn.Sequential(*reversed(decoders))
    return StackedAutoencoder(
        encoders,
        decoders,
        encoder,
        decoder,
        likelihood,
        widths,
        autoencoder(decoder, likelihood, widths[-1]),
    )


def layer_model(stack: StackedAutoencoder, layer: int) -> Callable[..., None]:
    """The autoencoder model of layer ``layer`` (from 0): its decoder reconstructs the layer's input (Bernoulli pixels at 0, unit Gaussian above)."""
    lik = stack.likelihood if layer == 0 else get_likelihood("gaussian")
    return autoencoder(stack.decoders[layer], lik, stack.widths[layer])
