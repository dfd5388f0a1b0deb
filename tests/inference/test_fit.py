"""``fit``: argument checks, divergence handling, early stopping, schedules (a command-line run's reload: tests/app).

Data are drawn inside the tests from explicitly seeded generators, never at import time.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ppl_vae import io as ppl_io
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError, DataError, TrainingDiverged
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.svi import CHECKPOINT, fit, lr_factor
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


def tiny():
    dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
    return vae(dec, get_likelihood("gaussian"), 2), amortized_guide(enc)


def data(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 6, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def X():
    return data(60, seed=11)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (torch.empty(0, 6), DataError, "empty"),
        (torch.full((4, 6), float("nan")), DataError, "NaN or infinite"),
        (torch.ones(4, 6, dtype=torch.long), DataError, "floating-point"),
        ((torch.zeros(4, 6), torch.zeros(3)), DataError, "same number of rows"),
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
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"estimator": "nope"}, "unknown estimator"),
        ({"lr_schedule": "nope"}, "unknown lr_schedule"),
        ({"resume": True}, "resume needs"),
    ],
)
def test_bad_options_are_refused(X, kwargs, match):
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


def sabotaged(wrapper: nn.Module):
    """A Gaussian VAE (data width 6, latent 2) whose decoder output passes through ``wrapper``; returns (model, guide)."""
    dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
    lik = get_likelihood("gaussian")

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", lik(wrapper(dec(z))), obs=x)

    return model, amortized_guide(enc)


def test_non_finite_loss_stops_with_step_and_site_and_keeps_last_checkpoint(tmp_path, X):
    model, guide = sabotaged(
        Saboteur(after=7)
    )  # 60 rows / batch 20 = 3 steps an epoch: fails in epoch 3
    with pytest.raises(TrainingDiverged) as info:
        fit(
            model,
            guide,
            X,
            epochs=5,
            batch_size=20,
            out=tmp_path,
            progress=False,
            validate_every_step=True,
        )
    assert info.value.step == 7
    assert (
        info.value.site == "x"
    )  # found from the failing step itself (replayed with its own draws), not a fresh run
    assert "step 7" in str(info.value) and "model site 'x' has a non-finite log-density" in str(
        info.value
    )
    ckpt = torch.load(
        tmp_path / CHECKPOINT, weights_only=True
    )  # a checkpoint holds tensors and plain containers only
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt["params"])


def test_an_impossible_elbo_stops_training_at_the_step_naming_the_site():
    """Binary data: log p(x) <= 0, so an ELBO estimate of +1e20 is a divergence (here the full-covariance guide at lr 3)."""
    from ppl_vae.data import load

    x = load("digits", "train", binarize="threshold", limit=300).x
    torch.manual_seed(0)
    dec, enc = MLP(2, [32], 64), GaussianEncoder(MLP(64, [], 32), 32, 2, "full")
    model, guide = vae(dec, get_likelihood("bernoulli"), 2), amortized_guide(enc)
    with pytest.raises(TrainingDiverged, match="above what discrete data allow") as info:
        fit(model, guide, x, epochs=8, lr=3.0, seed=0, progress=False)
    assert info.value.step < 10 and info.value.site == "z"
    assert "guide site 'z'" in str(info.value)


class Amplifier(nn.Module):
    """Identity for ``after`` gradient-carrying calls, then multiplies by 1e8: finite, but absurd."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, h):
        self.calls += torch.is_grad_enabled()
        return h * 1e8 if self.calls > self.after else h


def test_an_elbo_that_jumps_by_orders_of_magnitude_stops_training(X):
    """A Gaussian likelihood has no upper bound on log p(x), so the watch is the ELBO's growth against its recent median."""
    model, guide = sabotaged(Amplifier(after=4))
    with pytest.raises(TrainingDiverged, match="jumped to") as info:
        fit(model, guide, X, epochs=5, batch_size=20, progress=False)
    assert info.value.step == 4 and info.value.site == "x"


class EvalSaboteur(nn.Module):
    """Identity in training mode, NaN in evaluation mode: the NaN first shows in the validation pass."""

    def forward(self, h):
        return h if self.training else h * float("nan")


