"""Analyses on models with several latent sites, constrained latents, and the refusals.

Two exact models:

* PPCA split into two latent sites (``z1`` of size 2 and a scalar ``z2``):
  ``x = W1 z1 + w2 z2 + mu + noise`` is PPCA with ``W = [W1 w2]``, so
  ``log p(x)`` and the joint posterior of ``(z1, z2)`` have their closed forms;
  a guide with independent sites is a diagonal Gaussian over the joint latent.
* Gamma-Poisson: ``z ~ Gamma(a, b)`` (a positive latent, sampled by the
  analyses in log space), ``x_i | z ~ Poisson(z)``; posterior
  ``Gamma(a + sum x, b + m)`` and ``log p(x)`` are closed form, and so is the
  ELBO of a log-normal guide (:func:`lognormal_elbo`).

Tolerances: ``TOL_OPT`` is the local optimisation's stopping rule (it stops
when a window's mean ELBO improves by less than ``tol`` = 0.002 nats; from the
curvature of these objectives that leaves it within ~0.01 nats of the
optimum); every other margin is a multiple ``Z`` of a computed standard error.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.errors import ConfigError, DataError
from ppl_vae.inference.gaps.ais import ais
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.gaps.local import optimize_local
from ppl_vae.inference.latent import guide_in_latent_space, latent_of
from ppl_vae.inference.mcmc.compare import compare
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.mcmc.vi import vi_draws_amortized
from ppl_vae.models.ppca import PPCA

Z = 4.0  # standard errors: a check fails by chance with probability < 1e-4
TOL_OPT = 0.01
LOCAL = {"lr": 0.01, "num_samples": 30, "tol": 0.002, "max_steps": 3000, "check_every": 50}


def se_of_mean(se: torch.Tensor) -> float:
    return (se.double().pow(2).sum().sqrt() / len(se)).item()


# ---------------------------------------------------------------- PPCA in two sites


class SplitPPCA:
    """PPCA ``m`` (latent dim 3) written with latent sites ``z1`` (size 2) and ``z2`` (a scalar)."""

    def __init__(self, m: PPCA) -> None:
        assert m.latent_dim == 3
        self.m = m

    def __call__(self, x: torch.Tensor) -> None:
        W, mu = self.m.W, self.m.mu
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            loc = z1 @ W[:, :2].T + z2.unsqueeze(-1) * W[:, 2] + mu
            pyro.sample("x", dist.Normal(loc, self.m.sigma.expand_as(loc)).to_event(1), obs=x)


def split_ppca(seed: int = 0, D: int = 6, sigma: float = 0.5) -> tuple[SplitPPCA, torch.Tensor]:
    torch.manual_seed(seed)
    m = PPCA(D, 3, sigma=sigma).double()
    with torch.no_grad():
        m.mu.normal_()
        m.W[:, 2] = 0.8 * m.W[:, 0] + 0.3 * m.W[:, 2]  # correlate z2 with z1 in the posterior
    for p in m.parameters():
        p.requires_grad_(False)
    return SplitPPCA(m), m.sample(12)


def marginal_guide(m: PPCA, inflate: float = 1.0):
    """Independent sites with the exact posterior means and (inflated) marginal sds: diagonal over the joint latent."""

    def guide(x: torch.Tensor) -> None:
        post = m.posterior(x)
        sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt() * inflate
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(post.mean[:, :2], sd[:, :2]).to_event(1))
            pyro.sample("z2", dist.Normal(post.mean[:, 2], sd[:, 2]))

    return guide


def chain_rule_guide(m: PPCA):
    """The exact posterior as q(z1 | x) q(z2 | z1, x): sites that depend on each other."""

    def guide(x: torch.Tensor) -> None:
        post = m.posterior(x)
        mean, cov = post.mean, post.covariance_matrix
        s11, s12, s22 = cov[:, :2, :2], cov[:, :2, 2], cov[:, 2, 2]
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(mean[:, :2], covariance_matrix=s11))
            coef = torch.linalg.solve(s11, s12.unsqueeze(-1)).squeeze(-1)  # Sigma_11^-1 Sigma_12
            cond_mean = mean[:, 2] + (coef * (z1 - mean[:, :2])).sum(-1)
            cond_var = s22 - (coef * s12).sum(-1)
            pyro.sample("z2", dist.Normal(cond_mean, cond_var.sqrt()))

    return guide


def gaussian_kl_same_mean(cov_q: torch.Tensor, cov_p: torch.Tensor) -> torch.Tensor:
    """KL(N(m, cov_q) || N(m, cov_p)) per row."""
    k = cov_q.shape[-1]
    return 0.5 * (
        torch.linalg.solve(cov_p, cov_q).diagonal(dim1=-2, dim2=-1).sum(-1)
        - k
        + torch.logdet(cov_p)
        - torch.logdet(cov_q)
    )


def test_latent_of_two_sites_and_the_guide_is_diagonal_over_them():
    model, x = split_ppca()
    latent = latent_of(model, x, guide=marginal_guide(model.m))
    assert (
        latent.names == ("z1", "z2")
        and latent.dim == 3
        and latent.labels() == ["z1[0]", "z1[1]", "z2"]
    )
    q, why = guide_in_latent_space(marginal_guide(model.m), latent, x)
    post = model.m.posterior(x)
    assert why == "" and torch.allclose(q.mean, post.mean)
    assert torch.allclose(q.stddev, post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt())
    q2, why2 = guide_in_latent_space(chain_rule_guide(model.m), latent, x)
    assert q2 is None and "'z2' depends on another site" in why2


def test_two_site_gaps_match_the_closed_forms():
    model, x = split_ppca()
    m = model.m
    post = m.posterior(x)
    exact = m.log_marginal(x)
    lam = torch.linalg.inv(post.covariance_matrix)
    kl_mf = 0.5 * (
        lam.diagonal(dim1=-2, dim2=-1).log().sum(-1) - torch.logdet(lam)
    )  # KL of the best mean-field q*
    kl_q = gaussian_kl_same_mean(
        torch.diag_embed(post.covariance_matrix.diagonal(dim1=-2, dim2=-1)), post.covariance_matrix
    )
    assert kl_mf.mean() > 0.1  # the two sites are clearly correlated in the posterior
    r = decompose(
        model,
        marginal_guide(m),
        x,
        families=("diagonal", "full"),
        num_samples=3000,
        elbo_samples=3000,
        local_options=LOCAL,
        seed=0,
    )
    assert r.family == "diagonal" and r.q_in_family
    # L[q] in closed form: log p(x) - KL(q || p)
    assert abs((r.elbo_q - (exact - kl_q)).mean().item()) < Z * se_of_mean(r.elbo_q_se)
    # log p-hat (IWAE from the best q*, the full-covariance one, which is exact): log p(x)
    assert abs((r.log_px - exact).mean().item()) < Z * se_of_mean(r.log_px_se) + 1e-3
    # approximation gap of the diagonal family: the mean-field KL; of the full family: 0
    approx = (r.log_px - r.elbo_local["diagonal"]).mean().item()
    assert abs(approx - kl_mf.mean().item()) < TOL_OPT + Z * se_of_mean(
        r.elbo_local_se["diagonal"]
    ), (approx, kl_mf.mean())
    assert abs((exact - r.elbo_local["full"]).mean().item()) < TOL_OPT + Z * se_of_mean(
        r.elbo_local_se["full"]
    )
    # amortisation gap: KL(q || p) - KL(q*_MF || p)
    amort = r.amortisation_gap.mean().item()
    expected = (kl_q - kl_mf).mean().item()
    assert expected > 0.05
    assert abs(amort - expected) < TOL_OPT + Z * math.hypot(
        se_of_mean(r.elbo_q_se), se_of_mean(r.elbo_local_se["diagonal"])
    ), (amort, expected)


def test_a_structured_guide_is_refused_by_default_and_compared_with_an_explicit_family():
    model, x = split_ppca()
    guide = chain_rule_guide(model.m)
    with pytest.raises(ConfigError, match="'z2' depends on another site.*pass families"):
        decompose(model, guide, x)
    r = decompose(
        model,
        guide,
        x[:6],
        families=("full",),
        num_samples=500,
        elbo_samples=500,
        local_options=LOCAL,
        seed=0,
    )
    exact = model.m.log_marginal(x[:6])
    assert not r.q_in_family and r.family == "full" and "not in this family" not in r.name
    # the chain-rule guide is the exact posterior: L[q] = log p(x) with zero variance, and q* (full) reaches it too
    assert torch.allclose(r.elbo_q, exact, atol=1e-8) and r.elbo_q_se.max() < 1e-6
    assert (
        abs(r.inference_gap.mean().item()) < Z * se_of_mean(r.log_px_se) + 1e-3
    )  # log p-hat: IWAE, exact up to its MC error
    assert abs(r.amortisation_gap.mean().item()) < TOL_OPT + Z * se_of_mean(r.elbo_local_se["full"])


@pytest.mark.slow
def test_ais_anneals_both_sites_to_the_exact_log_px():
    model, x = split_ppca(seed=1, sigma=0.8)
    exact = model.m.log_marginal(x)
    r = ais(model, x, num_steps=200, num_chains=16, seed=0)
    err = (r.log_px - exact).mean().item()
    # AIS is a stochastic lower bound: its bias is what it misses of the final density; 4 SE of the mean
    assert abs(err) < Z * se_of_mean(r.log_px_se) + 0.02, (err, se_of_mean(r.log_px_se))


@pytest.mark.slow
@pytest.mark.arviz
def test_hmc_and_vi_draws_cover_every_site():
    model, x = split_ppca()
    x = x[:4]
    draws = hmc_latent(model, x, num_samples=400, warmup_steps=300, num_chains=4, seed=0)
    assert draws.samples["z1"].shape == (4, 400, 4, 2) and draws.samples["z2"].shape == (4, 400, 4)
    post = model.m.posterior(x)
    z = np.concatenate([draws.samples["z1"], draws.samples["z2"][..., None]], -1)
    mean = z.mean((0, 1))
    diag = draws.diagnostics()
    mcse = np.concatenate(
        [
            diag.loc[[f"z1[{n}, {k}]" for n in range(4) for k in range(2)], "mcse_mean"]
            .to_numpy()
            .reshape(4, 2),
            diag.loc[[f"z2[{n}]" for n in range(4)], "mcse_mean"].to_numpy().reshape(4, 1),
        ],
        -1,
    )
    np.testing.assert_array_less(np.abs(mean - post.mean.numpy()), Z * mcse)
    vi = vi_draws_amortized(model, marginal_guide(model.m), x, num_samples=2000, seed=1)
    assert vi.samples["z1"].shape == (1, 2000, 4, 2) and vi.samples["z2"].shape == (1, 2000, 4)
    c = compare(draws, vi)
    assert c.dims == ("z1[0]", "z1[1]", "z2")
    # the guide has the exact marginals: sd ratios near 1 (MC error of an sd from ESS draws: sd / sqrt(2 ESS))
    ess = c.per_dim["mcmc_ess_bulk"]
    assert np.all(np.abs(c.per_dim["sd_ratio"] - 1) < Z * np.sqrt(1 / (2 * ess) + 1 / (2 * 2000)))


def test_a_guide_that_does_not_pair_with_the_model_is_refused_by_name():
    model, x = split_ppca()

    def lacks_z2(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    def extra_site(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))

    with pytest.raises(ConfigError, match="guide has no site 'z2'"):
        importance_bounds(model, lacks_z2, x, num_samples=10)
    with pytest.raises(ConfigError, match="guide has no site 'z2'"):
        decompose(model, lacks_z2, x)
    with pytest.raises(ConfigError, match="guide site 'w' is not a latent site of the model"):
        importance_bounds(model, extra_site, x, num_samples=10)
    with pytest.raises(DataError, match=r"failed on the data of shape \(12, 4\)"):
        decompose(model, marginal_guide(model.m), x[:, :4])


# ---------------------------------------------------------------- a positive latent


A, B, M = 2.0, 1.0, 5  # Gamma(A, B) prior, M Poisson counts per datapoint


def gamma_poisson(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Gamma(x.new_tensor(A), x.new_tensor(B)).expand([x.shape[0]]))
        pyro.sample("x", dist.Poisson(z.unsqueeze(-1).expand(*z.shape, M)).to_event(1), obs=x)


def gamma_poisson_data(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch._standard_gamma(torch.full((n,), A, dtype=torch.float64), generator=g) / B
    return torch.poisson(z.unsqueeze(-1).expand(-1, M), generator=g)


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    s = x.sum(-1)
    return (
        torch.lgamma(A + s)
        - math.lgamma(A)
        + A * math.log(B)
        - (A + s) * torch.log(B + x.new_tensor(M))
        - torch.lgamma(x + 1).sum(-1)
    )


def lognormal_elbo(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Closed-form ELBO of q = LogNormal(mu, sigma): E[log z] = mu, E[z] = exp(mu + sigma^2 / 2)."""
    s = x.sum(-1)
    e_log_joint = (
        A * math.log(B)
        - math.lgamma(A)
        + (A - 1 + s) * mu
        - (B + M) * torch.exp(mu + sigma**2 / 2)
        - torch.lgamma(x + 1).sum(-1)
    )
    entropy = mu + 0.5 + torch.log(sigma) + 0.5 * math.log(2 * math.pi)
    return e_log_joint + entropy


