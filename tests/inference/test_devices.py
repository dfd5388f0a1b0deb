"""Everything runs where its data and networks are: no tensor or generator on a default device or dtype.

Two checks that need no GPU:

* **float64 end to end**: data and networks in float64 while torch's default dtype is float32.
  A tensor made without the input's dtype is float32; results must come back float64, and on
  PPCA with its exact posterior as the guide the bounds must equal log p(x) to float64
  precision (a float32 step anywhere costs ~1e-6 relative, far above the 1e-9 allowed).
* **meta default device**: data and networks on the CPU while torch's *default device* is
  ``meta`` (``torch.set_default_device``). A tensor or module created without the data's device
  lands on ``meta``, which holds no values: mixing it with a CPU tensor, or reading a number off
  it, raises. This is the slip that breaks on CUDA (a CPU tensor meeting a CUDA one), caught on
  a CPU-only machine. Generators are checked too: a draw from a CPU generator into a
  default-device tensor lands on ``meta`` and fails the same way.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import frozen_ppca, two_level_vae

from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.guides.flows import IAFEncoder
from ppl_vae.inference.elbo import evaluate_elbo
from ppl_vae.inference.gaps.ais import ais, bdmc
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.gaps.local import optimize_local
from ppl_vae.inference.gradients import gradient_stats
from ppl_vae.inference.mcmc.compare import compare
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.mcmc.vi import vi_draws_amortized
from ppl_vae.inference.params import discover
from ppl_vae.inference.svi import fit
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


def small_vae(dtype: torch.dtype):
    torch.manual_seed(0)
    dec, enc = MLP(2, [8], 6).to(dtype), GaussianEncoder(MLP(6, [], 8), 8, 2).to(dtype)
    return vae(dec, get_likelihood("bernoulli"), 2), amortized_guide(enc)


def hvae(dtype: torch.dtype):
    """The two-site hierarchical VAE of ``--model hvae --hidden 8 --latent-dim 2`` on 6 columns."""
    torch.manual_seed(0)
    return in_dtype(*two_level_vae(data_dim=6, hidden=8, latent_dim=2), dtype)


def iaf_vae(dtype: torch.dtype):
    """The VAE with a one-flow IAF guide of ``--guide iaf --flows 1 --hidden 8 --latent-dim 2`` on 6 columns."""
    torch.manual_seed(0)
    encoder = IAFEncoder(MLP(6, [], 8), 8, 2, num_flows=1)
    model = vae(MLP(2, [8], 6), get_likelihood("bernoulli", dim=6), 2)
    return in_dtype(model, amortized_guide(encoder), dtype)


def in_dtype(model, guide, dtype: torch.dtype):
    """``(model, guide)`` with every network they use (found by running them once) in ``dtype``."""
    for net in discover(model, guide, (data(torch.float32)[:2],)).modules:
        net.to(dtype)
    return model, guide


def data(dtype: torch.dtype) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((24, 6), 0.5, dtype=dtype), generator=torch.Generator().manual_seed(1)
    )


def _fit(estimator: str, **kw):
    return lambda m, g, x: (
        fit(
            m,
            g,
            x,
            epochs=1,
            batch_size=12,
            progress=False,
            estimator=estimator,
            validation=x[:6],
            **kw,
        ).train_elbo
    )


def _decompose(**kw):
    return lambda m, g, x: (
        decompose(
            m, g, x[:3], num_samples=20, elbo_samples=10, local_options={"max_steps": 20}, **kw
        ).log_px
    )


def _compare(m, g, x):
    vi = vi_draws_amortized(m, g, x[:2], num_samples=20)
    return compare(
        vi, hmc_latent(m, x[:2], num_samples=10, warmup_steps=10, num_chains=2, init_steps=5)
    ).per_point


PATHS = {
    "fit reparam": _fit("reparam"),
    "fit score+nvil": _fit("score+nvil", num_particles=2),
    "fit score+loo": _fit("score+loo", num_particles=2),
    "fit iwae": _fit("iwae", num_particles=2),
    "fit analytic-kl": _fit("analytic-kl"),
    "evaluate_elbo": lambda m, g, x: evaluate_elbo(m, g, (x,)).value,
    "importance_bounds": lambda m, g, x: (
        importance_bounds(m, g, x[:4], num_samples=20, seed=0).iwae
    ),
    "optimize_local full": lambda m, g, x: (
        optimize_local(m, x[:3], init=g, family="full", max_steps=20).final_elbo
    ),
    "optimize_local flow": lambda m, g, x: (
        optimize_local(m, x[:3], init=g, family="flow", max_steps=20).final_elbo
    ),
    "decompose": _decompose(families=("diagonal", "full")),
    "decompose ais": _decompose(logpx="ais", ais_options={"num_steps": 5, "num_chains": 4}),
    "ais": lambda m, g, x: ais(m, x[:3], init=g, num_steps=5, num_chains=2).log_px,
    "bdmc": lambda m, g, x: bdmc(m, x[:2], num_steps=5, num_chains=2).lower,
    "hmc_latent": lambda m, g, x: (
        hmc_latent(m, x[:3], num_samples=10, warmup_steps=10, num_chains=2, init_steps=5).samples
    ),
    "compare": _compare,
    "gradient_stats": lambda m, g, x: gradient_stats(
        m, g, (x[:8],), estimators=("reparam", "score"), repeats=3, warmup=2
    ),
}

MODELS = {
    "vae": small_vae,
    "hvae (two sites)": hvae,
    "vae + iaf guide": iaf_vae,
}


def run_path(path: str, model: str, dtype: torch.dtype, default_device: str = "cpu"):
    """Build the model and data (on the CPU), then run ``path`` with torch's default device set to ``default_device``."""
    m, g = MODELS[model](dtype)
    x = data(dtype)
    with torch.device(default_device):
        return PATHS[path](m, g, x)


