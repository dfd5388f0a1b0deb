r"""Pictures of the latent space of trained runs (imported lazily; matplotlib Agg, seaborn, torchvision grids).

Each picture function returns a matplotlib ``Figure``; :func:`plot_runs` is
what ``ppl-vae plot --run RUN_DIR --kind KIND`` calls.

* ``manifold`` -- decoder means over a grid of prior quantiles of a 2-D latent,
  :math:`z = (\Phi^{-1}(u_i), \Phi^{-1}(u_j))`.
* ``interpolation`` -- decoded :math:`(1 - t)\,\mu(x_a) + t\,\mu(x_b)` between the latent means of test pairs.
* ``tsne`` -- t-SNE (scikit-learn) of the latent means of test rows, coloured by class.
* ``ae-vs-vae`` -- two runs, an autoencoder and a VAE: their latent means side by
  side, and each decoder applied to :math:`z \sim N(0, I)`. The autoencoder was
  never asked to put its codes there, so its decoded samples are mostly bogus.
* ``latent-sweep`` -- runs differing in latent dimension: reconstructions per run and test ELBO against dimension.
* ``traversal`` -- decode the latent mean of one input with one coordinate swept over
  :math:`[-3, 3]` per row (beta-VAE latent traversals).

References
----------
Kingma & Welling (2014), Auto-Encoding Variational Bayes (manifold figure).
Higgins et al. (2017), beta-VAE (traversals). van der Maaten & Hinton (2008),
Visualizing Data using t-SNE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...errors import ConfigError
from ...inference.random import pick
from ..config import MODEL_SPECS
from ..registry import Built
from .run import grid_array, image_grid, load_pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "KINDS",
    "decode",
    "manifold",
    "interpolation",
    "tsne",
    "ae_vs_vae",
    "latent_sweep",
    "traversal",
]

KINDS = ("manifold", "interpolation", "tsne", "ae-vs-vae", "latent-sweep", "traversal")


def _standard() -> str:
    return ", ".join(m for m, s in MODEL_SPECS.items() if s.standard_prior)


def decode(built: Built, z: torch.Tensor) -> torch.Tensor:
    """Mean of :math:`p(x \\mid z)` (PPCA: :math:`Wz + \\mu`) for the latents ``z`` of a run's model."""
    if built.exact is not None:
        return z @ built.exact.W.T + built.exact.mu
    if built.decoder is None or built.likelihood is None or built.conditional:
        raise ConfigError(
            f"latent pictures need an unconditional model with a decoder, not {built.config.model}"
        )
    with torch.no_grad():
        return built.likelihood.mean(built.decoder(z))


def _latent_dim(built: Built, x: torch.Tensor) -> int:
    return int(built.latent_mean(x[:1]).shape[-1])


def manifold(built: Built, image_shape: tuple[int, int, int], *, n: int = 15) -> Figure:
    """Decoder means over an ``n x n`` grid of prior quantiles (5 %..95 %) of a 2-D standard-normal latent."""
    if not built.config.spec.standard_prior or built.config.latent_dim != 2:
        raise ConfigError(
            f"manifold needs a 2-D latent with an N(0, I) prior ({_standard()}); run has {built.config.model} with latent dim {built.config.latent_dim}"
        )
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij")[::-1], -1).reshape(-1, 2)
    return image_grid(
        decode(built, z), image_shape, n, "decoded grid of prior quantiles (z1 across, z2 up)"
    )


def interpolation(
    built: Built,
    x: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    pairs: int = 6,
    steps: int = 10,
    seed: int = 0,
) -> Figure:
    """Rows: decoded linear interpolations between the latent means of random test pairs (ends are reconstructions)."""
    idx = pick(len(x), 2 * pairs, seed=seed).reshape(2, -1)
    za, zb = built.latent_mean(x[idx[0]]), built.latent_mean(x[idx[1]])
    t = torch.linspace(0, 1, steps)[None, :, None]
    z = (1 - t) * za[:, None] + t * zb[:, None]
    images = decode(built, z.reshape(-1, z.shape[-1]))
    rows = torch.cat(
        [x[idx[0]][:, None], images.reshape(len(za), steps, -1), x[idx[1]][:, None]], 1
    )
    return image_grid(
        rows.reshape(-1, rows.shape[-1]),
        image_shape,
        steps + 2,
        "input, interpolation of latent means, input",
    )


