r"""q*, log p(x) and the gaps on posteriors that are not Gaussian, against ground truth computed here.

Two models whose every Gaussian ELBO is a closed form (moments of a Gaussian up to the fourth), so the best
Gaussian is found here by an optimiser over its parameters and the ELBO of any q* the package returns is
exact, with no Monte Carlo error; log p(x) comes from quadrature on a grid.

* ``square``: z ~ N(0, 1), x ~ N(z², SD²): the posterior is skewed for x < 0, bimodal for x > 0 (two
  overlapping modes at x = 0.6, separated ones from x ≈ 2 on, where a start at 0 sits on a saddle).
* ``banana``: z ~ N(0, I₂), x ~ N(z₁ + z₀², SD²): a curved ridge, bimodal in z₀ for x ≳ 0.6.

Tolerances: a q* reported converged is within ``TOL_BEST`` = 0.05 nats of the best Gaussian (issue 28); an
estimate is within ``Z2`` = 2 of its reported standard errors of the truth, as issue 28 asks (each such check
fails by chance with probability 5 %).
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.optimize import minimize

from ppl_vae.guides.local import LocalMixture, LocalPosterior, Mixture
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.decompose import decompose, defensive_proposal
from ppl_vae.inference.gaps.local import judge_window, keep_best, optimize_local, window_change
from ppl_vae.inference.latent import latent_of

SD = 0.5
TOL_BEST = 0.05
Z2 = 2.0


def square(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z**2, SD).to_event(1), obs=x)


def banana(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z[..., 1:] + z[..., :1] ** 2, SD).to_event(1), obs=x)


def gaussian_elbo(x: float, mean: np.ndarray, cov: np.ndarray) -> float:
    """Exact ELBO of q = N(mean, cov) for ``square`` (1-d) or ``banana`` (2-d): u = z² or z₁ + z₀² has Gaussian moments."""
    if len(mean) == 1:
        m, v = float(mean[0]), float(cov[0, 0])
        eu, var_u, sq, tr, logdet = m * m + v, 2 * v * v + 4 * m * m * v, m * m, v, math.log(v)
    else:
        m0, m1, v0, v1, c01 = (
            float(mean[0]),
            float(mean[1]),
            float(cov[0, 0]),
            float(cov[1, 1]),
            float(cov[0, 1]),
        )
        eu = m1 + m0 * m0 + v0
        var_u = (
            v1 + 2 * v0 * v0 + 4 * m0 * m0 * v0 + 4 * m0 * c01
        )  # Var z1 + Var z0² + 2 Cov(z1, z0²), Cov(z1, z0²) = 2 m0 c01
        sq, tr, logdet = m0 * m0 + m1 * m1, v0 + v1, math.log(v0 * v1 - c01 * c01)
    d = len(mean)
    prior = -0.5 * d * math.log(2 * math.pi) - 0.5 * (sq + tr)
    lik = -0.5 * math.log(2 * math.pi * SD**2) - ((x - eu) ** 2 + var_u) / (2 * SD**2)
    return prior + lik + 0.5 * (d * math.log(2 * math.pi * math.e) + logdet)


@functools.cache
def best_gaussian(x: float, d: int, family: str) -> float:
    """The largest Gaussian ELBO of the family: Nelder-Mead over (mean, log sd[, atanh correlation]) from a grid of starts.

    Narrow starts matter: from a wide one a local optimiser can slide to the saddle between the modes.
    """

    def unpack(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, sd = p[:d], np.exp(p[d : 2 * d])
        rho = np.tanh(p[2 * d]) if family == "full" and d == 2 else 0.0
        cov = np.diag(sd**2)
        if d == 2:
            cov[0, 1] = cov[1, 0] = rho * sd[0] * sd[1]
        return mean, cov

    size = 2 * d + (1 if family == "full" and d == 2 else 0)
    best = -math.inf
    for m0 in (-1.5, 0.0, 1.5):
        for m1 in (-1.0, 1.0) if d == 2 else (0.0,):
            for log_sd in (0.0, -1.5):
                start = np.full(size, log_sd)
                start[0] = m0
                if d == 2:
                    start[1] = m1
                if size > 2 * d:
                    start[-1] = 0.0
                r = minimize(
                    lambda p: -gaussian_elbo(x, *unpack(p)),
                    start,
                    method="Nelder-Mead",
                    options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000},
                )
                best = max(best, -r.fun)
    return best


def log_px_grid(x: float, d: int) -> float:
    """log p(x) by the trapezoid rule on a fine grid (the integrand is smooth and negligible beyond |z| = 8)."""
    if d == 1:
        z = np.linspace(-8, 8, 40001)
        lj = (
            -0.5 * np.log(2 * np.pi)
            - z**2 / 2
            - 0.5 * np.log(2 * np.pi * SD**2)
            - (x - z**2) ** 2 / (2 * SD**2)
        )
        step = z[1] - z[0]
    else:
        g = np.linspace(-8, 8, 1601)
        z0, z1 = np.meshgrid(g, g, indexing="ij")
        lj = (
            -np.log(2 * np.pi)
            - (z0**2 + z1**2) / 2
            - 0.5 * np.log(2 * np.pi * SD**2)
            - (x - z1 - z0**2) ** 2 / (2 * SD**2)
        )
        step = (g[1] - g[0]) ** 2
    top = lj.max()
    return float(top + np.log(np.exp(lj - top).sum() * step))


def exact_elbos(fit_posterior: LocalPosterior, xs: list[float]) -> np.ndarray:
    q = fit_posterior.distribution()
    mean = q.mean.detach().double().numpy()
    cov = (
        (q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance))
        .detach()
        .double()
        .numpy()
    )
    return np.array([gaussian_elbo(x, mean[i], cov[i]) for i, x in enumerate(xs)])


# ---------------------------------------------------------------- the pieces of the convergence test


def test_paired_change_has_the_paired_standard_error_and_only_evidence_of_no_gain_converges():
    g = torch.Generator().manual_seed(11)
    before = torch.randn(64, 3, generator=g, dtype=torch.float64) * 3.0
    now = (
        before + 0.02 + 0.01 * torch.randn(64, 3, generator=g, dtype=torch.float64)
    )  # common noise: only the small part differs
    change, se = window_change(now, before)
    assert torch.allclose(change, (now - before).mean(0)) and torch.allclose(
        se, (now - before).std(0) / 8
    )
    assert (se < before.std(0) / 8 / 10).all()  # far below the SE of two independent means
    tol = 0.01
    zero = torch.zeros(4, dtype=torch.float64)
    decays = torch.tensor([1, 1, 1, 0])
    # no progress in the window; gain since the last halving: clearly below tol, noisy, clearly above tol, and a row never halved
    gain = torch.tensor([0.001, 0.001, 0.05, 0.001], dtype=torch.float64)
    gain_se = torch.tensor([0.001, 0.02, 0.001, 0.001], dtype=torch.float64)
    slower, done = judge_window(zero, zero + 0.003, gain, gain_se, decays, 8, tol)
    assert done.tolist() == [
        True,
        False,
        False,
        False,
    ]  # noise larger than tol never converges; nor a row never halved
    assert slower.tolist() == [False, True, True, True]
    # a window with progress changes nothing; at the last halving a noisy row goes on, unconverged
    slower, done = judge_window(zero + 0.05, zero + 0.003, gain, gain_se, decays, 8, tol)
    assert not slower.any() and not done.any()
    slower, done = judge_window(zero, zero + 0.003, gain, gain_se, torch.full((4,), 8), 8, tol)
    assert done.tolist() == [True, False, False, True] and not slower.any()


def test_of_starts_tied_in_elbo_the_one_with_steady_log_weights_is_kept():
    # start 0 is exact (constant log-weights), start 1 scatters around the same mean and by chance is a little higher,
    # start 2 is clearly lower: the largest mean would pick start 1
    g = torch.Generator().manual_seed(12)
    lw = torch.full((200, 3, 2), -5.0, dtype=torch.float64)
    noise = torch.randn(200, 2, generator=g, dtype=torch.float64)
    lw[:, 1] = -5.0 + 0.3 * (noise - noise.mean(0)) + 0.01
    lw[:, 2] = -6.0 + 0.1 * noise
    assert (lw.mean(0).argmax(0) == 1).all()
    assert keep_best(lw).tolist() == [0, 0]


# ---------------------------------------------------------------- the bimodal and skewed 1-d posterior

XS = [-0.8, 0.6, 2.5, 3.6]


@pytest.mark.parametrize("start", ["wide", "narrow", "off-centre"])
def test_qstar_reported_converged_is_within_005_nats_of_the_best_gaussian(start):
    loc, scale = {"wide": (0.0, 2.5), "narrow": (0.0, 0.15), "off-centre": (0.4, 0.3)}[start]
    x = torch.tensor(XS, dtype=torch.float64).unsqueeze(-1)
    init = dist.Normal(x.new_full((len(XS), 1), loc), scale).to_event(1)
    fit = optimize_local(square, x, family="diagonal", init=init, seed=4)
    short = np.array([best_gaussian(v, 1, "diagonal") for v in XS]) - exact_elbos(fit.posterior, XS)
    # what the report promises: a point reported converged is there (an unconverged one is flagged; measured over
    # seeds 0-4, 1 of the 60 points stopped unconverged at max_steps, and the largest shortfall of a converged one was 0.032)
    converged = fit.converged.numpy()
    assert converged.sum() >= 3, (fit.converged, fit.final_change, fit.final_change_se)
    assert (short[converged] < TOL_BEST).all() and (short > -1e-6).all(), short
    # a symmetric start sits on the saddle between the modes at x = 2.5 and 3.6 (its expected gradient is zero, so no test
    # on its progress can tell it from an optimum); the other start, centred at a draw resampled by importance weight, climbs
    # a mode, and the best start is kept
    assert (fit.posterior.loc[2:].abs() > 1.0).all(), fit.posterior.loc


def wide(x: torch.Tensor) -> None:
    """A symmetric, wide amortised q: N(0, 2.5) for every x."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 2.5).to_event(1))


