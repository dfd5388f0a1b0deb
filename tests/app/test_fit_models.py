"""``ppl-vae fit --model ...`` of the model family: a run of each reloads as it trained; the options of each model are checked in one line before anything is written."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import BINARY, Z, one_line
from pyro import poutine

from ppl_vae.app.runs import open_run
from ppl_vae.cli import main

#: the data of the runs refused before any work: 60 binarised digits
DIGITS = ["--dataset", "digits", "--limit", "60", "--binarize", "threshold"]


def test_cli_refuses_a_negative_contractive_weight(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--model",
                "cae",
                "--contractive",
                "-1",
                *DIGITS,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    one_line(capsys, "contractive weight must be a finite number >= 0")
    assert not out.exists()


@pytest.mark.parametrize(
    "model", ["hvae", "lvae", "mog-vae", "vampprior", "vqvae", "vqvae2", "sparse-ae", "cae", "sdae"]
)
def test_cli_fit_and_reload(model, tmp_path):
    """``ppl-vae fit --model ...`` trains, writes its figures (prior samples from the model's own prior) and reloads."""
    out = tmp_path / model
    argv = ["fit", "--model", model, *BINARY, "--out", str(out)]  # 60 binarised digits, 2 epochs
    assert main(argv) == 0
    assert (out / "prior_samples.png").stat().st_size > 1000
    built, splits = open_run(out)
    x = splits["test"].x[:5]
    assert built.reconstruct(x).shape == x.shape
    assert built.latent_mean(x).shape[0] == 5


@pytest.mark.parametrize("model", ["mog-vae", "vampprior"])
def test_components_sets_the_size_of_the_mixture_prior(model, tmp_path):
    """``--components K``: the prior of the reloaded run is a mixture of K components (Gaussians, or the guide at K pseudo-inputs)."""
    out = tmp_path / model
    argv = [
        "fit",
        "--model",
        model,
        "--components",
        "7",
        *BINARY,
        "--limit",
        "60",
        "--hidden",
        "16",
        "--latent-dim",
        "2",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    built, splits = open_run(out)
    z = poutine.trace(built.model).get_trace(splits["test"].x[:5]).nodes["z"]["fn"]
    assert z.mixture_distribution.logits.shape[-1] == 7


def test_cli_rejects_conv_and_score_for_the_family(tmp_path, capsys):
    for extra, fragment in (
        (["--model", "hvae", "--arch", "conv"], "--arch conv"),
        (["--model", "vqvae", "--estimator", "score"], "point-estimate"),
    ):
        out = tmp_path / "x"
        assert (
            main(
                [
                    "fit",
                    *DIGITS,
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 2
        )
        one_line(capsys, fragment)
        assert not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model", "hvae", "--estimator", "analytic-kl"], "not mean-field"),
        (
            ["--model", "vae", "--estimator", "iwae", "--num-particles", "2", "--beta", "2"],
            "iwae is not defined",
        ),
        (["--model", "vae", "--components", "5"], "--components applies to mog-vae, vampprior"),
        (["--model", "vampprior", "--components", "0"], "components must be >= 1"),
    ],
)
def test_wrong_objective_combinations_are_refused_before_anything_is_written(
    tmp_path, capsys, options, message
):
    out = tmp_path / "run"
    assert main(["fit", "--out", str(out), *BINARY, *options]) == 2
    one_line(capsys, message)
    assert not out.exists()


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


def test_cli_layers_are_checked_in_one_line(tmp_path, capsys):
    base = [
        "fit",
        *DIGITS,
        "--epochs",
        "1",
        "--no-progress",
    ]
    for extra, fragment in (
        (["--model", "vae", "--layers", "8,2"], "--layers applies to lvae"),
        (["--model", "lvae", "--layers", "8"], "at least 2 positive widths"),
        (["--model", "lvae", "--layers", "8,4", "--latent-dim", "2"], "must equal --latent-dim"),
    ):
        out = tmp_path / "run"
        assert main([*base, "--out", str(out), *extra]) == 2
        one_line(capsys, fragment)
        assert not out.exists()
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "ok"),
                "--model",
                "lvae",
                "--layers",
                "8,4,2",
                "--hidden",
                "16",
                "--kl-warmup",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "KL per latent site (test, nats/datapoint): z3" in printed