def test_a_non_finite_validation_elbo_is_reported_like_a_training_one(X):
    model, guide = sabotaged(EvalSaboteur())
    with pytest.raises(
        TrainingDiverged, match="validation ELBO after epoch 1 is not finite"
    ) as info:
        fit(model, guide, X, validation=data(20, seed=3), epochs=3, batch_size=20, progress=False)
    assert info.value.site == "x" and "model site 'x' has a non-finite log-density" in str(
        info.value
    )


def test_early_stopping_restores_the_best_epoch(tmp_path, monkeypatch):
    model, guide = tiny()
    x, val = data(40, seed=1), data(40, seed=2)
    after_epoch: dict[
        int, list[torch.Tensor]
    ] = {}  # the parameters each epoch ended with, as checkpointed
    save = ppl_io.save_torch

    def recording_save(path, state):
        after_epoch[state["epoch"]] = [p.clone() for p in state["params"]]
        return save(path, state)

    monkeypatch.setattr(ppl_io, "save_torch", recording_save)
    patience = 3
    result = fit(
        model,
        guide,
        x,
        validation=val,
        epochs=200,
        batch_size=40,
        lr=0.05,
        patience=patience,
        out=tmp_path,
        progress=False,
    )
    vals = [h["val_elbo"] for h in result.history]
    assert result.stopped_early and result.epochs < 200
    assert result.best_epoch == 1 + vals.index(max(vals))
    assert (
        result.epochs == result.best_epoch + patience
    )  # stopped exactly `patience` epochs after the best one
    assert sorted(after_epoch) == list(range(1, result.epochs + 1))
    # the parameters fit leaves in the networks are the best epoch's, not the last epoch's
    found = ppl_io.load_checkpoint(tmp_path / CHECKPOINT)
    restored = [p.detach().clone() for p in _params(model, guide, x)]
    assert len(restored) == len(after_epoch[result.best_epoch])
    assert all(torch.equal(a, b) for a, b in zip(restored, after_epoch[result.best_epoch]))
    assert not all(torch.equal(a, b) for a, b in zip(restored, after_epoch[result.epochs]))
    # the checkpoint says so, and keeps the last epoch's state for a resumption
    assert found["stopped_early"] and all(
        torch.equal(a, b) for a, b in zip(found["params"], after_epoch[result.epochs])
    )


def _params(model, guide, x):
    from ppl_vae.inference.params import discover

    return discover(model, guide, (x[:2],)).params


