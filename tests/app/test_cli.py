"""The ``ppl-vae`` command line, run in-process through ``ppl_vae.cli.main`` (plus one subprocess smoke test).

Every run is tiny (a few dozen rows of the embedded 8x8 digits, 16 hidden units, 2 epochs)
and writes into ``tmp_path``.
"""

from __future__ import annotations

import argparse
import csv
import io as io_
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BINARY, TINY, one_line

from ppl_vae import io
from ppl_vae.app.config import Config
from ppl_vae.app.runs import MARKER
from ppl_vae.cli import main

PNGS = ("reconstructions.png", "prior_samples.png", "elbo.png", "latent.png")
RUN_FILES = ("metrics.json", "history.csv", "checkpoint.pt", "config.json", *PNGS)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("empty_data_home")


def fit(out: Path, *options: str, base: list[str] = BINARY) -> int:
    """``ppl-vae fit --out OUT <base> <options>`` in-process (later options override ``base``)."""
    return main(["fit", "--out", str(out), *base, *options])


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def history_of(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def params_of(run: Path) -> list[torch.Tensor]:
    return io.load_torch(run / "checkpoint.pt")["params"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_complete_run(run: Path, epochs: int) -> dict:
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    for name in PNGS:
        data = (run / name).read_bytes()
        assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), name
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    m = metrics_of(run)
    for key in ("train_elbo", "val_elbo", "test_elbo", "test_elbo_se"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["test_elbo_se"] >= 0
    assert m["epochs"] == epochs
    rows = history_of(run)
    assert len(rows) == epochs
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert all(
        math.isfinite(float(r["train_elbo"])) and math.isfinite(float(r["val_elbo"])) for r in rows
    )
    # config.json is a complete, loadable Config, equal to what metrics.json records
    cfg = Config.from_dict(json.loads((run / "config.json").read_text())).validate()
    assert cfg.to_dict() == m["options"]
    return m


# --------------------------------------------------------------------------- successful runs


def test_fit_smoke_writes_a_complete_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert str(run) in out.out
    m = assert_complete_run(run, epochs=2)
    # a Bernoulli likelihood on binary data: log p(x) <= 0, so is every ELBO
    assert m["test_elbo"] <= 0 and m["train_elbo"] <= 0 and m["val_elbo"] <= 0
    assert m["objective"] == "ELBO"
    assert m["num_train"] == 60 and m["num_test"] == 60
    assert m["steps"] == 2 * math.ceil(60 / 32)
    cfg = json.loads((run / "config.json").read_text())
    assert (
        cfg["model"] == "vae"
        and cfg["hidden"] == [16]
        and cfg["latent_dim"] == 2
        and cfg["binarize"] == "threshold"
    )
    assert f"{m['test_elbo']:.2f}" in out.out
    # the checkpoint holds the trained parameters of the final epoch
    ckpt = io.load_torch(run / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    assert all(torch.isfinite(p).all() for p in ckpt["params"])


def test_console_script_subprocess(tmp_path):
    script = shutil.which(
        "ppl-vae",
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    cmd = [script] if script else [sys.executable, "-m", "ppl_vae.cli"]
    run = tmp_path / "sub"
    env = {**os.environ, "PPL_VAE_DATA": str(tmp_path / "data-home"), "MPLBACKEND": "Agg"}
    env.pop("PPL_VAE_DEBUG", None)
    done = subprocess.run(
        [*cmd, "fit", "--out", str(run), *BINARY, "--epochs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" not in done.stdout and str(run) in done.stdout
    assert_complete_run(run, epochs=1)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(["--estimator", "score"], id="vae-score"),
        pytest.param(["--model", "beta-vae", "--beta", "4"], id="beta-vae"),
        pytest.param(["--model", "cvae"], id="cvae"),
        pytest.param(["--model", "ae"], id="ae"),
        pytest.param(["--model", "dae"], id="dae"),
        pytest.param(["--arch", "conv", "--epochs", "1"], id="vae-conv"),
    ],
)
def test_models_and_estimators_run(tmp_path, capsys, options):
    run = tmp_path / "run"
    assert fit(run, *options) == 0
    assert capsys.readouterr().err == ""
    given = dict(zip(options[::2], options[1::2]))
    m = assert_complete_run(run, epochs=int(given.get("--epochs", 2)))
    opts = m["options"]
    assert opts["model"] == given.get("--model", "vae")
    assert opts["estimator"] == given.get("--estimator", "reparam")
    assert opts["arch"] == given.get("--arch", "mlp")
    assert opts["beta"] == float(given.get("--beta", 1.0))
    if opts["model"] in ("ae", "dae"):
        assert "not a bound" in m["objective"]
    else:
        assert m["objective"] == "ELBO"
    # every objective here is a Bernoulli log-likelihood (or a bound on one) of binary data
    assert m["test_elbo"] <= 0
    assert "test_log_px_exact" not in m


def test_ppca_exact_likelihood_bounds_the_elbo(tmp_path, capsys):
    run = tmp_path / "ppca"
    # continuous intensities (no --binarize): the Bernoulli --likelihood default does not apply to PPCA
    assert fit(run, "--model", "ppca", "--epochs", "3", "--lr", "1e-2", base=TINY) == 0
    out = capsys.readouterr()
    assert out.err == ""
    m = assert_complete_run(run, epochs=3)
    assert "exact test log p(x)" in out.out
    exact = m["test_log_px_exact"]
    assert math.isfinite(exact)
    assert m["test_elbo"] <= exact + 4 * m["test_elbo_se"] + 0.5


# --------------------------------------------------------------------------- run directories


def test_existing_run_dir_needs_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert fit(run, "--seed", "1") == 2
    one_line(capsys, str(run), "--force")
    assert snapshot(run) == before  # byte-identical
    assert fit(run, "--seed", "1", "--force") == 0
    assert capsys.readouterr().err == ""
    m = assert_complete_run(run, epochs=2)
    assert m["options"]["seed"] == 1
    assert snapshot(run)["checkpoint.pt"] != before["checkpoint.pt"]


def test_non_empty_foreign_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("precious")
    assert fit(run) == 2
    one_line(capsys, "not empty")
    assert snapshot(run) == {"notes.txt": b"precious"}


def test_resume_is_bit_for_bit(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert fit(a) == 0
    first = history_of(a)
    assert len(first) == 2
    assert main(["fit", "--out", str(a), "--resume", "--epochs", "4", "--no-progress"]) == 0
    assert fit(b, "--epochs", "4") == 0
    assert capsys.readouterr().err == ""
    resumed, straight = history_of(a), history_of(b)
    assert len(resumed) == 4 and resumed[:2] == first
    no_time = [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed]
    assert no_time == [{k: v for k, v in r.items() if k != "wall_time"} for r in straight]
    pa, pb = params_of(a), params_of(b)
    assert len(pa) == len(pb) > 0
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    ma, mb = assert_complete_run(a, epochs=4), assert_complete_run(b, epochs=4)
    for key in ("train_elbo", "val_elbo", "test_elbo"):
        assert ma[key] == mb[key], key
    assert json.loads((a / "config.json").read_text())["epochs"] == 4


def test_seeded_runs_are_reproducible(tmp_path, capsys):
    assert fit(tmp_path / "s0") == 0
    assert fit(tmp_path / "s0-again") == 0
    assert fit(tmp_path / "s1", "--seed", "1") == 0
    assert capsys.readouterr().err == ""
    p0, p0b, p1 = (params_of(tmp_path / d) for d in ("s0", "s0-again", "s1"))
    assert all(torch.equal(x, y) for x, y in zip(p0, p0b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(p0, p1, strict=True))
    assert (
        metrics_of(tmp_path / "s0")["test_elbo"] == metrics_of(tmp_path / "s0-again")["test_elbo"]
    )


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        pytest.param(
            ["--model", "transformer"], ["unknown model", "transformer"], id="unknown-model"
        ),
        pytest.param(
            ["--dataset", "imagenet"], ["unknown dataset", "imagenet"], id="unknown-dataset"
        ),
        pytest.param(["--latent-dim", "0"], ["latent dimension"], id="latent-dim-0"),
        pytest.param(["--latent-dim", "-3"], ["latent dimension", "-3"], id="latent-dim-negative"),
        pytest.param(
            ["--estimator", "magic"], ["unknown estimator", "magic"], id="unknown-estimator"
        ),
        pytest.param(
            ["--binarize", "threshold", "--model", "ae", "--estimator", "score"],
            ["ae", "reparam"],
            id="ae-score",
        ),
        pytest.param(["--likelihood", "poisson"], ["unknown likelihood"], id="unknown-likelihood"),
        pytest.param(["--guide", "flow"], ["unknown guide"], id="unknown-guide"),
        pytest.param(["--model", "beta-vae", "--beta", "1"], ["beta"], id="beta-vae-beta-1"),
        pytest.param(["--epochs", "0"], ["epochs"], id="epochs-0"),
        pytest.param(["--limit", "0"], ["limit"], id="limit-0"),
        pytest.param(["--model", "ppca", "--arch", "conv"], ["conv", "ppca"], id="ppca-conv"),
    ],
)
def test_bad_options(tmp_path, capsys, options, fragments):
    out = tmp_path / "run"
    assert fit(out, *options, base=[*TINY, "--binarize", "threshold"]) == 2
    one_line(capsys, *fragments)
    assert not out.exists()


def test_non_binary_data_under_bernoulli(tmp_path, capsys):
    out = tmp_path / "run"
    assert fit(out, base=TINY) == 2  # digits intensities, not binarised
    one_line(capsys, "not binary", "Bernoulli")
    assert not out.exists()


def test_data_dir_without_files(tmp_path, capsys):
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    assert fit(out, "--dataset", "binarized-mnist", "--data-dir", str(empty)) == 2
    one_line(capsys, "binarized_mnist_train.amat", str(empty))
    assert not out.exists()
    assert list(empty.iterdir()) == []  # nothing downloaded, no folder made


def test_cvae_needs_labels(tmp_path, capsys, binarized_mnist):
    data, out = binarized_mnist(tmp_path / "bm"), tmp_path / "run"
    before = snapshot(data / "binarized_mnist")
    assert (
        fit(
            out,
            "--model",
            "cvae",
            "--dataset",
            "binarized-mnist",
            "--data-dir",
            str(data),
            "--binarize",
            "threshold",
        )
        == 2
    )
    one_line(capsys, "cvae", "labels")
    assert not out.exists()
    assert snapshot(data / "binarized_mnist") == before


def test_resume_without_a_run(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["fit", "--out", str(missing), "--resume", "--no-progress"]) == 2
    one_line(capsys, "cannot resume")
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", "--out", str(empty), "--resume", "--no-progress"]) == 2
    one_line(capsys, "cannot resume")
    assert list(empty.iterdir()) == []


def test_resume_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(binarize="threshold", limit=60, hidden=(16,), epochs=2, batch_size=32)
    io.write_json(run / "config.json", cfg.to_dict())  # as a run writes it
    before = snapshot(run)
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 2
    one_line(capsys, "checkpoint.pt")
    assert snapshot(run) == before


def test_resume_with_corrupted_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert fit(run) == 0
    capsys.readouterr()
    (run / "checkpoint.pt").write_bytes(b"\x00this is not a checkpoint\xff" * 64)
    before = snapshot(run)
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 2
    one_line(capsys, "corrupted", "checkpoint.pt")
    assert snapshot(run) == before  # nothing rewritten


def test_resume_with_corrupted_checkpoint_and_new_epochs_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(binarize="threshold", limit=60, hidden=(16,), epochs=2, batch_size=32)
    io.write_json(run / "config.json", cfg.to_dict())  # as a run writes it
    (run / "checkpoint.pt").write_bytes(b"\x00garbage\xff" * 64)
    before = snapshot(run)
    assert main(["fit", "--out", str(run), "--resume", "--epochs", "4", "--no-progress"]) == 2
    one_line(capsys, "corrupted")
    assert snapshot(run) == before


@pytest.mark.parametrize("text", ["{not json", '{"hidden": 5}'], ids=["not-json", "bad-hidden"])
def test_resume_with_corrupted_config_is_a_user_error(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(text)
    before = snapshot(run)
    assert main(["fit", "--out", str(run), "--resume", "--no-progress"]) == 2
    one_line(capsys, "config.json")
    assert snapshot(run) == before


def _torchrun(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` of ``python -m ppl_vae.cli COMMAND`` (two CPU processes over gloo, on a free port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "--no-python",
        "--",
    ]
    return subprocess.run(
        [*launcher, sys.executable, "-m", "ppl_vae.cli", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_under_torchrun_every_process_trains_and_only_rank_zero_writes_and_prints(tmp_path):
    out = tmp_path / "run"
    launch = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress"]
    done = _torchrun("fit", "--out", str(out), *BINARY, *launch)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1, done.stdout  # the other process prints nothing
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*RUN_FILES, MARKER]
    )  # the marker: a run of fit, so --force may replace it
    assert io.load_checkpoint(out / "checkpoint.pt")["rng"]["world_size"] == 2
    resumed = _torchrun("fit", "--out", str(out), "--resume", "--epochs", "3", *launch)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3
    # an analysis under torchrun: each process takes a block of datapoints, rank 0 writes the table of one process
    fast = ["--num-points", "4", "--K", "30", "--elbo-samples", "10", "--local-steps", "50"]
    spread = _torchrun(
        "gaps",
        "--run",
        str(out),
        "--out",
        str(tmp_path / "gaps2"),
        *fast,
        "--accelerator",
        "cpu",
        "--devices",
        "2",
    )
    assert spread.returncode == 0, spread.stderr[-2000:]
    assert main(["gaps", "--run", str(out), "--out", str(tmp_path / "gaps1"), *fast]) == 0
    rows = [
        list(csv.DictReader(io_.StringIO((tmp_path / f"gaps{n}" / "gaps.csv").read_text())))
        for n in (1, 2)
    ]
    assert [r["index"] for r in rows[0]] == [r["index"] for r in rows[1]]

    def close(k: str, x: str, y: str) -> bool:
        if math.isnan(float(x)) or math.isnan(
            float(y)
        ):  # NaN: a q* stopped before its first check has no last change
            return math.isnan(float(x)) and math.isnan(float(y))
        # k-hat is a Pareto fit to the largest 7 of K = 30 log-weights: it turns their float32 differences (about 1e-7 relative)
        # into about 1e-4 (measured 1.4e-4); the other columns are sums and means of them
        return math.isclose(
            float(x), float(y), rel_tol=1e-5, abs_tol=1e-3 if k.endswith("khat") else 1e-5
        )

    for a, b in zip(
        *rows
    ):  # float32 networks in blocks of 2 rows instead of 4: ~100 float32 ulps (measured below 1e-6)
        flags = [
            k for k in a if a[k] in ("True", "False")
        ]  # the per-datapoint flags (k-hat, convergence) agree exactly
        assert flags and all(a[k] == b[k] for k in flags), {
            k: (a[k], b[k]) for k in flags if a[k] != b[k]
        }
        assert all(close(k, a[k], b[k]) for k in a if k not in ("run", *flags)), [
            (k, a[k], b[k]) for k in a if k not in ("run", *flags) and not close(k, a[k], b[k])
        ]


def test_every_subcommand_has_a_description_an_example_and_every_option_its_meaning_and_default(
    capsys,
):
    from ppl_vae.app import commands
    from ppl_vae.cli import build_parser

    parser = build_parser(commands)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {
        "fit",
        "demo",
        "gaps",
        "compare",
        "plot",
        "grad-variance",
        "m2",
        "cvae-quadrants",
    }
    for name, p in sub.choices.items():
        assert p.description and len(p.description.split()) > 20, name  # a paragraph, not a title
        assert p.epilog and p.epilog.startswith("example:\n  ppl-vae " + name), name
        text = p.format_help()
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no description"
            flag = action.nargs == 0  # store_true: off unless given
            if not (flag or action.required):
                shown = p.formatter_class(prog=p.prog)._get_help_string(action)
                assert "default" in shown, (
                    f"{name} {action.option_strings}: no default shown ({shown!r})"
                )
        assert "example:" in text


def test_help_shows_defaults_in_the_terminal(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["gaps", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for fragment in ("--K K", "(default 5000)", "--no-progress", "example:\n  ppl-vae gaps --run"):
        assert fragment in out, fragment
