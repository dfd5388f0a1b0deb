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
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, Interrupted, PplVaeError

DEMO_DIR = "runs/demo"


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"ppl-vae: error: {_one_line(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .experiment import MODELS, RESUMABLE, Config
    from .inference.estimators import ESTIMATORS
    from .models import LIKELIHOODS

    c = Config()  # fit's options default to None ("not given"): the defaults are Config's, and --resume keeps the run's own

    p = _Parser(prog="ppl-vae", description="Latent-variable models as Pyro functions: fit, evaluate, plot.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a model and write a run directory")
    f.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default {c.model})")
    f.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default {c.dataset})")
    f.add_argument("--data-dir", default=None, help="data folder (default $PPL_VAE_DATA or ~/.cache/ppl-vae)")
    f.add_argument("--download", action="store_true", default=None, help="download missing data files (needs a network)")
    f.add_argument("--binarize", choices=("threshold", "sample"), default=None, help="binarise intensities (static)")
    f.add_argument("--limit", type=int, default=None, help="use only the first N rows of each split")
    f.add_argument("--latent-dim", type=int, default=None, help=f"default {c.latent_dim}")
    f.add_argument("--hidden", type=_hidden, default=None, help=f"hidden widths (default {','.join(map(str, c.hidden))})")
    f.add_argument("--arch", choices=("mlp", "conv"), default=None, help=f"default {c.arch}")
    f.add_argument("--likelihood", default=None, help=f"one of {', '.join(LIKELIHOODS)} (default {c.likelihood})")
    f.add_argument("--guide", default=None, help=f"diagonal, full (Gaussian covariance) or iaf (inverse autoregressive flow); default {c.guide}")
    f.add_argument("--flows", type=int, default=None, help=f"number of IAF steps with --guide iaf (default {c.flows})")
    f.add_argument("--estimator", default=None, help=f"one of {', '.join(ESTIMATORS)} (default {c.estimator})")
    f.add_argument("--num-particles", type=int, default=None, help=f"default {c.num_particles}")
    f.add_argument("--beta", type=float, default=None, help=f"KL weight (beta-VAE; default {c.beta:g})")
    f.add_argument("--noise", type=float, default=None, help=f"masking probability of the denoising autoencoder (default {c.noise:g})")
    f.add_argument("--epochs", type=int, default=None, help=f"default {c.epochs} (with --resume: the new total, at least the epochs done)")
    f.add_argument("--batch-size", type=int, default=None, help=f"default {c.batch_size}")
    f.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {c.lr:g})")
    f.add_argument("--lr-schedule", choices=("cosine", "exponential"), default=None, help="a function of (epoch, --epochs): an extended run re-plans it")
    f.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without improvement")
    f.add_argument("--seed", type=int, default=None, help=f"in [0, 2**32 - 1] (default {c.seed})")
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("--force", action="store_true", help="replace an existing run directory as a whole")
    f.add_argument(
        "--resume", action="store_true",
        help=f"continue the run in --out (its config.json is used; only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change)",
    )
    f.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="the main job on the embedded digits: a 2-D VAE, its gaps and a VI-vs-MCMC check, in 1-2 minutes")
    d.add_argument("--out", default=DEMO_DIR, help=f"run directory (default {DEMO_DIR})")
    d.add_argument("--force", action="store_true", help="replace an existing run directory as a whole")
    d.add_argument("--no-progress", action="store_true")

    pl = sub.add_parser("plot", help="latent-space pictures of trained run(s)")
    pl.add_argument("--run", action="append", required=True, help="run directory (repeat for ae-vs-vae and latent-sweep)")
    pl.add_argument("--kind", required=True, help="manifold, interpolation, tsne, ae-vs-vae, latent-sweep or traversal")
    pl.add_argument("--out", default=None, help="PNG path (default RUN/<kind>.png)")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--force", action="store_true", help="overwrite an existing PNG")

    cq = sub.add_parser("cvae-quadrants", help="SO-CVAE vs baseline on binarised MNIST: complete hidden quadrants")
    cq.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3], help="numbers of visible quadrants")
    m2p = sub.add_parser("m2", help="semi-supervised M2 on the labelled MNIST test set")
    m2p.add_argument("--labels", type=int, nargs="+", default=[100, 1000], help="label budgets")
    m2p.add_argument("--draws", type=int, default=3, help="random label draws per budget")
    m2p.add_argument("--alpha", type=float, default=50.0, help="weight of the classification loss per labelled row")
    for e in (cq, m2p):
        e.add_argument("--data-dir", default=None, help="data folder (default $PPL_VAE_DATA or ~/.cache/ppl-vae)")
        e.add_argument("--epochs", type=int, default=10)
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--out", required=True, help="output directory")
        e.add_argument("--force", action="store_true", help="replace an existing output directory as a whole")
        e.add_argument("--no-progress", action="store_true")
    cq.add_argument("--train-limit", type=int, default=None, help="training rows, a seeded random subset (default all 50,000)")
    cq.add_argument("--test-limit", type=int, default=None, help="test rows (default all 10,000)")
    cq.add_argument("--samples", type=int, default=100, help="importance samples per test image")

    gv = sub.add_parser("grad-variance", help="gradient variance and SNR of several estimators on a trained run")
    gv.add_argument("--run", required=True, help="run directory (from ppl-vae fit)")
    gv.add_argument("--estimators", default="score,score+average,score+nvil", help=f"comma-separated, from {', '.join(ESTIMATORS)}")
    gv.add_argument("--repeats", type=int, default=100, help="gradient draws per estimator")
    gv.add_argument("--batch-size", type=int, default=100, help="rows of the probe batch (a seeded random subset)")
    gv.add_argument("--num-particles", type=int, default=1, help="samples per datapoint per draw (score+loo needs >= 2)")
    gv.add_argument("--track-epochs", type=_hidden, default=None, help="retrain the run's config and measure at these epochs, e.g. 0,1,5")
    gv.add_argument("--seed", type=int, default=0)
    gv.add_argument("--out", required=True, help="output directory")
    gv.add_argument("--force", action="store_true", help="replace an existing output directory as a whole")

    g = sub.add_parser("gaps", help="approximation and amortisation gaps of trained run(s) (Cremer et al. 2018)")
    g.add_argument("--run", action="append", default=[], help="run directory from ppl-vae fit (repeat to compare models)")
    g.add_argument("--merge", action="append", default=[], help="instead of --run: merge earlier gaps folders into one table and figure")
    g.add_argument("--split", default="test", help="train, valid or test (default test)")
    g.add_argument("--num-points", type=int, default=100, help="random datapoints of the split (the same for every run)")
    g.add_argument("--logpx", default="iwae", help="iwae (K draws from the best q*) or ais")
    g.add_argument("--K", type=int, default=5000, help="importance samples of the IWAE estimate of log p(x)")
    g.add_argument("--elbo-samples", type=int, default=1000, help="draws for each ELBO estimate")
    g.add_argument("--families", default="", help="extra q* families besides the guide's own: diagonal,full,flow")
    g.add_argument("--local-steps", type=int, default=3000, help="most Adam steps of each local optimisation")
    g.add_argument("--local-lr", type=float, default=1e-2, help="learning rate of the local optimisation")
    g.add_argument("--ais-steps", type=int, default=1000, help="AIS intermediate densities (with --logpx ais)")
    g.add_argument("--ais-chains", type=int, default=16, help="AIS chains per datapoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--force", action="store_true", help="replace an existing output directory as a whole")

    cm = sub.add_parser("compare", help="VI vs MCMC (batched HMC) on latent posteriors of datapoints of a trained run")
    cm.add_argument("--run", required=True, help="run directory from ppl-vae fit")
    cm.add_argument("--split", default="test", help="train, valid or test (default test)")
    cm.add_argument("--num-points", type=int, default=10, help="random datapoints of the split (default 10)")
    cm.add_argument("--indices", type=_hidden, default=None, help="comma-separated datapoint indices (instead of --num-points)")
    cm.add_argument("--guide", default="amortized", help="amortized (the run's encoder) or local (q* optimised per datapoint)")
    cm.add_argument("--draws", type=int, default=1000, help="kept MCMC draws per chain (default 1000)")
    cm.add_argument("--chains", type=int, default=4, help="MCMC chains per datapoint (default 4)")
    cm.add_argument("--warmup", type=int, default=None, help="warmup transitions (default: --draws)")
    cm.add_argument("--vi-draws", type=int, default=None, help="VI draws per datapoint (default: chains x draws)")
    cm.add_argument("--seed", type=int, default=0)
    cm.add_argument("--out", required=True, help="output directory")
    cm.add_argument("--force", action="store_true", help="replace an existing output directory as a whole")
    cm.add_argument("--no-progress", action="store_true")
    return p


