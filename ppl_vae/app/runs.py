"""Run directories: locked while written, checked before they are made, read back into a trained model.

A run directory holds ``config.json``, ``checkpoint.pt``, ``history.csv``,
``metrics.json`` and the figures. A command takes its output directory with
:func:`prepare_run_dir` *after* every option was checked: it takes the
directory's lock file (``fcntl.flock``; the lock dies with the process),
removes the temporary files of a killed write, marks the folder as the
command's output (``.ppl-vae-run.json``) and, with ``force``, clears everything
of the old contents of a folder that the same command made, and nothing else. :func:`open_run` rebuilds the trained model
of a run (config + checkpoint, read with ``weights_only``) and its data;
:func:`load_run` gives it as the :class:`~ppl_vae.inference.FitResult` that ``fit`` returns.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import io
from ..data import Dataset
from ..errors import (
    CheckpointError,
    ConfigError,
    RunDirectoryError,
)
from ..inference.elbo import evaluate_elbo
from ..inference.fitted import attach
from ..inference.params import Discovered, discover, load_params
from ..inference.random import seeded
from ..inference.result import FitResult
from ..inference.svi import CHECKPOINT, read_checkpoint
from .config import Config
from .registry import (
    Built,
    build,
    load_splits,
    split_tensors,
)

try:  # POSIX; elsewhere (Windows) directories are not locked
    import fcntl
except ImportError:  # pragma: no cover - exercised only where fcntl is missing
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MARKER",
    "output_path",
    "holding",
    "releasing",
    "check_run_dir",
    "prepare_run_dir",
    "release_run_dir",
    "read_config",
    "read_metrics",
    "open_run",
    "load_run",
]


LOCK = ".ppl-vae.lock"
#: the file that makes a folder a command's output: ``{"command": NAME}``; ``--force`` replaces only a folder holding it, for the same command
MARKER = ".ppl-vae-run.json"

_TEMP = re.compile(r"^\..+\.tmp$")  # what _atomic leaves behind when killed mid-write


class _Lock:
    """An exclusive ``flock`` on ``folder/.ppl-vae.lock`` holding the owner's pid; unlinked on release."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self.fd: int | None = None
        if fcntl is None:  # no locking where fcntl is missing
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"process {owner}" if owner.isdigit() else "another process"
                raise RunDirectoryError(
                    f"{folder} is in use by {who} (lock file {self.path}); wait for it to finish or choose another --out"
                ) from None
            try:  # the holder before us may have unlinked the file it locked: lock the one at the path
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None


_HELD: dict[Path, _Lock] = {}

