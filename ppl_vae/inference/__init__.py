"""Inference: training (``fit``), estimators, per-datapoint bounds and gaps, MCMC and the VI-vs-MCMC comparison.

* :func:`fit` -- SVI for any model and guide, with the estimator chosen by argument;
* :mod:`.gaps` -- ELBO/IWAE/AIS bounds per datapoint, local :math:`q^*`, :func:`decompose`;
* :mod:`.mcmc` -- batched HMC, Pyro's NUTS, VI draws, :func:`compare`;
* :mod:`.gradients` -- gradient variance and SNR of the estimators;
* :func:`calibrate` -- simulation-based calibration of an amortised guide.
"""

from .calibration import Calibration, calibrate
from .distributed import Spread
from .elbo import Estimate, elbo_per_datapoint, evaluate_elbo, kl_per_site
from .estimators import (
    ESTIMATORS,
    IWAE,
    AnalyticKL,
    Enumerated,
    Estimator,
    Relaxed,
    Reparameterized,
    ScoreFunction,
    get_estimator,
)
from .gaps import (
    AISResult,
    BDMCResult,
    Bounds,
    GapReport,
    LocalFit,
    ais,
    bdmc,
    decompose,
    importance_bounds,
    optimize_local,
)
from .gradients import GradientStats, gradient_stats
from .mcmc import (
    Comparison,
    Draws,
    compare,
    hmc,
    hmc_latent,
    nuts,
    nuts_latent,
    vi_draws,
    vi_draws_amortized,
    vi_draws_autoguide,
    vi_draws_latent,
)
from .pretrain import pretrain_layerwise, stacked_guide
from .step import SVI, StepInfo
from .svi import FitResult, fit
from .traces import log_weights, traces

__all__ = [
    "AISResult",
    "BDMCResult",
    "Bounds",
    "Calibration",
    "Comparison",
    "Draws",
    "ESTIMATORS",
    "Estimate",
    "IWAE",
    "AnalyticKL",
    "Enumerated",
    "Estimator",
    "FitResult",
    "GapReport",
    "GradientStats",
    "LocalFit",
    "Relaxed",
    "Reparameterized",
    "SVI",
    "ScoreFunction",
    "Spread",
    "StepInfo",
    "ais",
    "bdmc",
    "calibrate",
    "compare",
    "decompose",
    "elbo_per_datapoint",
    "evaluate_elbo",
    "fit",
    "get_estimator",
    "gradient_stats",
    "hmc",
    "hmc_latent",
    "importance_bounds",
    "kl_per_site",
    "log_weights",
    "nuts",
    "nuts_latent",
    "optimize_local",
    "pretrain_layerwise",
    "stacked_guide",
    "traces",
    "vi_draws",
    "vi_draws_amortized",
    "vi_draws_autoguide",
    "vi_draws_latent",
]