def _fit(args: argparse.Namespace) -> int:
    import dataclasses

    from .experiment import CONFIG, Config, read_config, run

    given = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None}
    if args.resume:
        if args.force:
            raise ConfigError("give either --force (start the run afresh) or --resume (continue it), not both")
        path = Path(args.out) / CONFIG
        if not path.is_file():
            raise ConfigError(f"cannot resume: no {CONFIG} in {args.out}")
        cfg = dataclasses.replace(read_config(path), **given)  # run() refuses what contradicts the run
    else:
        cfg = Config(**given)
    metrics = run(cfg, args.out, force=args.force, resume=args.resume, progress=not args.no_progress)
    _report(metrics, args.out)
    return 0


def _report(metrics: dict, out: str) -> None:
    print(
        f"{metrics['objective']}: train {metrics['train_elbo']:.2f}, valid {metrics['val_elbo']:.2f}, "
        f"test {metrics['test_elbo']:.2f} ± {metrics['test_elbo_se']:.2f} nats/datapoint "
        f"({metrics['epochs']} epochs, {metrics['wall_time_s']:.1f} s)"
    )
    if "test_log_px_exact" in metrics:
        print(f"exact test log p(x): {metrics['test_log_px_exact']:.2f}")
    print(f"wrote {out}/: metrics.json history.csv checkpoint.pt reconstructions.png prior_samples.png elbo.png latent.png")