_DEPTH = 0


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Release the directory locks taken inside this block when the outermost such block ends.

    The command line runs every command inside one; :func:`ppl_vae.experiment.run`
    runs inside its own. A lock taken outside any ``holding`` block is kept
    until the process exits (the operating system releases it then).
    """
    global _DEPTH
    before = set(_HELD)
    _DEPTH += 1
    try:
        yield
    finally:
        _DEPTH -= 1
        if _DEPTH == 0:
            for key in [k for k in _HELD if k not in before]:
                _HELD.pop(key).release()


def releasing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` inside :func:`holding`, so the directories it locks are released when it returns."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with holding():
            return fn(*args, **kwargs)

    return wrapper


def _acquire(folder: Path) -> None:
    key = folder.resolve()
    if key not in _HELD:  # re-entrant within one process: the same writer
        _HELD[key] = _Lock(folder)


def _ours(entry: Path) -> bool:
    """Whether ``entry`` is bookkeeping of ours (the lock, the marker, a killed write's temporary file), not a result."""
    return entry.name in (LOCK, MARKER) or bool(_TEMP.match(entry.name))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _command_of(folder: Path) -> str | None:
    """The command named by ``folder``'s :data:`MARKER`, or None where there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    name = data.get("command") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced as a whole (it is or holds the current, home or root directory), else None."""
    target = path.resolve()
    if target == Path(target.anchor):
        return "the root directory"
    for place, what in ((Path.cwd, "the current directory"), (Path.home, "your home directory")):
        try:
            place = place().resolve()
        except (OSError, RuntimeError):  # no current directory any more, or no home known
            continue
        if place == target:
            return what
        if place.is_relative_to(target):
            return f"a folder holding {what}"
    return None


def output_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path`; a :class:`ConfigError` for an empty one, which ``Path`` would read as the current directory."""
    if not str(path).strip():
        raise ConfigError(
            "--out is empty (it would name the current directory); give a path of its own"
        )
    return Path(path)


def check_run_dir(
    path: str | os.PathLike[str],
    *,
    command: str,
    force: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """The checks of :func:`prepare_run_dir` alone: nothing is made, locked or removed."""
    path = output_path(path)
    target = path.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == target or src.is_relative_to(target):
            what = "is" if src == target else "holds"
            raise ConfigError(
                f"--out {path} {what} the input {given}; write the output to a folder of its own (for example {Path(given) / command})"
            )
    if resume:
        if not path.is_dir():
            raise CheckpointError(f"cannot resume: run directory {path} does not exist")
        return path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} exists and is not a directory")
    if not path.is_dir() or not any(not _ours(e) for e in path.iterdir()):
        return path  # new or empty: nothing to replace
    if not force:
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pass --force to overwrite it or --resume to continue it"
        )
    why = _protected(path)
    if why is not None:
        raise ConfigError(
            f"--force would replace {path}, which is {why}; nothing was removed: give --out a folder of its own"
        )
    made_by = _command_of(path)
    if made_by is None:
        raise ConfigError(
            f"--force replaces only a folder that ppl-vae {command} made (it holds {MARKER}); {path} has none, so nothing was removed: "
            "remove it yourself or choose another --out"
        )
    if made_by != command:
        raise ConfigError(
            f"{path} is the output of ppl-vae {made_by}, not of {command}; nothing was removed: choose another --out"
        )
    return path


def prepare_run_dir(
    path: str | os.PathLike[str],
    *,
    command: str,
    force: bool = False,
    resume: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Take output directory ``path`` for ``command`` (the command line's name, e.g. ``"fit"``); call it after every option was checked.

    A new directory is made (with its parents) and marked as ``command``'s
    output (:data:`MARKER`). An existing one is refused unless it is empty
    (its own lock and temporary files aside) or ``force`` is given, and
    ``force`` replaces only a folder that the same command made: never an
    unmarked folder, the current, home or root directory or one holding
    them, and never one of ``inputs`` (the runs or folders the command reads)
    or a folder holding one. It removes all of the old contents, so nothing
    of an old run survives beside the new one. With ``resume`` the directory
    must exist and is kept. In every case the directory's lock is taken first
    (one line naming the process that holds it otherwise) and stale temporary
    files of a killed write are removed. A follower process
    (:func:`ppl_vae.io.follower`) leaves the directory to the process of rank 0.

    Raises
    ------
    ConfigError
        A non-empty directory without ``force``; one ``force`` may not replace; a path that is a file; an empty path.
    CheckpointError
        ``resume`` of a directory that does not exist.
    RunDirectoryError
        A directory in use by another process, or one that cannot be made.
    """
    if (
        io.is_follower()
    ):  # one of several processes torchrun or srun started: the one of rank 0 takes the directory
        return Path(path)
    path = check_run_dir(path, command=command, force=force, resume=resume, inputs=inputs)
    if not resume:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create output directory {path}: {exc.strerror or exc}"
            ) from None
    try:
        _acquire(path)
        if (
            force and not resume
        ):  # checked again under the lock: the folder may have changed since the check
            check_run_dir(path, command=command, force=force, inputs=inputs)
        for entry in path.iterdir():
            if (force and not resume and entry.name != LOCK) or _TEMP.match(entry.name):
                _remove(entry)
        if not (path / MARKER).is_file():
            io.write_json(path / MARKER, {"command": command})
    except OSError as exc:
        raise RunDirectoryError(
            f"cannot use output directory {path}: {exc.strerror or exc}"
        ) from None
    return path


def release_run_dir(path: str | os.PathLike[str]) -> None:
    """Release the lock this process holds on ``path`` (if any)."""
    lock = _HELD.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.release()


CONFIG, METRICS = "config.json", "metrics.json"


def read_config(path: str | Path, **overrides: Any) -> Config:
    """The validated :class:`Config` saved at ``path`` (``config.json``), with ``overrides``.

    Raises
    ------
    ConfigError
        One line naming the file and the key: unreadable, not JSON, an
        unknown key, a value of the wrong type or an impossible one.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        return Config.from_dict({**data, **overrides}).validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def open_run(run_dir: str | Path) -> tuple[Built, dict[str, Dataset]]:
    """Rebuild the trained model of a run directory (config + checkpoint) and its data.

    The checkpoint is read with ``weights_only=True`` (a file holding other
    objects is refused, never executed) and refused if a parameter is NaN
    or infinite.
    """
    built, splits, _, _ = _open(Path(run_dir))
    return built, splits


def _open(run_dir: Path) -> tuple[Built, dict[str, Dataset], Discovered, dict[str, Any]]:
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    cfg = read_config(run_dir / CONFIG)
    # weights_only: never executes code; finite parameters; every field checked, and against config.json
    ckpt = read_checkpoint(run_dir / CHECKPOINT, options=cfg.fit_options())
    splits = load_splits(cfg)
    train = splits["train"]
    built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
    found = discover(built.model, built.guide, tuple(t[:2] for t in split_tensors(cfg, train)))
    # a run that stopped early is its best epoch's parameters (what its metrics describe)
    saved = (
        ckpt["best_params"]
        if ckpt.get("stopped_early") and ckpt.get("best_params")
        else ckpt["params"]
    )
    # an estimator's own networks (NVIL's baseline) are saved after the model's and guide's parameters
    load_params(found.params, saved, f"in {run_dir} (its config)", extra=True)
    found.train(False)
    return built, splits, found, ckpt


def read_metrics(path: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json`` (``{}`` where there is none: the run did not finish); a :class:`CheckpointError` naming a damaged field."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object)")
    for key, optional in (("train_elbo", False), ("val_elbo", True)):
        value = metrics.get(key)
        if (value is None and optional and key in metrics) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            continue
        raise CheckpointError(
            f"{path} is damaged ({key} must be a finite number{' or null' if optional else ''}, got {value!r})"
        )
    return metrics


def load_run(run_dir: str | Path) -> FitResult:
    """The trained model of a CLI run as the :class:`~ppl_vae.inference.FitResult` ``fit`` returns (``sample``, ``posterior``, ``elbo``, ``iwae``, ``save``).

    Its record is the checkpoint's history, with the final ELBOs of
    ``metrics.json`` where the run finished (else the last epoch's); its
    ``model`` and ``guide`` are the run's, rebuilt from ``config.json``
    (:func:`open_run`).
    """
    run_dir = Path(run_dir)
    built, splits, found, ckpt = _open(run_dir)
    metrics = read_metrics(run_dir / METRICS)
    history = tuple(dict(row) for row in ckpt["history"])
    options = ckpt["options"]
    if metrics:
        train, valid = metrics["train_elbo"], metrics["val_elbo"]
    else:  # an unfinished run: the history holds running training objectives, not the true ELBO fit reports; compute it
        with seeded(built.config.seed):
            train = float(
                evaluate_elbo(
                    built.model, built.guide, split_tensors(built.config, splits["train"])
                ).value.mean()
            )
            valid = float(
                evaluate_elbo(
                    built.model, built.guide, split_tensors(built.config, splits["valid"])
                ).value.mean()
            )
    record = FitResult(
        history=history,
        train_elbo=train,
        val_elbo=valid,
        epochs=len(history),
        steps=ckpt["step"],
        wall_time=float(ckpt["wall_time"]),
        stopped_early=ckpt["stopped_early"],
        best_epoch=ckpt["best_epoch"],
        estimator=str(options.get("estimator", built.config.estimator)),
        options=dict(options),
    )
    shapes = [(tuple(t.shape[1:]), t.dtype) for t in split_tensors(built.config, splits["train"])]
    return attach(record, built.model, built.guide, shapes, None, str(run_dir), found=found)
