"""``ppl-vae``: a thin argparse front that builds a config and calls the library.

Errors a user can fix (bad options, unreadable or unsafe files, an output
directory in use, a full disk) print one line ``ppl-vae: error: ...`` and exit
with status 2; nothing half written is left behind (files are written
atomically; every option is checked before an output directory is made; a
directory is locked while a command writes it and is not reused without
``--force``, which replaces it as a whole). Ctrl-C prints one line and exits
with 130. Only genuine bugs give ``internal error`` and status 1.

This module and the package ``__init__`` import nothing heavy at import time,
so a Ctrl-C while torch loads is caught too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import Interrupted, PplVaeError

__all__ = ["main", "build_parser"]

#: help texts several commands share
_DATA_DIR = "data folder (default $PPL_VAE_DATA or ~/.cache/ppl-vae)"
_NUM_NODES = "machines, for a run started by torchrun or srun on each (default 1)"
_SPLIT = "train, valid or test (default test)"
_RUN = "run directory from ppl-vae fit"


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _some(text: str) -> tuple[int, ...]:
    """:func:`_hidden`, refusing an empty list (an option whose empty value would silently mean its default)."""
    values = _hidden(text)
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected at least one comma-separated integer, got {text!r}"
        )
    return values


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's help ends with its default (unless it names one already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
        ):
            return text
        shown = (
            ",".join(map(str, action.default))
            if isinstance(action.default, (list, tuple))
            else action.default
        )
        return f"{text} (default {shown})"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ppl-vae: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser(app: Any) -> argparse.ArgumentParser:
    """The parser; ``app`` (:mod:`ppl_vae.app.commands`) names the choices and defaults in the help."""
    p = _Parser(
        prog="ppl-vae",
        formatter_class=_Help,
        description=(
            "Latent-variable models as Pyro functions: train them (fit), measure their inference gaps (gaps),\n"
            "check their posteriors against MCMC (compare), and draw them (plot). Start with: ppl-vae demo"
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_fit, _demo, _plot, _tables, _grad_variance, _gaps, _nll, _compare, _calibrate):
        add(sub, app)
    return p


def _command(
    sub: Any, name: str, summary: str, description: str, example: str
) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary (in ``ppl-vae --help``), a paragraph and an example (in its own ``--help``)."""
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\n{description}",
        epilog=f"example:\n  {example}",
        formatter_class=_Help,
    )


def _output(
    parser: argparse.ArgumentParser, *, what: str = "output directory", progress: bool = True
) -> None:
    """``--out`` (required), ``--force`` and, for a long command, ``--no-progress``."""
    parser.add_argument("--out", required=True, help=f"{what} (must not exist unless --force)")
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing {what} as a whole, only one this command made (never the input, the current or home directory)",
    )
    if progress:
        parser.add_argument(
            "--no-progress",
            action="store_true",
            help="no progress bars (shown by default; a line every few seconds when the output is not a terminal)",
        )


def _fit(sub: Any, app: Any) -> None:
    c = app.Config()  # fit's options default to None ("not given"): the defaults are Config's, and --resume keeps the run's own
    f = _command(
        sub,
        "fit",
        "train a model and write a run directory",
        (
            "Trains a named model (a VAE by default) by SVI with the chosen gradient estimator, validating\n"
            "after every epoch, and writes config.json, checkpoint.pt (every epoch, atomically), history.csv,\n"
            "metrics.json (train/validation/test ELBO in nats per datapoint) and figures to the run directory.\n"
            "A stopped run continues with --resume. The run loads in Python with ppl_vae.load_run(DIR)."
        ),
        "ppl-vae fit --dataset digits --binarize threshold --epochs 20 --out runs/vae",
    )
    for add in (_fit_data, _fit_networks, _fit_objective, _fit_schedule, _fit_launch):
        add(f, c, app)
    _output(f, what="run directory")
    f.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out (its config.json is used; only {', '.join('--' + k.replace('_', '-') for k in app.RESUMABLE)} may change)",
    )


