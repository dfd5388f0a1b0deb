"""Figures of a run (seaborn / matplotlib, imported lazily, Agg backend).

Each function returns a matplotlib ``Figure``; :func:`run_figures` writes the
standard set of a run as PNG files, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ... import io
from ...data import Dataset
from ...distributions import one_hot
from ...inference.random import pick
from ...models.vae import decode_prior
from ..registry import Built, objective_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["image_grid", "elbo_curves", "latent_scatter", "run_figures"]


def load_pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_array(images: torch.Tensor, image_shape: tuple[int, int, int], nrow: int) -> Any:
    """Flat images tiled by torchvision's ``make_grid``, as an ``[H, W, C]`` array for ``imshow``."""
    from torchvision.utils import make_grid

    return (
        make_grid(
            images.reshape(-1, *image_shape).clamp(0, 1).float(),
            nrow=nrow,
            padding=1,
            pad_value=0.5,
        )
        .permute(1, 2, 0)
        .numpy()
    )


def image_grid(
    images: torch.Tensor, image_shape: tuple[int, int, int], nrow: int, title: str
) -> Figure:
    """A grid of flat images (torchvision ``make_grid``) as a figure."""
    plt = load_pyplot()
    grid = grid_array(images, image_shape, nrow)
    fig, ax = plt.subplots(
        figsize=(nrow * 0.45 + 0.5, grid.shape[0] / grid.shape[1] * nrow * 0.45 + 0.6)
    )
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    return fig


def elbo_curves(history: Any, objective: str = "ELBO") -> Figure:
    """Train and validation ELBO per epoch from a history DataFrame."""
    import seaborn as sns

    plt = load_pyplot()
    cols = [c for c in ("train_elbo", "val_elbo") if c in history]
    long = history.melt(id_vars="epoch", value_vars=cols, var_name="split", value_name="elbo")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.lineplot(
        data=long,
        x="epoch",
        y="elbo",
        hue="split",
        marker="o" if len(history) <= 30 else None,
        ax=ax,
    )
    ax.set_ylabel(f"{objective} (nats / datapoint)")
    fig.tight_layout()
    return fig


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None) -> Figure:
    """Latent means: directly if 2-D, else their first two principal components."""
    import pandas as pd
    import seaborn as sns

    plt = load_pyplot()
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
    sns.scatterplot(
        data=df,
        x=names[0],
        y="_y",
        hue=hue,
        hue_order=order,
        s=12,
        ax=ax,
        palette="tab10" if hue else None,
    )
    if hue:  # beside the axes, not over the points
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="label", frameon=False)
    ax.set_ylabel(names[1])
    ax.set_title("latent means of the test set")
    fig.tight_layout()
    return fig


def run_figures(
    built: Built, splits: dict[str, Dataset], history: Any, out: str | Path
) -> list[Path]:
    """Write reconstructions, prior samples, ELBO curves and the latent scatter of a run."""

    plt = load_pyplot()
    out = Path(out)
    test = splits["test"]
    # a seeded random subset: some test files (binarised MNIST) are sorted by class
    order = pick(len(test), seed=built.config.seed)
    tx, ty = test.x[order], (test.y[order] if test.y is not None else None)
    shape, n = test.image_shape, min(16, len(test))
    x, y = tx[:n], (ty[:n] if ty is not None else None)
    figs: dict[str, Any] = {}
    figs["reconstructions.png"] = image_grid(
        torch.cat([x, built.reconstruct(x, y)]),
        shape,
        n,
        "inputs (top) and reconstructions (bottom)",
    )
    gen = torch.Generator().manual_seed(built.config.seed)
    if built.exact is not None:
        samples = built.exact.sample(64, generator=gen)
        figs["prior_samples.png"] = image_grid(samples, shape, 8, "samples from the model")
    elif built.conditional:
        labels = torch.arange(built.num_classes or 10).repeat_interleave(8)
        samples = decode_prior(
            built.decoder,
            built.likelihood,
            built.config.latent_dim,
            len(labels),
            cond=one_hot(labels, built.num_classes or 10),
            generator=gen,
        )  # type: ignore[arg-type]
        figs["prior_samples.png"] = image_grid(samples, shape, 8, "generated, one class per row")
    elif "sample_prior" in built.extra:  # a learned prior (mixture, VampPrior, VQ code prior)
        figs["prior_samples.png"] = image_grid(
            built.extra["sample_prior"](64, gen), shape, 8, "decoded draws from the learned prior"
        )
    else:
        samples = decode_prior(
            built.decoder, built.likelihood, built.config.latent_dim, 64, generator=gen
        )  # type: ignore[arg-type]
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


# --------------------------------------------------------------------------- VI vs MCMC (issue 4)
