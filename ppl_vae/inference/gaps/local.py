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
the same ones, to float rounding). Each datapoint has its own
convergence test; a converged datapoint's parameters are frozen and it leaves
the batch.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro import poutine

from ...errors import ConfigError, check_int, check_positive
from ...guides.latent import Latent, moment_matched
from ...guides.local import FAMILIES, LocalPosterior, family_of
from ...progress import bar
from ..latent import guide_in_latent_space, latent_draws, latent_of
from ..random import Streams, Tag, base_seed, dataset_index, seeded
from ..traces import log_weights, plate_nesting
from .bounds import importance_bounds

__all__ = ["LocalFit", "optimize_local", "check_options", "start_distribution"]


@dataclass(frozen=True)
class LocalFit:
    """The optimised :class:`LocalPosterior` and how each datapoint's optimisation went."""

    posterior: LocalPosterior
    steps: torch.Tensor  # [N] Adam steps taken by each datapoint
    converged: torch.Tensor  # [N] bool: stopped by its own test (else by max_steps)
    initial_elbo: torch.Tensor  # [N] window-mean ELBO of the first check window
    final_elbo: torch.Tensor  # [N] ELBO estimate of the kept (best) parameters: start or a check window's mean
    options: dict = field(default_factory=dict)


def check_options(
    *, family: str = "diagonal", num_samples: int = 10, lr: float = 1e-2, max_steps: int = 3000, check_every: int = 100, tol: float = 0.05,
    num_flows: int = 2, flow_hidden: int | None = None,
) -> None:
    """Validate the options of :func:`optimize_local` before any work (``ConfigError`` naming the option)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    for name, value in (("num_samples", num_samples), ("max_steps", max_steps), ("check_every", check_every), ("num_flows", num_flows)):
        check_int(value, name.replace("_", "-"))
    check_positive(lr, "the local learning rate")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
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
    max_steps: int = 3000,
    check_every: int = 100,
    tol: float = 0.05,
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
        Adam's learning rate.
    max_steps, check_every, tol : int, int, float
        Each datapoint stops when the mean of its ELBO estimates over the last
        ``check_every`` steps improved by less than ``tol`` nats on the window
        before, or at ``max_steps``. It keeps the parameters with the best
        estimate seen: its start (estimated with ``num_samples *
        check_every`` draws, at most 1000) or the end of a check window, so
        that a stochastic optimisation never leaves it worse than it began.
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
    check_options(family=family, num_samples=num_samples, lr=lr, max_steps=max_steps, check_every=check_every, tol=tol, num_flows=num_flows)
    if isinstance(init, str) and init != "prior":
        raise ConfigError(f"init must be a guide, a distribution or 'prior', got {init!r}")
    guide = init if callable(init) and not isinstance(init, torch.distributions.Distribution) else None
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
        best = [p.detach().clone() for p in params]  # each datapoint's best parameters seen at a check
        best_mean = importance_bounds(model, posterior, *data, num_samples=min(num_samples * check_every, 1000), seed=base, index=idx).elbo
        like = posterior.loc
        active = torch.ones(n, dtype=torch.bool, device=like.device)
        steps = torch.zeros(n, dtype=torch.long, device=like.device)
        window = like.new_zeros(n, dtype=torch.float64)
        previous = like.new_full((n,), -math.inf, dtype=torch.float64)
        first = like.new_full((n,), math.nan, dtype=torch.float64)
        with bar(total=max_steps, desc=f"q* {family}", unit="step", enabled=progress) as shown:
            for step in range(1, max_steps + 1):
                shown.update()
                rows = active.nonzero().squeeze(-1)
                lw = log_weights(model, posterior.select(rows), *(t[rows] for t in data), num_samples=num_samples, nesting=nesting, streams=streams.select(rows))
                if not torch.isfinite(lw).all():
                    raise ConfigError(f"local optimisation of the {family} family hit a non-finite ELBO at step {step}; lower lr")
                per_point = lw.mean(0)
                grads = torch.autograd.grad(-per_point.sum(), params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                with torch.no_grad():
                    if not active.all():
                        for p, f in zip(params, frozen):  # converged datapoints do not move (Adam's momentum would)
                            p[~active] = f[~active]
                    steps[rows] += 1
                    window[rows] += per_point.detach().double()
                    if step % check_every == 0:
                        mean = window / check_every
                        first = torch.where(torch.isnan(first), mean, first)
                        done = active & (mean - previous < tol)
                        previous = torch.where(active, mean, previous)
                        improved = active & (mean > best_mean)
                        best_mean = torch.where(improved, mean, best_mean)
                        window.zero_()
                        for p, f, b in zip(params, frozen, best):
                            b[improved] = p[improved]
                            p[done] = b[done]  # a datapoint stops at its best parameters, never worse than its start
                            f[done] = b[done]
                        active &= ~done
                        shown.set_postfix_str(f"{int(active.sum())} of {n} datapoints still moving", refresh=False)
                        if not active.any():
                            break
        with torch.no_grad():
            for p, b in zip(params, best):  # those stopped by max_steps, too
                p[active] = b[active]
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    converged = ~active
    options = dict(family=family, num_samples=num_samples, lr=lr, max_steps=max_steps, check_every=check_every, tol=tol)
    return LocalFit(posterior, steps, converged, first.to(like.dtype), best_mean.to(like.dtype), options)
