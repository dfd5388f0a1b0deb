r"""Probabilistic PCA: a linear-Gaussian latent-variable model with exact answers.

.. math::

    z \sim N(0, I_d), \qquad x \mid z \sim N(W z + \mu, \sigma^2 I_D).

Posterior :math:`p(z \mid x) = N(M^{-1} W^\top (x - \mu), \sigma^2 M^{-1})`
with :math:`M = W^\top W + \sigma^2 I_d`, and evidence
:math:`\log p(x) = \log N(x; \mu, W W^\top + \sigma^2 I_D)`. Every estimator of
the package is tested against these.

References
----------
Tipping & Bishop (1999), Probabilistic Principal Component Analysis.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .vae import check_latent_dim

__all__ = ["PPCA"]


class PPCA(nn.Module):
    """PPCA with learnable ``W``, ``mu`` and ``sigma``; calling it runs the Pyro model.

    Parameters
    ----------
    data_dim, latent_dim : int
        ``D`` and ``d``.
    sigma : float
        Initial observation noise standard deviation.
    """

    def __init__(self, data_dim: int, latent_dim: int, sigma: float = 1.0) -> None:
        super().__init__()
        check_latent_dim(latent_dim)
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim) / math.sqrt(latent_dim))
        self.mu = nn.Parameter(torch.zeros(data_dim))
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, x: torch.Tensor) -> None:
        """The Pyro model: ``z`` then ``x`` in the ``"data"`` plate."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            loc = z @ self.W.T + self.mu
            pyro.sample("x", dist.Normal(loc, self.sigma.expand_as(loc)).to_event(1), obs=x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact posterior ``p(z | x)``, batched over the rows of ``x``."""
        s2 = self.sigma**2
        M = self.W.T @ self.W + s2 * torch.eye(self.latent_dim, dtype=x.dtype, device=x.device)
        L = torch.linalg.cholesky(M)
        mean = torch.cholesky_solve(((x - self.mu) @ self.W).unsqueeze(-1), L).squeeze(-1)
        cov = s2 * torch.cholesky_inverse(L)
        return dist.MultivariateNormal(mean, covariance_matrix=cov.expand(x.shape[0], -1, -1))

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` per row of ``x``: shape ``[N]``."""
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(
            self.data_dim, dtype=x.dtype, device=x.device
        )
        return dist.MultivariateNormal(self.mu, covariance_matrix=cov).log_prob(x)

    def exact_guide(self, x: torch.Tensor) -> None:
        """A guide that samples the exact posterior: its ELBO equals ``log p(x)``."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``x`` from the model: ``[num_samples, D]``."""

        def normal(dim: int) -> torch.Tensor:  # [num_samples, dim] standard normal draws
            return torch.randn(
                num_samples, dim, generator=generator, dtype=self.W.dtype, device=self.W.device
            )

        z = normal(self.latent_dim)
        noise = normal(self.data_dim)
        return z @ self.W.T + self.mu + self.sigma * noise
