"""A resumed or reloaded computation trusts nothing it reads; options that would be ignored are refused; data read batch by batch is checked.

Each test damages one field of one saved file (checkpoint, config, progress, metrics) and asserts a refusal that
names it, with every file left as it was; or gives an option that another overrides or that does not apply, and
asserts a refusal before any folder is made.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from conftest import BINARY as TINY
from conftest import one_line, snapshot
from torch.utils.data import Dataset

from ppl_vae import fit
from ppl_vae.app.commands import nll as nll_command
from ppl_vae.app.runs import load_run
from ppl_vae.cli import main
from ppl_vae.errors import CheckpointError, DataError, ProcessFailed, TrainingDiverged
from ppl_vae.guides import amortized_guide
from ppl_vae.inference import loop
from ppl_vae.nn import MLP, GaussianEncoder

pytestmark = pytest.mark.usefixtures("empty_data_home")


def refused(capsys, *fragments: str) -> str:
    return one_line(capsys, *fragments)


def damage_checkpoint(run: Path, edit) -> None:
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)


# --------------------------------------------------------------------------- the checkpoint, field by field

CHECKPOINT_DAMAGE = [
    pytest.param(lambda c: c.update(step="x"), ["step must be"], id="step-string"),
    pytest.param(
        lambda c: c.update(history="abc"), ["history must be a list"], id="history-string"
    ),
    pytest.param(
        lambda c: c.update(history=[1, 2]), ["history[0] must be a record"], id="history-ints"
    ),
    pytest.param(lambda c: c.update(epoch=-1), ["epoch must be"], id="epoch-negative"),
    pytest.param(
        lambda c: c.update(epoch=1),
        ["epoch must be the number of epochs in history (2)"],
        id="epoch-vs-history",
    ),
    pytest.param(
        lambda c: c["history"][1].update(epoch=5),
        ["history[1].epoch must be 2"],
        id="history-epoch",
    ),
    pytest.param(
        lambda c: c["history"][1].update(train_elbo=math.nan),
        ["history[1].train_elbo must be a finite number"],
        id="history-nan",
    ),
    pytest.param(
        lambda c: c["options"].update(lr=0.5),
        ["options.lr is 0.5, but the run's config says 0.001"],
        id="options-vs-config",
    ),
    pytest.param(
        lambda c: c["options"].update(seed=-3), ["options.seed must be"], id="options-seed"
    ),
    pytest.param(
        lambda c: c.update(wall_time=math.nan),
        ["wall_time must be a finite number"],
        id="wall-time-nan",
    ),
    pytest.param(
        lambda c: c.update(best_epoch=7),
        ["best_epoch must be an integer from 0 to 2"],
        id="best-epoch",
    ),
    pytest.param(
        lambda c: c.update(bad_epochs=4),
        ["bad_epochs must be the epochs since best_epoch"],
        id="bad-epochs",
    ),
    pytest.param(
        lambda c: c.update(stopped_early="no"),
        ["stopped_early must be true or false"],
        id="stopped-early",
    ),
    pytest.param(
        lambda c: c.update(rng={"torch": [1, 2]}), ["rng must hold torch's random state"], id="rng"
    ),
    pytest.param(
        lambda c: c.update(optimizer=[]), ["optimizer must be an optimiser's state"], id="optimizer"
    ),
    pytest.param(lambda c: c.pop("best"), ["no best"], id="missing-best"),
]


@pytest.mark.parametrize("edit, fragments", CHECKPOINT_DAMAGE)
def test_resume_refuses_each_damaged_checkpoint_field_by_name(run_copy, capsys, edit, fragments):
    damage_checkpoint(run_copy, edit)
    before = snapshot(run_copy)
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 2
    refused(capsys, "checkpoint", "is damaged", *fragments)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("edit, fragments", CHECKPOINT_DAMAGE[:4])
def test_an_analysis_and_load_run_refuse_a_damaged_checkpoint_too(
    run_copy, tmp_path, capsys, edit, fragments
):
    damage_checkpoint(run_copy, edit)
    assert (
        main(
            [
                "nll",
                "--run",
                str(run_copy),
                "--out",
                str(tmp_path / "nll"),
                "--K",
                "10",
                "--limit",
                "2",
                "--no-progress",
            ]
        )
        == 2
    )
    refused(capsys, "is damaged", *fragments)
    assert not (tmp_path / "nll").exists()
    with pytest.raises(CheckpointError, match="is damaged"):
        load_run(run_copy)


def test_a_config_missing_a_key_is_not_filled_with_the_default(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    del config["latent_dim"]
    (run_copy / "config.json").write_text(json.dumps(config))
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 2
    refused(capsys, "no latent_dim")
    with pytest.raises(Exception, match="no latent_dim"):
        load_run(run_copy)


def test_resume_checks_that_the_networks_fit_in_memory(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["hidden"] = [
        3_000_000_000
    ]  # 3e9 x 64 weights: 768 GB, refused before a byte is allocated
    (run_copy / "config.json").write_text(json.dumps(config))
    before = snapshot(run_copy)
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 2
    refused(capsys, "does not fit in memory")
    assert snapshot(run_copy) == before


# --------------------------------------------------------------------------- metrics.json


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "is unreadable"),
        ("[1, 2]", "not a JSON object"),
        ('{"train_elbo": "high", "val_elbo": 1.0}', "train_elbo must be a finite number"),
        ('{"train_elbo": -40.0}', "val_elbo must be a finite number or null"),
    ],
)
def test_load_run_refuses_a_damaged_metrics_file_by_name(run_copy, text, fragment):
    (run_copy / "metrics.json").write_text(text)
    with pytest.raises(CheckpointError, match=fragment):
        load_run(run_copy)


# --------------------------------------------------------------------------- nll --resume: its progress file


@pytest.fixture
def interrupted_nll(finished, tmp_path, monkeypatch) -> Path:
    """An ``nll`` of 6 images in blocks of 2, interrupted during its second block: the progress file holds rows 0..1."""
    out, real, calls = tmp_path / "nll", nll_command.importance_bounds, {"n": 0}

    def bounds(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nll_command, "importance_bounds", bounds)
    assert main(["nll", "--run", str(finished), "--out", str(out), *NLL]) == 130
    monkeypatch.undo()
    assert (out / "nll_K10.partial.pt").is_file()
    return out


NLL = ["--K", "10", "--limit", "6", "--block", "2", "--no-progress"]
PROGRESS_DAMAGE = [
    pytest.param(lambda p: p.pop("iwae"), "no column iwae", id="missing-column"),
    pytest.param(
        lambda p: p.update(iwae=p["iwae"][:1]), "different lengths", id="truncated-column"
    ),
    pytest.param(
        lambda p: p.update(elbo=torch.full_like(p["elbo"], math.nan)),
        "column elbo holds a value that is not a finite number",
        id="nan",
    ),
    pytest.param(
        lambda p: p.update(index=p["index"] + 1000),
        "indices are not the images 0..1 in order",
        id="shifted-index",
    ),
    pytest.param(
        lambda p: p.update(iwae=p["elbo"] - 5.0),
        "an IWAE bound below the ELBO",
        id="iwae-below-elbo",
    ),
    pytest.param(
        lambda p: p.update(iwae_se=-p["iwae_se"] - 1), "a negative standard error", id="negative-se"
    ),
    pytest.param(
        lambda p: p.update(
            index=torch.arange(9),
            **{k: torch.zeros(9) for k in ("iwae", "iwae_se", "elbo", "khat")},
        ),
        "9 rows done of 6 images",
        id="too-many-rows",
    ),
]


@pytest.mark.parametrize("edit, fragment", PROGRESS_DAMAGE)
def test_nll_resume_refuses_a_damaged_progress_file_by_name(
    finished, interrupted_nll, capsys, edit, fragment
):
    path = interrupted_nll / "nll_K10.partial.pt"
    progress = torch.load(path, weights_only=True)
    edit(progress)
    torch.save(progress, path)
    before = snapshot(interrupted_nll)
    capsys.readouterr()
    assert (
        main(["nll", "--run", str(finished), "--out", str(interrupted_nll), "--resume", *NLL]) == 2
    )
    refused(capsys, "nll_K10.partial.pt is damaged", fragment)
    assert snapshot(interrupted_nll) == before


def test_nll_resume_of_a_sound_progress_file_equals_an_uninterrupted_run(
    finished, interrupted_nll, tmp_path, capsys
):
    assert (
        main(["nll", "--run", str(finished), "--out", str(interrupted_nll), "--resume", *NLL]) == 0
    )
    assert main(["nll", "--run", str(finished), "--out", str(tmp_path / "whole"), *NLL]) == 0
    assert (interrupted_nll / "nll_K10.csv").read_text() == (
        tmp_path / "whole" / "nll_K10.csv"
    ).read_text()


# --------------------------------------------------------------------------- options that would be ignored


@pytest.mark.parametrize(
    "argv, fragments",
    [
        pytest.param(
            ["fit", *TINY, "--model", "ppca", "--likelihood", "beta"],
            ["--likelihood applies to", "ppca would ignore it"],
            id="ppca-likelihood",
        ),
        pytest.param(
            ["fit", *TINY, "--model", "lvae", "--layers", ","],
            ["--layers", "expected at least one"],
            id="lvae-empty-layers",
        ),
        pytest.param(
            ["fit", *TINY, "--flows", "3"],
            ["--flows applies to --guide iaf"],
            id="flows-without-iaf",
        ),
        pytest.param(
            ["fit", *TINY, "--model", "vae", "--noise", "0.5"],
            ["--noise applies to", "vae would ignore it"],
            id="noise-of-a-vae",
        ),
        pytest.param(
            ["nll", "--seed", "-1", "--K", "10"],
            ["--seed must be an integer in [0, 2**32 - 1]"],
            id="nll-seed",
        ),
        pytest.param(
            ["nll", "--K", "100000000000"],
            ["--K must be an integer from 2 to 10000000"],
            id="nll-huge-K",
        ),
        pytest.param(
            ["gaps", "--seed", "-1"],
            ["--seed must be an integer in [0, 2**32 - 1]"],
            id="gaps-seed",
        ),
        pytest.param(
            ["compare", "--kernel", "hmc", "--max-tree-depth", "3"],
            ["--max-tree-depth applies to --kernel nuts"],
            id="hmc-tree-depth",
        ),
        pytest.param(
            ["compare", "--indices", "1,2", "--num-points", "2"],
            ["give either --indices or --num-points"],
            id="indices-and-points",
        ),
        pytest.param(
            ["calibrate", "--seed", "-2"],
            ["--seed must be an integer in [0, 2**32 - 1]"],
            id="calibrate-seed",
        ),
    ],
)
def test_an_option_that_would_be_ignored_is_refused_before_any_folder(
    finished, tmp_path, capsys, argv, fragments
):
    out = tmp_path / "out"
    if argv[0] != "fit":
        argv = [argv[0], "--run", str(finished), *argv[1:]]
    try:
        code = main([*argv, "--out", str(out)])
    except (
        SystemExit
    ) as exc:  # argparse's own refusals (a value its type refuses) exit from the parser
        code = exc.code
    assert code == 2
    refused(capsys, *fragments)
    assert not out.exists()


# --------------------------------------------------------------------------- data read batch by batch


D = 8


def bernoulli_vae():
    torch.manual_seed(0)
    dec, enc = MLP(2, [8], D), GaussianEncoder(MLP(D, [], 8), 8, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    return model, amortized_guide(enc)


class Rows(Dataset):
    """100 binary rows of width 8; row 57 is damaged as ``bad`` says."""

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int):
        x = (torch.arange(D) % 2).float()
        if i == 57:
            return {
                "width": torch.zeros(D - 1),
                "string": "abc",
                "half": x * 0 + 0.5,
                "nan": x.index_fill(0, torch.tensor([3]), math.nan),
                "int": x.long(),
            }[self.bad]
        return x


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (
            "width",
            "row 57 is a tensor of shape (7,) (torch.float32); the first row is a tensor of shape (8,)",
        ),
        ("string", "row 57 is a str"),
        ("half", "data row 57: observed site 'x' holds 0.5, outside the support of its Bernoulli"),
        ("nan", "row 57 contains NaN or infinite values"),
        ("int", "row 57 is a tensor of shape (8,) (torch.int64)"),
    ],
)
def test_a_dataset_row_is_checked_like_a_tensor_and_named(bad, fragment):
    model, guide = bernoulli_vae()
    with pytest.raises(DataError) as caught:
        fit(model, guide, Rows(bad), epochs=2, batch_size=10, progress=False)
    assert fragment in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_a_tensor_row_outside_the_support_is_named_whichever_batch_it_falls_in():
    """Pyro validates the first step only: a 0.5 met later would train silently without the observed-support check."""
    model, guide = bernoulli_vae()
    x = (torch.arange(D) % 2).float().repeat(100, 1)
    order = torch.randperm(
        100, generator=torch.Generator().manual_seed(0)
    )  # fit's first epoch (seed 0)
    row = int(
        next(r for r in order[30:40] if r >= 10)
    )  # met in step 3, not in the first rows fit probes before training
    x[row, 4] = 0.5
    with pytest.raises(
        DataError, match=rf"data row {row}: observed site 'x' holds 0.5, .*\(step 3, epoch 1\)"
    ):
        fit(model, guide, x, epochs=2, batch_size=10, progress=False)
    x[row, 4] = 1.0
    assert math.isfinite(fit(model, guide, x, epochs=1, batch_size=10, progress=False).train_elbo)


# --------------------------------------------------------------------------- several processes: resume, a killed worker, divergence

TWO = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def test_a_killed_worker_is_one_line_and_the_run_resumes_from_its_folder_alone(
    tmp_path, capsys, monkeypatch
):
    """Rank 1 is killed (SIGKILL) in epoch 3; ``--resume`` with no other option continues on 2 processes, as the uninterrupted run."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    argv = [*TINY, "--epochs", "4", *TWO]
    assert main(["fit", "--out", str(whole), *argv]) == 0
    real = loop.Trainer.step

    def step(self, data, rows, step, epoch):
        if epoch == 2 and tdist.is_initialized() and tdist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, data, rows, step, epoch)

    monkeypatch.setattr(loop.Trainer, "step", step)
    capsys.readouterr()
    assert main(["fit", "--out", str(killed), *argv]) == 2
    monkeypatch.undo()
    refused(
        capsys,
        "training process 1 was killed by signal SIGKILL",
        "the last checkpoint (epoch 2) is kept",
        "--resume",
    )
    assert json.loads((killed / "config.json").read_text())["devices"] == 2
    assert main(["fit", "--out", str(killed), "--resume", "--no-progress"]) == 0
    for name in ("history.csv",):
        assert [r.split(",")[:3] for r in (killed / name).read_text().splitlines()] == [
            r.split(",")[:3] for r in (whole / name).read_text().splitlines()
        ]
    a, b = (
        torch.load(killed / "checkpoint.pt", weights_only=True),
        torch.load(whole / "checkpoint.pt", weights_only=True),
    )
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


