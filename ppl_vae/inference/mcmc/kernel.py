r"""One HMC transition and one step-size rule, shared by annealed importance sampling and batched MCMC.

Every chain of every group (a datapoint, in the latent-posterior samplers) is one
row of a ``[C, G, K]`` tensor; a log density ``f`` maps it to ``[C, G]``.

:func:`transition` is one Metropolis-adjusted leapfrog trajectory per chain, with
its own number of steps per chain (chains whose trajectory is shorter stop,
masked, while the others go on), a step size per group or per chain, and an
inverse mass matrix per group, diagonal ``[G, K]`` or dense ``[G, K, K]``. A trajectory whose energy error exceeds
``max_energy_error`` or is not finite is *divergent*: it stops, and the chain
stays where it was. Its randomness (momenta, acceptance) comes from an explicit
``torch.Generator`` on the data's device.

:class:`StepSize` is the step-size rule: dual averaging of the log step size
toward a target acceptance probability, one scheme per group (Hoffman & Gelman
2014, section 3.2, through Pyro's :class:`~pyro.ops.dual_averaging.DualAveraging`).
MCMC warmup ends on the averaged iterate; AIS records the iterate of each
annealing step in a pilot run and then runs its chains on that fixed schedule.

References
----------
Neal (2011), MCMC using Hamiltonian dynamics. Hoffman & Gelman (2014), The
No-U-Turn Sampler, JMLR 15.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.ops.dual_averaging import DualAveraging

from ..random import Streams

__all__ = ["NUTSInfo", "State", "StepSize", "momentum", "nuts_transition", "transition", "value_and_grad", "velocity"]

LogDensity = Callable[[torch.Tensor], torch.Tensor]


def velocity(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``M^-1 r`` for momenta ``r`` ``[C, G, K]``: ``m`` is the inverse mass, a scalar, diagonal ``[G, K]`` or dense ``[G, K, K]``."""
    return torch.einsum("gkl,cgl->cgk", m, r) if m.dim() == 3 else m * r


