"""The commands of ``ppl-vae``: each module's ``command(args)`` runs one subcommand; :func:`run` dispatches.

The names the parser shows in its help (models, datasets, likelihoods,
estimators, defaults) are re-exported here, so :mod:`ppl_vae.cli` stays
argparse only.
"""

from __future__ import annotations

import argparse

from ...data import DATASETS
from ...distributions import LIKELIHOODS
from ...inference.estimators import ESTIMATORS
from ..config import MODELS, RESUMABLE, Config
from ..runs import holding
from . import compare, demo, fit, gaps, grad_variance, plot, tables
from .demo import DEMO_DIR

__all__ = ["COMMANDS", "Config", "DATASETS", "DEMO_DIR", "ESTIMATORS", "LIKELIHOODS", "MODELS", "RESUMABLE", "run"]

COMMANDS = {
    "fit": fit.command, "demo": demo.command, "plot": plot.command, "cvae-quadrants": tables.command, "m2": tables.command,
    "grad-variance": grad_variance.command, "gaps": gaps.command, "compare": compare.command,
}


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command``; the output directories it locks are released when it ends."""
    with holding():
        return COMMANDS[args.command](args)
