"""``ppl-vae calibrate``: a run's guide calibrated on simulated data; files written; bad input is one line and writes nothing.
The figure of the ranks (:func:`~ppl_vae.app.figures.calibration.rank_histograms`): its panels and its file."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import BINARY, frozen_ppca, one_line

from ppl_vae.app.figures.calibration import rank_histograms
from ppl_vae.cli import main
from ppl_vae.inference.calibration import Calibration, calibrate


def test_calibrate_a_run_and_refuse_what_it_cannot(finished, tmp_path, capsys):
    run, ae = finished, tmp_path / "ae"
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
        one_line(capsys, fragment)
    assert not (tmp_path / "nothing").exists()


def test_the_figure_of_a_many_dimensional_latent_shows_the_least_calibrated_coordinates(tmp_path):
    # 20 coordinates, uniform ranks except z[3] (ranks pushed to the ends: under-dispersed) and z[17] (ranks high: q too low)
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 100, size=(1000, 20))
    ranks[:, 3] = np.where(
        rng.random(1000) < 0.5, rng.integers(0, 10, 1000), rng.integers(90, 100, 1000)
    )
    ranks[:, 17] = rng.integers(40, 100, 1000)
    cal = Calibration(ranks, tuple(f"z[{j}]" for j in range(20)), num_draws=99, bins=10, alpha=0.01)
    fig = rank_histograms(cal, tmp_path / "ranks.png", max_panels=4)
    titles = [ax.get_title() for ax in fig.axes]
    hist = [t.split(":")[0] for t in titles if t.startswith("z[")]
    assert len(hist) == 4 and "z[3]" in hist and "z[17]" in hist, titles
    assert any(t.startswith("z[3]: under-dispersed") for t in titles) and any(
        t.startswith("z[17]: biased: q too low") for t in titles
    )
    assert any("tail share" in t for t in titles) and any(
        "bias" in t for t in titles
    )  # the all-coordinates summary panels
    assert (tmp_path / "ranks.png").stat().st_size > 1000


def test_the_figure_of_the_exact_guides_calibration_is_written(tmp_path):
    m = frozen_ppca()
    template = torch.zeros(1, 6, dtype=torch.float64)
    exact = calibrate(m, m.exact_guide, template, num_datasets=1000, num_draws=99, seed=0)
    rank_histograms(exact, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 1000
