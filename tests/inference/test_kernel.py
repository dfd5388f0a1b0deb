"""The MCMC kernels as pure steps shaped for an accelerator: what they dispatch and what they read back.

Counts come from :class:`~ppl_vae.inference.dispatch.Dispatches` (operations dispatched, host
synchronisations). Statistical checks: z-scores of whitened moments against MCSEs, their squares as
a chi-square sample (p > 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.welford import WelfordCovariance
from scipy import stats

from ppl_vae.distributions import Bernoulli
from ppl_vae.errors import ConfigError
from ppl_vae.inference import azcompat
from ppl_vae.inference.dispatch import Dispatches
from ppl_vae.inference.kernel import (
    HMCInfo,
    NUTSInfo,
    State,
    Window,
    adapt_final,
    adapt_init,
    adapt_update,
    da_final,
    da_init,
    da_update,
    nuts_transition,
    transition,
    welford_final,
    welford_init,
    welford_update,
    window_schedule,
)
from ppl_vae.inference.latent import latent_of, log_joint
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.random import Streams
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP

P_MIN = 1e-4


def gaussian(scales: torch.Tensor):
    """log N(u; 0, diag(scales^2)) per group: ``scales`` ``[G, K]``."""
    return lambda u: -0.5 * ((u / scales) ** 2).sum(-1)


def vae_posterior(n: int, chains: int = 4):
    """The latent posterior of a small Bernoulli VAE (random weights) on ``n`` binary rows, and its state at prior draws."""
    torch.manual_seed(0)
    decoder = MLP(5, [16], 20)
    for p in decoder.parameters():
        p.requires_grad_(False)
    model = vae(decoder, Bernoulli(), 5)
    x = (torch.rand(n, 20) < 0.3).float()
    f = log_joint(model, latent_of(model, x, analysis="test"), x)
    return f, State.at(f, torch.randn(chains, n, 5))


def counted(step, *args, **kwargs):
    """``step(*args, **kwargs)`` under a :class:`Dispatches` counter: the counter and the result."""
    with Dispatches() as d:
        out = step(*args, **kwargs)
    return d, out


@pytest.mark.parametrize("mass", ["diag", "dense"])
def test_an_hmc_transition_reads_nothing_back_even_when_chains_diverge(mass):
    f, state = vae_posterior(8)
    G, K = 8, 5
    inv_mass = torch.full((G, K), 0.5) if mass == "diag" else torch.eye(K).expand(G, K, K) * 0.5
    steps = torch.randint(1, 9, (4, G), generator=torch.Generator().manual_seed(0))
    for max_energy_error in (1000.0, 0.5):
        d, (_, info) = counted(
            transition,
            f,
            state,
            torch.full((G,), 0.3),
            steps,
            Streams(0, range(G), "cpu", 4),
            inv_mass=inv_mass,
            max_energy_error=max_energy_error,
            max_steps=8,
        )
        assert d.syncs == 0, dict(d.sync_ops)
    assert (
        info.diverging.any()
    )  # the tight energy bound made some chains diverge, masked without a read


def test_a_nuts_transition_reads_at_most_once_per_tree_doubling():
    f, state = vae_posterior(8)
    for eps, depth in ((0.3, 6), (1e-3, 4), (0.05, 8)):
        d, (_, info) = counted(
            nuts_transition,
            f,
            state,
            torch.full((8,), eps),
            Streams(0, range(8), "cpu", 4),
            max_tree_depth=depth,
        )
        assert d.syncs <= int(info.tree_depth.max()), (eps, d.syncs, info.tree_depth.max())
        assert set(d.sync_ops) <= {"_local_scalar_dense"}


@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_operations_per_transition_do_not_grow_with_the_number_of_datapoints(kernel):
    ops = []
    for n in (8, 64):
        f, state = vae_posterior(n)
        noise = Streams(0, range(n), "cpu", 4)
        if kernel == "hmc":
            steps = torch.randint(1, 11, (4, n), generator=torch.Generator().manual_seed(1))
            d, _ = counted(transition, f, state, torch.full((n,), 0.1), steps, noise, max_steps=10)
        else:  # a tiny step never turns: every tree reaches the same depth whatever the data
            d, _ = counted(
                nuts_transition, f, state, torch.full((n,), 1e-4), noise, max_tree_depth=4
            )
        ops.append(d.ops)
    assert abs(ops[1] - ops[0]) <= 0.1 * ops[0], ops


@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_a_transition_is_a_pure_function_of_state_and_streams(kernel):
    f, state = vae_posterior(6)
    before = [t.clone() for t in state]
    steps = torch.randint(1, 7, (4, 6), generator=torch.Generator().manual_seed(2))

    def step(noise: Streams):
        if kernel == "hmc":
            return transition(f, state, torch.full((6,), 0.2), steps, noise, max_steps=6)
        return nuts_transition(f, state, torch.full((6,), 0.2), noise, max_tree_depth=5)

    (s1, i1), (s2, i2) = step(Streams(3, range(6), "cpu", 4)), step(Streams(3, range(6), "cpu", 4))
    replayed = Streams(3, range(6), "cpu", 4)
    with replayed.replaying():
        step(replayed)
    s3, i3 = step(replayed)
    for a, b, c in zip((*s1, *i1), (*s2, *i2), (*s3, *i3)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(
        torch.equal(a, b) for a, b in zip(state, before)
    )  # the input state is left as it was
    assert isinstance(i1, HMCInfo if kernel == "hmc" else NUTSInfo) and isinstance(s1, State)


def test_hmc_chains_do_not_depend_on_the_host_bound_of_leapfrog_steps():
    f, state = vae_posterior(5)
    steps = torch.randint(1, 7, (4, 5), generator=torch.Generator().manual_seed(3))
    runs = [
        transition(
            f, state, torch.full((5,), 0.2), steps, Streams(1, range(5), "cpu", 4), max_steps=m
        )
        for m in (6, 7, 30)
    ]
    a = runs[0]
    for b in runs[1:]:
        for x, y in zip((*a[0], *a[1]), (*b[0], *b[1])):
            assert torch.equal(x, y)
    _, info = transition(
        f, state, torch.full((5,), 0.2), steps, Streams(1, range(5), "cpu", 4), max_steps=3
    )
    assert (info.n_steps == steps.clamp(max=3)).all()


def test_the_masked_hmc_transition_leaves_an_anisotropic_gaussian_invariant():
    # three groups of four chains, each a 4-d Gaussian with its own scales, started at exact draws; every chain its own
    # number of leapfrog steps each transition (1 to 8, the masked lockstep), the mass the true variances
    torch.manual_seed(0)
    G, C, K, S = 3, 4, 4, 600
    scales = torch.stack(
        [torch.linspace(0.3, 1.0, K), torch.linspace(1.0, 3.0, K), torch.full((K,), 0.5)]
    ).double()
    f = gaussian(scales)
    noise = Streams(0, range(G), "cpu", 4)
    state = State.at(f, torch.randn(C, G, K, dtype=torch.float64) * scales)
    gen = torch.Generator().manual_seed(0)
    us = []
    for _ in range(S):
        steps = torch.randint(1, 9, (C, G), generator=gen)
        state, _ = transition(
            f,
            state,
            torch.full((G,), 0.4, dtype=torch.float64),
            steps,
            noise,
            inv_mass=scales**2,
            max_steps=8,
        )
        us.append(state.u)
    u = (torch.stack(us, 1) / scales).numpy()  # [C, S, G, K], whitened
    mean_z = u.mean((0, 1)) / azcompat.mcse(u, "mean")
    var_z = ((u**2).mean((0, 1)) - 1) / azcompat.mcse(u**2, "mean")
    for z in (mean_z, var_z):
        assert stats.chi2.sf((z**2).sum(), z.size) > P_MIN, z


def test_dual_averaging_and_welford_as_tensors_equal_pyros_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    eps = torch.rand(5, generator=g, dtype=torch.float64)
    da, pyro_da = da_init(eps, 0.8), DualAveraging(prox_center=torch.log(10 * eps))
    w, pyro_w = welford_init(eps.new_zeros(5, 3)), WelfordCovariance(diagonal=True)
    for _ in range(25):
        a = torch.rand(5, generator=g, dtype=torch.float64)
        da = da_update(da, a)
        pyro_da.step(0.8 - a)
        u = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
        w = welford_update(w, u)
        for c in range(2):
            pyro_w.update(u[c])
    x, x_avg = pyro_da.get_state()
    assert torch.equal(da.x, x) and torch.equal(da_final(da), torch.exp(x_avg))
    assert torch.equal(welford_final(w), pyro_w.get_covariance(regularize=True))


def test_the_window_schedule_is_plain_data_in_stans_windows():
    schedule = window_schedule(1000)
    assert len(schedule) == 1000 and all(
        type(w) is Window and type(w.slow) is bool for w in schedule
    )
    ends = [t for t, w in enumerate(schedule) if w.end]
    assert ends == [99, 149, 249, 449, 949]
    assert not any(w.slow for w in schedule[:75] + schedule[950:]) and all(
        w.slow for w in schedule[75:950]
    )
    assert window_schedule(10) == [Window(False, False)] * 10


def test_adaptation_reads_nothing_back_and_ends_on_the_averaged_step_size():
    G, K = 3, 2
    a = adapt_init(torch.full((G,), 0.5), torch.ones(G, K), 0.8)
    g = torch.Generator().manual_seed(0)
    with Dispatches() as d:
        for w in (
            Window(True, False),
            Window(True, False),
            Window(True, True),
            Window(False, False),
        ):
            a = adapt_update(a, w, torch.randn(4, G, K, generator=g), torch.rand(4, G, generator=g))
    assert d.syncs == 0
    eps, inv_mass = adapt_final(a)
    assert (
        torch.equal(eps, da_final(a.da)) and inv_mass.shape == (G, K) and a.welford.n == 0
    )  # the window's estimate, then a fresh one


@pytest.mark.parametrize("kernel", ["hmc", "nuts"])
def test_a_batched_run_reads_back_per_window_not_per_transition(kernel):
    torch.manual_seed(1)
    ppca = PPCA(6, 2, sigma=0.5)
    x = ppca.sample(4)
    syncs = []
    for samples in (10, 40):
        with Dispatches() as d:
            hmc_latent(
                ppca,
                x,
                num_samples=samples,
                warmup_steps=30,
                num_chains=2,
                seed=0,
                init_steps=0,
                kernel=kernel,
                max_tree_depth=3,
            )
        syncs.append(d.syncs)
    if kernel == "hmc":
        assert syncs[0] == syncs[1], syncs  # sampling reads once, whatever its length
    else:
        assert syncs[1] - syncs[0] <= 30 * 2, (
            syncs
        )  # at most a read per doubling (depth <= 3: 2 reads per transition)


def test_per_chain_steps_without_a_host_bound_are_refused_in_one_line():
    f, state = vae_posterior(2)
    with pytest.raises(ConfigError, match="max_steps"):
        transition(
            f,
            state,
            torch.full((2,), 0.1),
            torch.ones(4, 2, dtype=torch.long),
            Streams(0, range(2), "cpu", 4),
        )
    with pytest.raises(ConfigError, match="max_steps"):
        transition(
            f,
            state,
            torch.full((2,), 0.1),
            torch.ones(4, 2, dtype=torch.long),
            Streams(0, range(2), "cpu", 4),
            max_steps=2.5,
        )
