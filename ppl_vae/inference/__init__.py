"""Inference: ``fit`` (SVI), gradient estimators, per-datapoint bounds (ELBO, IWAE, AIS), local q*, gaps."""

from .ais import AISResult, BDMCResult, ais, bdmc
from .bounds import Bounds, importance_bounds
from .elbo import elbo_per_datapoint, evaluate_elbo, log_weights, plate_nesting, traces
from .gaps import GapReport, decompose
from .local import FAMILIES, LocalFit, LocalPosterior, optimize_local
from .estimators import ESTIMATORS, IWAE, AnalyticKL, Enumerated, Estimator, Relaxed, Reparameterized, ScoreFunction, get_estimator
from .params import Discovered, discover
from .mcmc import Draws, hmc, hmc_latent, nuts, nuts_latent
from .compare import Comparison, compare, vi_draws_amortized, vi_draws_autoguide, vi_draws_latent
from .svi import FitResult, fit

__all__ = [
    "Comparison",
    "Draws",
    "compare",
    "hmc",
    "hmc_latent",
    "nuts",
    "nuts_latent",
    "vi_draws_amortized",
    "vi_draws_autoguide",
    "vi_draws_latent",
    "AISResult",
    "BDMCResult",
    "Bounds",
    "FAMILIES",
    "GapReport",
    "LocalFit",
    "LocalPosterior",
    "ais",
    "bdmc",
    "decompose",
    "importance_bounds",
    "optimize_local",
    "plate_nesting",
    "ESTIMATORS",
    "AnalyticKL",
    "Enumerated",
    "IWAE",
    "Relaxed",
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
