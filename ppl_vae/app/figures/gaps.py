"""The gap figure: stacked approximation and amortisation gaps per model, and a per-datapoint scatter."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .run import load_pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gap_figure"]


def gap_figure(reports: Any) -> Figure:
    """Left: mean approximation and amortisation gaps stacked per model (± SE); right: per-datapoint scatter."""
    import pandas as pd
    import seaborn as sns

    plt = load_pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.name for r in reports]
    approx = [r.summary() for r in reports]
    a = [s["approximation_gap"] for s in approx]
    m = [s["amortisation_gap"] for s in approx]
    ax.bar(
        names,
        a,
        yerr=[s["approximation_gap_se"] for s in approx],
        label="approximation",
        color="tab:blue",
        capsize=4,
    )
    ax.bar(
        names,
        m,
        bottom=a,
        yerr=[s["amortisation_gap_se"] for s in approx],
        label="amortisation",
        color="tab:orange",
        capsize=4,
    )
    ax.set_ylabel("nats per datapoint")
    ax.set_title("inference gap = approximation + amortisation")
    ax.legend()
    df = pd.concat([r.to_dataframe().assign(model=r.name) for r in reports])
    sns.scatterplot(
        data=df, x="approximation_gap", y="amortisation_gap", hue="model", ax=ax2, s=12, alpha=0.6
    )
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.axvline(0, color="grey", lw=0.5)
    ax2.set_xlabel("approximation gap (nats)")
    ax2.set_ylabel("amortisation gap (nats)")
    ax2.set_title("per datapoint")
    fig.tight_layout()
    return fig
