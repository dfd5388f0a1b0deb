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
the same ones, to float rounding). Each datapoint (and each of its starts) has
its own step size and its own convergence test; a converged one's parameters
are frozen and it leaves the batch.

**Reaching the optimum, and knowing it.** Adam at a constant step size does
not stop at the optimum of a stochastic objective: it jitters around it, with
an excess that shrinks with the step size and the gradient's noise. Three
things get ``q*`` there and say so:

* the *path-derivative* gradient (Roeder, Wu & Duvenaud 2017) for the
  Gaussian families: :math:`\log q(z)` is differentiated through the draw
  :math:`z` only, not through its parameters directly, so where ``q`` equals
  the posterior the gradient is exactly zero for every draw, and near it its
  noise is small (the flow family keeps the ordinary reparameterised gradient:
  the path derivative would need the flow's inverse);
* a per-datapoint step size, halved when the last two check windows show
  no progress, up to ``lr_decays`` times;
* a convergence test that noise cannot fool. Every ``check_every`` steps the
  ELBO is estimated from the datapoint's *check draws*: ``check_samples``
  standard-normal draws fixed for the whole optimisation (common random
  numbers). A change between two checks is the mean of the paired
  differences of log-weights, and its standard error their spread over
  :math:`\sqrt M` (:func:`window_change`): the noise the two estimates share
  cancels, so the error shrinks with the distance between the two parameter
  values rather than with the ELBO's own spread. Without progress, Adam
  jitters around the optimum short of it by an excess that shrinks with the
  step size, so halving the step size gains about that excess: a datapoint
  has **converged** when the gain since its last halving is below ``tol`` by
  :data:`Z_CHECK` standard errors (:func:`judge_window`). A point whose ELBO
  still rises by ``tol`` per halving, or whose gain is too noisy to tell, is
  not reported converged; halving again shrinks both the jitter and the
  noise of the next comparison. The gain and its standard error are reported
  per datapoint (``final_change``, ``final_change_se``).

**Saddles and several modes.** Where the expected gradient is zero, as at a
symmetric start between two modes (a saddle of the ELBO), no test on the
ELBO's progress can tell the point from an optimum. Each datapoint is
therefore optimised from ``starts`` starts in the same batch: the init, and
narrowed copies of it (scale times ``start_scale``) centred at draws of the
init (scale times ``start_spread``), which climb to the mode nearest their
centre rather than average over several. The starts are compared on
``FINAL_FACTOR`` times as many draws, the same for all of them, and the best
is kept (:func:`keep_best`); starts that ended apart (by ELBO, or with the
ELBO dipping between them: :func:`distinct_optima`) are counted in
``LocalFit.optima``, and every start's parameters stay in
``LocalFit.candidates`` (the gap decomposition builds its log p(x) proposal
from the distinct ones).

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

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyro
import torch
from pyro import poutine

from ...errors import ConfigError, check_int, check_positive
from ...guides.latent import AUX_SITE, Latent, moment_matched
from ...guides.local import FAMILIES, LocalPosterior, family_of
from ...progress import bar
from ..dispatch import host
from ..latent import guide_in_latent_space, latent_draws, latent_of
from ..random import Streams, Tag, base_seed, dataset_index, seeded
from ..traces import analysed, log_weights_of, plate_nesting, traces
from .bounds import MAX_ELEMENTS, chunks

__all__ = [
    "LocalFit",
    "optimize_local",
    "check_options",
    "OPTIONS",
    "start_distribution",
    "check_log_weights",
    "resampled_shifts",
    "window_change",
    "judge_window",
    "keep_best",
    "same_optimum",
    "distinct_optima",
    "Z_CHECK",
    "FINAL_FACTOR",
    "LocalState",
    "local_objective",
    "local_step",
    "adam_update",
    "check_window",
]

#: standard errors by which a check window's change must fall below ``tol`` to count as no improvement
#: (one-sided: a window still improving by ``tol`` passes by chance with probability 2.3 %)
Z_CHECK = 2.0
#: the starts of a datapoint are compared (and its final ELBO estimated) on this many times ``check_samples`` draws
FINAL_FACTOR = 10


@dataclass(frozen=True)
class LocalFit:
    """The optimised :class:`LocalPosterior` and how each datapoint's optimisation went (``[N]`` tensors unless said).

    Every ELBO here is the estimate from the datapoint's fixed check draws (``check_samples`` of
    them, the same at every check and for every start: common random numbers).
    """

    posterior: (
        LocalPosterior  # the kept start of each datapoint (the one with the highest final ELBO)
    )
    steps: torch.Tensor  # Adam steps the kept start took
    converged: (
        torch.Tensor
    )  # bool: the kept start's last window showed no improvement at its smallest step size
    initial_elbo: torch.Tensor  # ELBO of the first start (the init)
    final_elbo: torch.Tensor  # ELBO of the kept parameters
    final_elbo_se: torch.Tensor  # its Monte Carlo standard error
    final_change: (
        torch.Tensor
    )  # nats: the kept start's gain since its last halving, at its last check (judge_window)
    final_change_se: torch.Tensor  # the standard error that gain was judged against
    lr_scale: torch.Tensor  # the kept start's final step size, as a fraction of lr
    start_elbo: torch.Tensor  # [S, N] each start's final ELBO
    start_converged: torch.Tensor  # [S, N] bool
    optima: (
        torch.Tensor
    )  # how many distinct optima the converged starts (and the kept one) ended at (1: they agree)
    modes: torch.Tensor  # [S, N] bool: the best start of each distinct optimum
    candidates: (
        LocalPosterior  # every start's final parameters, S * N rows, start-major (row s * N + n)
    )
    options: dict = field(default_factory=dict)


#: the options :func:`check_options` knows: :func:`optimize_local`'s, besides ``init``, ``seed``, ``index`` and ``progress``
OPTIONS = (
    "family",
    "num_samples",
    "lr",
    "max_steps",
    "check_every",
    "tol",
    "lr_decays",
    "check_samples",
    "starts",
    "start_spread",
    "start_scale",
    "path_derivative",
    "num_flows",
    "flow_hidden",
    "compile",
)


def check_options(**options: object) -> None:
    """Validate keyword options of :func:`optimize_local` before any work (``ConfigError`` naming the option).

    An option not given takes :func:`optimize_local`'s default; a name not in :data:`OPTIONS` is refused.
    """
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ConfigError(f"unknown local option {unknown[0]!r}; known: {', '.join(OPTIONS)}")
    defaults = inspect.signature(optimize_local).parameters
    o = {k: options.get(k, defaults[k].default) for k in OPTIONS}
    if o["family"] not in FAMILIES:
        raise ConfigError(f"unknown family {o['family']!r}; choose one of {', '.join(FAMILIES)}")
    for name in ("num_samples", "max_steps", "check_every", "num_flows", "starts"):
        check_int(o[name], name.replace("_", "-"))
    check_int(o["check_samples"], "check-samples (at least 2 for a standard error)", low=2)
    check_positive(o["lr"], "the local learning rate")
    tol = o["tol"]
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
    check_positive(o["start_spread"], "start_spread")
    check_positive(o["start_scale"], "start_scale")
    check_int(o["lr_decays"], "lr-decays", low=0)
    for name in ("path_derivative", "compile"):
        if not isinstance(o[name], bool):
            raise ConfigError(f"{name} must be True or False, got {o[name]!r}")
    if o["flow_hidden"] is not None:
        check_int(o["flow_hidden"], "flow-hidden")


def start_distribution(
    model: Callable[..., object],
    latent: Latent,
    *data: torch.Tensor,
    init: Callable[..., object] | torch.distributions.Distribution | str = "prior",
    draws: int = 2000,
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
        return moment_matched(
            latent_draws(model, latent, *data, num_samples=draws, streams=streams)
        )
    q, _ = guide_in_latent_space(init, latent, *data)  # type: ignore[arg-type]
    return (
        q
        if q is not None
        else moment_matched(
            latent_draws(model, latent, *data, guide=init, num_samples=draws, streams=streams)
        )
    )  # type: ignore[arg-type]


# ------------------------------------------------------------------ the convergence test


def check_log_weights(
    model: Callable[..., object],
    posterior: LocalPosterior,
    data: tuple[torch.Tensor, ...],
    rows: torch.Tensor | Sequence[int],
    streams: Streams,
    *,
    num_samples: int,
    nesting: int,
) -> torch.Tensor:
    """Log-weights ``[M, R]`` (float64) of the rows ``rows`` of ``posterior`` and ``data``, from their fixed check draws.

    The draws come from ``streams`` (one per row) and are put back after
    (:meth:`~ppl_vae.inference.random.Streams.replaying`): every call sees the
    same standard-normal noise, so two calls at different parameters are
    estimates with common random numbers. Rows are taken in chunks that keep
    the model's outputs under ``MAX_ELEMENTS``; no gradient is kept. Given as
    a sequence of ints, the rows are not read back from a device.
    """
    width = max(1, math.prod(data[0].shape[1:]))
    size = max(1, MAX_ELEMENTS // (num_samples * width))
    rows = host(rows) if isinstance(rows, torch.Tensor) else list(rows)
    out = []
    with torch.no_grad():
        for part in chunks(len(rows), size):
            picked = streams.select(rows[part])
            r = torch.tensor(rows[part], device=posterior.loc.device)
            with picked.replaying():
                args = tuple(t[r] for t in data)
                model_tr, guide_tr = traces(
                    model,
                    posterior.select(r),
                    *args,
                    num_samples=num_samples,
                    nesting=nesting,
                    streams=picked,
                )
            out.append(log_weights_of(model_tr, guide_tr).double())
    return torch.cat(out, 1)


def resampled_shifts(
    model: Callable[..., object],
    q: LocalPosterior,
    data: tuple[torch.Tensor, ...],
    streams: Streams,
    *,
    num: int,
    draws: int,
    site: str,
) -> torch.Tensor:
    r"""``[num, N, K]``: per datapoint, ``num`` draws of ``q`` resampled by importance weight, minus the mean of the draws.

    Sampling importance resampling (Rubin 1988): of ``draws`` draws :math:`u_k \sim q`, one is
    picked with probability proportional to :math:`p(x, u_k) / q(u_k)`, so it falls in a mode of the
    posterior in proportion to its mass, not in the valley between modes where ``q`` may be centred.
    The draws and the picks come from ``streams`` (one per datapoint); rows are taken in chunks that
    keep the model's outputs under ``MAX_ELEMENTS``.
    """
    n = q.num_points
    width = max(1, math.prod(data[0].shape[1:]))
    size = max(1, MAX_ELEMENTS // (draws * width))
    nesting = plate_nesting(model, q.select(slice(0, 1)), *(t[:1] for t in data))
    out = []
    with torch.no_grad():
        for part in chunks(n, size):
            rows = torch.arange(part.start, part.stop, device=q.loc.device)
            picked = streams.select(rows.tolist())
            args = tuple(t[rows] for t in data)
            model_tr, guide_tr = traces(
                model, q.select(rows), *args, num_samples=draws, nesting=nesting, streams=picked
            )
            lw = log_weights_of(model_tr, guide_tr).double()  # [draws, R]
            u = guide_tr.nodes[site]["value"].reshape(draws, len(rows), -1)
            cdf = torch.softmax(lw, 0).cumsum(0).T.contiguous()  # [R, draws]
            uniform = picked.uniform((len(rows), num), dim=0, dtype=torch.float64)
            at = torch.searchsorted(cdf, uniform).clamp_max(draws - 1)  # [R, num]
            chosen = u.permute(1, 0, 2).gather(
                1, at.unsqueeze(-1).expand(-1, -1, u.shape[-1])
            )  # [R, num, K]
            out.append((chosen - u.mean(0).unsqueeze(1)).transpose(0, 1))
    return torch.cat(out, 1)


def window_change(now: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The change of each row's ELBO between two checks and its standard error, from paired log-weights ``[M, R]``.

    .. math::

        \Delta = \frac{1}{M}\sum_m \left(\ell_m^{\text{now}} - \ell_m^{\text{before}}\right), \qquad
        \operatorname{SE} = \operatorname{sd}_m\left(\ell_m^{\text{now}} - \ell_m^{\text{before}}\right) / \sqrt{M},

    where both log-weights of draw :math:`m` come from the same noise (common
    random numbers): the noise they share cancels, so the SE shrinks with the
    distance between the two parameter values, not with the ELBO's own spread.
    """
    d = now - before
    return d.mean(0), d.std(0) / math.sqrt(d.shape[0])


def judge_window(
    change: torch.Tensor,
    se: torch.Tensor,
    gain: torch.Tensor,
    gain_se: torch.Tensor,
    decays: torch.Tensor,
    lr_decays: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(slower, done)``: rows whose step size is halved, rows that have converged.

    ``change`` is the last window's change of ELBO, ``gain`` the change since
    the step size was last halved (before the first halving: the window's
    change), each with its standard error. A window *shows progress* when its
    change is at least one standard error and at least ``tol / 10``; while it
    does, nothing changes. Without progress Adam is jittering around the
    optimum at its current step size, short of it by an excess that shrinks
    with the step size. Halving the step size then gains about that excess, so
    a row has converged when the gain since its last halving is below the
    tolerance by :data:`Z_CHECK` standard errors,
    :math:`G + z\,\operatorname{SE} < \mathrm{tol}`: what is left is smaller
    still. Otherwise its step size is halved again, up to ``lr_decays`` times
    (a row still gaining at its smallest step size stops at ``max_steps``,
    unconverged). Noise larger than the tolerance never counts as converged.
    With ``lr_decays = 0`` there is no halving: a window without progress whose
    change is below the tolerance, so judged, has converged.
    """
    stationary = change < torch.clamp_min(se, tol / 10)
    halved = decays > 0
    done = stationary & (gain + Z_CHECK * gain_se < tol) & (halved | (lr_decays == 0))
    return stationary & ~done & (decays < lr_decays), done


class LocalState(NamedTuple):
    """Where the rows :func:`optimize_local` still moves are: their parameters, Adam's moments and their checks (``[R]`` tensors unless said).

    A row is one (datapoint, start) pair. :func:`local_step` moves every row one step,
    :func:`check_window` judges a window; neither reads a value back to the host.
    """

    params: tuple[
        torch.Tensor, ...
    ]  # the rows' parameters (a LocalPosterior's, in its order), leaves that require grad
    exp_avg: tuple[torch.Tensor, ...]  # Adam's first moment of each parameter
    exp_avg_sq: tuple[torch.Tensor, ...]  # Adam's second moment
    step: int  # Adam's steps so far, the same for every row (its bias correction)
    scale: torch.Tensor  # float64: each row's step size, as a fraction of lr
    decays: torch.Tensor  # long: how many times each row's step size was halved
    bad: torch.Tensor  # long: the first step at which the row's ELBO was not finite (0: none)
    last_lw: torch.Tensor  # [M, R] float64: the check log-weights of the last check
    before_lw: torch.Tensor  # [M, R]: of the check before it
    anchor_lw: torch.Tensor  # [M, R]: of the row's last halving
    change: (
        torch.Tensor
    )  # float64: the gain judged at the last check (judge_window), NaN before the first
    change_se: torch.Tensor  # its standard error

    @classmethod
    def initial(cls, posterior: LocalPosterior, start_lw: torch.Tensor) -> LocalState:
        """The state of every row of ``posterior`` before its first step, its check log-weights ``start_lw`` ``[M, R]``."""
        params = tuple(posterior.parameters())
        r = posterior.num_points
        nan = start_lw.new_full((r,), math.nan)
        decays = torch.zeros(r, dtype=torch.long, device=start_lw.device)
        return cls(
            params,
            tuple(torch.zeros_like(p) for p in params),
            tuple(torch.zeros_like(p) for p in params),
            0,
            start_lw.new_ones(r),
            decays,
            decays.clone(),
            start_lw,
            start_lw,
            start_lw,
            nan,
            nan.clone(),
        )

    def take(self, keep: torch.Tensor, posterior: LocalPosterior) -> LocalState:
        """The state of the rows ``keep`` (an index tensor) only, whose parameters are now ``posterior``'s."""
        rows = [t[keep] for t in (self.scale, self.decays, self.bad, self.change, self.change_se)]
        lws = [t[:, keep] for t in (self.last_lw, self.before_lw, self.anchor_lw)]
        scale, decays, bad, change, change_se = rows
        return LocalState(
            tuple(posterior.parameters()),
            tuple(m[keep] for m in self.exp_avg),
            tuple(v[keep] for v in self.exp_avg_sq),
            self.step,
            scale,
            decays,
            bad,
            *lws,
            change,
            change_se,
        )


def local_objective(
    model: Callable[..., object],
    posterior: LocalPosterior,
    data: tuple[torch.Tensor, ...],
    streams: Streams,
    *,
    num_samples: int,
    nesting: int,
    site: str,
    stl: bool,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    r"""``objective()``: the log-weights ``[num_samples, R]`` of every row of ``posterior`` on ``data`` from the next draws of ``streams``, and the surrogate whose gradient is the step's.

    With ``stl`` the surrogate has the log-weights' value and the path-derivative gradient:
    :math:`\log q(u)` is differentiated through the draw ``u`` (at ``site``) only.
    """
    guide = posterior.select(slice(None))

    def objective() -> tuple[torch.Tensor, torch.Tensor]:
        model_tr, guide_tr = traces(
            model, guide, *data, num_samples=num_samples, nesting=nesting, streams=streams
        )
        lw = log_weights_of(model_tr, guide_tr)
        if not stl:
            return lw, lw
        u = guide_tr.nodes[site]["value"]
        return lw, lw + guide_tr.nodes[site]["fn"].log_prob(u) - posterior.distribution(
            detach=True
        ).log_prob(u)

    return objective


def adam_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    rate: torch.Tensor,
    correction: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    r"""Adam's update in place, row ``r`` of every parameter moved by step size ``rate[r]`` (float64, bias-corrected: ``lr / (1 - beta1^t)``).

    ``correction`` is the 0-d :math:`1 / \sqrt{1 - \beta_2^t}`. Elementwise, as ``torch.optim.Adam``:
    a row's update depends on its own gradient and moments only.
    """
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() * correction.to(v.dtype)).add_(eps)
        p.sub_(rate.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) * m / denom)


_COMPILED: list[Callable[..., None]] = []


def compiled_adam() -> Callable[..., None]:
    """:func:`adam_update` under ``torch.compile`` (compiled once a process, for each number and shape of parameters as met)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(adam_update, dynamic=True))
    return _COMPILED[0]


def local_step(
    state: LocalState,
    objective: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    update: Callable[..., None] = adam_update,
) -> LocalState:
    """One Adam step of every row: ``objective()`` (:func:`local_objective`) differentiated with respect to ``state.params``, moved by ``update``.

    A row whose log-weights are not all finite has the step's number recorded in ``bad`` (its
    first only); nothing is read back to the host.
    """
    lw, surrogate = objective()
    grads = torch.autograd.grad(-surrogate.mean(0).sum(), state.params, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(state.params, grads))
    step = state.step + 1
    bad = torch.where((state.bad == 0) & ~torch.isfinite(lw).all(0), step, state.bad)
    correction = torch.full(
        (), 1 / math.sqrt(1 - 0.999**step), dtype=torch.float64, device=state.scale.device
    )
    with torch.no_grad():
        update(
            state.params,
            grads,
            state.exp_avg,
            state.exp_avg_sq,
            state.scale * (lr / (1 - 0.9**step)),
            correction,
        )
    return state._replace(step=step, bad=bad)


def check_window(
    state: LocalState, now: torch.Tensor, *, lr_decays: int, tol: float
) -> tuple[LocalState, torch.Tensor]:
    """Judge the window that just ended from every row's check log-weights ``now`` ``[M, R]``: the new state, and ``done`` ``[R]`` (bool), the rows that converged.

    Progress over the last two windows (progress adds up, jitter does not) and the gain since
    the row's last halving (before its first: that progress) go to :func:`judge_window`; the rows
    it slows have their step size halved and their anchor moved to ``now``. Tensor operations
    only: nothing is read back to the host.
    """
    d, d_se = window_change(now, state.before_lw)
    g, g_se = window_change(now, state.anchor_lw)
    first_halving = state.decays == 0
    g, g_se = torch.where(first_halving, d, g), torch.where(first_halving, d_se, g_se)
    slower, done = judge_window(d, d_se, g, g_se, state.decays, lr_decays, tol)
    return state._replace(
        scale=torch.where(slower, state.scale / 2, state.scale),
        decays=state.decays + slower.long(),
        before_lw=state.last_lw,
        last_lw=now,
        anchor_lw=torch.where(slower, now, state.anchor_lw),
        change=g,
        change_se=g_se,
    ), done


def keep_best(lw: torch.Tensor, converged: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]``: the start each datapoint keeps, from every start's final log-weights ``lw`` ``[M, S, N]`` (the same noise for every start).

    The candidates are the starts whose ELBO is not below the highest by more than :data:`Z_CHECK`
    standard errors of the paired difference; of those, a converged one (``converged`` ``[S, N]``)
    before one that is not, then the one whose log-weights vary least. The highest of several noisy
    means alone would favour a noisier estimate over an exact one (near the posterior the variance of
    the log-weights is about twice the KL divergence, and vanishes with it).
    """
    n = lw.shape[2]
    cols = torch.arange(n, device=lw.device)
    top = lw.mean(0).argmax(0)
    gap, se = window_change(
        lw[:, top, cols].unsqueeze(1), lw
    )  # [S, N]: how far each start is below the top one
    spread = lw.var(0).masked_fill(gap - Z_CHECK * se > 0, math.inf)
    if converged is not None:  # a converged candidate, where there is one
        some = torch.isfinite(spread.masked_fill(~converged, math.inf)).any(0)
        spread = spread.masked_fill(~converged & some, math.inf)
    return spread.argmin(0)


def same_optimum(
    lw_a: torch.Tensor, lw_b: torch.Tensor, lw_mid: torch.Tensor, tol: float
) -> torch.Tensor:
    """``[N]`` bool: start b ended at the optimum start a did (a the better one).

    ``lw_a``, ``lw_b`` and ``lw_mid`` ``[M, N]``: log-weights from the same noise of the two starts'
    ``q*`` and of the one halfway between their parameters. Two tests, each beyond :data:`Z_CHECK`
    standard errors of a paired difference and ``tol``: b's ELBO is not lower than a's, and the
    ELBO halfway between them does not dip below b's (a hill-valley test: between two modes, or
    between a saddle and a mode, the path falls; along a flat ridge of one optimum it does not).
    """
    gap, gap_se = window_change(lw_a, lw_b)
    dip, dip_se = window_change(lw_b, lw_mid)
    return (gap - Z_CHECK * gap_se <= tol) & (dip - Z_CHECK * dip_se <= tol)


def distinct_optima(
    lw: torch.Tensor,
    midpoint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    eligible: torch.Tensor,
    tol: float,
    first: torch.Tensor,
) -> torch.Tensor:
    """``[S, N]`` bool: one start of each distinct optimum among the ``eligible`` starts (``[S, N]``).

    ``lw`` ``[M, S, N]``: every start's final log-weights (the same noise for every start);
    ``midpoint(a, b)`` the log-weights ``[M, N]`` (the same noise) of the parameters halfway
    between starts ``a`` and ``b`` ``[N]`` of each datapoint. The start ``first`` ``[N]`` (the
    kept one) is taken first, then the others best first (by mean ELBO); each joins the first kept
    one it is the :func:`same_optimum` as, or is kept as a new one.
    """
    S = lw.shape[1]
    score = lw.mean(0).scatter(0, first.unsqueeze(0), math.inf)
    order = score.argsort(0, descending=True)  # [S, N]
    cols = torch.arange(lw.shape[2], device=lw.device)
    kept = torch.zeros_like(eligible)
    for i in range(S):
        s = order[i]
        new = eligible[s, cols].clone()
        for j in range(i):
            r = order[j]
            same = same_optimum(lw[:, r, cols], lw[:, s, cols], midpoint(r, s), tol)
            new &= ~(kept[r, cols] & same)
        kept[s, cols] = new
    return kept


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
    lr_decays: int = 8,
    check_samples: int = 100,
    starts: int = 2,
    start_spread: float = 1.0,
    start_scale: float = 0.5,
    path_derivative: bool = True,
    num_flows: int = 2,
    flow_hidden: int | None = None,
    seed: int | None = 0,
    index: torch.Tensor | None = None,
    progress: bool = False,
    compile: bool = False,
) -> LocalFit:
    r"""Optimise a per-datapoint ``q*`` of ``family`` for every row of ``data``, in one batch, from ``starts`` starts.

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
        Every ``check_every`` steps each datapoint's ELBO is estimated from its
        ``check_samples`` fixed check draws (:func:`check_log_weights`). While
        the last two windows show progress nothing changes; without progress
        the step size is halved (up to ``lr_decays`` times), and a datapoint
        has converged when the ELBO gained since its last halving is below
        ``tol`` nats by :data:`Z_CHECK` standard errors of the paired
        difference (:func:`judge_window`). A datapoint still going at
        ``max_steps`` stops unconverged (``LocalFit.converged``). Each keeps its
        last parameters, unless their ELBO is below its start's by more than
        :data:`Z_CHECK` standard errors of the paired difference: then it goes
        back to its start, so a stochastic optimisation never leaves it worse
        than it began.
    check_samples : int
        Draws :math:`M` of each check (at least 2). They are the same at every
        check and for every start of a datapoint (common random numbers), so a
        change is measured with an error that shrinks with the change itself.
    starts : int
        Starts per datapoint: the init, and ``starts - 1`` copies of it with
        their scale times ``start_scale``, centred at draws of the init's
        Gaussian (a flow's base) with its scale times ``start_spread``. All
        are optimised in one batch; each datapoint keeps the best start
        (:func:`keep_best`), so a start on a
        saddle (a symmetric start between two modes, where the expected
        gradient is zero and no test can tell it from an optimum) does not
        decide ``q*``. Starts that end apart (:func:`distinct_optima`) are
        counted in ``LocalFit.optima``.
    start_spread, start_scale : float
        How far the extra starts are moved, in the init's standard deviations,
        and how much narrower than the init they start.
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
        of a datapoint (its start, its flow's initial weights, its starts'
        shifts, its steps' and checks' samples) comes from its own streams,
        seeded from ``(seed, index)`` (:class:`~ppl_vae.inference.random.Streams`),
        and its objective and Adam's update involve its own parameters only: a
        datapoint's ``q*`` does not depend on the other rows or their number
        (to float rounding).
    progress : bool
        A progress bar over the steps.
    compile : bool
        Run Adam's update (:func:`adam_update`) under ``torch.compile``: one
        fused kernel per parameter instead of about ten operations, which
        matters where each operation is a kernel launch; the first call
        compiles. Off by default (docs/gaps.md gives the measurement).

    The optimisation runs in windows of ``check_every`` steps: each step is
    :func:`local_step` (no value read back to the host), each window ends with
    :func:`check_window` and one read of the rows that converged and of any
    non-finite ELBO; converged rows then leave the batch.
    """
    given = locals()  # the arguments only, so far
    options = {k: given[k] for k in OPTIONS}
    check_options(**options)
    model, latent, init = _analysed_local(model, data, init)
    with seeded(seed):
        run = _local_run(model, latent, data, init, options, seed=seed, index=index)
        start_lw = run.evaluate(run.rows)
        start = [p.detach().clone() for p in run.posterior.parameters()]
        moved = _optimise(run, start_lw, progress=progress)
        final_lw = _settle(run, start_lw, start)
    return _local_fit(run, start_lw, final_lw, moved, options)


def _analysed_local(
    model: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    init: Callable[..., object] | torch.distributions.Distribution | str,
) -> tuple[
    Callable[..., object], Latent, Callable[..., object] | torch.distributions.Distribution | str
]:
    """The model and ``init`` as :func:`~ppl_vae.inference.traces.analysed` leaves them, and the model's joint latent; refuses an ``init`` string other than ``"prior"``."""
    if isinstance(init, str) and init != "prior":
        raise ConfigError(f"init must be a guide, a distribution or 'prior', got {init!r}")
    guide = (
        init if callable(init) and not isinstance(init, torch.distributions.Distribution) else None
    )
    model, guide = analysed(model, guide, data, "the local optimisation (q*)")  # type: ignore[assignment]
    init = guide if guide is not None else init
    latent = latent_of(model, *data, guide=guide, analysis="the local optimisation (q*)")
    return model, latent, init


@dataclass(frozen=True)
class _LocalRun:
    """What :func:`optimize_local` optimises: every (datapoint, start) row, start-major (row ``s * N + n`` is start ``s`` of datapoint ``n``), its draws and its options."""

    model: Callable[..., object]
    data: tuple[torch.Tensor, ...]  # the data, a row per (datapoint, start)
    posterior: LocalPosterior  # every row's parameters, where each row stopped
    n: int  # datapoints
    S: int  # starts per datapoint
    site: str  # where the guide draws u from q*
    streams: Streams  # the steps' draws: each start its own
    check: Streams  # the checks' draws: the same for every start of a datapoint
    final: Streams  # the final comparison's draws (FINAL_FACTOR times as many): the same for every start of a datapoint
    nesting: int
    options: dict  # optimize_local's options, checked

    @property
    def rows(self) -> torch.Tensor:
        """Every row's index ``[S * N]``."""
        return torch.arange(self.n * self.S, device=self.posterior.loc.device)

    def evaluate(self, rows: torch.Tensor) -> torch.Tensor:
        """The check log-weights ``[M, R]`` of ``rows`` (:func:`check_log_weights`, the same draws at every call)."""
        return check_log_weights(
            self.model,
            self.posterior,
            self.data,
            rows,
            self.check,
            num_samples=self.options["check_samples"],
            nesting=self.nesting,
        )


def _local_run(
    model: Callable[..., object],
    latent: Latent,
    data: tuple[torch.Tensor, ...],
    init: Callable[..., object] | torch.distributions.Distribution | str,
    options: dict,
    *,
    seed: int | None,
    index: torch.Tensor | None,
) -> _LocalRun:
    """Every datapoint's starts (:func:`start_distribution`, then :func:`_spread_starts`), frozen, with their data and streams."""
    n, S = latent.num_points, options["starts"]
    idx = dataset_index(index, n)
    device = data[0].device
    base = base_seed(seed)
    q0 = start_distribution(
        model, latent, *data, init=init, streams=Streams(base, idx, device, Tag.LOCAL, 0)
    )  # the start
    if tuple(q0.batch_shape) != (n,) or tuple(q0.event_shape) != (latent.dim,):
        raise ConfigError(
            f"the initial distribution must have batch shape ({n},) and event shape ({latent.dim},), got {tuple(q0.batch_shape)} and {tuple(q0.event_shape)}"
        )
    first = LocalPosterior.initial(
        options["family"],
        q0,
        latent,
        num_flows=options["num_flows"],
        flow_hidden=options["flow_hidden"],
        normal=Streams(base, idx, device, Tag.LOCAL, 1).normal,
        generator=torch.Generator(device="cpu").manual_seed(base),
    )
    # row r is start r // n of datapoint r % n
    point = torch.arange(n, device=first.loc.device).repeat(S)
    posterior = first.take(point)
    site = latent.sites[0].name if latent.plain else AUX_SITE  # where the guide draws u from q*
    if S > 1:
        _spread_starts(
            model, data, first, posterior, Streams(base, idx, device, Tag.LOCAL, 4), site, options
        )
    for p in posterior.parameters():
        p.requires_grad_(False)
    data = tuple(t[point.to(t.device)] for t in data)
    return _LocalRun(
        model=model,
        data=data,
        posterior=posterior,
        n=n,
        S=S,
        site=site,
        streams=Streams(
            base, [int(i) * S + s for s in range(S) for i in idx], device, Tag.LOCAL, 2, S
        ),
        check=Streams(base, idx.repeat(S), device, Tag.LOCAL, 3),
        final=Streams(base, idx.repeat(S), device, Tag.LOCAL, 5),
        nesting=plate_nesting(model, posterior.select(slice(0, 1)), *(t[:1] for t in data)),
        options=options,
    )


def _spread_starts(
    model: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    first: LocalPosterior,
    posterior: LocalPosterior,
    resample: Streams,
    site: str,
    options: dict,
) -> None:
    """Make rows ``N..`` of ``posterior`` the other starts, in place: narrowed copies of the init, centred at posterior draws resampled from the (widened) init."""
    n, S = first.num_points, options["starts"]
    shift = resampled_shifts(
        model,
        first.widened(options["start_spread"]),
        data,
        resample,
        num=S - 1,
        draws=options["check_samples"],
        site=site,
    )
    point = torch.arange(n, device=first.loc.device).repeat(S - 1)
    narrow = dict(first.widened(options["start_scale"]).take(point).named_parameters())
    with torch.no_grad():
        for name, p in posterior.named_parameters():
            p[n:] = narrow[name]
        posterior.loc[n:] += shift.reshape((S - 1) * n, -1).to(posterior.loc.dtype)


class _Moved(NamedTuple):
    """How the optimisation of each row went (``[S * N]``)."""

    active: torch.Tensor  # bool: still moving at max_steps (not converged)
    steps: torch.Tensor  # Adam steps taken
    scale: torch.Tensor  # float64: the final step size, as a fraction of lr
    change: torch.Tensor  # float64: the gain judged at the last check
    change_se: torch.Tensor  # its standard error


def _optimise(run: _LocalRun, start_lw: torch.Tensor, *, progress: bool) -> _Moved:
    """Move every row in windows of ``check_every`` steps (:func:`_window`) until it converges or ``max_steps``; converged rows leave the batch."""
    o = run.options
    like = run.posterior.loc
    moving = list(
        range(run.n * run.S)
    )  # the rows still optimised, on the host: they change only at a check
    work = run.posterior.take(run.rows)  # their parameters, row i of it is row moving[i]
    state = LocalState.initial(work, start_lw)
    steps = [0] * (run.n * run.S)
    scale = like.new_ones(run.n * run.S, dtype=torch.float64)
    change = like.new_full((run.n * run.S,), math.nan, dtype=torch.float64)
    change_se = like.new_full((run.n * run.S,), math.nan, dtype=torch.float64)
    update = compiled_adam() if o["compile"] else adam_update
    step = 0
    # no distribution checks a value per step (each would read it back): a bad value shows as a non-finite ELBO, read once a window
    with (
        bar(total=o["max_steps"], desc=f"q* {o['family']}", unit="step", enabled=progress) as shown,
        pyro.validation_enabled(False),
    ):
        while moving and step < o["max_steps"]:
            window = min(o["check_every"], o["max_steps"] - step)
            where = torch.tensor(moving, device=like.device)
            step += window
            state, done = _window(
                run, work, state, moving, where, window, step % o["check_every"] == 0, update, shown
            )
            stopped, bad = host(torch.stack((done.long(), state.bad)))  # the window's one read
            if any(bad):
                raise ConfigError(
                    f"local optimisation of the {o['family']} family hit a non-finite ELBO at step {min(b for b in bad if b)}; lower lr"
                )
            with torch.no_grad():
                for p, q in zip(run.posterior.parameters(), work.parameters()):
                    p.index_copy_(0, where, q.detach())
                for kept, now in zip(
                    (scale, change, change_se), (state.scale, state.change, state.change_se)
                ):
                    kept.index_copy_(0, where, now)
            for r in moving:
                steps[r] += window
            keep = [i for i, s in enumerate(stopped) if not s]
            if len(keep) < len(
                moving
            ):  # converged rows leave the batch, their parameters kept in posterior
                moving = [moving[i] for i in keep]
                if moving:
                    kept = torch.tensor(keep, device=like.device)
                    work = work.take(kept)
                    state = state.take(kept, work)
                shown.set_postfix_str(
                    f"{len(moving)} of {run.n * run.S} (datapoint, start) pairs still moving",
                    refresh=False,
                )
    active = torch.zeros(run.n * run.S, dtype=torch.bool, device=like.device)
    active[moving] = True
    return _Moved(active, torch.tensor(steps, device=like.device), scale, change, change_se)


def _window(
    run: _LocalRun,
    work: LocalPosterior,
    state: LocalState,
    moving: list[int],
    where: torch.Tensor,
    window: int,
    checked: bool,
    update: Callable[..., None],
    shown: object,
) -> tuple[LocalState, torch.Tensor]:
    """``window`` steps (:func:`local_step`) of the rows ``moving`` (parameters ``work``), then, where ``checked``, :func:`check_window`: the new state and the rows that converged."""
    o = run.options
    args = tuple(t[where.to(t.device)] for t in run.data)
    objective = local_objective(
        run.model,
        work,
        args,
        run.streams.select(moving),
        num_samples=o["num_samples"],
        nesting=run.nesting,
        site=run.site,
        stl=o["path_derivative"] and o["family"] != "flow",
    )
    for _ in range(window):
        state = local_step(state, objective, lr=o["lr"], update=update)
        shown.update()  # type: ignore[attr-defined]
    if not checked:  # max_steps ended the window before its check
        return state, torch.zeros(len(moving), dtype=torch.bool, device=where.device)
    now = check_log_weights(
        run.model,
        work,
        args,
        range(len(moving)),
        run.check.select(moving),
        num_samples=o["check_samples"],
        nesting=run.nesting,
    )
    return check_window(state, now, lr_decays=o["lr_decays"], tol=o["tol"])


def _settle(run: _LocalRun, start_lw: torch.Tensor, start: list[torch.Tensor]) -> torch.Tensor:
    """Send each row clearly worse than its start back to it; every row's final log-weights ``[FINAL_FACTOR * M, S * N]``, the same draws for every start of a datapoint."""
    params = list(run.posterior.parameters())
    with torch.no_grad():
        final_lw = run.evaluate(
            run.rows
        )  # where each row stopped, from the same draws as every check
        gain, gain_se = window_change(final_lw, start_lw)
        back = (
            gain + Z_CHECK * gain_se < 0
        )  # clearly worse than where it started: back to the start
        for p, b in zip(params, start):
            p.copy_(torch.where(back.view(-1, *([1] * (p.dim() - 1))), b, p))
        final_lw = check_log_weights(
            run.model,
            run.posterior,
            run.data,
            run.rows,
            run.final,
            num_samples=FINAL_FACTOR * run.options["check_samples"],
            nesting=run.nesting,
        )
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return final_lw


def _midpoint(run: _LocalRun, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Log-weights (the final draws) of the parameters halfway between starts ``a`` and ``b`` ``[N]`` of each datapoint."""
    cols = torch.arange(run.n, device=a.device)
    mid = run.posterior.take(a * run.n + cols)
    for p, q in zip(mid.parameters(), run.posterior.take(b * run.n + cols).parameters()):
        p.add_(q).div_(2)
    return check_log_weights(
        run.model,
        mid,
        run.data,
        cols,
        run.final,
        num_samples=FINAL_FACTOR * run.options["check_samples"],
        nesting=run.nesting,
    )


def _local_fit(
    run: _LocalRun, start_lw: torch.Tensor, final_lw: torch.Tensor, moved: _Moved, options: dict
) -> LocalFit:
    """The report: each datapoint keeps its best start (:func:`keep_best`), its distinct optima counted (:func:`distinct_optima`)."""
    n, S, M = run.n, run.S, final_lw.shape[0]
    converged = ~moved.active
    by_start = final_lw.view(M, S, n)
    best = keep_best(by_start, converged.view(S, n))
    keep = best * n + torch.arange(n, device=best.device)
    eligible = converged.view(S, n).clone()
    eligible[best, torch.arange(n, device=best.device)] = (
        True  # the kept start counts even where it did not converge
    )
    with torch.no_grad():
        modes = distinct_optima(
            by_start, functools.partial(_midpoint, run), eligible, options["tol"], best
        )
    dtype = run.posterior.loc.dtype
    final = final_lw[:, keep]
    return LocalFit(
        posterior=run.posterior.take(keep),
        steps=moved.steps[keep],
        converged=converged[keep],
        initial_elbo=start_lw[:, :n].mean(0).to(dtype),
        final_elbo=final.mean(0).to(dtype),
        final_elbo_se=(final.std(0) / math.sqrt(M)).to(dtype),
        final_change=moved.change[keep].to(dtype),
        final_change_se=moved.change_se[keep].to(dtype),
        lr_scale=moved.scale[keep].to(dtype),
        start_elbo=by_start.mean(0).to(dtype),
        start_converged=converged.view(S, n),
        optima=modes.sum(0),
        modes=modes,
        candidates=run.posterior,
        options={
            k: v for k, v in options.items() if k not in ("num_flows", "flow_hidden", "compile")
        },
    )
