r"""Classic Bayesian models in Pyro, whose posteriordb reference draws (:mod:`ppl_vae.data.posteriordb`) check MCMC and VI.

Two posteriors of the public posterior database (stan-dev/posteriordb), whose
gold-standard Stan draws check the package's MCMC and VI comparison:

* ``eight_schools-eight_schools_noncentered`` -- :func:`eight_schools_noncentered`:

  .. math::

      \mu \sim N(0, 5), \quad \tau \sim \mathrm{HalfCauchy}(5), \quad
      \tilde\theta_j \sim N(0, 1), \quad
      y_j \sim N(\mu + \tau \tilde\theta_j, \sigma_j).

* ``sblrc-blr`` -- :func:`linear_regression`:

  .. math::

      \beta_d \sim N(0, 10), \quad \sigma \sim \mathrm{HalfNormal}(10), \quad
      y_n \sim N(x_n^\top \beta, \sigma).

References
----------
Rubin (1981), Estimation in parallel randomized experiments.
Magnusson et al. (2022), posteriordb: a set of posteriors for Bayesian
inference and probabilistic programming. https://github.com/stan-dev/posteriordb
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = ["eight_schools_noncentered", "linear_regression"]


def eight_schools_noncentered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Eight schools, non-centred: ``mu``, ``tau``, ``theta_trans`` (``[J]``) and deterministic ``theta``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_trans = pyro.sample("theta_trans", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def linear_regression(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Bayesian linear regression: ``beta`` (``[D]``) and ``sigma``; ``y ~ N(X beta, sigma)``."""
    beta = pyro.sample(
        "beta", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 10.0).to_event(1)
    )
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(10.0, dtype=X.dtype)))
    with pyro.plate("rows", X.shape[-2]):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)
