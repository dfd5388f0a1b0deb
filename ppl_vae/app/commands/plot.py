"""``ppl-vae plot``: latent-space pictures of trained runs, one PNG."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ... import io
from ...errors import ConfigError, check_seed
from ...inference.random import pick
from ..figures.latent import (
    KINDS,
    ae_vs_vae,
    interpolation,
    latent_sweep,
    manifold,
    traversal,
    tsne,
)
from ..figures.run import load_pyplot
from ..runs import CONFIG, METRICS, open_run, output_path, read_config

__all__ = ["plot_runs"]


def _is_png(path: Path) -> bool:
    """Whether the file at ``path`` starts with the PNG signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def plot_runs(
    runs: Sequence[str | Path],
    kind: str,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Draw picture ``kind`` of the run directories ``runs``; write a PNG (``RUN/<kind>.png`` by default).

    ``ae-vs-vae`` takes two runs (an ``ae``/``dae``/``sparse-ae`` and a VAE), ``latent-sweep`` two or more,
    the others one.

    Raises
    ------
    ConfigError
        Unknown kind, wrong number or kind of runs, an existing PNG without ``force``.
    CheckpointError
        A run directory without a usable config or checkpoint.
    """

    if kind not in KINDS:
        raise ConfigError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")
    want = {"ae-vs-vae": "exactly 2", "latent-sweep": "at least 2"}.get(kind, "exactly 1")
    n = len(runs)
    if (
        (want == "exactly 2" and n != 2)
        or (want == "at least 2" and n < 2)
        or (want == "exactly 1" and n != 1)
    ):
        raise ConfigError(f"plot --kind {kind} takes {want} --run, got {n}")
    check_seed(seed, "--seed")
    path = output_path(out) if out is not None else Path(runs[0]) / f"{kind}.png"
    if path.is_dir():
        raise ConfigError(f"output {path} is a directory; give the path of a .png file")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"output {path} must be a .png file")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")
    if path.exists() and not _is_png(
        path
    ):  # --force replaces a picture, never a file of another kind named .png
        raise ConfigError(
            f"{path} is not a PNG image; --force replaces only a picture, so it was kept: choose another --out"
        )
    if (
        n > 1
    ):  # the same test images go through every run: refuse runs of different data before any work
        data = {}
        for r in runs:
            if (Path(r) / CONFIG).is_file():
                cfg = read_config(Path(r) / CONFIG)
                data[str(r)] = (cfg.dataset, cfg.binarize)
        if len(set(data.values())) > 1:
            listed = ", ".join(f"{r}: {d}{f' ({b})' if b else ''}" for r, (d, b) in data.items())
            raise ConfigError(f"plot --kind {kind} needs runs on the same dataset, got {listed}")
    loaded = [open_run(r) for r in runs]
    if any(b.conditional for b, _ in loaded):
        raise ConfigError(
            "latent-space pictures need unconditional runs; a cvae's encoder needs labels"
        )
    built, splits = loaded[0]
    test = splits["test"]
    order = pick(len(test), seed=seed)
    x, y = test.x[order], (test.y[order] if test.y is not None else None)
    m = min(len(x), 1000)
    shape = test.image_shape
    if kind == "manifold":
        fig = manifold(built, shape)
    elif kind == "interpolation":
        fig = interpolation(built, x, shape, seed=seed)
    elif kind == "tsne":
        fig = tsne(built, x[:m], y[:m] if y is not None else None, seed=seed)
    elif kind == "traversal":
        fig = traversal(built, x, shape)
    elif kind == "ae-vs-vae":
        kinds = [b.config.spec.latents == "point" for b, _ in loaded]
        if sum(kinds) != 1 or not all(b.config.spec.standard_prior for b, _ in loaded):
            raise ConfigError(
                "ae-vs-vae needs one autoencoder run (a point-mass encoder with an N(0, I) prior: ae, dae) and one VAE run"
            )
        ae, vae = (loaded[0][0], loaded[1][0]) if kinds[0] else (loaded[1][0], loaded[0][0])
        fig = ae_vs_vae(ae, vae, x[:m], y[:m] if y is not None else None, shape, seed=seed)
    else:
        metrics = []
        for r in runs:
            try:
                metrics.append(json.loads((Path(r) / METRICS).read_text()))
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{r} has no readable {METRICS} ({type(exc).__name__})") from None
        fig = latent_sweep([(b, mt) for (b, _), mt in zip(loaded, metrics)], x[:10], shape)
    saved = io.save_figure(fig, path, dpi=110)
    load_pyplot().close(fig)
    return saved


def command(args: argparse.Namespace) -> int:

    path = plot_runs(args.run, args.kind, out=args.out, seed=args.seed, force=args.force)
    print(f"wrote {path}")
    return 0
