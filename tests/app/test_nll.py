"""``ppl-vae nll``: -log p̂(x) by IWAE of a run's images, checked against PPCA's exact log p(x); resumable to the same numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import BINARY, TINY, Z, log_mean_exp_bias, one_line

from ppl_vae.app.commands import nll as nll_command
from ppl_vae.app.runs import open_run
from ppl_vae.cli import main


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "ppca"
    assert (
        main(["fit", *TINY, "--model", "ppca", "--epochs", "3", "--lr", "1e-2", "--out", str(run)])
        == 0
    )
    return run


def test_nll_matches_the_exact_log_likelihood_of_ppca(ppca_run, tmp_path, capsys):
    out = tmp_path / "nll"
    assert (
        main(["nll", "--run", str(ppca_run), "--K", "2000", "--out", str(out), "--no-progress"])
        == 0
    )
    printed = capsys.readouterr().out
    summary = json.loads((out / "nll_K2000.json").read_text())
    rows = pd.read_csv(out / "nll_K2000.csv")
    built, splits = open_run(ppca_run)
    x = splits["test"].tensors()[0]
    exact = built.exact.log_marginal(x).double()
    assert summary["num_points"] == len(x) == len(rows) and rows["index"].tolist() == list(
        range(len(x))
    )
    se = torch.tensor(rows["iwae_se"].to_numpy())
    err = (
        -summary["nll"] - exact.mean().item()
    )  # IWAE is below log p(x) by its bias (~SE^2/2), within its Monte Carlo error
    assert abs(err) < Z * float(se.pow(2).sum().sqrt()) / len(x) + log_mean_exp_bias(se), err
    assert summary["neg_elbo"] > summary["nll"]  # the ELBO of the same draws is the looser bound
    assert f"-log p(x) = {summary['nll']:.2f}" in printed
    # the run's Gaussian encoder on a Gaussian posterior: light-tailed weights, every image's estimate reliable by its k-hat
    assert (
        summary["unreliable"] == 0
        and rows["reliable"].all()
        and (rows["khat"] <= summary["khat_threshold"]).all()
    )


def test_an_interrupted_computation_resumes_to_the_same_numbers(
    ppca_run, tmp_path, monkeypatch, capsys
):
    whole = tmp_path / "whole"
    assert (
        main(
            [
                "nll",
                "--run",
                str(ppca_run),
                "--K",
                "50",
                "--block",
                "10",
                "--out",
                str(whole),
                "--no-progress",
            ]
        )
        == 0
    )
    real, calls = nll_command.importance_bounds, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(nll_command, "importance_bounds", failing)
    assert (
        main(
            [
                "nll",
                "--run",
                str(ppca_run),
                "--K",
                "50",
                "--block",
                "10",
                "--out",
                str(part),
                "--no-progress",
            ]
        )
        == 130
    )
    assert (part / "nll_K50.partial.pt").is_file() and not (part / "nll_K50.json").exists()
    monkeypatch.setattr(nll_command, "importance_bounds", real)
    capsys.readouterr()
    assert (
        main(
            [
                "nll",
                "--run",
                str(ppca_run),
                "--K",
                "60",
                "--block",
                "10",
                "--out",
                str(part),
                "--no-progress",
                "--resume",
            ]
        )
        == 2
    )
    assert (
        "cannot resume: no nll_K60.partial.pt" in capsys.readouterr().err
    )  # another K is another computation
    assert (
        main(
            [
                "nll",
                "--run",
                str(ppca_run),
                "--K",
                "50",
                "--block",
                "10",
                "--out",
                str(part),
                "--no-progress",
                "--resume",
            ]
        )
        == 0
    )
    assert (part / "nll_K50.csv").read_text() == (whole / "nll_K50.csv").read_text()
    assert not (part / "nll_K50.partial.pt").exists()


def test_nll_refuses_an_autoencoder_and_bad_options_in_one_line(tmp_path, capsys):
    ae = tmp_path / "ae"
    assert main(["fit", *BINARY, "--model", "ae", "--out", str(ae)]) == 0
    for extra, fragment in (
        (["--run", str(ae)], "point-mass encoder"),
        (["--run", str(ae), "--K", "1"], "--K must be an integer from 2 to"),
    ):
        out = tmp_path / "out"
        assert main(["nll", *extra, "--out", str(out)]) == 2
        one_line(capsys, fragment)
        assert not out.exists()
