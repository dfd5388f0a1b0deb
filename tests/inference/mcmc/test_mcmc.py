"""MCMC: batched HMC and Pyro's NUTS against exact and gold-standard posteriors.

Tolerances are Monte Carlo errors from ArviZ (``azcompat.mcse`` of the mean and of
the sd, ESS-based): a moment passes when it is within 4 combined standard
errors of the reference (the reference's own MCSE included), so each check
fails by chance with probability < 1e-4.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.data.posteriordb import load_posteriordb_data, load_posteriordb_draws
from ppl_vae.distributions import Gaussian
from ppl_vae.errors import ConfigError
from ppl_vae.inference import azcompat
from ppl_vae.inference.mcmc.draws import Draws
from ppl_vae.inference.mcmc.hmc import hmc, hmc_latent
from ppl_vae.inference.mcmc.nuts import nuts, nuts_latent
from ppl_vae.models.classic import eight_schools_noncentered, linear_regression
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP

pytestmark = pytest.mark.arviz

Z = 4.0  # standard errors


def moments(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, sd and their ArviZ MCSEs of ``[chain, draw, ...]`` draws."""
    mean, sd = draws.mean((0, 1)), draws.std((0, 1), ddof=1)
    return mean, sd, azcompat.mcse(draws, "mean"), azcompat.mcse(draws, "sd")


def assert_moments_agree(a: np.ndarray, b: np.ndarray, what: str) -> None:
    ma, sa, ea, esa = moments(a)
    mb, sb, eb, esb = moments(b)
    np.testing.assert_array_less(np.abs(ma - mb), Z * np.hypot(ea, eb), err_msg=f"{what}: means")
    np.testing.assert_array_less(np.abs(sa - sb), Z * np.hypot(esa, esb), err_msg=f"{what}: sds")


def small_vae(seed: int = 0) -> tuple[object, torch.Tensor, torch.nn.Module]:
    torch.manual_seed(seed)
    decoder = MLP(2, [16], 8)
    model = vae(decoder, Gaussian(scale=0.5), 2)
    x = torch.randn(3, 8)
    return model, x, decoder


def test_batched_hmc_gives_each_datapoint_the_same_chains_whatever_else_is_in_its_batch():
    torch.manual_seed(1)
    ppca = PPCA(8, 3, sigma=0.5).double()
    x = ppca.sample(6).double()
    # short: HMC is chaotic, and the float64 rounding of a differently batched matmul (1e-16) grows with every
    # transition (about 1e-4 after 60 with Adam's start); over 12 transitions it stays below 1e-12
    kw = dict(num_samples=6, warmup_steps=6, num_chains=2, seed=3, init_steps=0)
    whole = hmc_latent(ppca, x, **kw)
    rows = torch.tensor([5, 2])
    part = hmc_latent(ppca, x[rows], index=rows, **kw)
    assert list(part.coords["point"]) == [5, 2]
    np.testing.assert_allclose(
        part.samples["z"], whole.samples["z"][:, :, rows.numpy()], rtol=1e-9, atol=1e-9
    )
    for k in ("step_size", "n_steps"):
        np.testing.assert_allclose(
            part.sample_stats[k], whole.sample_stats[k][:, :, rows.numpy()], rtol=1e-9
        )


