"""Progress bars: off when asked, and in a log file (not a terminal) a plain line every few seconds, not a redraw per step."""

from __future__ import annotations

import time

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
    fit(ppca, ppca.exact_guide, torch.randn(400, 4), epochs=5, batch_size=10, progress=True)  # 200 steps
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 4, lines  # the start, the end, and no line per step
    assert "200/200" in lines[-1]
