"""The rank histograms of a simulation-based calibration (:class:`~ppl_vae.inference.calibration.Calibration`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ... import io
from ...inference.calibration import Calibration
from .run import load_pyplot

__all__ = ["rank_histograms"]


def rank_histograms(cal: Calibration, path: str | Path | None = None) -> Any:
    """Rank histograms per coordinate (at most 16) with the uniform count and its 99% band; written atomically to ``path`` if given."""
    plt = load_pyplot()
    k = min(len(cal.labels), 16)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows + 0.4), squeeze=False)
    u = (cal.ranks + 0.5) / (cal.num_draws + 1)
    expect = cal.num_datasets / cal.bins
    band = 2.576 * math.sqrt(expect * (1 - 1 / cal.bins))
    table = cal.table()
    verdicts = dict(zip(table["coordinate"], table["verdict"]))
    for j, ax in enumerate(axes.flat):
        if j >= k:
            ax.set_axis_off()
            continue
        ax.hist(u[:, j], bins=np.linspace(0, 1, cal.bins + 1), color="C0", alpha=0.8, label="ranks")
        ax.axhspan(expect - band, expect + band, color="grey", alpha=0.25, label="uniform, 99% band")
        ax.axhline(expect, color="black", lw=1)
        ax.set_title(f"{cal.labels[j]}: {verdicts[cal.labels[j]]}", fontsize=8)
        ax.set(xlabel="rank / (L + 1)", ylabel="datasets" if j % cols == 0 else None)
    axes.flat[0].legend(fontsize=7, loc="lower center")
    fig.suptitle(f"ranks of the simulated z among q's {cal.num_draws} draws ({cal.num_datasets} datasets)")
    fig.tight_layout()
    if path is not None:
        io.save_figure(fig, path, dpi=110)
    return fig
