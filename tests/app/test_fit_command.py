"""A ``ppl-vae fit`` run reloads as it was saved: its networks hold the checkpoint, its splits and bounds those the run reported."""

from __future__ import annotations

import math

import torch

from ppl_vae import FitResult, load_run
from ppl_vae.app.commands.fit import run
from ppl_vae.app.config import Config
from ppl_vae.app.runs import open_run
from ppl_vae.inference.elbo import evaluate_elbo
from ppl_vae.inference.svi import CHECKPOINT
from ppl_vae.io import load_torch


def test_run_reload_round_trip(tmp_path):
    cfg = Config(
        dataset="digits", binarize="threshold", hidden=(16,), latent_dim=2, epochs=3, limit=300
    )
    metrics = run(cfg, tmp_path / "run", progress=False, figures=False)
    built, splits = open_run(tmp_path / "run")
    saved = load_torch(tmp_path / "run" / CHECKPOINT)["params"]
    assert any(torch.equal(p, s) for p in built.decoder.parameters() for s in saved)
    test = splits["test"].x
    elbo = torch.stack(
        [evaluate_elbo(built.model, built.guide, (test,)).value for _ in range(8)]
    ).mean(0)
    # metrics' test ELBO is a 1-draw estimate: compare within 4 standard errors of the difference
    assert (
        abs(elbo.mean().item() - metrics["test_elbo"])
        < 4 * metrics["test_elbo_se"] * math.sqrt(1 + 1 / 8) + 0.05
    )


def test_load_run_gives_the_cli_run_as_a_fitted_model(finished, tmp_path):
    result = load_run(finished)
    assert result.epochs == 2 and len(result.history) == 2 and result.estimator == "reparam"
    draws = result.sample(7, seed=0)
    assert draws["x"].shape == (7, 64) and set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    path = result.save(tmp_path / "model.pt")
    built, _ = open_run(finished)  # fresh networks of the run's config, with the run's parameters
    with torch.no_grad():
        for p in built.decoder.parameters():
            p.add_(1.0)  # moved away: only a working load brings them back
    back = FitResult.load(path, built.model, built.guide)
    assert back == result
    assert all(
        torch.equal(a, b) for a, b in zip(back.trained.found.params, result.trained.found.params)
    )
