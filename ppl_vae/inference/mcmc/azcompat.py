"""Moved to :mod:`ppl_vae.inference.azcompat` (shared by the gaps and MCMC): this path goes in the next release.

Every name read from here is the one in :mod:`ppl_vae.inference.azcompat`, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from .. import azcompat


def __getattr__(name: str) -> Any:
    value = getattr(azcompat, name)
    warnings.warn(
        f"ppl_vae.inference.mcmc.azcompat moved: import {name} from ppl_vae.inference.azcompat "
        "(the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    return value


def __dir__() -> list[str]:
    return dir(azcompat)