def momentum(m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Momenta ``r ~ N(0, M)`` from standard-normal ``eps`` ``[C, G, K]`` (``M = m^-1``; dense: ``L^-T eps`` with ``m = L L^T``)."""
    if m.dim() == 3:
        tril = torch.linalg.cholesky(m)
        return torch.linalg.solve_triangular(tril.mT, eps.permute(1, 2, 0), upper=True).permute(2, 0, 1)
    return eps / m.sqrt()


def value_and_grad(f: LogDensity, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(u)`` and its gradient in ``u``, both detached."""
    with torch.enable_grad():
        x = u.detach().requires_grad_(True)
        lp = f(x)
        (g,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), g


@dataclass(frozen=True)
class State:
    """Where the chains are: ``u`` ``[C, G, K]``, the log density there ``[C, G]`` and its gradient."""

    u: torch.Tensor
    lp: torch.Tensor
    grad: torch.Tensor

    @classmethod
    def at(cls, f: LogDensity, u: torch.Tensor) -> State:
        return cls(u.detach(), *value_and_grad(f, u))


def transition(
    f: LogDensity,
    state: State,
    eps: torch.Tensor,
    steps: int | torch.Tensor,
    noise: Streams,
    *,
    inv_mass: torch.Tensor | None = None,
    max_energy_error: float = math.inf,
) -> tuple[State, torch.Tensor, torch.Tensor]:
    """One HMC transition of every chain: ``(new state, acceptance probability [C, G], diverging [C, G])``.

    ``eps`` is ``[G]`` (per group) or ``[C, G]`` (per chain); ``steps`` an int or a ``[C, G]``
    tensor of leapfrog steps; ``inv_mass`` ``[G, K]`` (identity when None). The momenta and the
    accept draws come from ``noise``, one stream per group (datapoint).
    """
    u0, lp0, g0 = state.u, state.lp, state.grad
    C, G = lp0.shape
    e = (eps if eps.dim() == 2 else eps.expand(C, G))[..., None]
    m = inv_mass if inv_mass is not None else u0.new_ones(())
    steps_t = steps if isinstance(steps, torch.Tensor) else torch.full((C, G), steps, dtype=torch.long, device=u0.device)
    r = momentum(m, noise.normal(u0.shape, dim=1, dtype=u0.dtype))

    def energy(lp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return -lp + 0.5 * (r * velocity(m, r)).sum(-1)

    h0 = energy(lp0, r)
    z, lp, g = u0, lp0, g0
    r = r + 0.5 * e * g
    diverging = torch.zeros(C, G, dtype=torch.bool, device=u0.device)
    for step in range(int(steps_t.max())):
        act = (step < steps_t) & ~diverging
        if not act.any():
            break
        a = act[..., None]
        z = torch.where(a, z + e * velocity(m, r), z)
        lp_new, g_new = value_and_grad(f, z)
        lp = torch.where(act, lp_new, lp)
        g = torch.where(a, g_new, g)
        r = torch.where(a, r + torch.where((step == steps_t - 1)[..., None], 0.5 * e, e) * g, r)
        h = energy(lp, r)
        bad = act & (~torch.isfinite(h) | (h - h0 > max_energy_error))
        if bad.any():  # stop the divergent chains where they started
            diverging |= bad
            z = torch.where(bad[..., None], u0, z)
            lp = torch.where(bad, lp0, lp)
            g = torch.where(bad[..., None], g0, g)
    delta = energy(lp, r) - h0
    delta = torch.where(torch.isfinite(delta) & ~diverging, delta, torch.full_like(delta, math.inf))
    accept_prob = torch.exp(-delta.clamp(min=0))
    accept = noise.uniform(accept_prob.shape, dim=1, dtype=accept_prob.dtype) < accept_prob
    new = State(torch.where(accept[..., None], z, u0), torch.where(accept, lp, lp0), torch.where(accept[..., None], g, g0))
    return new, accept_prob, diverging


class StepSize:
    """Dual averaging of ``log eps`` toward ``target_accept``, one scheme per group (``eps`` is ``[G]``).

    :meth:`update` takes the mean acceptance probability of each group's chains and returns the
    next step size (the current iterate); :attr:`final` is the averaged iterate, the step size to
    sample with once adaptation ends. Each scheme is centred on ``10 * eps`` (as Stan and Pyro).
    """

    def __init__(self, eps: torch.Tensor, target_accept: float) -> None:
        self.target_accept = target_accept
        self.eps = eps
        self._da = DualAveraging(prox_center=torch.log(10 * eps))

    def update(self, accept_prob: torch.Tensor) -> torch.Tensor:
        self._da.step(self.target_accept - accept_prob)
        x_t, _ = self._da.get_state()
        self.eps = torch.exp(x_t)
        return self.eps

    @property
    def final(self) -> torch.Tensor:
        return torch.exp(self._da.get_state()[1])


# --------------------------------------------------------------------------- the No-U-Turn sampler, batched


@dataclass(frozen=True)
class NUTSInfo:
    """Per-chain statistics of one NUTS transition (each ``[C, G]``)."""

    accept_prob: torch.Tensor  # mean over the new points of min(1, exp(H0 - H)): what the step size adapts on
    diverging: torch.Tensor  # the trajectory hit an energy error above max_energy_error (or a non-finite one)
    n_steps: torch.Tensor  # leapfrog steps (gradient evaluations) this chain used
    tree_depth: torch.Tensor  # doublings of the trajectory


def _dot(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . (M^-1 b)`` over the last dim (``m`` as in :func:`velocity`)."""
    return (a * velocity(m, b)).sum(-1)


def _turning(m: torch.Tensor, r_left: torch.Tensor, r_right: torch.Tensor, r_sum: torch.Tensor) -> torch.Tensor:
    """The generalised U-turn criterion (Betancourt 2017, A.4.2) of a trajectory with end momenta ``r_left``, ``r_right`` and momentum sum ``r_sum``."""
    rho = r_sum - 0.5 * (r_left + r_right)
    return (_dot(m, r_left, rho) <= 0) | (_dot(m, r_right, rho) <= 0)


def _checkpoints(n: int) -> tuple[int, int]:
    """Which stored checkpoints leaf ``n`` of a subtree closes (inclusive range; NumPyro's ``_leaf_idx_to_ckpt_idxs``)."""
    idx_max = bin(n >> 1).count("1")
    trailing_ones = ((n ^ (n + 1)).bit_length()) - 1
    return idx_max - trailing_ones + 1, idx_max


def nuts_transition(
    f: LogDensity,
    state: State,
    eps: torch.Tensor,
    noise: Streams,
    *,
    inv_mass: torch.Tensor | None = None,
    max_tree_depth: int = 10,
    max_energy_error: float = 1000.0,
) -> tuple[State, NUTSInfo]:
    """One No-U-Turn transition of every chain of every group, all advancing together.

    The iterative NUTS of Hoffman & Gelman (2014) as Stan and NumPyro run it: the trajectory doubles
    (in a random direction) until the generalised U-turn criterion holds between its ends, or
    between the ends of any of the binary subtrees it is built from (checked leaf by leaf from
    stored checkpoints, NumPyro's iterative scheme); a subtree that turns or diverges is discarded.
    Every node of the binary tree gets the same check, whichever leaf the trajectory started from:
    that symmetry is what keeps the transition reversible. (Stan adds two checks across every merge;
    applied only at the merges on the starting point's path to the root, as an earlier version of
    this function did, they broke the symmetry and widened the posterior sds of a correlated
    regression by about 1.3 MCSE on every coordinate, docs/compare.md.) The draw is multinomial over the
    trajectory: uniform progressive sampling inside a subtree, biased progressive sampling
    toward the new subtree at each doubling (Betancourt 2017, A.3.2). Every chain does its
    leapfrog steps in lockstep with the others; a chain whose tree has stopped is masked.

    ``eps`` is ``[G]`` (per group) or ``[C, G]``; ``inv_mass`` ``[G, K]`` or ``[G, K, K]`` (identity when None).
    All the transition's randomness is drawn up front from ``noise`` (one stream per group):
    momenta, directions and a uniform per possible leaf, so a group's draws never depend on how
    long the other groups' trees grow.
    """
    u0, lp0, g0 = state.u, state.lp, state.grad
    C, G, K = u0.shape
    dev, dt = u0.device, u0.dtype
    e = (eps if eps.dim() == 2 else eps.expand(C, G))[..., None].to(dt)
    m = inv_mass if inv_mass is not None else u0.new_ones(())
    r0 = momentum(m, noise.normal(u0.shape, dim=1, dtype=dt))
    leaves = 2**max_tree_depth
    uniforms = noise.uniform((C, G, leaves + 2 * max_tree_depth), dim=1, dtype=dt)  # leaf draws, then directions, then merges
    h0 = -lp0 + 0.5 * _dot(m, r0, r0)

    def where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None] if a.dim() == 3 else mask, a, b)

    left = [u0, r0, lp0, g0]  # the trajectory's ends: position, momentum, log density, gradient
    right = [u0, r0, lp0, g0]
    prop = [u0, lp0, g0]
    log_w = torch.zeros(C, G, dtype=dt, device=dev)  # log of the trajectory's summed weights exp(H0 - H)
    r_sum = r0.clone()
    active = torch.ones(C, G, dtype=torch.bool, device=dev)
    diverging = torch.zeros(C, G, dtype=torch.bool, device=dev)
    n_steps = torch.zeros(C, G, dtype=torch.long, device=dev)
    depth = torch.zeros(C, G, dtype=torch.long, device=dev)
    accept_sum = torch.zeros(C, G, dtype=dt, device=dev)
    for j in range(max_tree_depth):
        if not active.any():
            break
        forward = uniforms[..., leaves + j] < 0.5  # [C, G]: extend to the right
        v = torch.where(forward, 1.0, -1.0).to(dt)[..., None]
        z, r, lp, g = (where(forward, a, b) for a, b in zip(right, left))
        sub_w = torch.full((C, G), -math.inf, dtype=dt, device=dev)
        sub_prop = [z, lp, g]
        sub_sum = torch.zeros_like(r0)
        ckpt_r = r0.new_zeros((max(j, 1), C, G, K))
        ckpt_sum = r0.new_zeros((max(j, 1), C, G, K))
        ok = active.clone()
        for i in range(2**j):
            if not ok.any():
                break
            r_half = r + 0.5 * v * e * g
            z_new = z + v * e * velocity(m, r_half)
            lp_new, g_new = value_and_grad(f, z_new)
            r_new = r_half + 0.5 * v * e * g_new
            n_steps += ok.long()
            h = -lp_new + 0.5 * _dot(m, r_new, r_new)
            delta = h - h0
            finite = torch.isfinite(delta)
            bad = ok & (~finite | (delta > max_energy_error))
            accept_sum += torch.where(ok & finite, torch.exp(-delta.clamp(min=0)), torch.zeros_like(delta))
            diverging |= bad
            ok = ok & ~bad
            z, r, lp, g = where(ok, z_new, z), where(ok, r_new, r), torch.where(ok, lp_new, lp), where(ok, g_new, g)
            w = torch.where(ok, -delta, torch.full_like(delta, -math.inf))
            new_w = torch.logaddexp(sub_w, w)
            take = ok & (uniforms[..., 2**j - 1 + i] < torch.exp(w - new_w))
            sub_prop = [where(take, a, b) for a, b in zip((z, lp, g), sub_prop)]
            sub_w = torch.where(ok, new_w, sub_w)
            sub_sum = where(ok, sub_sum + r, sub_sum)
            if j == 0:
                continue
            lo, hi = _checkpoints(i)
            if i % 2 == 0:
                ckpt_r[hi], ckpt_sum[hi] = r, sub_sum
            else:
                turn = torch.zeros_like(ok)
                for k in range(lo, hi + 1):
                    turn |= _turning(m, ckpt_r[k], r, sub_sum - ckpt_sum[k] + ckpt_r[k])
                ok = ok & ~turn
        valid = active & ok  # the subtree was built to the end without a U-turn or a divergence inside it
        take = valid & (uniforms[..., leaves + max_tree_depth + j] < torch.exp(sub_w - log_w))
        prop = [where(take, a, b) for a, b in zip(sub_prop, prop)]
        new_end = [z, r, lp, g]
        right = [where(valid & forward, a, b) for a, b in zip(new_end, right)]
        left = [where(valid & ~forward, a, b) for a, b in zip(new_end, left)]
        r_sum = where(valid, r_sum + sub_sum, r_sum)
        log_w = torch.where(valid, torch.logaddexp(log_w, sub_w), log_w)
        depth = torch.where(active, torch.full_like(depth, j + 1), depth)
        # the whole trajectory: the root of the tree, checked as every other node is (once, plainly)
        active = valid & ~_turning(m, left[1], right[1], r_sum)
    u, lp, g = prop
    info = NUTSInfo(accept_sum / n_steps.clamp(min=1).to(dt), diverging, n_steps, depth)
    return State(u, lp, g), info
