"""Reference posteriors of the public posterior database (stan-dev/posteriordb): data and gold-standard draws.

The posteriors the package's MCMC tests use ship with the tests
(``tests/fixtures/posteriordb``); ``$PPL_VAE_POSTERIORDB`` or ``root`` names
another copy (the layout of posteriordb's ``posterior_database`` folder).

References
----------
Magnusson et al. (2022), posteriordb: a set of posteriors for Bayesian
inference and probabilistic programming. https://github.com/stan-dev/posteriordb
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError

__all__ = ["posteriordb_dir", "load_posteriordb_data", "load_posteriordb_draws"]

#: posterior name -> data name, for the posteriors shipped in ``shared/data/posteriordb``
POSTERIORS = {"eight_schools-eight_schools_noncentered": "eight_schools", "sblrc-blr": "sblrc"}


def posteriordb_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The posteriordb folder: ``root``, ``$PPL_VAE_POSTERIORDB``, or ``../shared/data/posteriordb``."""
    if root is None:
        root = os.environ.get("PPL_VAE_POSTERIORDB")
    if root is None:
        here = Path(__file__).resolve().parents[3]
        candidates = [
            Path.cwd().parent / "shared/data/posteriordb",
            here / "shared/data/posteriordb",
        ]
        root = next((c for c in candidates if c.is_dir()), candidates[0])
    return Path(root)


def _read_zip_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"posteriordb file {path} not found")
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read(zf.namelist()[0]))
    except (zipfile.BadZipFile, IndexError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"posteriordb file {path} is unreadable ({type(exc).__name__})") from None


def load_posteriordb_data(
    name: str, root: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """The data of posterior ``name`` as float tensors (``eight_schools``: ``sigma``, ``y``; ``sblrc``: ``X``, ``y``)."""
    if name not in POSTERIORS:
        raise DataError(f"unknown posterior {name!r}; available: {', '.join(POSTERIORS)}")
    raw = _read_zip_json(posteriordb_dir(root) / f"{POSTERIORS[name]}.data.json.zip")
    return {
        k: torch.tensor(v, dtype=torch.get_default_dtype())
        for k, v in raw.items()
        if isinstance(v, list)
    }


def load_posteriordb_draws(
    name: str, root: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """Reference draws of posterior ``name``: variable -> ``[chain, draw, *shape]`` (indices 0-based).

    Stan's ``theta[1]``, ``theta[2]`` ... are gathered into one array ``theta``.
    """
    if name not in POSTERIORS:
        raise DataError(f"unknown posterior {name!r}; available: {', '.join(POSTERIORS)}")
    chains = _read_zip_json(posteriordb_dir(root) / f"{name}.draws.json.zip")
    grouped: dict[str, dict[int, list[np.ndarray]]] = {}
    for chain in chains:
        for key, values in chain.items():
            m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", key)
            if m is None:
                raise DataError(f"unexpected parameter name {key!r} in posteriordb draws of {name}")
            grouped.setdefault(m.group(1), {}).setdefault(int(m.group(2) or 0), []).append(
                np.asarray(values, dtype=float)
            )
    out = {}
    for var, by_index in grouped.items():
        arr = np.stack(
            [np.stack(by_index[i]) for i in sorted(by_index)], axis=-1
        )  # [chain, draw, index]
        out[var] = arr[..., 0] if list(by_index) == [0] else arr
    return out
