"""Generative models p(z) p(x | z) as plain Pyro model functions, and nothing else.

Every model is a function ``model(x, ...)`` (or a module whose ``forward``
is one) that draws its latents and observes ``x`` inside a ``"data"`` plate;
the likelihood is a distribution the decoder output is turned into
(:mod:`ppl_vae.distributions`). Training, bounds, gaps and MCMC live in
:mod:`ppl_vae.inference`.
"""

from .autoencoders import (
    contractive_autoencoder,
    jacobian_norm,
    principal_angles_to_pca,
    sparse_autoencoder,
)
from .classic import eight_schools_noncentered, linear_regression
from .cvae_so import baseline_model, so_cvae, so_cvae_guide
from .discrete import DISCRETE_MODELS, GaussianMixturePrior, bernoulli_vae, categorical_vae, gmm_vae
from .hierarchical import hierarchical_guide, hierarchical_vae
from .ladder import ladder_guide, ladder_networks, ladder_vae
from .m2 import m2, m2_guide
from .ppca import PPCA
from .priors import VampPrior, vae_with_prior
from .stacked import StackedAutoencoder, layer_model, stacked_autoencoder
from .vae import autoencoder, cvae, decode_prior, vae
from .vqvae import Codebook, CodePrior, perplexity, vqvae, vqvae2, vqvae2_guide, vqvae2_sample

__all__ = [
    "CodePrior",
    "Codebook",
    "DISCRETE_MODELS",
    "GaussianMixturePrior",
    "PPCA",
    "StackedAutoencoder",
    "VampPrior",
    "autoencoder",
    "baseline_model",
    "bernoulli_vae",
    "categorical_vae",
    "contractive_autoencoder",
    "cvae",
    "decode_prior",
    "eight_schools_noncentered",
    "gmm_vae",
    "hierarchical_guide",
    "hierarchical_vae",
    "jacobian_norm",
    "ladder_guide",
    "ladder_networks",
    "ladder_vae",
    "layer_model",
    "linear_regression",
    "m2",
    "m2_guide",
    "perplexity",
    "principal_angles_to_pca",
    "so_cvae",
    "so_cvae_guide",
    "sparse_autoencoder",
    "stacked_autoencoder",
    "vae",
    "vae_with_prior",
    "vqvae",
    "vqvae2",
    "vqvae2_guide",
    "vqvae2_sample",
]
