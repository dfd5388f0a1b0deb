"""A ``fit`` checkpoint: what it holds, the checks of every field when it is read back, and what a resume may change.

A checkpoint holds only tensors and plain containers (parameters, optimiser and schedule state, each
process's torch RNG state, the estimator's running statistics, history and counters), so it is read
back with ``torch.load(..., weights_only=True)`` and never executes code. :func:`check_checkpoint`
refuses, naming the field, one whose fields disagree with each other or with the run's config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import (
    CheckpointError,
    ConfigError,
    check_finite,
    check_int,
    check_positive,
)

CHECKPOINT = "checkpoint.pt"


HISTORY = "history.csv"


def per_process(saved: Any) -> list[Any]:
    """A checkpoint's per-process list (one process wrote a single value before the Fabric loop)."""
    return list(saved) if isinstance(saved, list) else [saved]


#: the checkpoint's ``options`` a resumed run must repeat, with their checks (``epochs`` and ``patience`` may change)
_OPTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "estimator": lambda v, n: (
        v if isinstance(v, str) and v else _bad(n, "must be an estimator's name", v)
    ),
    "num_particles": lambda v, n: check_int(v, n, error=CheckpointError),
    "epochs": lambda v, n: check_int(v, n, error=CheckpointError),
    "batch_size": lambda v, n: check_int(v, n, error=CheckpointError),
    "lr": lambda v, n: check_positive(v, n, error=CheckpointError),
    "beta": lambda v, n: check_positive(v, n, error=CheckpointError),
    "kl_warmup": lambda v, n: check_int(v, n, low=0, error=CheckpointError),
    "seed": lambda v, n: check_int(v, n, low=0, high=2**32 - 1, error=CheckpointError),
    "patience": lambda v, n: v if v is None else check_int(v, n, error=CheckpointError),
    "lr_schedule": lambda v, n: (
        v if v is None or isinstance(v, str) else _bad(n, "must be a schedule's name or null", v)
    ),
}


def _bad(name: str, what: str, value: Any) -> Any:
    shown = (
        repr(value)
        if not isinstance(value, (list, dict, torch.Tensor))
        else f"a {type(value).__name__}"
    )
    raise CheckpointError(f"{name} {what}, got {shown}")


def _check_tensors(value: Any, name: str, like: Sequence[torch.Tensor] | None = None) -> None:
    """``value`` is a list of tensors (of ``like``'s shapes, where given); else a :class:`CheckpointError` naming ``name``."""
    if not (isinstance(value, list) and all(isinstance(t, torch.Tensor) for t in value)):
        _bad(name, "must be a list of tensors", value)
    if like is not None and [tuple(t.shape) for t in value] != [tuple(t.shape) for t in like]:
        _bad(name, "must have the shapes of params", [tuple(t.shape) for t in value])


def _check_history(history: Any, name: str = "history") -> list[dict[str, Any]]:
    """A training history: a list of dicts, row ``i`` of epoch ``i + 1``, increasing steps, finite ELBOs; else a :class:`CheckpointError` naming the field."""
    if not isinstance(history, (list, tuple)):
        _bad(name, "must be a list of per-epoch records", history)
    step = 0
    for i, row in enumerate(history):
        at = f"{name}[{i}]"
        if not isinstance(row, dict):
            _bad(at, "must be a record of one epoch (a dict)", row)
        for key in ("epoch", "step", "train_elbo"):
            if key not in row:
                raise CheckpointError(f"{at} has no {key}")
        if check_int(row["epoch"], f"{at}.epoch", error=CheckpointError) != i + 1:
            _bad(f"{at}.epoch", f"must be {i + 1} (its place in the history)", row["epoch"])
        step = check_int(row["step"], f"{at}.step", low=step + 1, error=CheckpointError)
        check_finite(row["train_elbo"], f"{at}.train_elbo", error=CheckpointError)
        for key, low in (("val_elbo", None), ("lr", 0.0), ("wall_time", 0.0)):
            if key in row:
                check_finite(row[key], f"{at}.{key}", low=low, error=CheckpointError)
    return list(history)


