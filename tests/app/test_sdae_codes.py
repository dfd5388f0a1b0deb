"""``ppl-vae sdae-codes`` on small fake MNIST files: the table is written, and labels reach the binarised test images by matching."""

from __future__ import annotations

import json

import pytest
from conftest import write_fake_mnist

from ppl_vae.cli import main


@pytest.mark.slow
def test_sdae_codes_writes_its_table_from_fake_files(tmp_path, capsys):
    n = write_fake_mnist(tmp_path / "data")
    out = tmp_path / "out"
    argv = [
        "sdae-codes",
        "--data-dir",
        str(tmp_path / "data"),
        "--layers",
        "16,4",
        "--epochs",
        "1",
        "--pretrain-epochs",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["distinct_matches"] == n and results["min_match_margin_nats"] > 0
    rows = {r["features"]: r for r in results["rows"]}
    assert set(rows) == {"raw pixels", "stacked denoising AE codes", "plain AE (same shape) codes"}
    chance = 0.1
    assert (
        rows["raw pixels"]["accuracy"] > chance + 4 * rows["raw pixels"]["accuracy_se"]
    )  # the matched labels are the right ones
    assert "| raw pixels | 784 |" in (out / "table.md").read_text()
    assert (
        main(argv) == 2 and "already exists" in capsys.readouterr().err
    )  # nothing overwritten without --force
