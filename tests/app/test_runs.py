"""Run directories that never mix, checkpoints that never execute code, one clear line for every user error.

Every command runs in-process through ``ppl_vae.cli.main`` (a few through a subprocess) on tiny runs
(60 rows of the embedded 8x8 digits, 16 hidden units, 2 epochs) written into ``tmp_path``.
Failures that need privileges or a full disk are injected by monkeypatching the lowest call
(``os.mkdir``, ``Path.read_text``, ``ppl_vae.io.save_torch``), since the suite may run as root.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BINARY as TINY
from conftest import one_line

import ppl_vae.inference.loop as loop
import ppl_vae.inference.svi as svi
from ppl_vae import io
from ppl_vae.app import runs
from ppl_vae.app.commands.fit import run
from ppl_vae.app.config import Config
from ppl_vae.app.runs import CONFIG, open_run, read_config
from ppl_vae.cli import main
from ppl_vae.data import load
from ppl_vae.errors import CheckpointError, ConfigError
from ppl_vae.inference.elbo import Estimate

SUBPROCESS_ENV = {"MPLBACKEND": "Agg"}


pytestmark = pytest.mark.usefixtures("empty_data_home")


def fit(out: Path, *options: str) -> int:
    return main(["fit", "--out", str(out), *TINY, *options])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def history(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "history.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(fh)]


def strict_json(path: Path) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def interrupt_at_validation(monkeypatch, call: int) -> None:
    """Ctrl-C during the ``call``-th validation pass of ``fit`` (one per epoch, after the epoch's steps)."""
    real, seen = loop.evaluate_elbo, {"n": 0}

    def evaluate(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_elbo", evaluate)


# --------------------------------------------------------------------------- never unpickle from disk


class Payload:
    """Unpickling this creates ``marker`` (it would, if a loader ever ran it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def readers(run_dir: Path, out: Path) -> dict[str, list[str]]:
    """Every command that reads a run directory, with options that keep it tiny."""
    return {
        "fit-resume": ["fit", "--out", str(run_dir), "--resume", "--epochs", "3", "--no-progress"],
        "gaps": [
            "gaps",
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--num-points",
            "2",
            "--K",
            "10",
            "--elbo-samples",
            "10",
            "--local-steps",
            "5",
        ],
        "compare": [
            "compare",
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--num-points",
            "1",
            "--draws",
            "10",
            "--chains",
            "1",
            "--no-progress",
        ],
        "plot": [
            "plot",
            "--run",
            str(run_dir),
            "--kind",
            "tsne",
            "--out",
            str(out.with_suffix(".png")),
        ],
        "grad-variance": [
            "grad-variance",
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--repeats",
            "2",
            "--batch-size",
            "8",
        ],
    }


def poison(run_dir: Path, marker: Path, *, raw: bool = False) -> None:
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["extra"] = Payload(marker)
    if raw:  # a plain pickle, not torch's zip format
        (run_dir / "checkpoint.pt").write_bytes(pickle.dumps(ckpt))
    else:
        torch.save(ckpt, run_dir / "checkpoint.pt")


@pytest.mark.parametrize("command", ["fit-resume", "gaps", "compare", "plot", "grad-variance"])
def test_a_pickle_payload_checkpoint_is_refused_and_never_runs(run_copy, tmp_path, capsys, command):
    marker = tmp_path / "payload-ran"
    poison(run_copy, marker)
    # the payload is live, shown without unpickling anything: the checkpoint's pickle calls os.mkdir on the
    # marker's path, and that call, made directly, runs code
    with zipfile.ZipFile(run_copy / "checkpoint.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"mkdir" in pickled and str(marker).encode() in pickled
    probe_marker = tmp_path / "reducer-ran"
    call, args = Payload(probe_marker).__reduce__()
    call(*args)
    assert probe_marker.exists()

    before, out = snapshot(run_copy), tmp_path / "out"
    assert main(readers(run_copy, out)[command]) == 2
    one_line(
        capsys,
        "checkpoint.pt",
        "objects other than tensors",
        "not loaded",
        "nothing in it was executed",
    )
    assert not marker.exists()
    assert snapshot(run_copy) == before
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_a_plain_pickle_checkpoint_is_refused_too(run_copy, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    poison(run_copy, marker, raw=True)
    assert main(readers(run_copy, tmp_path / "out")["plot"]) == 2
    one_line(capsys, "objects other than tensors", "not loaded")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit-resume", "gaps"])
def test_a_pickle_payload_is_refused_by_the_console_script(run_copy, tmp_path, command):
    marker = tmp_path / "payload-ran"
    poison(run_copy, marker)
    env = {**os.environ, **SUBPROCESS_ENV, "PPL_VAE_DATA": str(tmp_path / "data-home")}
    argv = readers(run_copy, tmp_path / "out")[command]
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "objects other than tensors" in done.stderr, (
        done.stderr
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["fit-resume", "gaps", "compare", "plot"])
def test_a_checkpoint_with_a_nan_parameter_is_refused(run_copy, tmp_path, capsys, command):
    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    ckpt["params"][1][0] = float("nan")
    torch.save(ckpt, run_copy / "checkpoint.pt")
    before, out = snapshot(run_copy), tmp_path / "out"
    assert main(readers(run_copy, out)[command]) == 2
    one_line(capsys, "NaN or infinite", f"parameter #1 (shape {tuple(ckpt['params'][1].shape)})")
    assert snapshot(run_copy) == before and not out.exists()


def test_a_checkpoint_loads_with_weights_only(finished):
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    # one torch RNG state per training process (the shuffling is a function of seed and epoch)
    assert set(ckpt["rng"]) == {"torch", "world_size"} and ckpt["rng"]["world_size"] == 1
    assert len(ckpt["rng"]["torch"]) == 1 and all(
        isinstance(t, torch.Tensor) for t in ckpt["rng"]["torch"]
    )
    assert ckpt["epoch"] == 2 and all(torch.isfinite(p).all() for p in ckpt["params"])


# --------------------------------------------------------------------------- resumption, bit for bit


def _same_runs(a: Path, b: Path) -> None:
    assert history(a) == history(b)
    pa, pb = io.load_checkpoint(a / "checkpoint.pt"), io.load_checkpoint(b / "checkpoint.pt")
    assert len(pa["params"]) == len(pb["params"]) > 0
    assert all(torch.equal(x, y) for x, y in zip(pa["params"], pb["params"]))
    assert pa["estimator"] == pb["estimator"]
    ma, mb = strict_json(a / "metrics.json"), strict_json(b / "metrics.json")
    for key in ("train_elbo", "val_elbo", "test_elbo", "epochs", "steps"):
        assert ma[key] == mb[key], key


@pytest.mark.parametrize(
    ("options", "how"),
    [
        pytest.param([], "extend", id="reparam-extend"),
        pytest.param([], "interrupt", id="reparam-interrupt"),
        pytest.param(["--estimator", "score+average"], "extend", id="score+average-extend"),
        pytest.param(["--estimator", "score+average"], "interrupt", id="score+average-interrupt"),
        pytest.param(["--estimator", "score+nvil"], "extend", id="score+nvil-extend"),
        pytest.param(["--estimator", "score+nvil"], "interrupt", id="score+nvil-interrupt"),
        pytest.param(["--lr-schedule", "cosine"], "interrupt", id="cosine-interrupt"),
        pytest.param(
            ["--lr-schedule", "exponential", "--estimator", "score+average"],
            "interrupt",
            id="exponential-average-interrupt",
        ),
    ],
)
def test_two_plus_two_epochs_equal_four_bit_for_bit(tmp_path, capsys, monkeypatch, options, how):
    a, b = tmp_path / "a", tmp_path / "b"
    assert fit(b, *options, "--epochs", "4") == 0
    if how == "extend":  # a finished 2-epoch run, continued to 4 (no schedule: nothing to re-plan)
        assert fit(a, *options) == 0
        assert main(["fit", "--out", str(a), "--resume", "--epochs", "4", "--no-progress"]) == 0
    else:  # a 4-epoch run interrupted in epoch 3, resumed from its epoch-2 checkpoint
        with monkeypatch.context() as m:
            interrupt_at_validation(m, call=3)
            assert fit(a, *options, "--epochs", "4") == 130
        one_line(capsys, "epoch 2", prefix="ppl-vae: interrupted; the last checkpoint is ")
        assert main(["fit", "--out", str(a), "--resume", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    _same_runs(a, b)
    if "score+" in " ".join(options):  # the baseline's statistics were checkpointed, not re-warmed
        assert (
            io.load_checkpoint(a / "checkpoint.pt")["estimator"][0]["steps"] == 4 * 2
        )  # one record per training process
    config, metrics = strict_json(a / CONFIG), strict_json(a / "metrics.json")
    assert config["epochs"] == metrics["epochs"] == metrics["options"]["epochs"] == 4
    assert config == metrics["options"]
    assert [r["at_epoch"] for r in config["resumed"]] == [2]
    assert config["resumed"][0]["changed"] == ({"epochs": [2, 4]} if how == "extend" else {})
    assert not (a / runs.LOCK).exists()


def test_extending_a_cosine_schedule_replans_it_and_records_the_change(tmp_path, capsys):
    a = tmp_path / "a"
    assert fit(a, "--lr-schedule", "cosine", "--lr", "0.01") == 0
    assert (
        main(
            [
                "fit",
                "--out",
                str(a),
                "--resume",
                "--epochs",
                "4",
                "--patience",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""
    lrs = [float(r["lr"]) for r in history(a)]
    assert lrs[:2] == [0.01 * svi.lr_factor("cosine", e, 2) for e in (1, 2)]
    assert lrs[2:] == [
        0.01 * svi.lr_factor("cosine", e, 4) for e in (3, 4)
    ]  # re-planned for 4 epochs from epoch 2 on
    config = strict_json(a / CONFIG)
    assert config["resumed"] == [
        {"at_epoch": 2, "changed": {"epochs": [2, 4], "patience": [None, 5]}}
    ]
    cfg = read_config(a / CONFIG)  # the record round-trips
    assert (
        cfg.resumed == ({"at_epoch": 2, "changed": {"epochs": [2, 4], "patience": [None, 5]}},)
        and cfg.epochs == 4
    )
    assert strict_json(a / "metrics.json")["epochs"] == 4


def test_resume_refuses_options_that_contradict_the_run(run_copy, capsys):
    before = snapshot(run_copy)
    assert (
        main(
            [
                "fit",
                "--out",
                str(run_copy),
                "--resume",
                "--lr",
                "5",
                "--latent-dim",
                "7",
                "--model",
                "ae",
                "--no-progress",
            ]
        )
        == 2
    )
    one_line(
        capsys,
        "--resume cannot change",
        "--lr (0.001 -> 5.0)",
        "--latent-dim (2 -> 7)",
        "--model ('vae' -> 'ae')",
    )
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "1", "--no-progress"]) == 2
    one_line(capsys, "--epochs 1", "2 epochs")
    assert main(["fit", "--out", str(run_copy), "--resume", "--force", "--no-progress"]) == 2
    one_line(capsys, "--force", "--resume")
    # the same values as the run's are no contradiction
    assert snapshot(run_copy) == before
    assert (
        main(
            [
                "fit",
                "--out",
                str(run_copy),
                "--resume",
                "--lr",
                "0.001",
                "--hidden",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )


def test_an_early_stopped_run_is_its_best_epoch(tmp_path, monkeypatch):
    vals = iter([-10.0, -5.0, -6.0, -7.0])  # best at epoch 2; patience 2 stops after epoch 4
    checkpointed: dict[int, list[torch.Tensor]] = {}
    save = io.save_torch

    def fake_validation(model, guide, data, batch_size=1000, **options):
        n = data[0].shape[0] if isinstance(data, tuple) else data.shape[0]
        return Estimate(torch.full((n,), next(vals, -1.0)), None, 1)

    def recording_save(path, state):
        checkpointed[state["epoch"]] = [p.clone() for p in state["params"]]
        return save(path, state)

    monkeypatch.setattr(loop, "evaluate_elbo", fake_validation)
    monkeypatch.setattr(io, "save_torch", recording_save)
    out = tmp_path / "es"
    cfg = Config(binarize="threshold", limit=60, hidden=(16,), batch_size=32, epochs=10, patience=2)
    metrics = run(cfg, out, progress=False, figures=False)
    assert metrics["stopped_early"] and metrics["epochs"] == 4 and metrics["best_epoch"] == 2
    built, _ = open_run(out)
    from ppl_vae.inference.params import discover

    loaded = discover(built.model, built.guide, (_first_rows(out),)).params
    assert all(torch.equal(p, s) for p, s in zip(loaded, checkpointed[2]))
    assert not all(torch.equal(p, s) for p, s in zip(loaded, checkpointed[4]))
    with pytest.raises(ConfigError, match="stopped early at epoch 4"):
        run(dataclasses.replace(cfg, epochs=12), out, resume=True, progress=False, figures=False)


def _first_rows(run_dir: Path) -> torch.Tensor:
    cfg = read_config(run_dir / CONFIG)
    return load(cfg.dataset, "train", binarize=cfg.binarize, limit=2).x


# --------------------------------------------------------------------------- run directories never mix


def test_force_replaces_the_folder_as_a_whole(run_copy, capsys, monkeypatch):
    (run_copy / "notes.txt").write_text("old")
    (run_copy / "gaps").mkdir()
    (run_copy / "gaps" / "gaps.json").write_text("{}")
    # a new run that fails before its first checkpoint leaves nothing of the old run, nor of itself
    with monkeypatch.context() as m:
        interrupt_at_validation(m, call=1)
        assert fit(run_copy, "--force", "--seed", "1") == 130
    one_line(capsys, "there is no checkpoint", prefix="ppl-vae: interrupted; ")
    assert sorted(run_copy.iterdir()) == []
    # an emptied folder is reused without --force; a finished --force run holds only the new run's files
    assert fit(run_copy, "--seed", "2") == 0
    (run_copy / "stale.txt").write_text("old")
    assert fit(run_copy, "--force", "--seed", "1") == 0
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(
        [
            runs.MARKER,
            "config.json",
            "checkpoint.pt",
            "history.csv",
            "metrics.json",
            "reconstructions.png",
            "prior_samples.png",
            "elbo.png",
            "latent.png",
        ]
    )
    assert strict_json(run_copy / CONFIG)["seed"] == 1


def test_a_new_run_interrupted_before_its_first_checkpoint_removes_its_folder(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "new"
    interrupt_at_validation(monkeypatch, call=1)
    assert fit(out) == 130
    one_line(capsys, "there is no checkpoint", str(out), prefix="ppl-vae: interrupted; ")
    assert not out.exists()


def test_a_second_process_cannot_write_a_run_in_use(run_copy, tmp_path, capsys):
    code = f"import time; from ppl_vae.app import runs; runs.prepare_run_dir({str(run_copy)!r}, command='fit', resume=True); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_copy)
        assert fit(run_copy, "--force") == 2
        one_line(capsys, str(run_copy), "in use by process", str(holder.pid))
        assert (
            main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 2
        )
        one_line(capsys, "in use by process", str(holder.pid))
        assert {k: v for k, v in snapshot(run_copy).items() if k != runs.LOCK} == {
            k: v for k, v in before.items() if k != runs.LOCK
        }
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the lock died with its process: the stale lock file does not count, and is gone after the next writer
    assert (run_copy / runs.LOCK).exists()
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert not (run_copy / runs.LOCK).exists()


def test_every_output_command_locks_its_folder(finished, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    code = f"import time; from ppl_vae.app import runs; runs.prepare_run_dir({str(out)!r}, command='fit'); print('locked', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        commands = readers(finished, out)
        for argv in (
            commands["gaps"],
            commands["grad-variance"],
            ["fit", "--out", str(out), *TINY],
        ):
            assert main(argv) == 2, argv
            one_line(capsys, "in use by process", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_stale_temporary_files_are_removed_by_the_next_writer(run_copy, capsys):
    stale = [run_copy / ".checkpoint.pt.k1ll3d.tmp", run_copy / ".metrics.json.x9.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert main(["fit", "--out", str(run_copy), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert not any(p.exists() for p in stale)
    assert not any(p.name.endswith(".tmp") for p in run_copy.iterdir())


def test_without_fcntl_folders_are_used_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "fcntl", None)
    with runs.holding():
        out = runs.prepare_run_dir(tmp_path / "plain", command="fit")
        assert out.is_dir() and not (out / runs.LOCK).exists()


def test_json_files_hold_only_valid_json(tmp_path, finished):
    io.write_json(
        tmp_path / "x.json",
        {
            "nan": float("nan"),
            "inf": [float("inf"), -float("inf"), 1.5],
            "np": np.float32("nan"),
            "t": torch.tensor(2.0),
        },
    )
    assert strict_json(tmp_path / "x.json") == {
        "nan": None,
        "inf": [None, None, 1.5],
        "np": None,
        "t": 2.0,
    }
    for name in ("config.json", "metrics.json"):
        strict_json(finished / name)


# --------------------------------------------------------------------------- one line and exit 2


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        pytest.param(["--lr", "-0.1"], ["lr", "positive finite", "-0.1"], id="lr-negative"),
        pytest.param(["--lr", "nan"], ["lr", "nan"], id="lr-nan"),
        pytest.param(["--lr", "inf"], ["lr", "inf"], id="lr-inf"),
        pytest.param(["--seed", "-1"], ["seed", "2**32 - 1", "-1"], id="seed-negative"),
        pytest.param(["--seed", str(2**70)], ["seed", str(2**70)], id="seed-huge"),
        pytest.param(["--hidden", ""], ["hidden", "at least one"], id="hidden-empty"),
        pytest.param(["--patience", "0"], ["patience", ">= 1"], id="patience-0"),
        pytest.param(["--beta", "nan"], ["beta"], id="beta-nan"),
        pytest.param(["--model", "dae", "--noise", "nan"], ["noise"], id="noise-nan"),
        pytest.param(
            ["--latent-dim", str(10**12)],
            ["memory", f"--latent-dim {10**12}"],
            id="latent-dim-huge",
        ),
        pytest.param(
            ["--num-particles", str(10**9)],
            ["memory", f"--num-particles {10**9}"],
            id="num-particles-huge",
        ),
        pytest.param(["--hidden", str(10**13)], ["memory", f"--hidden {10**13}"], id="hidden-huge"),
    ],
)
def test_bad_options_are_one_line_before_any_folder(tmp_path, capsys, options, fragments):
    out = tmp_path / "parent" / "run"
    assert fit(out, *options) == 2
    one_line(capsys, *fragments)
    assert not (tmp_path / "parent").exists()


def test_argparse_errors_are_one_line_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        fit(tmp_path / "run", "--lr", "abc")
    assert info.value.code == 2
    one_line(capsys, "--lr", "'abc'")
    assert not (tmp_path / "run").exists()


def test_an_output_parent_that_refuses_folders(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "read-only"
    parent.mkdir()
    if os.geteuid() != 0:  # root ignores permission bits: inject the error instead
        parent.chmod(0o555)
    else:
        mkdir = os.mkdir

        def refusing(path, *args, **kwargs):
            if str(path).startswith(str(parent)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", refusing)
    try:
        assert fit(parent / "run") == 2
        one_line(capsys, "cannot create output directory", str(parent / "run"), "Permission denied")
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []


def test_an_unreadable_data_file(tmp_path, capsys, monkeypatch, binarized_mnist):
    data = binarized_mnist(tmp_path / "bm")
    target = data / "binarized_mnist" / "binarized_mnist_train.amat"
    if os.geteuid() != 0:
        target.chmod(0)
    else:
        read_text = Path.read_text

        def refusing(self, *args, **kwargs):
            if self == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return read_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refusing)
    out = tmp_path / "run"
    try:
        assert (
            main(
                [
                    "fit",
                    "--out",
                    str(out),
                    "--dataset",
                    "binarized-mnist",
                    "--data-dir",
                    str(data),
                    "--hidden",
                    "16",
                    "--no-progress",
                ]
            )
            == 2
        )
    finally:
        target.chmod(0o644)
    one_line(capsys, "cannot read", str(target), "Permission denied")
    assert not out.exists()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    save, calls = io.save_torch, {"n": 0}

    def full_disk(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, obj)

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(io, "save_torch", full_disk)
        assert fit(out, "--epochs", "3") == 2
    one_line(
        capsys,
        "checkpoint of epoch 2",
        "No space left on device",
        "previous checkpoint (epoch 1) is intact",
    )
    assert io.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len(history(out)) == 1 and not (out / "metrics.json").exists()
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert (
        main(["fit", "--out", str(out), "--resume", "--no-progress"]) == 0
    )  # and the run goes on from there
    assert strict_json(out / "metrics.json")["epochs"] == 3


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        pytest.param({"lr": "0.1"}, ["lr must be a number", "'0.1' (str)"], id="lr-string"),
        pytest.param(
            {"latent_dim": "2"}, ["latent_dim must be an integer"], id="latent-dim-string"
        ),
        pytest.param({"hidden": []}, ["hidden must list at least one"], id="hidden-empty"),
        pytest.param({"hidden": ["a"]}, ["hidden must be a list of integers"], id="hidden-strings"),
        pytest.param({"seed": -1}, ["seed"], id="seed-negative"),
    ],
)
@pytest.mark.parametrize("command", ["fit-resume", "gaps", "plot"])
def test_a_config_json_with_a_wrong_value(run_copy, tmp_path, capsys, edit, fragments, command):
    config = json.loads((run_copy / CONFIG).read_text())
    (run_copy / CONFIG).write_text(json.dumps({**config, **edit}))
    before, out = snapshot(run_copy), tmp_path / "out"
    assert main(readers(run_copy, out)[command]) == 2
    one_line(capsys, "config.json", *fragments)
    assert snapshot(run_copy) == before and not out.exists()


def test_gaps_option_and_merge_errors(finished, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["gaps", "--run", str(finished), "--out", str(out), "--local-lr", "-1"]) == 2
    one_line(capsys, "--local-lr", "-1")
    assert main(["gaps", "--merge", str(finished), "--out", str(out)]) == 2
    one_line(capsys, str(finished), "not the output of ppl-vae gaps")
    assert not out.exists()


def test_plot_errors_before_any_work(finished, tmp_path, capsys, monkeypatch, binarized_mnist):
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    assert main(["plot", "--run", str(finished), "--kind", "tsne", "--out", str(folder)]) == 2
    one_line(capsys, "is a directory")
    other = tmp_path / "mnist-run"
    data = binarized_mnist(tmp_path / "bm")
    assert (
        main(
            [
                "fit",
                "--out",
                str(other),
                "--dataset",
                "binarized-mnist",
                "--data-dir",
                str(data),
                "--hidden",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()

    def no_work(*args, **kwargs):
        raise AssertionError("a run was loaded before the datasets were compared")

    monkeypatch.setattr("ppl_vae.app.commands.plot.open_run", no_work)
    png = tmp_path / "sweep.png"
    assert (
        main(
            [
                "plot",
                "--kind",
                "latent-sweep",
                "--run",
                str(finished),
                "--run",
                str(other),
                "--out",
                str(png),
            ]
        )
        == 2
    )
    one_line(capsys, "same dataset", "digits", "binarized-mnist")
    assert not png.exists()


def test_compare_needs_a_few_draws(finished, tmp_path, capsys):
    out = tmp_path / "c"
    assert (
        main(
            ["compare", "--run", str(finished), "--out", str(out), "--chains", "1", "--draws", "1"]
        )
        == 2
    )
    one_line(capsys, "--draws", ">= 4")
    assert not out.exists()


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_the_command_line_starts(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("ppl_vae.cli.build_parser", interrupted)
    assert main(["fit", "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err == "ppl-vae: interrupted\n"


def test_ctrl_c_while_torch_imports_in_the_console_script(tmp_path):
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "raise KeyboardInterrupt  # Ctrl-C while torch loads\n"
    )
    env = {
        **os.environ,
        **SUBPROCESS_ENV,
        "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
    }
    # the package and its command line import nothing heavy at import time
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ppl_vae, ppl_vae.cli, ppl_vae.errors, sys; assert 'torch' not in sys.modules",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "fit", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 130 and done.stderr == "ppl-vae: interrupted\n", done.stderr
    assert not (tmp_path / "x").exists()


def test_ctrl_c_during_fit_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at_validation(m, call=2)
        assert fit(out, "--epochs", "3") == 130
    assert (
        one_line(capsys, prefix="ppl-vae: interrupted; ")
        == f"ppl-vae: interrupted; the last checkpoint is epoch 1 (in {out})"
    )
    assert (
        io.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and not (out / runs.LOCK).exists()
    )
    assert main(["fit", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_ctrl_c_after_training_keeps_the_finished_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        "ppl_vae.app.commands.fit.elbo_per_datapoint", interrupted
    )  # the test-split evaluation after fit
    out = tmp_path / "run"
    assert fit(out) == 130
    line = one_line(capsys, prefix="ppl-vae: interrupted; ")
    assert (
        line
        == f"ppl-vae: interrupted; the last checkpoint is epoch 2 (in {out}); metrics.json was not written"
    )
    assert (
        io.load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
        and not (out / "metrics.json").exists()
    )


def test_prepare_run_dir(tmp_path):
    new = tmp_path / "a" / "b"
    assert runs.prepare_run_dir(new, command="fit") == new and new.is_dir()
    assert runs.prepare_run_dir(new, command="fit") == new  # empty: reused without force
    (new / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="--force"):
        runs.prepare_run_dir(new, command="fit")
    assert (new / "keep.txt").read_text() == "old"
    assert (
        runs.prepare_run_dir(new, command="fit", force=True) == new
        and not (new / "keep.txt").exists()
    )  # the folder fit made
    assert runs.prepare_run_dir(new, command="fit", resume=True) == new
    with pytest.raises(CheckpointError):
        runs.prepare_run_dir(tmp_path / "missing", command="fit", resume=True)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        runs.prepare_run_dir(tmp_path / "file", command="fit")
