"""Batched NUTS (``kernel="nuts"``) and the dense mass matrix, against exact Gaussian posteriors.

Tolerances: z-scores of posterior means against the exact values use ArviZ's
MCSE; over many points and dimensions their squares are tested as a chi-square
sample (p > 1e-4, Bonferroni-free: one test per case), single values within
``Z`` = 4 MCSE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ppl_vae.errors import ConfigError
from ppl_vae.inference import azcompat
from ppl_vae.inference.kernel import State, nuts_transition
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.random import Streams
from ppl_vae.models.ppca import PPCA

pytestmark = pytest.mark.arviz

Z = 4.0
P_MIN = 1e-4  # a chi-square test of correct z-scores fails by chance this rarely


def chi_square_p(zs: np.ndarray) -> float:
    """p-value of sum(z^2) for z-scores that should be independent standard normals."""
    zs = np.asarray(zs).ravel()
    return float(stats.chi2.sf((zs**2).sum(), zs.size))


def gaussian_target(scales: torch.Tensor):
    """log N(u; 0, diag(scales^2)) per group: ``scales`` ``[G, K]``."""
    return lambda u: -0.5 * ((u / scales) ** 2).sum(-1)


def test_nuts_transition_leaves_an_anisotropic_gaussian_invariant_in_every_group():
    # three groups of four chains, each group a 6-d Gaussian with its own scales (0.3 to 3), started at exact draws;
    # the mass matrix is the true variances, the step size per group the same fraction of a whitened unit
    torch.manual_seed(0)
    G, C, K = 3, 4, 6
    scales = torch.stack(
        [torch.linspace(0.3, 1.0, K), torch.linspace(1.0, 3.0, K), torch.full((K,), 0.5)]
    ).double()
    f = gaussian_target(scales)
    noise = Streams(0, range(G), "cpu", 4)
    state = State.at(f, torch.randn(C, G, K, dtype=torch.float64) * scales)
    eps = torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64)
    us, depth, steps = [], [], []
    for _ in range(800):
        state, info = nuts_transition(f, state, eps, noise, inv_mass=scales**2, max_tree_depth=8)
        us.append(state.u)
        depth.append(info.tree_depth)
        steps.append(info.n_steps)
        assert not info.diverging.any()
    u = (torch.stack(us, 1) / scales).numpy()  # [C, S, G, K], whitened: every coordinate N(0, 1)
    mean_z = u.mean((0, 1)) / azcompat.mcse(u, "mean")
    second = u**2
    var_z = (second.mean((0, 1)) - 1) / azcompat.mcse(second, "mean")
    assert chi_square_p(mean_z) > P_MIN and chi_square_p(var_z) > P_MIN, (mean_z, var_z)
    d, n = torch.stack(depth), torch.stack(steps)
    assert (n <= 2**d - 1).all() and (n >= 2 ** (d - 1)).all() and (d >= 1).all()
    # the same whitened geometry in every group: the same distribution of tree depths (within sampling error)
    shares = [(d[..., g] == 2).double().mean().item() for g in range(G)]
    assert max(shares) - min(shares) < Z * np.sqrt(0.25 / (800 * C) * 2 * 10), (
        shares
    )  # 10: a generous effective-size discount


@pytest.mark.slow
def test_nuts_transition_keeps_the_variance_of_a_strongly_correlated_gaussian():
    # Every node of the tree must get the same U-turn checks whichever leaf the chain started from; Stan's
    # extra checks applied only on the starting point's path (an earlier version) broke that and widened the
    # posterior: +0.8 % on every whitened sd here (6 to 8 SE at this size). 200 groups of 4 chains, a 5-d
    # Gaussian with correlation 0.95 and the identity as mass matrix, started at exact draws; the pooled error
    # of the whitened sds, whose MCSEs add in quadrature over independent groups, must be within Z of 0.
    torch.manual_seed(0)
    G, C, K, rho = 200, 4, 5, 0.95
    cov = torch.full((K, K), rho, dtype=torch.float64) + (1 - rho) * torch.eye(
        K, dtype=torch.float64
    )
    prec, chol = torch.linalg.inv(cov), torch.linalg.cholesky(cov)
    f = lambda u: -0.5 * torch.einsum("...k,kl,...l->...", u, prec, u)  # noqa: E731
    state = State.at(f, torch.randn(C, G, K, dtype=torch.float64) @ chol.T)
    noise, eps = Streams(0, range(G), "cpu", 4), torch.full((G,), 0.3, dtype=torch.float64)
    us = []
    for _ in range(500):
        state, info = nuts_transition(f, state, eps, noise, max_tree_depth=8)
        us.append(state.u)
    w = torch.einsum(
        "kl,csgl->csgk", torch.linalg.inv(chol), torch.stack(us, 1)
    ).numpy()  # whitened: N(0, I)
    err = w.std((0, 1), ddof=1) - 1
    se = np.sqrt((azcompat.mcse(w, "sd") ** 2).sum()) / err.size
    assert abs(err.mean()) < Z * se, (err.mean(), se)
    mean_z = w.mean((0, 1)) / azcompat.mcse(w, "mean")
    assert chi_square_p(mean_z) > P_MIN


def test_nuts_trees_stop_at_the_maximum_depth():
    scales = torch.ones(1, 3, dtype=torch.float64)
    f = gaussian_target(scales)
    state = State.at(f, torch.zeros(2, 1, 3, dtype=torch.float64) + 0.5)
    _, info = nuts_transition(
        f,
        state,
        torch.tensor([1e-3], dtype=torch.float64),
        Streams(0, [0], "cpu", 4),
        max_tree_depth=4,
    )
    assert (info.tree_depth == 4).all() and (
        info.n_steps == 15
    ).all()  # a tiny step never turns: 2^4 - 1 leapfrog steps


def test_batched_nuts_gives_each_datapoint_the_same_chains_whatever_else_is_in_its_batch():
    torch.manual_seed(1)
    ppca = PPCA(8, 3, sigma=0.5).double()
    x = ppca.sample(6).double()
    kw = dict(num_samples=6, warmup_steps=6, num_chains=2, seed=3, init_steps=0, kernel="nuts")
    whole = hmc_latent(ppca, x, **kw)
    rows = torch.tensor([5, 2])
    part = hmc_latent(ppca, x[rows], index=rows, **kw)
    np.testing.assert_allclose(
        part.samples["z"], whole.samples["z"][:, :, rows.numpy()], rtol=1e-9, atol=1e-9
    )
    for k in ("step_size", "n_steps", "tree_depth"):
        np.testing.assert_allclose(
            part.sample_stats[k], whole.sample_stats[k][:, :, rows.numpy()], rtol=1e-9
        )
    assert whole.method == "batched-nuts"


@pytest.mark.slow
@pytest.mark.parametrize("mass", ["diag", "dense"])
def test_batched_nuts_matches_the_exact_ppca_posterior(mass):
    torch.manual_seed(1)
    ppca = PPCA(8, 3, sigma=0.5).double()
    x = ppca.sample(10)
    # 1000 draws per chain: R-hat's own sampling error must sit well below the 0.01 asked of it
    draws = hmc_latent(
        ppca, x, num_samples=1000, warmup_steps=400, num_chains=4, seed=0, kernel="nuts", mass=mass
    )
    z = draws.samples["z"]
    post = ppca.posterior(x)
    mean_z = (z.mean((0, 1)) - post.mean.detach().numpy()) / azcompat.mcse(z, "mean")
    sd_z = (z.std((0, 1), ddof=1) - post.stddev.detach().numpy()) / azcompat.mcse(z, "sd")
    assert chi_square_p(mean_z) > P_MIN and chi_square_p(sd_z) > P_MIN, (mean_z, sd_z)
    assert draws.num_divergences == 0 and float(azcompat.rhat(z).max()) < 1.01
    assert draws.sample_stats["tree_depth"].max() <= 10


def condition_700() -> PPCA:
    """A linear-Gaussian model whose posterior has condition number ~700: 3 latent dims, two nearly collinear loadings."""
    m = PPCA(5, 3, sigma=0.06).double()
    with torch.no_grad():
        m.W.copy_(
            torch.tensor(
                [
                    [1.0, 0.97, 0.0],
                    [0.5, 0.52, 0.3],
                    [0.2, 0.18, -0.4],
                    [0.0, 0.02, 0.5],
                    [0.3, 0.31, 0.1],
                ],
                dtype=torch.float64,
            )
        )
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.mark.slow
def test_dense_mass_gives_standard_normal_z_scores_on_a_posterior_with_condition_number_700():
    m = condition_700()
    cov = m.posterior(torch.zeros(1, 5, dtype=torch.float64)).covariance_matrix[0]
    eig = torch.linalg.eigvalsh(cov)
    assert 600 < eig.max() / eig.min() < 800
    torch.manual_seed(0)
    x = m.sample(20)
    post = m.posterior(x)
    # The Monte Carlo errors of one datapoint's coordinates are correlated as the posterior is (here -1.00
    # between the two collinear directions), so their z-scores are not independent and a chi-square over all
    # of them counts one error twice. In the exact posterior's whitened coordinates w = L^-1 (z - mean) they
    # are independent, and the chi-square test is valid.
    white = torch.linalg.inv(torch.linalg.cholesky(post.covariance_matrix)).numpy()  # [N, 3, 3]
    for kernel in ("nuts", "hmc"):
        draws = hmc_latent(
            m,
            x,
            num_samples=800,
            warmup_steps=600,
            num_chains=4,
            seed=0,
            kernel=kernel,
            mass="dense",
        )
        z = draws.samples["z"]
        w = np.einsum("nkl,csnl->csnk", white, z - post.mean.numpy())
        zs = w.mean((0, 1)) / azcompat.mcse(w, "mean")
        assert chi_square_p(zs) > P_MIN, (kernel, np.mean(zs**2))
        assert draws.num_divergences == 0 and float(azcompat.rhat(z).max()) < 1.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel": "slice"}, "unknown MCMC kernel 'slice'"),
        ({"kernel": "nuts", "max_tree_depth": 0}, "max tree depth"),
        ({"mass": "full"}, "unknown mass matrix"),
    ],
)
def test_bad_kernel_options_are_refused_by_name(kwargs, message):
    ppca = PPCA(4, 2).double()
    with pytest.raises(ConfigError, match=message):
        hmc_latent(ppca, torch.zeros(2, 4, dtype=torch.float64), **kwargs)