def _given(p: argparse.ArgumentParser, flag: str, help: str, kind: Any = None, **kw: Any) -> None:
    """An option of ``fit`` whose default is None ("not given"): :class:`Config`'s default, or a resumed run's own."""
    if kind is not None:
        kw["type"] = kind
    p.add_argument(flag, default=None, help=help, **kw)


def _fit_data(f: argparse.ArgumentParser, c: Any, app: Any) -> None:
    """``fit``'s model and data: ``--model``, ``--dataset`` and how the data are read."""
    _given(f, "--model", f"one of {', '.join(app.MODELS)} (default {c.model})")
    _given(f, "--dataset", f"one of {', '.join(app.DATASETS)} (default {c.dataset})")
    _given(f, "--data-dir", _DATA_DIR)
    _given(
        f,
        "--download",
        "download missing data files (needs a network; default: off)",
        action="store_true",
    )
    _given(
        f,
        "--binarize",
        "binarise intensities once: at 0.5 (threshold) or by a seeded draw (sample) (default: none, for binarized-mnist: already binary)",
        choices=("threshold", "sample"),
    )
    _given(f, "--limit", "use only the first N rows of each split (default: all)", int)


def _fit_networks(f: argparse.ArgumentParser, c: Any, app: Any) -> None:
    """``fit``'s networks and guide: the latent size, the layers, the likelihood, the guide, the prior's components."""
    _given(f, "--latent-dim", f"dimensions of the latent z (default {c.latent_dim})", int)
    _given(f, "--hidden", f"hidden widths (default {','.join(map(str, c.hidden))})", _hidden)
    _given(
        f,
        "--layers",
        "widths of a layered model's layers, the last one the code (lvae: its stochastic layers, bottom first, default 8d,4d,2d,d for --latent-dim d; sdae: its encoder's layers, default --hidden then d)",
        _some,
    )
    _given(
        f,
        "--arch",
        f"encoder and decoder networks: mlp or conv (default {c.arch})",
        choices=("mlp", "conv"),
    )
    _given(f, "--likelihood", f"one of {', '.join(app.LIKELIHOODS)} (default {c.likelihood})")
    _given(
        f,
        "--guide",
        f"diagonal, full (Gaussian covariance) or iaf (inverse autoregressive flow); default {c.guide}",
    )
    _given(f, "--flows", f"number of IAF steps with --guide iaf (default {c.flows})", int)
    _given(
        f,
        "--components",
        f"mixture components of the prior: mog-vae's Gaussians (default {app.MIXTURE_COMPONENTS}), vampprior's pseudo-inputs (default {app.PSEUDO_INPUTS})",
        int,
    )


def _fit_objective(f: argparse.ArgumentParser, c: Any, app: Any) -> None:
    """``fit``'s objective: the estimator and its particles, the KL weight, the autoencoders' options."""
    _given(f, "--estimator", f"one of {', '.join(app.ESTIMATORS)} (default {c.estimator})")
    _given(
        f, "--num-particles", f"draws of z per datapoint per step (default {c.num_particles})", int
    )
    _given(f, "--beta", f"KL weight (beta-VAE; default {c.beta:g})", float)
    _given(
        f,
        "--pretrain-epochs",
        f"sdae: epochs of each layer's greedy pretraining, before --epochs of fine-tuning (default {c.pretrain_epochs})",
        int,
    )
    _given(
        f,
        "--kl-warmup",
        f"epochs over which the KL weight rises linearly from 0 to --beta (Sønderby et al. 2016; default {c.kl_warmup}: none)",
        int,
    )
    _given(
        f,
        "--noise",
        f"masking probability of the denoising autoencoder (default {c.noise:g})",
        float,
    )
    _given(
        f,
        "--contractive",
        f"weight of the contractive autoencoder's Jacobian penalty, --model cae (default {c.contractive:g})",
        float,
    )


