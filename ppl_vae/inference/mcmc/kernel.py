r"""One HMC transition and one step-size rule, shared by annealed importance sampling and batched MCMC.

Every chain of every group (a datapoint, in the latent-posterior samplers) is one
row of a ``[C, G, K]`` tensor; a log density ``f`` maps it to ``[C, G]``.

:func:`transition` is one Metropolis-adjusted leapfrog trajectory per chain, with
its own number of steps per chain (chains whose trajectory is shorter stop,
masked, while the others go on), a step size per group or per chain, and a
diagonal inverse mass matrix per group. A trajectory whose energy error exceeds
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

__all__ = ["State", "StepSize", "transition", "value_and_grad"]

LogDensity = Callable[[torch.Tensor], torch.Tensor]


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
    r = noise.normal(u0.shape, dim=1, dtype=u0.dtype) / m.sqrt()

    def energy(lp: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return -lp + 0.5 * (r * r * m).sum(-1)

    h0 = energy(lp0, r)
    z, lp, g = u0, lp0, g0
    r = r + 0.5 * e * g
    diverging = torch.zeros(C, G, dtype=torch.bool, device=u0.device)
    for step in range(int(steps_t.max())):
        act = (step < steps_t) & ~diverging
        if not act.any():
            break
        a = act[..., None]
        z = torch.where(a, z + e * m * r, z)
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
