"""Fixtures of the application-layer tests: finished command-line runs (the library tests below ``tests/app`` use none)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import BINARY

from ppl_vae.cli import main


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch ``ppl-vae fit`` run of :data:`BINARY`; tests copy it (:func:`run_copy`) before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["fit", "--out", str(out), *BINARY]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A copy of :func:`finished` of this test's own."""
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target
