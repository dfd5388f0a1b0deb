"""Collect the NLL table of docs/nll.md from trained runs: results JSON, curves figure, markdown rows.

Each ``--model NAME=RUN,NLL[,GAPS]`` names a run directory of ``ppl-vae fit``, the output directory of
``ppl-vae nll --run RUN --K 5000`` on it and, optionally, that of ``ppl-vae gaps --run RUN`` (whose log p(x)
uses the best of its local q* -- the full-covariance one, or the guide's own family's -- as proposal): the encoder-proposal and q*-proposal NLLs are then compared
image by image on the gaps images, and the all-images NLL is corrected by their mean difference. Their numbers (options, test ELBO, wall times, NLL with its
standard error and Pareto k-hat counts, the training and validation curves) are merged into
``docs/results/nll.json`` under NAME, so that the table and the figure outlive the run directories
(which are large and local); ``--redraw`` redraws the figure and the rows from that file alone.

    python docs/nll_table.py --model vae=runs/vae,runs/vae-nll,runs/gaps-vae
    python docs/nll_table.py --redraw
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from ppl_vae import io
from ppl_vae.app.figures.run import load_pyplot

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "nll.json"
FIGURE = HERE / "figures" / "nll" / "curves.png"
OPTIONS = (
    "model",
    "guide",
    "flows",
    "components",
    "estimator",
    "num_particles",
    "latent_dim",
    "hidden",
    "layers",
    "lr",
    "lr_schedule",
    "batch_size",
    "kl_warmup",
    "epochs",
    "patience",
    "seed",
)


def paired(gaps: Path, nll: Path, nll_all: dict) -> dict:
    """The encoder-proposal NLL against the q*-proposal NLL of ``ppl-vae gaps`` on the same images."""
    with open(gaps / "gaps.csv", newline="") as f:
        g = {int(r["index"]): r for r in csv.DictReader(f)}
    with open(sorted(nll.glob("nll_K*.csv"))[-1], newline="") as f:
        n = {int(r["index"]): r for r in csv.DictReader(f)}
    if not set(g) <= set(n):
        sys.exit(f"{gaps}: images {sorted(set(g) - set(n))[:5]}... are not in {nll}")
    enc = np.array([-float(n[i]["iwae"]) for i in g])
    qs = np.array([-float(g[i]["log_px"]) for i in g])
    d = enc - qs
    m = len(d)
    diff_se = float(d.std(ddof=1) / math.sqrt(m))
    return {
        "num_points": m,
        "encoder_nll": float(enc.mean()),
        "qstar_nll": float(qs.mean()),
        "qstar_nll_se": float(qs.std(ddof=1) / math.sqrt(m)),
        "difference": float(d.mean()),
        "difference_se": diff_se,
        "difference_min": float(d.min()),
        "difference_max": float(d.max()),
        "qstar_khat_above_0.7": int(sum(float(g[i]["log_px_khat"]) > 0.7 for i in g)),
        "encoder_khat_above_0.7": int(sum(float(n[i]["khat"]) > 0.7 for i in g)),
        "qstar_full_converged": int(sum(g[i]["qstar_full_converged"] == "True" for i in g)),
        "estimate": nll_all["nll"] - float(d.mean()),
        "estimate_se": math.hypot(nll_all["nll_se"], diff_se),
    }


def collect(run: Path, nll: Path, gaps: Path | None = None) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    summaries = sorted(nll.glob("nll_K*.json"))
    if not summaries:
        sys.exit(f"{nll}: no finished nll_K*.json (finish it with ppl-vae nll ... --resume)")
    summary = json.loads(summaries[-1].read_text())
    with open(run / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    opts = metrics["options"]
    out = {
        "options": {k: opts.get(k) for k in OPTIONS},
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": metrics["epochs"],
        "stopped_early": metrics.get("stopped_early"),
        "train_wall_s": metrics.get("train_wall_time_s"),
        "test_elbo": metrics["test_elbo"],
        "test_elbo_se": metrics["test_elbo_se"],
        "objective": metrics.get("objective"),
        "nll": {
            k: summary[k]
            for k in (
                "K",
                "num_points",
                "nll",
                "nll_se",
                "neg_elbo",
                "khat_threshold",
                "unreliable",
                "khat_above_0.7",
                "khat_median",
                "wall_time_s",
            )
        },
        "history": {
            "epoch": [int(h["epoch"]) for h in hist],
            "train_elbo": [float(h["train_elbo"]) for h in hist],
            "val_elbo": [float(h["val_elbo"]) if h["val_elbo"] else None for h in hist],
        },
    }
    if gaps is not None:
        out["qstar_proposal"] = paired(gaps, nll, out["nll"])
    return out


def draw(results: dict) -> None:
    plt = load_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(results.items()):
        h = r["history"]
        for ax in axes:
            ax.plot(h["epoch"], h["train_elbo"], ls="--", color=f"C{i}", lw=1)
            ax.plot(h["epoch"], h["val_elbo"], ls="-", color=f"C{i}", lw=1.5, label=name)
            if r["best_epoch"]:
                ax.axvline(r["best_epoch"], color=f"C{i}", lw=0.5, alpha=0.5)
    axes[0].set(
        xlabel="epoch",
        ylabel="nats per image",
        title="training objective (dashed) and validation ELBO (solid)",
    )
    last = [
        v
        for r in results.values()
        for v in r["history"]["val_elbo"][len(r["history"]["val_elbo"]) // 4 :]
        if v is not None
    ]
    axes[1].set(
        xlabel="epoch",
        title="the same, zoomed on the validation curves",
        ylim=(min(last) - 3, max(last) + 6),
    )
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.title.set_fontsize(9)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    io.save_figure(fig, FIGURE, dpi=100)


def rows(results: dict) -> None:
    print(
        "| model | epochs (best) | training wall | test objective | NLL, K = 5000 (± SE) | −ELBO (same draws) | k̂ > 0.7 |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n = r["nll"]
        print(
            f"| {name} | {r['epochs_run']} ({r['best_epoch']}) | {r['train_wall_s'] / 60:.0f} min | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} "
            f"| **{n['nll']:.2f} ± {n['nll_se']:.2f}** | {n['neg_elbo']:.2f} | {n['khat_above_0.7']} of {n['num_points']} (median {n['khat_median']:.2f}) |"
        )
    print(
        "\n| model | NLL, encoder proposal (same images) | NLL, local q* proposal | paired difference | k̂ > 0.7 (q* / encoder) | estimate for all |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        q = r.get("qstar_proposal")
        if q:
            print(
                f"| {name} | {q['encoder_nll']:.2f} | {q['qstar_nll']:.2f} ± {q['qstar_nll_se']:.2f} | {q['difference']:.2f} ± {q['difference_se']:.2f} "
                f"| {q['qstar_khat_above_0.7']} / {q['encoder_khat_above_0.7']} of {q['num_points']} | **{q['estimate']:.2f} ± {q['estimate_se']:.2f}** |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=RUN,NLL[,GAPS]")
    p.add_argument(
        "--redraw",
        action="store_true",
        help="only redraw the figure and the rows from docs/results/nll.json",
    )
    a = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not a.redraw:
        for spec in a.model:
            name, _, dirs = spec.rpartition("=")  # the last "=": a name may hold one
            run, nll, *gaps = dirs.split(",")
            if not (name and run and nll) or len(gaps) > 1:
                sys.exit(f"--model {spec!r}: expected NAME=RUN,NLL[,GAPS]")
            results[name] = collect(Path(run), Path(nll), Path(gaps[0]) if gaps else None)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(RESULTS, results)
    draw(results)
    rows(results)


if __name__ == "__main__":
    main()
