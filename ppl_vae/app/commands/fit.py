"""``ppl-vae fit``: a config -> networks, model and guide (:mod:`..registry`), ``fit``, a run directory.

A run directory holds ``config.json``, ``checkpoint.pt``, ``history.csv``,
``metrics.json`` and the figures; :func:`ppl_vae.app.runs.open_run` rebuilds
a trained model from it.

:func:`run` checks everything before it touches the directory: the options
(:meth:`Config.validate`), the data, and that the networks and one loss
evaluation on a first batch fit in memory. Only then does it take the
directory (:func:`ppl_vae.app.runs.prepare_run_dir`: locked, cleared with
``force``). A new run that fails or is interrupted before its first
checkpoint leaves nothing behind. ``metrics.json`` is written last, so it
exists only for a finished run; a resume removes the old one first.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ... import io
from ...errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    TrainingDiverged,
)
from ...inference.distributed import make_fabric
from ...inference.elbo import elbo_per_datapoint, kl_per_site
from ...inference.random import seeded
from ...inference.svi import CHECKPOINT, check_resume, fit, read_checkpoint
from ..config import LAUNCH, RESUMABLE, Config, option_flag
from ..figures.run import run_figures
from ..registry import (
    build_checked,
    load_splits,
    objective_name,
    split_tensors,
)
from ..runs import (
    CONFIG,
    LOCK,
    METRICS,
    holding,
    output_path,
    prepare_run_dir,
    read_config,
    release_run_dir,
)

__all__ = ["run"]

#: the layer-wise pretraining record of a stacked autoencoder (layer, width, final objective)
PRETRAIN = "pretrain.csv"


def _resumed(cfg: Config, out: Path) -> tuple[Config, dict[str, list[Any]]]:
    """``cfg`` checked against the run's saved config: only :data:`RESUMABLE` options may differ."""
    if not out.is_dir():
        raise CheckpointError(f"cannot resume: run directory {out} does not exist")
    if not (out / CONFIG).is_file():
        raise CheckpointError(f"cannot resume: no {CONFIG} in {out}")
    saved = read_config(out / CONFIG)
    # where and how the run trained: the saved options unless others are given (a change is refused below)
    cfg = dataclasses.replace(
        cfg, **{k: getattr(saved, k) for k in LAUNCH if getattr(cfg, k) is None}
    )
    changed = {
        f.name: [getattr(saved, f.name), getattr(cfg, f.name)]
        for f in dataclasses.fields(Config)
        if f.name != "resumed" and getattr(saved, f.name) != getattr(cfg, f.name)
    }
    # a run saved before its launch options were recorded (None) takes the ones given now: the checkpoint's
    # number of processes is checked against them
    fixed = {
        k: v
        for k, v in changed.items()
        if k not in RESUMABLE and not (k in LAUNCH and v[0] is None)
    }
    if fixed:
        listed = ", ".join(
            f"{option_flag(k)} ({old!r} -> {new!r})" for k, (old, new) in fixed.items()
        )
        raise ConfigError(
            f"--resume cannot change {listed}: they define the run in {out}; only "
            f"{', '.join(map(option_flag, RESUMABLE))} may change (start a new run with --force or another --out)"
        )
    changed = {k: [list(o) if isinstance(o, tuple) else o for o in v] for k, v in changed.items()}
    return dataclasses.replace(cfg, resumed=saved.resumed), changed


def _discard(out: Path, created: bool) -> None:
    """Remove what a new run wrote before its first checkpoint (the folder too, if this run made it); a follower process wrote nothing."""
    if io.is_follower():
        return
    for entry in out.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if created:
        release_run_dir(out)
        try:
            out.rmdir()
        except OSError:  # someone else's files appeared meanwhile: leave the folder
            pass


