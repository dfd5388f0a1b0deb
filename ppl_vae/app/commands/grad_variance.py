"""``ppl-vae grad-variance``: gradient variance and SNR of several estimators on a trained run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ... import io
from ...errors import check_int, check_seed
from ...inference.estimators import get_estimator
from ...inference.gradients import GradientStats, gradient_course, gradient_stats
from ...inference.random import pick
from ..figures.gradients import plot_gradient_stats
from ..registry import build
from ..runs import check_run_dir, open_run, prepare_run_dir, releasing

__all__ = ["grad_variance_report"]


@releasing
def grad_variance_report(
    run_dir: str | Path,
    out: str | Path,
    *,
    estimators: Sequence[str],
    repeats: int = 100,
    batch_size: int = 100,
    num_particles: int = 1,
    track_epochs: Sequence[int] | None = None,
    seed: int = 0,
    force: bool = False,
) -> tuple[GradientStats, Path]:
    """``ppl-vae grad-variance``: gradient statistics of a run directory's model, written to ``out``.

    Without ``track_epochs`` the statistics are taken at the run's trained
    parameters; with it the run's config is trained afresh (its estimator,
    batch size, learning rate and seed) and measured at each listed epoch.
    The probe batch is a seeded random subset of ``batch_size`` training
    rows. Writes ``grad_variance.csv`` and ``grad_variance.png``; every input
    is checked (and every statistic computed) before anything is written.
    """
    import pandas as pd

    out = check_run_dir(out, command="grad-variance", force=force, inputs=[run_dir])
    check_seed(seed)
    check_int(batch_size, "batch size")
    for e in estimators:
        get_estimator(e).validate(num_particles)
    built, splits = open_run(run_dir)
    cfg, train = built.config, splits["train"]
    tensors = train.tensors(with_labels=cfg.spec.labels)
    probe = tuple(t[pick(len(train), batch_size, seed=seed)] for t in tensors)
    if track_epochs:
        built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
    named = {"encoder": built.encoder, "decoder": built.decoder, "likelihood": built.likelihood}
    groups = {
        k: [p for p in m.parameters() if p.requires_grad]
        for k, m in named.items()
        if isinstance(m, nn.Module)
    }
    groups = {k: v for k, v in groups.items() if v} or None
    common = dict(
        estimators=list(estimators),
        repeats=repeats,
        groups=groups,
        num_particles=num_particles,
        seed=seed,
    )
    if track_epochs:
        stats = gradient_course(
            built.model,
            built.guide,
            tensors,
            train_estimator=cfg.estimator,
            epochs=track_epochs,
            probe=probe,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            **common,
        )
    else:
        history = Path(run_dir) / "history.csv"
        epoch = len(pd.read_csv(history)) if history.is_file() else cfg.epochs
        stats = gradient_stats(built.model, built.guide, probe, extra={"epoch": epoch}, **common)
    prepare_run_dir(out, command="grad-variance", force=force, inputs=[run_dir])
    io.write_csv(out / "grad_variance.csv", stats.rows)
    fig = plot_gradient_stats(stats)
    io.save_figure(fig, out / "grad_variance.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return stats, out


def command(args: argparse.Namespace) -> int:

    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    stats, out = grad_variance_report(
        args.run,
        args.out,
        estimators=names,
        repeats=args.repeats,
        batch_size=args.batch_size,
        num_particles=args.num_particles,
        track_epochs=args.track_epochs,
        seed=args.seed,
        force=args.force,
    )
    print(stats.to_dataframe().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}/: grad_variance.csv grad_variance.png")
    return 0