def lognormal_guide(shrink: float = 1.0):
    """Log-normal q matching the exact Gamma posterior's log-moments (digamma, trigamma), its sd times ``shrink``."""

    def guide(x: torch.Tensor) -> None:
        a, b = A + x.sum(-1), B + M
        mu = torch.digamma(a) - math.log(b)
        sigma = torch.polygamma(1, a).sqrt() * shrink
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal(mu, sigma))

    return guide


def best_lognormal_elbo(x: torch.Tensor) -> torch.Tensor:
    """max over (mu, sigma) of the closed-form ELBO, per datapoint (L-BFGS on a smooth 2-d concave-ish objective)."""
    a = A + x.sum(-1)
    mu = (torch.digamma(a) - math.log(B + M)).clone().requires_grad_(True)
    log_sigma = (0.5 * torch.polygamma(1, a).log()).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [mu, log_sigma],
        max_iter=200,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = -lognormal_elbo(x, mu, log_sigma.exp()).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lognormal_elbo(x, mu, log_sigma.exp()).detach()


def test_positive_latent_is_sampled_in_log_space():
    x = gamma_poisson_data()
    latent = latent_of(gamma_poisson, x, guide=lognormal_guide())
    assert latent.names == ("z",) and latent.dim == 1 and not latent.sites[0].identity
    q, why = guide_in_latent_space(lognormal_guide(), latent, x)
    assert why == "" and q.event_shape == (1,)  # a log-normal is a Gaussian over log z