def _fit_schedule(f: argparse.ArgumentParser, c: Any, app: Any) -> None:
    """``fit``'s training schedule: epochs, batches, learning rate, early stopping and the seed."""
    _given(
        f,
        "--epochs",
        f"passes over the training data (default {c.epochs}; with --resume: the new total, at least the epochs done)",
        int,
    )
    _given(f, "--batch-size", f"rows per step, over all devices (default {c.batch_size})", int)
    _given(f, "--lr", f"Adam learning rate (default {c.lr:g})", float)
    _given(
        f,
        "--lr-schedule",
        "learning-rate schedule, a function of (epoch, --epochs): an extended run re-plans it (default: constant)",
        choices=("cosine", "exponential"),
    )
    _given(
        f,
        "--patience",
        "stop after N epochs without a better validation ELBO, keeping the best epoch (default: never)",
        int,
    )
    _given(
        f,
        "--seed",
        f"seeds the networks, draws and shuffling, in [0, 2**32 - 1] (default {c.seed})",
        int,
    )


def _fit_launch(f: argparse.ArgumentParser, c: Any, app: Any) -> None:
    """Where and how ``fit`` runs (Lightning Fabric's options) and ``--compile``."""
    _given(f, "--accelerator", "cpu, cuda, mps or auto (Lightning Fabric; default cpu)")
    _given(
        f,
        "--devices",
        "devices (processes) per node; the batch is split across them (default 1)",
        int,
    )
    _given(
        f,
        "--strategy",
        "ddp (data parallel), ddp_spawn, ddp_fork, ... (Fabric's names; default auto)",
    )
    _given(
        f,
        "--precision",
        "64-true, 32-true, bf16-mixed, 16-mixed, ... (Fabric's names; default 32-true)",
    )
    _given(f, "--num-nodes", _NUM_NODES, int)
    _given(
        f,
        "--compile",
        "run the steps after the first as one traced graph under torch.compile (inductor; compiled before training; one process)",
        action="store_true",
    )


def _demo(sub: Any, app: Any) -> None:
    d = _command(
        sub,
        "demo",
        "the main job on the embedded digits: a 2-D VAE, its gaps and a VI-vs-MCMC check, in 1-2 minutes",
        (
            "Needs no download (scikit-learn ships the 8x8 digits). Trains a 2-D VAE, writes its run directory\n"
            "and figures, then measures the approximation and amortisation gaps of 30 test digits (gaps/) and\n"
            "compares the encoder's posteriors with batched HMC on 4 test digits (compare/), ending with the verdicts."
        ),
        "ppl-vae demo --out runs/demo",
    )
    d.add_argument("--out", default=app.DEMO_DIR, help=f"run directory (default {app.DEMO_DIR})")
    d.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run directory of the demo as a whole",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")


def _plot(sub: Any, app: Any) -> None:
    pl = _command(
        sub,
        "plot",
        "latent-space pictures of trained run(s)",
        (
            "manifold: decoded grid of a 2-D latent space; interpolation: decoded lines between test points;\n"
            "tsne: the test set's latent means embedded in 2-D, coloured by label; ae-vs-vae: two runs' codes side\n"
            "by side; latent-sweep: one run per latent size; traversal: one latent dimension varied at a time."
        ),
        "ppl-vae plot --run runs/vae --kind manifold",
    )
    pl.add_argument(
        "--run",
        action="append",
        required=True,
        help="run directory (repeat for ae-vs-vae and latent-sweep)",
    )
    pl.add_argument(
        "--kind",
        required=True,
        help="manifold, interpolation, tsne, ae-vs-vae, latent-sweep or traversal",
    )
    pl.add_argument("--out", default=None, help="PNG path (default RUN/<kind>.png)")
    pl.add_argument("--seed", type=int, default=0, help="seeds the test points and draws")
    pl.add_argument(
        "--force", action="store_true", help="overwrite an existing PNG (only a PNG image)"
    )


