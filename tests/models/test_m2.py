"""M2 semi-supervised VAE: enumeration of the missing labels, the auxiliary loss, accuracy with few labels
(the ``m2`` command and its table: tests/app).

Runs on the embedded 8x8 digits (1437 training rows, 360 held out) so no data files are needed.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.estimators import get_estimator
from ppl_vae.inference.svi import fit
from ppl_vae.models.m2 import classify, m2, m2_guide
from ppl_vae.nn import MLP, GaussianEncoder

C, D = 10, 64


def parts(latent_dim=4, hidden=64, alpha=10.0):
    clf = MLP(D, [hidden], C)
    enc = GaussianEncoder(MLP(D + C, [], hidden), hidden, latent_dim)
    dec = MLP(latent_dim + C, [hidden], D)
    return (
        m2(dec, get_likelihood("bernoulli"), clf, latent_dim, C, alpha=alpha),
        m2_guide(enc, clf, C),
        clf,
    )


@pytest.fixture(scope="module")
def digits():
    train = load("digits", "train", binarize="threshold")
    held = [load("digits", s, binarize="threshold") for s in ("valid", "test")]
    return train.x, train.y, torch.cat([h.x for h in held]), torch.cat([h.y for h in held])


@pytest.mark.slow
def test_enumerated_loss_is_the_classifier_weighted_sum_of_labelled_bounds(digits):
    r"""Unlabelled rows: :math:`-\mathcal{U}(x) = -\sum_y q(y \mid x)\,[\mathcal{L}(x, y) - \log q(y \mid x)]`.

    Both sides are Monte Carlo over z (200 particles); the tolerance is 5 combined standard errors.
    """
    x = digits[0][:4]
    model, guide, clf = parts(alpha=0.0)
    pyro.set_rng_seed(0)
    enum_loss = get_estimator("enum").loss(model, guide, 200)(x, torch.full((4,), -1)).detach()
    with torch.no_grad():
        log_q = torch.log_softmax(clf(x), -1)
        bounds = [
            elbo_per_datapoint(model, guide, x, torch.full((4,), c), num_particles=200)
            for c in range(C)
        ]
    elbo = torch.stack([b.value for b in bounds], -1)
    se = torch.stack([b.se for b in bounds], -1)
    expected = -(log_q.exp() * (elbo - log_q)).sum()
    tol = 5 * math.sqrt(2) * (log_q.exp() * se).pow(2).sum().sqrt()
    assert abs(enum_loss - expected) < tol, (enum_loss.item(), expected.item(), tol.item())


def test_labelled_loss_is_the_supervised_elbo_plus_alpha_times_classifier_log_likelihood(digits):
    x, y = digits[0][:8], digits[1][:8]
    model, guide, clf = parts(alpha=3.0)
    pyro.set_rng_seed(1)
    with_aux = pyro.infer.Trace_ELBO().differentiable_loss(
        model, guide, x, y
    )  # nothing to enumerate
    pyro.set_rng_seed(1)
    no_aux = pyro.infer.Trace_ELBO().differentiable_loss(
        poutine.block(model, hide=["y_aux"]), guide, x, y
    )
    aux = torch.distributions.Categorical(logits=clf(x)).log_prob(y).sum()
    assert torch.allclose(with_aux, no_aux - 3.0 * aux, atol=1e-3)


def test_mixed_batch_equals_its_labelled_and_unlabelled_parts(digits):
    """obs_mask + a masked guide site: enumerating a mixed batch scores each row as if it came alone.

    Five repeats of 400 vectorised particles per side; tolerance 5 standard errors of the difference.
    """
    x, y = digits[0][:6], digits[1][:6].clone()
    y[::2] = -1
    model, guide, _ = parts(alpha=0.0)
    labelled = y >= 0
    enum = get_estimator("enum")
    mixed, split = [], []
    for rep in range(5):
        pyro.set_rng_seed(rep)
        mixed.append(enum.loss(model, guide, 400)(x, y).item())
        part = pyro.infer.Trace_ELBO(
            num_particles=400, vectorize_particles=True
        ).differentiable_loss(model, guide, x[labelled], y[labelled])
        split.append((part + enum.loss(model, guide, 400)(x[~labelled], y[~labelled])).item())
    a, b = torch.tensor(mixed), torch.tensor(split)
    se = (a.var() / 5 + b.var() / 5).sqrt()
    assert abs(a.mean() - b.mean()) < 5 * se + 1e-3, (a.mean().item(), b.mean().item(), se.item())


def test_mixed_batch_has_a_finite_per_datapoint_bound(digits):
    x, y = digits[0][:10], digits[1][:10].clone()
    y[::2] = -1
    model, guide, _ = parts()
    mean = elbo_per_datapoint(model, guide, x, y).value
    assert mean.shape == (10,) and bool(torch.isfinite(mean).all())


def test_classifier_beats_chance_with_ten_labels_per_class(digits):
    x, y, xt, yt = digits
    gen = torch.Generator().manual_seed(0)
    lab = torch.cat(
        [
            (y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:10]]
            for c in range(C)
        ]
    )
    y_semi = torch.full_like(y, -1)
    y_semi[lab] = y[lab]
    model, guide, clf = parts()
    result = fit(
        model,
        guide,
        (x, y_semi),
        estimator="enum",
        epochs=10,
        batch_size=100,
        lr=3e-3,
        seed=0,
        progress=False,
    )
    assert math.isfinite(result.train_elbo)
    acc = (classify(clf, xt) == yt).double().mean().item()
    # chance is 0.1; its binomial SE over 360 rows is 0.016, so 0.5 is > 20 SE above it
    assert acc > 0.5, acc