def _demo(args: argparse.Namespace) -> int:
    from .experiment import Config, run

    cfg = Config(model="vae", dataset="digits", binarize="threshold", latent_dim=2, hidden=(128, 128), epochs=150, lr=3e-3, seed=0)
    metrics = run(cfg, args.out, force=args.force, progress=not args.no_progress)
    _report(metrics, args.out)
    from .gaps_run import gaps_run, table_markdown

    gaps_dir = Path(args.out) / "gaps"  # the demo owns its run directory, so its gaps folder is rewritten
    reports = gaps_run([args.out], gaps_dir, num_points=30, num_samples=2000, elbo_samples=500, families=["full", "flow"], force=True)
    print(table_markdown(reports), end="")
    print(f"wrote {gaps_dir}/: gaps.csv gaps.json table.md gaps.png")
    from .compare_run import demo_comparison
    from .experiment import load_run

    built, splits = load_run(args.out)
    info = demo_comparison(built, splits, args.out, seed=0)
    print(f"VI vs MCMC on test points {info['indices']}: {info['mcmc_method']}, {info['divergences']} divergences; wrote {Path(args.out) / 'compare'}/")
    return 0


def _positive(**options: float) -> None:
    """One line for an option that must be a positive finite number."""
    for name, value in options.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")


def _gaps(args: argparse.Namespace) -> int:
    import json

    from .gaps_run import gaps_run, merge_gaps, table_markdown
    from .inference.gaps import GAPS_CSV, GAPS_JSON

    if args.merge and args.run:
        raise ConfigError("give either --run (analyse runs) or --merge (combine gaps folders), not both")
    _positive(local_lr=args.local_lr)  # the counts are checked by gaps_run, before any work
    for folder in args.merge:
        try:
            meta = json.loads((Path(folder) / GAPS_JSON).read_text())
            ok = (Path(folder) / GAPS_CSV).is_file() and isinstance(meta, dict) and isinstance(meta.get("summaries"), list) and meta["summaries"]
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"--merge {folder} is not the output of ppl-vae gaps (no readable {GAPS_JSON} with summaries and {GAPS_CSV})")
    if args.merge:
        reports = merge_gaps(args.merge, args.out, force=args.force)
        print(table_markdown(reports), end="")
        print(f"wrote {args.out}/: gaps.csv gaps.json table.md gaps.png")
        return 0
    families = [f for f in args.families.split(",") if f.strip()]
    reports = gaps_run(
        args.run, args.out, split=args.split, num_points=args.num_points, logpx=args.logpx, num_samples=args.K,
        elbo_samples=args.elbo_samples, families=families, local_options={"max_steps": args.local_steps, "lr": args.local_lr},
        ais_options={"num_steps": args.ais_steps, "num_chains": args.ais_chains}, seed=args.seed, force=args.force,
    )
    print(table_markdown(reports), end="")
    print(f"wrote {args.out}/: gaps.csv gaps.json table.md gaps.png")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .latent_plots import plot_runs

    path = plot_runs(args.run, args.kind, out=args.out, seed=args.seed, force=args.force)
    print(f"wrote {path}")
    return 0