def test_default_log_px_is_not_confidently_low_by_a_missed_mode():
    x = torch.tensor([[XS[3]]], dtype=torch.float64)
    r = decompose(
        square,
        wide,
        x,
        index=torch.tensor([3]),
        num_samples=2000,
        elbo_samples=1000,
        seed=13,
        warn=False,
    )
    truth = log_px_grid(XS[3], 1)
    err = float(r.log_px[0]) - truth
    assert abs(err) < Z2 * float(r.log_px_se[0]), (err, r.log_px_se)
    assert not (err < -0.5 and float(r.log_px_se[0]) < 0.1 and not bool(r.log_px_unreliable[0]))


@pytest.mark.slow
def test_default_decompose_on_the_bimodal_posterior_matches_quadrature_or_says_it_cannot():
    x = torch.tensor(XS, dtype=torch.float64).unsqueeze(-1)
    r = decompose(square, wide, x, num_samples=5000, elbo_samples=2000, seed=5, warn=False)
    truth = np.array([log_px_grid(v, 1) for v in XS])
    gap = truth - np.array([best_gaussian(v, 1, "diagonal") for v in XS])
    assert gap[2] > 0.6 and gap[0] < 0.05  # separated modes: about log 2; skewed: small
    err = r.log_px.numpy() - truth
    # all of the datapoints at once within 95 % (Sidak: each at 1 - 0.95 ** (1 / 4), 2.49 standard errors)
    joint = NormalDist().inv_cdf(1 - (1 - 0.95 ** (1 / len(XS))) / 2)
    assert (np.abs(err) < joint * r.log_px_se.numpy()).all(), (err, r.log_px_se)
    assert (
        np.abs(r.approximation_gap.numpy() - gap) < joint * r.approximation_gap_se.numpy()
    ).all(), (r.approximation_gap, gap)
    # never low by the mass of a mode (log 2 here) with a confident SE reported reliable
    assert not ((err < -0.5) & (r.log_px_se.numpy() < 0.1) & ~r.log_px_unreliable.numpy()).any()
    # without the defensive components and with one start, q* sits on one mode and its weights never see the other:
    # log p̂ comes out about log 2 low with a tiny SE, and Pareto k-hat cannot tell (what the default prevents)
    one = decompose(
        square,
        wide,
        x[2:],
        index=torch.tensor([2, 3]),
        num_samples=5000,
        elbo_samples=2000,
        seed=5,
        defensive=(0, 0),
        local_options={"starts": 1},
        warn=False,
    )
    low = truth[2:] - one.log_px.numpy()
    on_a_mode = (
        np.abs(
            np.array([float(v) for v in one.elbo_local["diagonal"]])
            - np.array([best_gaussian(v, 1, "diagonal") for v in XS[2:]])
        )
        < 0.1
    )
    assert (np.abs(low[on_a_mode] - math.log(2)) < 0.15).all() and (
        one.log_px_se.numpy()[on_a_mode] < 0.05
    ).all()


