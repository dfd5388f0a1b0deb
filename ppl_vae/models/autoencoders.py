r"""Sparse and linear autoencoders, and the check that a linear autoencoder finds PCA's subspace.

A sparse autoencoder is :func:`ppl_vae.models.autoencoder` plus an L1 penalty
on the code, a ``pyro.factor`` inside the data plate:

.. math::

    \log p_\theta(x \mid z) - \lambda \|z\|_1, \qquad z = e_\phi(x)

(equivalently, MAP under a Laplace prior of scale :math:`1/\lambda`).
A linear autoencoder with squared error spans the top-``d`` principal
subspace at its optimum (Baldi & Hornik 1989), but not with PCA's axes:
:func:`principal_angles_to_pca` measures the gap.

References
----------
Ng (2011), Sparse autoencoder, CS294A lecture notes. Baldi & Hornik (1989),
Neural networks and principal component analysis: learning from examples
without local minima.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..errors import ConfigError

__all__ = ["sparse_autoencoder", "principal_angles_to_pca"]


def sparse_autoencoder(decoder: nn.Module, likelihood: nn.Module, latent_dim: int, *, l1: float) -> Callable[..., None]:
    r"""Autoencoder model with an L1 penalty of weight ``l1`` on the code ``z``.

    Pair with :func:`ppl_vae.guides.delta_guide`. The objective is the
    reconstruction log-likelihood minus :math:`\lambda \|z\|_1` (not a bound).
    """
    if not (isinstance(latent_dim, int) and latent_dim > 0):
        raise ConfigError(f"latent dimension must be a positive integer, got {latent_dim!r}")
    if not l1 >= 0:
        raise ConfigError(f"L1 weight must be >= 0, got {l1}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.ImproperUniform(constraints.real, (), (latent_dim,)))
            pyro.factor("l1", -l1 * z.abs().sum(-1))
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model


def principal_angles_to_pca(weight: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Principal angles (radians) between ``span(weight)`` and the top principal subspace of ``x``.

    Parameters
    ----------
    weight : tensor ``[D, d]``
        Columns spanning the subspace, e.g. a linear decoder's weight.
    x : tensor ``[N, D]``
        The data; its top ``d`` principal directions (scikit-learn PCA) are
        compared.

    Returns
    -------
    ndarray of ``d`` angles, largest first (``scipy.linalg.subspace_angles``).
    """
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    w = weight.detach().double().numpy()
    pcs = PCA(w.shape[1]).fit(x.detach().double().numpy()).components_.T
    return subspace_angles(w, pcs)
