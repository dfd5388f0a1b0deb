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
on its own parameters, so this equals ``N`` separate optimisations (with other
random draws) at the cost of one batched program. Each datapoint has its own
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

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn.auto_reg_nn import create_mask
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .bounds import importance_bounds, seeded
from .elbo import log_weights, plate_nesting
from .latent import Latent, LatentGuide, guide_in_latent_space, latent_draws, latent_of, moment_matched

__all__ = ["FAMILIES", "BatchedMADE", "LocalPosterior", "LocalFit", "optimize_local", "check_options", "start_distribution", "family_of"]

FAMILIES = ("diagonal", "full", "flow")


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _flow_parts(q: torch.distributions.Distribution) -> tuple[torch.distributions.Distribution, list[AffineAutoregressive]] | None:
    if isinstance(q, torch.distributions.TransformedDistribution) and q.transforms and all(
        isinstance(t, AffineAutoregressive) for t in q.transforms
    ):
        return q.base_dist, list(q.transforms)
    return None


def family_of(q: torch.distributions.Distribution) -> str | None:
    """``"diagonal"``, ``"full"`` or ``"flow"``: the family of a guide's distribution (``None`` if other)."""
    base = q.base_dist if isinstance(q, dist.Independent) else q
    if isinstance(base, dist.Normal) and q.event_dim == 1:
        return "diagonal"
    if isinstance(q, dist.MultivariateNormal):
        return "full"
    if _flow_parts(q) is not None:
        return "flow"
    return None


