"""Structured-output CVAE: quadrant masks, exact baseline likelihood, IS bound, and CVAE vs baseline on the 8x8 digits.

The 8x8 digits (4x4 quadrants) stand in for MNIST so that the tests need no data files. (The ``cvae-quadrants`` command and
its completions, ``predict``: tests/app.)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ppl_vae.data import load
from ppl_vae.errors import ConfigError
from ppl_vae.inference import importance_bounds
from ppl_vae.inference.svi import fit
from ppl_vae.models.cvae_so import (
    baseline_model,
    empty_guide,
    mask_quadrants,
    so_cvae,
    so_cvae_guide,
    visible_mask,
)
from ppl_vae.nn import MLP, GaussianEncoder


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train", binarize="threshold").x, load(
        "digits", "test", binarize="threshold"
    ).x


def test_visible_quadrants_follow_the_tutorial():
    for q in (1, 2, 3):
        assert int(visible_mask(q).sum()) == q * 196
    grid = visible_mask(1).reshape(28, 28)
    assert grid[27, 0] and not grid[0, 0] and not grid[27, 27]  # 1 = bottom-left
    assert visible_mask(2).reshape(28, 28)[0, 0] and visible_mask(3).reshape(28, 28)[0, 27]
    x = torch.rand(3, 784)
    x_in = mask_quadrants(x, 2)
    assert torch.equal(x_in[:, visible_mask(2)], x[:, visible_mask(2)])
    assert bool((x_in[:, ~visible_mask(2)] == -1).all())
    with pytest.raises(ConfigError, match="1, 2 or 3"):
        visible_mask(4)
    with pytest.raises(ConfigError, match="square"):
        mask_quadrants(torch.rand(2, 10), 1)


def test_baseline_nll_is_the_cross_entropy_of_the_hidden_pixels(digits):
    _, test = digits
    net = MLP(64, [16], 64)
    x_in = mask_quadrants(test, 1)
    b = importance_bounds(baseline_model(net), empty_guide, x_in, test, num_samples=3)
    nll, nelbo = -b.iwae, -b.elbo
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(net(x_in), test, reduction="none")
    expected = (bce * (x_in == -1)).sum(-1)
    assert torch.allclose(nll.float(), expected, atol=1e-4) and torch.allclose(
        nelbo.float(), expected, atol=1e-4
    )


def cvae_parts(latent_dim=4, hidden=32, baseline=None):
    prior = GaussianEncoder(MLP(64, [], hidden), hidden, latent_dim)
    recognition = GaussianEncoder(MLP(64, [], hidden), hidden, latent_dim)
    generation = MLP(latent_dim, [hidden], 64)
    return so_cvae(prior, generation, baseline=baseline), so_cvae_guide(recognition)


def test_importance_sampled_nll_is_below_the_negative_elbo(digits):
    _, test = digits
    model, guide = cvae_parts()
    x_in = mask_quadrants(test, 1)
    b = importance_bounds(model, guide, x_in, test, num_samples=20, batch_size=64, seed=0)
    nll, nelbo = -b.iwae, -b.elbo
    assert nll.shape == (len(test),)
    assert bool((nll <= nelbo + 1e-4).all())  # log-mean-exp >= mean of the same draws


@pytest.mark.slow
def test_cvae_beats_the_baseline_on_a_small_run(digits):
    """One visible quadrant: the hidden three are multimodal, where a latent helps."""
    train, test = digits
    x_in, xt_in = mask_quadrants(train, 1), mask_quadrants(test, 1)
    net = MLP(64, [32], 64)
    fit(
        baseline_model(net),
        empty_guide,
        (x_in, train),
        epochs=30,
        batch_size=64,
        lr=3e-3,
        seed=0,
        progress=False,
    )
    net.requires_grad_(False)
    model, guide = cvae_parts(baseline=net)
    fit(model, guide, (x_in, train), epochs=30, batch_size=64, lr=3e-3, seed=0, progress=False)
    base = -importance_bounds(
        baseline_model(net), empty_guide, xt_in, test, num_samples=1, seed=0
    ).iwae
    cvae = -importance_bounds(model, guide, xt_in, test, num_samples=50, seed=0).iwae
    diff = base - cvae
    se = diff.std() / math.sqrt(len(diff))  # paired differences over the 180 test rows
    assert diff.mean() > 3 * se and diff.mean() > 0.5, (
        base.mean().item(),
        cvae.mean().item(),
        se.item(),
    )
