"""Generative models p(z) p(x | z) as plain Pyro model functions."""

from .likelihoods import LIKELIHOODS, Bernoulli, Beta, ContinuousBernoulli, Gaussian, get_likelihood
from .ppca import PPCA
from .vae import autoencoder, cvae, decode_prior, one_hot, vae

__all__ = [
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
]