def _family_experiment(args: argparse.Namespace) -> int:
    from .experiments_extra import cvae_quadrants, m2_semisupervised

    common = dict(data_dir=args.data_dir, epochs=args.epochs, seed=args.seed, force=args.force, progress=not args.no_progress)
    if args.command == "m2":
        result = m2_semisupervised(args.out, labels=args.labels, draws=args.draws, alpha=args.alpha, **common)
    else:
        result = cvae_quadrants(args.out, quadrants=args.quadrants, train_limit=args.train_limit, test_limit=args.test_limit, num_samples=args.samples, **common)
    print((Path(result.out) / "table.md").read_text(), end="")
    print(f"wrote {result.out}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare_run import compare_run

    info = compare_run(
        args.run, args.out, num_points=args.num_points, indices=list(args.indices) if args.indices is not None else None,
        split=args.split, guide=args.guide, draws=args.draws, chains=args.chains, warmup=args.warmup, vi_draws=args.vi_draws,
        seed=args.seed, force=args.force, progress=not args.no_progress,
    )
    s = info["summary"]
    print(
        f"{len(info['indices'])} datapoints, {info['chains']} chains x {info['draws']} draws: MCMC {info['mcmc_wall_time_s']:.1f} s, "
        f"max R-hat {s['mcmc_max_rhat']:.3f}, min bulk ESS {s['mcmc_min_ess_bulk']:.0f}, {info['divergences']} divergent transitions"
    )
    print(
        f"VI ({info['guide']}) vs MCMC: max |mean error| {s['max_abs_std_mean_error']:.2f} sd, sd ratio {s['min_sd_ratio']:.2f}..{s['max_sd_ratio']:.2f}, "
        f"90% coverage {s['mean_coverage_90']:.2f}, max Pareto k {s['max_pareto_k']:.2f}, {s['num_flagged_dims']:.0f} flagged dims"
    )
    print(f"wrote {args.out}/: comparison.csv comparison.json mcmc_diagnostics.csv compare.json vi_mcmc_pairs.png vi_mcmc_marginals.png vi_mcmc_errors.png")
    return 0


def _grad_variance(args: argparse.Namespace) -> int:
    from .inference.gradients import grad_variance_report

    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    stats, out = grad_variance_report(
        args.run, args.out, estimators=names, repeats=args.repeats, batch_size=args.batch_size,
        num_particles=args.num_particles, track_epochs=args.track_epochs, seed=args.seed, force=args.force,
    )
    print(stats.to_dataframe().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out}/: grad_variance.csv grad_variance.png")
    return 0


COMMANDS = {
    "fit": _fit, "demo": _demo, "plot": _plot, "cvae-quadrants": _family_experiment, "m2": _family_experiment,
    "grad-variance": _grad_variance, "gaps": _gaps, "compare": _compare,
}


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
    try:  # the heavy imports (torch, Pyro) happen in here, so Ctrl-C during them is one line too
        import logging

        parser = _parser()  # imports Pyro, which sets its logger's level: quieten it afterwards
        logging.getLogger("pyro").setLevel(logging.WARNING)  # Pyro's "Guessed max_plate_nesting" INFO line would break one-line errors
        args = parser.parse_args(argv)
        from . import io

        with io.holding():  # the output directories a command locks are released when it ends
            return COMMANDS[args.command](args)
    except PplVaeError as exc:
        print(f"ppl-vae: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"ppl-vae: {_one_line(str(exc)) if isinstance(exc, Interrupted) else 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as exc:  # permission denied, a full disk, a missing file: the user's to fix
        print(f"ppl-vae: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("ppl-vae: error: out of memory; choose smaller options (--batch-size, --num-particles, --hidden, --latent-dim)", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, not a traceback from deep inside torch
        if os.environ.get("PPL_VAE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"ppl-vae: internal error: {type(exc).__name__}: {first} (set PPL_VAE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
