"""Baselines, IWAE/VIMCO and gradient diagnostics: hand-derived gradients, unbiasedness, variance reduction.

Conjugate model (as in test_estimators): z ~ N(0, 1), x | z ~ N(z, 1), guide
q(z) = N(m, s^2) with parameters (m, log s); the exact ELBO gradient is
(x - 2m, 1 - 2 s^2). Stochastic tolerances are 4 Monte Carlo standard errors
(a false failure has probability ~1e-4 per coordinate).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Guide, X, exact_loss_grad, grad_draws, model
from torch import nn

from ppl_vae.errors import ConfigError
from ppl_vae.inference.estimators import IWAE, ScoreFunction, get_estimator
from ppl_vae.inference.gradients import gradient_stats


def _normal_terms(guide: Guide, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f = log p(x, z) - log q(z) and d log q / d(m, log s), for each draw in z ([K])."""
    m, s, x = guide.m.item(), guide.log_s.exp().item(), X.item()
    log_q = dist.Normal(m, s).log_prob(z)
    f = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(torch.tensor(x)) - log_q
    dlogq = torch.stack([(z - m) / s**2, -1 + (z - m) ** 2 / s**2], -1)
    return f, dlogq


def test_average_baseline_gradients_match_hand_derivation():
    guide = Guide()
    g = grad_draws("score+average", guide, 2)
    z1, z2 = guide.draws[-2].reshape(1), guide.draws[-1].reshape(1)
    f1, d1 = _normal_terms(guide, z1)
    f2, d2 = _normal_terms(guide, z2)
    # step 1: no history, b = 0 (Pyro's plain score-function gradient); step 2: the
    # bias-corrected moving average of one value is that value, b = f1
    torch.testing.assert_close(g[0], -(f1 * d1)[0])
    torch.testing.assert_close(g[1], -((f2 - f1) * d2)[0])


def _same_seed_gradients(a: str, b: str, seed: int) -> None:
    """One seeded gradient draw of estimators a and b from the same guide parameters agree."""
    pyro.set_rng_seed(seed)
    first = grad_draws(a, Guide(), 1)[0]
    pyro.set_rng_seed(seed)
    torch.testing.assert_close(grad_draws(b, Guide(), 1)[0], first)


def test_first_step_of_a_baseline_equals_pyro_score_function():
    _same_seed_gradients("score", "score+average", 3)


def test_loo_baseline_gradient_matches_hand_derivation():
    guide = Guide()
    g = grad_draws("score+loo", guide, 1, num_particles=3)[0]
    z = guide.draws[-1].reshape(3)
    f, d = _normal_terms(guide, z)
    b = (f.sum() - f) / 2
    torch.testing.assert_close(g, -((f - b)[:, None] * d).mean(0))


def test_nvil_gradient_and_its_network():
    guide = Guide()
    loss = ScoreFunction(baseline="nvil", hidden=4).loss(model, guide)
    (net_param, *rest) = loss.parameters(X)
    assert len(rest) == 3 and len(loss.modules) == 1  # Linear(1, 4) and Linear(4, 1)
    loss(X).backward()  # step 1: b = 0 + 1 * net(x) = 0 (zero-initialised output layer)
    g1 = torch.cat([guide.m.grad, guide.log_s.grad])
    f1, d1 = _normal_terms(guide, guide.draws[-1].reshape(1))
    torch.testing.assert_close(g1, -(f1 * d1)[0])
    assert (
        loss.modules[0][-1].bias.grad.abs().item() > 0
    )  # the network is trained by the same backward
    value = loss(X)  # the value is the negative ELBO draw, the network's loss adds nothing to it
    f2, _ = _normal_terms(guide, guide.draws[-1].reshape(1))
    torch.testing.assert_close(value, -f2[0])


def test_iwae_gradient_matches_hand_derivation_and_k1_is_the_elbo():
    guide = Guide()
    g = grad_draws("iwae", guide, 1, num_particles=2)[0]
    z = guide.draws[-1].reshape(2)
    m, s, x = guide.m.item(), guide.log_s.exp().item(), X.item()
    f, _ = _normal_terms(guide, z)
    w = torch.softmax(f, 0)
    eps = (z - m) / s
    # pathwise: d f_k / dm = x - 2 z_k, d f_k / dlog s = (x - 2 z_k) s eps_k + 1
    per_k = torch.stack([x - 2 * z, (x - 2 * z) * s * eps + 1], -1)
    torch.testing.assert_close(g, -(w[:, None] * per_k).sum(0))
    _same_seed_gradients("reparam", "iwae", 5)


def test_iwae_value_equals_pyro_renyi_alpha_zero_for_one_datapoint():
    guide = Guide()
    pyro.set_rng_seed(7)
    ours = IWAE().loss(model, guide, 5)(X).item()
    pyro.set_rng_seed(7)
    with torch.no_grad():
        theirs = pyro.infer.RenyiELBO(alpha=0.0, num_particles=5, vectorize_particles=True).loss(
            model, guide, X
        )
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(
    ("estimator", "k"), [("score+average", 1), ("score+nvil", 1), ("score+loo", 2), ("iwae", 1)]
)
def test_baselines_are_unbiased(estimator, k):
    guide = Guide()
    draws = grad_draws(estimator, guide, 1000, num_particles=k)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    exact = exact_loss_grad(guide)
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean, exact, se)