def _tables(sub: Any, app: Any) -> None:
    """The three MNIST tables: ``cvae-quadrants``, ``m2`` and ``sdae-codes``, with their shared options."""
    cq, m2p, sd = _cvae_quadrants(sub), _m2(sub), _sdae_codes(sub)
    for e in (cq, m2p, sd):
        e.add_argument(
            "--data-dir",
            default=None,
            help=_DATA_DIR,
        )
        e.add_argument("--epochs", type=int, default=10, help="passes over the training data")
        e.add_argument(
            "--seed", type=int, default=0, help="seeds the networks, draws and data subsets"
        )
        _output(e)
    _train_limit(cq)
    cq.add_argument("--test-limit", type=int, default=None, help="test rows (default all 10,000)")
    cq.add_argument("--samples", type=int, default=100, help="importance samples per test image")


def _train_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="training rows, a seeded random subset (default all 50,000)",
    )


def _cvae_quadrants(sub: Any) -> argparse.ArgumentParser:
    cq = _command(
        sub,
        "cvae-quadrants",
        "SO-CVAE vs baseline on binarised MNIST: complete hidden quadrants",
        (
            "Trains the structured-output conditional VAE and a deterministic baseline to complete digits from\n"
            "1, 2 or 3 visible quadrants (Sohn et al. 2015), and writes the conditional NLL table (importance sampled)."
        ),
        "ppl-vae cvae-quadrants --data-dir ../shared/data --train-limit 5000 --epochs 5 --out runs/cq",
    )
    cq.add_argument(
        "--quadrants", type=int, nargs="+", default=[1, 2, 3], help="numbers of visible quadrants"
    )
    return cq


def _m2(sub: Any) -> argparse.ArgumentParser:
    m2p = _command(
        sub,
        "m2",
        "semi-supervised M2 on the labelled MNIST test set",
        (
            "Trains Kingma et al.'s M2 with a few labels per class (the other rows unlabelled, their labels\n"
            "summed out) and the same classifier on the labels alone, and writes their test errors per label budget."
        ),
        "ppl-vae m2 --data-dir ../shared/data --labels 100 --draws 1 --out runs/m2",
    )
    m2p.add_argument("--labels", type=int, nargs="+", default=[100, 1000], help="label budgets")
    m2p.add_argument("--draws", type=int, default=3, help="random label draws per budget")
    m2p.add_argument(
        "--alpha",
        type=float,
        default=50.0,
        help="weight of the classification loss per labelled row",
    )
    m2p.add_argument(
        "--unlabelled",
        default=None,
        help="extra unlabelled images: binarized-mnist (its 50,000 training images; default none)",
    )
    m2p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    return m2p


def _sdae_codes(sub: Any) -> argparse.ArgumentParser:
    sd = _command(
        sub,
        "sdae-codes",
        "codes of a stacked denoising autoencoder vs a plain one vs raw pixels, by a classifier",
        (
            "Trains a stacked denoising autoencoder (greedy layer-wise pretraining, then fine-tuning) and a plain\n"
            "autoencoder of the same shape on binarised-MNIST training images, then classifies the 10,000 labelled\n"
            "test images from their codes (and from raw pixels) by cross-validated logistic regression."
        ),
        "ppl-vae sdae-codes --data-dir ../shared/data --layers 500,250,50 --train-limit 20000 --out runs/sdae-codes",
    )
    sd.add_argument(
        "--layers",
        type=_some,
        default=(500, 250, 50),
        help="encoder widths, the last one the code (default 500,250,50)",
    )
    sd.add_argument(
        "--pretrain-epochs", type=int, default=5, help="epochs of each layer's pretraining"
    )
    sd.add_argument(
        "--noise",
        type=float,
        default=0.25,
        help="masking probability of the denoising autoencoders",
    )
    _train_limit(sd)
    return sd


