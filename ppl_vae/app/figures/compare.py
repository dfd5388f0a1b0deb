"""VI against MCMC in seaborn: pairwise densities, marginal overlays, per-dimension errors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import io
from ...inference.mcmc.compare import draws_matrix
from .run import load_pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["vi_mcmc_pairs", "vi_mcmc_marginals", "vi_mcmc_errors", "comparison_figures"]


def _vi_mcmc_frame(
    mcmc: Any, vi: Any, comparison: Any, point_index: int, dims: list[int], max_draws: int = 1000
) -> Any:
    """Long DataFrame of MCMC and VI draws of one point and chosen dims (seeded subsample)."""
    import pandas as pd

    names = [n for n in mcmc.samples if n in vi.samples]
    rng = np.random.default_rng(0)
    frames = []
    for label, draws in (("MCMC", mcmc), ("VI", vi)):
        x, _, _ = draws_matrix(draws, names)
        x = x.reshape(-1, *x.shape[2:])[:, point_index][:, dims]
        x = x[rng.permutation(len(x))[:max_draws]]
        frames.append(
            pd.DataFrame(x, columns=[comparison.dims[d] for d in dims]).assign(method=label)
        )
    return pd.concat(frames, ignore_index=True)


def _discrepancy(comparison: Any) -> Any:

    return np.abs(comparison.per_dim["std_mean_error"]) + np.abs(comparison.per_dim["log_sd_ratio"])


def vi_mcmc_pairs(mcmc: Any, vi: Any, comparison: Any, *, max_dims: int = 4) -> Figure:
    """Pairwise KDE (lower) and scatter (upper) of VI vs MCMC draws: the most discrepant point and dims."""
    import seaborn as sns

    plt = load_pyplot()
    score = _discrepancy(comparison)
    p = int(np.nanargmax(np.nan_to_num(score, nan=-1).max(1))) if score.shape[0] > 1 else 0
    dims = [
        int(d)
        for d in np.argsort(-np.nan_to_num(score[p], nan=-1))[
            : max(1, min(max_dims, score.shape[1]))
        ]
    ]
    df = _vi_mcmc_frame(mcmc, vi, comparison, p, dims)
    if len(dims) == 1:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        sns.kdeplot(data=df, x=df.columns[0], hue="method", common_norm=False, ax=ax)
    else:
        grid = sns.PairGrid(df, hue="method", hue_order=["MCMC", "VI"], height=1.9, corner=False)
        grid.map_lower(sns.kdeplot, levels=5, warn_singular=False)
        grid.map_upper(sns.scatterplot, s=4, alpha=0.3, linewidth=0)
        grid.map_diag(sns.kdeplot, common_norm=False, warn_singular=False)
        grid.add_legend()
        fig = grid.figure
    fig.suptitle(
        f"VI vs MCMC, datapoint {comparison.points[p]} (dataset index): its most discrepant dims",
        y=1.02,
    )
    return fig


def vi_mcmc_marginals(
    mcmc: Any, vi: Any, comparison: Any, *, max_points: int = 4, max_dims: int = 4
) -> Figure:
    """Marginal KDE overlays: the most discrepant datapoints (rows, by dataset index), each with its most discrepant dims (in dimension order)."""
    import seaborn as sns

    plt = load_pyplot()
    score = np.nan_to_num(_discrepancy(comparison), nan=-1)
    rows = sorted(int(i) for i in np.argsort(-score.max(1))[:max_points])
    ncol = min(max_dims, score.shape[1])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.1 * len(rows)), squeeze=False)
    for r, p in enumerate(rows):
        dims = sorted(int(d) for d in np.argsort(-score[p])[:ncol])
        df = _vi_mcmc_frame(mcmc, vi, comparison, p, dims)
        for c, name in enumerate(df.columns[:-1]):
            ax = axes[r, c]
            sns.kdeplot(
                data=df,
                x=name,
                hue="method",
                hue_order=["MCMC", "VI"],
                common_norm=False,
                ax=ax,
                legend=(r == 0 and c == ncol - 1),
                warn_singular=False,
            )
            ax.set_title(f"datapoint {comparison.points[p]}: {name}", fontsize=8)
            ax.set_xlabel("")
            ax.set_ylabel("")
    fig.tight_layout()
    return fig


def vi_mcmc_errors(comparison: Any) -> Figure:
    """Per latent dimension: standardised mean error, log sd ratio and 90% coverage, one dot per datapoint."""
    import seaborn as sns

    plt = load_pyplot()
    df = comparison.to_dataframe()
    k = df["dim"].nunique()
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.22 * k + 2), 7.5), sharex=True)
    for ax, (col, ref, label) in zip(
        axes,
        [
            ("std_mean_error", 0.0, "(VI - MCMC) mean / MCMC sd"),
            ("log_sd_ratio", 0.0, "log(VI sd / MCMC sd)"),
            ("coverage_90", 0.9, "MCMC mass in VI 90% interval"),
        ],
    ):
        sns.stripplot(
            data=df, x="dim", y=col, ax=ax, size=3, alpha=0.6, jitter=0.2, color="tab:blue"
        )
        sns.pointplot(
            data=df,
            x="dim",
            y=col,
            ax=ax,
            color="black",
            markers="_",
            linestyles="none",
            errorbar=None,
        )
        ax.axhline(ref, color="tab:red", lw=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("")
    axes[-1].tick_params(axis="x", rotation=90, labelsize=7)
    axes[-1].set_xlabel("latent dimension")
    axes[0].set_title(
        f"{comparison.vi_method} vs {comparison.mcmc_method}, {len(comparison.points)} datapoints"
    )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="none", color="tab:blue", alpha=0.6, label="one datapoint"),
        Line2D(
            [],
            [],
            marker="_",
            ls="none",
            color="black",
            markersize=12,
            label="mean over datapoints",
        ),
        Line2D([], [], color="tab:red", lw=0.8, label="VI agrees with MCMC"),
    ]
    axes[0].legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False
    )
    fig.tight_layout()
    return fig


def comparison_figures(mcmc: Any, vi: Any, comparison: Any, out: str | Path) -> list[Path]:
    """Write ``vi_mcmc_pairs.png``, ``vi_mcmc_marginals.png`` and ``vi_mcmc_errors.png`` into ``out``."""
    plt = load_pyplot()
    out = Path(out)
    paths = []
    for name, fig in (
        ("vi_mcmc_pairs.png", vi_mcmc_pairs(mcmc, vi, comparison)),
        ("vi_mcmc_marginals.png", vi_mcmc_marginals(mcmc, vi, comparison)),
        ("vi_mcmc_errors.png", vi_mcmc_errors(comparison)),
    ):
        paths.append(io.save_figure(fig, out / name, dpi=100, bbox_inches="tight"))
        plt.close(fig)
    return paths
