"""Inference: training (``fit``), estimators, per-datapoint bounds and gaps, MCMC and the VI-vs-MCMC comparison.

* :func:`fit` -- SVI for any model and guide, with the estimator chosen by argument;
* :mod:`.gaps` -- ELBO/IWAE/AIS bounds per datapoint, local :math:`q^*`, :func:`decompose`;
* :mod:`.mcmc` -- batched HMC, Pyro's NUTS, VI draws, :func:`compare`;
* :mod:`.gradients` -- gradient variance and SNR of the estimators;
* :func:`calibrate` -- simulation-based calibration of an amortised guide.

Its parts, lowest first (``tests/test_layers.py`` checks them): the shared pieces
(plates, traces, random streams, the latent layout, parameters, the HMC/NUTS
:mod:`.kernel`, :mod:`.azcompat`, :mod:`.distributed`, ...); the fitted record
(:mod:`.fitted`) and the training steps (:mod:`.estimators`, :mod:`.step`,
:mod:`.loop`); :mod:`.gaps` and :mod:`.mcmc`, which know neither training nor each
other; :class:`FitResult` (:mod:`.result`: the record with its analyses); and
on top :func:`fit`, :func:`calibrate`, :func:`gradient_stats` and the pretraining.

Importing this package is cheap: each name below is imported from its module
on first use (PEP 562 ``__getattr__``), so ``import ppl_vae.inference.plates``
loads neither the gaps nor MCMC.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

# imported now, not on first use: the function ``traces`` has its module's name, and the module, once
# imported by any other, would otherwise be the package's attribute ``traces``
from .traces import log_weights, traces

#: every public name and the module it is imported from on first use (tests/test_layers.py checks the gaps' and MCMC's
#: lists against their ``__all__``)
_LAZY = {
    **dict.fromkeys(("Calibration", "calibrate"), ".calibration"),
    "Spread": ".distributed",
    **dict.fromkeys(("Estimate", "elbo_per_datapoint", "evaluate_elbo", "kl_per_site"), ".elbo"),
    **dict.fromkeys(
        (
            "ESTIMATORS",
            "IWAE",
            "AnalyticKL",
            "Enumerated",
            "Estimator",
            "Relaxed",
            "Reparameterized",
            "ScoreFunction",
            "get_estimator",
        ),
        ".estimators",
    ),
    **dict.fromkeys(
        (
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
        ),
        ".gaps",
    ),
    **dict.fromkeys(("GradientStats", "gradient_stats"), ".gradients"),
    **dict.fromkeys(
        (
            "Comparison",
            "Draws",
            "compare",
            "hmc",
            "hmc_latent",
            "nuts",
            "nuts_latent",
            "vi_draws",
            "vi_draws_amortized",
            "vi_draws_autoguide",
            "vi_draws_latent",
        ),
        ".mcmc",
    ),
    **dict.fromkeys(("pretrain_layerwise", "stacked_guide"), ".pretrain"),
    **dict.fromkeys(("SVI", "StepInfo"), ".step"),
    "FitResult": ".result",
    "fit": ".svi",
}

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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if (
        importlib.util.find_spec(f"{__name__}.{name}") is not None
    ):  # a submodule: ppl_vae.inference.gaps
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
