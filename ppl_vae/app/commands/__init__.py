"""The commands of ``ppl-vae``: each module's ``command(args)`` runs one subcommand; :func:`run` dispatches.

The names the parser shows in its help (models, datasets, likelihoods,
estimators, defaults) are re-exported here, so :mod:`ppl_vae.cli` stays
argparse only.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from ... import io
from ...data import DATASETS
from ...distributions import LIKELIHOODS
from ...inference.distributed import launched_rank
from ...inference.estimators import ESTIMATORS
from ..config import MODELS, RESUMABLE, Config
from ..registry import MIXTURE_COMPONENTS, PSEUDO_INPUTS
from ..runs import holding
from . import calibrate, compare, demo, fit, gaps, grad_variance, nll, plot, tables
from .demo import DEMO_DIR

__all__ = [
    "COMMANDS",
    "Config",
    "DATASETS",
    "DEMO_DIR",
    "ESTIMATORS",
    "LIKELIHOODS",
    "MIXTURE_COMPONENTS",
    "MODELS",
    "PSEUDO_INPUTS",
    "RESUMABLE",
    "run",
]

COMMANDS = {
    "fit": fit.command,
    "demo": demo.command,
    "plot": plot.command,
    "cvae-quadrants": tables.command,
    "m2": tables.command,
    "sdae-codes": tables.command,
    "grad-variance": grad_variance.command,
    "gaps": gaps.command,
    "nll": nll.command,
    "compare": compare.command,
    "calibrate": calibrate.command,
}


def run(args: argparse.Namespace) -> int:
    """Run the subcommand ``args.command``; the output directories it locks are released when it ends.

    Under torchrun or srun every process runs the command; the process of global rank 0 writes
    the files and prints, the others compute their share only (:func:`ppl_vae.io.follower`).
    """
    rank = launched_rank()
    with holding(), contextlib.ExitStack() as stack:
        if rank not in (None, 0):
            stack.enter_context(io.follower())
            stack.enter_context(
                contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w")))
            )
        return COMMANDS[args.command](args)
