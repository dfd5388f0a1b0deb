"""Seed before every test; fail a test that leaks parameters into Pyro's global store."""

from __future__ import annotations

import os
from pathlib import Path

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
