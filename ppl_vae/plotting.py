"""Figures of a run (seaborn / matplotlib, imported lazily, Agg backend).

Each function returns a matplotlib ``Figure``; :func:`run_figures` writes the
standard set of a run as PNG files, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import io
from .models import decode_prior, one_hot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .data import Dataset
    from .experiment import Built

__all__ = ["image_grid", "elbo_curves", "latent_scatter", "run_figures", "gap_figure"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, image_shape: tuple[int, int, int], nrow: int, title: str) -> Figure:
    """A grid of flat images (torchvision ``make_grid``) as a figure."""
    from torchvision.utils import make_grid

    plt = _plt()
    grid = make_grid(images.reshape(-1, *image_shape).clamp(0, 1).float(), nrow=nrow, padding=1, pad_value=0.5)
    fig, ax = plt.subplots(figsize=(nrow * 0.45 + 0.5, grid.shape[1] / grid.shape[2] * nrow * 0.45 + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    return fig


def elbo_curves(history: Any, objective: str = "ELBO") -> Figure:
    """Train and validation ELBO per epoch from a history DataFrame."""
    import seaborn as sns

    plt = _plt()
    cols = [c for c in ("train_elbo", "val_elbo") if c in history]
    long = history.melt(id_vars="epoch", value_vars=cols, var_name="split", value_name="elbo")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.lineplot(data=long, x="epoch", y="elbo", hue="split", marker="o" if len(history) <= 30 else None, ax=ax)
    ax.set_ylabel(f"{objective} (nats / datapoint)")
    fig.tight_layout()
    return fig


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None) -> Figure:
    """Latent means: directly if 2-D, else their first two principal components."""
    import pandas as pd
    import seaborn as sns

    plt = _plt()
    if z.shape[1] == 2:
        xy, names = z.numpy(), ("z1", "z2")
    elif z.shape[1] == 1:
        xy, names = torch.cat([z, torch.zeros_like(z)], 1).numpy(), ("z1", "")
    else:
        from sklearn.decomposition import PCA

        xy, names = PCA(2).fit_transform(z.numpy()), ("PC1 of latent means", "PC2 of latent means")
    df = pd.DataFrame({names[0]: xy[:, 0], "_y": xy[:, 1]})
    if labels is not None:
        df["label"] = labels.numpy().astype(str)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    hue = "label" if labels is not None else None
    order = sorted(df["label"].unique(), key=int) if hue else None
    sns.scatterplot(data=df, x=names[0], y="_y", hue=hue, hue_order=order, s=12, ax=ax, palette="tab10" if hue else None)
    ax.set_ylabel(names[1])
    ax.set_title("latent means of the test set")
    fig.tight_layout()
    return fig


def run_figures(built: Built, splits: dict[str, Dataset], history: Any, out: str | Path) -> list[Path]:
    """Write reconstructions, prior samples, ELBO curves and the latent scatter of a run."""
    from .experiment import objective_name

    plt = _plt()
    out = Path(out)
    test = splits["test"]
    # a seeded random subset: some test files (binarised MNIST) are sorted by class
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(built.config.seed))
    tx, ty = test.x[pick], (test.y[pick] if test.y is not None else None)
    shape, n = test.image_shape, min(16, len(test))
    x, y = tx[:n], (ty[:n] if ty is not None else None)
    figs: dict[str, Any] = {}
    figs["reconstructions.png"] = image_grid(torch.cat([x, built.reconstruct(x, y)]), shape, n, "inputs (top) and reconstructions (bottom)")
    gen = torch.Generator().manual_seed(built.config.seed)
    if built.ppca is not None:
        samples = built.ppca.sample(64, generator=gen)
        figs["prior_samples.png"] = image_grid(samples, shape, 8, "samples from the model")
    elif built.conditional:
        labels = torch.arange(built.num_classes or 10).repeat_interleave(8)
        samples = decode_prior(built.decoder, built.likelihood, built.config.latent_dim, len(labels), cond=one_hot(labels, built.num_classes or 10), generator=gen)  # type: ignore[arg-type]
        figs["prior_samples.png"] = image_grid(samples, shape, 8, "generated, one class per row")
    elif "sample_prior" in built.extra:  # a learned prior (mixture, VampPrior, VQ code prior)
        figs["prior_samples.png"] = image_grid(built.extra["sample_prior"](64, gen), shape, 8, "decoded draws from the learned prior")
    else:
        samples = decode_prior(built.decoder, built.likelihood, built.config.latent_dim, 64, generator=gen)  # type: ignore[arg-type]
        figs["prior_samples.png"] = image_grid(samples, shape, 8, "decoded z ~ N(0, I)")
    figs["elbo.png"] = elbo_curves(history, objective_name(built.config))
    m = min(len(test), 2000)
    ym = ty[:m] if ty is not None else None
    figs["latent.png"] = latent_scatter(built.latent_mean(tx[:m], ym), ym)
    paths = []
    for name, fig in figs.items():
        paths.append(io.save_figure(fig, out / name, dpi=110))
        plt.close(fig)
    return paths


def gap_figure(reports: Any) -> Figure:
    """Left: mean approximation and amortisation gaps stacked per model (± SE); right: per-datapoint scatter."""
    import pandas as pd
    import seaborn as sns

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.name for r in reports]
    approx = [r.summary() for r in reports]
    a = [s["approximation_gap"] for s in approx]
    m = [s["amortisation_gap"] for s in approx]
    ax.bar(names, a, yerr=[s["approximation_gap_se"] for s in approx], label="approximation", color="tab:blue", capsize=4)
    ax.bar(names, m, bottom=a, yerr=[s["amortisation_gap_se"] for s in approx], label="amortisation", color="tab:orange", capsize=4)
    ax.set_ylabel("nats per datapoint")
    ax.set_title("inference gap = approximation + amortisation")
    ax.legend()
    df = pd.concat([r.to_dataframe().assign(model=r.name) for r in reports])
    sns.scatterplot(data=df, x="approximation_gap", y="amortisation_gap", hue="model", ax=ax2, s=12, alpha=0.6)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.axvline(0, color="grey", lw=0.5)
    ax2.set_title("per datapoint")
    fig.tight_layout()
    return fig



# --------------------------------------------------------------------------- VI vs MCMC (issue 4)


def _vi_mcmc_frame(mcmc: Any, vi: Any, comparison: Any, point_index: int, dims: list[int], max_draws: int = 1000) -> Any:
    """Long DataFrame of MCMC and VI draws of one point and chosen dims (seeded subsample)."""
    import numpy as np
    import pandas as pd

    from .inference.compare import _matrix

    names = [n for n in mcmc.samples if n in vi.samples]
    rng = np.random.default_rng(0)
    frames = []
    for label, draws in (("MCMC", mcmc), ("VI", vi)):
        x, _, _ = _matrix(draws, names)
        x = x.reshape(-1, *x.shape[2:])[:, point_index][:, dims]
        x = x[rng.permutation(len(x))[:max_draws]]
        frames.append(pd.DataFrame(x, columns=[comparison.dims[d] for d in dims]).assign(method=label))
    return pd.concat(frames, ignore_index=True)


def _discrepancy(comparison: Any) -> Any:
    import numpy as np

    return np.abs(comparison.per_dim["std_mean_error"]) + np.abs(comparison.per_dim["log_sd_ratio"])


def vi_mcmc_pairs(mcmc: Any, vi: Any, comparison: Any, *, max_dims: int = 4) -> Figure:
    """Pairwise KDE (lower) and scatter (upper) of VI vs MCMC draws: the most discrepant point and dims."""
    import numpy as np
    import seaborn as sns

    plt = _plt()
    score = _discrepancy(comparison)
    p = int(np.nanargmax(np.nan_to_num(score, nan=-1).max(1))) if score.shape[0] > 1 else 0
    dims = [int(d) for d in np.argsort(-np.nan_to_num(score[p], nan=-1))[: max(1, min(max_dims, score.shape[1]))]]
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
    fig.suptitle(f"VI vs MCMC, datapoint {comparison.points[p]}: most discrepant dims", y=1.02)
    return fig


def vi_mcmc_marginals(mcmc: Any, vi: Any, comparison: Any, *, max_points: int = 4, max_dims: int = 4) -> Figure:
    """Marginal KDE overlays, one row per datapoint (most discrepant first), its most discrepant dims."""
    import numpy as np
    import seaborn as sns

    plt = _plt()
    score = np.nan_to_num(_discrepancy(comparison), nan=-1)
    rows = [int(i) for i in np.argsort(-score.max(1))[:max_points]]
    ncol = min(max_dims, score.shape[1])
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.1 * len(rows)), squeeze=False)
    for r, p in enumerate(rows):
        dims = [int(d) for d in np.argsort(-score[p])[:ncol]]
        df = _vi_mcmc_frame(mcmc, vi, comparison, p, dims)
        for c, name in enumerate(df.columns[:-1]):
            ax = axes[r, c]
            sns.kdeplot(data=df, x=name, hue="method", hue_order=["MCMC", "VI"], common_norm=False, ax=ax, legend=(r == 0 and c == ncol - 1), warn_singular=False)
            ax.set_title(f"point {comparison.points[p]}: {name}", fontsize=8)
            ax.set_xlabel("")
            ax.set_ylabel("")
    fig.tight_layout()
    return fig


def vi_mcmc_errors(comparison: Any) -> Figure:
    """Per latent dimension: standardised mean error, log sd ratio and 90% coverage, one dot per datapoint."""
    import seaborn as sns

    plt = _plt()
    df = comparison.to_dataframe()
    k = df["dim"].nunique()
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.22 * k + 2), 7.5), sharex=True)
    for ax, (col, ref, label) in zip(axes, [("std_mean_error", 0.0, "(VI - MCMC) mean / MCMC sd"), ("log_sd_ratio", 0.0, "log(VI sd / MCMC sd)"), ("coverage_90", 0.9, "MCMC mass in VI 90% interval")]):
        sns.stripplot(data=df, x="dim", y=col, ax=ax, size=3, alpha=0.6, jitter=0.2, color="tab:blue")
        sns.pointplot(data=df, x="dim", y=col, ax=ax, color="black", markers="_", linestyles="none", errorbar=None)
        ax.axhline(ref, color="tab:red", lw=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("")
    axes[-1].tick_params(axis="x", rotation=90, labelsize=7)
    axes[0].set_title(f"{comparison.vi_method} vs {comparison.mcmc_method}, {len(comparison.points)} datapoints")
    fig.tight_layout()
    return fig


def comparison_figures(mcmc: Any, vi: Any, comparison: Any, out: str | Path) -> list[Path]:
    """Write ``vi_mcmc_pairs.png``, ``vi_mcmc_marginals.png`` and ``vi_mcmc_errors.png`` into ``out``."""
    plt = _plt()
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
