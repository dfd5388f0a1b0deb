"""The estimators on the command line: ``fit --estimator`` and ``grad-variance --estimators`` refuse bad names in one line; ``grad-variance`` on a score+nvil run of a Bernoulli VAE."""

from __future__ import annotations

import csv

import pytest
from conftest import one_line

from ppl_vae.cli import main

TINY = [
    "--dataset",
    "digits",
    "--binarize",
    "threshold",
    "--limit",
    "60",
    "--batch-size",
    "30",
    "--no-progress",
]


@pytest.mark.parametrize(
    ("estimator", "fragment"),
    [
        ("nope", "unknown estimator 'nope'"),
        ("reparam+average", "applies to the score-function estimator only"),
        ("relaxed:0", "temperature must be positive"),
        ("relaxed:-2", "temperature must be positive"),
        ("score+loo", "needs --num-particles >= 2"),
        ("reparam", "bernoulli-vae has discrete latents"),
    ],
)
def test_cli_bad_estimators(tmp_path, capsys, estimator, fragment):
    out = tmp_path / "run"
    code = main(
        ["fit", "--model", "bernoulli-vae", "--estimator", estimator, *TINY, "--out", str(out)]
    )
    assert code == 2
    one_line(capsys, fragment)
    assert not out.exists()
    gv = tmp_path / "gv"
    assert (
        main(
            [
                "grad-variance",
                "--run",
                str(tmp_path),
                "--estimators",
                f"score,{estimator}",
                "--out",
                str(gv),
            ]
        )
        == 2
    )
    if estimator != "reparam":  # the estimator is refused before the run is read
        assert fragment in capsys.readouterr().err
    assert not gv.exists()


def test_cli_grad_variance_on_an_nvil_run(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", "bernoulli-vae", "--latent-dim", "8", "--hidden", "", *TINY]
    assert (
        main(["fit", *common, "--estimator", "score+nvil", "--epochs", "2", "--out", str(run)]) == 0
    )
    out = tmp_path / "gv"
    args = [
        "grad-variance",
        "--run",
        str(run),
        "--estimators",
        "score,score+average,score+nvil,relaxed",
        "--repeats",
        "30",
        "--batch-size",
        "30",
        "--track-epochs",
        "0,2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "grad_variance.csv").read_text().splitlines()))
    assert {(r["epoch"], r["estimator"], r["group"]) for r in rows} == {
        (e, est, g)
        for e in ("0", "2")
        for est in ("score", "score+average", "score+nvil", "relaxed")
        for g in ("encoder", "decoder")
    }
    enc = {
        (r["epoch"], r["estimator"]): float(r["variance"]) for r in rows if r["group"] == "encoder"
    }
    assert all(enc[(e, "score+average")] < enc[(e, "score")] for e in ("0", "2"))
    assert (out / "grad_variance.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(args) == 2  # no overwrite without --force
    assert "already exists" in capsys.readouterr().err