def run(
    cfg: Config,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    figures: bool = True,
    launch: Mapping[str, Any] | None = None,
    command: str = "fit",
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; write metrics, history, checkpoint, figures.

    With ``resume`` the run in ``out`` continues to ``cfg.epochs`` (the new
    total, at least the epochs done); ``cfg`` may differ from the saved
    config only in :data:`RESUMABLE` options, and ``config.json`` records
    what changed in its ``resumed`` list. A longer run re-plans a learning
    rate schedule for the new total from the epoch reached on.

    ``command`` names the command the run directory is marked with (``"demo"`` for the demo's), so that
    a later ``force`` replaces only a run of the same command (:func:`~ppl_vae.app.runs.prepare_run_dir`).

    Where and how it trains are ``cfg``'s ``accelerator``, ``devices``,
    ``strategy``, ``precision`` and ``num_nodes`` (Lightning Fabric; ``launch``,
    a mapping of them, overrides ``cfg``'s); they are checked, with the batch
    size's split over the processes and a resumed run's number of processes,
    before anything is written, and recorded in ``config.json``, so a resume
    of a run trained on several processes runs on the same ones.

    Raises
    ------
    ConfigError, DataError, CheckpointError, RunDirectoryError
        Before anything is written, except a full disk during training
        (the last checkpoint is kept).
    Interrupted
        On Ctrl-C, saying which checkpoint is kept.
    """
    out = output_path(out)
    if force and resume:
        raise ConfigError(
            "give either --force (start the run afresh) or --resume (continue it), not both"
        )
    changed: dict[str, list[Any]] = {}
    cfg = dataclasses.replace(cfg, **(launch or {}))
    if resume:  # contradictions first: they explain more than a failed check of the combination
        cfg, changed = _resumed(cfg, out)
    cfg = cfg.validate()
    launch = cfg.launch()  # recorded in config.json, so that --resume runs on the same processes
    world = _world_size(cfg, launch)
    with holding():
        try:
            return _run(
                cfg,
                out,
                changed,
                force=force,
                resume=resume,
                progress=progress,
                figures=figures,
                launch=launch,
                world=world,
                command=command,
            )
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            where = (
                f"the run in {out} is unchanged"
                if resume
                else "there is no checkpoint (nothing was written)"
            )
            raise Interrupted(f"interrupted before training; {where}") from None


def _world_size(cfg: Config, launch: dict[str, Any]) -> int:
    """The number of training processes ``launch`` asks for; a :class:`ConfigError` for options Fabric refuses."""
    fabric = make_fabric(
        launch.get("accelerator"),
        launch.get("devices", 1),
        launch.get("strategy", "auto"),
        launch.get("precision"),
        launch.get("num_nodes", 1),
        like=torch.empty(0, device="cpu"),
    )
    if cfg.batch_size % fabric.world_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({fabric.world_size})"
        )
    if cfg.compile and fabric.world_size > 1:
        raise ConfigError(
            f"--compile trains in one process; --devices asks for {fabric.world_size}"
        )
    return fabric.world_size


def _run(
    cfg: Config,
    out: Path,
    changed: dict[str, list[Any]],
    *,
    force: bool,
    resume: bool,
    progress: bool,
    figures: bool,
    launch: dict[str, Any],
    world: int,
    command: str,
) -> dict[str, Any]:
    splits = load_splits(cfg)  # every input check happens before anything is written
    built = build_checked(cfg, splits)
    done: int | None = None
    if resume:  # read the checkpoint before anything is written
        cfg, done = _checked_resume(cfg, out, changed, world)
    created = not out.exists()
    prepare_run_dir(
        out,
        command=command,
        force=force,
        resume=resume,
        inputs=[cfg.data_dir] if cfg.data_dir else [],
    )
    try:
        io.write_json(out / CONFIG, cfg.to_dict())
        if (
            resume and not io.is_follower()
        ):  # it describes the run before this resume; rewritten when this one finishes
            (out / METRICS).unlink(missing_ok=True)
        t0 = time.perf_counter()
        result = _train(cfg, built, splits, out, resume=resume, progress=progress, launch=launch)
        done = result.epochs
        metrics = _metrics(cfg, built, splits, result, t0)
        if figures:
            run_figures(built, splits, result.to_dataframe(), out)
        io.write_json(out / METRICS, metrics)
        return metrics
    except BaseException as exc:
        replacement = _failure(exc, out, resume=resume, created=created, done=done)
        if replacement is not None:
            raise replacement from None
        raise


def _checked_resume(
    cfg: Config, out: Path, changed: dict[str, list[Any]], world: int
) -> tuple[Config, int]:
    """``cfg`` with this resume recorded, and the epochs done: the checkpoint read and checked against ``cfg``."""
    ckpt = read_checkpoint(
        out / CHECKPOINT, options=cfg.fit_options()
    )  # every field checked, and against config.json
    done = ckpt["epoch"]
    check_resume(ckpt, cfg.epochs, cfg.patience, out, prefix="--", world_size=world)
    cfg = dataclasses.replace(cfg, resumed=(*cfg.resumed, {"at_epoch": done, "changed": changed}))
    return cfg, done


def _train(
    cfg: Config,
    built: Any,
    splits: dict[str, Any],
    out: Path,
    *,
    resume: bool,
    progress: bool,
    launch: dict[str, Any],
) -> Any:
    """The pretraining a model has (sdae: greedy layer-wise, written to pretrain.csv), then :func:`fit`."""
    train = split_tensors(cfg, splits["train"])
    if "pretrain" in built.extra and not resume:  # then fit fine-tunes the whole stack
        io.write_csv(out / PRETRAIN, built.extra["pretrain"](train[0], progress=progress))
    return fit(
        built.model,
        built.guide,
        train,
        validation=split_tensors(cfg, splits["valid"]),
        estimator=cfg.estimator,
        num_particles=cfg.num_particles,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_schedule=cfg.lr_schedule,
        patience=cfg.patience,
        beta=cfg.beta,
        kl_warmup=cfg.kl_warmup,
        seed=cfg.seed,
        out=out,
        resume=resume,
        progress=progress,
        compile=cfg.compile,
        **launch,
    )


def _metrics(
    cfg: Config, built: Any, splits: dict[str, Any], result: Any, t0: float
) -> dict[str, Any]:
    """``metrics.json``: the bounds on every split, the training's course, and the model's own measures."""
    test = split_tensors(cfg, splits["test"])
    with seeded(cfg.seed):
        test_elbo = elbo_per_datapoint(built.model, built.guide, *test).value
    metrics: dict[str, Any] = {
        "objective": objective_name(cfg),
        "units": "nats per datapoint",
        "train_elbo": result.train_elbo,
        "val_elbo": result.val_elbo,
        "test_elbo": test_elbo.mean().item(),
        "test_elbo_se": (test_elbo.std() / math.sqrt(len(test_elbo))).item(),
        "epochs": result.epochs,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_epoch": result.best_epoch,
        "train_wall_time_s": result.wall_time,
        "wall_time_s": time.perf_counter() - t0,
        "num_train": len(splits["train"]),
        "num_test": len(splits["test"]),
        "options": cfg.to_dict(),
    }
    if built.exact is not None:
        metrics["test_log_px_exact"] = built.exact.log_marginal(test[0]).mean().item()
    if (
        cfg.spec.latents != "point"
    ):  # the ELBO's KL term of each latent site (per layer of a hierarchy), nats per datapoint
        metrics["test_kl_per_site"] = mean_kl_per_site(built, test, seed=cfg.seed)
    return metrics


def _failure(
    exc: BaseException, out: Path, *, resume: bool, created: bool, done: int | None
) -> BaseException | None:
    """What a failed run raises instead of ``exc`` (None: ``exc`` itself); a new run with no checkpoint is removed first."""
    discarded = not resume and not (out / CHECKPOINT).exists()
    if discarded:
        _discard(out, created)
    if isinstance(exc, Interrupted):
        return Interrupted(
            str(exc) + (f" (the unfinished new run in {out} was removed)" if discarded else ""),
            epoch=exc.epoch,
        )
    if isinstance(exc, KeyboardInterrupt):
        where = (
            f"the last checkpoint is epoch {done} (in {out}); {METRICS} was not written"
            if done
            else "there is no checkpoint"
        )
        return Interrupted(f"interrupted; {where}", epoch=done)
    if isinstance(exc, TrainingDiverged) and discarded:
        return TrainingDiverged(
            f"{exc} (no epoch finished: the new run in {out} was removed)",
            step=exc.step,
            site=exc.site,
        )
    return None


def mean_kl_per_site(
    built: Any,
    test: tuple[torch.Tensor, ...],
    *,
    seed: int,
    num_samples: int = 10,
    batch_size: int = 1000,
) -> dict[str, float]:
    """The mean over the test rows of each latent site's KL term (:func:`~ppl_vae.inference.elbo.kl_per_site`), in batches."""
    sums: dict[str, float] = {}
    n = test[0].shape[0]
    for i in range(0, n, batch_size):
        part = kl_per_site(
            built.model,
            built.guide,
            *(t[i : i + batch_size] for t in test),
            num_samples=num_samples,
            seed=seed + i,
        )
        for name, est in part.items():
            sums[name] = sums.get(name, 0.0) + float(est.value.sum())
    return {name: total / n for name, total in sums.items()}


def command(args: argparse.Namespace) -> int:

    given = {
        k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None
    }
    if given.get("layers") and "latent_dim" not in given:  # the last layer is the code
        given["latent_dim"] = given["layers"][-1]
    if (
        args.resume
    ):  # where and how the run trained (--devices, --strategy, ...) come from its config.json too
        if args.force:
            raise ConfigError(
                "give either --force (start the run afresh) or --resume (continue it), not both"
            )
        path = Path(args.out) / CONFIG
        if not path.is_file():
            raise ConfigError(f"cannot resume: no {CONFIG} in {args.out}")
        cfg = dataclasses.replace(
            read_config(path), **given
        )  # run() refuses what contradicts the run
    else:
        cfg = Config(**given)
    metrics = run(
        cfg, args.out, force=args.force, resume=args.resume, progress=not args.no_progress
    )
    report(metrics, args.out)
    return 0


def report(metrics: dict, out: str) -> None:
    print(
        f"{metrics['objective']}: train {metrics['train_elbo']:.2f}, valid {metrics['val_elbo']:.2f}, "
        f"test {metrics['test_elbo']:.2f} ± {metrics['test_elbo_se']:.2f} nats/datapoint "
        f"({metrics['epochs']} epochs, {metrics['wall_time_s']:.1f} s)"
    )
    if "test_log_px_exact" in metrics:
        print(f"exact test log p(x): {metrics['test_log_px_exact']:.2f}")
    if len(metrics.get("test_kl_per_site", {})) > 1:
        print(
            "KL per latent site (test, nats/datapoint): "
            + ", ".join(f"{k} {v:.2f}" for k, v in metrics["test_kl_per_site"].items())
        )
    print(
        f"wrote {out}/: metrics.json history.csv checkpoint.pt reconstructions.png prior_samples.png elbo.png latent.png"
    )