def tsne(built: Built, x: torch.Tensor, y: torch.Tensor | None, *, seed: int = 0) -> Figure:
    """t-SNE of the latent means of ``x`` (scikit-learn, perplexity 30), coloured by label."""
    import pandas as pd
    import seaborn as sns
    from sklearn.manifold import TSNE

    plt = load_pyplot()
    z = built.latent_mean(x).numpy()
    xy = (
        TSNE(
            2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=seed
        ).fit_transform(z)
        if z.shape[1] > 1
        else z.repeat(2, 1)
    )
    df = pd.DataFrame({"t-SNE 1": xy[:, 0], "t-SNE 2": xy[:, 1]})
    hue = None
    if y is not None:
        df["label"], hue = y.numpy().astype(str), "label"
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    order = sorted(df["label"].unique(), key=int) if hue else None
    sns.scatterplot(
        data=df,
        x="t-SNE 1",
        y="t-SNE 2",
        hue=hue,
        hue_order=order,
        palette="tab10" if hue else None,
        s=10,
        ax=ax,
    )
    if hue:  # beside the axes, not over the points
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title="label", frameon=False)
    ax.set_title(f"t-SNE of {z.shape[1]}-D latent means ({built.config.model})")
    fig.tight_layout()
    return fig


def ae_vs_vae(
    ae: Built,
    vae: Built,
    x: torch.Tensor,
    y: torch.Tensor | None,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
) -> Figure:
    """Latent means (first two coordinates) and decoded :math:`z \\sim N(0, I)` of an autoencoder and a VAE."""
    import seaborn as sns

    plt = load_pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.5))
    for col, built in enumerate((ae, vae)):
        z = built.latent_mean(x)
        d = z.shape[1]
        ax = axes[0, col]
        hue = y.numpy().astype(str) if y is not None else None
        order = sorted(set(hue), key=int) if hue is not None else None
        sns.scatterplot(
            x=z[:, 0].numpy(),
            y=z[:, 1 % d].numpy(),
            hue=hue,
            hue_order=order,
            palette="tab10" if hue is not None else None,
            s=8,
            ax=ax,
            legend=col == 1,
        )
        if col == 1 and hue is not None:
            sns.move_legend(
                ax, "upper left", bbox_to_anchor=(1.01, 1), title="label", frameon=False
            )
        ax.add_patch(plt.Circle((0, 0), 2.0, fill=False, ls="--", color="k"))
        ax.set_title(
            f"{built.config.model}: latent means (z1, z2); dashed: 2 sd of N(0, I)", fontsize=9
        )
        samples = decode(built, torch.randn(64, d, generator=torch.Generator().manual_seed(seed)))
        axes[1, col].imshow(grid_array(samples, image_shape, 8), interpolation="nearest")
        axes[1, col].set_title(f"{built.config.model}: decoded z ~ N(0, I)", fontsize=9)
        axes[1, col].axis("off")
    fig.tight_layout()
    return fig


def latent_sweep(
    runs: Sequence[tuple[Built, dict[str, Any]]], x: torch.Tensor, image_shape: tuple[int, int, int]
) -> Figure:
    """Reconstructions of ``x`` per run (rows, sorted by latent dimension) and the test ELBO against the dimension."""
    import seaborn as sns

    plt = load_pyplot()
    runs = sorted(runs, key=lambda r: r[0].config.latent_dim)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.9 * (len(runs) + 1) + 1.5), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    rows = torch.cat([x] + [b.reconstruct(x) for b, _ in runs])
    left.imshow(grid_array(rows, image_shape, len(x)), interpolation="nearest")
    left.set_yticks(
        [(i + 0.5) * (image_shape[1] + 1) for i in range(len(runs) + 1)],
        ["input"] + [f"d = {b.config.latent_dim}" for b, _ in runs],
    )
    left.set_xticks([])
    left.set_title("test inputs and reconstructions")
    dims = [b.config.latent_dim for b, _ in runs]
    elbos = [m["test_elbo"] for _, m in runs]
    sns.lineplot(x=dims, y=elbos, marker="o", ax=right)
    right.set_xscale("log", base=2)
    right.set_xticks(dims, [str(d) for d in dims])
    right.set_xlabel("latent dimension")
    right.set_ylabel("test ELBO (nats / datapoint)")
    fig.tight_layout()
    return fig


def traversal(
    built: Built,
    x: torch.Tensor,
    image_shape: tuple[int, int, int],
    *,
    steps: int = 9,
    span: float = 3.0,
    max_dims: int = 10,
) -> Figure:
    """Row ``j``: decode the latent mean of ``x[0]`` with coordinate ``j`` set to each of ``steps`` values in ``[-span, span]``."""
    if not built.config.spec.standard_prior:
        raise ConfigError(
            f"traversal needs a model with an N(0, I) prior ({_standard()}), not {built.config.model}"
        )
    z0 = built.latent_mean(x[:1])[0]
    d = min(len(z0), max_dims)
    values = torch.linspace(-span, span, steps)
    z = z0.repeat(d, steps, 1)
    for j in range(d):
        z[j, :, j] = values
    beta = built.config.beta
    return image_grid(
        decode(built, z.reshape(-1, len(z0))),
        image_shape,
        steps,
        f"traversals ({built.config.model}, beta = {beta:g}): one latent per row, {-span:g}..{span:g}",
    )
