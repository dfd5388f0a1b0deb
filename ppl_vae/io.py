"""Files: atomic writes, valid JSON, and checkpoint loads that never run code.

* Every write is atomic: a file is either the old one or the complete new one
  (a temporary file beside it, ``fsync``, ``os.replace``).
* JSON files hold only valid JSON: non-finite floats are written as ``null``.
* Checkpoints are read with ``torch.load(..., weights_only=True)``: a file
  that holds anything but tensors and plain containers is refused, and
  nothing in it is ever executed.

Run directories (locks, ``--force``) are the application's:
:mod:`ppl_vae.app.runs`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .errors import CheckpointError

__all__ = [
    "write_bytes",
    "write_text",
    "write_json",
    "write_csv",
    "save_torch",
    "load_torch",
    "load_checkpoint",
    "save_figure",
    "json_safe",
    "to_plain",
    "from_plain",
    "follower",
    "is_follower",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = (
    0o666 & ~_umask()
)  # what open() would give a new file; mkstemp's own 0600 would hide shared runs from their readers


_FOLLOWER = False


@contextlib.contextmanager
def follower() -> Iterator[None]:
    """Writes inside the block are skipped: this process is one of several started by torchrun or srun, and another writes the files."""
    global _FOLLOWER
    before, _FOLLOWER = _FOLLOWER, True
    try:
        yield
    finally:
        _FOLLOWER = before


def _atomic(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, overwrite: bool = True
) -> Path:
    """Write through ``write`` into a temporary file beside ``path``, then put it in place in one step.

    Without ``overwrite`` the last step is a hard link, which fails (``FileExistsError``)
    when ``path`` exists, even if another process made it after the caller checked;
    where links are not supported it falls back to checking, then replacing.
    """
    path = Path(path)
    if _FOLLOWER:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _place_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path``, refusing (``FileExistsError``) to replace an existing file."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def is_follower() -> bool:
    """Whether this process skips its writes (:func:`follower`)."""
    return _FOLLOWER


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


def save_torch(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    """``torch.save`` atomically (``obj`` should hold only tensors and plain containers, so it loads with ``weights_only``).

    Without ``overwrite`` an existing ``path`` is never replaced (``FileExistsError``). The object is
    serialised in memory first and then written as bytes, so a full disk is an ``OSError`` (``ENOSPC``)
    like any other write's, with the old file in place, not the ``RuntimeError`` torch's zip writer
    raises when a write into the file fails.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _atomic(path, lambda fh: fh.write(buf.getbuffer()), overwrite=overwrite)


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

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about a foreign pickle protocol: the error below says it in one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        names = [found.group(1)] if found else _pickled_globals(path)
        if names is None:
            raise CheckpointError(
                f"checkpoint {path} is corrupted or unreadable (not a torch checkpoint); it was not loaded"
            ) from None
        what = f" ({', '.join(names[:3])})" if names else ""
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors{what}; it was not loaded and nothing in it was executed"
        ) from None
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({exc.strerror or type(exc).__name__})"
        ) from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupted or unreadable ({type(exc).__name__})"
        ) from None


def to_plain(obj: Any) -> Any:
    """``obj`` as CPU tensors, numbers, strings, lists and dicts only, which :func:`load_torch` reads back (``weights_only``).

    A dataclass becomes ``{"__dataclass__": name, "fields": {...}}`` (its ``init`` fields), a NumPy
    array ``{"__ndarray__": tensor}``, a tuple ``{"__tuple__": [...]}`` and a mapping
    ``{"__dict__": [[key, value], ...]}``; :func:`from_plain` rebuilds them, the dataclasses
    only from the classes it is given, so a payload names no code to run. What comes back is
    plain: a NumPy scalar as a Python number, a read-only mapping as a ``dict`` (a dataclass's
    ``__post_init__`` may wrap it again), a named tuple or ``torch.Size`` as a tuple.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(
                f"cannot hand over a NumPy array of {obj.dtype} between processes (numbers and booleans only)"
            )
        return {
            "__ndarray__": torch.from_numpy(np.array(obj))
        }  # a copy: a read-only array cannot back a tensor
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            "__dataclass__": type(obj).__name__,
            "fields": {
                f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
            },
        }
    if isinstance(obj, Mapping):
        return {"__dict__": [[to_plain(k), to_plain(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    for plain in (
        bool,
        int,
        float,
        str,
    ):  # a subclass (an IntEnum, say) would be pickled as its class
        if isinstance(obj, plain):
            return plain(obj)
    if obj is None:
        return obj
    raise TypeError(
        f"cannot hand over a {type(obj).__name__} between processes (only tensors, arrays, numbers, strings, containers and dataclasses of them)"
    )


def from_plain(
    obj: Any, types: Iterable[type] = (), device: torch.device | str | None = None
) -> Any:
    """Rebuild what :func:`to_plain` made: dataclasses of ``types`` only (another name is a :class:`CheckpointError`), tensors moved to ``device``."""
    known = {t.__name__: t for t in types}

    def back(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return o.to(device) if device is not None else o
        if isinstance(o, list):
            return [back(v) for v in o]
        if not isinstance(o, dict):
            return o
        if "__ndarray__" in o:
            return o["__ndarray__"].numpy()
        if "__tuple__" in o:
            return tuple(back(v) for v in o["__tuple__"])
        if "__dict__" in o:
            return {back(k): back(v) for k, v in o["__dict__"]}
        cls = known.get(o.get("__dataclass__"))  # type: ignore[arg-type]
        if cls is None:
            raise CheckpointError(
                f"a handed-over result holds an unexpected type {o.get('__dataclass__')!r}; it was not rebuilt"
            )
        return cls(**{k: back(v) for k, v in o["fields"].items()})

    return back(obj)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``fit`` checkpoint (:func:`load_torch`), checked: a dict whose ``params`` are finite tensors.

    Raises
    ------
    CheckpointError
        Missing, damaged, unsafe, incomplete, or with a NaN or infinite
        value in a parameter (naming the parameter's index and shape).
    """

    ckpt = load_torch(path)
    params = ckpt.get("params") if isinstance(ckpt, dict) else None
    if not (
        isinstance(params, list) and params and all(isinstance(p, torch.Tensor) for p in params)
    ):
        raise CheckpointError(
            f"checkpoint {path} is corrupted or incomplete (no parameter tensors)"
        )
    for what, tensors in (
        ("parameter", params),
        ("best-epoch parameter", ckpt.get("best_params") or []),
    ):
        for i, p in enumerate(tensors):
            if not (
                isinstance(p, torch.Tensor)
                and p.is_floating_point()
                and bool(torch.isfinite(p).all())
            ):
                shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise CheckpointError(
                    f"checkpoint {path} has a NaN or infinite value in {what} #{i} (shape {shape}); refusing to load it"
                )
    return ckpt


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_bytes(path, buf.getvalue())
