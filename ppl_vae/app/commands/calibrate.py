"""``ppl-vae calibrate``: simulation-based calibration of a trained run's amortised guide (rank histograms, per-coordinate tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ... import io
from ...errors import ConfigError, check_int, check_seed
from ...inference.calibration import Calibration, calibrate
from ..figures.calibration import rank_histograms
from ..runs import check_run_dir, open_run, output_path, prepare_run_dir, releasing

__all__ = ["calibrate_run", "command"]


@releasing
def calibrate_run(
    run: str | Path,
    out: str | Path,
    *,
    num_datasets: int = 1000,
    num_draws: int = 99,
    bins: int = 10,
    alpha: float = 0.01,
    seed: int = 0,
    force: bool = False,
    figures: bool = True,
) -> Calibration:
    """Calibrate the guide of the run in ``run`` on ``num_datasets`` datasets simulated from its model; write CSV, JSON and the figure to ``out``.

    The model's other arguments (a conditional model's labels) come from the run's test rows, in order, cycled.
    """
    check_int(num_datasets, "--num-datasets", low=2)
    check_seed(seed, "--seed")
    built, splits = open_run(run)
    if built.config.spec.latents != "continuous":
        raise ConfigError(
            f"{run} ({built.config.model}): calibration ranks continuous latents drawn from the guide; this model's are {built.config.spec.latents}"
        )
    test = splits["test"].tensors(with_labels=built.conditional)
    rows = torch.arange(num_datasets) % test[0].shape[0]
    template = tuple(t[rows] for t in test)
    out = output_path(out)
    check_run_dir(
        out, command="calibrate", force=force, inputs=[run]
    )  # before the work: an existing folder is refused now, not after it
    cal = calibrate(
        built.model,
        built.guide,
        *template,
        num_datasets=num_datasets,
        num_draws=num_draws,
        bins=bins,
        alpha=alpha,
        seed=seed,
    )
    out = prepare_run_dir(out, command="calibrate", force=force, inputs=[run])
    cal.save(out)
    io.write_json(
        out / "options.json",
        {
            "run": str(run),
            "num_datasets": num_datasets,
            "num_draws": num_draws,
            "bins": bins,
            "alpha": alpha,
            "seed": seed,
        },
    )
    if figures:
        rank_histograms(cal, out / "ranks.png")
    return cal


def command(args: argparse.Namespace) -> int:
    cal = calibrate_run(
        args.run,
        args.out,
        num_datasets=args.num_datasets,
        num_draws=args.draws,
        bins=args.bins,
        alpha=args.alpha,
        seed=args.seed,
        force=args.force,
    )
    print(cal.verdict())
    print(f"wrote {args.out}/: calibration.csv, calibration.json, ranks.png")
    return 0
