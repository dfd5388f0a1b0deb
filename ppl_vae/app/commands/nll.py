"""``ppl-vae nll``: the test negative log-likelihood of a trained run, -log p̂(x) by IWAE with K draws, resumable.

A long computation (K = 5000 over 10,000 test images) is done in blocks of
datapoints; after each block the rows done so far are saved atomically to
``nll_K{K}.partial.pt`` in the output folder, so ``--resume`` continues where
an interrupted run stopped. Every datapoint's draws come from its own streams
(seed, dataset index), so a resumed computation gives the numbers an
uninterrupted one gives. The result: ``nll_K{K}.csv`` (one row per image:
dataset index, IWAE bound, its delta-method SE, the ELBO of the same draws,
the PSIS Pareto k̂ of its importance weights and whether the estimate is
reliable by it, :func:`~ppl_vae.inference.gaps.bounds.khat_threshold`) and
``nll_K{K}.json`` (the mean with the standard error over images, and how many
images have an unreliable estimate: their -log p̂ is, if anything, too high).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ... import io
from ...data import check_split
from ...errors import CheckpointError, ConfigError, check_int, check_seed
from ...inference.gaps.bounds import MAX_SAMPLES, importance_bounds, khat_threshold
from ...progress import bar
from ..runs import open_run, output_path, prepare_run_dir, releasing

__all__ = ["nll_run", "command"]


COLUMNS = ("index", "iwae", "iwae_se", "elbo", "khat")


def _check_progress(saved: dict[str, Any], n: int, path: Path) -> dict[str, torch.Tensor]:
    """The rows done of a saved progress file, each column checked; a :class:`CheckpointError` naming what is damaged.

    Rows are done in order: the indices are ``0..L-1`` with ``L`` at most ``n``; every bound is finite, each IWAE bound at least the ELBO of the same draws
    (log-mean-exp is at least the mean), the standard errors finite and non-negative, and k̂ a floating
    point number (infinite or NaN where too few draws fit no tail).
    """
    saved = dict(saved)
    if "khat" not in saved and isinstance(
        saved.get("iwae"), torch.Tensor
    ):  # a computation begun before k-hat was kept
        saved["khat"] = torch.full_like(saved["iwae"], math.nan)

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is damaged ({what}); remove it and start again with --force"
        )

    for key in COLUMNS:
        t = saved.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise damaged(f"no column {key} of one value per image")
    length = saved["index"].numel()
    if any(saved[k].numel() != length for k in COLUMNS):
        raise damaged(
            f"its columns have different lengths ({', '.join(f'{k} {saved[k].numel()}' for k in COLUMNS)})"
        )
    if length > n:
        raise damaged(f"{length} rows done of {n} images")
    if saved["index"].is_floating_point() or not torch.equal(
        saved["index"].cpu(), torch.arange(length)
    ):
        raise damaged(f"its indices are not the images 0..{length - 1} in order")
    for key in ("iwae", "elbo", "iwae_se"):
        if not saved[key].is_floating_point() or not bool(torch.isfinite(saved[key]).all()):
            raise damaged(f"column {key} holds a value that is not a finite number")
    if bool((saved["iwae_se"] < 0).any()):
        raise damaged("a negative standard error")
    slack = 1e-6 * (1 + saved["elbo"].abs())
    if bool((saved["iwae"] < saved["elbo"] - slack).any()):
        raise damaged("an IWAE bound below the ELBO of its own draws")
    if not saved["khat"].is_floating_point():
        raise damaged("column khat does not hold numbers")
    return {k: saved[k] for k in COLUMNS}


def _names(K: int) -> tuple[str, str, str]:
    return f"nll_K{K}.csv", f"nll_K{K}.json", f"nll_K{K}.partial.pt"


@releasing
def nll_run(
    run: str | Path,
    out: str | Path,
    *,
    K: int = 5000,
    split: str = "test",
    limit: int | None = None,
    block: int = 500,
    batch_size: int = 100,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """-log p̂(x) of the first ``limit`` rows (default all) of ``split`` for the run in ``run``; results written into ``out``.

    Refuses, before any work, a model without a density to estimate (a point-mass encoder: an autoencoder's
    objective is not a likelihood).
    """
    _check_options(K=K, seed=seed, block=block, batch_size=batch_size, split=split)
    if resume and force:
        raise ConfigError("give either --force (start afresh) or --resume (continue), not both")
    built, splits = open_run(run)
    if built.config.spec.latents == "point":
        raise ConfigError(
            f"{run} ({built.config.model}) has a point-mass encoder: its objective is not a likelihood, so there is no NLL to estimate"
        )
    data = splits[split].tensors(with_labels=built.conditional)
    n = data[0].shape[0] if limit is None else min(check_int(limit, "--limit"), data[0].shape[0])
    csv_name, json_name, partial_name = _names(K)
    out = output_path(out)
    partial_path = out / partial_name
    options = {"run": str(run), "split": split, "K": K, "num_points": n, "seed": seed}
    done: dict[str, torch.Tensor] = {}
    if resume:
        done = _resumed(partial_path, options, out)
        out = prepare_run_dir(out, command="nll", resume=True, inputs=[run])
    else:
        out = prepare_run_dir(out, command="nll", force=force, inputs=[run])
    t0 = time.perf_counter()
    blocks = _Blocks(built, data, options, partial_path)
    result = blocks.estimate(done, block=block, batch_size=batch_size, progress=progress)
    reliable = result["khat"] <= khat_threshold(K)
    summary = _summary(options, result, reliable, built.config.model, time.perf_counter() - t0)
    _write(out / csv_name, result, reliable)
    io.write_json(out / json_name, summary)
    partial_path.unlink(missing_ok=True)
    return summary


def _check_options(*, K: int, seed: int, block: int, batch_size: int, split: str) -> None:
    check_int(K, "--K", low=2, high=MAX_SAMPLES)
    check_seed(seed, "--seed")
    check_int(block, "--block")
    check_int(batch_size, "--batch-size")
    check_split(split)


def _resumed(partial_path: Path, options: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    """The columns an unfinished computation of the same ``options`` saved in ``partial_path``, checked."""
    if not partial_path.is_file():
        raise CheckpointError(f"cannot resume: no {partial_path.name} in {out}")
    saved = io.load_torch(partial_path)  # weights_only: tensors and plain containers only
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        raise CheckpointError(f"{partial_path} is damaged (not the progress of an NLL computation)")
    if saved["options"] != options:
        raise ConfigError(
            f"--resume must repeat the options of the unfinished computation in {out}: {saved.get('options')}"
        )
    return _check_progress(saved, options["num_points"], partial_path)


@dataclass
class _Blocks:
    """The IWAE bounds of ``options["num_points"]`` images, block by block, each block saved to ``partial_path``."""

    built: Any
    data: tuple[torch.Tensor, ...]
    options: dict[str, Any]
    partial_path: Path

    def estimate(
        self, done: dict[str, torch.Tensor], *, block: int, batch_size: int, progress: bool
    ) -> dict[str, torch.Tensor]:
        """Every column, continuing after the rows of ``done``."""
        n, K = self.options["num_points"], self.options["K"]
        start = int(done["index"].numel()) if done else 0
        parts = {k: [done[k]] if done else [] for k in COLUMNS}
        with bar(total=n, desc=f"NLL K={K}", unit="image", enabled=progress) as shown:
            shown.update(start)
            for i in range(start, n, block):
                rows = torch.arange(i, min(i + block, n))
                for k, v in self._block(rows, batch_size).items():
                    parts[k].append(v.detach().cpu())
                io.save_torch(
                    self.partial_path,
                    {"options": self.options, **{k: torch.cat(v) for k, v in parts.items()}},
                )
                shown.update(len(rows))
        return {k: torch.cat(v) for k, v in parts.items()}

    def _block(self, rows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        b = importance_bounds(
            self.built.model,
            self.built.guide,
            *(t[rows] for t in self.data),
            num_samples=self.options["K"],
            batch_size=batch_size,
            seed=self.options["seed"],
            index=rows,
        )
        return {"index": rows, "iwae": b.iwae, "iwae_se": b.iwae_se, "elbo": b.elbo, "khat": b.khat}


def _summary(
    options: dict[str, Any],
    result: dict[str, torch.Tensor],
    reliable: torch.Tensor,
    model: str,
    wall_time: float,
) -> dict[str, Any]:
    """``nll_K{K}.json``: the mean NLL over images with its standard error, the mean -ELBO, how many are unreliable."""
    n, K = options["num_points"], options["K"]
    nll = -result["iwae"].double()
    return {
        **options,
        "units": "nats per datapoint",
        "nll": float(nll.mean()),
        "nll_se": float(nll.std() / math.sqrt(n)) if n > 1 else None,
        "mean_iwae_se": float(result["iwae_se"].mean()),
        "neg_elbo": float(-result["elbo"].double().mean()),
        "khat_threshold": khat_threshold(K),
        "unreliable": int((~reliable).sum()),
        "khat_above_0.7": int((result["khat"] > 0.7).sum()),
        "khat_median": float(result["khat"].nanmedian()),
        "model": model,
        "wall_time_s": wall_time,
    }


def _write(path: Path, result: dict[str, torch.Tensor], reliable: torch.Tensor) -> None:
    """``nll_K{K}.csv``: one row per image, its bounds, k-hat and whether its estimate is reliable."""
    io.write_csv(
        path,
        [
            {
                "index": int(j),
                "iwae": float(a),
                "iwae_se": float(s),
                "elbo": float(e),
                "khat": float(k),
                "reliable": bool(r),
            }
            for j, a, s, e, k, r in zip(
                result["index"],
                result["iwae"],
                result["iwae_se"],
                result["elbo"],
                result["khat"],
                reliable,
            )
        ],
    )


def command(args: argparse.Namespace) -> int:
    s = nll_run(
        args.run,
        args.out,
        K=args.K,
        split=args.split,
        limit=args.limit,
        block=args.block,
        batch_size=args.batch_size,
        seed=args.seed,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
    )
    se = f" ± {s['nll_se']:.2f}" if s["nll_se"] is not None else ""
    print(
        f"{s['model']}: -log p(x) = {s['nll']:.2f}{se} nats per image (IWAE K={s['K']}, {s['num_points']} {s['split']} images; "
        f"mean per-image delta-method SE {s['mean_iwae_se']:.3f}); -ELBO {s['neg_elbo']:.2f}"
    )
    if s["unreliable"]:
        print(
            f"{s['unreliable']} of {s['num_points']} images have importance weights with a Pareto k-hat above {s['khat_threshold']:.2f} "
            f"(median {s['khat_median']:.2f}): their log p(x) estimate is unreliable and likely too low, the NLL too high (the khat column says which)"
        )
    print(f"wrote {args.out}/: {', '.join(_names(s['K'])[:2])}")
    return 0