@pytest.mark.slow
def test_batched_hmc_matches_exact_ppca_posterior():
    torch.manual_seed(1)
    ppca = PPCA(8, 3, sigma=0.5)
    x = ppca.sample(10)
    before = [p.detach().clone() for p in ppca.parameters()]
    draws = hmc_latent(ppca, x, num_samples=300, warmup_steps=300, num_chains=4, seed=0)
    z = draws.samples["z"]
    assert z.shape == (4, 300, 10, 3)
    post = ppca.posterior(x)
    mean, sd = post.mean.detach().numpy(), post.stddev.detach().numpy()
    m, s, e, es = moments(z)
    np.testing.assert_array_less(np.abs(m - mean), Z * e)
    np.testing.assert_array_less(np.abs(s - sd), Z * es)
    assert draws.num_divergences == 0
    assert float(azcompat.rhat(z).max()) < 1.05
    # the model's parameters are frozen while sampling and restored after
    assert all(torch.equal(p, b) and p.requires_grad for p, b in zip(ppca.parameters(), before))
    assert all(p.grad is None for p in ppca.parameters())
    # one step size per datapoint, shared by its chains
    assert draws.sample_stats["step_size"].shape == (4, 300, 10)
    assert len(np.unique(draws.sample_stats["step_size"][:, 0, 0])) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_batched_sampler_agrees_with_pyro_nuts_on_vae_latents(kernel):
    model, x, decoder = small_vae()
    batched = hmc_latent(
        model, x[:2], num_samples=400, warmup_steps=200, num_chains=4, seed=0, kernel=kernel
    )
    pyro_nuts = nuts_latent(model, x[:2], num_samples=200, warmup_steps=150, num_chains=2, seed=0)
    assert pyro_nuts.samples["z"].shape == (2, 200, 2, 2)
    assert pyro_nuts.method == "pyro-nuts" and batched.method == f"batched-{kernel}"
    assert_moments_agree(
        batched.samples["z"], pyro_nuts.samples["z"], f"batched {kernel.upper()} vs Pyro NUTS"
    )
    assert all(p.requires_grad for p in decoder.parameters())


def test_inference_data_has_chain_draw_and_diagnostics():
    model, x, _ = small_vae()
    draws = hmc_latent(model, x, num_samples=50, warmup_steps=30, num_chains=2, seed=0)
    idata = draws.to_inference_data()
    posterior, stats = (
        azcompat.posterior_dataset(idata),
        azcompat.posterior_dataset(idata, "sample_stats"),
    )
    assert dict(posterior["z"].sizes) == {"chain": 2, "draw": 50, "point": 3, "z_dim_0": 2}
    assert dict(stats["diverging"].sizes) == {"chain": 2, "draw": 50, "point": 3}
    assert np.array_equal(posterior["z"].values, draws.samples["z"])
    table = draws.diagnostics()
    assert {"ess_bulk", "ess_tail", "r_hat"} <= set(table.columns) and len(table) == 6
    assert draws.min_ess_per_point().shape == (3,)


def test_divergences_are_reported():
    """A step size far too large for a narrow Gaussian: every transition diverges and is counted."""

    def narrow(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(1), 1e-3).to_event(1))

    init = torch.full((2, 1), 0.5)  # 500 sds out: the first leapfrog step's energy error is huge
    draws = hmc_latent(
        narrow,
        torch.zeros(2, 1),
        num_samples=20,
        warmup_steps=0,
        num_chains=2,
        seed=0,
        max_energy_error=1e-6,
        init_steps=0,
        init=init,
    )
    # every transition of every chain and datapoint diverges, is rejected, and is counted
    assert draws.num_divergences == 2 * 20 * 2
    assert np.all(draws.samples["z"] == 0.5)


def posteriordb(name):
    data = load_posteriordb_data(name)
    args = (data["sigma"], data["y"]) if "sigma" in data else (data["X"], data["y"])
    return args, load_posteriordb_draws(name)


def with_theta(draws: Draws) -> dict[str, np.ndarray]:
    s = dict(draws.samples)
    s["theta"] = s["mu"][..., None] + s["tau"][..., None] * s["theta_trans"]
    return s


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_batched_sampler_recovers_eight_schools_reference(kernel):
    args, ref = posteriordb("eight_schools-eight_schools_noncentered")
    # NUTS at Stan's usual remedy for this small funnel, target acceptance 0.9 (measured at 0.8: 1 divergent
    # transition in 2000 in float32, 2 in float64; at 0.9: none)
    draws = hmc(
        eight_schools_noncentered,
        *args,
        num_samples=500,
        warmup_steps=300,
        num_chains=4,
        seed=0,
        kernel=kernel,
        target_accept=0.9 if kernel == "nuts" else 0.8,
    )
    ours = with_theta(draws)
    for name in ("mu", "tau", "theta"):
        assert_moments_agree(ours[name], ref[name], f"eight schools {name} ({kernel})")
    if kernel == "nuts":
        assert (
            draws.num_divergences == 0
            and max(float(azcompat.rhat(ours[k]).max()) for k in ("mu", "tau", "theta")) < 1.01
        )


