"""Gradient estimators on a conjugate model with closed-form answers.

Model: z ~ N(0, 1), x | z ~ N(z, 1); guide q(z) = N(m, s^2) with parameters
(m, log s). The ELBO is

    L = -log(2 pi) - ((x - m)^2 + s^2) / 2 - (m^2 + s^2) / 2 + log(2 pi e s^2) / 2,

so dL/dm = x - 2m and dL/dlog s = 1 - 2 s^2.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Guide, X, exact_loss_grad, grad_draws, model, two_level_vae
from torch import nn

from ppl_vae.errors import ConfigError, NotReparameterizableError
from ppl_vae.inference.estimators import (
    ESTIMATORS,
    AnalyticKL,
    Particles,
    Reparameterized,
    ScoreFunction,
    get_estimator,
    trace_loss,
)
from ppl_vae.inference.params import discover
from ppl_vae.inference.svi import fit


def test_single_particle_pathwise_gradient_matches_hand_derivation():
    guide = Guide()
    g = grad_draws("reparam", guide, 1)[0]
    z = guide.draws[-1].item()
    m, s, x = guide.m.item(), guide.log_s.exp().item(), X.item()
    eps = (z - m) / s
    # d/dm (log p(x, z) - log q(z)) with z = m + s eps: x - 2z; d/dlog s: (x - 2z) s eps + 1
    expected = -torch.tensor([x - 2 * z, (x - 2 * z) * s * eps + 1])
    torch.testing.assert_close(g, expected)


def test_single_particle_score_function_gradient_matches_hand_derivation():
    guide = Guide()
    g = grad_draws("score", guide, 1)[0]
    z = guide.draws[-1].item()
    m, s, x = guide.m.item(), guide.log_s.exp().item(), X.item()
    log_q = dist.Normal(m, s).log_prob(torch.tensor(z))
    f = (
        dist.Normal(0.0, 1.0).log_prob(torch.tensor(z))
        + dist.Normal(z, 1.0).log_prob(torch.tensor(x))
        - log_q
    ).item()
    # Pyro's surrogate for a non-reparameterised site is log p + log q * stop_grad(f)
    # with z detached (no entropy term): the gradient is f * d log q(z)
    dlogq = torch.tensor([(z - m) / s**2, -1 + (z - m) ** 2 / s**2])
    torch.testing.assert_close(g, -f * dlogq)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["reparam", "score", "analytic-kl"])
def test_estimators_are_unbiased(estimator):
    guide = Guide()
    draws = grad_draws(estimator, guide, 4000)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    exact = exact_loss_grad(guide)
    # 4 standard errors: a false failure has probability ~1e-4 per coordinate
    assert ((mean - exact).abs() <= 4 * se + 1e-6).all(), (mean, exact, se)


def _variance_and_se(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample variance per coordinate and its standard error, sqrt(Var[(g - mean)^2] / n)."""
    sq = (draws - draws.mean(0)) ** 2
    return sq.mean(0), sq.std(0) / math.sqrt(len(draws))


@pytest.mark.slow
def test_score_function_variance_exceeds_pathwise():
    guide = Guide()
    var_r, se_r = _variance_and_se(grad_draws("reparam", guide, 4000))
    var_s, se_s = _variance_and_se(grad_draws("score", guide, 4000))
    # the difference must exceed 4 standard errors of the difference
    assert (var_s - var_r > 4 * torch.sqrt(se_r**2 + se_s**2)).all(), (var_s, var_r, se_s, se_r)


def test_vectorised_particles_with_score_function_in_plate():
    guide = Guide()
    draws = grad_draws("score", guide, 400, num_particles=8)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact_loss_grad(guide)).abs() <= 4 * se).all()
    assert guide.draws[-1].shape[0] == 8  # the particle dimension was vectorised


def test_reparam_refuses_a_discrete_guide_site_and_score_accepts_it():
    probs = nn.Parameter(torch.tensor([0.0]))

    def bern_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(1)).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def bern_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=probs).to_event(1))

    with pytest.raises(NotReparameterizableError, match="'z'.*estimator='score'"):
        Reparameterized().loss(bern_model, bern_guide)(X)
    loss = ScoreFunction().loss(bern_model, bern_guide)(X)
    loss.backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()


def test_estimator_lookup():
    assert isinstance(get_estimator("analytic-kl"), AnalyticKL)
    with pytest.raises(ConfigError, match="unknown estimator 'nope'"):
        get_estimator("nope")


