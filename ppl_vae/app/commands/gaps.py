"""``ppl-vae gaps``: the gap decomposition of one or more trained runs, written to a folder.

Every input is checked (runs, split, number of points, options) before the
output folder is created; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ... import io
from ...data import check_split
from ...errors import ConfigError, check_int, check_seed
from ...inference.distributed import Spread
from ...inference.gaps.ais import check_options as check_ais_options
from ...inference.gaps.bounds import MAX_SAMPLES
from ...inference.gaps.decompose import (
    GAPS_CSV,
    GAPS_JSON,
    GapReport,
    check_decomposable,
    check_defensive,
    decompose,
)
from ...inference.gaps.local import check_options as check_local_options
from ...inference.random import pick
from ..figures.gaps import gap_figure
from ..runs import open_run, prepare_run_dir, releasing

__all__ = ["gaps_run", "merge_gaps", "load_reports", "table_markdown", "GAPS_PNG", "TABLE_MD"]

GAPS_PNG, TABLE_MD = "gaps.png", "table.md"


def table_markdown(reports: Sequence[GapReport]) -> str:
    """Cremer et al.'s Table 2 layout: rows are bounds and gaps, columns are models (mean ± SE, nats)."""
    families = list(dict.fromkeys(f for r in reports for f in r.elbo_local))
    rows = (
        [("log p̂(x)", "log_px")]
        + [(f"L[q*] ({f})", f"elbo_qstar_{f}") for f in families]
        + [("L[q]", "elbo_q")]
    )
    rows += [
        ("approximation gap", "approximation_gap"),
        ("amortisation gap", "amortisation_gap"),
        ("inference gap", "inference_gap"),
    ]
    sums = [r.summary() for r in reports]
    head = [
        f"{r.name} (gaps with q* {r.family}{', the guide' + chr(39) + 's family' if r.q_in_family else '; q is not in this family'})"
        for r in reports
    ]
    lines = ["| nats per datapoint | " + " | ".join(head) + " |", "|---|" + "---|" * len(reports)]
    for label, key in rows:
        cells = [f"{s[key]:.2f} ± {s[key + '_se']:.2f}" if key in s else "" for s in sums]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    flags = [("log p̂(x) unreliable (k̂ above its bound)", "log_px_unreliable")]
    flags += [(f"q* ({f}) did not converge", f"qstar_{f}_unconverged") for f in families]
    flags += [
        (f"q* ({f}) starts at different optima", f"qstar_{f}_several_optima") for f in families
    ]
    for label, key in flags:
        counts = [s["flags"].get(key) for s in sums]
        if any(c is not None for c in counts):
            lines.append(
                f"| datapoints: {label} | "
                + " | ".join(
                    "" if c is None else f"{c} of {s['num_points']}" for c, s in zip(counts, sums)
                )
                + " |"
            )
    est = "; ".join(f"{r.name}: {r.logpx_estimator}" for r in reports)
    lines.append("")
    lines.append(
        f"{len(reports[0].index)} datapoints; ELBOs from {reports[0].num_samples} draws each (the IWAE proposal's from K); log p̂(x): {est}. ± is the standard error of the mean over datapoints."
    )
    lines += ["", *(r.verdict() for r in reports)]
    return "\n".join(lines) + "\n"


def _points(n_split: int, num_points: int, seed: int) -> torch.Tensor:
    check_int(num_points, "--num-points")
    if num_points > n_split:
        raise ConfigError(f"--num-points {num_points} is more than the split has ({n_split})")
    return pick(n_split, num_points, seed=seed, sorted=True)


