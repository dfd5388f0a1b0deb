r"""Locally optimal posteriors :math:`q^*`: per-datapoint variational parameters, optimised in one batch.

For each datapoint :math:`x_n`, with the model frozen,

.. math::

    q^*_n = \arg\max_{q \in \mathcal{Q}} \; \mathbb{E}_{q}\left[\log p(x_n, z) - \log q(z)\right],

over a family :math:`\mathcal{Q}`: ``"diagonal"`` (fully factorised
Gaussian), ``"full"`` (full-covariance Gaussian) or ``"flow"`` (a Gaussian
pushed through inverse autoregressive flow steps whose MADE weights are the
datapoint's own). All datapoints' parameters live in tensors with a leading
``[N]`` dimension and are optimised together by one Adam on the summed
objective. Adam acts elementwise, and datapoint ``n``'s objective depends only
on its own parameters, so this equals ``N`` separate optimisations at the cost
of one batched program (each datapoint draws from its own random streams, so
the same ones, to float rounding). Each datapoint has its own step size and
its own convergence test; a converged datapoint's parameters are frozen and
it leaves the batch.

**Reaching the optimum.** Adam at a constant step size does not stop at the
optimum of a stochastic objective: it jitters around it, with an excess that
shrinks with the step size and the gradient's noise. Stopping when a window's
mean ELBO improves by less than a tolerance therefore stops early: on PPCA
(10 observed, 5 latent dimensions) started from a one-unit-bottleneck
encoder, the full-covariance ``q*``, whose family holds the exact posterior,
stopped 0.034 ± 0.001 nats short (26 SE). Two things close that:

* the *path-derivative* gradient (Roeder, Wu & Duvenaud 2017) for the
  Gaussian families: :math:`\log q(z)` is differentiated through the draw
  :math:`z` only, not through its parameters directly, so where ``q`` equals
  the posterior the gradient is exactly zero for every draw, and near it its
  noise is small (the flow family keeps the ordinary reparameterised gradient:
  the path derivative would need the flow's inverse);
* a per-datapoint step size that is halved each time a check window shows no
  improvement (less than ``tol`` nats, or less than twice the standard error of
  the difference of the two windows' means), up to ``lr_decays`` times.

A datapoint has **converged** when a window shows no improvement at its
smallest step size; a datapoint still improving at ``max_steps`` has not, and
:class:`LocalFit` says so (``converged``, ``final_change``), as does
:func:`~ppl_vae.inference.decompose`'s report.

The hard part for flows is a per-datapoint IAF: :class:`BatchedMADE` is a
masked autoencoder with one weight matrix per datapoint (``einsum`` over the
batch), plugged into Pyro's
:class:`~pyro.distributions.transforms.AffineAutoregressive`. Started from an
amortised :class:`~ppl_vae.guides.IAFEncoder`, it copies the encoder's
weights and folds the context term :math:`W_h h(x_n)` into datapoint ``n``'s
first-layer bias, so :math:`q^*` starts exactly at :math:`q`.

References
----------
Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational Inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro import poutine

from ...errors import ConfigError, check_int, check_positive
from ...guides.latent import AUX_SITE, Latent, moment_matched
from ...guides.local import FAMILIES, LocalPosterior, family_of
from ...progress import bar
from ..latent import guide_in_latent_space, latent_draws, latent_of
from ..random import Streams, Tag, base_seed, dataset_index, seeded
from ..traces import analysed, log_weights_of, plate_nesting, traces
from .bounds import importance_bounds

__all__ = ["LocalFit", "optimize_local", "check_options", "start_distribution"]


@dataclass(frozen=True)
class LocalFit:
    """The optimised :class:`LocalPosterior` and how each datapoint's optimisation went."""

    posterior: LocalPosterior
    steps: torch.Tensor  # [N] Adam steps taken by each datapoint
    converged: torch.Tensor  # [N] bool: no improvement at its smallest step size (else stopped by max_steps)
    initial_elbo: torch.Tensor  # [N] window-mean ELBO of the first check window
    final_elbo: torch.Tensor  # [N] ELBO estimate of the kept parameters: the last check window's mean, or the start's where that was clearly worse
    final_change: torch.Tensor  # [N] nats: the last check window's mean ELBO minus the one before
    lr_scale: torch.Tensor  # [N] each datapoint's final step size, as a fraction of lr
    options: dict = field(default_factory=dict)


