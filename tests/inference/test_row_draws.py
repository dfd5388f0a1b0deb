"""RowDraws draws every family it reads for all rows at once: a row's draws equal its draws alone, and they follow the family."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Z
from pyro import poutine
from pyro.distributions.transforms import affine_autoregressive

from ppl_vae.distributions import noise_leaf
from ppl_vae.errors import ConfigError
from ppl_vae.inference.random import RowDraws, Streams, draws_in_batches

S = 4000  # draws per row in the distribution checks
TAU = 0.5
L = torch.tensor([[0.8, 0.0], [-0.4, 0.5]], dtype=torch.float64)
W = torch.tensor([[0.7], [-0.3]], dtype=torch.float64)
torch.manual_seed(0)
IAF = affine_autoregressive(2, hidden_dims=[8]).double()

#: family -> the site's distribution for rows x [n, 2] (batch [n]); every parameter depends on the row
FAMILIES = {
    "Normal": lambda x: dist.Normal(x, 0.5 + x.abs()).to_event(1),
    "LogNormal": lambda x: dist.LogNormal(x, 0.5).to_event(1),
    "MultivariateNormal": lambda x: dist.MultivariateNormal(x, scale_tril=L),
    "LowRankMultivariateNormal": lambda x: dist.LowRankMultivariateNormal(
        x, W, torch.tensor([0.3, 0.5], dtype=x.dtype)
    ),
    "IAF flow": lambda x: dist.TransformedDistribution(dist.Normal(x, 1.0).to_event(1), [IAF]),
    "Uniform": lambda x: dist.Uniform(x - 1, x + 2).to_event(1),
    "Exponential": lambda x: dist.Exponential(1 + x.abs()).to_event(1),
    "Laplace": lambda x: dist.Laplace(x, 0.7).to_event(1),
    "Cauchy": lambda x: dist.Cauchy(x, 0.7).to_event(1),
    "Gumbel": lambda x: dist.Gumbel(x, 0.7).to_event(1),
    "Logistic": lambda x: dist.Logistic(x, 0.7).to_event(1),
    "Weibull": lambda x: dist.Weibull(1 + x.abs(), 1.5).to_event(1),
    "HalfCauchy": lambda x: dist.HalfCauchy(1 + x.abs()).to_event(1),
    "masked Normal": lambda x: dist.Normal(x, 1.0).to_event(1).mask(torch.tensor(True)),
    "RelaxedBernoulli": lambda x: dist.RelaxedBernoulli(
        torch.tensor(TAU, dtype=x.dtype), logits=x
    ).to_event(1),
    "RelaxedOneHotCategorical": lambda x: dist.RelaxedOneHotCategorical(
        torch.tensor(TAU, dtype=x.dtype), logits=x
    ),
}
#: families checked through their CDF: F(z) ~ U(0, 1) elementwise
BY_CDF = [
    "Normal",
    "LogNormal",
    "Uniform",
    "Exponential",
    "Laplace",
    "Cauchy",
    "Gumbel",
    "Logistic",
    "Weibull",
    "HalfCauchy",
    "masked Normal",
]
X = torch.tensor([[0.3, -1.2], [1.5, 0.1], [-0.7, 0.9], [0.0, 2.0]], dtype=torch.float64)


def guide_of(family):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", FAMILIES[family](x))
            pyro.sample(
                "w", dist.Normal(x, 1.0).to_event(1)
            )  # a second site: the streams move on between sites

    return guide


def draws(family, rows, num=3, seed=0, x=X):
    with RowDraws(Streams(seed, rows, "cpu")), pyro.plate("_draws", num, dim=-2):
        tr = poutine.trace(guide_of(family)).get_trace(x[rows])
    return tr.nodes["z"]["value"], tr.nodes["w"]["value"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_rows_draws_are_its_draws_alone(family):
    guide = guide_of(family)
    assert draws_in_batches(guide, X[:1])
    together = draws(family, [0, 1, 2, 3])
    for r in (2, 0):
        alone = draws(family, [r])
        for a, b in zip(together, alone):
            assert a.dtype == torch.float64 and torch.allclose(
                a[:, r], b[:, 0], rtol=1e-12, atol=1e-12
            )
    assert not torch.allclose(together[0][:, 0], together[0][:, 1])


def _pit_is_uniform(p, what):
    p = p.reshape(-1)
    n = p.numel()
    assert abs(p.mean() - 0.5) <= Z * math.sqrt(1 / 12 / n), what
    assert abs(p.var() - 1 / 12) <= Z * math.sqrt((1 / 80 - 1 / 144) / n), what


@pytest.mark.parametrize("family", BY_CDF)
def test_univariate_draws_follow_the_family_by_their_cdf(family):
    z, _ = draws(family, [0, 1, 2, 3], num=S)
    fn = FAMILIES[family](X)
    while (
        not hasattr(fn, "cdf")
        or isinstance(fn, torch.distributions.Independent)
        or type(fn).__name__ == "MaskedDistribution"
    ):
        fn = fn.base_dist
    _pit_is_uniform(fn.cdf(z), family)


@pytest.mark.parametrize("family", ["MultivariateNormal", "LowRankMultivariateNormal"])
def test_gaussian_draws_have_the_mean_and_covariance(family):
    z, _ = draws(family, [0, 1, 2, 3], num=S)
    fn = FAMILIES[family](X)
    cov = fn.covariance_matrix[0]
    centred = z - X
    mean_se = (cov.diagonal() / centred.shape[0]).sqrt()
    assert (centred.mean(0).abs() <= Z * mean_se).all()
    emp = torch.einsum("sni,snj->nij", centred, centred) / S  # per row
    se = (
        (cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / S
    ).sqrt()  # SE of a Gaussian sample covariance
    assert ((emp - cov).abs() <= Z * se).all()


def test_flow_draws_match_the_flows_own_rsample():
    z, _ = draws("IAF flow", [0, 1, 2, 3], num=S)
    with torch.no_grad():
        ref = FAMILIES["IAF flow"](X).rsample((S,))
    se = (z.var(0) / S + ref.var(0) / S).sqrt()
    assert ((z.mean(0) - ref.mean(0)).abs() <= Z * se).all()
    se_var = (
        2 * z.var(0) ** 2 / S + 2 * ref.var(0) ** 2 / S
    ).sqrt()  # near-Gaussian: Var(s^2) ~ 2 sigma^4 / n
    assert ((z.var(0) - ref.var(0)).abs() <= 2 * Z * se_var).all()


def test_relaxed_draws_follow_the_concrete_distributions():
    z, _ = draws("RelaxedBernoulli", [0, 1, 2, 3], num=S)
    # logit(z) = (logit u + logit p) / tau: sigmoid(tau logit z - logit p) is U(0, 1)
    _pit_is_uniform(torch.sigmoid(TAU * torch.logit(z) - X), "RelaxedBernoulli")
    z, _ = draws("RelaxedOneHotCategorical", [0, 1, 2, 3], num=S)
    assert torch.allclose(z.sum(-1), torch.ones((), dtype=z.dtype))
    # Gumbel-max: the largest coordinate is Categorical(softmax(logits)) whatever the temperature
    freq = torch.nn.functional.one_hot(z.argmax(-1), 2).double().mean(0)
    p = torch.softmax(X, -1)
    assert ((freq - p).abs() <= Z * (p * (1 - p) / S).sqrt()).all()


class ScoredNormal(dist.Normal):
    """A Normal that Pyro scores by the score function (``has_rsample`` False on the class survives a plate's expand)."""

    has_rsample = False


def test_a_site_that_is_not_reparameterised_gets_a_detached_draw():
    loc = X.clone().requires_grad_()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("v", ScoredNormal(loc, 1.0).to_event(1))

    with RowDraws(Streams(0, range(4), "cpu")):
        tr = poutine.trace(guide).get_trace(X)
    assert tr.nodes["z"]["value"].requires_grad and not tr.nodes["v"]["value"].requires_grad


FALLBACK = {
    "Gamma": lambda n: dist.Gamma(torch.ones(n), 1.0),
    "Beta": lambda n: dist.Beta(torch.ones(n), 2.0),
    "Dirichlet": lambda n: dist.Dirichlet(torch.ones(n, 3)),
    "StudentT": lambda n: dist.StudentT(3.0, torch.zeros(n)),
    "Poisson": lambda n: dist.Poisson(torch.ones(n)),
    "straight-through RelaxedBernoulli": lambda n: dist.RelaxedBernoulliStraightThrough(
        torch.tensor(TAU), logits=torch.zeros(n)
    ),
}


@pytest.mark.parametrize("family", list(FALLBACK))
def test_families_without_a_draw_from_fixed_noise_run_one_row_at_a_time(family):
    """Rejection samplers (Gamma, Beta, Dirichlet, StudentT), discrete families and a subclass with its own rsample."""
    assert noise_leaf(FALLBACK[family](4)) is None

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("g", FALLBACK[family](x.shape[0]))

    assert not draws_in_batches(guide, X[:1])
    with (
        pytest.raises(ConfigError, match="'g'.*one datapoint at a time"),
        RowDraws(Streams(0, range(4), "cpu")),
    ):
        guide(X)
    one = [
        poutine.trace(RowDraws(Streams(0, [3], "cpu"))(guide)).get_trace(X[:1]).nodes["g"]["value"]
        for _ in range(2)
    ]
    assert torch.equal(one[0], one[1])  # the row's stream seeds it


def test_a_mixture_is_drawn_for_all_rows_at_once_with_its_weights_and_components():
    from ppl_vae.guides.local import Mixture

    n, m = 4, 20_000
    loc = torch.tensor([-3.0, 3.0], dtype=torch.float64)
    weights = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    components = [
        dist.Normal(torch.full((n, 1), float(c), dtype=torch.float64), 0.5).to_event(1) for c in loc
    ]

    def program(x):
        with pyro.plate("data", n):
            pyro.sample("u", Mixture(components, weights.log()))

    assert draws_in_batches(program, torch.zeros(n))
    with RowDraws(Streams(0, range(n), "cpu", 7)), pyro.plate("draws", m, dim=-2):
        u = poutine.trace(program).get_trace(torch.zeros(n)).nodes["u"]["value"]
    assert u.shape == (m, n, 1)
    right = (
        (u[..., 0] > 0).double().mean(0)
    )  # the second component's share (the two do not overlap: 6 sd apart)
    se = (weights[:, 1] * (1 - weights[:, 1]) / m).sqrt()
    assert ((right - weights[:, 1]).abs() <= Z * se + 1e-12).all(), right
    mean = (weights * loc).sum(-1)
    sd = ((weights * (loc**2 + 0.25)).sum(-1) - mean**2).sqrt()
    assert ((u[..., 0].mean(0) - mean).abs() <= Z * sd / math.sqrt(m)).all()