def check_checkpoint(
    ckpt: dict[str, Any], path: str | Path, *, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``ckpt`` (a ``fit`` checkpoint, its parameters checked by :func:`~ppl_vae.io.load_checkpoint`) if every training-state field is sound.

    Checks each field's type and range, and their agreement: ``epoch`` is the length of ``history`` and at most
    ``options["epochs"]``, ``step`` the last row's, ``best_epoch`` an epoch done whose score is ``best``, ``bad_epochs`` the
    epochs since it, ``best_params`` of the shapes of ``params``, a finite non-negative ``wall_time``. With ``options`` (what
    the run's config says, e.g. :meth:`ppl_vae.app.config.Config.fit_options`), each of them must equal the checkpoint's.

    Raises
    ------
    CheckpointError
        One line: ``checkpoint {path} is damaged ({field} ...)``, naming the first field that is wrong.
    """
    try:
        _check_checkpoint(ckpt, options or {})
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({exc})") from None
    return ckpt


def _check_checkpoint(ckpt: dict[str, Any], expected: dict[str, Any]) -> None:
    """A :class:`CheckpointError` naming the first field of ``ckpt`` that is missing or wrong, the fields checked in a fixed order."""
    for key in (
        "params",
        "optimizer",
        "rng",
        "options",
        "history",
        "epoch",
        "step",
        "best",
        "best_epoch",
        "bad_epochs",
        "wall_time",
        "stopped_early",
    ):
        if key not in ckpt:
            raise CheckpointError(f"no {key}")
    _check_states(ckpt)
    saved = _check_saved_options(ckpt["options"], expected)
    _check_progress(ckpt, saved)


def _check_states(ckpt: dict[str, Any]) -> None:
    """The optimiser, schedule, random and estimator states are of their types."""
    if not (
        isinstance(ckpt["optimizer"], dict)
        and isinstance(ckpt["optimizer"].get("param_groups"), list)
    ):
        _bad(
            "optimizer",
            "must be an optimiser's state (a dict with param_groups)",
            ckpt["optimizer"],
        )
    if not (ckpt.get("scheduler") is None or isinstance(ckpt["scheduler"], dict)):
        _bad("scheduler", "must be a schedule's state or null", ckpt["scheduler"])
    rng = ckpt["rng"]
    if not (
        isinstance(rng, dict)
        and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8
            for t in per_process(rng.get("torch"))
        )
    ):
        _bad("rng", "must hold torch's random state (rng.torch: byte tensors)", rng)
    if not all(isinstance(s, dict) for s in per_process(ckpt.get("estimator") or {})):
        _bad(
            "estimator", "must be the estimator's state (a dict per process)", ckpt.get("estimator")
        )


def _check_saved_options(saved: Any, expected: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``options`` (checked by :data:`_OPTION_CHECKS`), each of ``expected`` equal to the checkpoint's."""
    if not isinstance(saved, dict):
        _bad("options", "must be a dict of fit's options", saved)
    for key, check in _OPTION_CHECKS.items():
        if key in saved:
            check(saved[key], f"options.{key}")
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"options.{key} is {saved[key]!r}, but the run's config says {value!r}"
            )
    return saved


def _check_progress(ckpt: dict[str, Any], saved: dict[str, Any]) -> None:
    """``history``, ``epoch``, ``step``, the best epoch and its score, ``bad_epochs``, ``wall_time``, ``stopped_early`` and ``best_params`` agree."""
    history = _check_history(ckpt["history"])
    epoch = check_int(ckpt["epoch"], "epoch", low=0, error=CheckpointError)
    if epoch != len(history):
        _bad("epoch", f"must be the number of epochs in history ({len(history)})", epoch)
    if isinstance(saved.get("epochs"), int) and epoch > saved["epochs"]:
        _bad("epoch", f"must be at most options.epochs ({saved['epochs']})", epoch)
    step = check_int(ckpt["step"], "step", low=0, error=CheckpointError)
    if step != (history[-1]["step"] if history else 0):
        _bad(
            "step", f"must be the last epoch's step ({history[-1]['step'] if history else 0})", step
        )
    best_epoch = check_int(
        ckpt["best_epoch"], "best_epoch", low=0, high=epoch, error=CheckpointError
    )
    best = ckpt["best"]
    if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
        _bad("best", "must be a number", best)
    if best_epoch:
        row = history[best_epoch - 1]
        if best != row.get("val_elbo", row["train_elbo"]):
            _bad(
                "best",
                f"must be the score of best_epoch {best_epoch} ({row.get('val_elbo', row['train_elbo'])!r})",
                best,
            )
    bad_epochs = check_int(ckpt["bad_epochs"], "bad_epochs", low=0, error=CheckpointError)
    if bad_epochs != epoch - best_epoch:
        _bad(
            "bad_epochs", f"must be the epochs since best_epoch ({epoch - best_epoch})", bad_epochs
        )
    check_finite(ckpt["wall_time"], "wall_time", low=0.0, error=CheckpointError)
    if not isinstance(ckpt["stopped_early"], bool):
        _bad("stopped_early", "must be true or false", ckpt["stopped_early"])
    if ckpt.get("best_params") is not None:
        _check_tensors(ckpt["best_params"], "best_params", ckpt["params"])


def read_checkpoint(path: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``fit`` checkpoint at ``path``: :func:`~ppl_vae.io.load_checkpoint` (safe load, finite parameters), then :func:`check_checkpoint`."""
    return check_checkpoint(io.load_checkpoint(path), path, options=options)


def check_resume(
    ckpt: dict[str, Any],
    epochs: int,
    patience: int | None,
    out: str | Path,
    *,
    prefix: str = "",
    world_size: int | None = None,
) -> bool:
    """Whether a checkpointed run resumed to ``epochs`` with ``patience`` stays stopped early.

    Refuses (:class:`ConfigError`) fewer epochs than the run has done, and training on past an
    early stop that this patience would repeat; the messages name the options as
    ``{prefix}epochs`` and ``{prefix}patience`` (``prefix="--"`` for the command line).
    """
    done, bad = ckpt["epoch"], ckpt.get("bad_epochs", 0)
    saved_world = (
        ckpt.get("rng", {}).get("world_size", 1) if isinstance(ckpt.get("rng"), dict) else 1
    )
    if world_size is not None and world_size != saved_world:
        raise ConfigError(
            f"the run in {out} was trained by {saved_world} process(es); resume it on the same number (this run has {world_size}), "
            "so that each process continues its own random stream"
        )
    if epochs < done:
        raise ConfigError(
            f"{prefix}epochs {epochs} is fewer than the {done} epochs the run in {out} has done"
        )
    stopped = bool(ckpt.get("stopped_early")) and patience is not None and bad >= patience
    if stopped and epochs > done:
        raise ConfigError(
            f"the run in {out} stopped early at epoch {done} ({bad} epochs without improvement); resume it with a {prefix}patience above {bad} to train on"
        )
    return stopped


def kept(out: str | Path | None) -> str:
    """Which checkpoint a run that stopped left in ``out``, and how to continue it."""
    if out is None or not (Path(out) / CHECKPOINT).is_file():
        return "no checkpoint was written"
    try:
        epoch = io.load_checkpoint(Path(out) / CHECKPOINT).get("epoch")
    except CheckpointError:
        return f"the checkpoint in {out} is unreadable"
    return f"the last checkpoint (epoch {epoch}) is kept in {out}: continue it with resume (ppl-vae fit --out {out} --resume)"
