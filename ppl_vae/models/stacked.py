r"""Stacked denoising autoencoder (Vincent et al. 2010): greedy layer-wise pretraining, then end-to-end fine-tuning.

A deep encoder :math:`x = h_0 \to h_1 \to \dots \to h_L` (sigmoid layers, a linear code
:math:`h_L`) is built one layer at a time. Layer :math:`l` is a denoising autoencoder on
the codes of the layers below: its encoder maps a masked copy of :math:`h_{l-1}` to
:math:`h_l`, its decoder reconstructs the clean :math:`h_{l-1}` (Bernoulli logits for the
binary pixels at :math:`l = 1`, sigmoid means under a unit Gaussian, i.e. squared error,
above), and it is trained with the same :func:`~ppl_vae.inference.fit` as every model
(:func:`~ppl_vae.models.autoencoder` with :func:`~ppl_vae.guides.delta_guide`). Then the
whole stack, encoders in order and decoders mirrored, is fine-tuned end to end as one
denoising autoencoder of :math:`x`.

References
----------
Vincent, Larochelle, Lajoie, Bengio & Manzagol (2010), Stacked denoising autoencoders:
learning useful representations in a deep network with a local denoising criterion. JMLR 11.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..distributions import get_likelihood
from ..errors import ConfigError
from ..guides.amortized import delta_guide, masking_noise
from .vae import autoencoder

__all__ = ["StackedAutoencoder", "stacked_autoencoder", "pretrain_layerwise"]


@dataclass(frozen=True)
class StackedAutoencoder:
    """The layers of a stacked autoencoder and the fine-tuning model and guide.

    ``encoders[l]`` maps :math:`h_l \\to h_{l+1}` and ``decoders[l]`` maps :math:`h_{l+1}` back to
    the parameters of :math:`h_l`; ``encoder`` and ``decoder`` are the whole stacks (sharing
    those modules); ``model`` and ``guide`` are the fine-tuning autoencoder.
    """

    encoders: nn.ModuleList
    decoders: nn.ModuleList
    encoder: nn.Sequential
    decoder: nn.Sequential
    likelihood: nn.Module
    widths: tuple[int, ...]
    noise: float
    model: Callable[..., None]
    guide: Callable[..., None]


def stacked_autoencoder(data_dim: int, widths: Sequence[int], likelihood: nn.Module, *, noise: float = 0.25) -> StackedAutoencoder:
    """Layers ``data_dim -> widths[0] -> ... -> widths[-1]`` (the code); ``likelihood`` of the data given the first decoder's output."""
    widths = tuple(widths)
    if len(widths) < 1 or any(not isinstance(w, int) or w <= 0 for w in widths):
        raise ConfigError(f"a stacked autoencoder needs positive layer widths, got {widths}")
    if not 0 <= noise < 1:
        raise ConfigError(f"noise must be in [0, 1), got {noise}")
    sizes = (data_dim, *widths)
    encoders = nn.ModuleList(
        [nn.Sequential(nn.Linear(a, b), nn.Sigmoid()) for a, b in zip(sizes[:-2], sizes[1:-1])] + [nn.Sequential(nn.Linear(sizes[-2], sizes[-1]))]
    )
    decoders = nn.ModuleList([nn.Sequential(nn.Linear(sizes[1], sizes[0]))] + [nn.Sequential(nn.Linear(b, a), nn.Sigmoid()) for a, b in zip(sizes[1:-1], sizes[2:])])
    encoder, decoder = nn.Sequential(*encoders), nn.Sequential(*reversed(decoders))
    model = autoencoder(decoder, likelihood, widths[-1])
    guide = delta_guide(encoder, corruption=masking_noise(noise) if noise else None)
    return StackedAutoencoder(encoders, decoders, encoder, decoder, likelihood, widths, noise, model, guide)


def pretrain_layerwise(stack: StackedAutoencoder, x: torch.Tensor, *, epochs: int, batch_size: int = 100, lr: float = 1e-3, seed: int = 0,
                       progress: bool = False) -> list[dict[str, float]]:
    """Train each layer as a denoising autoencoder on the clean codes of the layers below it; one record per layer.

    Each record holds the layer, its width, and its final training objective (reconstruction
    log-likelihood of the layer's input, nats per datapoint).
    """
    from ..inference.svi import (
        fit,  # the inference package builds on the models, not the other way round
    )

    records, h = [], x
    unit = get_likelihood("gaussian")
    for layer, (enc, dec) in enumerate(zip(stack.encoders, stack.decoders)):
        lik = stack.likelihood if layer == 0 else unit
        model = autoencoder(dec, lik, stack.widths[layer])
        guide = delta_guide(enc, corruption=masking_noise(stack.noise) if stack.noise else None)
        result = fit(model, guide, h, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + layer, progress=progress)
        records.append({"layer": layer + 1, "width": stack.widths[layer], "train_objective": result.train_elbo})
        with torch.no_grad():
            enc.train(False)
            h = enc(h)
    return records
