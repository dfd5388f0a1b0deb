r"""Sparse, contractive and linear autoencoders, and the check that a linear autoencoder finds PCA's subspace.

A sparse autoencoder is :func:`ppl_vae.models.autoencoder` plus an L1 penalty
on the code, a ``pyro.factor`` inside the data plate:

.. math::

    \log p_\theta(x \mid z) - \lambda \|z\|_1, \qquad z = e_\phi(x)

(equivalently, MAP under a Laplace prior of scale :math:`1/\lambda`).
A contractive autoencoder (Rifai et al. 2011) penalises instead the squared
Frobenius norm of the encoder's Jacobian at each datapoint,

.. math::

    \log p_\theta(x \mid z) - \lambda \Big\| \frac{\partial e_\phi(x)}{\partial x} \Big\|_F^2,

so that the code is insensitive to the directions the data do not vary in.
:func:`jacobian_norm` computes the penalty exactly (one backward pass per code
dimension) or by Hutchinson's estimator (one backward pass per probe, unbiased).
A linear autoencoder with squared error spans the top-``d`` principal
subspace at its optimum (Baldi & Hornik 1989), but not with PCA's axes:
:func:`principal_angles_to_pca` measures the gap.

References
----------
Ng (2011), Sparse autoencoder, CS294A lecture notes. Rifai, Vincent, Muller,
Glorot & Bengio (2011), Contractive auto-encoders: explicit invariance during
feature extraction, ICML. Hutchinson (1990), A stochastic estimator of the
trace of the influence matrix. Baldi & Hornik (1989),
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

from ..errors import ConfigError, check_int

__all__ = [
    "sparse_autoencoder",
    "contractive_autoencoder",
    "jacobian_norm",
    "JACOBIAN_METHODS",
    "principal_angles_to_pca",
]

#: how :func:`jacobian_norm` computes the penalty
JACOBIAN_METHODS = ("exact", "hutchinson")


def sparse_autoencoder(
    decoder: nn.Module, likelihood: nn.Module, latent_dim: int, *, l1: float
) -> Callable[..., None]:
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


def _check_method(method: str, probes: int) -> None:
    if method not in JACOBIAN_METHODS:
        raise ConfigError(
            f"unknown Jacobian method {method!r}; choose {' or '.join(JACOBIAN_METHODS)}"
        )
    check_int(probes, "the number of Hutchinson probes")


def jacobian_norm(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    method: str = "exact",
    probes: int = 1,
) -> torch.Tensor:
    r"""The squared Frobenius norm of the encoder's Jacobian, :math:`\|\partial e(x_n) / \partial x_n\|_F^2`, per row of ``x`` (``[N]``).

    ``encoder`` maps ``[N, D]`` to codes ``[N, d]`` (or ``[N, *shape]``), each row
    from its own input row only (no batch statistics), so the gradient of a sum
    over rows holds every row's own gradient.

    ``method="exact"``: one backward pass per code dimension ``k``, whose
    gradient is row ``k`` of every datapoint's Jacobian. ``"hutchinson"``:
    :math:`E_v \|J^\top v\|^2 = \operatorname{tr}(J J^\top) = \|J\|_F^2` for
    Rademacher ``v`` in code space, averaged over ``probes`` draws (one backward
    pass each; unbiased, drawn from torch's global stream on ``x``'s device):
    the cheaper choice for wide codes.

    Differentiable in the encoder's parameters when gradients are enabled (the
    backward passes keep their graph), so it can be trained against.
    """
    _check_method(method, probes)
    train = torch.is_grad_enabled()
    with torch.enable_grad():
        inp = x.detach().requires_grad_(True)
        code = encoder(inp)
        flat = code.reshape(code.shape[0], -1)
        if method == "exact":
            rows = range(flat.shape[1])
            grads = (
                torch.autograd.grad(flat[:, k].sum(), inp, create_graph=train, retain_graph=True)[0]
                for k in rows
            )
        else:
            signs = (torch.randint(0, 2, (probes, *flat.shape), device=flat.device) * 2 - 1).to(
                flat.dtype
            )
            grads = (
                torch.autograd.grad((flat * v).sum(), inp, create_graph=train, retain_graph=True)[0]
                for v in signs
            )
        total = sum(g.reshape(g.shape[0], -1).pow(2).sum(-1) for g in grads)
    assert isinstance(total, torch.Tensor)
    return total if method == "exact" else total / probes


def contractive_autoencoder(
    decoder: nn.Module,
    likelihood: nn.Module,
    encoder: nn.Module,
    latent_dim: int,
    *,
    weight: float,
    method: str = "exact",
    probes: int = 1,
) -> Callable[..., None]:
    r"""Autoencoder model with the contractive penalty :math:`\lambda \|\partial e(x) / \partial x\|_F^2` (:func:`jacobian_norm`).

    Pair with ``delta_guide(encoder)``: the guide puts ``z`` at ``encoder(x)``;
    the model evaluates the encoder's Jacobian at ``x`` again for the penalty
    (a ``pyro.factor`` in the data plate, scaled with the minibatch like the
    likelihood). The objective is the reconstruction log-likelihood minus the
    penalty (not a bound).
    """
    if not (isinstance(latent_dim, int) and latent_dim > 0):
        raise ConfigError(f"latent dimension must be a positive integer, got {latent_dim!r}")
    if not weight >= 0:
        raise ConfigError(f"contractive weight must be >= 0, got {weight}")
    _check_method(method, probes)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.ImproperUniform(constraints.real, (), (latent_dim,)))
            pyro.factor(
                "contractive", -weight * jacobian_norm(encoder, x, method=method, probes=probes)
            )
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
