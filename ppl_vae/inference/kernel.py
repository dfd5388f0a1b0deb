r"""HMC and NUTS transitions and the warmup adaptation, as pure steps over small named tuples.

Shared by annealed importance sampling and batched MCMC. Every chain of every
group (a datapoint, in the latent-posterior samplers) is one row of a
``[C, G, K]`` tensor; a log density ``f`` maps it to ``[C, G]``.

The kernels are functions ``state -> (state, info)``:

* :func:`transition` is one Metropolis-adjusted leapfrog trajectory per chain,
  with its own number of steps per chain, a step size per group or per chain,
  and an inverse mass matrix per group, diagonal ``[G, K]`` or dense ``[G, K, K]``.
  It runs a number of leapfrog steps fixed on the host (``max_steps``); a chain
  whose trajectory is shorter is masked, not dropped. A trajectory whose energy
  error exceeds ``max_energy_error`` or is not finite is *divergent*: it stops,
  and the chain stays where it was. It reads nothing back from the device.
* :func:`nuts_transition` is one No-U-Turn transition; it reads one boolean
  per tree doubling (whether any chain still grows).

Their randomness (momenta, acceptance, directions) comes from
:class:`~ppl_vae.inference.random.Streams`, one stream per group: the same state
and streams at the same positions give the same result, bit for bit.

The warmup adaptation is three functions over :class:`Adaptation` (as
BlackJAX's ``window_adaptation``): :func:`adapt_init`, :func:`adapt_update`
(one call per warmup transition, driven by one entry of
:func:`window_schedule`, a list of plain :class:`Window` tuples) and
:func:`adapt_final`. The step size is dual averaging of ``log eps`` toward a target
acceptance probability, one scheme per group (Hoffman & Gelman 2014, section
3.2: :func:`da_init`, :func:`da_update`, :func:`da_final`, the arithmetic of
Pyro's :class:`~pyro.ops.dual_averaging.DualAveraging` on tensors); the mass
matrix is the Welford estimate of each group's draws in Stan's slow windows
(:func:`welford_init`, :func:`welford_update`, :func:`welford_final`). None of
them reads a value back; the loop that drives them (:mod:`.mcmc.hmc`) reads once
per window.

References
----------
Neal (2011), MCMC using Hamiltonian dynamics. Hoffman & Gelman (2014), The
No-U-Turn Sampler, JMLR 15. Stan Reference Manual, "HMC algorithm parameters".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..errors import ConfigError
from .random import Streams

__all__ = [
    "Adaptation",
    "DualAverage",
    "HMCInfo",
    "NUTSInfo",
    "State",
    "Welford",
    "Window",
    "adapt_final",
    "adapt_init",
    "adapt_restart",
    "adapt_update",
    "da_final",
    "da_init",
    "da_update",
    "momentum",
    "nuts_transition",
    "transition",
    "value_and_grad",
    "velocity",
    "welford_final",
    "welford_init",
    "welford_update",
    "window_schedule",
]

LogDensity = Callable[[torch.Tensor], torch.Tensor]


def velocity(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``M^-1 r`` for momenta ``r`` ``[C, G, K]``: ``m`` is the inverse mass, a scalar, diagonal ``[G, K]`` or dense ``[G, K, K]``."""
    return torch.einsum("gkl,cgl->cgk", m, r) if m.dim() == 3 else m * r