@pytest.mark.slow
def test_positive_latent_bounds_gaps_and_ais_against_closed_forms():
    x = gamma_poisson_data()
    exact = exact_log_px(x)
    guide = lognormal_guide(shrink=0.6)
    r = decompose(
        gamma_poisson, guide, x, num_samples=4000, elbo_samples=4000, local_options=LOCAL, seed=0
    )
    a = A + x.sum(-1)
    elbo_q = lognormal_elbo(
        x, torch.digamma(a) - math.log(B + M), 0.6 * torch.polygamma(1, a).sqrt()
    )
    assert abs((r.elbo_q - elbo_q).mean().item()) < Z * se_of_mean(r.elbo_q_se)
    best = best_lognormal_elbo(x)
    assert abs((r.elbo_qstar - best).mean().item()) < TOL_OPT + Z * se_of_mean(
        r.elbo_local_se["diagonal"]
    )
    assert abs((r.log_px - exact).mean().item()) < Z * se_of_mean(r.log_px_se) + 1e-3
    # the approximation gap is what a log-normal misses of a Gamma posterior: small and positive
    assert 0 < (exact - best).mean().item() < 0.05
    r_ais = ais(gamma_poisson, x, num_steps=200, num_chains=16, seed=0)
    assert abs((r_ais.log_px - exact).mean().item()) < Z * se_of_mean(r_ais.log_px_se) + 0.02


