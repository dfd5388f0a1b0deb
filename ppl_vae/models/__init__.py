"""Generative models p(z) p(x | z) as plain Pyro model functions."""

from .discrete import DISCRETE_MODELS, GaussianMixturePrior, bernoulli_vae, categorical_vae, gmm_vae
from .likelihoods import LIKELIHOODS, Bernoulli, Beta, ContinuousBernoulli, Gaussian, get_likelihood
from .ppca import PPCA
from .classic import eight_schools_noncentered, linear_regression, load_posteriordb_data, load_posteriordb_draws
from .vae import autoencoder, cvae, decode_prior, one_hot, vae
from .autoencoders import principal_angles_to_pca, sparse_autoencoder
from .cvae_so import baseline_model, conditional_nll, so_cvae, so_cvae_guide
from .hierarchical import hierarchical_guide, hierarchical_vae
from .m2 import m2, m2_guide
from .priors import VampPrior, vae_with_prior
from .vqvae import Codebook, CodePrior, perplexity, vqvae

__all__ = [
    "eight_schools_noncentered",
    "linear_regression",
    "load_posteriordb_data",
    "load_posteriordb_draws",
    "DISCRETE_MODELS",
    "GaussianMixturePrior",
    "bernoulli_vae",
    "categorical_vae",
    "gmm_vae",
    "LIKELIHOODS",
    "Bernoulli",
    "Beta",
    "ContinuousBernoulli",
    "Gaussian",
    "PPCA",
    "autoencoder",
    "cvae",
    "decode_prior",
    "get_likelihood",
    "one_hot",
    "vae",
    "Codebook",
    "CodePrior",
    "VampPrior",
    "baseline_model",
    "conditional_nll",
    "hierarchical_guide",
    "hierarchical_vae",
    "m2",
    "m2_guide",
    "perplexity",
    "principal_angles_to_pca",
    "so_cvae",
    "so_cvae_guide",
    "sparse_autoencoder",
    "vae_with_prior",
    "vqvae",
]
