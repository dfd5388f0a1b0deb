"""``fit``: argument checks, divergence handling, early stopping, schedules, run reload."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae import ConfigError, DataError, TrainingDiverged, fit
from ppl_vae.guides import amortized_guide
from ppl_vae.inference.svi import CHECKPOINT
from ppl_vae.models import get_likelihood, vae
from ppl_vae.nn import MLP, GaussianEncoder


def tiny():
    dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
    return vae(dec, get_likelihood("gaussian"), 2), amortized_guide(enc)


X = torch.randn(60, 6)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.empty(0, 6), DataError, "empty"),
        (torch.full((4, 6), float("nan")), DataError, "NaN or infinite"),
        (torch.ones(4, 6, dtype=torch.long), DataError, "floating-point"),
        ((torch.randn(4, 6), torch.zeros(3)), DataError, "same number of rows"),
        ("not a tensor", DataError, "tensor"),
    ],
)
def test_bad_data_is_refused(data, error, match):
    model, guide = tiny()
    with pytest.raises(error, match=match):
        fit(model, guide, data, epochs=1, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_particles": 0}, "num_particles"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"patience": 0}, "patience"),
        ({"estimator": "nope"}, "unknown estimator"),
        ({"lr_schedule": "nope"}, "unknown lr_schedule"),
        ({"resume": True}, "resume needs"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    model, guide = tiny()
    with pytest.raises(ConfigError, match=match):
        fit(model, guide, X, progress=False, **{"epochs": 1, **kwargs})


class Saboteur(nn.Module):
    """Identity until ``after`` training calls (with gradients: not fit's discovery pass), then NaN."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, h):
        if self.training:
            self.calls += torch.is_grad_enabled()
            if self.calls > self.after:
                return h * float("nan")
        return h


def test_non_finite_loss_stops_with_step_and_site_and_keeps_last_checkpoint(tmp_path):
    dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
    saboteur = Saboteur(after=7)  # 60 rows / batch 20 = 3 steps an epoch: fails in epoch 3
    lik = get_likelihood("gaussian")

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", lik(saboteur(dec(z))), obs=x)

    guide = amortized_guide(enc)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, guide, X, epochs=5, batch_size=20, out=tmp_path, progress=False, validate_every_step=True)
    assert info.value.step == 7
    assert info.value.site == "x"
    assert "step 7" in str(info.value) and "site: x" in str(info.value)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt["params"])


def test_early_stopping_restores_the_best_epoch():
    model, guide = tiny()
    x, val = torch.randn(40, 6), torch.randn(40, 6)
    result = fit(model, guide, x, validation=val, epochs=200, batch_size=40, lr=0.05, patience=3, progress=False)
    vals = [h["val_elbo"] for h in result.history]
    assert result.stopped_early and result.epochs < 200
    assert result.best_epoch == 1 + vals.index(max(vals))
    assert all(v <= max(vals) for v in vals[result.best_epoch :])
    # restored parameters give the best epoch's validation ELBO (up to Monte Carlo noise)
    assert result.val_elbo > min(vals[result.best_epoch :]) - 1.0


def test_cosine_schedule_decays_learning_rate():
    model, guide = tiny()
    result = fit(model, guide, X, epochs=4, lr=0.01, lr_schedule="cosine", progress=False)
    lrs = [h["lr"] for h in result.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * 1e-6 + 1e-12
    assert math.isclose(lrs[0], 0.01 * (1 + math.cos(math.pi / 4)) / 2)


def test_seeded_runs_are_bitwise_identical():
    results, params = [], []
    for _ in range(2):
        torch.manual_seed(0)
        dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
        model, guide = vae(dec, get_likelihood("gaussian"), 2), amortized_guide(enc)
        results.append(fit(model, guide, X, epochs=2, batch_size=16, estimator="score", num_particles=3, seed=5, progress=False))
        params.append([p.detach().clone() for p in (*dec.parameters(), *enc.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*params))
    assert [h["train_elbo"] for h in results[0].history] == [h["train_elbo"] for h in results[1].history]


def test_run_reload_round_trip(tmp_path):
    from ppl_vae.experiment import Config, load_run, run
    from ppl_vae.inference import evaluate_elbo
    from ppl_vae.io import load_torch

    cfg = Config(dataset="digits", binarize="threshold", hidden=(16,), latent_dim=2, epochs=3, limit=300)
    metrics = run(cfg, tmp_path / "run", progress=False, figures=False)
    built, splits = load_run(tmp_path / "run")
    saved = load_torch(tmp_path / "run" / CHECKPOINT)["params"]
    assert any(torch.equal(p, s) for p in built.decoder.parameters() for s in saved)
    test = splits["test"].x
    elbo = torch.stack([evaluate_elbo(built.model, built.guide, (test,)) for _ in range(8)]).mean(0)
    # metrics' test ELBO is a 1-draw estimate: compare within 4 standard errors of the difference
    assert abs(elbo.mean().item() - metrics["test_elbo"]) < 4 * metrics["test_elbo_se"] * math.sqrt(1 + 1 / 8) + 0.05
