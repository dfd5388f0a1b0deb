"""Nothing a user owns is ever deleted: ``--force`` replaces only a folder its own command made; a full disk keeps the old file.

Every test runs a command against folders of decoy files (the current directory, a parent holding the run, a
user's folder, the input run) and asserts that every decoy survives, byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import BINARY as TINY
from conftest import one_line, snapshot

from ppl_vae import FitResult, io
from ppl_vae.app import runs
from ppl_vae.app.runs import MARKER, load_run
from ppl_vae.cli import main
from ppl_vae.errors import RunDirectoryError

pytestmark = pytest.mark.usefixtures("empty_data_home")

ANALYSIS = {  # each command that reads a run, with options small enough for a test
    "gaps": [
        "--num-points",
        "2",
        "--K",
        "10",
        "--elbo-samples",
        "10",
        "--local-steps",
        "5",
        "--no-progress",
    ],
    "nll": ["--K", "10", "--limit", "4", "--no-progress"],
    "calibrate": ["--num-datasets", "20", "--draws", "9", "--bins", "10"],
    "compare": [
        "--num-points",
        "1",
        "--draws",
        "20",
        "--chains",
        "2",
        "--warmup",
        "20",
        "--no-progress",
    ],
    "grad-variance": ["--repeats", "2", "--batch-size", "8"],
}


def decoys(folder: Path) -> dict[str, bytes]:
    """A user's files: a note, a nested folder, a file that looks like a run's."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("\\section{Results}")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "labels.csv").write_text("1,2,3\n")
    (folder / "config.json").write_text('{"mine": true}')
    return snapshot(folder)


def refused(capsys, *fragments: str) -> str:
    return one_line(capsys, *fragments)


# --------------------------------------------------------------------------- an empty --out, the current, home and root directories


@pytest.mark.parametrize("command", ["fit", "nll"])
def test_an_empty_out_is_refused_and_the_current_directory_kept(
    finished, tmp_path, capsys, monkeypatch, command
):
    cwd = tmp_path / "work"
    before = decoys(cwd)
    monkeypatch.chdir(cwd)
    argv = (
        ["fit", "--out", "", *TINY, "--force"]
        if command == "fit"
        else ["nll", "--run", str(finished), "--out", "", "--force", *ANALYSIS["nll"]]
    )
    assert main(argv) == 2
    refused(capsys, "--out is empty", "current directory")
    assert snapshot(cwd) == before


