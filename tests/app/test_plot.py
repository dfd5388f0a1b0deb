"""``ppl-vae plot``: every kind writes a non-empty PNG; bad input is one line, exit 2, nothing written.

Three tiny runs on the embedded 8x8 digits (60 rows, 16 hidden units, 3 epochs): a 2-D VAE,
a 2-D autoencoder and a 3-D beta-VAE.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import one_line

from ppl_vae.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--dataset",
    "digits",
    "--binarize",
    "threshold",
    "--limit",
    "60",
    "--hidden",
    "16",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "vae2": ["--model", "vae", "--latent-dim", "2"],
        "ae2": ["--model", "ae", "--latent-dim", "2"],
        "beta3": ["--model", "beta-vae", "--beta", "4", "--latent-dim", "3"],
    }
    for name, opts in specs.items():
        assert main(["fit", "--out", str(root / name), *TINY, *opts]) == 0
    return root


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("manifold", ["vae2"]),
        ("interpolation", ["beta3"]),
        ("tsne", ["beta3"]),
        ("traversal", ["beta3"]),
        ("ae-vs-vae", ["ae2", "vae2"]),
        ("latent-sweep", ["vae2", "beta3"]),
    ],
)
def test_every_kind_writes_a_png(runs, tmp_path, kind, names):
    out = tmp_path / f"{kind}.png"
    argv = ["plot", "--kind", kind, "--out", str(out)]
    for n in names:
        argv += ["--run", str(runs / n)]
    assert main(argv) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_default_output_goes_into_the_run_and_is_not_overwritten(runs, capsys):
    run = runs / "vae2"
    assert main(["plot", "--run", str(run), "--kind", "interpolation"]) == 0
    before = (run / "interpolation.png").read_bytes()
    capsys.readouterr()
    assert main(["plot", "--run", str(run), "--kind", "interpolation", "--seed", "3"]) == 2
    one_line(capsys, "--force")
    assert (run / "interpolation.png").read_bytes() == before
    assert (
        main(["plot", "--run", str(run), "--kind", "interpolation", "--seed", "3", "--force"]) == 0
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--kind", "bogus"], "unknown plot kind"),
        (["--kind", "ae-vs-vae"], "exactly 2"),
        (["--kind", "manifold", "--extra-run"], "exactly 1"),
        (["--kind", "manifold", "--beta-run"], "2-D latent"),
        (["--kind", "tsne", "--out-txt"], ".png"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, argv, fragment):
    before = {p.name for p in (runs / "vae2").iterdir()}
    args = ["plot", "--run", str(runs / ("beta3" if "--beta-run" in argv else "vae2"))]
    argv = [a for a in argv if a != "--beta-run"]
    if "--extra-run" in argv:
        argv = [a for a in argv if a != "--extra-run"] + ["--run", str(runs / "ae2")]
    if "--out-txt" in argv:
        argv = [a for a in argv if a != "--out-txt"] + ["--out", str(tmp_path / "x.txt")]
    capsys.readouterr()
    assert main(args + argv) == 2
    one_line(capsys, fragment)
    assert {p.name for p in (runs / "vae2").iterdir()} == before
    assert not (tmp_path / "x.txt").exists()


def test_run_dir_without_checkpoint(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(runs / "vae2" / "config.json", broken / "config.json")
    assert main(["plot", "--run", str(broken), "--kind", "tsne"]) == 2
    one_line(capsys, "no checkpoint")
    assert main(["plot", "--run", str(tmp_path / "missing"), "--kind", "tsne"]) == 2
    one_line(capsys, "not a run directory")
    assert sorted(p.name for p in broken.iterdir()) == ["config.json"]