def _tiny_discrete():
    """z in {0,1}^2 ~ Bern(0.3), x | z ~ N(w . z, 1); guide Bern(sigmoid(logits)). Exact ELBO/IWAE by enumeration."""
    logits = nn.Parameter(torch.tensor([0.4, -0.8]))
    w = nn.Parameter(torch.tensor([1.0, -0.5]))
    x = torch.tensor([[1.3]])

    def bmodel(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal((z * w).sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def bguide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    zs = torch.tensor([[a, b] for a in (0.0, 1.0) for b in (0.0, 1.0)])
    log_q = dist.Bernoulli(logits=logits).log_prob(zs).sum(-1)
    f = (
        dist.Bernoulli(0.3 * torch.ones(2)).log_prob(zs).sum(-1)
        + dist.Normal((zs * w).sum(-1), 1.0).log_prob(x[0, 0])
        - log_q
    )
    return bmodel, bguide, x, (logits, w), f, log_q


def _draws(estimator, bmodel, bguide, x, params, n, k):
    loss = get_estimator(estimator).loss(bmodel, bguide, k)
    return torch.stack([torch.cat(torch.autograd.grad(loss(x), params)) for _ in range(n)])


@pytest.mark.parametrize(("estimator", "k"), [("score+average", 1), ("score+loo", 3), ("iwae", 3)])
def test_discrete_gradients_are_unbiased_against_enumeration(estimator, k):
    bmodel, bguide, x, params, f, log_q = _tiny_discrete()
    if estimator == "iwae":  # exact gradient of the K-sample bound, summing over all K-tuples
        q = log_q.exp()
        idx = torch.cartesian_prod(*[torch.arange(4)] * k)
        bound = (q[idx].prod(-1) * (torch.logsumexp(f[idx], -1) - math.log(k))).sum()
    else:
        bound = (log_q.exp() * f).sum()
    exact = -torch.cat(torch.autograd.grad(bound, params))
    draws = _draws(estimator, bmodel, bguide, x, params, 1200, k)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean, exact, se)


def _variance_and_se(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sq = (draws - draws.mean(0)) ** 2
    return sq.mean(0), sq.std(0) / math.sqrt(len(draws))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("estimator", "k"), [("score+average", 1), ("score+nvil", 1), ("score+loo", 2)]
)
def test_baselines_reduce_variance(estimator, k):
    guide = Guide()
    var_p, se_p = _variance_and_se(grad_draws("score", guide, 800, num_particles=k))
    var_b, se_b = _variance_and_se(grad_draws(estimator, guide, 800, num_particles=k))
    # with the same number of particles, the baseline's variance is lower by more than
    # 4 standard errors of the difference, for both parameters
    assert (var_p - var_b > 4 * torch.sqrt(se_p**2 + se_b**2)).all(), (var_p, var_b, se_p, se_b)


def test_gradient_stats_rank_the_estimators():
    guide = Guide()
    groups = {"loc": [guide.m], "scale": [guide.log_s]}
    stats = gradient_stats(
        model,
        guide,
        X,
        estimators=["reparam", "score", "score+average"],
        repeats=600,
        groups=groups,
    )
    df = stats.to_dataframe().set_index(["estimator", "group"])
    assert len(df) == 6 and set(df.columns) >= {"mean_norm", "variance", "snr", "num_params"}
    for group in groups:  # relative SE of a variance from 600 draws is ~6 %: factors of 2 are safe
        assert (
            df.loc[("score", group), "variance"] > 2 * df.loc[("score+average", group), "variance"]
        )
        assert df.loc[("score", group), "snr"] < df.loc[("reparam", group), "snr"]
    # the mean gradient agrees with the exact one (per-datapoint mean, N = 1) within 4 SE
    exact = exact_loss_grad(guide)
    se = math.sqrt(df.loc[("reparam", "loc"), "variance"] / 600)
    assert abs(df.loc[("reparam", "loc"), "mean_norm"] - abs(exact[0].item())) < 4 * se


def test_bad_estimator_options():
    with pytest.raises(ConfigError, match="unknown baseline 'median'"):
        ScoreFunction(baseline="median")
    with pytest.raises(ConfigError, match="needs --num-particles >= 2"):
        ScoreFunction(baseline="loo").loss(model, Guide(), 1)
    with pytest.raises(ConfigError, match="applies to the score-function estimator only"):
        get_estimator("reparam+average")
    for bad in ("relaxed:0", "relaxed:-1", "relaxed:inf", "relaxed:x"):
        with pytest.raises(ConfigError, match="temperature"):
            get_estimator(bad)
    with pytest.raises(ConfigError, match="repeats"):
        gradient_stats(model, Guide(), X, estimators=["score"], repeats=1)
    assert get_estimator("relaxed:0.5").temperature == 0.5
    assert [get_estimator(n).name for n in ("score", "score+nvil", "iwae")] == [
        "score",
        "score+nvil",
        "iwae",
    ]
