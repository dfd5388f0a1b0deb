"""Seed before every test; fail a test that leaks parameters into Pyro's global store."""

from __future__ import annotations

import pyro
import pytest


@pytest.fixture(autouse=True)
def _seed_and_check_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    leaked = list(pyro.get_param_store().keys())
    pyro.clear_param_store()
    assert not leaked, f"test leaked parameters into Pyro's global param store: {leaked}"