@pytest.mark.parametrize("estimator", ["score", "relaxed"])
def test_estimator_modes_wrap_the_site_distribution_and_generate_no_classes(estimator):
    """The score-function and relaxed modes wrap the distribution at the site (as Pyro's MaskedDistribution does):
    the wrapped distribution keeps its own class and flags; no class is made at run time."""
    discrete = estimator == "relaxed"

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            d = (
                dist.Bernoulli(logits=x.new_zeros(x.shape[0], 3)).to_event(1)
                if discrete
                else dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1)
            )
            pyro.sample("z", d)

    handled = get_estimator(estimator).handled(guide)
    with pyro.plate(
        "particles", 2, dim=-2
    ):  # vectorised particles: the wrapper survives the plates' expand
        tr = pyro.poutine.trace(handled).get_trace(X)
    fn = tr.nodes["z"]["fn"]
    assert fn.has_rsample is discrete and fn.batch_shape == (2, 1)
    leaf = fn
    while hasattr(leaf, "base") or hasattr(leaf, "base_dist"):
        leaf = getattr(leaf, "base", None) or leaf.base_dist
    assert type(leaf) is (
        dist.Bernoulli if discrete else dist.Normal
    )  # not a subclass generated at run time
    assert leaf.has_rsample is (not discrete)
    loss = get_estimator(estimator).loss(
        model if not discrete else _bernoulli_model, guide, num_particles=2
    )
    assert torch.isfinite(loss(X)) and loss.parameters(X) == [] and loss.state_dict() == {}


def _bernoulli_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(x.new_full((x.shape[0], 3), 0.5)).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def test_analytic_kl_refuses_a_structured_guide_by_name_before_any_update():
    """q(z1 | x) q(z2 | z1) is not mean-field: Pyro only warns, and its closed-form KL would be wrong."""
    hvae, hguide = two_level_vae(data_dim=6, hidden=8, latent_dim=2)
    x = torch.bernoulli(torch.full((24, 6), 0.5), generator=torch.Generator().manual_seed(0))
    params = discover(hvae, hguide, (x[:2],)).params
    before = [p.detach().clone() for p in params]
    with pytest.raises(
        ConfigError,
        match=r"analytic-kl .* mean-field guide .*model sites z2, z1; guide sites z1, z2",
    ):
        fit(hvae, hguide, x, estimator="analytic-kl", epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_what_an_estimator_declares_of_discrete_latents_is_what_it_does(name):
    """``pathwise_only`` (read by the command line to refuse a model before any work) against one epoch on a Bernoulli latent."""
    x = (torch.rand(40, 2, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    logits, dec = nn.Parameter(torch.zeros(2)), nn.Linear(2, 2)

    def model(x):
        pyro.module("dec", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    k = 2 if name in ("iwae", "score+loo") else 1
    options = dict(
        estimator=name, num_particles=k, epochs=1, batch_size=20, progress=False, modules=[dec]
    )
    if get_estimator(name).pathwise_only:
        with pytest.raises(NotReparameterizableError, match="guide site 'z'"):
            fit(model, guide, x, **options)
    else:
        assert math.isfinite(fit(model, guide, x, **options).train_elbo)


def test_the_mean_field_loss_scores_only_the_sites_without_a_closed_form_kl():
    """analytic-kl takes z's KL in closed form: z's log-densities (model and guide) are never computed, x's is; the value is
    -(log p(x | z) - KL(q || p)) for the draw, by hand."""
    guide = Guide()
    particles = Particles(1)
    with pyro.validation_enabled(False):
        pairs = particles(model, guide, (X,), {})
        loss = trace_loss(pairs, 1, mean_field=True)
    model_tr, guide_tr = pairs[0]
    assert "log_prob" not in model_tr.nodes["z"] and "log_prob" not in guide_tr.nodes["z"]
    assert "log_prob" in model_tr.nodes["x"]
    z, s = guide_tr.nodes["z"]["value"], guide.log_s.exp()
    q = torch.distributions.Normal(guide.m, s)
    by_hand = (
        torch.distributions.Normal(z, 1.0).log_prob(X).sum()
        - torch.distributions.kl_divergence(
            q, torch.distributions.Normal(torch.zeros(1), 1.0)
        ).sum()
    )
    torch.testing.assert_close(loss, -by_hand)
