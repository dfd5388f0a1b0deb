"""Stacked denoising autoencoder: each layer is pretrained as a DAE on the codes below it, the stack is fine-tuned as one
model, and the command line runs both as one ``fit --model sdae``. Runs on the embedded 8x8 digits."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import Z

from ppl_vae.app.runs import open_run
from ppl_vae.cli import main
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


@pytest.mark.slow
def test_sdae_runs_as_one_command_and_its_codes_classify_the_digits(tmp_path):
    out = tmp_path / "sdae"
    argv = [
        "fit",
        "--model",
        "sdae",
        "--dataset",
        "digits",
        "--binarize",
        "threshold",
        "--layers",
        "32,16,4",
        "--pretrain-epochs",
        "10",
        "--epochs",
        "10",
        "--lr",
        "3e-3",
        "--batch-size",
        "64",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    with open(out / "pretrain.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["width"]) for r in rows] == [32, 16, 4]
    built, splits = open_run(out)  # rebuilt from the checkpoint, without pretraining again
    assert built.latent_mean(splits["test"].x[:5]).shape == (5, 4)
    # the 4-d codes of the digits carry the class: a nearest-centroid rule on the training codes scores far above chance (10%)
    with torch.no_grad():
        codes = {s: built.latent_mean(splits[s].x) for s in ("train", "test")}
    centroids = torch.stack([codes["train"][splits["train"].y == c].mean(0) for c in range(10)])
    accuracy = (
        (torch.cdist(codes["test"], centroids).argmin(1) == splits["test"].y).double().mean().item()
    )
    n = len(splits["test"].y)
    assert accuracy > 0.1 + Z * math.sqrt(0.1 * 0.9 / n), accuracy  # a binomial bound on chance


def test_sdae_options_are_checked(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--model",
                "sdae",
                "--dataset",
                "digits",
                "--layers",
                "32,0,4",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert (
        "--layers needs at least 2 positive widths" in capsys.readouterr().err and not out.exists()
    )
    with pytest.raises(ConfigError, match="noise must be in"):
        stacked_guide(stacked_autoencoder(64, (8, 2), get_likelihood("bernoulli")), noise=1.0)