# ---------------------------------------------------------------- a two-dimensional banana

XB = [-1.1, 0.9, 2.3]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["diagonal", "full"])
def test_banana_qstar_and_gaps_match_the_grid(family):
    x = torch.tensor(XB, dtype=torch.float64).unsqueeze(-1)
    init = dist.Normal(x.new_zeros(len(XB), 2), 1.7).to_event(
        1
    )  # symmetric in z0: a saddle where the banana is bimodal
    fit = optimize_local(banana, x, family=family, init=init, seed=6)
    best = np.array([best_gaussian(v, 2, family) for v in XB])
    short = best - exact_elbos(fit.posterior, XB)
    converged = fit.converged.numpy()
    assert converged.sum() >= 2 and (short[converged] < TOL_BEST).all() and (short > -1e-6).all(), (
        fit.converged,
        short,
    )

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.7).to_event(1))

    r = decompose(
        banana,
        guide,
        x,
        families=(family,),
        num_samples=5000,
        elbo_samples=2000,
        seed=7,
        warn=False,
    )
    truth = np.array([log_px_grid(v, 2) for v in XB])
    assert (np.abs(r.log_px.numpy() - truth) < Z2 * r.log_px_se.numpy()).all(), (
        r.log_px,
        truth,
        r.log_px_se,
    )
    gap_se = np.hypot(r.log_px_se.numpy(), r.elbo_local_se[family].numpy())
    gap = r.log_px.numpy() - r.elbo_local[family].numpy()
    assert (np.abs(gap - (truth - best)) < Z2 * gap_se + TOL_BEST).all(), (gap, truth - best)


