"""VQ-VAE-2: the autoregressive code prior is a normalised distribution that its sampler draws from; two levels of codes
train on the embedded digits, both codebooks in use, the learned top prior fitting the top codes better than uniform."""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from conftest import Z

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.svi import fit
from ppl_vae.models.cvae_so import empty_guide
from ppl_vae.models.vqvae import (
    AutoregressiveCodePrior,
    Codebook,
    perplexity,
    vqvae2,
    vqvae2_guide,
    vqvae2_sample,
)
from ppl_vae.nn import MLP


@pytest.mark.parametrize("context_dim", [0, 5])
def test_the_autoregressive_prior_sums_to_one_and_its_sampler_draws_from_it(context_dim):
    torch.manual_seed(0)
    prior = AutoregressiveCodePrior(3, 3, hidden=8, context_dim=context_dim).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()  # far from uniform
    codes = torch.tensor(list(itertools.product(range(3), repeat=3)))  # all 27 configurations
    context = (
        torch.randn(1, context_dim, dtype=torch.float64).expand(27, -1) if context_dim else None
    )
    with torch.no_grad():
        probs = prior(codes, context).log_prob(codes).exp()
    assert (
        abs(probs.sum().item() - 1) < 1e-12
    )  # a mask letting position j see its own code would break this
    n = 20000
    g = torch.Generator().manual_seed(1)
    draws = prior.sample_codes(
        n, context=context[:1].expand(n, -1) if context_dim else None, generator=g
    )
    freq = torch.stack([(draws == c).all(-1).double().mean() for c in codes])
    assert (
        (freq - probs).abs() < Z * (probs * (1 - probs) / n).sqrt() + 1e-12
    ).all()  # binomial SE per configuration


def test_vqvae2_trains_two_levels_of_codes_on_the_digits():
    x = load("digits", binarize="threshold").x
    torch.manual_seed(0)
    m_t, k_t, m_b, k_b, d, h = 2, 8, 6, 16, 2, 64
    books = (Codebook(k_t, d, seed=0), Codebook(k_b, d, seed=1))
    priors = (
        AutoregressiveCodePrior(m_t, k_t),
        AutoregressiveCodePrior(m_b, k_b, context_dim=m_t * k_t),
    )
    encoder = torch.nn.Sequential(MLP(64, [], h), torch.nn.ReLU())
    top, bottom = torch.nn.Linear(h, m_t * d), MLP(h + m_t * d, [], m_b * d)
    decoder, bern = MLP((m_t + m_b) * d, [h], 64), get_likelihood("bernoulli")
    model, guide = (
        vqvae2(decoder, bern, books, priors, (m_t, m_b)),
        vqvae2_guide(encoder, top, bottom, books[0], m_t),
    )

    def codes_and_reconstruction():
        with torch.no_grad():
            zt = top(encoder(x))
            ct, et = books[0](zt.reshape(-1, m_t, d))
            zb = bottom(torch.cat([encoder(x), et.flatten(-2)], -1))
            cb, eb = books[1](zb.reshape(-1, m_b, d))
            rec = bern(decoder(torch.cat([eb.flatten(-2), et.flatten(-2)], -1))).log_prob(x)
        return ct, cb, rec

    _, _, before = codes_and_reconstruction()
    fit(model, guide, x, epochs=30, batch_size=64, lr=3e-3, seed=0, progress=False)
    ct, cb, after = codes_and_reconstruction()
    gain = after - before
    assert gain.mean() > Z * gain.std() / math.sqrt(len(gain))
    assert perplexity(ct, k_t) > 2 and perplexity(cb, k_b) > 2  # both levels use several codes

    # the second stage of the paper: the prior fitted by maximum likelihood to the final top codes (with fit, as any Pyro model)
    def top_prior(
        codes,
    ):  # fit takes floating-point data: the codes as floats, read back as integers
        c = codes.long()
        with pyro.plate("data", c.shape[0]):
            pyro.sample("codes_top", priors[0](c), obs=c)

    fit(
        top_prior,
        empty_guide,
        ct.float(),
        epochs=100,
        batch_size=256,
        lr=1e-2,
        seed=0,
        progress=False,
    )
    with torch.no_grad():
        lp = priors[0](ct).log_prob(ct)
    uniform = -m_t * math.log(k_t)
    assert lp.mean() > uniform + Z * lp.std() / math.sqrt(len(lp)), (
        lp.mean(),
        uniform,
    )  # the learned top prior beats uniform
    samples = vqvae2_sample(
        decoder, bern, books, priors, 16, generator=torch.Generator().manual_seed(0)
    )
    assert samples.shape == (16, 64) and ((samples >= 0) & (samples <= 1)).all()
    with pytest.raises(ConfigError, match="'z_top'"):
        decompose(model, guide, x[:4])  # point masses: refused by the site's name
