"""The README's model example and the user guide's pages run as written, and docs/api.md lists every public function as it is."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> str:
    """The ```python blocks of a Markdown file, in order, as one script (```py blocks are excerpts of library code, shown only)."""
    return "\n\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


#: one page per job: write a model, fit and use it, measure gaps, compare with MCMC
PAGES = {
    "README.md": "fit(",
    "docs/models.md": "def model(",
    "docs/using.md": "fit(",
    "docs/gaps.md": "decompose(",
    "docs/compare.md": "compare(",
}


@pytest.mark.slow
@pytest.mark.parametrize("page", list(PAGES))
def test_code_blocks_run(page, tmp_path):
    script = python_blocks(ROOT / page)
    assert PAGES[page] in script
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PPL_VAE_PROGRESS_INTERVAL": "60"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Guessed max_plate_nesting" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script, tmp_path):
    """Each script in examples/ runs as written (on the embedded digits) and prints its numbers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PPL_VAE_PROGRESS_INTERVAL": "60"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nats" in done.stdout, done.stdout


def test_api_reference_is_current_and_every_public_function_is_documented():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = make_api.render()
    assert (ROOT / "docs" / "api.md").read_text() == text, (
        "docs/api.md is stale: run python docs/make_api.py"
    )
    undocumented = [
        line for line in text.splitlines() if line.startswith("- `def ") and "<br>" not in line
    ]
    assert not undocumented, undocumented
    for name in (
        "def fit(",
        "def load_run(",
        "FitResult.sample(",
        "FitResult.posterior(",
        "def hmc_latent(",
        "def decompose(",
    ):
        assert name in text, name


@pytest.mark.slow
def test_a_built_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    """``pip wheel`` of the project, installed into an empty folder: every subpackage is in it and the console script runs."""
    pytest.importorskip(
        "setuptools",
        reason="building the wheel offline (--no-build-isolation) needs setuptools in this environment",
    )
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("ppl_vae-*.whl")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ppl_vae").rglob("*.py")}
    installed = {p.relative_to(target).as_posix() for p in (target / "ppl_vae").rglob("*.py")}
    assert source == installed, source ^ installed
    assert (target / "ppl_vae" / "py.typed").is_file()
    env = {
        **os.environ,
        "PYTHONPATH": str(target),
    }  # the dependencies come from this interpreter; ppl_vae from the wheel
    where = subprocess.run(
        [sys.executable, "-c", "import ppl_vae, ppl_vae.inference; print(ppl_vae.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.returncode == 0 and where.stdout.startswith(str(target)), (
        where.stdout,
        where.stderr[-2000:],
    )
    script = target / "bin" / "ppl-vae"
    helped = subprocess.run(
        [sys.executable, str(script), "fit", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert helped.returncode == 0 and "example:" in helped.stdout, helped.stderr[-2000:]


def _resolves(dotted: str) -> bool:
    """Whether ``ppl_vae.a.b.c`` names a module or an attribute reachable from the longest importable module prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_package_name_the_docs_use_is_exported():
    """A name written ``ppl_vae.x.y`` in the README or docs/ is importable as written (the docs once named models that
    ``ppl_vae.models`` did not export)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {
        (p.name, m)
        for p in pages
        for m in re.findall(r"\bppl_vae(?:\.[A-Za-z_][A-Za-z0-9_]*)+", p.read_text())
    }
    missing = sorted(f"{page}: {name}" for page, name in named if not _resolves(name.rstrip(".")))
    assert len(named) > 20 and not missing, missing
