"""Run a traced computation with torch's argument validation, and again without it where validation refused a parameter.

torch's distributions raise a ``ValueError`` for an invalid parameter (a negative scale, a NaN
location) before any value is computed, so the error cannot say which sample site holds it. The
package's answer, used by the training step and by the ELBO estimates: take the same draws again
with validation off (the random state put back), and let the caller name the first site whose
value is not finite. Which ``ValueError`` validation raised is not told by its text: any
``ValueError`` that is not the package's own is retried; an error that was not validation's is
raised again by the retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pyro
import torch
from pyro.poutine.util import is_validation_enabled

from ..errors import PplVaeError

__all__ = ["retry_unvalidated"]

T = TypeVar("T")


def retry_unvalidated(
    run: Callable[[], T],
    unvalidated: Callable[[], T] | None = None,
    *,
    validating: bool | None = None,
    device: torch.device | str = "cpu",
) -> tuple[T, str]:
    """``(run(), "")``; where validation meets an invalid parameter, ``(unvalidated(), what it met)`` with the same draws.

    ``unvalidated`` runs the computation with validation off (default: ``run`` under
    ``pyro.validation_enabled(False)``); ``validating`` says whether ``run`` validates (default:
    Pyro's flag), and where it does not, ``run`` runs once. ``device`` is where the draws are made:
    its generator's state (and the CPU's) is put back before the second run.
    """
    if not (is_validation_enabled() if validating is None else validating):
        return run(), ""
    cpu = torch.get_rng_state()
    dev = torch.device(device)
    accel = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    try:
        return run(), ""
    except ValueError as exc:
        if isinstance(exc, PplVaeError):
            raise
        met = f"a distribution got an invalid parameter ({str(exc).splitlines()[0][:120]}); "
    torch.set_rng_state(cpu)
    if accel is not None:
        torch.cuda.set_rng_state(accel, dev)
    if unvalidated is not None:
        return unvalidated(), met
    with pyro.validation_enabled(False):
        return run(), met
