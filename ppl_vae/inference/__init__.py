"""Inference: ``fit`` (SVI), gradient estimators, per-datapoint ELBO."""

from .elbo import elbo_per_datapoint, evaluate_elbo, log_weights, traces
from .estimators import ESTIMATORS, AnalyticKL, Estimator, Reparameterized, ScoreFunction, get_estimator
from .params import Discovered, discover
from .svi import FitResult, fit

__all__ = [
    "ESTIMATORS",
    "AnalyticKL",
    "Discovered",
    "Estimator",
    "FitResult",
    "Reparameterized",
    "ScoreFunction",
    "discover",
    "elbo_per_datapoint",
    "evaluate_elbo",
    "fit",
    "get_estimator",
    "log_weights",
    "traces",
]
