"""The benchmarks run: ``benchmarks/accelerator.py --quick`` completes and prints every section (its timings are not checked)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_accelerator_benchmark_runs_every_section_at_tiny_sizes(tmp_path):
    out = tmp_path / "table.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        OMP_NUM_THREADS="1",
    )
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "accelerator.py"),
            "--quick",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for section in ("streams", "hmc", "qstar", "iwae"):
        assert f"== {section}:" in run.stdout, run.stdout
    table = json.loads(out.read_text())
    assert table["device"] == "cpu"
    by_section = {
        s: [r for r in table["rows"] if r["section"] == s]
        for s in ("streams", "hmc", "qstar", "iwae")
    }
    assert [r["N"] for r in by_section["streams"]] == [10, 100]
    assert [r["N"] for r in by_section["hmc"]] == [4, 8] and [
        r["N"] for r in by_section["qstar"]
    ] == [4, 8]
    assert [r["N"] for r in by_section["iwae"]] == [4]
    for rows in by_section.values():
        for r in rows:
            # times at these sizes are noise (hmc and qstar subtract two runs' times: the difference can be negative)
            assert r["ops"] > 0 and r["syncs"] >= 0 and math.isfinite(r["ratio"])
