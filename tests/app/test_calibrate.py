"""``ppl-vae calibrate``: a run's guide calibrated on simulated data; files written; bad input is one line and writes nothing."""

from __future__ import annotations

import json

from conftest import BINARY

from ppl_vae.cli import main


def test_calibrate_a_run_and_refuse_what_it_cannot(tmp_path, capsys):
    run, ae = tmp_path / "vae", tmp_path / "ae"
    assert main(["fit", *BINARY, "--out", str(run)]) == 0
    out = tmp_path / "cal"
    assert (
        main(
            [
                "calibrate",
                "--run",
                str(run),
                "--num-datasets",
                "200",
                "--draws",
                "19",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["num_datasets"] == 200 and saved["verdict"] in printed
    assert (out / "calibration.csv").read_text().startswith("coordinate,p_value,bias") and (
        out / "ranks.png"
    ).stat().st_size > 1000
    assert main(["fit", *BINARY, "--model", "ae", "--out", str(ae)]) == 0
    capsys.readouterr()
    for extra, fragment in (
        (["--run", str(run), "--draws", "20"], "must be a multiple of bins"),
        (["--run", str(ae)], "continuous latents"),
        (["--run", str(run)], "already exists"),
    ):
        target = out if fragment == "already exists" else tmp_path / "nothing"
        assert main(["calibrate", *extra, "--num-datasets", "50", "--out", str(target)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "nothing").exists()
