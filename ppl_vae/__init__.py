"""ppl-vae: latent-variable models as plain Pyro functions.

>>> from ppl_vae import fit
>>> from ppl_vae.models import vae, get_likelihood
>>> from ppl_vae.guides import amortized_guide

Importing the package is cheap: torch and Pyro are imported on first use of
a name that needs them (PEP 562 ``__getattr__``), so the command line can
turn a Ctrl-C during those imports into one line.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    NotReparameterizableError,
    PplVaeError,
    RunDirectoryError,
    TrainingDiverged,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Estimate",
    "FitResult",
    "Interrupted",
    "NotReparameterizableError",
    "PplVaeError",
    "RunDirectoryError",
    "TrainingDiverged",
    "compare",
    "decompose",
    "elbo_per_datapoint",
    "evaluate_elbo",
    "fit",
    "gradient_stats",
    "hmc_latent",
    "importance_bounds",
    "load_run",
    "data",
    "distributions",
    "guides",
    "inference",
    "models",
    "nn",
    "__version__",
]

_LAZY = {
    **{name: ".inference" for name in ("Estimate", "FitResult", "compare", "decompose", "elbo_per_datapoint", "evaluate_elbo", "fit",
                                       "gradient_stats", "hmc_latent", "importance_bounds")},
    "load_run": ".app.runs",
}
_SUBMODULES = ("data", "distributions", "guides", "inference", "models", "nn")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
