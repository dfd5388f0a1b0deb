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
import warnings
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
    "FitResult",
    "Interrupted",
    "NotReparameterizableError",
    "PplVaeError",
    "RunDirectoryError",
    "TrainingDiverged",
    "compare",
    "decompose",
    "fit",
    "hmc_latent",
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
    **{name: ".inference" for name in ("FitResult", "compare", "decompose", "fit", "hmc_latent")},
    "load_run": ".app.runs",
}
#: names that were exported here and now live in their subpackage only: they keep working, with a warning, for one release
_MOVED = {
    name: ".inference"
    for name in (
        "Estimate",
        "elbo_per_datapoint",
        "evaluate_elbo",
        "gradient_stats",
        "importance_bounds",
    )
}
_SUBMODULES = ("data", "distributions", "guides", "inference", "models", "nn")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _MOVED:
        warnings.warn(
            f"ppl_vae.{name} moved: import it from ppl_vae{_MOVED[name]} (the top-level name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name], __name__), name)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