def test_force_never_replaces_the_current_directory_even_a_run(
    finished, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.md").write_text("what I tried")
    before = snapshot(run)
    monkeypatch.chdir(run)
    assert main(["fit", "--out", ".", *TINY, "--force"]) == 2
    refused(capsys, "is the current directory", "nothing was removed")
    inner = run / "sub"
    inner.mkdir()
    monkeypatch.chdir(inner)
    assert (
        main(["fit", "--out", str(run), *TINY, "--force"]) == 2
    )  # a folder holding the current directory
    refused(capsys, "holding the current directory")
    inner.rmdir()
    assert snapshot(run) == before


def test_force_never_replaces_home_or_root(finished, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(finished, home)  # even a home folder that carries a fit marker
    before = snapshot(home)
    monkeypatch.setenv("HOME", str(home))
    assert main(["fit", "--out", str(home), *TINY, "--force"]) == 2
    refused(capsys, "your home directory")
    assert snapshot(home) == before
    with pytest.raises(Exception, match="the root directory|holding"):
        runs.check_run_dir(Path("/"), command="fit", force=True)


# --------------------------------------------------------------------------- the input run and the folders that hold it


@pytest.mark.parametrize("command", sorted(ANALYSIS))
def test_an_analysis_never_writes_over_its_input_run(run_copy, capsys, command):
    before = snapshot(run_copy)
    assert (
        main(
            [command, "--run", str(run_copy), "--out", str(run_copy), "--force", *ANALYSIS[command]]
        )
        == 2
    )
    refused(capsys, f"--out {run_copy} is the input {run_copy}")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", ["calibrate", "gaps"])
def test_an_analysis_never_replaces_a_folder_holding_its_input(finished, tmp_path, capsys, command):
    parent = tmp_path / "project"
    parent.mkdir()
    io.write_json(
        parent / MARKER, {"command": command}
    )  # even a folder that this command made before
    shutil.copytree(finished, parent / "run")
    (parent / "notes.txt").write_text("keep me")
    before = snapshot(parent)
    assert (
        main(
            [
                command,
                "--run",
                str(parent / "run"),
                "--out",
                str(parent),
                "--force",
                *ANALYSIS[command],
            ]
        )
        == 2
    )
    refused(capsys, f"--out {parent} holds the input")
    assert snapshot(parent) == before


def test_merge_never_replaces_a_folder_it_reads(finished, tmp_path, capsys):
    gaps = tmp_path / "gaps"
    assert main(["gaps", "--run", str(finished), "--out", str(gaps), *ANALYSIS["gaps"]]) == 0
    before = snapshot(gaps)
    capsys.readouterr()
    assert main(["gaps", "--merge", str(gaps), "--out", str(gaps), "--force"]) == 2
    refused(capsys, "is the input")
    assert snapshot(gaps) == before


# --------------------------------------------------------------------------- --force replaces only a folder of the same command


def test_force_refuses_a_folder_no_command_made(tmp_path, capsys):
    mine = tmp_path / "mine"
    before = decoys(mine)
    assert main(["fit", "--out", str(mine), *TINY, "--force"]) == 2
    refused(capsys, f"{mine} has none", MARKER, "nothing was removed")
    assert snapshot(mine) == before


def test_force_refuses_the_output_of_another_command(finished, tmp_path, capsys):
    gaps = tmp_path / "gaps"
    assert main(["gaps", "--run", str(finished), "--out", str(gaps), *ANALYSIS["gaps"]]) == 0
    capsys.readouterr()
    before = snapshot(gaps)
    assert (
        main(["nll", "--run", str(finished), "--out", str(gaps), "--force", *ANALYSIS["nll"]]) == 2
    )
    refused(capsys, "is the output of ppl-vae gaps, not of nll")
    assert main(["fit", "--out", str(gaps), *TINY, "--force"]) == 2
    refused(capsys, "is the output of ppl-vae gaps, not of fit")
    assert snapshot(gaps) == before
    # and the same command replaces its own folder as a whole
    assert (
        main(
            [
                "gaps",
                "--run",
                str(finished),
                "--out",
                str(gaps),
                "--force",
                *ANALYSIS["gaps"],
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert (gaps / "gaps.json").is_file() and snapshot(gaps) != before


@pytest.mark.parametrize("command", ["fit", *sorted(ANALYSIS)])
def test_every_output_folder_is_marked_with_its_command(finished, tmp_path, command):
    out = tmp_path / "out"
    argv = (
        ["fit", "--out", str(out), *TINY]
        if command == "fit"
        else [command, "--run", str(finished), "--out", str(out), *ANALYSIS[command]]
    )
    assert main(argv) == 0
    assert json.loads((out / MARKER).read_text()) == {"command": command}


def test_a_folder_holding_only_a_marker_counts_as_empty(tmp_path):
    out = tmp_path / "left"
    out.mkdir()
    io.write_json(
        out / MARKER, {"command": "gaps"}
    )  # what a command that failed after taking its folder leaves
    assert runs.check_run_dir(out, command="fit") == out


# --------------------------------------------------------------------------- the Python API and plot's file


def test_fit_result_save_refuses_a_directory_and_a_file_it_did_not_write(finished, tmp_path):
    result = load_run(finished)
    folder = tmp_path / "folder"
    before = decoys(folder)
    with pytest.raises(RunDirectoryError, match="is a directory"):
        result.save(folder, force=True)
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, other)
    kept = other.read_bytes()
    with pytest.raises(RunDirectoryError, match="not a model saved by FitResult.save"):
        result.save(other, force=True)
    with pytest.raises(RunDirectoryError, match="empty"):
        result.save("", force=True)
    assert snapshot(folder) == before and other.read_bytes() == kept
    saved = result.save(tmp_path / "model.pt")
    first = saved.read_bytes()
    assert result.save(saved, force=True) == saved  # a file it wrote is replaced
    assert (
        FitResult.load(saved, result.model, result.guide).train_elbo == result.train_elbo and first
    )


def test_plot_force_replaces_a_picture_only(finished, tmp_path, capsys):
    fake = tmp_path / "manifold.png"
    fake.write_text("not a picture")
    assert (
        main(["plot", "--run", str(finished), "--kind", "manifold", "--out", str(fake), "--force"])
        == 2
    )
    refused(capsys, "is not a PNG image")
    assert fake.read_text() == "not a picture"


# --------------------------------------------------------------------------- a full disk


class _FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does (``ENOSPC``), as the real write would."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_full_disk_in_the_middle_of_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    out, real, opened = tmp_path / "run", os.fdopen, {"n": 0}

    def fdopen(fd, *args, **kwargs):
        fh = real(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if ".checkpoint.pt." in name:
            opened["n"] += 1
            if opened["n"] == 2:  # the second epoch's checkpoint: the disk fills after 1 kB of it
                return _FullDisk(fh, 1024)
        return fh

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to tell which file a descriptor names")
    monkeypatch.setattr(io.os, "fdopen", fdopen)
    assert main(["fit", "--out", str(out), *TINY, "--epochs", "3"]) == 2
    monkeypatch.undo()
    refused(
        capsys,
        "checkpoint of epoch 2",
        "No space left on device",
        "previous checkpoint (epoch 1) is intact",
    )
    assert io.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_a_real_full_file_system_keeps_the_previous_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        path = disk / "checkpoint.pt"
        io.save_torch(
            path, {"params": [torch.zeros(10000)]}
        )  # 40 kB: fits once, not twice (the new file is written beside the old)
        with pytest.raises(OSError) as caught:
            io.save_torch(path, {"params": [torch.ones(10000)]})
        assert caught.value.errno == errno.ENOSPC
        assert torch.equal(io.load_torch(path)["params"][0], torch.zeros(10000)) and sorted(
            p.name for p in disk.iterdir()
        ) == ["checkpoint.pt"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
