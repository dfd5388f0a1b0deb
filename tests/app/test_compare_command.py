"""The ``compare`` command: its files, the local guide, two processes, its one-line refusals, and the demo hook."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from conftest import one_line

from ppl_vae.app.commands.compare import demo_comparison
from ppl_vae.app.runs import open_run
from ppl_vae.cli import main
from ppl_vae.inference.mcmc.vi import vi_draws_amortized

pytestmark = pytest.mark.arviz

FILES = (
    "comparison.csv",
    "comparison.json",
    "mcmc_diagnostics.csv",
    "compare.json",
    "vi_mcmc_pairs.png",
    "vi_mcmc_marginals.png",
    "vi_mcmc_errors.png",
)


def test_compare_command_writes_results(finished, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                "--run",
                str(finished),
                "--indices",
                "0,5",
                "--draws",
                "60",
                "--warmup",
                "40",
                "--chains",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "divergent transitions" in capsys.readouterr().out
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    info = json.loads((out / "compare.json").read_text())
    assert info["indices"] == [0, 5] and info["mcmc_method"] == "batched-hmc"
    table = json.loads((out / "comparison.json").read_text())
    assert [p["point"] for p in table["points"]] == [0, 5] and len(
        table["dims"]
    ) == 2 * 2  # the dataset indices
    assert (out / "vi_mcmc_pairs.png").read_bytes()[:4] == b"\x89PNG"
    # an existing output directory is not reused without --force
    assert (
        main(
            [
                "compare",
                "--run",
                str(finished),
                "--indices",
                "0",
                "--draws",
                "5",
                "--chains",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    one_line(capsys, "already exists")


def test_compare_command_with_the_local_guide(finished, tmp_path, capsys):
    """--guide local: q* of the guide's own family per datapoint; it is at least as close to MCMC as the encoder."""
    out = tmp_path / "cmp-local"
    assert (
        main(
            [
                "compare",
                "--run",
                str(finished),
                "--indices",
                "0,5",
                "--draws",
                "60",
                "--warmup",
                "40",
                "--chains",
                "2",
                "--guide",
                "local",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    info = json.loads((out / "compare.json").read_text())
    table = json.loads((out / "comparison.json").read_text())
    assert (
        info["guide"] == "local"
        and table["vi_method"] == "vi-local"
        and len(table["dims"]) == 2 * 2
    )


def test_compare_on_two_processes_writes_the_tables_of_one(finished, tmp_path, capsys):
    import pandas as pd

    tables = {}
    for devices in ("1", "2"):
        out = tmp_path / f"cmp{devices}"
        assert (
            main(
                [
                    "compare",
                    "--run",
                    str(finished),
                    "--indices",
                    "0,5,7",
                    "--draws",
                    "12",
                    "--warmup",
                    "0",
                    "--chains",
                    "2",
                    "--out",
                    str(out),
                    "--no-progress",
                    "--accelerator",
                    "cpu",
                    "--devices",
                    devices,
                ]
            )
            == 0
        )
        tables[devices] = (
            pd.read_csv(out / "comparison.csv"),
            pd.read_csv(out / "mcmc_diagnostics.csv"),
        )
    for one, two in zip(tables["1"], tables["2"]):
        assert list(one.columns) == list(two.columns) and len(one) == len(two)
        numbers = one.select_dtypes("number").columns
        # float32 networks in blocks of 2 + 1 rows instead of 3 round differently: 1e-5 is ~100 float32 ulps (measured:
        # 1.2e-7). Without warmup that rounding stays put; step-size adaptation can turn it into another trajectory (a
        # leapfrog count rounds the other way), so a long adapted float32 chain is another chain of the same posterior
        # (docs/devices.md; float64 chains with warmup agree to 1e-9 in tests/inference/test_distributed.py)
        assert np.allclose(one[numbers], two[numbers], rtol=1e-5, atol=1e-5, equal_nan=True), (
            (one[numbers] - two[numbers]).abs().max().to_dict()
        )


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--devices", "2", "--indices", "5"], "1 datapoint(s) cannot be spread over 2 processes"),
        (["--devices", str((os.cpu_count() or 1) + 1)], "more than this machine's"),
        (["--accelerator", "tpu"], "unknown accelerator 'tpu'"),
        (["--indices", "0,9999"], "out of range"),
        (["--num-points", "5000"], "cannot compare"),
        (["--draws", "0"], "--draws"),
        (["--chains", "0"], "--chains"),
        (["--guide", "mystery"], "unknown guide"),
    ],
)
def test_compare_bad_input(finished, tmp_path, capsys, options, fragment):
    out = tmp_path / "cmp"
    assert main(["compare", "--run", str(finished), "--out", str(out), *options]) == 2
    one_line(capsys, fragment)
    assert not out.exists()


def test_compare_run_without_checkpoint(finished, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((finished / "config.json").read_bytes())
    out = tmp_path / "cmp"
    assert main(["compare", "--run", str(broken), "--out", str(out)]) == 2
    one_line(capsys, "checkpoint")
    assert not out.exists()


@pytest.mark.slow
def test_demo_hook_and_amortized_draws(finished, tmp_path):
    built, splits = open_run(finished)
    x = splits["test"].x[:3]
    vi = vi_draws_amortized(built.model, built.guide, x, num_samples=50, seed=0)
    assert (
        vi.samples["z"].shape == (1, 50, 3, 2) and np.isfinite(vi.sample_stats["log_weight"]).all()
    )
    info = demo_comparison(built, splits, tmp_path, seed=0, num_points=2)
    assert len(info["indices"]) == 2 and math.isfinite(info["summary"]["max_abs_std_mean_error"])
    assert all((tmp_path / "compare" / name).is_file() for name in FILES)


def test_compare_refuses_an_unknown_kernel_in_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "--run",
                str(tmp_path / "none"),
                "--kernel",
                "slice",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    one_line(capsys, "unknown MCMC kernel 'slice'")
    assert not (tmp_path / "c").exists()
