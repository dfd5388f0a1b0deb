"""The model family: hierarchical VAE, mixture and VampPrior, VQ-VAE, sparse and linear autoencoders (their
``ppl-vae fit --model ...`` runs: tests/app).

Each trains a few epochs on the embedded 8x8 digits (1437 rows) with ``fit`` and
must improve its objective on held-out rows by far more than its Monte Carlo
standard error (the mean over 180 rows of a single-sample ELBO has an SE well
under 1 nat here; the thresholds are >= 5 nats).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch

from ppl_vae.data import load
from ppl_vae.distributions import gaussian_mixture, get_likelihood
from ppl_vae.guides.amortized import amortized_guide, delta_guide
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.svi import fit
from ppl_vae.models.autoencoders import principal_angles_to_pca, sparse_autoencoder
from ppl_vae.models.discrete import GaussianMixturePrior
from ppl_vae.models.hierarchical import hierarchical_guide, hierarchical_vae
from ppl_vae.models.priors import VampPrior, vae_with_prior
from ppl_vae.models.vae import autoencoder
from ppl_vae.models.vqvae import (
    Codebook,
    CodePrior,
    QuantizedDecoder,
    perplexity,
    vqvae,
)
from ppl_vae.nn import MLP, GaussianEncoder

D, H = 64, 32


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train", binarize="threshold").x, load(
        "digits", "test", binarize="threshold"
    ).x


def held_out_elbo(model, guide, x, particles=4):
    mean = elbo_per_datapoint(model, guide, x, num_particles=particles).value
    return mean.mean().item(), (mean.std() / math.sqrt(len(mean))).item()


def build_hvae():
    enc, top_enc = GaussianEncoder(MLP(D, [], H), H, 8), GaussianEncoder(MLP(8, [], 16), 16, 2)
    dec, top_dec = MLP(8, [H], D), GaussianEncoder(MLP(2, [], 16), 16, 8)
    return hierarchical_vae(dec, top_dec, get_likelihood("bernoulli"), 2), hierarchical_guide(
        enc, top_enc
    )


def build_mog():
    enc = GaussianEncoder(MLP(D, [], H), H, 2)
    return vae_with_prior(
        MLP(2, [H], D), get_likelihood("bernoulli"), GaussianMixturePrior(5, 2).marginal
    ), amortized_guide(enc)


def build_vamp(train):
    enc = GaussianEncoder(MLP(D, [], H), H, 2)
    prior = VampPrior(
        enc, train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10]]
    )
    return vae_with_prior(MLP(2, [H], D), get_likelihood("bernoulli"), prior), amortized_guide(enc)


def build_vq(num_latents=4, code_dim=2, num_codes=16):
    enc = MLP(D, [H], num_latents * code_dim)
    codebook, prior = Codebook(num_codes, code_dim), CodePrior(num_latents, num_codes)
    dec = MLP(num_latents * code_dim, [H], D)
    model = vqvae(dec, get_likelihood("bernoulli"), codebook, prior, num_latents)
    return model, delta_guide(enc), (enc, dec, codebook, prior)


def build_sparse(l1):
    enc = MLP(D, [H], 8)
    return (
        sparse_autoencoder(MLP(8, [H], D), get_likelihood("bernoulli"), 8, l1=l1),
        delta_guide(enc),
        enc,
    )


@pytest.mark.parametrize("name", ["hvae", "mog", "vamp", "vqvae", "sparse"])
def test_model_trains_and_improves_held_out_objective(name, digits):
    train, test = digits
    model, guide = {
        "hvae": build_hvae,
        "mog": build_mog,
        "vamp": lambda: build_vamp(train),
        "vqvae": lambda: build_vq()[:2],
        "sparse": lambda: build_sparse(0.1)[:2],
    }[name]()
    before, se0 = held_out_elbo(model, guide, test)
    result = fit(model, guide, train, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
    after, se1 = held_out_elbo(model, guide, test)
    assert math.isfinite(result.train_elbo)
    assert after - before > max(5.0, 10 * (se0 + se1)), (before, after)


def test_vamp_prior_components_are_the_guide_at_pseudo_inputs():
    enc = GaussianEncoder(MLP(D, [], H), H, 3)
    u = torch.rand(4, D)
    p = VampPrior(enc, u)()
    loc, scale = enc(u)
    z = torch.randn(5, 3)
    expected = torch.logsumexp(
        torch.distributions.Normal(loc, scale).log_prob(z[:, None]).sum(-1), -1
    ) - math.log(4)
    assert torch.allclose(p.log_prob(z), expected, atol=1e-5)


def test_gaussian_mixture_log_density_is_mixture_same_familys_in_value_and_gradient():
    """The matrix-product log density of a diagonal Gaussian mixture (VampPrior's, the mog prior's), expanded over a plate
    as Pyro does, equals ``MixtureSameFamily``'s elementwise one; a full-covariance mixture is ``MixtureSameFamily`` itself.

    float64, K = 500, D = 50, scales down to 0.05: the expansion's terms reach ~1e5 nats, so rounding (2.2e-16 each, 50
    terms per product) stays below 1e-8.
    """
    g = torch.Generator().manual_seed(0)
    k, d = 500, 50
    loc = torch.randn(k, d, generator=g, dtype=torch.float64).requires_grad_()
    scale = (0.05 + torch.rand(k, d, generator=g, dtype=torch.float64)).requires_grad_()
    logits = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_()
    fast = gaussian_mixture(logits, dist.Normal(loc, scale).to_event(1)).expand([3])
    slow = dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    ).expand([3])
    z = slow.sample((4,)) + 0.01 * torch.randn(
        4, 3, d, generator=g, dtype=torch.float64
    )  # near components and between them
    a, b = fast.log_prob(z), slow.log_prob(z)
    assert a.shape == b.shape == (4, 3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    ga, gb = (torch.autograd.grad(v.sum(), (loc, scale, logits)) for v in (a, b))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)
    tril = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) * 0.5).expand(k, d, d)
    full = gaussian_mixture(logits, dist.MultivariateNormal(loc, scale_tril=tril))
    assert type(full) is dist.MixtureSameFamily


def test_vqvae_uses_its_codebook_and_samples_from_the_code_prior(digits):
    train, test = digits
    model, guide, (enc, dec, codebook, prior) = build_vq()
    fit(model, guide, train, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
    with torch.no_grad():
        codes, _ = codebook(enc(test).reshape(len(test), 4, 2))
    assert perplexity(codes, 16) > 2.0
    # the code prior was fitted to the code frequencies (maximum likelihood): it puts more mass on used codes
    used = torch.bincount(codes.reshape(-1), minlength=16) > 0
    probs = torch.softmax(prior.logits, -1).mean(0)
    assert probs[used].sum() > 0.8
    draws = prior.sample_codes(50, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (50, 4) and int(draws.max()) < 16
    with torch.no_grad():
        images = torch.sigmoid(dec(codebook.embedding[draws].flatten(-2)))
        quantised = QuantizedDecoder(codebook, dec)(codebook.embedding[draws].flatten(-2))
    assert images.shape == (50, D)
    assert torch.allclose(torch.sigmoid(quantised), images)  # a code vector is its own quantisation


def test_perplexity_bounds():
    assert perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)
    assert perplexity(torch.arange(8).repeat(3), 8) == pytest.approx(8.0)


def test_sparse_penalty_makes_codes_sparser(digits):
    train, _ = digits
    mean_abs = {}
    for l1 in (0.0, 1.0):
        model, guide, enc = build_sparse(l1)
        fit(model, guide, train, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
        with torch.no_grad():
            mean_abs[l1] = enc(train).abs().mean().item()
    assert mean_abs[1.0] < 0.5 * mean_abs[0.0], mean_abs


def test_linear_autoencoder_spans_the_pca_subspace():
    """Baldi & Hornik (1989): the optimum of a linear AE with squared error spans the top principal subspace."""
    gen = torch.Generator().manual_seed(0)
    n, d_data, d = 500, 10, 2
    basis = torch.linalg.qr(torch.randn(d_data, d_data, generator=gen))[0]
    scales = torch.tensor([3.0, 2.0, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1])
    x = (torch.randn(n, d_data, generator=gen) * scales) @ basis.T + 1.0
    enc, dec = MLP(d_data, [], d), MLP(d, [], d_data)
    model = autoencoder(dec, get_likelihood("gaussian"), d)
    fit(model, delta_guide(enc), x, epochs=150, batch_size=100, lr=1e-2, seed=0, progress=False)
    angles = principal_angles_to_pca(dec[0].weight, x)
    assert angles.max() < 0.05, angles  # radians; a random 2-plane in R^10 is at ~1 rad
    random_angles = principal_angles_to_pca(torch.randn(d_data, d, generator=gen), x)
    assert random_angles.max() > 0.3