def check_options(
    *, family: str = "diagonal", num_samples: int = 10, lr: float = 1e-2, max_steps: int = 4000, check_every: int = 100, tol: float = 0.01,
    lr_decays: int = 4, path_derivative: bool = True, num_flows: int = 2, flow_hidden: int | None = None,
) -> None:
    """Validate the options of :func:`optimize_local` before any work (``ConfigError`` naming the option)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    for name, value in (("num_samples", num_samples), ("max_steps", max_steps), ("check_every", check_every), ("num_flows", num_flows)):
        check_int(value, name.replace("_", "-"))
    check_positive(lr, "the local learning rate")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
    check_int(lr_decays, "lr-decays", low=0)
    if not isinstance(path_derivative, bool):
        raise ConfigError(f"path_derivative must be True or False, got {path_derivative!r}")
    if flow_hidden is not None:
        check_int(flow_hidden, "flow-hidden")


def start_distribution(
    model: Callable[..., object], latent: Latent, *data: torch.Tensor, init: Callable[..., object] | torch.distributions.Distribution | str = "prior", draws: int = 2000,
    streams: Streams | None = None,
) -> torch.distributions.Distribution:
    """A batch of distributions over the joint latent ``u`` (batch ``[N]``, event ``[K]``) to start ``q*`` from.

    A distribution is returned as it is; a guide exactly where it is one
    (:func:`~ppl_vae.inference.latent.guide_in_latent_space`), else the
    Gaussian with the moments of ``draws`` of its draws; ``"prior"``: the
    prior's Gaussian where the model has one Gaussian site, else the moments
    of prior draws. Draws come from ``streams`` (one per datapoint) where given.
    """
    if isinstance(init, torch.distributions.Distribution):
        return init
    if init == "prior":
        if latent.plain:
            with poutine.block(), torch.no_grad():
                fn = poutine.trace(model).get_trace(*data).nodes[latent.names[0]]["fn"]
            if family_of(fn) in ("diagonal", "full"):
                return fn
        return moment_matched(latent_draws(model, latent, *data, num_samples=draws, streams=streams))
    q, _ = guide_in_latent_space(init, latent, *data)  # type: ignore[arg-type]
    return q if q is not None else moment_matched(latent_draws(model, latent, *data, guide=init, num_samples=draws, streams=streams))  # type: ignore[arg-type]


def optimize_local(
    model: Callable[..., object],
    *data: torch.Tensor,
    family: str = "diagonal",
    init: Callable[..., object] | torch.distributions.Distribution | str = "prior",
    num_samples: int = 10,
    lr: float = 1e-2,
    max_steps: int = 4000,
    check_every: int = 100,
    tol: float = 0.01,
    lr_decays: int = 4,
    path_derivative: bool = True,
    num_flows: int = 2,
    flow_hidden: int | None = None,
    seed: int | None = 0,
    index: torch.Tensor | None = None,
    progress: bool = False,
) -> LocalFit:
    r"""Optimise a per-datapoint ``q*`` of ``family`` for every row of ``data``, in one batch.

    Parameters
    ----------
    model : callable
        A model written the ppl-vae way; its parameters are not changed. Its
        latent state is every continuous latent site, concatenated in
        unconstrained space (:func:`~ppl_vae.inference.latent.latent_of`);
        a discrete site, a global latent or a point-mass guide is refused.
    *data : torch.Tensor
        The model's arguments (rows = datapoints).
    family : {"diagonal", "full", "flow"}
        The variational family of ``q*`` over that joint latent.
    init : guide, distribution or "prior"
        Where to start: an amortised guide (exactly its distribution where it
        is in a family over the joint latent, else the Gaussian with the
        moments of its draws), a batch of distributions over the joint latent
        (batch ``[N]``, event ``[K]``), or the model's prior.
    num_samples : int
        Reparameterised draws per datapoint and step.
    lr : float
        Adam's initial learning rate (each datapoint's own step size starts there).
    max_steps, check_every, tol, lr_decays : int, int, float, int
        Every ``check_every`` steps each datapoint compares the mean of its
        ELBO estimates over the window with the window before. No improvement
        (less than ``tol`` nats, or less than twice the standard error of the
        difference) halves its step size; with its step size already halved
        ``lr_decays`` times it has converged and stops. A datapoint still going
        at ``max_steps`` stops unconverged (``LocalFit.converged``). Each
        keeps its last parameters, unless their window's mean ELBO is more than
        two standard errors below its start's (estimated with ``num_samples *
        check_every`` draws, at most 1000): then it goes back to its start, so
        that a stochastic optimisation never leaves it worse than it began.
        (Not the best window seen: near the optimum the windows' means differ
        by less than their noise, and the largest of them is a lucky one.)
    path_derivative : bool
        The path-derivative ("sticking the landing") gradient for the diagonal
        and full families (the flow family ignores it): zero variance where
        ``q*`` is the exact posterior.
    num_flows, flow_hidden : int
        The flow family's steps and MADE width (when not copied from ``init``).
    seed : int, optional
        Seeds the draws (and random flow initialisation).
    index : tensor, optional
        The rows' indices in their dataset (default ``0..N-1``). Every draw
        of a datapoint (its start, its flow's initial weights, its steps'
        samples) comes from its own streams, seeded from ``(seed, index)``
        (:class:`~ppl_vae.inference.random.Streams`), and its objective and
        Adam's update involve its own parameters only: a datapoint's ``q*``
        does not depend on the other rows or their number (to float rounding).
    """
    check_options(family=family, num_samples=num_samples, lr=lr, max_steps=max_steps, check_every=check_every, tol=tol, lr_decays=lr_decays,
                  path_derivative=path_derivative, num_flows=num_flows)
    if isinstance(init, str) and init != "prior":
        raise ConfigError(f"init must be a guide, a distribution or 'prior', got {init!r}")
    guide = init if callable(init) and not isinstance(init, torch.distributions.Distribution) else None
    model, guide = analysed(model, guide, data, "the local optimisation (q*)")  # type: ignore[assignment]
    init = guide if guide is not None else init
    latent = latent_of(model, *data, guide=guide, analysis="the local optimisation (q*)")
    n = latent.num_points
    idx = dataset_index(index, n)
    device = data[0].device
    with seeded(seed):
        base = base_seed(seed)
        q0 = start_distribution(model, latent, *data, init=init, streams=Streams(base, idx, device, Tag.LOCAL, 0))  # the start
        if tuple(q0.batch_shape) != (n,) or tuple(q0.event_shape) != (latent.dim,):
            raise ConfigError(f"the initial distribution must have batch shape ({n},) and event shape ({latent.dim},), got {tuple(q0.batch_shape)} and {tuple(q0.event_shape)}")
        posterior = LocalPosterior.initial(family, q0, latent, num_flows=num_flows, flow_hidden=flow_hidden, normal=Streams(base, idx, device, Tag.LOCAL, 1).normal,
                                           generator=torch.Generator(device="cpu").manual_seed(base))
        streams = Streams(base, idx, device, Tag.LOCAL, 2)  # the steps
        params = list(posterior.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        nesting = plate_nesting(model, posterior.select(slice(0, 1)), *(t[:1] for t in data))
        frozen = [p.detach().clone() for p in params]
        start = [p.detach().clone() for p in params]
        at_start = importance_bounds(model, posterior, *data, num_samples=min(num_samples * check_every, 1000), seed=base, index=idx, diagnose=False)
        start_mean, start_se = at_start.elbo, at_start.elbo_se if at_start.elbo_se is not None else torch.zeros_like(at_start.elbo)
        final_mean = start_mean.clone()
        like = posterior.loc
        stl = path_derivative and family != "flow"
        site = latent.sites[0].name if latent.plain else AUX_SITE  # where the guide draws u from q*
        active = torch.ones(n, dtype=torch.bool, device=like.device)
        steps = torch.zeros(n, dtype=torch.long, device=like.device)
        scale = like.new_ones(n, dtype=torch.float64)  # each datapoint's step size, as a fraction of lr
        decays = torch.zeros(n, dtype=torch.long, device=like.device)
        window = like.new_zeros(n, dtype=torch.float64)
        window_sq = like.new_zeros(n, dtype=torch.float64)
        previous = like.new_full((n,), -math.inf, dtype=torch.float64)
        previous_se = like.new_zeros(n, dtype=torch.float64)
        change = like.new_full((n,), math.nan, dtype=torch.float64)
        first = like.new_full((n,), math.nan, dtype=torch.float64)
        with bar(total=max_steps, desc=f"q* {family}", unit="step", enabled=progress) as shown:
            for step in range(1, max_steps + 1):
                shown.update()
                rows = active.nonzero().squeeze(-1)
                model_tr, guide_tr = traces(model, posterior.select(rows), *(t[rows] for t in data), num_samples=num_samples, nesting=nesting, streams=streams.select(rows))
                lw = log_weights_of(model_tr, guide_tr)
                if not torch.isfinite(lw).all():
                    raise ConfigError(f"local optimisation of the {family} family hit a non-finite ELBO at step {step}; lower lr")
                objective = lw
                if stl:  # same value; the gradient of log q(u) through u only (its parameters' direct term cancels)
                    u = guide_tr.nodes[site]["value"]
                    objective = lw + guide_tr.nodes[site]["fn"].log_prob(u) - posterior.distribution(rows, detach=True).log_prob(u)
                per_point = lw.detach().mean(0).double()
                grads = torch.autograd.grad(-objective.mean(0).sum(), params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                slowed = bool((scale < 1).any())  # until a datapoint's step size is first halved, Adam's own step is everyone's
                before = [p.detach().clone() for p in params] if slowed else []
                opt.step()
                with torch.no_grad():
                    for p, b0 in zip(params, before):  # each datapoint's own step size (Adam's step is proportional to lr)
                        p.copy_(b0 + scale.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) * (p - b0))
                    if not active.all():
                        for p, f in zip(params, frozen):  # converged datapoints do not move (Adam's momentum would)
                            p[~active] = f[~active]
                    steps[rows] += 1
                    window[rows] += per_point
                    window_sq[rows] += per_point**2
                    if step % check_every == 0:
                        mean = window / check_every
                        var = (window_sq / check_every - mean**2).clamp_min(0) * check_every / max(check_every - 1, 1)
                        se = (var / check_every).sqrt()
                        first = torch.where(torch.isnan(first), mean, first)
                        change = torch.where(active, mean - previous, change)
                        stalled = active & (change < torch.clamp_min(2 * (se**2 + previous_se**2).sqrt(), tol))
                        done = stalled & (decays >= lr_decays)
                        slower = stalled & ~done
                        scale = torch.where(slower, scale / 2, scale)
                        decays += slower.long()
                        previous = torch.where(active, mean, previous)
                        previous_se = torch.where(active, se, previous_se)
                        worse = mean + 2 * (se**2 + start_se**2).sqrt() < start_mean
                        final_mean = torch.where(active, torch.where(worse, start_mean, mean), final_mean)
                        window.zero_()
                        window_sq.zero_()
                        back = done & worse
                        for p, f, b in zip(params, frozen, start):
                            p[back] = b[back]  # a datapoint never ends worse than its start
                            f[done] = p[done]
                        active &= ~done
                        shown.set_postfix_str(f"{int(active.sum())} of {n} datapoints still moving", refresh=False)
                        if not active.any():
                            break
        with torch.no_grad():
            back = active & (final_mean == start_mean)  # those stopped by max_steps, too, when their last window was clearly worse
            for p, b in zip(params, start):
                p[back] = b[back]
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    converged = ~active
    options = dict(family=family, num_samples=num_samples, lr=lr, max_steps=max_steps, check_every=check_every, tol=tol, lr_decays=lr_decays,
                   path_derivative=path_derivative)
    return LocalFit(posterior, steps, converged, first.to(like.dtype), final_mean.to(like.dtype), change.to(like.dtype), scale.to(like.dtype), options)
