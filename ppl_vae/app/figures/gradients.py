"""Gradient variance and signal-to-noise ratio per estimator and parameter group."""

from __future__ import annotations

from typing import Any

from ...inference.gradients import GradientStats

__all__ = ["plot_gradient_stats"]


def plot_gradient_stats(stats: GradientStats) -> Any:
    """A seaborn figure: variance (log scale) and SNR per estimator and group; over epochs if tracked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = stats.to_dataframe()
    over_time = "epoch" in df and df["epoch"].nunique() > 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, title in (
        (axes[0], "variance", "gradient variance (trace)"),
        (axes[1], "snr", "mean per-parameter SNR"),
    ):
        if over_time:
            sns.lineplot(
                data=df, x="epoch", y=column, hue="estimator", style="group", marker="o", ax=ax
            )
        else:
            sns.barplot(data=df, x="group", y=column, hue="estimator", ax=ax)
        ax.set_yscale("log")
        ax.set_title(title)
    fig.tight_layout()
    return fig