@pytest.mark.slow
@pytest.mark.arviz
def test_positive_latent_hmc_matches_the_gamma_posterior():
    x = gamma_poisson_data(n=4)
    draws = hmc_latent(gamma_poisson, x, num_samples=500, warmup_steps=300, num_chains=4, seed=0)
    z = draws.samples["z"]
    assert z.shape == (4, 500, 4) and (z > 0).all()
    exact_mean = ((A + x.sum(-1)) / (B + M)).numpy()
    mcse = draws.diagnostics().loc[[f"z[{n}]" for n in range(4)], "mcse_mean"].to_numpy()
    np.testing.assert_array_less(np.abs(z.mean((0, 1)) - exact_mean), Z * mcse)


# ---------------------------------------------------------------- refusals by name


def discrete_model(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z + c.unsqueeze(-1), 1.0).to_event(1), obs=x)


def discrete_guide(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
        pyro.sample("z", dist.Normal(x, 1.0).to_event(1))


def global_model(x: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)


def point_mass_guide(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(x).to_event(1))


def plain_model(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


@pytest.mark.parametrize(
    "run",
    [
        lambda x: decompose(discrete_model, discrete_guide, x),
        lambda x: optimize_local(discrete_model, x),
        lambda x: ais(discrete_model, x),
        lambda x: hmc_latent(discrete_model, x),
        lambda x: vi_draws_amortized(discrete_model, discrete_guide, x),
    ],
    ids=["decompose", "optimize_local", "ais", "hmc_latent", "vi_draws"],
)
def test_a_discrete_site_is_refused_by_name_before_any_work(run):
    x = torch.randn(3, 2)
    with pytest.raises(ConfigError, match="site 'c' is discrete"):
        run(x)


def test_global_latents_and_point_masses_are_refused_by_name():
    x = torch.randn(3, 2)
    with pytest.raises(ConfigError, match="site 'w' is outside the data plate"):
        hmc_latent(global_model, x)
    with pytest.raises(ConfigError, match="guide site 'z' is a point mass"):
        decompose(plain_model, point_mass_guide, x)
    with pytest.raises(ConfigError, match="guide site 'z' is a point mass"):
        vi_draws_amortized(plain_model, point_mass_guide, x)
