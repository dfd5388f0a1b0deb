"""Deep hierarchical VAE with ladder inference, the ELBO's KL term per latent site, and the KL warm-up.

Checks: the precision-weighted combination is the normalised product of two Gaussians; the KL terms per site
and the reconstruction term add up to the ELBO (three independent Monte Carlo estimates, within ``Z`` combined
standard errors); the guide shares the generative networks; the analyses cover every layer; on the embedded
digits the warm-up keeps the hierarchy from collapsing.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.inference.elbo import elbo_per_datapoint, kl_per_site
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.svi import Objective, fit
from ppl_vae.inference.traces import per_datapoint, traces
from ppl_vae.models.ladder import ladder_networks, precision_weighted

D = 64


def nets(seed: int = 0, dims=(8, 6, 4, 2)):
    torch.manual_seed(seed)
    return ladder_networks(D, dims, 32, get_likelihood("bernoulli"))


@pytest.fixture(scope="module")
def digits():
    return load("digits", binarize="threshold").x, load(
        "digits", split="test", binarize="threshold"
    ).x


def test_precision_weighting_is_the_normalised_product_of_two_gaussians():
    g = torch.Generator().manual_seed(0)
    m1, m2 = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    s1, s2 = (
        torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1,
    )
    m, s = precision_weighted((m1, s1), (m2, s2))
    normal = torch.distributions.Normal
    gaps = [
        normal(m1, s1).log_prob(z) + normal(m2, s2).log_prob(z) - normal(m, s).log_prob(z)
        for z in torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    ]
    for gap in gaps[
        1:
    ]:  # log N1 + log N2 - log N is the same for every z: N is their product, normalised
        assert torch.allclose(gap, gaps[0], atol=1e-12)
    assert (s < torch.minimum(s1, s2)).all()  # combining evidence narrows


def test_kl_terms_and_reconstruction_add_up_to_the_elbo(digits):
    n = nets(1)
    x = digits[1][:20]
    S = 400
    kls = kl_per_site(n.model, n.guide, x, num_samples=S, seed=0)
    assert list(kls) == ["z4", "z3", "z2", "z1"]  # the order the model samples them
    with torch.no_grad():
        torch.manual_seed(1)
        model_tr, _ = traces(n.model, n.guide, x, num_samples=S)
        rec_draws = per_datapoint(model_tr.nodes["x"], "data")  # log p(x | z1), [S, N]
    rec, rec_se = rec_draws.mean(0), rec_draws.std(0) / math.sqrt(S)
    torch.manual_seed(2)
    elbo = elbo_per_datapoint(n.model, n.guide, x, num_particles=S)
    total_kl = sum(k.value for k in kls.values())
    kl_se = sum(
        k.se for k in kls.values()
    )  # the terms share draws: the SE of their sum is at most the sum of SEs
    err = rec - total_kl - elbo.value
    assert (err.abs() < Z * (rec_se**2 + kl_se**2 + elbo.se**2).sqrt()).all(), err
    assert all((k.value > -Z * k.se).all() for k in kls.values())  # a KL is not negative


def test_the_guide_shares_the_generative_path_and_fit_trains_each_network_once(digits):
    n = nets(2)
    x = digits[1][:5]
    torch.manual_seed(0)
    _, before = traces(n.model, n.guide, x)
    with torch.no_grad():
        n.priors[0].loc.bias.add_(
            1.0
        )  # p(z1 | z2)'s mean moves: so does q(z1 | z2, x), the ladder's combination
    torch.manual_seed(0)
    _, after = traces(n.model, n.guide, x)
    assert torch.equal(before.nodes["z2"]["value"], after.nodes["z2"]["value"])
    assert not torch.allclose(before.nodes["z1"]["fn"].mean, after.nodes["z1"]["fn"].mean)
    result = fit(n.model, n.guide, digits[0][:100], epochs=1, batch_size=50, progress=False)
    unique = {id(p) for m in (n.decoder, n.priors, n.bottom_up, n.heads) for p in m.parameters()}
    found = result.trained.found.params
    assert len(found) == len({id(p) for p in found}) == len(unique)


def test_the_analyses_cover_every_layer(digits):
    n = nets(3)
    x = digits[1][:3]
    with pytest.raises(ConfigError, match="'z1'.*depends on|depends on"):
        decompose(
            n.model, n.guide, x
        )  # the ladder guide is in no family: refused, naming the dependence
    report = decompose(
        n.model,
        n.guide,
        x,
        families=("full",),
        num_samples=50,
        elbo_samples=20,
        local_options={"max_steps": 20},
    )
    assert not report.q_in_family and torch.isfinite(report.inference_gap).all()
    draws = hmc_latent(n.model, x, num_samples=10, warmup_steps=10, num_chains=2, seed=0)
    assert {k: tuple(v.shape[-1:]) for k, v in draws.samples.items()} == {
        "z1": (8,),
        "z2": (6,),
        "z3": (4,),
        "z4": (2,),
    }


def test_the_warm_up_ramps_the_kl_weight_step_by_step():
    obj = Objective(lambda *batch: None, [], 100, 0.5, kl_warmup=2)  # type: ignore[arg-type]
    weights = []
    for step in range(12):
        obj.anneal(step, 5)  # 5 steps per epoch: the ramp spans 10 steps
        weights.append(obj.scale_latents.beta)
    assert weights[:10] == pytest.approx([0.5 * (s + 1) / 10 for s in range(10)]) and weights[
        10:
    ] == [0.5, 0.5]


@pytest.mark.slow
def test_warm_up_keeps_a_four_layer_ladder_from_collapsing(digits):
    """Without warm-up every layer of this 4-layer ladder collapses to its prior (KL terms of 0.00 nats, measured); with 20
    epochs of warm-up more layers carry information (here z1; the upper ones still collapse at this size and budget)
    and the test ELBO is higher by more than Z paired standard errors."""
    train, test = digits
    out = {}
    for warmup in (0, 20):
        n = nets(0, dims=(16, 8, 4, 2))
        fit(
            n.model,
            n.guide,
            train,
            epochs=60,
            batch_size=64,
            lr=3e-3,
            kl_warmup=warmup,
            seed=0,
            progress=False,
        )
        torch.manual_seed(0)
        out[warmup] = (
            elbo_per_datapoint(n.model, n.guide, test, num_particles=10).value,
            {
                k: v.value.mean().item()
                for k, v in kl_per_site(n.model, n.guide, test, num_samples=10).items()
            },
        )
    (e0, k0), (e1, k1) = out[0], out[20]
    diff = e1 - e0
    assert diff.mean() > Z * diff.std() / math.sqrt(len(diff)), (diff.mean(), k0, k1)
    assert sum(v > 0.5 for v in k0.values()) < sum(v > 0.5 for v in k1.values()), (k0, k1)


def test_prior_samples_draw_every_layer_so_a_collapsed_top_still_gives_varied_images():
    from ppl_vae.models.ladder import ancestral_means

    n = nets(4)
    with torch.no_grad():
        for prior in n.priors:  # every conditional ignores the layer above: the top latent carries nothing, as after a collapse
            prior.body[0].weight.zero_()
    g = torch.Generator().manual_seed(0)
    means = ancestral_means(
        n.decoder, list(n.priors), get_likelihood("bernoulli"), 2, 50, generator=g
    )
    top_only = torch.sigmoid(
        n.top_decoder(torch.randn(50, 2, generator=g))
    )  # each lower layer at its conditional mean
    assert means.std(0).max() > 0.05 and top_only.std(0).max() < 1e-6
