"""ppl-vae: latent-variable models as plain Pyro functions.

>>> from ppl_vae import fit
>>> from ppl_vae.models import vae, get_likelihood
>>> from ppl_vae.guides import amortized_guide
"""

from . import guides, models, nn
from .errors import CheckpointError, ConfigError, DataError, NotReparameterizableError, PplVaeError, TrainingDiverged
from .inference import FitResult, elbo_per_datapoint, evaluate_elbo, fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FitResult",
    "NotReparameterizableError",
    "PplVaeError",
    "TrainingDiverged",
    "elbo_per_datapoint",
    "evaluate_elbo",
    "fit",
    "guides",
    "models",
    "nn",
    "__version__",
]
