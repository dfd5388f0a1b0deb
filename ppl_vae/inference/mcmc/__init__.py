"""MCMC as the reference for VI: batched HMC over many posteriors, Pyro's NUTS, VI draws, and their comparison.

All samplers return :class:`Draws` (ArviZ's ``(chain, draw, ...)`` layout,
converted through :mod:`~ppl_vae.inference.azcompat`, the only module that calls ArviZ);
:func:`compare` measures VI against MCMC.
"""

from .compare import Comparison, compare
from .draws import Draws
from .hmc import hmc, hmc_latent
from .nuts import nuts, nuts_latent
from .vi import vi_draws, vi_draws_amortized, vi_draws_autoguide, vi_draws_latent

__all__ = [
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
]
