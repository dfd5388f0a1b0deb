"""Models, guides and networks: shapes, exact PPCA answers, and short training runs."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae.data import load
from ppl_vae.distributions import check_support, get_likelihood, one_hot
from ppl_vae.errors import ConfigError, DataError
from ppl_vae.guides.amortized import amortized_guide, delta_guide, masking_noise
from ppl_vae.inference.elbo import elbo_per_datapoint, evaluate_elbo
from ppl_vae.inference.estimators import get_estimator
from ppl_vae.inference.params import discover
from ppl_vae.inference.svi import fit
from ppl_vae.inference.traces import traces
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import autoencoder, cvae, decode_prior, vae
from ppl_vae.nn import MLP, Concat, ConvDecoder, ConvEncoder, GaussianEncoder


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train", binarize="threshold").x


def small_vae(data_dim=64, latent_dim=2, hidden=32, likelihood="bernoulli"):
    decoder = MLP(latent_dim, [hidden], data_dim)
    encoder = GaussianEncoder(MLP(data_dim, [], hidden), hidden, latent_dim)
    return (
        vae(decoder, get_likelihood(likelihood, dim=data_dim), latent_dim),
        amortized_guide(encoder),
        decoder,
        encoder,
    )


# --- networks -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_conv_blocks_shapes(shape):
    d = shape[0] * shape[1] * shape[2]
    enc, dec = ConvEncoder(shape, 16), ConvDecoder(3, shape)
    assert enc(torch.rand(5, d)).shape == (5, 16)
    assert dec(torch.randn(5, 3)).shape == (5, d)
    assert dec(torch.randn(4, 5, 3)).shape == (4, 5, d)  # particle dimension in front


def test_full_covariance_encoder_gives_cholesky_factor():
    enc = GaussianEncoder(MLP(6, [8], 8), 8, 3, covariance="full")
    loc, tril = enc(torch.randn(4, 6))
    assert loc.shape == (4, 3) and tril.shape == (4, 3, 3)
    assert torch.equal(tril, torch.tril(tril))
    assert (torch.diagonal(tril, dim1=-2, dim2=-1) > 0).all()
    assert (tril[:, 1, 0] != 0).all()  # off-diagonal entries are free


def test_latent_dim_must_be_positive():
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="latent dimension"):
            vae(MLP(2, [], 4), get_likelihood("bernoulli"), bad)


@pytest.mark.parametrize(
    "name", ["bernoulli", "gaussian", "gaussian-learned", "continuous-bernoulli", "beta"]
)
def test_likelihoods_have_one_event_dimension_and_finite_log_prob(name):
    lik = get_likelihood(name, dim=5)
    x = torch.rand(3, 5).clamp(0.05, 0.95)
    if name == "bernoulli":
        x = x.round()
    d = lik(torch.randn(3, 5))
    assert d.event_shape == (5,) and d.batch_shape == (3,)
    assert torch.isfinite(d.log_prob(x)).all()


def test_likelihood_support_checks():
    with pytest.raises(DataError, match="not binary"):
        check_support(torch.tensor([[0.0, 0.5]]), get_likelihood("bernoulli"))
    with pytest.raises(DataError, match="outside \\[0, 1\\]"):
        check_support(torch.tensor([[1.5]]), get_likelihood("continuous-bernoulli"))
    with pytest.raises(DataError, match="open interval"):
        check_support(torch.tensor([[0.0]]), get_likelihood("beta"))
    with pytest.raises(ConfigError, match="unknown likelihood"):
        get_likelihood("poisson")


# --- PPCA: the exact model ------------------------------------------------------


@pytest.fixture
def ppca64():
    torch.manual_seed(1)
    model = PPCA(5, 2, sigma=0.7).double()
    with torch.no_grad():
        model.W.copy_(torch.randn(5, 2, dtype=torch.float64))
        model.mu.copy_(torch.randn(5, dtype=torch.float64))
    return model


def test_ppca_posterior_matches_gaussian_conditioning(ppca64):
    x = ppca64.sample(4)
    W, mu, s2 = ppca64.W.detach(), ppca64.mu.detach(), ppca64.sigma.item() ** 2
    # joint of (z, x): cov_zx = W^T, cov_xx = W W^T + s2 I
    cov_xx = W @ W.T + s2 * torch.eye(5, dtype=torch.float64)
    gain = W.T @ torch.linalg.inv(cov_xx)
    mean = (x - mu) @ gain.T
    cov = torch.eye(2, dtype=torch.float64) - gain @ W
    post = ppca64.posterior(x)
    torch.testing.assert_close(post.mean, mean.detach())
    torch.testing.assert_close(post.covariance_matrix[0], cov.detach())


def test_ppca_elbo_with_exact_posterior_equals_log_marginal(ppca64):
    x = ppca64.sample(6)
    with torch.no_grad():
        est = elbo_per_datapoint(ppca64, ppca64.exact_guide, x, num_particles=5)
        elbo, se = est.value, est.se
        exact = ppca64.log_marginal(x)
    # with the exact posterior every importance weight equals p(x): zero variance
    torch.testing.assert_close(elbo, exact, rtol=0, atol=1e-10)
    assert (se < 1e-10).all()


def test_fitted_mean_field_guide_stays_below_log_marginal():
    torch.manual_seed(0)
    truth = PPCA(6, 2, sigma=0.5)
    with torch.no_grad():
        truth.W.copy_(torch.tensor([[2.0, 1.5]] * 3 + [[1.0, -0.5]] * 3))  # correlated posterior
    x = truth.sample(400)
    model = PPCA(6, 2)
    guide = amortized_guide(GaussianEncoder(MLP(6, [], 16), 16, 2))
    fit(model, guide, x, epochs=60, batch_size=100, lr=1e-2, progress=False)
    with torch.no_grad():
        elbo = elbo_per_datapoint(model, guide, x, num_particles=50).value
        gap = model.log_marginal(x) - elbo
    se = gap.std() / math.sqrt(len(gap))
    # Jensen: ELBO <= log p(x); a diagonal q of a correlated posterior leaves a gap
    assert gap.mean() > 4 * se, (gap.mean(), se)


# --- training --------------------------------------------------------------------


def test_vae_training_improves_elbo(digits):
    model, guide, *_ = small_vae()
    x = digits[:300]
    with torch.no_grad():
        before = evaluate_elbo(model, guide, (x,), num_particles=4).value
    result = fit(model, guide, x, epochs=15, batch_size=50, lr=1e-2, progress=False)
    with torch.no_grad():
        after = evaluate_elbo(model, guide, (x,), num_particles=4).value
    diff = after - before
    assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff)), (before.mean(), after.mean())
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"]


def test_learned_gaussian_scale_is_found_and_trained():
    lik = get_likelihood("gaussian-learned", dim=4)
    decoder = MLP(2, [8], 4)
    model = vae(decoder, lik, 2)
    guide = amortized_guide(GaussianEncoder(MLP(4, [], 8), 8, 2))
    x = 0.1 * torch.randn(200, 4)
    found = discover(model, guide, (x[:3],))
    assert any(p is lik.log_scale for p in found.params)
    before = lik.log_scale.detach().clone()
    fit(model, guide, x, epochs=20, batch_size=50, lr=1e-2, progress=False)
    assert (lik.log_scale.detach() < before).all()  # data scale 0.1 < initial 1


def test_two_models_never_share_parameters(digits):
    torch.manual_seed(0)
    m1, g1, d1, _ = small_vae()
    torch.manual_seed(0)
    m2, g2, d2, _ = small_vae()  # same names, same architecture, same init
    p1 = discover(m1, g1, (digits[:2],)).params
    p2 = discover(m2, g2, (digits[:2],)).params
    assert not {id(p) for p in p1} & {id(p) for p in p2}
    snapshot = [p.detach().clone() for p in p2]
    fit(m1, g1, digits[:200], epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, p2))
    assert not all(torch.equal(a, b) for a, b in zip(snapshot, p1))
    assert len(pyro.get_param_store()) == 0


def _kl(model, guide, x):
    """Monte Carlo KL(q || p(z)) per datapoint: E_q[log q(z|x) - log p(z)]."""
    with torch.no_grad():
        m, g = traces(model, guide, x)
        return g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"]) - m.nodes["z"]["fn"].log_prob(
            m.nodes["z"]["value"]
        )


def test_beta_scales_exactly_the_kl_term(digits):
    from ppl_vae.inference.step import _ScaleLatents

    model, guide, *_ = small_vae()
    x = digits[:20]
    loss = get_estimator("reparam").loss(model, guide)
    pyro.set_rng_seed(3)
    l1 = loss(x)
    pyro.set_rng_seed(3)
    with _ScaleLatents(4.0):
        l4 = loss(x)
    pyro.set_rng_seed(3)
    kl = _kl(model, guide, x).sum()  # the same z draw as both losses
    # -ELBO_beta = -E[log p(x|z)] + beta * KL, so the difference is (beta - 1) * KL
    torch.testing.assert_close(l4 - l1, 3.0 * kl, rtol=1e-5, atol=1e-4)


def test_larger_beta_gives_smaller_kl(digits):
    x = digits[:400]
    kls = {}
    for beta in (1.0, 8.0):
        torch.manual_seed(0)
        model, guide, *_ = small_vae(latent_dim=4)
        fit(model, guide, x, epochs=15, batch_size=50, lr=1e-2, beta=beta, progress=False)
        kls[beta] = torch.stack([_kl(model, guide, x) for _ in range(4)]).mean(0)
    diff = kls[1.0] - kls[8.0]
    assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff)), {
        b: k.mean() for b, k in kls.items()
    }


def test_cvae_generates_the_requested_class():
    from sklearn.linear_model import LogisticRegression

    train = load("digits", "train", binarize="threshold")
    d, c = 4, 10
    decoder = Concat(MLP(d + c, [128], 64))
    encoder = GaussianEncoder(Concat(MLP(64 + c, [], 128)), 128, d)
    model = cvae(decoder, get_likelihood("bernoulli"), d, c)
    guide = amortized_guide(encoder, inputs=lambda x, y: (x, one_hot(y, c)))
    fit(model, guide, (train.x, train.y), epochs=40, batch_size=100, lr=3e-3, progress=False)
    clf = LogisticRegression(max_iter=2000).fit(train.x.numpy(), train.y.numpy())
    labels = torch.arange(c).repeat_interleave(30)
    images = decode_prior(
        decoder,
        get_likelihood("bernoulli"),
        d,
        len(labels),
        cond=one_hot(labels, c),
        generator=torch.Generator().manual_seed(0),
    )
    acc = (clf.predict((images > 0.5).float().numpy()) == labels.numpy()).mean()
    # chance is 0.1 with binomial SE 0.017 for 300 draws; 0.5 is > 20 SE above chance
    assert acc > 0.5, acc


def test_autoencoder_objective_is_the_reconstruction_log_likelihood(digits):
    decoder, encoder = MLP(3, [16], 64), MLP(64, [16], 3)
    lik = get_likelihood("bernoulli")
    model, guide = autoencoder(decoder, lik, 3), delta_guide(encoder)
    x = digits[:10]
    elbo = elbo_per_datapoint(model, guide, x).value
    with torch.no_grad():
        recon = lik(decoder(encoder(x))).log_prob(x)
    torch.testing.assert_close(elbo, recon)


def test_denoising_guide_corrupts_only_in_training_mode(digits):
    encoder = MLP(64, [], 3)
    guide = delta_guide(encoder, corruption=masking_noise(0.5))
    x = digits[:5]

    def z_of(mode):
        encoder.train(mode)
        return poutine.trace(guide).get_trace(x).nodes["z"]["value"]

    assert torch.equal(z_of(False), encoder(x))
    assert not torch.equal(z_of(True), encoder(x))
