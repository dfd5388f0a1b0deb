"""Greedy layer-wise pretraining of a stacked denoising autoencoder (:mod:`ppl_vae.models.stacked`), by ``fit``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..guides.amortized import delta_guide, masking_noise
from ..models.stacked import StackedAutoencoder, layer_model
from .svi import fit

__all__ = ["pretrain_layerwise", "stacked_guide"]


def _corruption(noise: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if not 0 <= noise < 1:
        raise ConfigError(f"noise must be in [0, 1), got {noise}")
    return masking_noise(noise) if noise else None


def stacked_guide(stack: StackedAutoencoder, noise: float = 0.25) -> Callable[..., None]:
    """The fine-tuning guide: a point mass at the whole encoder's code of the masked input (``noise``: masking probability)."""
    return delta_guide(stack.encoder, corruption=_corruption(noise))


def pretrain_layerwise(
    stack: StackedAutoencoder,
    x: torch.Tensor,
    *,
    epochs: int,
    noise: float = 0.25,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train each layer as a denoising autoencoder on the clean codes of the layers below it; one record per layer.

    Each record holds the layer, its width, and its final training objective (reconstruction
    log-likelihood of the layer's input, nats per datapoint).
    """
    corruption = _corruption(noise)
    records, h = [], x
    for layer, enc in enumerate(stack.encoders):
        result = fit(
            layer_model(stack, layer),
            delta_guide(enc, corruption=corruption),
            h,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed + layer,
            progress=progress,
        )
        records.append(
            {"layer": layer + 1, "width": stack.widths[layer], "train_objective": result.train_elbo}
        )
        with torch.no_grad():
            enc.train(False)
            h = enc(h)
    return records
