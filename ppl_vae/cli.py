"""``ppl-vae``: a thin argparse front that builds a config and calls the library.

Errors a user can fix print one line and exit with status 2; nothing half
written is left behind (files are written atomically, a run directory is not
reused without ``--force``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError, PplVaeError

DEMO_DIR = "runs/demo"


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .experiment import MODELS
    from .inference.estimators import ESTIMATORS
    from .models import LIKELIHOODS

    p = argparse.ArgumentParser(prog="ppl-vae", description="Latent-variable models as Pyro functions: fit, evaluate, plot.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="train a model and write a run directory")
    f.add_argument("--model", default="vae", help=f"one of {', '.join(MODELS)} (default vae)")
    f.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    f.add_argument("--data-dir", default=None, help="data folder (default $PPL_VAE_DATA or ~/.cache/ppl-vae)")
    f.add_argument("--download", action="store_true", help="download missing data files (needs a network)")
    f.add_argument("--binarize", choices=("threshold", "sample"), default=None, help="binarise intensities (static)")
    f.add_argument("--limit", type=int, default=None, help="use only the first N rows of each split")
    f.add_argument("--latent-dim", type=int, default=2)
    f.add_argument("--hidden", type=_hidden, default=(200, 200), help="hidden widths, e.g. 200,200")
    f.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    f.add_argument("--likelihood", default="bernoulli", help=f"one of {', '.join(LIKELIHOODS)}")
    f.add_argument("--guide", default="diagonal", help="diagonal, full (Gaussian covariance) or iaf (inverse autoregressive flow)")
    f.add_argument("--flows", type=int, default=2, help="number of IAF steps with --guide iaf (default 2)")
    f.add_argument("--estimator", default="reparam", help=f"one of {', '.join(ESTIMATORS)}")
    f.add_argument("--num-particles", type=int, default=1)
    f.add_argument("--beta", type=float, default=1.0, help="KL weight (beta-VAE)")
    f.add_argument("--noise", type=float, default=0.25, help="masking probability of the denoising autoencoder")
    f.add_argument("--epochs", type=int, default=None, help="default 20 (with --resume: the total to reach)")
    f.add_argument("--batch-size", type=int, default=100)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--lr-schedule", choices=("cosine", "exponential"), default=None)
    f.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without improvement")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    f.add_argument("--resume", action="store_true", help="continue the run in --out (its config.json is used)")
    f.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="the main job on the embedded digits: a 2-D VAE, its gaps and a VI-vs-MCMC check, in 1-2 minutes")
    d.add_argument("--out", default=DEMO_DIR, help=f"run directory (default {DEMO_DIR})")
    d.add_argument("--force", action="store_true", help="overwrite an existing run directory")
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
        e.add_argument("--force", action="store_true", help="overwrite an existing output directory")
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
    gv.add_argument("--force", action="store_true", help="overwrite an existing output directory")

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
    g.add_argument("--force", action="store_true", help="overwrite an existing output directory")

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
    cm.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    cm.add_argument("--no-progress", action="store_true")
    return p


def _fit(args: argparse.Namespace) -> int:
    from .experiment import CONFIG, Config, read_config, run

    if args.resume:
        path = Path(args.out) / CONFIG
        if not path.is_file():
            raise ConfigError(f"cannot resume: no {CONFIG} in {args.out}")
        cfg = read_config(path, **({"epochs": args.epochs} if args.epochs is not None else {}))
    else:
        fields = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
        fields["epochs"] = 20 if args.epochs is None else args.epochs
        cfg = Config(**fields)
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


def _gaps(args: argparse.Namespace) -> int:
    from .gaps_run import gaps_run, merge_gaps, table_markdown

    if args.merge and args.run:
        raise ConfigError("give either --run (analyse runs) or --merge (combine gaps folders), not both")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppl-vae`` console script."""
    args = _parser().parse_args(argv)
    import logging

    logging.getLogger("pyro").setLevel(logging.WARNING)  # Pyro's "Guessed max_plate_nesting" INFO line would break one-line errors
    try:
        return {"fit": _fit, "demo": _demo, "plot": _plot, "cvae-quadrants": _family_experiment, "m2": _family_experiment, "grad-variance": _grad_variance, "gaps": _gaps, "compare": _compare}[args.command](args)
    except PplVaeError as exc:
        print(f"ppl-vae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppl-vae: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback from deep inside torch
        if os.environ.get("PPL_VAE_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"ppl-vae: internal error: {type(exc).__name__}: {first} (set PPL_VAE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