class BatchedMADE(nn.Module):
    """A one-hidden-layer MADE with separate weights per datapoint: ``z [S, N, d] -> (mean, log_scale)``.

    Masks come from Pyro's :func:`pyro.nn.auto_reg_nn.create_mask` (or are
    copied from the conditional MADE it is made from), so the autoregressive
    order (``permutation``) means what it means in Pyro.
    """

    def __init__(self, num_points: int, latent_dim: int, hidden: int, permutation: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None, *, like: torch.Tensor | None = None) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        if masks is None:
            masks = tuple(m.to(**kw) for m in create_mask(latent_dim, 0, [hidden], permutation.cpu(), 2)[0])
        self.register_buffer("mask0", masks[0].clone())
        self.register_buffer("mask1", masks[1].clone())
        self.register_buffer("permutation", permutation)
        self.latent_dim = latent_dim
        self.w0 = nn.Parameter(torch.randn(num_points, hidden, latent_dim, **kw) / math.sqrt(latent_dim))
        self.b0 = nn.Parameter(torch.zeros(num_points, hidden, **kw))
        self.w1 = nn.Parameter(torch.zeros(num_points, 2 * latent_dim, hidden, **kw))  # zero: starts at the identity
        self.b1 = nn.Parameter(torch.zeros(num_points, 2 * latent_dim, **kw))

    def rows(self, idx: slice | torch.Tensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The network of the datapoints ``idx``, as the callable an ``AffineAutoregressive`` needs."""
        w0, b0 = self.w0[idx] * self.mask0, self.b0[idx]
        w1, b1 = self.w1[idx] * self.mask1, self.b1[idx]
        d = self.latent_dim

        def arn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lead = z.shape[:-2]  # draws: one batched matmul per datapoint over all of them
            zt = z.reshape(-1, *z.shape[-2:]).transpose(0, 1)  # [N, S, d]
            h = F.relu(torch.baddbmm(b0.unsqueeze(1), zt, w0.transpose(1, 2)))
            out = torch.baddbmm(b1.unsqueeze(1), h, w1.transpose(1, 2)).transpose(0, 1)  # [S, N, 2d]
            out = out.reshape(*lead, z.shape[-2], 2, d)
            return out[..., 0, :], out[..., 1, :]

        arn.permutation = self.permutation  # type: ignore[attr-defined]
        return arn

    @classmethod
    def from_conditional(cls, transform: AffineAutoregressive) -> BatchedMADE:
        """Copy an amortised IAF step conditioned on features ``h`` ``[N, H]`` (see the module docstring)."""
        cond = transform.arn
        net, h = cond.func, cond.keywords["context"]
        if len(net.layers) != 2 or net.skip_layer is not None or net.output_multiplier != 2 or not isinstance(net.f, nn.ReLU):
            raise ConfigError("only one-hidden-layer ReLU conditional MADEs without skip connections can be copied")
        first, last = net.layers
        ctx = net.context_dim
        w = first.weight * first.mask
        masks = (first.mask[:, ctx:], last.mask)  # a conditional MADE's input degrees differ from an unconditional one's
        new = cls(h.shape[0], net.input_dim, first.out_features, net.permutation.clone(), masks, like=h)
        n = h.shape[0]
        with torch.no_grad():
            new.w0.copy_(w[:, ctx:].expand(n, -1, -1))
            new.b0.copy_(h @ w[:, :ctx].T + first.bias)
            new.w1.copy_((last.weight * last.mask).expand(n, -1, -1))
            new.b1.copy_(last.bias.expand(n, -1))
        return new


class LocalPosterior(nn.Module):
    """Per-datapoint variational parameters of one family over the latent ``u`` of ``N`` datapoints; calling it is a guide.

    The family is a distribution over the model's whole latent state in
    unconstrained space (:class:`~ppl_vae.inference.latent.Latent`);
    ``posterior(x)`` emits the model's sites for the rows of ``x`` (which must
    be the ``N`` datapoints, in order) through
    :class:`~ppl_vae.inference.latent.LatentGuide`; ``posterior.select(rows)``
    is the guide of a subset, which :func:`~ppl_vae.inference.importance_bounds`
    uses to chunk.
    """

    def __init__(self, family: str, latent: Latent, loc: torch.Tensor, scale: torch.Tensor, *, scale_tril: torch.Tensor | None = None, flows: list[BatchedMADE] | None = None, clamp: tuple[float, float] = (-5.0, 3.0)) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        self.family, self.latent, self.clamp = family, latent, clamp
        self.loc = nn.Parameter(loc.detach().clone())
        if family == "full":
            tril = scale_tril if scale_tril is not None else torch.diag_embed(scale)
            d = loc.shape[-1]
            self.register_buffer("_off", torch.tril_indices(d, d, offset=-1, device=loc.device), persistent=False)
            self.raw_diag = nn.Parameter(_inv_softplus(tril.diagonal(dim1=-2, dim2=-1).detach().clamp_min(1e-6)))
            self.offdiag = nn.Parameter(tril[..., self._off[0], self._off[1]].detach().clone())
        else:
            self.raw_scale = nn.Parameter(_inv_softplus(scale.detach().clamp_min(1e-6)))
        self.flows = nn.ModuleList(flows or [])

    @property
    def num_points(self) -> int:
        return self.loc.shape[0]

    def distribution(self, rows: slice | torch.Tensor = slice(None)) -> torch.distributions.Distribution:
        """``q*`` of the datapoints ``rows`` over ``u``: batch shape ``[len(rows)]``, event ``[K]``."""
        loc = self.loc[rows]
        if self.family == "full":
            tril = torch.diag_embed(F.softplus(self.raw_diag[rows]) + 1e-6)
            tril[..., self._off[0], self._off[1]] = self.offdiag[rows]
            return dist.MultivariateNormal(loc, scale_tril=tril)
        base = dist.Normal(loc, F.softplus(self.raw_scale[rows]) + 1e-6).to_event(1)
        if self.family == "diagonal":
            return base
        lo, hi = self.clamp
        steps = [AffineAutoregressive(f.rows(rows), log_scale_min_clip=lo, log_scale_max_clip=hi) for f in self.flows]
        return dist.TransformedDistribution(base, steps)

    def select(self, rows: slice | torch.Tensor) -> LatentGuide:
        """The guide of the datapoints ``rows`` only (itself cut further by ``select``)."""
        return LatentGuide(self.latent, self.distribution, torch.arange(self.num_points, device=self.loc.device)[rows])

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        self.select(slice(None))(x, *args)

    @classmethod
    def initial(cls, family: str, q: torch.distributions.Distribution, latent: Latent, *, num_flows: int = 2, flow_hidden: int | None = None, seed_draws: int = 2000) -> LocalPosterior:
        """Start ``q*`` of ``family`` at (or, across families, near) a batch of distributions ``q`` over ``u``.

        Same family: copied exactly (a flow's MADEs included). Otherwise the
        Gaussian part is moment-matched (from draws when ``q`` is a flow) and
        flow steps start at the identity.
        """
        if family not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        source = family_of(q)
        parts = _flow_parts(q)
        with torch.no_grad():
            if family == "flow" and parts is not None:
                base, steps = parts
                flows = [BatchedMADE.from_conditional(t) for t in steps]
                clamp = (steps[0].log_scale_min_clip, steps[0].log_scale_max_clip)
                return cls("flow", latent, base.mean, base.stddev, flows=flows, clamp=clamp)
            if source == "full":
                loc, tril = q.loc, q.scale_tril
            elif source == "diagonal":
                loc, tril = q.mean, torch.diag_embed(q.stddev)
            else:  # moment-match from draws, taken in chunks so memory stays bounded
                mm = moment_matched(torch.cat([q.sample((min(100, seed_draws - k),)) for k in range(0, seed_draws, 100)]))
                loc, tril = mm.loc, mm.scale_tril
            scale = tril.diagonal(dim1=-2, dim2=-1) if family == "full" else (tril @ tril.mT).diagonal(dim1=-2, dim2=-1).sqrt()
            if family == "full":
                return cls("full", latent, loc, scale, scale_tril=tril)
            if family == "diagonal":
                return cls("diagonal", latent, loc, scale)
            n, d = loc.shape
            hidden = flow_hidden if flow_hidden is not None else 2 * d
            if hidden < d or d < 2:
                raise ConfigError(f"a local flow needs a latent of size >= 2 and hidden width >= that size, got {d} and {hidden}")
            flows = [BatchedMADE(n, d, hidden, torch.randperm(d, device=loc.device), like=loc) for _ in range(num_flows)]
            return cls("flow", latent, loc, scale, flows=flows)


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
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the local learning rate must be a positive number, got {lr!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a non-negative number, got {tol!r}")
    if flow_hidden is not None and (not isinstance(flow_hidden, int) or flow_hidden < 1):
        raise ConfigError(f"flow-hidden must be a positive integer, got {flow_hidden!r}")


def start_distribution(
    model: Callable[..., object], latent: Latent, *data: torch.Tensor, init: Callable[..., object] | torch.distributions.Distribution | str = "prior", draws: int = 2000
) -> torch.distributions.Distribution:
    """A batch of distributions over the joint latent ``u`` (batch ``[N]``, event ``[K]``) to start ``q*`` from.

    A distribution is returned as it is; a guide exactly where it is one
    (:func:`~ppl_vae.inference.latent.guide_in_latent_space`), else the
    Gaussian with the moments of ``draws`` of its draws; ``"prior"``: the
    prior's Gaussian where the model has one Gaussian site, else the moments
    of prior draws.
    """
    if isinstance(init, torch.distributions.Distribution):
        return init
    if init == "prior":
        if latent.plain:
            with poutine.block(), torch.no_grad():
                fn = poutine.trace(model).get_trace(*data).nodes[latent.names[0]]["fn"]
            if family_of(fn) in ("diagonal", "full"):
                return fn
        return moment_matched(latent_draws(model, latent, *data, num_samples=draws))
    q, _ = guide_in_latent_space(init, latent, *data)  # type: ignore[arg-type]
    return q if q is not None else moment_matched(latent_draws(model, latent, *data, guide=init, num_samples=draws))  # type: ignore[arg-type]


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
    """
    check_options(family=family, num_samples=num_samples, lr=lr, max_steps=max_steps, check_every=check_every, tol=tol, num_flows=num_flows)
    if isinstance(init, str) and init != "prior":
        raise ConfigError(f"init must be a guide, a distribution or 'prior', got {init!r}")
    guide = init if callable(init) and not isinstance(init, torch.distributions.Distribution) else None
    latent = latent_of(model, *data, guide=guide, analysis="the local optimisation (q*)")
    n = latent.num_points
    with seeded(seed):
        q0 = start_distribution(model, latent, *data, init=init)
        if tuple(q0.batch_shape) != (n,) or tuple(q0.event_shape) != (latent.dim,):
            raise ConfigError(f"the initial distribution must have batch shape ({n},) and event shape ({latent.dim},), got {tuple(q0.batch_shape)} and {tuple(q0.event_shape)}")
        posterior = LocalPosterior.initial(family, q0, latent, num_flows=num_flows, flow_hidden=flow_hidden)
        params = list(posterior.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        nesting = plate_nesting(model, posterior.select(slice(0, 1)), *(t[:1] for t in data))
        frozen = [p.detach().clone() for p in params]
        best = [p.detach().clone() for p in params]  # each datapoint's best parameters seen at a check
        best_mean = importance_bounds(model, posterior, *data, num_samples=min(num_samples * check_every, 1000), seed=None).elbo
        like = posterior.loc
        active = torch.ones(n, dtype=torch.bool, device=like.device)
        steps = torch.zeros(n, dtype=torch.long, device=like.device)
        window = like.new_zeros(n, dtype=torch.float64)
        previous = like.new_full((n,), -math.inf, dtype=torch.float64)
        first = like.new_full((n,), math.nan, dtype=torch.float64)
        for step in range(1, max_steps + 1):
            idx = active.nonzero().squeeze(-1)
            lw = log_weights(model, posterior.select(idx), *(t[idx] for t in data), num_samples=num_samples, nesting=nesting)
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
                steps[idx] += 1
                window[idx] += per_point.detach().double()
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
    return LocalFit(posterior, steps, converged, first.float(), best_mean.float(), options)