def tensors_in(result) -> list[torch.Tensor]:
    if torch.is_tensor(result):
        return [result]
    if isinstance(result, dict):
        return [v for r in result.values() for v in tensors_in(r)]
    return []


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_nothing_is_made_on_the_default_device(path, model):
    try:
        result = run_path(path, model, torch.float32, default_device="meta")
    except ConfigError as refusal:  # refused by name (say, a score-function estimator on a flow): the same on the CPU
        with pytest.raises(ConfigError) as on_cpu:
            run_path(path, model, torch.float32)
        assert str(on_cpu.value) == str(refusal)
        return
    assert all(t.device.type == "cpu" for t in tensors_in(result)), path


@pytest.mark.parametrize("path", sorted(PATHS))
def test_float64_data_and_networks_stay_float64(path):
    assert torch.get_default_dtype() == torch.float32
    result = run_path(path, "vae", torch.float64)
    floats = [t for t in tensors_in(result) if t.is_floating_point()]
    assert all(t.dtype == torch.float64 for t in floats), [t.dtype for t in floats]
    assert all(bool(torch.isfinite(t).all()) for t in floats)


def test_float64_bounds_are_exact_to_float64_precision_with_the_exact_posterior():
    """PPCA with its exact posterior as guide: every importance weight is p(x), so ELBO = IWAE = log p(x) up to round-off."""
    m = frozen_ppca(D=5, d=2, sigma=0.8)
    x = m.sample(6)
    b = importance_bounds(m, m.exact_guide, x, num_samples=16, seed=0)
    exact = m.log_marginal(x)
    scale = exact.abs().max().item()
    # float64 round-off over a few hundred operations: ~1e-13 relative; a float32 step anywhere: ~1e-7
    assert (b.elbo - exact).abs().max().item() < 1e-9 * scale
    assert (b.iwae - exact).abs().max().item() < 1e-9 * scale
    assert math.isfinite(scale)