class RankSaboteur(torch.nn.Module):
    """Identity, except in process ``rank`` from its ``after``-th training call on: NaN."""

    def __init__(self, rank: int, after: int) -> None:
        super().__init__()
        self.rank, self.after, self.calls = rank, after, 0

    def forward(self, h):
        if self.training and tdist.is_initialized() and tdist.get_rank() == self.rank:
            self.calls += torch.is_grad_enabled()
            if self.calls > self.after:
                return h * math.nan
        return h


def test_divergence_in_one_of_two_processes_names_its_rank_step_and_site(tmp_path):
    torch.manual_seed(0)
    dec, enc, saboteur = (
        MLP(2, [8], 6),
        GaussianEncoder(MLP(6, [], 8), 8, 2),
        RankSaboteur(rank=1, after=4),
    )

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(saboteur(dec(z)), 1.0).to_event(1), obs=x)

    x = torch.randn(60, 6)
    with pytest.raises(TrainingDiverged) as caught:
        fit(
            model,
            amortized_guide(enc),
            x,
            epochs=4,
            batch_size=20,
            progress=False,
            out=tmp_path / "run",
            accelerator="cpu",
            devices=2,
            strategy="ddp",
        )
    message = str(caught.value)
    assert caught.value.step == 4 and caught.value.site == "x", message
    assert (
        "at step 4 (epoch 2) on rank 1" in message
        and "model site 'x' has a non-finite" in message
        and "epoch 1) is kept" in message
    )
    assert len(message.splitlines()) == 1


def test_fit_result_of_a_killed_process_run_is_a_process_failed_error(tmp_path, monkeypatch):
    """From Python the same failure is a :class:`ProcessFailed` (a ``ppl-vae`` error, one line)."""
    model, guide = bernoulli_vae()
    x = (torch.arange(D) % 2).float().repeat(40, 1)
    real = loop.Trainer.step

    def step(self, data, rows, step, epoch):
        if tdist.is_initialized() and tdist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, data, rows, step, epoch)

    monkeypatch.setattr(loop.Trainer, "step", step)
    with pytest.raises(
        ProcessFailed,
        match="training process 1 was killed by signal SIGKILL.*no checkpoint was written",
    ):
        fit(
            model,
            guide,
            x,
            epochs=2,
            batch_size=10,
            progress=False,
            out=tmp_path / "run",
            accelerator="cpu",
            devices=2,
            strategy="ddp",
        )
