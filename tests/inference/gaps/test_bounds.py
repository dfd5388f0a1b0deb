r"""Per-datapoint bounds (ELBO, IWAE, AIS, BDMC) against PPCA's exact log p(x).

PPCA is run in float64 with its parameters frozen; tolerances are stated in
Monte Carlo standard errors (SE) of the quantity compared (``Z`` of them: a
check fails by chance with probability < 1e-4), plus, for log-mean-exp
estimates (IWAE, AIS), their known bias: :math:`E[\log \bar w] \approx \log p
- \mathrm{Var}(w) / (2 C \bar w^2) = \log p - SE^2 / 2` with the delta-method SE.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Z, frozen_ppca, inflated_guide, log_mean_exp_bias, se_of_mean

from ppl_vae.errors import ConfigError
from ppl_vae.inference.gaps.ais import MIN_CHAINS_SE, ais, bdmc
from ppl_vae.inference.gaps.bounds import Bounds, importance_bounds
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.random import Streams, Tag
from ppl_vae.inference.traces import log_weights
from ppl_vae.models.ppca import PPCA


def kl_of_guide(m: PPCA, x: torch.Tensor, factor: float) -> torch.Tensor:
    """KL(q || p(z | x)) of :func:`inflated_guide`: same means, covariance diag(marginal variances) * factor^2."""
    cov_p = m.posterior(x).covariance_matrix
    cov_q = torch.diag_embed(cov_p.diagonal(dim1=-2, dim2=-1)) * factor**2
    k = cov_p.shape[-1]
    return 0.5 * (
        torch.linalg.solve(cov_p, cov_q).diagonal(dim1=-2, dim2=-1).sum(-1)
        - k
        + torch.logdet(cov_p)
        - torch.logdet(cov_q)
    )


def test_exact_guide_gives_exact_bounds_with_zero_variance():
    m = frozen_ppca()
    x = m.sample(7)
    b = importance_bounds(m, m.exact_guide, x, num_samples=50, sample_batch=9, batch_size=3, seed=0)
    exact = m.log_marginal(x)
    assert torch.allclose(b.elbo, exact, atol=1e-9)
    assert torch.allclose(b.iwae, exact, atol=1e-9)
    assert b.elbo_se.max() < 1e-6 and b.iwae_se.max() < 1e-6


def test_streamed_bounds_equal_the_direct_formulas_on_the_same_draws():
    m = frozen_ppca()
    x = m.sample(5)
    guide = inflated_guide(m)
    K = 64
    b = importance_bounds(m, guide, x, num_samples=K, sample_batch=K, batch_size=5, seed=3)
    lw = log_weights(
        m, guide, x, num_samples=K, streams=Streams(3, torch.arange(5), x.device, Tag.BOUNDS, 0)
    )  # datapoint n's stream, sample chunk 0
    assert torch.allclose(b.elbo, lw.mean(0), atol=1e-9)
    assert torch.allclose(b.elbo_se, lw.std(0) / math.sqrt(K), atol=1e-9)
    assert torch.allclose(b.iwae, torch.logsumexp(lw, 0) - math.log(K), atol=1e-9)
    w = (lw - lw.max(0).values).exp()
    assert torch.allclose(b.iwae_se, w.std(0) / (math.sqrt(K) * w.mean(0)), rtol=1e-6)


def test_each_datapoint_gets_the_same_bounds_whatever_its_batch_and_neighbours():
    m = frozen_ppca()
    x = m.sample(9)
    guide = inflated_guide(m)
    whole = importance_bounds(m, guide, x, num_samples=200, batch_size=9, seed=5)
    for batch in (1, 4):
        again = importance_bounds(m, guide, x, num_samples=200, batch_size=batch, seed=5)
        for k in ("elbo", "elbo_se", "iwae", "iwae_se"):
            assert torch.allclose(getattr(again, k), getattr(whole, k), rtol=1e-12, atol=1e-12), (
                batch,
                k,
            )
    rows = torch.tensor([7, 2, 5])
    part = importance_bounds(m, guide, x[rows], num_samples=200, batch_size=2, seed=5, index=rows)
    assert torch.allclose(part.iwae, whole.iwae[rows], rtol=1e-12, atol=1e-12)
    other = importance_bounds(m, guide, x, num_samples=200, batch_size=9, seed=6)
    assert not torch.allclose(other.elbo, whole.elbo), "another seed gives other draws"


def test_a_guide_that_is_not_gaussian_runs_row_by_row_with_the_same_streams():
    m = frozen_ppca()
    x = m.sample(4)

    def gamma_guide(x):  # a positive latent: drawn one datapoint at a time
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.Gamma(x.new_full((x.shape[0], m.latent_dim), 2.0), 2.0).to_event(1)
            )

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Gamma(x.new_full((x.shape[0], m.latent_dim), 2.0), 1.0).to_event(1)
            )
            pyro.sample(
                "x",
                dist.Normal(
                    z.sum(-1, keepdim=True).expand(*z.shape[:-1], x.shape[-1]), 1.0
                ).to_event(1),
                obs=x,
            )

    a = importance_bounds(model, gamma_guide, x, num_samples=50, batch_size=4, seed=1)
    b = importance_bounds(
        model, gamma_guide, x[2:], num_samples=50, batch_size=1, seed=1, index=torch.tensor([2, 3])
    )
    assert torch.allclose(a.elbo[2:], b.elbo, rtol=1e-12)
    assert torch.isfinite(a.iwae).all()


def test_iwae_rises_toward_exact_log_px_and_reaches_it_at_large_K():
    m = frozen_ppca()
    x = m.sample(40)
    exact = m.log_marginal(x)
    guide = inflated_guide(m)
    means, ses, last = [], [], None
    for i, K in enumerate((1, 10, 100, 5000)):
        last = importance_bounds(m, guide, x, num_samples=K, seed=10 + i)
        means.append(last.iwae.mean().item())
        # SE of the mean from the datapoints' own draws (K = 1 has none: the spread of its errors over datapoints)
        ses.append(
            (last.iwae_se.pow(2).sum().sqrt() / len(x)).item()
            if K > 1
            else ((exact - last.iwae).std() / math.sqrt(len(x))).item()
        )
    for i in range(
        3
    ):  # E[IWAE_K] rises with K: each mean is above the last, within Z combined standard errors
        assert means[i + 1] > means[i] - Z * math.hypot(ses[i], ses[i + 1]), (
            f"IWAE means should rise with K: {means} (SE {ses})"
        )
    # K = 1 is one ELBO draw per point: its mean is log p(x) - KL(q || p) (closed form); SE: the sd of the draws / sqrt(N)
    k1 = importance_bounds(m, guide, x, num_samples=1, seed=10)
    kl = kl_of_guide(m, x, 1.6)
    assert kl.mean() > 0.2  # the loose guide leaves a clear ELBO gap
    draws = exact - kl - k1.elbo  # zero-mean errors
    assert abs(draws.mean().item()) < Z * draws.std().item() / math.sqrt(len(x))
    # at K = 5000: per datapoint within 4 SE (plus the O(1/K) bias, < 1e-3 here), and on average within 4 SE of the mean
    err = exact - last.iwae
    assert (err.abs() <= 4 * last.iwae_se + 1e-3).all(), err
    assert abs(err.mean().item()) <= 4 * (last.iwae_se.pow(2).sum().sqrt() / len(x)).item() + 1e-3


def test_one_draw_gives_no_standard_error_rather_than_a_nan():
    m = frozen_ppca()
    x = m.sample(4)
    one = importance_bounds(m, inflated_guide(m), x, num_samples=1, seed=0)
    assert one.elbo_se is None and one.iwae_se is None
    assert torch.isfinite(one.elbo).all() and torch.equal(
        one.elbo, one.iwae
    )  # K = 1: the IWAE bound is the one draw's ELBO
    assert list(one.to_dataframe().columns) == ["elbo", "iwae", "khat", "reliable"]
    assert not one.reliable.any()  # one draw: no tail to check either
    assert Bounds.concat([one, one]).elbo_se is None
    r = ais(m, x, num_steps=5, num_chains=1, seed=0)
    assert r.log_px_se is None and "log_px_se" not in r.to_dataframe().columns
    # AIS's SE is over its chains: none from fewer than MIN_CHAINS_SE (a sample variance of 2 or 3 weights says little)
    assert ais(m, x, num_steps=5, num_chains=MIN_CHAINS_SE - 1, seed=0).log_px_se is None
    few = ais(m, x, num_steps=5, num_chains=MIN_CHAINS_SE, seed=0)
    assert few.log_px_se is not None and torch.isfinite(few.log_px_se).all()
    # the gap report carries a standard error on every number: one draw is refused by name, before any work
    with pytest.raises(ConfigError, match="ELBO samples .at least 2 for a standard error"):
        decompose(m, m.exact_guide, x, elbo_samples=1)
    with pytest.raises(ConfigError, match=f"AIS chains .at least {MIN_CHAINS_SE}"):
        decompose(m, m.exact_guide, x, logpx="ais", ais_options={"num_chains": MIN_CHAINS_SE - 1})


@pytest.mark.slow
def test_ais_recovers_exact_log_px():
    m = frozen_ppca(D=5, d=2, sigma=1.0)
    x = m.sample(12)
    exact = m.log_marginal(x)
    r = ais(m, x, num_steps=300, num_chains=16, seed=0)
    err = r.log_px - exact
    assert abs(err.mean().item()) < Z * se_of_mean(r.log_px_se) + log_mean_exp_bias(r.log_px_se)
    # adaptation works: it aims at 0.65; the pilot's dual averaging keeps the rate within (0.3, 0.95) on a Gaussian
    assert 0.3 < r.accept_rate.mean().item() < 0.95


def test_ais_from_the_guide_is_also_accurate():
    m = frozen_ppca(D=5, d=2, sigma=1.0)
    x = m.sample(8)
    r = ais(m, x, init=inflated_guide(m), num_steps=100, num_chains=8, seed=1)
    err = (r.log_px - m.log_marginal(x)).mean().item()
    assert abs(err) < Z * se_of_mean(r.log_px_se) + log_mean_exp_bias(r.log_px_se)
    assert r.init == "guide"


@pytest.mark.slow
def test_bdmc_brackets_exact_log_px():
    m = frozen_ppca(D=5, d=2, sigma=0.7)
    template = torch.zeros(12, 5, dtype=torch.float64)
    b = bdmc(m, template, num_steps=300, num_chains=4, seed=0)
    exact = m.log_marginal(b.x)
    assert not torch.equal(b.x, template)  # data were simulated
    # stochastic bounds: each side within Z SE of the mean of its side of the bracket
    assert b.lower.mean() <= exact.mean() + Z * se_of_mean(b.lower_se)
    assert b.upper.mean() >= exact.mean() - Z * se_of_mean(b.upper_se)
    # the bracket is AIS's error bound on such data; with 300 steps on a 2-d Gaussian posterior it is a fraction of a nat
    # (0.06 measured); 0.5 would mean the schedule or the HMC adaptation has broken
    assert -Z * math.hypot(se_of_mean(b.lower_se), se_of_mean(b.upper_se)) <= b.width.mean() < 0.5
    per_point = (b.lower <= exact + Z * b.lower_se) & (b.upper >= exact - Z * b.upper_se)
    # at Z SE nearly every bracket holds; 10 % slack for points whose 4-chain delta-method SE understates heavy-tailed weights
    assert per_point.float().mean() >= 0.9


def test_bad_inputs_are_clear_errors():
    m = frozen_ppca()
    x = m.sample(3)
    with pytest.raises(ConfigError, match="K must be an integer from 1 to"):
        importance_bounds(m, m.exact_guide, x, num_samples=0)
    with pytest.raises(ConfigError, match="num-steps must be a positive integer"):
        ais(m, x, num_steps=0)

    def other_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "w", dist.Normal(torch.zeros(x.shape[0], 2, dtype=x.dtype), 1.0).to_event(1)
            )

    with pytest.raises(ConfigError, match="the guide has no site 'z', a latent site of the model"):
        decompose(m, other_guide, x)


def test_ais_gives_each_datapoint_the_same_estimate_whatever_its_batch():
    # a model that rounds each row alike in any batch (a BLAS matmul need not: RowwisePPCA), so that the
    # ~600 chaotic leapfrog steps check AIS's own arithmetic and streams, not the BLAS kernel's choice
    m = frozen_ppca(rowwise=True)
    x = m.sample(6)
    whole = ais(m, x, num_steps=30, num_chains=4, seed=2)
    one_by_one = ais(m, x, num_steps=30, num_chains=4, seed=2, batch_size=1)
    rows = torch.tensor([4, 1])
    part = ais(m, x[rows], num_steps=30, num_chains=4, seed=2, index=rows)
    for k in ("log_px", "log_px_se", "accept_rate", "step_size"):
        assert torch.allclose(getattr(one_by_one, k), getattr(whole, k), rtol=1e-9, atol=1e-9), k
        assert torch.allclose(getattr(part, k), getattr(whole, k)[rows], rtol=1e-9, atol=1e-9), k


def test_iwae_standard_error_matches_the_spread_across_seeds_where_it_is_reported_reliable():
    # 200 independent repeats of each of 5 datapoints (distinct dataset indices: independent streams), K = 1000
    from scipy.stats import chi2

    m = frozen_ppca(D=6, d=3, sigma=0.5)
    x = m.sample(5)
    R, K = 200, 1000
    rep = x.repeat(R, 1)
    # the band the ratio sd / rms(SE) keeps with probability 1 - 1e-4 per datapoint, if the SE is right (chi-square, R - 1 df)
    lo, hi = (math.sqrt(chi2.ppf(p, R - 1) / (R - 1)) for p in (0.5e-4, 1 - 0.5e-4))

    def spread(factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        b = importance_bounds(m, inflated_guide(m, factor), rep, num_samples=K, seed=0)
        return b.iwae.view(R, 5).std(0) / b.iwae_se.view(R, 5).pow(2).mean(
            0
        ).sqrt(), b.reliable.view(R, 5).double().mean(0)

    # a proposal wider than the posterior: bounded weights (k = 1 - 1.6^2 < 0), every datapoint reliable, its SE right
    ratio, reliable = spread(1.6)
    assert (reliable == 1).all()
    assert ((ratio > lo) & (ratio < hi)).all(), (ratio, lo, hi)
    # half as wide: w ~ Pareto tail with k = 1 - 0.5^2 = 0.75 > 0.7 (infinite variance); most draws flagged, and rightly:
    # across seeds the estimates scatter beyond what their SE says
    ratio, reliable = spread(0.5)
    assert (reliable < 0.5).all(), reliable
    assert (ratio > hi).all(), (ratio, hi)


def test_khat_from_the_kept_tail_is_psis_khat_of_all_weights_and_too_few_draws_are_never_reliable():
    from ppl_vae.inference.azcompat import pareto_khat
    from ppl_vae.inference.gaps.bounds import khat_of_tail, khat_threshold, tail_size

    g = torch.Generator().manual_seed(0)
    for K in (30, 1000, 5000):
        lw = torch.randn(K, 5, generator=g, dtype=torch.float64) * torch.tensor(
            [0.1, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64
        )
        kept = khat_of_tail(lw.topk(tail_size(K), 0).values, lw.min(0).values, K)
        assert torch.allclose(kept, torch.from_numpy(pareto_khat(lw.T.numpy())), rtol=0, atol=1e-12)
    assert (
        khat_threshold(24) == -math.inf
        and khat_threshold(100) == pytest.approx(0.5)
        and khat_threshold(5000) == 0.7
    )
    m = frozen_ppca()
    b = importance_bounds(m, m.exact_guide, m.sample(3), num_samples=10, seed=0)
    assert (
        torch.isinf(b.khat).all() and not b.reliable.any()
    )  # ten draws: no tail to check, so no SE to trust
    assert {"khat", "reliable"} <= set(b.to_dataframe().columns)
