r"""Do the reported standard errors cover the truth? Over at least 50 independent repeats, ±1.96 SE must hold the
exact value between 85 % and 99 % of the time (nominal 95 %).

Repeats are rows with distinct dataset indices (each row draws from its own streams, so rows are independent
experiments), or simulated datapoints. The truth is PPCA's closed form: log p(x), the ELBO of a Gaussian q
(log p(x) - KL(q || p(z | x))), and the mean-field optimum's ELBO. The band is wide enough that an honest SE
fails it rarely: with n repeats the coverage of an exact 95 % interval has sd sqrt(0.05 * 0.95 / n) (0.028 at
60), so 0.85-0.99 is more than 3 sd either side.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import frozen_ppca, inflated_guide

from ppl_vae.inference.gaps.ais import ais, bdmc
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.models.ppca import PPCA

LOW, HIGH = 0.85, 0.99


def coverage(estimate: torch.Tensor, se: torch.Tensor, truth: torch.Tensor) -> float:
    return ((estimate - truth).abs() <= 1.96 * se).double().mean().item()


def gaussian_elbo(m: PPCA, x: torch.Tensor, loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """ELBO of q = N(loc, cov) per row: log p(x) - KL(q || p(z | x))."""
    post = m.posterior(x)
    q = torch.distributions.MultivariateNormal(loc, covariance_matrix=cov)
    return m.log_marginal(x) - torch.distributions.kl_divergence(q, post)


def test_elbo_and_iwae_standard_errors_cover_the_truth():
    m = frozen_ppca(D=7, d=3, sigma=0.6, seed=5)
    x = m.sample(4).repeat(60, 1)  # 4 datapoints x 60 repeats, each row its own streams
    post = m.posterior(x)
    sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    # exact means, marginal sds x 1.4: bounded weights (k < 0) and a clear ELBO gap
    b = importance_bounds(m, inflated_guide(m, 1.4), x, num_samples=500, seed=14)
    exact_elbo = gaussian_elbo(m, x, post.mean, torch.diag_embed((1.4 * sd) ** 2))
    assert LOW <= coverage(b.elbo, b.elbo_se, exact_elbo) <= HIGH
    assert LOW <= coverage(b.iwae, b.iwae_se, m.log_marginal(x)) <= HIGH


@pytest.mark.parametrize("chains", [4, 16])
def test_ais_standard_error_covers_the_truth_with_few_chains_too(chains):
    # 4 chains: a sample variance from 4 weights is itself uncertain; the SE is a Student-t interval (3 df)
    m = frozen_ppca(D=5, d=2, sigma=0.8, seed=6)
    x = m.sample(2).repeat(40, 1)
    r = ais(m, x, num_steps=40, num_chains=chains, seed=15)
    assert LOW <= coverage(r.log_px, r.log_px_se, m.log_marginal(x)) <= HIGH


@pytest.mark.slow
@pytest.mark.parametrize("chains", [4, 16])
def test_bdmc_standard_errors_cover_the_truth(chains):
    # 4 chains was the default: its delta-method SE was about half the spread over repeats (coverage ~0.8); with the
    # t-interval and at 16 chains both bounds are honest. Each simulated datapoint is a repeat (its own streams).
    m = frozen_ppca(D=5, d=2, sigma=0.7, seed=7)
    b = bdmc(m, torch.zeros(120, 5, dtype=torch.float64), num_steps=100, num_chains=chains, seed=16)
    exact = m.log_marginal(b.x)
    assert LOW <= coverage(b.lower, b.lower_se, exact) <= HIGH
    assert LOW <= coverage(b.upper, b.upper_se, exact) <= HIGH


@pytest.mark.slow
def test_gap_standard_errors_cover_the_truth():
    # the guide has the mean-field optimum's means and 1.3 x its sds, so q* (diagonal) converges to the optimum, whose
    # ELBO is closed-form: sds 1 / sqrt(Lambda_ii). Every per-datapoint number and gap of the report against its truth.
    m = frozen_ppca(D=7, d=3, sigma=0.6, seed=8)
    x = m.sample(5).repeat(12, 1)
    post = m.posterior(x)
    opt_var = torch.linalg.inv(post.covariance_matrix).diagonal(dim1=-2, dim2=-1).reciprocal()

    def guide(x):
        p = m.posterior(x)
        v = torch.linalg.inv(p.covariance_matrix).diagonal(dim1=-2, dim2=-1).reciprocal()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(p.mean, 1.3 * v.sqrt()).to_event(1))

    r = decompose(m, guide, x, num_samples=1000, elbo_samples=500, seed=17, warn=False)
    log_px = m.log_marginal(x)
    elbo_q = gaussian_elbo(m, x, post.mean, torch.diag_embed(1.69 * opt_var))
    elbo_star = gaussian_elbo(m, x, post.mean, torch.diag_embed(opt_var))
    assert r.qstar_converged["diagonal"].all()
    for est, se, truth in (
        (r.log_px, r.log_px_se, log_px),
        (r.elbo_q, r.elbo_q_se, elbo_q),
        (r.elbo_qstar, r.elbo_local_se["diagonal"], elbo_star),
        (r.approximation_gap, r.approximation_gap_se, log_px - elbo_star),
        (r.amortisation_gap, r.amortisation_gap_se, elbo_star - elbo_q),
        (r.inference_gap, r.inference_gap_se, log_px - elbo_q),
    ):
        assert LOW <= coverage(est, se, truth) <= HIGH, coverage(est, se, truth)