@pytest.mark.slow
def test_pyro_nuts_recovers_eight_schools_reference():
    args, ref = posteriordb("eight_schools-eight_schools_noncentered")
    draws = nuts(
        eight_schools_noncentered, *args, num_samples=200, warmup_steps=200, num_chains=2, seed=0
    )
    assert draws.samples["tau"].shape == (2, 200)
    ours = with_theta(draws)
    for name in ("mu", "tau"):
        assert_moments_agree(ours[name], ref[name], f"eight schools {name} (Pyro NUTS)")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_batched_sampler_recovers_linear_regression_reference(kernel):
    args, ref = posteriordb("sblrc-blr")
    # NUTS is held to R-hat < 1.01, which needs more draws than the moments do (250: 1.022, R-hat's own noise)
    draws = hmc(
        linear_regression,
        *args,
        num_samples=250 if kernel == "hmc" else 1000,
        warmup_steps=250,
        num_chains=4,
        seed=0,
        kernel=kernel,
    )
    for name in ("beta", "sigma"):
        assert_moments_agree(draws.samples[name], ref[name], f"regression {name} ({kernel})")
    if kernel == "nuts":
        assert (
            draws.num_divergences == 0
            and max(float(azcompat.rhat(draws.samples[k]).max()) for k in ("beta", "sigma")) < 1.01
        )
        # a chain left far from the bulk inflates the MCSE enough to pass the moments; R-hat and divergences catch it
        assert float(azcompat.rhat(draws.samples[name]).max()) < 1.05, name
    assert draws.num_divergences == 0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_samples": 0}, "number of draws"),
        ({"num_chains": 0}, "number of chains"),
        ({"warmup_steps": -1}, "warmup"),
    ],
)
def test_bad_counts(kwargs, fragment):
    model, x, _ = small_vae()
    with pytest.raises(ConfigError, match=fragment):
        hmc_latent(model, x, **kwargs)
    with pytest.raises(ConfigError, match=fragment):
        nuts(eight_schools_noncentered, torch.ones(8), **kwargs)


def test_model_without_latent_sites_is_refused():
    def observed_only(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    for run in (hmc_latent, hmc, nuts):
        with pytest.raises(ConfigError, match="no latent sample sites"):
            run(observed_only, torch.zeros(3))


def test_model_that_does_not_broadcast_over_chains_is_refused():
    def bad(X, y):  # beta.unsqueeze(-2) puts the chains on the wrong dimension
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("rows", X.shape[0]):
            pyro.sample("y", dist.Normal((X * beta.unsqueeze(-2)).sum(-1), 1.0), obs=y)

    with pytest.raises(ConfigError, match="broadcast over a leading chains plate"):
        hmc(bad, torch.ones(5, 2), torch.ones(5), num_samples=5, warmup_steps=0, num_chains=3)


def test_hmc_runs_a_float64_model_with_a_flat_prior_in_float64():
    """A flat (``ImproperUniform``) prior is given a value to trace, never sampled; the chains take the data's dtype.

    Linear regression with flat coefficients and known noise: the posterior is N((X'X)^-1 X'y, s^2 (X'X)^-1) exactly.
    The default prior dtype is float32 while X is float64: a chain started in the default dtype fails at X @ beta.
    """
    from pyro.distributions import constraints

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.5 * torch.randn(
        40, generator=g, dtype=torch.float64
    )

    def model(x, y):
        beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (3,)))
        with pyro.plate("obs", x.shape[0]):
            pyro.sample(
                "y", dist.Normal((x * beta).sum(-1), 0.5), obs=y
            )  # beta: [3], or [chains, 1, 3] under the chains plate

    draws = hmc(model, x, y, num_samples=600, warmup_steps=400, num_chains=4, seed=0)
    beta = draws.samples["beta"]  # [C, S, 3]
    assert beta.dtype == np.float64
    precision = x.T @ x / 0.25
    mean = torch.linalg.solve(x.T @ x, x.T @ y).numpy()
    sd = torch.linalg.inv(precision).diagonal().sqrt().numpy()
    for k in range(3):
        err = beta[..., k].mean() - mean[k]
        assert abs(err) < Z * float(azcompat.mcse(beta[..., k])), (k, err)
        assert abs(beta[..., k].std() / sd[k] - 1) < Z / np.sqrt(
            2 * float(azcompat.ess(beta[..., k]))
        ), k  # an sd from ESS draws