def _grad_variance(sub: Any, app: Any) -> None:
    gv = _command(
        sub,
        "grad-variance",
        "gradient variance and SNR of several estimators on a trained run",
        (
            "Draws the ELBO's gradient many times on one probe batch with each estimator and reports its\n"
            "variance and signal-to-noise ratio per parameter group (Rainforth et al. 2018); with --track-epochs,\n"
            "retrains the run's config and measures them as training goes on."
        ),
        "ppl-vae grad-variance --run runs/vae --estimators score,score+nvil,reparam --out runs/vae-grads",
    )
    gv.add_argument("--run", required=True, help="run directory (from ppl-vae fit)")
    gv.add_argument(
        "--estimators",
        default="score,score+average,score+nvil",
        help=f"comma-separated, from {', '.join(app.ESTIMATORS)}",
    )
    gv.add_argument("--repeats", type=int, default=100, help="gradient draws per estimator")
    gv.add_argument(
        "--batch-size",
        type=int,
        default=100,
        help="rows of the probe batch (a seeded random subset)",
    )
    gv.add_argument(
        "--num-particles",
        type=int,
        default=1,
        help="samples per datapoint per draw (score+loo needs >= 2)",
    )
    gv.add_argument(
        "--track-epochs",
        type=_some,
        default=None,
        help="retrain the run's config and measure at these epochs, e.g. 0,1,5 (default: measure the trained run only)",
    )
    gv.add_argument("--seed", type=int, default=0, help="seeds the probe batch and the draws")
    _output(gv, progress=False)


def _gaps(sub: Any, app: Any) -> None:
    g = _command(
        sub,
        "gaps",
        "approximation and amortisation gaps of trained run(s) (Cremer et al. 2018)",
        (
            "For datapoints of a split: log p(x) (IWAE with K draws, or AIS), the ELBO of the run's encoder L[q],\n"
            "and of q* fitted to each datapoint alone L[q*] in the guide's family (and any --families). The\n"
            "inference gap log p(x) - L[q] splits into approximation (log p(x) - L[q*]) and amortisation\n"
            "(L[q*] - L[q]) gaps, in nats; writes table.md, gaps.csv/json and gaps.png, and prints which gap dominates.\n"
            "A full-covariance q* is fitted as a candidate IWAE proposal too; the proposal is a defensive mixture of\n"
            "q* (every optimum its starts found), q* widened and the prior. gaps.csv flags each datapoint whose log p(x)\n"
            "is unreliable (Pareto k-hat of its importance weights above its bound), whose q* did not converge or\n"
            "whose q* starts ended at different optima, and the table and verdict say how many."
        ),
        "ppl-vae gaps --run runs/vae --num-points 100 --K 5000 --out runs/vae-gaps",
    )
    g.add_argument(
        "--run",
        action="append",
        default=[],
        help="run directory from ppl-vae fit (repeat to compare models; default: none)",
    )
    g.add_argument(
        "--merge",
        action="append",
        default=[],
        help="instead of --run: merge earlier gaps folders into one table and figure (default: none)",
    )
    g.add_argument("--split", default="test", help=_SPLIT)
    g.add_argument(
        "--num-points",
        type=int,
        default=100,
        help="random datapoints of the split (the same for every run)",
    )
    g.add_argument("--logpx", default="iwae", help="iwae (K draws from the best q*) or ais")
    g.add_argument(
        "--K", type=int, default=5000, help="importance samples of the IWAE estimate of log p(x)"
    )
    g.add_argument("--elbo-samples", type=int, default=1000, help="draws for each ELBO estimate")
    g.add_argument(
        "--families",
        default="",
        help="extra q* families besides the guide's own: diagonal,full,flow (default: none)",
    )
    g.add_argument(
        "--unreliable",
        default="flag",
        choices=["flag", "ais"],
        help="datapoints whose IWAE weights have a Pareto k-hat above its bound: flag them, or re-estimate their log p(x) by AIS (default flag)",
    )
    g.add_argument(
        "--local-steps", type=int, default=4000, help="most Adam steps of each local optimisation"
    )
    g.add_argument(
        "--local-lr", type=float, default=1e-2, help="learning rate of the local optimisation"
    )
    g.add_argument(
        "--local-starts",
        type=int,
        default=2,
        help="starts of each local optimisation: the encoder and narrowed copies centred at its draws; the best is kept (default 2)",
    )
    g.add_argument(
        "--defensive",
        default="0.1,0.1",
        help="weights W,P of q* widened x2 and of the prior in the IWAE proposal, a defensive mixture with q* (default 0.1,0.1; 0,0: q* alone)",
    )
    g.add_argument(
        "--ais-steps", type=int, default=1000, help="AIS intermediate densities (with --logpx ais)"
    )
    g.add_argument("--ais-chains", type=int, default=16, help="AIS chains per datapoint")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the datapoints picked and every draw (per datapoint)",
    )
    _spread(g)
    _output(g)