def test_cosine_schedule_decays_learning_rate(X):
    model, guide = tiny()
    result = fit(model, guide, X, epochs=4, lr=0.01, lr_schedule="cosine", progress=False)
    lrs = [h["lr"] for h in result.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01 * 1e-6 + 1e-12
    assert math.isclose(lrs[0], 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert lrs == [0.01 * lr_factor("cosine", e, 4) for e in range(1, 5)]


def test_resume_extends_a_schedule_to_the_new_total(tmp_path, X):
    model, guide = tiny()
    fit(model, guide, X, epochs=2, lr=0.01, lr_schedule="exponential", out=tmp_path, progress=False)
    model, guide = tiny()
    result = fit(
        model,
        guide,
        X,
        epochs=5,
        lr=0.01,
        lr_schedule="exponential",
        out=tmp_path,
        resume=True,
        progress=False,
    )
    lrs = [h["lr"] for h in result.history]
    assert lrs[:2] == [
        0.01 * lr_factor("exponential", e, 2) for e in (1, 2)
    ]  # the first plan, as it ran
    assert lrs[2:] == [
        0.01 * lr_factor("exponential", e, 5) for e in (3, 4, 5)
    ]  # re-planned for 5 epochs
    with pytest.raises(ConfigError, match="fewer than the 5 epochs"):
        fit(
            model,
            guide,
            X,
            epochs=4,
            lr=0.01,
            lr_schedule="exponential",
            out=tmp_path,
            resume=True,
            progress=False,
        )


def test_seeded_runs_are_bitwise_identical(X):
    results, params = [], []
    for _ in range(2):
        torch.manual_seed(0)
        dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
        model, guide = vae(dec, get_likelihood("gaussian"), 2), amortized_guide(enc)
        results.append(
            fit(
                model,
                guide,
                X,
                epochs=2,
                batch_size=16,
                estimator="score",
                num_particles=3,
                seed=5,
                progress=False,
            )
        )
        params.append([p.detach().clone() for p in (*dec.parameters(), *enc.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*params))
    assert [h["train_elbo"] for h in results[0].history] == [
        h["train_elbo"] for h in results[1].history
    ]


def test_fit_leaves_the_callers_random_stream_alone_and_its_seed_decides_the_draws(X):
    """The global torch RNG after ``fit`` is where the caller left it; two fits from different outer states agree."""
    runs = []
    for outer in (1, 2):
        torch.manual_seed(0)
        model, guide = tiny()
        torch.manual_seed(outer)
        expected = torch.get_rng_state()
        runs.append(
            fit(
                model, guide, X, epochs=1, batch_size=16, estimator="score", seed=5, progress=False
            ).train_elbo
        )
        assert torch.equal(torch.get_rng_state(), expected)
    assert runs[0] == runs[1]


class RowsOnDemand(Dataset):
    """A map-style dataset that makes each row when asked, as a read from disk would."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.reads = x, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.x[i].clone()


def test_a_dataset_or_a_dataloader_trains_exactly_like_the_same_tensors(X):
    """Same rows, same order, same draws: the parameters and history agree bit for bit; the dataset is read row by row."""
    runs = {}
    sources = {
        "tensor": (X, X[:20]),
        "dataset": (RowsOnDemand(X), RowsOnDemand(X[:20])),
        "loader": (
            DataLoader(RowsOnDemand(X), batch_size=7, shuffle=True),
            DataLoader(RowsOnDemand(X[:20])),
        ),
    }
    for name, (train, valid) in sources.items():
        torch.manual_seed(0)
        dec, enc = MLP(2, [8], 6), GaussianEncoder(MLP(6, [], 8), 8, 2)
        model, guide = vae(dec, get_likelihood("gaussian"), 2), amortized_guide(enc)
        result = fit(
            model,
            guide,
            train,
            validation=valid,
            epochs=2,
            batch_size=16,
            estimator="score",
            seed=5,
            progress=False,
        )
        runs[name] = (
            [p.detach().clone() for p in (*dec.parameters(), *enc.parameters())],
            result.history,
        )
    for name in ("dataset", "loader"):
        assert all(torch.equal(a, b) for a, b in zip(runs["tensor"][0], runs[name][0])), name
        assert runs[name][1][-1]["train_elbo"] == runs["tensor"][1][-1]["train_elbo"]
        assert runs[name][1][-1]["val_elbo"] == runs["tensor"][1][-1]["val_elbo"]
    assert sources["dataset"][0].reads >= 2 * len(X)  # every epoch read every row


def test_a_bad_row_of_a_dataset_is_a_data_error_naming_it():
    x = data(40, seed=2)
    x[33, 1] = float("nan")
    model, guide = tiny()
    with pytest.raises(DataError, match="data row 33 contains NaN or infinite values"):
        fit(model, guide, RowsOnDemand(x), epochs=1, batch_size=8, progress=False)


def test_training_from_python_prints_nothing_of_pyro_s_plate_guess(capsys):
    import logging

    from ppl_vae.models import PPCA

    ppca = PPCA(4, 2)
    with pytest.warns(UserWarning, match="no sample sites configured for enumeration"):
        fit(
            ppca,
            ppca.exact_guide,
            torch.randn(20, 4),
            epochs=1,
            batch_size=10,
            progress=False,
            estimator="enum",
        )
    assert "Guessed max_plate_nesting" not in capsys.readouterr().err
    # the line is dropped while the package runs Pyro's ELBO only: the user's logging is left as it was, the line included
    logger = logging.getLogger("pyro.infer.elbo")
    guess = logging.LogRecord(
        "pyro.infer.elbo", logging.INFO, "", 0, "Guessed max_plate_nesting = 1", None, None
    )
    assert logger.filter(guess) and not logger.filters
