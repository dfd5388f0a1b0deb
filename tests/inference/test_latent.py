"""ppl_vae.inference.latent: a model's latent sites as one unconstrained vector, and the densities over it, against closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.errors import ConfigError
from ppl_vae.inference.latent import guide_log_density, latent_of, log_joint

A, B = 2.0, 1.5  # the Gamma prior's concentration and rate
X = torch.tensor([0.0, 1.0, 4.0, 2.0], dtype=torch.float64)


def model(x):
    """A positive latent rate and a 3-d Gaussian latent per datapoint: z ~ Gamma(A, B), w ~ N(0, I), x ~ Poisson(z)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Gamma(x.new_tensor(A), x.new_tensor(B)))
        pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
        pyro.sample("x", dist.Poisson(z), obs=x)


def guide(x):
    """z ~ LogNormal(m_n, 0.5): over u = log z, exactly N(m_n, 0.5); w ~ N(x_n, 2)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.LogNormal(0.1 * x, 0.5))
        pyro.sample("w", dist.Normal(x[:, None].expand(-1, 3), 2.0).to_event(1))


def test_the_latent_vector_lays_out_every_site_unconstrained():
    latent = latent_of(model, X, guide=guide)
    assert latent.num_points == 4 and latent.names == ("z", "w") and latent.dim == 1 + 3


def test_the_log_joint_over_u_is_the_closed_form_with_its_jacobian():
    """f(u) = log Gamma(e^u) + log N(w) + log Poisson(x | e^u) + u (the log-Jacobian of z = e^u), at random u [C, N, K]."""
    latent = latent_of(model, X, guide=guide)
    u = torch.randn(5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    z, w = u[..., 0].exp(), u[..., 1:]
    a, b = X.new_tensor(A), X.new_tensor(B)  # float64: the closed form in the data's precision
    prior = dist.Gamma(a, b).log_prob(z) + u[..., 0] + dist.Normal(0.0, 1.0).log_prob(w).sum(-1)
    lik = dist.Poisson(z).log_prob(X)
    assert torch.allclose(log_joint(model, latent, X)(u), prior + lik, rtol=1e-12, atol=1e-12)
    split = log_joint(model, latent, X, split=True)(u)
    assert torch.allclose(split[0], prior, rtol=1e-12) and torch.allclose(split[1], lik, rtol=1e-12)


def test_the_guide_density_over_u_is_the_lognormal_s_gaussian():
    """A LogNormal z seen through u = log z is N(m, 0.5) exactly: the Jacobian cancels the LogNormal's 1/z."""
    latent = latent_of(model, X, guide=guide)
    u = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    expected = dist.Normal(0.1 * X, 0.5).log_prob(u[..., 0]) + dist.Normal(
        X[:, None], 2.0
    ).log_prob(u[..., 1:]).sum(-1)
    assert torch.allclose(guide_log_density(guide, latent, X)(u), expected, rtol=1e-12, atol=1e-12)
    assert math.isfinite(float(expected.sum()))


def test_what_a_per_datapoint_analysis_cannot_handle_is_refused_by_name():
    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def global_latent(x):
        mu = pyro.sample("mu", dist.Normal(x.new_tensor(0.0), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(ConfigError, match="'c'"):
        latent_of(discrete, X)
    with pytest.raises(ConfigError, match="'mu'"):
        latent_of(global_latent, X)
    with pytest.raises(ConfigError, match="at least one datapoint"):
        latent_of(model, X[:0])