def _nll(sub: Any, app: Any) -> None:
    n = _command(
        sub,
        "nll",
        "test negative log-likelihood of a trained run, -log p(x) by IWAE with K draws",
        (
            "For every image of a split (or the first --limit): the IWAE bound with K draws of the run's guide, its\n"
            "delta-method standard error, and the ELBO of the same draws; the mean over images with its standard\n"
            "error. Blocks of images are saved as they finish, so --resume continues an interrupted computation with\n"
            "the same numbers. Writes nll_K{K}.csv and nll_K{K}.json. An autoencoder (a point-mass encoder) is refused."
        ),
        "ppl-vae nll --run runs/vae --K 5000 --out runs/vae-nll",
    )
    n.add_argument("--run", required=True, help=_RUN)
    n.add_argument("--K", type=int, default=5000, help="importance samples per image")
    n.add_argument("--split", default="test", help=_SPLIT)
    n.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first N images of the split (default: all)",
    )
    n.add_argument(
        "--block", type=int, default=500, help="images per saved block (the unit of --resume)"
    )
    n.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    n.add_argument("--seed", type=int, default=0, help="seeds every image's draws (per image)")
    n.add_argument(
        "--resume", action="store_true", help="continue the unfinished computation in --out"
    )
    _output(n)


def _calibrate(sub: Any, app: Any) -> None:
    c = _command(
        sub,
        "calibrate",
        "simulation-based calibration of a trained run's amortised guide q(z|x)",
        (
            "Simulates (z, x) from the fitted model, draws q(z|x) for each simulated x, and ranks the true z among\n"
            "the draws. Calibrated: uniform ranks for every coordinate. Reports per coordinate a chi-square p-value\n"
            "and the direction of a miscalibration: under-dispersed (q too narrow), over-dispersed or biased; writes\n"
            "calibration.csv/json and ranks.png (Yao et al. 2018)."
        ),
        "ppl-vae calibrate --run runs/vae --num-datasets 1000 --draws 99 --out runs/vae-calibration",
    )
    c.add_argument("--run", required=True, help=_RUN)
    c.add_argument(
        "--num-datasets", type=int, default=1000, help="simulated datasets (one datapoint each)"
    )
    c.add_argument(
        "--draws",
        type=int,
        default=99,
        help="guide draws per dataset (draws + 1 a multiple of --bins)",
    )
    c.add_argument("--bins", type=int, default=10, help="bins of the rank histograms")
    c.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="level of the per-coordinate tests, Bonferroni-corrected",
    )
    c.add_argument("--seed", type=int, default=0, help="seeds the simulation and the draws")
    _output(c, progress=False)


