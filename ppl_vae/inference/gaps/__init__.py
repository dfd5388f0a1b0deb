"""Inference quality: per-datapoint bounds (ELBO, IWAE, AIS, BDMC), local q*, and the gap decomposition.

Cremer, Li & Duvenaud (2018): the inference gap of an amortised posterior is
the approximation gap (``log p(x) - L[q*]``) plus the amortisation gap
(``L[q*] - L[q]``); :func:`decompose` measures both per datapoint.
"""

from .ais import AISResult, BDMCResult, ais, bdmc
from .bounds import Bounds, importance_bounds
from .decompose import GapReport, decompose
from .local import LocalFit, optimize_local

__all__ = [
    "AISResult",
    "BDMCResult",
    "Bounds",
    "GapReport",
    "LocalFit",
    "ais",
    "bdmc",
    "decompose",
    "importance_bounds",
    "optimize_local",
]
