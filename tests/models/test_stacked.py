"""Stacked denoising autoencoder: each layer is pretrained as a DAE on the codes below it, the stack is fine-tuned as one
model (the command line runs both as one ``fit --model sdae``: tests/app). Runs on the embedded 8x8 digits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.guides.amortized import delta_guide
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.pretrain import pretrain_layerwise, stacked_guide
from ppl_vae.models.stacked import stacked_autoencoder
from ppl_vae.models.vae import autoencoder


def test_each_layer_is_pretrained_on_the_codes_of_the_layers_below():
    x = load("digits", binarize="threshold").x
    torch.manual_seed(0)
    stack = stacked_autoencoder(64, (32, 16, 4), get_likelihood("bernoulli"))
    assert list(stack.encoder) == list(stack.encoders) and list(stack.decoder) == list(
        reversed(stack.decoders)
    )  # the stacks share the layers

    def layer_objective(
        layer: int,
    ) -> (
        torch.Tensor
    ):  # the layer's own DAE objective on the clean codes of the (current) layers below
        with torch.no_grad():
            h = x
            for enc in stack.encoders[:layer]:
                h = enc(h)
        lik = stack.likelihood if layer == 0 else get_likelihood("gaussian")
        model, guide = (
            autoencoder(stack.decoders[layer], lik, stack.widths[layer]),
            delta_guide(stack.encoders[layer]),
        )
        stack.encoder.train(False)
        return elbo_per_datapoint(model, guide, h).value

    before = layer_objective(0)
    records = pretrain_layerwise(stack, x, epochs=20, noise=0.2, batch_size=64, lr=3e-3, seed=0)
    assert [(r["layer"], r["width"]) for r in records] == [(1, 32), (2, 16), (3, 4)]
    after = layer_objective(0)
    gain = after - before  # paired over the images
    assert gain.mean() > Z * gain.std() / math.sqrt(len(gain)), gain.mean()
    for layer in (
        1,
        2,
    ):  # the recorded objective is the layer's own, on the codes below it (up to the masking noise in training)
        assert math.isfinite(records[layer]["train_objective"])
        assert (
            layer_objective(layer).mean() > records[layer]["train_objective"] - 1.0
        )  # clean inputs reconstruct at least as well


def test_the_stacked_guide_refuses_a_noise_outside_0_1():
    with pytest.raises(ConfigError, match="noise must be in"):
        stacked_guide(stacked_autoencoder(64, (8, 2), get_likelihood("bernoulli")), noise=1.0)
