"""Progress bars: off when asked, and in a log file (not a terminal) a plain line every few seconds, not a redraw per step."""

from __future__ import annotations

import time

import numpy as np

from ppl_vae.progress import bar


def test_disabled_bar_writes_nothing(capsys):
    for _ in bar(range(50), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_outside_a_terminal_the_bar_writes_few_whole_lines(capsys, monkeypatch):
    monkeypatch.setenv("PPL_VAE_PROGRESS_INTERVAL", "0.2")
    t0 = time.perf_counter()
    for _ in bar(range(2000), desc="steps", unit="step"):
        time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = err.splitlines()
    assert "\r" not in err
    # one line at the start, at most one per interval, and one at the end
    assert 2 <= len(lines) <= elapsed / 0.2 + 3, (len(lines), elapsed)
    assert lines[-1].startswith("steps: 100%") and "2000/2000" in lines[-1]


def test_training_into_a_log_file_writes_lines_not_a_redraw_per_step(capsys, monkeypatch):
    import torch

    from ppl_vae import fit
    from ppl_vae.models import PPCA

    monkeypatch.setenv("PPL_VAE_PROGRESS_INTERVAL", "60")
    torch.manual_seed(0)
    ppca = PPCA(4, 2)
    fit(
        ppca, ppca.exact_guide, torch.randn(400, 4), epochs=5, batch_size=10, progress=True
    )  # 200 steps
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 4, lines  # the start, the end, and no line per step
    assert "200/200" in lines[-1]


def test_bdmc_and_compare_show_progress_when_asked(capsys, monkeypatch):
    import torch
    from conftest import frozen_ppca

    from ppl_vae.inference.gaps.ais import bdmc
    from ppl_vae.inference.mcmc.compare import compare
    from ppl_vae.inference.mcmc.hmc import hmc_latent
    from ppl_vae.inference.mcmc.vi import vi_draws_latent

    monkeypatch.setenv("PPL_VAE_PROGRESS_INTERVAL", "60")
    m = frozen_ppca()
    bdmc(m, torch.zeros(2, 6, dtype=torch.float64), num_steps=20, num_chains=2, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("BDMC 20 steps: 100%") and "60/60" in lines[-1], (
        lines
    )  # pilot, forward and reverse runs
    x = m.sample(3)
    mcmc = hmc_latent(m, x, num_samples=20, warmup_steps=20, num_chains=2, seed=0)
    vi = vi_draws_latent(m, m.posterior(x), x, num_samples=40, seed=0)
    capsys.readouterr()
    quiet = compare(mcmc, vi)
    assert capsys.readouterr().err == ""  # off by default in the library
    shown = compare(mcmc, vi, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("compare: 100%") and "3/3" in lines[-1], lines
    assert np.array_equal(
        shown.per_dim["wasserstein"], quiet.per_dim["wasserstein"]
    )  # the bar changes nothing computed


def test_in_a_notebook_the_bar_is_tqdm_autos_widget(monkeypatch):
    """In a Jupyter kernel (an ``IPython`` whose shell config names ``IPKernelApp``) the bar comes from ``tqdm.auto``."""
    import sys
    import types

    import ppl_vae.progress as progress

    made = []

    class Widget:
        def __init__(self, iterable=None, **kw):
            made.append(kw)

    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    monkeypatch.setattr(progress, "_auto", Widget)
    assert progress._notebook()
    assert isinstance(progress.bar(total=5, desc="cells"), Widget) and made[0]["desc"] == "cells"
    monkeypatch.setitem(
        sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None)
    )  # plain IPython, not a kernel
    assert not progress._notebook()
