"""``ppl-vae demo``: the main job on the embedded 8x8 digits, no download.

A 2-D VAE (150 epochs), then the inference gaps of 30 of its test digits
(q* diagonal, full and flow; log p-hat by IWAE K=2000) and a VI-vs-MCMC check
on 4 of them, all written into one run directory (``runs/demo`` by default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from ..runs import open_run
from .compare import demo_comparison
from .fit import report, run
from .gaps import gaps_run, table_markdown

DEMO_DIR = "runs/demo"


def command(args: argparse.Namespace) -> int:

    cfg = Config(
        model="vae",
        dataset="digits",
        binarize="threshold",
        latent_dim=2,
        hidden=(128, 128),
        epochs=150,
        lr=3e-3,
        seed=0,
    )
    metrics = run(cfg, args.out, force=args.force, progress=not args.no_progress, command="demo")
    report(metrics, args.out)

    gaps_dir = (
        Path(args.out) / "gaps"
    )  # the demo owns its run directory, so its gaps folder is rewritten
    reports = gaps_run(
        [args.out],
        gaps_dir,
        num_points=30,
        num_samples=2000,
        elbo_samples=500,
        families=["full", "flow"],
        force=True,
        progress=not args.no_progress,
    )
    print(table_markdown(reports), end="")
    print(f"wrote {gaps_dir}/: gaps.csv gaps.json table.md gaps.png")

    built, splits = open_run(args.out)
    info = demo_comparison(built, splits, args.out, seed=0, progress=not args.no_progress)
    print(info["verdict"])
    print(
        f"wrote {Path(args.out) / 'compare'}/ (VI vs MCMC on test points {', '.join(map(str, info['indices']))})"
    )
    return 0