# ---------------------------------------------------------------- the defensive proposal


def test_defensive_mixture_density_and_per_datapoint_draws():
    x = torch.tensor([[0.2], [1.4], [3.1]], dtype=torch.float64)
    latent = latent_of(square, x)
    a = LocalPosterior(
        "diagonal",
        latent,
        torch.tensor([[-1.0], [0.5], [1.7]], dtype=torch.float64),
        torch.full((3, 1), 0.4, dtype=torch.float64),
    )
    b = a.widened(3.0)
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    mix = LocalMixture(latent, [a, b], logits)
    u = torch.linspace(-3, 3, 7, dtype=torch.float64).view(7, 1, 1).expand(7, 3, 1)
    by_hand = torch.logsumexp(
        torch.stack([a.distribution().log_prob(u), b.distribution().log_prob(u)], -1) + logits, -1
    )
    assert torch.allclose(mix.distribution().log_prob(u), by_hand)
    assert torch.allclose(b.distribution().stddev, 3 * a.distribution().stddev)
    assert isinstance(mix.distribution(), Mixture)
    # each datapoint's draws come from its own stream: its bounds do not depend on the rows beside it
    whole = importance_bounds(square, mix, x, num_samples=300, seed=8)
    alone = importance_bounds(
        square,
        mix.select(torch.tensor([1])),
        x[1:2],
        num_samples=300,
        seed=8,
        index=torch.tensor([1]),
    )
    assert torch.allclose(whole.iwae[1:2], alone.iwae, rtol=1e-12, atol=1e-12)
    # the defensive proposal of a fit: q*'s optima share 1 - 0.1 - 0.1, the widened q* and the prior 0.1 each
    fit = optimize_local(square, x, family="diagonal", init="prior", seed=9, max_steps=300)
    prior = LocalPosterior(
        "diagonal",
        fit.posterior.latent,
        torch.zeros(3, 1, dtype=torch.float64),
        torch.ones(3, 1, dtype=torch.float64),
    )
    proposal = defensive_proposal(fit, prior, (0.1, 0.1))
    weights = torch.softmax(proposal.logits, -1)
    assert torch.allclose(weights[:, -2:], torch.full((3, 2), 0.1, dtype=torch.float64))
    assert torch.allclose(weights[:, :-2].sum(-1), torch.full((3,), 0.8, dtype=torch.float64))
    assert isinstance(
        defensive_proposal(fit, prior, (0.0, 0.0)), LocalMixture
    )  # two starts: a mixture of both, whatever the rows beside