def _compare(sub: Any, app: Any) -> None:
    cm = _command(
        sub,
        "compare",
        "VI vs MCMC (batched HMC or NUTS) on latent posteriors of datapoints of a trained run",
        (
            "Samples p(z|x) of each datapoint with batched HMC or NUTS (per-datapoint step size and mass matrix, R-hat and\n"
            "ESS checked) and draws the guide's q(z|x), then reports per datapoint and latent dimension the error\n"
            "of VI's mean in posterior sds, the sd ratio, the coverage of VI's 90% intervals, the energy distance\n"
            "and the Pareto k-hat of the importance weights; writes compare.json/csv and figures, and a verdict in words."
        ),
        "ppl-vae compare --run runs/vae --num-points 10 --out runs/vae-compare",
    )
    cm.add_argument("--run", required=True, help=_RUN)
    cm.add_argument("--split", default="test", help=_SPLIT)
    cm.add_argument(
        "--num-points",
        type=int,
        default=None,
        help="random datapoints of the split (default 10; not with --indices)",
    )
    cm.add_argument(
        "--indices",
        type=_some,
        default=None,
        help="comma-separated datapoint indices (instead of --num-points; default: none)",
    )
    cm.add_argument(
        "--guide",
        default="amortized",
        help="amortized (the run's encoder) or local (q* optimised per datapoint)",
    )
    cm.add_argument(
        "--draws", type=int, default=1000, help="kept MCMC draws per chain (default 1000)"
    )
    cm.add_argument("--chains", type=int, default=4, help="MCMC chains per datapoint (default 4)")
    cm.add_argument(
        "--warmup", type=int, default=None, help="warmup transitions (default: --draws)"
    )
    cm.add_argument(
        "--vi-draws",
        type=int,
        default=None,
        help="VI draws per datapoint (default: chains x draws)",
    )
    cm.add_argument(
        "--kernel",
        default="hmc",
        help="MCMC transition: hmc (jittered trajectory length) or nuts (No-U-Turn) (default hmc)",
    )
    cm.add_argument(
        "--mass",
        default="diag",
        help="mass matrix adapted per datapoint: diag or dense (for correlated posteriors) (default diag)",
    )
    cm.add_argument(
        "--max-tree-depth",
        type=int,
        default=None,
        help="NUTS: most doublings of a trajectory (default 10; --kernel nuts only)",
    )
    cm.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the datapoints picked and every draw (per datapoint)",
    )
    _spread(cm)
    _output(cm)


def _spread(p: Any) -> None:
    """The options that spread an analysis's datapoints over devices and processes (Lightning Fabric)."""
    p.add_argument(
        "--accelerator", default=None, help="cpu, cuda, mps or auto (default: cpu, in this process)"
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices (processes) per node; each takes a block of the datapoints (default 1)",
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="ddp (default: forks the processes, or joins those torchrun or srun started), ddp_fork or ddp_notebook",
    )
    p.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help=_NUM_NODES,
    )


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _os_error(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{what}: {where}" if where else _one_line(str(exc)) or what


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppl-vae`` console script.

    Returns 0 on success, 2 for an error the user can fix (one line on
    stderr), 130 after Ctrl-C (one line) and 1 for an internal error.
    """
    # torch's C++ notes (DDP's "find_unused_parameters=True ... did not find any unused parameters", once per process)
    # would break one-line output; read when torch loads, and a value the user set wins
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    try:  # the heavy imports (torch, Pyro) happen in here, so Ctrl-C during them is one line too
        import logging

        from .app import (
            commands,  # the one deferred import: torch and Pyro load here, inside the try
        )

        # their INFO lines (Pyro's guessed plate nesting, Fabric's process-group banner, logged by the modules named here
        # because Lightning resets its own top logger to INFO when it is imported) and torch's note that it stops the other
        # processes after one failed would break one-line output
        for name in (
            "pyro",
            "lightning.fabric",
            "lightning_fabric",
            "lightning.fabric.utilities.distributed",
            "lightning.fabric.utilities.rank_zero",
            "lightning.pytorch.utilities.rank_zero",
            "torch.multiprocessing.spawn",
        ):
            logging.getLogger(name).setLevel(
                logging.ERROR if name.startswith("torch") else logging.WARNING
            )
        args = build_parser(commands).parse_args(argv)
        return commands.run(args)
    except PplVaeError as exc:
        print(f"ppl-vae: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(
            f"ppl-vae: {_one_line(str(exc)) if isinstance(exc, Interrupted) else 'interrupted'}",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # permission denied, a full disk, a missing file: the user's to fix
        print(f"ppl-vae: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "ppl-vae: error: out of memory; choose smaller options (--batch-size, --num-particles, --hidden, --latent-dim)",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # one line, not a traceback from deep inside torch
        if os.environ.get("PPL_VAE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"ppl-vae: internal error: {type(exc).__name__}: {first} (set PPL_VAE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
