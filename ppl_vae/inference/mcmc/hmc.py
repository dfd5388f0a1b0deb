r"""Batched HMC for latent posteriors and for any Pyro model.

The output is :class:`Draws` (convertible to ArviZ), as for Pyro's NUTS (:mod:`.nuts`):

* :func:`hmc_latent` / :func:`hmc` -- **batched HMC**: every chain of every
  datapoint advances together in one tensor program. Given a trained
  decoder the posteriors :math:`p(z_n \mid x_n)` of different datapoints are
  independent, so ``C`` chains for each of ``N`` datapoints are one
  ``[C, N, d]`` tensor and each leapfrog step is one batched decoder
  evaluation. Each datapoint (a *group* of ``C`` chains) has its own step
  size, tuned by dual averaging (Hoffman & Gelman 2014) to a target
  acceptance rate, and its own mass matrix, diagonal or (``mass="dense"``) the
  full covariance, estimated in Stan's windowed warmup schedule from the pooled
  draws of its chains. Two transitions: ``kernel="hmc"``, **HMC with a
  jittered trajectory length**: every transition integrates for a time
  :math:`T \sim U(0, 2 T_0)` in the units of the adapted mass matrix
  (whitened coordinates), i.e. :math:`L = \lceil T / \epsilon_n \rceil`
  leapfrog steps per chain, all chains stepping in lockstep and each masked
  once its own trajectory is done (the jitter avoids the resonances of a fixed
  trajectory length, Neal 2011, section 5.4.2.3); and ``kernel="nuts"``, the
  **No-U-Turn sampler** (:func:`~ppl_vae.inference.kernel.nuts_transition`: multinomial, the
  generalised U-turn criterion, a maximum tree depth), each chain's tree
  growing on its own while all chains step in lockstep. A transition whose
  energy error exceeds ``max_energy_error`` (or is not finite) is
  *divergent*: it is rejected and recorded in ``sample_stats["diverging"]``.

Pyro's NUTS (:mod:`.nuts`) is the baseline against which this sampler is checked and benchmarked;
the transitions and the warmup adaptation are :mod:`~ppl_vae.inference.kernel`'s pure steps (the step-size rule
shared with AIS), and this module is the loop around them. A transition reads nothing back from
the device (NUTS: one boolean per tree doubling); the loop reads each datapoint's leapfrog-step
limit once per check window (every 25 warmup transitions, after each mass-matrix window, and once
for the whole of sampling), so that the number of leapfrog steps a transition runs is known on
the host. In warmup, where the step size moves between reads, a datapoint's trajectories are cut
at 1.25 times its longest one at the window's first step size; in sampling none is cut.

The log density of the latent posterior of a model written the ppl-vae way
is the model's joint log density with its latent site conditioned on ``z``:

.. math::

    \log p(x_n, z) = \log p(z) + \log p_\theta(x_n \mid z),

computed by tracing the model on the data repeated ``C`` times (one copy per
chain) and summing every site's log-density over all dimensions except the
``"data"`` plate; the gradient in ``z`` comes from autograd. The model's
network parameters are frozen while sampling (``requires_grad`` is switched
off and restored afterwards); only ``z`` is differentiated.

References
----------
Neal (2011), MCMC using Hamiltonian dynamics. Handbook of MCMC.
Hoffman & Gelman (2014), The No-U-Turn Sampler. JMLR 15.
Stan Reference Manual, "HMC algorithm parameters" (warmup windows).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import site_is_subsample

from ...errors import ConfigError
from ...progress import bar
from ..distributed import Checked, Spread, spread_over_rows
from ..kernel import (
    State,
    adapt_final,
    adapt_init,
    adapt_restart,
    adapt_update,
    nuts_transition,
    transition,
    window_schedule,
)
from ..latent import latent_draws, latent_of, log_joint
from ..random import Streams, Tag, dataset_index, seeded
from ..traces import (
    PlaceFlat,
    analysed,
    data_like,
    model_latent_sites,
    sum_but_first,
    trace_nesting,
    vectorized,
)
from .draws import Draws, check_counts, freeze_model, point_layout, site_dims

__all__ = ["hmc_latent", "hmc", "check_kernel", "KERNELS", "MASSES"]


# --------------------------------------------------------------------------- targets


@dataclass
class _Target:
    """A batched log density over unconstrained ``[C, G, K]`` and how to read draws off it."""

    log_density: Callable[[torch.Tensor], torch.Tensor]  # [C, G, K] -> [C, G]
    init: torch.Tensor  # [C, G, K]
    to_samples: Callable[[torch.Tensor], dict[str, np.ndarray]]  # [C, S, G, K] -> arrays
    dims: dict[str, list[str]]
    coords: dict[str, list[Any]]
    group_dim: str | None  # the ArviZ dim of the groups (None: one group)


def _latent_target(
    model: Callable[..., object],
    args: tuple[torch.Tensor, ...],
    num_chains: int,
    init: Any,
    noise: Streams,
) -> _Target:
    latent = latent_of(model, *args, analysis="latent-posterior MCMC")
    n, k = latent.num_points, latent.dim
    log_density = log_joint(model, latent, *args)
    like = args[0]
    if isinstance(init, torch.Tensor) and latent.plain:
        init = {latent.names[0]: init}
    if isinstance(init, dict):
        missing = [s for s in latent.names if s not in init]
        if missing:
            raise ConfigError(f"init has no value for latent site {missing[0]!r}")
        values = {}
        for s in latent.sites:
            v = init[s.name].to(like.dtype)
            if tuple(v.shape) == (n, *s.shape):
                v = v.expand(num_chains, *v.shape)
            if tuple(v.shape) != (num_chains, n, *s.shape):
                raise ConfigError(
                    f"init for site {s.name!r} must have shape [{n}, ...] or [{num_chains}, {n}, ...], got {tuple(init[s.name].shape)}"
                )
            values[s.name] = v
        u0 = latent.unconstrain(values).clone()
    elif callable(init):  # a guide: one draw per chain
        latent_of(model, *args, guide=init, analysis="latent-posterior MCMC")
        u0 = latent_draws(model, latent, *args, guide=init, num_samples=num_chains, streams=noise)
    elif (
        isinstance(init, str) and init == "uniform"
    ):  # as Pyro's init_to_uniform: U(-2, 2) in unconstrained space
        u0 = noise.uniform((num_chains, n, k), dim=1, dtype=like.dtype) * 4 - 2
    else:
        raise ConfigError(
            f"init must be 'uniform', a guide, a tensor (one latent site) or a dict of site values, got {type(init).__name__}"
        )

    def to_samples(u: torch.Tensor) -> dict[str, np.ndarray]:  # [C, S, N, K]
        values, _ = latent.constrain(u)
        return {name: v.detach().cpu().numpy() for name, v in values.items()}

    dims, coords = point_layout(
        latent,
        ("diverging", "acceptance_rate", "n_steps", "step_size", "tree_depth"),
        index=noise.index,
    )
    return _Target(log_density, u0, to_samples, dims=dims, coords=coords, group_dim="point")


def _model_target(
    model: Callable[..., object],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    num_chains: int,
    seed: int,
) -> tuple[_Target, Streams]:
    plain, latent = model_latent_sites(model, args, kwargs)
    dim = -(trace_nesting(plain) + 1)
    c = num_chains

    def chains(size: int) -> Callable[..., Any]:
        return vectorized(model, size, dim, "_chains")

    data = data_like(args, kwargs)
    with poutine.block(), torch.no_grad(), PlaceFlat(data):
        proto = poutine.trace(chains(c)).get_trace(*args, **kwargs)
    shapes = {name: tuple(plain.nodes[name]["value"].shape) for name in latent}
    vshapes = {name: tuple(proto.nodes[name]["value"].shape) for name in latent}
    for name in latent:
        if vshapes[name][0] != c or math.prod(vshapes[name]) != c * math.prod(shapes[name]):
            raise ConfigError(
                f"site {name!r} does not broadcast over chains; is max_plate_nesting respected?"
            )
    transforms = {name: biject_to(plain.nodes[name]["fn"].support) for name in latent}
    sizes = [math.prod(shapes[name]) for name in latent]

    def unpack(
        u: torch.Tensor,
    ) -> dict[str, torch.Tensor]:  # [B, K] -> constrained values [B, *vshape[1:]]
        out = {}
        for name, chunk in zip(latent, u.split(sizes, dim=-1)):
            out[name] = chunk.reshape(u.shape[0], *vshapes[name][1:])
        return out

    def log_density(u: torch.Tensor) -> torch.Tensor:  # [C, 1, K] -> [C, 1]
        n = u.shape[0]
        raw = unpack(u[:, 0])
        values = {name: transforms[name](v) for name, v in raw.items()}
        total = sum(
            sum_but_first(transforms[k].log_abs_det_jacobian(raw[k], values[k]), n) for k in latent
        )
        with poutine.block(), pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(chains(n), data=values)).get_trace(*args, **kwargs)
            tr.compute_log_prob(site_filter=lambda name, s: not site_is_subsample(s))
            for s in tr.nodes.values():
                if s["type"] == "sample" and "log_prob" in s:
                    if s["log_prob"].dim() > -dim:  # a batch dimension left of the chains plate
                        raise ConfigError(
                            f"site {s['name']!r} has batch shape {tuple(s['log_prob'].shape)}: the model does not broadcast over a leading chains plate; use nuts()"
                        )
                    total = total + sum_but_first(s["log_prob"], n)
        return total.unsqueeze(1)

    site = proto.nodes[latent[0]][
        "value"
    ]  # the chains live on the data's device, in its dtype (a float64 model runs in float64)
    like = data if data is not None else site
    noise = Streams(seed, [0], like.device, Tag.HMC)  # one group: the model's whole posterior
    u0 = (
        noise.uniform(
            (c, 1, sum(sizes)),
            dim=1,
            dtype=like.dtype if like.is_floating_point() else torch.get_default_dtype(),
        )
        * 4
        - 2
    )
    with torch.no_grad():
        together, alone = log_density(u0), torch.cat([log_density(u0[i : i + 1]) for i in range(c)])
    if not torch.allclose(together, alone, rtol=1e-4, atol=1e-3):
        raise ConfigError(
            "the model's log density changes when chains are batched: it does not broadcast over a leading chains plate; use nuts()"
        )

    def to_samples(u: torch.Tensor) -> dict[str, np.ndarray]:  # [C, S, 1, K]
        cc, s = u.shape[:2]
        flat = u.reshape(cc * s, -1)
        out = {}
        for name, chunk in zip(latent, flat.split(sizes, dim=-1)):
            out[name] = (
                transforms[name](chunk.reshape(cc * s, *shapes[name]))
                .reshape(cc, s, *shapes[name])
                .cpu()
                .numpy()
            )
        return out

    return _Target(
        log_density, u0, to_samples, dims=site_dims(shapes), coords={}, group_dim=None
    ), noise


# --------------------------------------------------------------------------- batched HMC


def _optimize_init(
    f: Callable[[torch.Tensor], torch.Tensor], u0: torch.Tensor, steps: int, lr: float = 0.1
) -> torch.Tensor:
    """Move each chain's initial point uphill: ``steps`` Adam steps at ``lr``, then ``steps`` more decaying 100-fold.

    Far from the posterior mass the energies are so large that float32 round-off
    alone rejects every HMC proposal; a short ascent avoids that without
    pulling the chains onto one point (they stop in the bulk, not at the mode).
    Adam moves a coordinate by about ``lr`` a step whatever the gradient's
    scale, so the constant phase can carry a chain about ``steps * lr`` units
    (a start in ``(-2, 2)`` far from a posterior near 1 needs more than the
    decaying phase's ``lr * steps / ln 100``). A chain (and datapoint) whose
    log density stops being finite is frozen at its last finite point; the
    others go on, so one datapoint's start never depends on another's.
    """
    if steps <= 0:
        return u0
    u = u0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    rates = [lr] * steps + [lr * 0.01 ** (i / steps) for i in range(1, steps + 1)]
    best = u0.detach().clone()
    frozen = None
    with torch.enable_grad():
        for rate in rates:
            opt.param_groups[0]["lr"] = rate
            opt.zero_grad()
            lp = f(u)  # [C, G]
            bad = ~torch.isfinite(lp)
            frozen = bad if frozen is None else frozen | bad
            best = torch.where(frozen[..., None], best, u.detach())
            if frozen.all():
                break
            (-lp.masked_fill(frozen, 0.0).sum()).backward()
            opt.step()
            with torch.no_grad():
                u.copy_(torch.where(frozen[..., None], best, u))
    return best


_EARLY_CAP = 16  # HMC: leapfrog steps per transition before the first mass-matrix estimate
_EARLY_DEPTH = 6  # NUTS: tree depth before the first mass-matrix estimate
_CHECK_EVERY = (
    25  # HMC: transitions between two reads of the step limits (and at every window's end)
)
_WARMUP_SLACK = 1.25  # HMC warmup: a group's step limit is this many times its longest trajectory at the step size of the window's start
KERNELS = ("hmc", "nuts")
MASSES = ("diag", "dense")


class _Sampler:
    """State, step sizes and mass matrices of batched HMC over ``[C, G, K]`` unconstrained values."""

    def __init__(
        self,
        target: _Target,
        *,
        target_accept: float,
        trajectory_length: float,
        max_leapfrog: int,
        max_energy_error: float,
        noise: Streams,
    ) -> None:
        self.f = target.log_density
        self.target_accept = target_accept
        self.T = trajectory_length
        self.max_leapfrog = max_leapfrog
        self.max_energy_error = max_energy_error
        self.noise = noise
        self.state = State.at(self.f, target.init)
        self.C, self.G, self.K = target.init.shape
        self.inv_mass = target.init.new_ones(self.G, self.K)
        self.eps = target.init.new_ones(self.G)
        # before the first mass-matrix estimate the units of T are unknown: short trajectories
        self.cap = min(max_leapfrog, _EARLY_CAP)
        self.limit = torch.full(
            (self.G,), self.cap, dtype=torch.long, device=target.init.device
        )  # most leapfrog steps per group
        self.bound = (
            self.cap
        )  # the most of them, on the host: the leapfrog steps every transition runs

    def plan(self, slack: float) -> None:
        """Fix each group's most leapfrog steps until the next plan, ``ceil(slack * 2T / eps)`` (at most the cap), and read their maximum: one read.

        With ``slack=1`` and a fixed step size no trajectory is cut short; in warmup, where the step
        size moves between plans, a group's trajectories are cut at its own limit, so that a
        datapoint's chains never depend on the other datapoints of its batch.
        """
        self.limit = torch.ceil(slack * 2 * self.T / self.eps).clamp(1, self.cap).long()
        self.bound = int(self.limit.max())

    def transition(
        self, eps: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One HMC transition with ``steps[c, g]`` leapfrog steps (at most :attr:`bound`); returns (accept_prob, diverging)."""
        self.state, info = transition(
            self.f,
            self.state,
            eps,
            steps,
            self.noise,
            inv_mass=self.inv_mass,
            max_energy_error=self.max_energy_error,
            max_steps=self.bound,
        )
        return info.accept_prob, info.diverging

    def advance(
        self, kernel: str, depth_cap: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One transition of ``kernel`` at the current step sizes: (accept_prob, diverging, leapfrog steps, NUTS's tree depth or None).

        HMC runs its jittered number of steps (:meth:`steps`, at most the last :meth:`plan`'s);
        NUTS doubles each chain's trajectory at most ``depth_cap`` times.
        """
        if kernel == "nuts":
            self.state, info = nuts_transition(
                self.f,
                self.state,
                self.eps,
                self.noise,
                inv_mass=self.inv_mass,
                max_tree_depth=depth_cap,
                max_energy_error=self.max_energy_error,
            )
            return info.accept_prob, info.diverging, info.n_steps, info.tree_depth
        steps = self.steps(self.eps)
        return *self.transition(self.eps, steps), steps, None

    def steps(self, eps: torch.Tensor) -> torch.Tensor:
        """Jittered number of leapfrog steps per chain: ``ceil(U(0, 2T) / eps)``, at most its group's limit."""
        t = 2 * self.T * self.noise.uniform((self.C, self.G), dim=1, dtype=eps.dtype)
        return torch.minimum(torch.ceil(t / eps[None, :]).clamp(1, self.cap).long(), self.limit)

    def reasonable_step_size(self) -> None:
        """Hoffman & Gelman's heuristic per group: double or halve until one step crosses acceptance 0.8.

        The probes run in rounds of ten, each group frozen once it crossed; whether any group
        still moves is read once a round (one read for most targets).
        """
        eps = self.eps.clone()
        state = self.state

        def accept_rate(e: torch.Tensor) -> torch.Tensor:
            with (
                self.noise.replaying()
            ):  # a probe: the state is not moved, and every probe uses the same momenta, so a
                # group's stream does not depend on how many probes the other groups of its batch needed
                _, info = transition(
                    self.f,
                    state,
                    e,
                    1,
                    self.noise,
                    inv_mass=self.inv_mass,
                    max_energy_error=self.max_energy_error,
                )
            return info.accept_prob.mean(0)

        direction = torch.where(accept_rate(eps) > self.target_accept, 1.0, -1.0).to(eps.dtype)
        active = torch.ones(self.G, dtype=torch.bool, device=eps.device)
        for probe in range(40):
            new = eps * 2.0**direction
            rate = accept_rate(new)
            crossed = (direction > 0) & (rate < self.target_accept) | (direction < 0) & (
                rate > self.target_accept
            )
            eps = torch.where(active, new, eps)
            active = active & ~crossed
            if probe % 10 == 9 and not active.any():
                break
        self.eps = eps


def _run_batched(
    target: _Target,
    *,
    num_samples: int,
    warmup_steps: int,
    target_accept: float,
    trajectory_length: float,
    max_leapfrog: int,
    max_energy_error: float,
    noise: Streams,
    progress: bool,
    method: str,
    init_steps: int,
    kernel: str = "hmc",
    max_tree_depth: int = 10,
    mass: str = "diag",
) -> Draws:
    """The loop around the kernels: warmup transitions driving :func:`~ppl_vae.inference.kernel.adapt_update` over :func:`~ppl_vae.inference.kernel.window_schedule`, then sampling.

    A transition reads nothing back (NUTS: one boolean per doubling). HMC reads its groups' step
    limits (:meth:`_Sampler.plan`) once per check window: every :data:`_CHECK_EVERY` transitions,
    after each mass-matrix window and when sampling starts.
    """
    t0 = time.perf_counter()
    target.init = _optimize_init(target.log_density, target.init, init_steps)
    s = _Sampler(
        target,
        target_accept=target_accept,
        trajectory_length=trajectory_length,
        max_leapfrog=max_leapfrog,
        max_energy_error=max_energy_error,
        noise=noise,
    )
    if not torch.isfinite(s.state.lp).all():
        raise ConfigError("the log density is not finite at the initial point of some chains")
    s.reasonable_step_size()
    schedule = window_schedule(warmup_steps)
    adapt = adapt_init(s.eps, s.inv_mass, target_accept, dense=mass == "dense")
    depth_cap = min(max_tree_depth, _EARLY_DEPTH)
    if warmup_steps == 0:
        s.cap = s.max_leapfrog
        depth_cap = max_tree_depth
    replan = True
    with bar(
        range(warmup_steps + num_samples),
        desc=f"{method} warm-up" if warmup_steps else f"{method} sampling",
        unit="step",
        enabled=progress,
    ) as it:
        keep_u, keep_acc, keep_div, keep_steps, keep_depth = [], [], [], [], []
        for t in it:
            warm = t < warmup_steps
            if progress and t == warmup_steps and warmup_steps:
                it.set_description_str(f"{method} sampling", refresh=False)
            if kernel != "nuts" and (replan or (warm and t % _CHECK_EVERY == 0)):
                s.plan(_WARMUP_SLACK if warm else 1.0)
                replan = False
            acc, div, steps, depth = s.advance(kernel, depth_cap)
            if warm:
                window = schedule[t]
                adapt = adapt_update(adapt, window, s.state.u, acc)
                s.eps, s.inv_mass = adapt.eps, adapt.inv_mass
                if window.end:
                    s.cap = s.max_leapfrog
                    depth_cap = max_tree_depth
                    s.reasonable_step_size()
                    adapt = adapt_restart(adapt, s.eps)
                if t == warmup_steps - 1:
                    s.eps, s.inv_mass = adapt_final(adapt)
                    s.cap = (
                        s.max_leapfrog
                    )  # short warmups have no mass-matrix window to lift the early cap
                    depth_cap = max_tree_depth
                replan = window.end or t == warmup_steps - 1
            else:
                keep_u.append(s.state.u)
                keep_acc.append(acc)
                keep_div.append(div)
                keep_steps.append(steps)
                if depth is not None:
                    keep_depth.append(depth)
    wall = time.perf_counter() - t0
    u = torch.stack(keep_u, 1)  # [C, S, G, K]
    stats = {
        "diverging": torch.stack(keep_div, 1).cpu().numpy(),
        "acceptance_rate": torch.stack(keep_acc, 1).cpu().numpy(),
        "n_steps": torch.stack(keep_steps, 1).cpu().numpy(),
        "step_size": s.eps.expand(s.C, num_samples, s.G).cpu().numpy().copy(),
    }
    if keep_depth:
        stats["tree_depth"] = torch.stack(keep_depth, 1).cpu().numpy()
    if target.group_dim is None:
        stats = {k: v[..., 0] for k, v in stats.items()}
    return Draws(target.to_samples(u), stats, target.dims, target.coords, method, wall)


def check_kernel(kernel: str, max_tree_depth: int, mass: str = "diag") -> None:
    """Refuse an unknown kernel or mass matrix, or a tree depth outside 1..20 (``ConfigError``, one line)."""
    if mass not in MASSES:
        raise ConfigError(f"unknown mass matrix {mass!r}; choose one of {', '.join(MASSES)}")
    if kernel not in KERNELS:
        raise ConfigError(f"unknown MCMC kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if (
        isinstance(max_tree_depth, bool)
        or not isinstance(max_tree_depth, int)
        or not 1 <= max_tree_depth <= 20
    ):
        raise ConfigError(f"max tree depth must be an integer from 1 to 20, got {max_tree_depth!r}")


#: the tuning options of :func:`hmc` and :func:`hmc_latent`, which :func:`_run_batched` takes as they are
_TUNING = (
    "target_accept",
    "trajectory_length",
    "max_leapfrog",
    "max_energy_error",
    "init_steps",
    "progress",
    "kernel",
    "max_tree_depth",
    "mass",
)


def _tuning(arguments: dict[str, Any]) -> dict[str, Any]:
    """The tuning options (:data:`_TUNING`) among an entry point's ``arguments`` (its ``locals()``)."""
    return {name: arguments[name] for name in _TUNING}


def _batched(
    make_target: Callable[[], tuple[_Target, Streams]],
    freeze: contextlib.AbstractContextManager[None],
    num_samples: int,
    warmup_steps: int,
    seed: int,
    tuning: dict[str, Any],
) -> Draws:
    with freeze, seeded(seed):
        target, noise = make_target()
        return _run_batched(
            target,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            noise=noise,
            method=f"batched-{tuning.get('kernel', 'hmc')}",
            **tuning,
        )


_HMC_DOC_PARAMS = """
    num_samples, warmup_steps, num_chains : int
        Kept draws per chain, warmup (adaptation) transitions, chains.
    seed : int
        Seeds the draws (one stream per datapoint, see ``index``); the global RNG is left as it was.
    target_accept : float
        Dual-averaging target of the mean acceptance probability.
    trajectory_length : float
        :math:`T_0`: the integration time is drawn from :math:`U(0, 2T_0)` per
        transition and chain, in whitened units (after mass adaptation).
    max_leapfrog : int
        Cap on leapfrog steps per transition.
    max_energy_error : float
        Energy error beyond which a transition is divergent (as Stan: 1000).
    init_steps : int
        Adam steps that move the initial points uphill before warmup, twice over: at a
        constant rate, then decaying (0: none).
    kernel : {"hmc", "nuts"}
        ``"hmc"``: a jittered trajectory length (``trajectory_length``, ``max_leapfrog``).
        ``"nuts"``: the No-U-Turn sampler (:func:`~ppl_vae.inference.kernel.nuts_transition`),
        each chain's trajectory doubling until it turns, at most ``max_tree_depth`` times
        (at most 6 before the first mass-matrix estimate); ``sample_stats`` gains ``tree_depth``.
    max_tree_depth : int
        NUTS's cap on doublings: at most ``2**max_tree_depth - 1`` leapfrog steps per transition.
    mass : {"diag", "dense"}
        The inverse mass matrix adapted per datapoint in the warmup windows: the draws'
        variances, or their full covariance (for correlated posteriors: it whitens them,
        at ``O(K^2)`` per leapfrog step and a Cholesky per transition).
"""


def _tuning_documented(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Put the shared tuning parameters where the docstring says ``{tuning}``."""
    fn.__doc__ = (fn.__doc__ or "").replace("    {tuning}\n", _HMC_DOC_PARAMS.lstrip("\n"))
    return fn


def _check_latent(
    model: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int,
    warmup_steps: int,
    num_chains: int,
    init: str | Callable[..., object] | torch.Tensor,
    index: torch.Tensor | None,
    spread: Spread | None,
    kernel: str,
    max_tree_depth: int,
    mass: str,
    **_: object,
) -> Checked:
    """:func:`hmc_latent`'s refusals (options, the model's latent state), before any work."""
    check_counts(num_samples, warmup_steps, num_chains)
    check_kernel(kernel, max_tree_depth, mass)
    model, guide = analysed(
        model, init if callable(init) else None, args, "latent-posterior MCMC"
    )  # refuse before any work
    init = guide if guide is not None else init
    n = latent_of(model, *args, analysis="latent-posterior MCMC").num_points
    if spread is not None and not (isinstance(init, str) or callable(init)):
        raise ConfigError(
            "hmc_latent: initial values given per datapoint cannot be spread over processes; use init='uniform' or a guide"
        )
    programs = (model, init) if callable(init) else (model,)
    return Checked((model,), args, dataset_index(index, n), programs, {"init": init})


@_tuning_documented
@spread_over_rows(Draws, _check_latent)
def hmc_latent(
    model: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    init: str | Callable[..., object] | torch.Tensor = "uniform",
    target_accept: float = 0.8,
    trajectory_length: float = 2.0,
    max_leapfrog: int = 256,
    max_energy_error: float = 1000.0,
    init_steps: int = 100,
    progress: bool = False,
    index: torch.Tensor | None = None,
    kernel: str = "hmc",
    max_tree_depth: int = 10,
    mass: str = "diag",
) -> Draws:
    r"""Batched HMC on the latent posteriors :math:`p(z \mid x_n)` of every row of ``args``.

    Parameters
    ----------
    model : callable
        A ppl-vae model ``model(x, ...)`` with a ``"data"`` plate; its
        networks are frozen while sampling. The chains move in its whole
        latent state: every continuous latent site, concatenated in
        unconstrained space (:func:`~ppl_vae.inference.latent.latent_of`;
        a discrete site or a global latent is refused before any work).
    *args : torch.Tensor
        The model's arguments for the chosen datapoints (rows).
    init : "uniform", a guide, a tensor or a dict
        Initial points: :math:`U(-2, 2)` in unconstrained space (as Pyro's
        ``init_to_uniform``), one draw of a guide per chain, or site values
        (``{site: [N, ...] or [C, N, ...]}``; a tensor for a model with one
        latent site).
    index : tensor, optional
        The rows' dataset indices (default ``0..N-1``): the ``point``
        coordinates, and the seeds of each datapoint's own random stream.
    spread : Spread, optional
        Spread the datapoints over devices and processes
        (:func:`~ppl_vae.inference.distributed.spread_over_rows`); a datapoint's
        chains are those it gets here, to float rounding (which grows along
        a chain: equal to ~1e-9 after a few dozen transitions, not after thousands).
    {tuning}
    Returns
    -------
    Draws
        ``samples[site]`` of shape ``[C, S, N, *event]`` for every latent
        site (dims ``point``, with the datapoints' ``index`` as coordinates, ``{site}_dim_0``, ...); ``sample_stats``
        ``diverging``, ``acceptance_rate``, ``n_steps``, ``step_size``, each
        ``[C, S, N]``.

    Examples
    --------
    >>> draws = hmc_latent(built.model, x[:100], num_samples=500, num_chains=4)  # doctest: +SKIP
    >>> draws.diagnostics()  # doctest: +SKIP
    """

    def target() -> tuple[_Target, Streams]:
        noise = Streams(seed, index, args[0].device, Tag.HMC)
        return _latent_target(model, args, num_chains, init, noise), noise

    freeze = freeze_model(model, args)
    return _batched(target, freeze, num_samples, warmup_steps, seed, _tuning(locals()))


@_tuning_documented
def hmc(
    model: Callable[..., object],
    *args: Any,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    target_accept: float = 0.8,
    trajectory_length: float = 2.0,
    max_leapfrog: int = 256,
    max_energy_error: float = 1000.0,
    init_steps: int = 100,
    progress: bool = False,
    kernel: str = "hmc",
    max_tree_depth: int = 10,
    mass: str = "diag",
    **kwargs: Any,
) -> Draws:
    r"""Batched HMC on the posterior of any Pyro model: all chains advance as one batch.

    The model is run under an extra ``pyro.plate`` of size ``num_chains`` to
    the left of its own plates (as Pyro's vectorised particles), with every
    latent site conditioned on its constrained value (``biject_to`` of its
    support, Jacobian included). The chains share one step size and one
    diagonal mass matrix, adapted from their pooled draws.

    Parameters
    ----------
    model : callable
        Any Pyro model; ``*args`` and ``**kwargs`` are passed to it.
    {tuning}
    Returns
    -------
    Draws
        ``samples[name]`` of shape ``[C, S, *site_shape]`` per latent site.
    """
    check_counts(num_samples, warmup_steps, num_chains)
    check_kernel(kernel, max_tree_depth, mass)
    freeze = freeze_model(lambda *a, **k: model(*args, **kwargs), ())
    return _batched(
        lambda: _model_target(model, args, kwargs, num_chains, seed),
        freeze,
        num_samples,
        warmup_steps,
        seed,
        _tuning(locals()),
    )
