"""Guides: amortised encoders as Pyro guides, flows, discrete guides, and per-datapoint (local) families.

:func:`amortized_guide` turns an encoder into a guide; :class:`IAFEncoder`
is a normalising-flow encoder; :class:`LocalPosterior` holds one set of
variational parameters per datapoint over a model's joint latent
(:class:`Latent`), the :math:`q^*` of the gap analysis.
"""

from .amortized import amortized_guide, delta_guide, masking_noise
from .discrete import bernoulli_guide, categorical_guide
from .flows import IAFEncoder
from .latent import Latent, LatentGuide, LatentSite, moment_matched
from .local import FAMILIES, BatchedMADE, LocalPosterior, family_of

__all__ = [
    "FAMILIES",
    "BatchedMADE",
    "IAFEncoder",
    "Latent",
    "LatentGuide",
    "LatentSite",
    "LocalPosterior",
    "amortized_guide",
    "bernoulli_guide",
    "categorical_guide",
    "delta_guide",
    "family_of",
    "masking_noise",
    "moment_matched",
]