@releasing
def gaps_run(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "test",
    num_points: int = 100,
    logpx: str = "iwae",
    num_samples: int = 5000,
    elbo_samples: int = 1000,
    families: Sequence[str] | None = None,
    unreliable: str = "flag",
    defensive: tuple[float, float] = (0.1, 0.1),
    local_options: dict[str, Any] | None = None,
    ais_options: dict[str, Any] | None = None,
    seed: int = 0,
    force: bool = False,
    figures: bool = True,
    spread: Spread | None = None,
    progress: bool = False,
) -> list[GapReport]:
    """Decompose the gaps of each run on the same ``num_points`` random rows of ``split``; write CSV, JSON, table, figure.

    ``spread`` spreads the datapoints over devices and processes (the table is the same, to float rounding).
    """

    _check_choices(split=split, logpx=logpx, unreliable=unreliable)
    defensive = check_defensive(defensive)
    check_int(num_samples, "--K", high=MAX_SAMPLES)
    check_seed(seed, "--seed")
    if not runs:
        raise ConfigError("give at least one --run")
    loaded = [open_run(r) for r in runs]  # every run is checked before anything is written
    names = [Path(r).name or str(r) for r in runs]
    if len(set(names)) != len(names):  # the same folder name twice: number them
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    if local_options:
        check_local_options(**local_options)
    if ais_options:
        check_ais_options(**ais_options)
    _refuse_undecomposable(loaded, runs, split, tuple(families or ()))
    sizes = {len(s[split]) for _, s in loaded}
    idx = _points(min(sizes), num_points, seed)
    if spread is not None:
        spread.check(len(idx), loaded[0][1][split].tensors()[0])
    out = prepare_run_dir(out, command="gaps", force=force, inputs=runs)
    reports = []
    for (built, splits), name in zip(loaded, names):
        data = tuple(t[idx] for t in splits[split].tensors(with_labels=built.conditional))
        reports.append(
            decompose(
                built.model,
                built.guide,
                *data,
                logpx=logpx,
                num_samples=num_samples,
                elbo_samples=elbo_samples,
                families=tuple(families or ()),
                unreliable=unreliable,
                defensive=defensive,
                local_options=local_options,
                ais_options=ais_options,
                index=idx,
                name=name,
                seed=seed,
                spread=spread,
                progress=progress,
                warn=False,
            )  # the verdicts in the table carry the warnings
        )
    rows = [dict(run=r.name, **row) for r in reports for row in r.to_dataframe().to_dict("records")]
    io.write_csv(out / GAPS_CSV, rows)
    io.write_json(
        out / GAPS_JSON,
        {
            "split": split,
            "runs": [str(r) for r in runs],
            "summaries": [r.summary() for r in reports],
            "options": {
                "num_points": num_points,
                "logpx": logpx,
                "K": num_samples,
                "elbo_samples": elbo_samples,
                "families": list(families or ()),
                "unreliable": unreliable,
                "defensive": list(defensive),
                "local": local_options or {},
                "ais": ais_options or {},
                "seed": seed,
            },
        },
    )
    io.write_text(out / TABLE_MD, table_markdown(reports))
    if figures:
        _figure(reports, out)
    return reports


def _check_choices(*, split: str, logpx: str, unreliable: str) -> None:
    check_split(split)
    if logpx not in ("iwae", "ais"):
        raise ConfigError(f"unknown --logpx {logpx!r}; choose iwae or ais")
    if unreliable not in ("flag", "ais"):
        raise ConfigError(f"unknown --unreliable {unreliable!r}; choose flag or ais")


def _refuse_undecomposable(
    loaded: Sequence[tuple[Any, Any]],
    runs: Sequence[str | Path],
    split: str,
    families: tuple[str, ...],
) -> None:
    """Refuse what decompose cannot handle, naming the run and the site, before any work (on two datapoints)."""
    for (built, splits), r in zip(loaded, runs):
        probe = tuple(t[:2] for t in splits[split].tensors(with_labels=built.conditional))
        try:
            check_decomposable(built.model, built.guide, *probe, families=families)
        except ConfigError as exc:
            raise ConfigError(f"{r} ({built.config.model}): {exc}") from None


