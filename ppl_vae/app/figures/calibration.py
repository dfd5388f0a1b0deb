"""The rank histograms of a simulation-based calibration (:class:`~ppl_vae.inference.calibration.Calibration`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ... import io
from ...inference.calibration import Calibration, Z
from .run import load_pyplot

__all__ = ["rank_histograms"]


def rank_histograms(cal: Calibration, path: str | Path | None = None, max_panels: int = 16) -> Any:
    """Rank histograms with the uniform count and its 99% band, and every coordinate's tail share and bias; written atomically to ``path`` if given.

    With more than ``max_panels`` coordinates (a 50-d VAE) the histograms are those of the ``max_panels``
    least calibrated (smallest p-values), in coordinate order; the two summary panels below them show
    all coordinates: the tail share (0.2 when calibrated; above: under-dispersed) and the bias of the
    normalised rank (0 when calibrated; positive: q too low), each with its band of ``Z`` standard errors.
    """
    plt = load_pyplot()
    table = cal.table()
    n = len(cal.labels)
    shown = (
        sorted(np.argsort(table["p_value"].to_numpy(), kind="stable")[:max_panels])
        if n > max_panels
        else list(range(n))
    )
    k = len(shown)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig = plt.figure(figsize=(max(3 * cols, 8), 2.4 * rows + 2.6 + 0.4))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[2.4] * rows + [2.6])
    u = (cal.ranks + 0.5) / (cal.num_draws + 1)
    expect = cal.num_datasets / cal.bins
    band = 2.576 * math.sqrt(expect * (1 - 1 / cal.bins))
    for i, j in enumerate(shown):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.hist(u[:, j], bins=np.linspace(0, 1, cal.bins + 1), color="C0", alpha=0.8, label="ranks")
        ax.axhspan(
            expect - band, expect + band, color="grey", alpha=0.25, label="uniform, 99% band"
        )
        ax.axhline(expect, color="black", lw=1)
        ax.set_title(f"{cal.labels[j]}: {table['verdict'][j]}", fontsize=8)
        ax.set(xlabel="rank / (L + 1)", ylabel="datasets" if i % cols == 0 else None)
        if i == 0:
            ax.legend(fontsize=7, loc="lower center")
    half = max(cols // 2, 1)
    pos = np.arange(n)
    bad = (table["verdict"] != "calibrated").to_numpy()
    for sl, key, ref, what in (
        (slice(0, half), "tail_share", 0.2, "tail share (ranks in the outer fifth)"),
        (slice(half, cols), "bias", 0.0, "bias of the normalised rank"),
    ):
        ax = fig.add_subplot(grid[rows, sl])
        se = float(table[f"{key}_se"].iloc[0])
        ax.axhspan(
            ref - Z * se, ref + Z * se, color="grey", alpha=0.25, label=f"calibrated, ±{Z:g} SE"
        )
        ax.axhline(ref, color="black", lw=1)
        ax.scatter(pos[~bad], table[key].to_numpy()[~bad], s=10, color="C0", label="calibrated")
        ax.scatter(pos[bad], table[key].to_numpy()[bad], s=10, color="C3", label="miscalibrated")
        ax.set(xlabel="coordinate", title=what)
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    which = f"the {k} least calibrated of {n} coordinates" if n > k else f"{n} coordinates"
    fig.suptitle(
        f"ranks of the simulated z among q's {cal.num_draws} draws ({cal.num_datasets} datasets; histograms: {which})",
        fontsize=9,
    )
    fig.tight_layout()
    if path is not None:
        io.save_figure(fig, path, dpi=110)
    return fig
