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
    f.add_argument("--guide", default="diagonal", help="diagonal or full (covariance of the Gaussian guide)")
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

    d = sub.add_parser("demo", help="the main job on the embedded digits: a 2-D VAE, in about a minute")
    d.add_argument("--out", default=DEMO_DIR, help=f"run directory (default {DEMO_DIR})")
    d.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    d.add_argument("--no-progress", action="store_true")
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppl-vae`` console script."""
    args = _parser().parse_args(argv)
    try:
        return {"fit": _fit, "demo": _demo}[args.command](args)
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
