"""The ``gaps`` command: its table, CSV, JSON and figure, its merge, its one-line refusals, and its run on two processes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import BINARY, Z, one_line

from ppl_vae.cli import main

GAPS_FAST = [
    "--num-points",
    "6",
    "--K",
    "50",
    "--elbo-samples",
    "20",
    "--local-steps",
    "200",
    "--families",
    "full",
]


def test_gaps_command_writes_table_csv_json_and_figure(finished, tmp_path, capsys):
    out = tmp_path / "gaps"
    assert (
        main(
            ["gaps", "--run", str(finished), "--run", str(finished), "--out", str(out), *GAPS_FAST]
        )
        == 0
    )
    assert "amortisation gap" in capsys.readouterr().out
    summary = json.loads((out / "gaps.json").read_text())
    assert len(summary["summaries"]) == 2 and summary["options"]["K"] == 50
    s = summary["summaries"][0]
    # log p-hat is IWAE from q*, in expectation above L[q]: the inference gap is not negative beyond its SE
    assert s["inference_gap"] > -Z * s["inference_gap_se"]
    assert (out / "gaps.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "gaps.csv").read_text().count("\n") == 1 + 2 * 6
    assert "L[q*] (full)" in (out / "table.md").read_text()
    # merging gaps folders (e.g. runs analysed in parallel) rebuilds the same table
    merged = tmp_path / "merged"
    assert main(["gaps", "--merge", str(out), "--out", str(merged)]) == 0
    assert (merged / "table.md").read_text().splitlines()[:9] == (
        out / "table.md"
    ).read_text().splitlines()[:9]
    assert (
        main(["gaps", "--merge", str(out), "--run", str(finished), "--out", str(tmp_path / "m2")])
        == 2
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--K", "0"], "--K must be an integer from 1 to"),
        (["--num-points", "100000"], "more than the split has"),
        (["--logpx", "exact"], "unknown --logpx"),
        (["--split", "nope"], "unknown split"),
    ],
)
def test_gaps_bad_input_is_one_line_exit_2_and_writes_nothing(
    finished, tmp_path, capsys, args, message
):
    out = tmp_path / "gaps"
    assert main(["gaps", "--run", str(finished), "--out", str(out), *GAPS_FAST, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_gaps_on_a_run_without_checkpoint(finished, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((finished / "config.json").read_text())
    assert main(["gaps", "--run", str(broken), "--out", str(tmp_path / "g"), *GAPS_FAST]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_gaps_refuses_to_overwrite_without_force(finished, tmp_path, capsys):
    out = tmp_path / "gaps"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["gaps", "--run", str(finished), "--out", str(out), *GAPS_FAST]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_score_function_refuses_a_caching_flow_guide(tmp_path, capsys):
    """Pyro's IAF caches its gradient-free inverse, so log q(z) would give the score function no signal."""
    assert (
        main(
            ["fit", "--out", str(tmp_path / "r"), *BINARY, "--guide", "iaf", "--estimator", "score"]
        )
        == 2
    )
    assert "--guide iaf needs a pathwise estimator" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_gaps_on_two_processes_write_the_table_of_one(finished, tmp_path, capsys):
    import pandas as pd

    tables = {}
    for devices in ("1", "2"):
        out = tmp_path / f"gaps{devices}"
        assert (
            main(
                [
                    "gaps",
                    "--run",
                    str(finished),
                    "--out",
                    str(out),
                    *GAPS_FAST,
                    "--accelerator",
                    "cpu",
                    "--devices",
                    devices,
                ]
            )
            == 0
        )
        tables[devices] = pd.read_csv(out / "gaps.csv")
    one, two = tables["1"], tables["2"]
    assert list(one.columns) == list(two.columns) and one["index"].tolist() == two["index"].tolist()
    numbers = [c for c in one.select_dtypes("number").columns if c != "log_px_khat"]
    # float32 networks: a datapoint's arithmetic in a block of 3 rows instead of 6 rounds differently;
    # 1e-5 relative is ~100 float32 ulps (measured: 4e-7 nats on values of ~44)
    assert np.allclose(one[numbers], two[numbers], rtol=1e-5, atol=1e-5), (
        (one[numbers] - two[numbers]).abs().max().to_dict()
    )
    # k-hat is a generalised Pareto shape fitted to the largest 3 sqrt(K) weights: it moves ~100x more than they do (5e-5 measured)
    assert np.allclose(one["log_px_khat"], two["log_px_khat"], rtol=0, atol=1e-3)


def test_gaps_refuse_bad_device_options_with_one_line_and_write_nothing(finished, tmp_path, capsys):
    for options, message in (
        (["--devices", "0"], "devices must be a positive number"),
        (["--accelerator", "cuda"], "cannot run on accelerator='cuda'"),
        (["--strategy", "warp", "--devices", "2"], "unknown strategy 'warp'"),
        (["--devices", "2", "--num-points", "1"], "1 datapoint(s) cannot be spread over 2"),
        (["--devices", str((os.cpu_count() or 1) + 1)], "more than this machine's"),
    ):
        if options[:2] == ["--accelerator", "cuda"] and torch.cuda.is_available():
            continue
        out = tmp_path / "gaps"
        assert main(["gaps", "--run", str(finished), "--out", str(out), *GAPS_FAST, *options]) == 2
        one_line(capsys, message)
        assert not out.exists()
