"""ppl_vae.inference.traces: per-datapoint log-densities and importance log-weights, against closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Z

from ppl_vae.errors import ConfigError
from ppl_vae.inference.traces import (
    first_nonfinite_site,
    log_weights,
    nonfinite_at,
    per_datapoint,
    plate_nesting,
    traces,
)

SIGMA = 0.7  # x | z ~ N(z, SIGMA^2 I), z ~ N(0, I): p(x) = N(0, (1 + SIGMA^2) I)
X = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 0.0]], dtype=torch.float64)


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)


def exact_guide(x):
    """The exact posterior N(x / (1 + SIGMA^2), SIGMA^2 / (1 + SIGMA^2))."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample(
            "z", dist.Normal(x / (1 + SIGMA**2), SIGMA / math.sqrt(1 + SIGMA**2)).to_event(1)
        )


def loose_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x, 1.3).to_event(1))


def log_px(x: torch.Tensor) -> torch.Tensor:
    return dist.Normal(x.new_tensor(0.0), x.new_tensor(math.sqrt(1 + SIGMA**2))).log_prob(x).sum(-1)


def test_with_the_exact_posterior_every_log_weight_is_log_p_x():
    lw = log_weights(model, exact_guide, X, num_samples=50)
    assert lw.shape == (50, 3)
    assert torch.allclose(lw, log_px(X).expand(50, -1), rtol=1e-12, atol=1e-12)


def test_the_mean_log_weight_is_the_closed_form_elbo_within_its_standard_error():
    """ELBO = log p(x) - KL(q || p(z | x)), the KL of two Gaussians in closed form; 4000 draws, seeded, within Z standard errors."""
    torch.manual_seed(0)
    lw = log_weights(model, loose_guide, X, num_samples=4000)
    post = dist.Normal(X / (1 + SIGMA**2), SIGMA / math.sqrt(1 + SIGMA**2))
    elbo = log_px(X) - torch.distributions.kl_divergence(dist.Normal(0.5 * X, 1.3), post).sum(-1)
    se = lw.std(0) / math.sqrt(lw.shape[0])
    assert bool(((lw.mean(0) - elbo).abs() < Z * se).all()), (lw.mean(0), elbo, se)


def test_per_datapoint_sums_a_site_over_all_but_its_rows_and_spreads_a_global_one_evenly():
    model_tr, _ = traces(model, exact_guide, X)
    site = model_tr.nodes["x"]
    manual = dist.Normal(site["fn"].base_dist.loc, SIGMA).log_prob(X).sum(-1)
    assert torch.allclose(per_datapoint(site, "data"), manual, rtol=1e-12)

    def global_model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_tensor(0.0), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([x.shape[0], 2]).to_event(1), obs=x)

    tr = pyro.poutine.trace(global_model).get_trace(X)
    with pytest.raises(ConfigError, match="site 'mu' is outside the 'data' plate"):
        per_datapoint(tr.nodes["mu"], "data")
    share = per_datapoint(
        tr.nodes["mu"], "data", spread=3
    )  # a third of the global term in each of 3 rows
    assert torch.allclose(
        share.expand(3).sum(), tr.nodes["mu"]["fn"].log_prob(tr.nodes["mu"]["value"]), rtol=1e-12
    )


def test_the_first_non_finite_site_is_named():
    def bad_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x * float("nan"), 1.0).to_event(1))

    with pyro.validation_enabled(False):
        model_tr, guide_tr = traces(model, bad_guide, X)
    name, where = first_nonfinite_site(model_tr, guide_tr)
    assert name == "z" and where.startswith("guide site 'z'")
    model_tr, guide_tr = traces(model, exact_guide, X)
    assert first_nonfinite_site(model_tr, guide_tr)[0] is None


def test_per_datapoint_keeps_a_named_draws_plate_takes_masked_values_as_they_are_and_names_its_caller():
    """The estimators' options: their particles' plate kept beside the rows, values already masked not masked again,
    a sequential data plate summed over, the refusal naming the caller."""
    k, mask = 4, torch.tensor([True, False, True])

    def particles_model(x):
        with (
            pyro.plate("particles", k, dim=-2),
            pyro.plate("data", x.shape[0]),
            pyro.poutine.mask(mask=mask),
        ):
            pyro.sample("x", dist.Normal(x.new_zeros(2), 1.0).to_event(1), obs=x)

    site = pyro.poutine.trace(particles_model).get_trace(X).nodes["x"]
    lp = torch.where(mask, site["fn"].log_prob(site["value"]), 0.0)  # [K, N], masked as Pyro masks
    kept = per_datapoint(site, "data", lp, draws="particles", masked=True)
    assert kept.shape == (k, 3) and torch.equal(kept, lp)
    remasked = per_datapoint(site, "data", torch.ones(k, 3, dtype=torch.float64), draws="particles")
    assert torch.equal(
        remasked, mask.double().expand(k, 3)
    )  # values not yet masked are masked here
    narrow = per_datapoint(
        site, "data", lp[0], draws="particles", masked=True
    )  # [N], broadcast over K
    assert narrow.shape == (1, 3) and torch.equal(narrow[0], lp[0])

    def sequential(x):
        for i in pyro.plate("data", x.shape[0]):
            pyro.sample(f"x_{i}", dist.Normal(0.0, 1.0), obs=x[i, 0])

    tr = pyro.poutine.trace(sequential).get_trace(X)
    assert torch.equal(
        per_datapoint(tr.nodes["x_1"], "data"), tr.nodes["x_1"]["fn"].log_prob(X[1, 0])
    )
    outside = {
        "name": "g",
        "fn": dist.Normal(0.0, 1.0),
        "value": torch.tensor(0.0),
        "cond_indep_stack": (),
    }
    with pytest.raises(ConfigError, match="per-datapoint estimators need every site inside it"):
        per_datapoint(outside, "data", what="estimators")


def test_nonfinite_at_reads_the_value_before_the_log_density():
    calls = []

    def density():
        calls.append(1)
        return torch.tensor([0.0, -math.inf])

    assert nonfinite_at("guide", "z", torch.tensor([math.nan]), density) == (
        "guide site 'z' has a non-finite value",
        None,
    )
    assert not calls  # a non-finite value is named without scoring it
    found, lp = nonfinite_at("model", "x", torch.zeros(2), density)
    assert found == "model site 'x' has a non-finite log-density" and calls == [1]
    assert nonfinite_at("model", "x", torch.zeros(2), lambda: torch.zeros(2))[0] is None


def test_plate_nesting_counts_the_plates_the_sites_sit_in():
    def nested(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("cols", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(x.new_tensor(0.0), 1.0), obs=x)

    assert plate_nesting(model, exact_guide, X) == 1
    assert plate_nesting(nested, lambda x: None, X) == 2
