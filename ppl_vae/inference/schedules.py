r"""Learning-rate schedules as closed forms of (epoch, epochs), so that a resumed run continues the same curve.

.. math::

    \text{cosine: } \tfrac12 (1 + \cos(\pi e / E)), \qquad \text{exponential: } 0.01^{e / E}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import (
    ConfigError,
)

SCHEDULES = ("cosine", "exponential")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    r"""The learning rate of ``epoch`` (0-based) as a fraction of the initial one, over ``epochs`` in all.

    A closed form of ``(epoch, epochs)``, so a resumed run continues the same
    curve and a run extended to more epochs re-plans it for the new total:

    .. math::

        \text{cosine: } \tfrac12 (1 + \cos(\pi e / E)), \qquad \text{exponential: } 0.01^{e / E}
    """
    t = epoch / max(epochs, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        return 0.01**t
    raise ConfigError(
        f"unknown lr_schedule {schedule!r}; choose {', '.join(SCHEDULES)} or pass a callable"
    )


def make_schedule(
    optimizer: torch.optim.Optimizer, lr_schedule: str | Callable[..., Any] | None, epochs: int
) -> Any:
    if lr_schedule is None:
        return None
    if callable(lr_schedule):
        return lr_schedule(optimizer)
    lr_factor(lr_schedule, 0, epochs)  # ConfigError for an unknown name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(lr_schedule, e, epochs))


def replan(sched: Any) -> None:
    """Set the learning rates a restored ``LambdaLR`` gives at its epoch (the same numbers, or a re-planned curve).

    Through the scheduler's public ``step``: taken back one epoch, stepped to it again, it computes
    the rates of its own lambdas at that epoch and sets them in its optimiser and ``get_last_lr()``.
    """
    sched.last_epoch -= 1
    sched.step()
