"""Errors that the command line reports as one clear line."""

from __future__ import annotations

import math

__all__ = [
    "PplVaeError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "NotReparameterizableError",
    "TrainingDiverged",
    "RunDirectoryError",
    "ProcessFailed",
    "Interrupted",
    "NonFiniteError",
    "ReliabilityWarning",
    "SequentialWarning",
]


class PplVaeError(Exception):
    """Base class of the errors a user can cause and fix."""


class DataError(PplVaeError, ValueError):
    """Data missing, malformed or unsuited to the chosen likelihood."""


class ConfigError(PplVaeError, ValueError):
    """An option that does not exist or has an impossible value."""


class CheckpointError(PplVaeError):
    """A checkpoint that is missing, corrupted or does not match the model."""


class NotReparameterizableError(PplVaeError, ValueError):
    """A guide site without a pathwise sampler under the reparameterised estimator."""


class TrainingDiverged(PplVaeError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, *, step: int, site: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.site = site


class RunDirectoryError(PplVaeError):
    """An output directory that cannot be used: in use by another process, not creatable, or not writable."""


class ProcessFailed(PplVaeError):
    """One of several processes ended without finishing (killed, or out of memory); the message names its rank."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says which checkpoint (if any) is kept.

    A subclass of :class:`KeyboardInterrupt`, so code that catches that still does.
    """

    def __init__(self, message: str, *, epoch: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch


class NonFiniteError(PplVaeError, FloatingPointError):
    """A per-datapoint bound that came out NaN or infinite; ``site`` names where."""

    def __init__(self, message: str, *, site: str | None) -> None:
        super().__init__(message)
        self.site = site


def check_int(
    value: object,
    name: str,
    *,
    low: int = 1,
    high: int | None = None,
    error: type[PplVaeError] = ConfigError,
) -> int:
    """``value`` if it is an integer (not a bool) of at least ``low`` (and at most ``high``); else an ``error`` (a :class:`ConfigError`) naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        what = (
            "a positive integer"
            if low == 1
            else "a non-negative integer"
            if low == 0
            else f"an integer >= {low}"
        )
        if high is not None:
            what = f"an integer from {low} to {high}"
        raise error(f"{name} must be {what}, got {value!r}")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` if it is a 32-bit seed, an integer (not a bool) in [0, 2**32 - 1] as NumPy's; else a :class:`ConfigError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**32 - 1:
        raise ConfigError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
    return value


def check_positive(value: object, name: str, *, error: type[PplVaeError] = ConfigError) -> float:
    """``value`` if it is a finite number above 0; else an ``error`` (a :class:`ConfigError`) naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise error(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_finite(
    value: object, name: str, *, low: float | None = None, error: type[PplVaeError] = ConfigError
) -> float:
    """``value`` if it is a finite number (not a bool), at least ``low`` if given; else an ``error`` (a :class:`ConfigError`) naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (low is not None and value < low)
    ):
        raise error(
            f"{name} must be a finite number{f' >= {low:g}' if low is not None else ''}, got {value!r}"
        )
    return float(value)


class SequentialWarning(UserWarning):
    """Code that cannot run its draws or particles vectorised runs them one at a time: the same numbers' kind, a multiple of the time."""


class ReliabilityWarning(UserWarning):
    """A number was computed but may not be trusted: importance weights with a heavy tail, a q* that did not converge.

    The rows it concerns are flagged in the result; the warning says how many and what to do.
    """