def load_reports(folder: str | Path) -> list[GapReport]:
    """The :class:`GapReport` objects a ``ppl-vae gaps`` output folder holds (from its CSV and JSON)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / GAPS_JSON).read_text())
        df = pd.read_csv(folder / GAPS_CSV)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} is not a ppl-vae gaps folder ({type(exc).__name__})") from None
    reports = []
    for summary in meta["summaries"]:
        rows = df[df["run"] == summary["name"]]

        def col(c: str, rows: pd.DataFrame = rows) -> torch.Tensor:
            return torch.tensor(rows[c].to_numpy(), dtype=torch.float64)

        fams = [
            c[len("elbo_qstar_") :]
            for c in rows.columns
            if c.startswith("elbo_qstar_") and not c.endswith("_se") and rows[c].notna().all()
        ]
        conv = [
            f
            for f in fams
            if f"qstar_{f}_converged" in rows.columns and rows[f"qstar_{f}_converged"].notna().all()
        ]

        def opt(
            c: str, dtype: torch.dtype = torch.float64, rows: pd.DataFrame = rows
        ) -> torch.Tensor | None:
            return (
                torch.tensor(rows[c].to_numpy().astype(float), dtype=torch.float64).to(dtype)
                if c in rows.columns and rows[c].notna().all()
                else None
            )

        reports.append(
            GapReport(
                index=torch.tensor(rows["index"].to_numpy()),
                log_px=col("log_px"),
                log_px_se=col("log_px_se"),
                elbo_q=col("elbo_q"),
                elbo_q_se=col("elbo_q_se"),
                elbo_local={f: col(f"elbo_qstar_{f}") for f in fams},
                elbo_local_se={f: col(f"elbo_qstar_{f}_se") for f in fams},
                family=summary["qstar_family"],
                logpx_estimator=summary["logpx_estimator"],
                num_samples=summary["num_samples"],
                local_steps=summary["local_steps_mean"],
                name=summary["name"],
                q_in_family=summary.get("q_in_family", True),
                log_px_khat=opt("log_px_khat"),
                log_px_unreliable=opt("log_px_unreliable", torch.bool),
                log_px_ais=opt("log_px_ais", torch.bool),
                qstar_converged={f: opt(f"qstar_{f}_converged", torch.bool) for f in conv},
                qstar_change={f: opt(f"qstar_{f}_change") for f in conv},
                qstar_change_se={
                    f: v for f in conv if (v := opt(f"qstar_{f}_change_se")) is not None
                },
                qstar_optima={
                    f: v for f in conv if (v := opt(f"qstar_{f}_optima", torch.long)) is not None
                },
            )
        )
    return reports


@releasing
def merge_gaps(
    folders: Sequence[str | Path], out: str | Path, *, force: bool = False
) -> list[GapReport]:
    """One table and figure from several ``ppl-vae gaps`` folders (e.g. runs analysed in parallel)."""
    reports = [r for f in folders for r in load_reports(f)]
    out = prepare_run_dir(out, command="gaps", force=force, inputs=folders)
    rows = [dict(run=r.name, **row) for r in reports for row in r.to_dataframe().to_dict("records")]
    io.write_csv(out / GAPS_CSV, rows)
    io.write_json(
        out / GAPS_JSON,
        {"merged_from": [str(f) for f in folders], "summaries": [r.summary() for r in reports]},
    )
    io.write_text(out / TABLE_MD, table_markdown(reports))
    _figure(reports, out)
    return reports


def _figure(reports: Sequence[GapReport], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig = gap_figure(reports)
    io.save_figure(fig, out / GAPS_PNG, dpi=120)
    plt.close(fig)


def _positive(**options: float) -> None:
    """One line for an option that must be a positive finite number."""
    for name, value in options.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a positive finite number, got {value}"
            )


def command(args: argparse.Namespace) -> int:

    if args.merge and args.run:
        raise ConfigError(
            "give either --run (analyse runs) or --merge (combine gaps folders), not both"
        )
    _positive(local_lr=args.local_lr)  # the counts are checked by gaps_run, before any work
    try:
        defensive = tuple(float(w) for w in args.defensive.split(","))
    except ValueError:
        raise ConfigError(
            f"--defensive must be two weights W,P (widened q*, prior), got {args.defensive!r}"
        ) from None
    check_defensive(defensive)
    for folder in args.merge:
        try:
            meta = json.loads((Path(folder) / GAPS_JSON).read_text())
            ok = (
                (Path(folder) / GAPS_CSV).is_file()
                and isinstance(meta, dict)
                and isinstance(meta.get("summaries"), list)
                and meta["summaries"]
            )
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"--merge {folder} is not the output of ppl-vae gaps (no readable {GAPS_JSON} with summaries and {GAPS_CSV})"
            )
    if args.merge:
        reports = merge_gaps(args.merge, args.out, force=args.force)
        print(table_markdown(reports), end="")
        print(f"wrote {args.out}/: gaps.csv gaps.json table.md gaps.png")
        return 0
    families = [f for f in args.families.split(",") if f.strip()]
    reports = gaps_run(
        args.run,
        args.out,
        split=args.split,
        num_points=args.num_points,
        logpx=args.logpx,
        num_samples=args.K,
        elbo_samples=args.elbo_samples,
        families=families,
        unreliable=args.unreliable,
        defensive=defensive,  # type: ignore[arg-type]
        local_options={
            "max_steps": args.local_steps,
            "lr": args.local_lr,
            "starts": args.local_starts,
        },
        ais_options={"num_steps": args.ais_steps, "num_chains": args.ais_chains},
        seed=args.seed,
        force=args.force,
        spread=Spread.given(args.accelerator, args.devices, args.strategy, args.num_nodes),
        progress=not args.no_progress,
    )
    print(table_markdown(reports), end="")
    print(f"wrote {args.out}/: gaps.csv gaps.json table.md gaps.png")
    return 0
