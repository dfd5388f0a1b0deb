"""Atomic file writes: a file is either the old one or the complete new one."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from .errors import CheckpointError, ConfigError


def _atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
    """``torch.save`` atomically."""
    return _atomic(path, lambda fh: torch.save(obj, fh))


def load_torch(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with one clear error for a missing or corrupted file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({type(exc).__name__})") from None


def save_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_bytes(path, buf.getvalue())


def prepare_run_dir(path: str | os.PathLike[str], *, force: bool = False, resume: bool = False) -> Path:
    """Create ``path`` for a new run; refuse to reuse a non-empty one without ``force``.

    With ``resume`` the directory must already exist (the checkpoint is checked later).
    """
    path = Path(path)
    if resume:
        if not path.is_dir():
            raise CheckpointError(f"cannot resume: run directory {path} does not exist")
        return path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ConfigError(f"run directory {path} already exists and is not empty; pass --force to overwrite it or --resume to continue it")
    path.mkdir(parents=True, exist_ok=True)
    return path