def momentum(m: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Momenta ``r ~ N(0, M)`` from standard-normal ``eps`` ``[C, G, K]`` (``M = m^-1``; dense: ``L^-T eps`` with ``m = L L^T``)."""
    if m.dim() == 3:
        tril = torch.linalg.cholesky(m)
        return torch.linalg.solve_triangular(tril.mT, eps.permute(1, 2, 0), upper=True).permute(
            2, 0, 1
        )
    return eps / m.sqrt()


def value_and_grad(f: LogDensity, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(u)`` and its gradient in ``u``, both detached."""
    with torch.enable_grad():
        x = u.detach().requires_grad_(True)
        lp = f(x)
        (g,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), g


class State(NamedTuple):
    """Where the chains are: position ``u`` ``[C, G, K]``, the log density there ``lp`` ``[C, G]`` and its gradient ``grad`` ``[C, G, K]``."""

    u: torch.Tensor
    lp: torch.Tensor
    grad: torch.Tensor

    @classmethod
    def at(cls, f: LogDensity, u: torch.Tensor) -> State:
        """The state at ``u``: one evaluation of ``f`` and its gradient."""
        return cls(u.detach(), *value_and_grad(f, u))


class HMCInfo(NamedTuple):
    """Per-chain statistics of one HMC transition (each ``[C, G]``)."""

    accept_prob: torch.Tensor  #: min(1, exp(H0 - H)) of the proposal (0 for a divergent one)
    diverging: (
        torch.Tensor
    )  #: the trajectory hit an energy error above max_energy_error (or a non-finite one)
    n_steps: torch.Tensor  #: leapfrog steps (gradient evaluations) this chain used


def transition(
    f: LogDensity,
    state: State,
    eps: torch.Tensor,
    steps: int | torch.Tensor,
    noise: Streams,
    *,
    inv_mass: torch.Tensor | None = None,
    max_energy_error: float = math.inf,
    max_steps: int | None = None,
) -> tuple[State, HMCInfo]:
    """One HMC transition of every chain: ``(new state, info)``, with no value read back from the device.

    ``eps`` is ``[G]`` (per group) or ``[C, G]`` (per chain); ``steps`` an int or a ``[C, G]``
    tensor of leapfrog steps; ``inv_mass`` ``[G, K]`` or ``[G, K, K]`` (identity when None). The
    transition runs ``max_steps`` leapfrog steps (a Python int; ``steps`` when that is an int, and
    required when it is a tensor), every chain masked once its own ``steps`` are done or it
    diverged; a chain with more steps than ``max_steps`` stops at ``max_steps``. The momenta and the
    accept draws come from ``noise``, one stream per group (datapoint).
    """
    u0, lp0, g0 = state
    C, G = lp0.shape
    if isinstance(steps, torch.Tensor):
        if max_steps is None:
            raise ConfigError(
                "transition: steps given per chain need max_steps, the most leapfrog steps any chain takes (a Python int)"
            )
        steps_t = steps
    else:
        max_steps = steps if max_steps is None else max_steps
        steps_t = torch.full((C, G), steps, dtype=torch.long, device=u0.device)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ConfigError(
            f"transition: max_steps must be a whole number of leapfrog steps, got {max_steps!r}"
        )
    e = (eps if eps.dim() == 2 else eps.expand(C, G))[..., None]
    m = inv_mass if inv_mass is not None else u0.new_ones(())
    r = momentum(m, noise.normal(u0.shape, dim=1, dtype=u0.dtype))

    def energy(lp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return -lp + 0.5 * (r * velocity(m, r)).sum(-1)

    h0 = energy(lp0, r)
    z, lp, g = u0, lp0, g0
    r = r + 0.5 * e * g
    diverging = torch.zeros(C, G, dtype=torch.bool, device=u0.device)
    for step in range(max_steps):
        act = (step < steps_t) & ~diverging
        a = act[..., None]
        z = torch.where(a, z + e * velocity(m, r), z)
        lp_new, g_new = value_and_grad(f, z)
        lp = torch.where(act, lp_new, lp)
        g = torch.where(a, g_new, g)
        r = torch.where(a, r + torch.where((step == steps_t - 1)[..., None], 0.5 * e, e) * g, r)
        h = energy(lp, r)
        bad = act & (~torch.isfinite(h) | (h - h0 > max_energy_error))
        diverging = diverging | bad  # a divergent chain stops where it started
        b = bad[..., None]
        z, lp, g = torch.where(b, u0, z), torch.where(bad, lp0, lp), torch.where(b, g0, g)
    delta = energy(lp, r) - h0
    delta = torch.where(torch.isfinite(delta) & ~diverging, delta, torch.full_like(delta, math.inf))
    accept_prob = torch.exp(-delta.clamp(min=0))
    accept = noise.uniform(accept_prob.shape, dim=1, dtype=accept_prob.dtype) < accept_prob
    new = State(
        torch.where(accept[..., None], z, u0),
        torch.where(accept, lp, lp0),
        torch.where(accept[..., None], g, g0),
    )
    return new, HMCInfo(accept_prob, diverging, steps_t.clamp(max=max_steps))


# --------------------------------------------------------------------------- warmup adaptation, as init / update / final


_DA_T0, _DA_KAPPA, _DA_GAMMA = 10, 0.75, 0.05  # Pyro's and Stan's dual-averaging constants


class DualAverage(NamedTuple):
    """Dual averaging of ``log eps`` toward ``target_accept``, one scheme per group (each tensor ``[G]``)."""

    x: torch.Tensor  #: the current iterate, the log step size to use next
    x_avg: (
        torch.Tensor
    )  #: the averaged iterate, the log step size to sample with once adaptation ends
    g_avg: torch.Tensor  #: the running mean of ``target_accept - accept_prob``
    prox_center: torch.Tensor  #: ``log(10 eps0)``, where the scheme is centred (as Stan and Pyro)
    t: int  #: updates so far
    target_accept: float


def da_init(eps: torch.Tensor, target_accept: float) -> DualAverage:
    """A scheme per group that starts from step sizes ``eps`` ``[G]``."""
    log_eps = torch.log(eps)
    return DualAverage(
        log_eps, log_eps, torch.zeros_like(eps), torch.log(10 * eps), 0, target_accept
    )


def da_update(da: DualAverage, accept_prob: torch.Tensor) -> DualAverage:
    """One step of every scheme on the groups' mean acceptance probabilities ``[G]`` (Pyro's ``DualAveraging.step``, on tensors)."""
    t = da.t + 1
    g_avg = (1 - 1 / (t + _DA_T0)) * da.g_avg + (da.target_accept - accept_prob) / (t + _DA_T0)
    x = da.prox_center - (t**0.5) / _DA_GAMMA * g_avg
    weight = t ** (-_DA_KAPPA)
    return DualAverage(
        x, (1 - weight) * da.x_avg + weight * x, g_avg, da.prox_center, t, da.target_accept
    )


def da_final(da: DualAverage) -> torch.Tensor:
    """The step sizes to sample with: the averaged iterate, ``exp(x_avg)`` ``[G]``."""
    return torch.exp(da.x_avg)


class Welford(NamedTuple):
    """Running mean and (co)variance of each group's draws: ``mean`` ``[G, K]``, ``m2`` ``[G, K]`` (diagonal) or ``[G, K, K]`` (dense)."""

    n: int  #: draws so far (one per chain per update)
    mean: torch.Tensor
    m2: torch.Tensor
    dense: bool


def welford_init(like: torch.Tensor, dense: bool = False) -> Welford:
    """No draws yet, for groups shaped like ``like`` ``[G, K]``."""
    return Welford(
        0,
        torch.zeros_like(like),
        like.new_zeros((*like.shape, like.shape[-1])) if dense else torch.zeros_like(like),
        dense,
    )


def welford_update(w: Welford, u: torch.Tensor) -> Welford:
    """Add every chain's position ``u`` ``[C, G, K]`` to its group's estimate, chain after chain."""
    n, mean, m2 = w.n, w.mean, w.m2
    for c in range(u.shape[0]):
        n += 1
        before = u[c] - mean
        mean = mean + before / n
        after = u[c] - mean
        m2 = m2 + (torch.einsum("gk,gl->gkl", after, before) if w.dense else before * after)
    return Welford(n, mean, m2, w.dense)


def welford_final(w: Welford) -> torch.Tensor:
    """The inverse mass matrix: the covariance regularised as Stan's, ``n/(n+5) cov + 1e-3 * 5/(n+5) I`` (diagonal ``[G, K]`` or dense ``[G, K, K]``)."""
    n = w.n
    if w.dense:
        cov = w.m2 / max(n - 1, 1)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return n / (n + 5.0) * cov + 1e-3 * (5.0 / (n + 5.0)) * eye
    if n < 2:
        raise ConfigError(f"a diagonal mass matrix needs at least 2 draws per group, got {n}")
    return (n / (n + 5.0)) * (w.m2 / (n - 1)) + 1e-3 * (5.0 / (n + 5.0))


class Window(NamedTuple):
    """What one warmup transition adds to the adaptation besides a step-size update (plain data, from :func:`window_schedule`)."""

    slow: bool  #: its draws enter the mass-matrix estimate
    end: bool  #: a slow window ends after it: the mass matrix is re-estimated and the step size restarts


def _slow_windows(
    warmup: int, start: int = 75, end: int = 50, init_window: int = 25
) -> list[tuple[int, int]]:
    """Stan's slow-adaptation windows (first and last transition, inclusive) for the mass matrix."""
    if warmup < 20:
        return []
    if start + end + init_window > warmup:
        start, end = int(0.15 * warmup), int(0.1 * warmup)
        init_window = warmup - start - end
    windows, cur, size, last = [], start, init_window, warmup - end
    while cur < last:
        nxt_size = 2 * size if 3 * size <= last - cur else size
        if 3 * size > last - cur:
            size = last - cur
        windows.append((cur, cur + size - 1))
        cur, size = cur + size, nxt_size
    return windows


def window_schedule(warmup: int) -> list[Window]:
    """One :class:`Window` per warmup transition, in Stan's schedule: a fast window, slow windows doubling in length, a fast window."""
    windows = _slow_windows(warmup)
    return [
        Window(any(a <= t <= b for a, b in windows), any(t == b for _, b in windows))
        for t in range(warmup)
    ]


class Adaptation(NamedTuple):
    """The warmup adaptation: the step sizes ``eps`` ``[G]`` in use, their dual averaging, the inverse mass and its running estimate."""

    eps: torch.Tensor
    da: DualAverage
    inv_mass: torch.Tensor
    welford: Welford


def adapt_init(
    eps: torch.Tensor, inv_mass: torch.Tensor, target_accept: float, dense: bool = False
) -> Adaptation:
    """Adaptation from step sizes ``eps`` ``[G]`` and an inverse mass ``[G, K]``; ``dense`` estimates full covariances."""
    like = inv_mass if inv_mass.dim() == 2 else inv_mass.diagonal(dim1=-2, dim2=-1)
    return Adaptation(eps, da_init(eps, target_accept), inv_mass, welford_init(like, dense))


def adapt_update(
    a: Adaptation, window: Window, u: torch.Tensor, accept_prob: torch.Tensor
) -> Adaptation:
    """After one warmup transition to ``u`` ``[C, G, K]`` with acceptance ``accept_prob`` ``[C, G]``: the next step sizes, the draws, at a window's end the new mass.

    At a window's end the step-size scheme is not restarted here: the caller finds a step size
    for the new mass (:meth:`~ppl_vae.inference.mcmc.hmc._Sampler.reasonable_step_size`) and
    passes it to :func:`adapt_restart`.
    """
    da = da_update(a.da, accept_prob.mean(0))
    welford = welford_update(a.welford, u) if window.slow else a.welford
    inv_mass = a.inv_mass
    if window.end:
        inv_mass, welford = welford_final(welford), welford_init(welford.mean, welford.dense)
    return Adaptation(torch.exp(da.x), da, inv_mass, welford)


def adapt_restart(a: Adaptation, eps: torch.Tensor) -> Adaptation:
    """The step-size scheme started again from ``eps`` ``[G]`` (after a new mass matrix)."""
    return a._replace(eps=eps, da=da_init(eps, a.da.target_accept))


def adapt_final(a: Adaptation) -> tuple[torch.Tensor, torch.Tensor]:
    """The step sizes and inverse mass to sample with: the averaged dual-averaging iterate (the current step sizes when it has not moved since a restart)."""
    return (a.eps if a.da.t == 0 else da_final(a.da)), a.inv_mass


# --------------------------------------------------------------------------- the No-U-Turn sampler, batched


class NUTSInfo(NamedTuple):
    """Per-chain statistics of one NUTS transition (each ``[C, G]``)."""

    accept_prob: (
        torch.Tensor
    )  #: mean over the new points of min(1, exp(H0 - H)): what the step size adapts on
    diverging: (
        torch.Tensor
    )  #: the trajectory hit an energy error above max_energy_error (or a non-finite one)
    n_steps: torch.Tensor  #: leapfrog steps (gradient evaluations) this chain used
    tree_depth: torch.Tensor  #: doublings of the trajectory


def _dot(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . (M^-1 b)`` over the last dim (``m`` as in :func:`velocity`)."""
    return (a * velocity(m, b)).sum(-1)


def _turning(
    m: torch.Tensor, r_left: torch.Tensor, r_right: torch.Tensor, r_sum: torch.Tensor
) -> torch.Tensor:
    """The generalised U-turn criterion (Betancourt 2017, A.4.2) of a trajectory with end momenta ``r_left``, ``r_right`` and momentum sum ``r_sum``."""
    rho = r_sum - 0.5 * (r_left + r_right)
    return (_dot(m, r_left, rho) <= 0) | (_dot(m, r_right, rho) <= 0)


def _checkpoints(n: int) -> tuple[int, int]:
    """Which stored checkpoints leaf ``n`` of a subtree closes (inclusive range; NumPyro's ``_leaf_idx_to_ckpt_idxs``)."""
    idx_max = bin(n >> 1).count("1")
    trailing_ones = ((n ^ (n + 1)).bit_length()) - 1
    return idx_max - trailing_ones + 1, idx_max


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` ``[C, G]`` holds, else ``b`` (``[C, G]`` or ``[C, G, K]``)."""
    return torch.where(mask[..., None] if a.dim() == 3 else mask, a, b)


class _Dynamics(NamedTuple):
    """What every leapfrog step of a NUTS transition shares."""

    f: LogDensity
    m: torch.Tensor  #: the inverse mass (as in :func:`velocity`)
    e: torch.Tensor  #: step sizes ``[C, G, 1]``
    h0: torch.Tensor  #: the energy at the start ``[C, G]``
    max_energy_error: float


class _Trajectory(NamedTuple):
    """A NUTS trajectory as it doubles (tensors ``[C, G]`` or ``[C, G, K]``)."""

    left: tuple[torch.Tensor, ...]  #: its left end: position, momentum, log density, gradient
    right: tuple[torch.Tensor, ...]  #: its right end
    prop: tuple[torch.Tensor, ...]  #: the draw so far: position, log density, gradient
    log_w: torch.Tensor  #: log of the trajectory's summed weights exp(H0 - H)
    r_sum: torch.Tensor  #: the sum of its momenta
    active: torch.Tensor  #: bool: the chain's tree still grows
    diverging: torch.Tensor
    n_steps: torch.Tensor
    depth: torch.Tensor
    accept_sum: torch.Tensor  #: the summed acceptance probabilities of the new points

    @classmethod
    def start(
        cls, u0: torch.Tensor, r0: torch.Tensor, lp0: torch.Tensor, g0: torch.Tensor
    ) -> _Trajectory:
        """The one-point trajectory at the chains' state, with momenta ``r0``."""
        C, G, _ = u0.shape
        zeros = torch.zeros(C, G, dtype=torch.long, device=u0.device)
        return cls(
            (u0, r0, lp0, g0),
            (u0, r0, lp0, g0),
            (u0, lp0, g0),
            torch.zeros(C, G, dtype=u0.dtype, device=u0.device),
            r0.clone(),
            torch.ones(C, G, dtype=torch.bool, device=u0.device),
            torch.zeros(C, G, dtype=torch.bool, device=u0.device),
            zeros,
            zeros.clone(),
            torch.zeros(C, G, dtype=u0.dtype, device=u0.device),
        )


class _Subtree(NamedTuple):
    """A subtree built by one doubling (tensors ``[C, G]`` or ``[C, G, K]``)."""

    end: tuple[torch.Tensor, ...]  #: its far end: position, momentum, log density, gradient
    log_w: torch.Tensor  #: log of its summed weights
    prop: tuple[torch.Tensor, ...]  #: its own draw: position, log density, gradient
    r_sum: torch.Tensor  #: the sum of its momenta
    ok: torch.Tensor  #: bool: built to the end without a U-turn or a divergence inside it


def _leapfrog(
    d: _Dynamics, v: torch.Tensor, z: torch.Tensor, r: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """One leapfrog step in direction ``v`` (``+-1`` ``[C, G, 1]``): the new position, momentum, log density, gradient and energy error ``H - H0``."""
    r_half = r + 0.5 * v * d.e * g
    z_new = z + v * d.e * velocity(d.m, r_half)
    lp_new, g_new = value_and_grad(d.f, z_new)
    r_new = r_half + 0.5 * v * d.e * g_new
    h = -lp_new + 0.5 * _dot(d.m, r_new, r_new)
    return z_new, r_new, lp_new, g_new, h - d.h0


def _subtrees_turn(
    m: torch.Tensor,
    i: int,
    r: torch.Tensor,
    sub_sum: torch.Tensor,
    ckpt_r: torch.Tensor,
    ckpt_sum: torch.Tensor,
) -> torch.Tensor | None:
    """After leaf ``i`` of a subtree: store its checkpoint (even ``i``, None) or whether any binary subtree it closes turns (odd ``i``, ``[C, G]``)."""
    lo, hi = _checkpoints(i)
    if i % 2 == 0:
        ckpt_r[hi], ckpt_sum[hi] = r, sub_sum
        return None
    turn = torch.zeros(r.shape[:-1], dtype=torch.bool, device=r.device)
    for k in range(lo, hi + 1):
        turn |= _turning(m, ckpt_r[k], r, sub_sum - ckpt_sum[k] + ckpt_r[k])
    return turn


def _subtree(
    d: _Dynamics, tree: _Trajectory, j: int, forward: torch.Tensor, uniforms: torch.Tensor
) -> tuple[_Trajectory, _Subtree]:
    """The ``2**j`` leaves beyond the trajectory's end in direction ``forward`` ``[C, G]``, its draw picked with ``uniforms`` ``[C, G, 2**j]`` (one a leaf).

    A chain that stopped inside the subtree is masked: no read per leapfrog step. Returns the
    trajectory with its counts updated, and the subtree.
    """
    v = torch.where(forward, 1.0, -1.0).to(d.h0.dtype)[..., None]
    z, r, lp, g = (_where(forward, a, b) for a, b in zip(tree.right, tree.left))
    C, G, K = z.shape
    sub_w = torch.full((C, G), -math.inf, dtype=d.h0.dtype, device=z.device)
    sub_prop = (z, lp, g)
    sub_sum = torch.zeros_like(r)
    ckpt_r, ckpt_sum = r.new_zeros((max(j, 1), C, G, K)), r.new_zeros((max(j, 1), C, G, K))
    ok = tree.active.clone()
    n_steps, diverging, accept_sum = tree.n_steps, tree.diverging, tree.accept_sum
    for i in range(2**j):
        z_new, r_new, lp_new, g_new, delta = _leapfrog(d, v, z, r, g)
        n_steps = n_steps + ok.long()
        finite = torch.isfinite(delta)
        bad = ok & (~finite | (delta > d.max_energy_error))
        accept_sum = accept_sum + torch.where(
            ok & finite, torch.exp(-delta.clamp(min=0)), torch.zeros_like(delta)
        )
        diverging = diverging | bad
        ok = ok & ~bad
        z, r, lp, g = (
            _where(ok, a, b) for a, b in zip((z_new, r_new, lp_new, g_new), (z, r, lp, g))
        )
        w = torch.where(ok, -delta, torch.full_like(delta, -math.inf))
        new_w = torch.logaddexp(sub_w, w)
        take = ok & (uniforms[..., i] < torch.exp(w - new_w))
        sub_prop = tuple(_where(take, a, b) for a, b in zip((z, lp, g), sub_prop))
        sub_w = torch.where(ok, new_w, sub_w)
        sub_sum = _where(ok, sub_sum + r, sub_sum)
        turn = _subtrees_turn(d.m, i, r, sub_sum, ckpt_r, ckpt_sum) if j > 0 else None
        if turn is not None:
            ok = ok & ~turn
    tree = tree._replace(diverging=diverging, n_steps=n_steps, accept_sum=accept_sum)
    return tree, _Subtree((z, r, lp, g), sub_w, sub_prop, sub_sum, ok)


def _merge(
    m: torch.Tensor,
    tree: _Trajectory,
    sub: _Subtree,
    forward: torch.Tensor,
    j: int,
    uniform: torch.Tensor,
) -> _Trajectory:
    """The trajectory doubled by ``sub`` where the subtree is valid, the draw moved into it with probability ``uniform`` ``[C, G]`` below its share of the weight (biased progressive sampling), the root checked for a U-turn."""
    valid = tree.active & sub.ok
    take = valid & (uniform < torch.exp(sub.log_w - tree.log_w))
    right = tuple(_where(valid & forward, a, b) for a, b in zip(sub.end, tree.right))
    left = tuple(_where(valid & ~forward, a, b) for a, b in zip(sub.end, tree.left))
    r_sum = _where(valid, tree.r_sum + sub.r_sum, tree.r_sum)
    return tree._replace(
        left=left,
        right=right,
        prop=tuple(_where(take, a, b) for a, b in zip(sub.prop, tree.prop)),
        log_w=torch.where(valid, torch.logaddexp(tree.log_w, sub.log_w), tree.log_w),
        r_sum=r_sum,
        depth=torch.where(tree.active, torch.full_like(tree.depth, j + 1), tree.depth),
        # the whole trajectory: the root of the tree, checked as every other node is (once, plainly)
        active=valid & ~_turning(m, left[1], right[1], r_sum),
    )


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
    that symmetry is what keeps the transition reversible (Stan's two extra checks across every
    merge are left out; docs/compare.md, *Validation*, says why). The draw is multinomial over the
    trajectory: uniform progressive sampling inside a subtree, biased progressive sampling
    toward the new subtree at each doubling (Betancourt 2017, A.3.2). Every chain does its
    leapfrog steps in lockstep with the others; a chain whose tree has stopped is masked. The
    transition reads one value back per doubling: whether any chain still grows.

    ``eps`` is ``[G]`` (per group) or ``[C, G]``; ``inv_mass`` ``[G, K]`` or ``[G, K, K]`` (identity when None).
    All the transition's randomness is drawn up front from ``noise`` (one stream per group):
    momenta, directions and a uniform per possible leaf, so a group's draws never depend on how
    long the other groups' trees grow.
    """
    u0, lp0, g0 = state.u, state.lp, state.grad
    C, G, K = u0.shape
    dt = u0.dtype
    e = (eps if eps.dim() == 2 else eps.expand(C, G))[..., None].to(dt)
    m = inv_mass if inv_mass is not None else u0.new_ones(())
    r0 = momentum(m, noise.normal(u0.shape, dim=1, dtype=dt))
    leaves = 2**max_tree_depth
    uniforms = noise.uniform(
        (C, G, leaves + 2 * max_tree_depth), dim=1, dtype=dt
    )  # leaf draws, then directions, then merges
    d = _Dynamics(f, m, e, -lp0 + 0.5 * _dot(m, r0, r0), max_energy_error)
    tree = _Trajectory.start(u0, r0, lp0, g0)
    for j in range(max_tree_depth):
        if j > 0 and not tree.active.any():  # the transition's one read per doubling
            break
        forward = uniforms[..., leaves + j] < 0.5  # [C, G]: extend to the right
        tree, sub = _subtree(d, tree, j, forward, uniforms[..., 2**j - 1 : 2 ** (j + 1) - 1])
        tree = _merge(m, tree, sub, forward, j, uniforms[..., leaves + max_tree_depth + j])
    u, lp, g = tree.prop
    info = NUTSInfo(
        tree.accept_sum / tree.n_steps.clamp(min=1).to(dt), tree.diverging, tree.n_steps, tree.depth
    )
    return State(u, lp, g), info
