"""Files and output directories: atomic writes, safe checkpoint loads, locked run directories.

* Every write is atomic: a file is either the old one or the complete new one
  (a temporary file beside it, ``fsync``, ``os.replace``).
* JSON files hold only valid JSON: non-finite floats are written as ``null``.
* Checkpoints are read with ``torch.load(..., weights_only=True)``: a file
  that holds anything but tensors and plain containers is refused, and
  nothing in it is ever executed.
* An output directory is prepared by :func:`prepare_run_dir` *after* every
  option was checked: it takes the directory's lock file (``fcntl.flock``;
  the lock dies with the process), removes the temporary files of a killed
  write, and with ``force`` clears everything of the old contents.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .errors import CheckpointError, ConfigError, RunDirectoryError

try:  # POSIX; elsewhere (Windows) directories are not locked
    import fcntl
except ImportError:  # pragma: no cover - exercised only where fcntl is missing
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "write_bytes", "write_text", "write_json", "write_csv", "save_torch", "load_torch", "load_checkpoint", "save_figure",
    "check_run_dir", "prepare_run_dir", "release_run_dir", "holding", "releasing", "LOCK", "json_safe",
]

LOCK = ".ppl-vae.lock"
_TEMP = re.compile(r"^\..+\.tmp$")  # what _atomic leaves behind when killed mid-write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's own 0600 would hide shared runs from their readers


def _atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, and numpy/torch scalars made plain."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy and 0-d torch scalars
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return json_safe(item())
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically.

    Non-finite floats become ``null`` (JSON has no NaN or Infinity; Python's
    default would write the invalid tokens ``NaN`` and ``Infinity``), and the
    encoder refuses any that remain (``allow_nan=False``).
    """
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    return write_text(path, text + "\n")


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a list of dicts as CSV (columns in first-seen order) atomically."""
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save`` atomically (``obj`` should hold only tensors and plain containers, so it loads with ``weights_only``)."""
    import torch

    return _atomic(path, lambda fh: torch.save(obj, fh))


def _pickled_globals(path: Path) -> list[str] | None:
    """The functions and classes a plain pickle file names, read without running it; None if it is no pickle."""
    import pickletools

    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle (or a truncated one)
        return None
    return names


def load_torch(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Raises
    ------
    CheckpointError
        One line for a missing, damaged or unsafe file. A file holding other
        objects (a pickle that would call ``posix.system``, say) is refused
        by torch's restricted unpickler before anything in it runs.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol: the error below says it in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        names = [found.group(1)] if found else _pickled_globals(path)
        if names is None:
            raise CheckpointError(f"checkpoint {path} is corrupted or unreadable (not a torch checkpoint); it was not loaded") from None
        what = f" ({', '.join(names[:3])})" if names else ""
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors{what}; it was not loaded and nothing in it was executed") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({type(exc).__name__})") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``fit`` checkpoint (:func:`load_torch`), checked: a dict whose ``params`` are finite tensors.

    Raises
    ------
    CheckpointError
        Missing, damaged, unsafe, incomplete, or with a NaN or infinite
        value in a parameter (naming the parameter's index and shape).
    """
    import torch

    ckpt = load_torch(path)
    params = ckpt.get("params") if isinstance(ckpt, dict) else None
    if not (isinstance(params, list) and params and all(isinstance(p, torch.Tensor) for p in params)):
        raise CheckpointError(f"checkpoint {path} is corrupted or incomplete (no parameter tensors)")
    for what, tensors in (("parameter", params), ("best-epoch parameter", ckpt.get("best_params") or [])):
        for i, p in enumerate(tensors):
            if not (isinstance(p, torch.Tensor) and p.is_floating_point() and bool(torch.isfinite(p).all())):
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise CheckpointError(f"checkpoint {path} has a NaN or infinite value in {what} #{i} (shape {shape}); refusing to load it")
    return ckpt


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- locked output directories


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
                raise RunDirectoryError(f"{folder} is in use by {who} (lock file {self.path}); wait for it to finish or choose another --out") from None
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
    return entry.name == LOCK or bool(_TEMP.match(entry.name))


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def check_run_dir(path: str | os.PathLike[str], *, force: bool = False, resume: bool = False) -> Path:
    """The checks of :func:`prepare_run_dir` alone: nothing is made, locked or removed."""
    path = Path(path)
    if resume:
        if not path.is_dir():
            raise CheckpointError(f"cannot resume: run directory {path} does not exist")
    else:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output path {path} exists and is not a directory")
        if path.is_dir() and not force and any(not _ours(e) for e in path.iterdir()):
            raise ConfigError(f"run directory {path} already exists and is not empty; pass --force to overwrite it or --resume to continue it")
    return path


def prepare_run_dir(path: str | os.PathLike[str], *, force: bool = False, resume: bool = False) -> Path:
    """Take output directory ``path`` for writing; call it after every option was checked.

    A new directory is made (with its parents). An existing one is refused
    unless it is empty (its own lock and temporary files aside) or ``force``
    is given; ``force`` removes all of its contents, so nothing of an old run
    survives beside the new one. With ``resume`` the directory must exist
    and is kept. In every case the directory's lock is taken first (one line
    naming the process that holds it otherwise) and stale temporary files of
    a killed write are removed.

    Raises
    ------
    ConfigError
        A non-empty directory without ``force``; a path that is a file.
    CheckpointError
        ``resume`` of a directory that does not exist.
    RunDirectoryError
        A directory in use by another process, or one that cannot be made.
    """
    path = check_run_dir(path, force=force, resume=resume)
    if not resume:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirectoryError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    try:
        _acquire(path)
        for entry in path.iterdir():
            if (force and not resume and entry.name != LOCK) or _TEMP.match(entry.name):
                _remove(entry)
    except OSError as exc:
        raise RunDirectoryError(f"cannot use output directory {path}: {exc.strerror or exc}") from None
    return path


def release_run_dir(path: str | os.PathLike[str]) -> None:
    """Release the lock this process holds on ``path`` (if any)."""
    lock = _HELD.pop(Path(path).resolve(), None)
    if lock is not None:
        lock.release()
