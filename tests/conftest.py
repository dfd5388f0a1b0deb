"""Seed before every test; fail a test that leaks parameters into Pyro's global store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyro
import pytest

# the posteriordb reference posteriors the tests use ship with the tests (tests/data/posteriordb)
os.environ.setdefault("PPL_VAE_POSTERIORDB", str(Path(__file__).parent / "data" / "posteriordb"))


@pytest.fixture(autouse=True)
def _seed_and_check_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    leaked = list(pyro.get_param_store().keys())
    pyro.clear_param_store()
    assert not leaked, f"test leaked parameters into Pyro's global param store: {leaked}"


@pytest.fixture
def binarized_mnist():
    """``make(root)``: write tiny binarized-MNIST ``.amat`` files (4 random rows per split) under ``root``; returns ``root``."""

    def make(root: Path) -> Path:
        rng = np.random.default_rng(0)
        folder = root / "binarized_mnist"
        folder.mkdir(parents=True)
        for split in ("train", "valid", "test"):
            rows = rng.integers(0, 2, size=(4, 784))
            (folder / f"binarized_mnist_{split}.amat").write_text("\n".join(" ".join(map(str, r)) for r in rows) + "\n")
        return root

    return make


@pytest.fixture
def empty_data_home(tmp_path, monkeypatch):
    """Point the default data folder (``$PPL_VAE_DATA``) at an empty temporary folder; no debug tracebacks."""
    data = tmp_path / "data-home"
    data.mkdir()
    monkeypatch.setenv("PPL_VAE_DATA", str(data))
    monkeypatch.delenv("PPL_VAE_DEBUG", raising=False)
    return data
