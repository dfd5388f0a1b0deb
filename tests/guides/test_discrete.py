"""Discrete-latent models and guides, the relaxation, enumeration (the estimators' command line: tests/app).

Training tests use 200 rows of 16 binary pixels drawn around 4 prototypes, so
a model with a few latent bits can explain them; "improves" means the mean
test ELBO rises by more than 1 nat and by more than 4 standard errors of the
difference of the two per-datapoint means.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.distributions import Bernoulli, Gaussian
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.guides.discrete import bernoulli_guide, categorical_guide
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.estimators import Relaxed, get_estimator
from ppl_vae.inference.svi import fit
from ppl_vae.models.discrete import (
    GaussianMixturePrior,
    bernoulli_vae,
    categorical_vae,
    gmm_vae,
)
from ppl_vae.nn import MLP, GaussianEncoder


def _binary_data(n: int = 200, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, d, generator=g) < 0.5).float()
    x = protos[torch.randint(0, 4, (n,), generator=g)]
    flip = torch.rand(n, d, generator=g) < 0.05
    return torch.where(flip, 1 - x, x)


def _elbo(model, guide, x):
    pyro.set_rng_seed(123)
    values = elbo_per_datapoint(model, guide, x).value
    return values


def linear_discrete_vae(kind: str, data_dim: int, latent_dim: int, num_classes: int):
    """``(model, guide)`` of a Bernoulli or categorical VAE with linear maps (``ppl-vae fit --model {kind} --hidden ""``):
    ``latent_dim`` bits, or ``latent_dim`` categoricals of ``num_classes`` classes; Bernoulli pixels."""
    width = latent_dim if kind == "bernoulli-vae" else latent_dim * num_classes
    encoder, decoder = MLP(data_dim, [], width), MLP(width, [], data_dim)
    if kind == "bernoulli-vae":
        return bernoulli_vae(decoder, Bernoulli(), latent_dim), bernoulli_guide(encoder)
    return (
        categorical_vae(decoder, Bernoulli(), latent_dim, num_classes),
        categorical_guide(encoder, latent_dim, num_classes),
    )


def _assert_improves(before: torch.Tensor, after: torch.Tensor) -> None:
    diff = after.mean() - before.mean()
    se = math.sqrt(before.var() / len(before) + after.var() / len(after))
    assert diff > max(1.0, 4 * se), (before.mean(), after.mean(), se)


@pytest.mark.parametrize(
    ("kind", "estimator", "k"),
    [
        ("bernoulli-vae", "score", 1),
        ("bernoulli-vae", "score+nvil", 1),
        ("bernoulli-vae", "relaxed", 1),
        ("categorical-vae", "score+loo", 2),
        ("categorical-vae", "relaxed:0.5", 1),
        ("bernoulli-vae", "iwae", 2),
    ],
)
def test_discrete_vae_trains(kind, estimator, k):
    x = _binary_data()
    torch.manual_seed(0)
    model, guide = linear_discrete_vae(kind, 16, 4 if kind == "bernoulli-vae" else 2, num_classes=4)
    before = _elbo(model, guide, x)
    result = fit(
        model,
        guide,
        x,
        estimator=estimator,
        num_particles=k,
        epochs=15,
        batch_size=50,
        lr=2e-2,
        progress=False,
    )
    assert result.estimator == get_estimator(estimator).name
    _assert_improves(before, _elbo(model, guide, x))


def _tiny_bernoulli():
    logits = nn.Parameter(torch.tensor([0.4, -0.8]))

    def bmodel(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def bguide(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
        draws.append(z)

    draws: list[torch.Tensor] = []
    return bmodel, bguide, logits, draws


def test_relaxed_samples_are_exact_and_its_value_is_the_discrete_elbo():
    bmodel, bguide, logits, draws = _tiny_bernoulli()
    x = torch.tensor([[1.3]])
    loss = Relaxed(0.5).loss(bmodel, bguide, 1)
    values = torch.stack([loss(x).detach() for _ in range(1500)])
    z = torch.cat(draws)
    assert set(z.unique().tolist()) <= {0.0, 1.0}  # hard samples (straight-through)
    # their frequencies are q's probabilities: 4 binomial standard errors
    p = torch.sigmoid(logits.detach())
    assert ((z.mean(0) - p).abs() <= 4 * torch.sqrt(p * (1 - p) / len(z))).all()
    zs = torch.tensor([[a, b] for a in (0.0, 1.0) for b in (0.0, 1.0)])
    log_q = dist.Bernoulli(logits=logits.detach()).log_prob(zs).sum(-1)
    kl = (log_q.exp() * (log_q - dist.Bernoulli(0.3 * torch.ones(2)).log_prob(zs).sum(-1))).sum()
    exact = (log_q.exp() * dist.Normal(zs.sum(-1), 1.0).log_prob(x[0, 0])).sum() - kl
    assert abs(-values.mean() - exact) <= 4 * values.std() / math.sqrt(len(values))
    loss(x).backward()  # straight-through: the guide's logits get a pathwise gradient
    assert (
        logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad != 0).all()
    )


def _gmm(enumerate: bool):
    torch.manual_seed(0)
    prior = GaussianMixturePrior(3, 2)
    decoder = MLP(2, [8], 6)
    encoder = GaussianEncoder(MLP(6, [], 8), 8, 2)
    return (
        gmm_vae(decoder, Gaussian(0.5), prior, enumerate=enumerate),
        amortized_guide(encoder),
        (prior, decoder, encoder),
    )


def test_enumeration_sums_out_the_mixture_component():
    x = torch.randn(5, 6)
    model, guide, nets = _gmm(True)
    marginal = gmm_vae(nets[1], Gaussian(0.5), nets[0], enumerate=False)
    enum = get_estimator("enum").loss(model, guide)
    enum(x)  # TraceEnum_ELBO's first call guesses max_plate_nesting by running the guide once
    pyro.set_rng_seed(1)
    enum_loss = enum(x)
    pyro.set_rng_seed(1)
    marginal_loss = get_estimator("reparam").loss(marginal, guide)(x)
    torch.testing.assert_close(enum_loss, marginal_loss)
    enum_loss.backward()
    assert nets[0].logits.grad is not None and torch.isfinite(nets[0].logits.grad).all()


def test_gmm_vae_trains_with_enumeration():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(100, 6, generator=g) * 0.3 + 2, torch.randn(100, 6, generator=g) * 0.3 - 2]
    )
    model, guide, nets = _gmm(True)
    marginal = gmm_vae(nets[1], Gaussian(0.5), nets[0], enumerate=False)
    before = _elbo(marginal, guide, x)
    fit(model, guide, x, estimator="enum", epochs=10, batch_size=50, lr=1e-2, progress=False)
    _assert_improves(before, _elbo(marginal, guide, x))
