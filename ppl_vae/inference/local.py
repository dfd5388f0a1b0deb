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

import pyro
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

__all__ = ["FAMILIES", "BatchedMADE", "LocalPosterior", "LocalFit", "optimize_local", "guide_distribution", "family_of"]

FAMILIES = ("diagonal", "full", "flow")


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def guide_distribution(guide: Callable[..., object], *data: torch.Tensor, site: str = "z") -> torch.distributions.Distribution:
    """The distribution a guide draws latent ``site`` from, for the rows of ``data``."""
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(guide).get_trace(*data)
    if site not in tr.nodes or tr.nodes[site]["type"] != "sample":
        raise ConfigError(f"the guide has no latent site {site!r}")
    fn = tr.nodes[site]["fn"]
    return fn


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

    def __init__(self, num_points: int, latent_dim: int, hidden: int, permutation: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        if masks is None:
            masks = tuple(create_mask(latent_dim, 0, [hidden], permutation, 2)[0])
        self.register_buffer("mask0", masks[0].clone())
        self.register_buffer("mask1", masks[1].clone())
        self.register_buffer("permutation", permutation)
        self.latent_dim = latent_dim
        self.w0 = nn.Parameter(torch.randn(num_points, hidden, latent_dim) / math.sqrt(latent_dim))
        self.b0 = nn.Parameter(torch.zeros(num_points, hidden))
        self.w1 = nn.Parameter(torch.zeros(num_points, 2 * latent_dim, hidden))  # zero: starts at the identity
        self.b1 = nn.Parameter(torch.zeros(num_points, 2 * latent_dim))

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
        new = cls(h.shape[0], net.input_dim, first.out_features, net.permutation.clone(), masks)
        n = h.shape[0]
        with torch.no_grad():
            new.w0.copy_(w[:, ctx:].expand(n, -1, -1))
            new.b0.copy_(h @ w[:, :ctx].T + first.bias)
            new.w1.copy_((last.weight * last.mask).expand(n, -1, -1))
            new.b1.copy_(last.bias.expand(n, -1))
        return new


class LocalPosterior(nn.Module):
    """Per-datapoint variational parameters of one family for ``N`` datapoints; calling it is a guide.

    ``posterior(x)`` samples ``site`` for the rows of ``x`` (which must be the
    ``N`` datapoints, in order); ``posterior.select(rows)`` is the guide of a
    subset, which :func:`~ppl_vae.inference.importance_bounds` uses to chunk.
    """

    def __init__(self, family: str, loc: torch.Tensor, scale: torch.Tensor, *, site: str = "z", scale_tril: torch.Tensor | None = None, flows: list[BatchedMADE] | None = None, clamp: tuple[float, float] = (-5.0, 3.0)) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        self.family, self.site, self.clamp = family, site, clamp
        self.loc = nn.Parameter(loc.detach().clone())
        if family == "full":
            tril = scale_tril if scale_tril is not None else torch.diag_embed(scale)
            d = loc.shape[-1]
            self.register_buffer("_off", torch.tril_indices(d, d, offset=-1), persistent=False)
            self.raw_diag = nn.Parameter(_inv_softplus(tril.diagonal(dim1=-2, dim2=-1).detach().clamp_min(1e-6)))
            self.offdiag = nn.Parameter(tril[..., self._off[0], self._off[1]].detach().clone())
        else:
            self.raw_scale = nn.Parameter(_inv_softplus(scale.detach().clamp_min(1e-6)))
        self.flows = nn.ModuleList(flows or [])

    @property
    def num_points(self) -> int:
        return self.loc.shape[0]

    def distribution(self, rows: slice | torch.Tensor = slice(None)) -> torch.distributions.Distribution:
        """``q*`` of the datapoints ``rows``: batch shape ``[len(rows)]``, event ``[d]``."""
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

    def select(self, rows: slice | torch.Tensor) -> _Rows:
        """The guide of the datapoints ``rows`` only (itself cut further by ``select``)."""
        return _Rows(self, torch.arange(self.num_points)[rows])

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        self.select(slice(None))(x, *args)

    @classmethod
    def initial(cls, family: str, q: torch.distributions.Distribution, *, site: str = "z", num_flows: int = 2, flow_hidden: int | None = None, seed_draws: int = 2000) -> LocalPosterior:
        """Start ``q*`` of ``family`` at (or, across families, near) a batch of distributions ``q``.

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
                return cls("flow", base.mean, base.stddev, site=site, flows=flows, clamp=clamp)
            if source == "full":
                loc, tril = q.loc, q.scale_tril
            elif source == "diagonal":
                loc, tril = q.mean, torch.diag_embed(q.stddev)
            else:  # moment-match from draws, taken in chunks so memory stays bounded
                total = second = None
                for k in range(0, seed_draws, 100):
                    raw = q.sample((min(100, seed_draws - k),))
                    draws = raw.double()
                    s1, s2 = draws.sum(0), torch.einsum("snd,sne->nde", draws, draws)
                    total, second = (s1, s2) if total is None else (total + s1, second + s2)
                loc = total / seed_draws
                cov = (second - seed_draws * loc.unsqueeze(-1) * loc.unsqueeze(-2)) / (seed_draws - 1)
                tril = torch.linalg.cholesky(cov + 1e-6 * torch.eye(loc.shape[-1], dtype=cov.dtype)).to(raw.dtype)
                loc = loc.to(raw.dtype)
            scale = tril.diagonal(dim1=-2, dim2=-1) if family == "full" else (tril @ tril.mT).diagonal(dim1=-2, dim2=-1).sqrt()
            if family == "full":
                return cls("full", loc, scale, site=site, scale_tril=tril)
            if family == "diagonal":
                return cls("diagonal", loc, scale, site=site)
            n, d = loc.shape
            hidden = flow_hidden if flow_hidden is not None else 2 * d
            if hidden < d or d < 2:
                raise ConfigError(f"a local flow needs latent dim >= 2 and hidden width >= latent dim, got {d} and {hidden}")
            flows = [BatchedMADE(n, d, hidden, torch.randperm(d)) for _ in range(num_flows)]
            return cls("flow", loc, scale, site=site, flows=flows)


class _Rows:
    """The guide of some datapoints of a :class:`LocalPosterior`."""

    def __init__(self, posterior: LocalPosterior, index: torch.Tensor) -> None:
        self.posterior, self.index = posterior, index

    def select(self, rows: slice | torch.Tensor) -> _Rows:
        return _Rows(self.posterior, self.index[rows])

    def __call__(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        if len(self.index) != x.shape[0]:
            raise ConfigError(f"this local posterior covers {len(self.index)} datapoints, the guide got {x.shape[0]}")
        with pyro.plate("data", x.shape[0]):
            pyro.sample(self.posterior.site, self.posterior.distribution(self.index))


@dataclass(frozen=True)
class LocalFit:
    """The optimised :class:`LocalPosterior` and how each datapoint's optimisation went."""

    posterior: LocalPosterior
    steps: torch.Tensor  # [N] Adam steps taken by each datapoint
    converged: torch.Tensor  # [N] bool: stopped by its own test (else by max_steps)
    initial_elbo: torch.Tensor  # [N] window-mean ELBO of the first check window
    final_elbo: torch.Tensor  # [N] ELBO estimate of the kept (best) parameters: start or a check window's mean
    options: dict = field(default_factory=dict)


def optimize_local(
    model: Callable[..., object],
    *data: torch.Tensor,
    family: str = "diagonal",
    init: Callable[..., object] | torch.distributions.Distribution | str = "prior",
    site: str = "z",
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
        A model written the ppl-vae way; its parameters are not changed.
    *data : torch.Tensor
        The model's arguments (rows = datapoints).
    family : {"diagonal", "full", "flow"}
        The variational family of ``q*``.
    init : guide, distribution or "prior"
        Where to start: an amortised guide (its distribution for each row),
        a batch of distributions, or the model's prior at ``site``.
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
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    for name, value in (("num_samples", num_samples), ("max_steps", max_steps), ("check_every", check_every)):
        if value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    n = data[0].shape[0]
    with seeded(seed):
        if isinstance(init, str):
            if init != "prior":
                raise ConfigError(f"init must be a guide, a distribution or 'prior', got {init!r}")
            with poutine.block(), torch.no_grad():
                prior = poutine.trace(model).get_trace(*data).nodes.get(site)
            if prior is None or prior["type"] != "sample" or prior["is_observed"]:
                raise ConfigError(f"the model has no latent site {site!r}")
            q0 = dist.Normal(prior["fn"].mean, prior["fn"].stddev).to_event(1)
        elif isinstance(init, torch.distributions.Distribution):
            q0 = init
        else:
            q0 = guide_distribution(init, *data, site=site)
        if q0.batch_shape != (n,):
            raise ConfigError(f"the initial distribution has batch shape {tuple(q0.batch_shape)}, expected ({n},)")
        posterior = LocalPosterior.initial(family, q0, site=site, num_flows=num_flows, flow_hidden=flow_hidden)
        params = list(posterior.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        nesting = plate_nesting(model, posterior.select(slice(0, 1)), *(t[:1] for t in data))
        frozen = [p.detach().clone() for p in params]
        best = [p.detach().clone() for p in params]  # each datapoint's best parameters seen at a check
        best_mean = importance_bounds(model, posterior, *data, num_samples=min(num_samples * check_every, 1000), seed=None).elbo
        active = torch.ones(n, dtype=torch.bool)
        steps = torch.zeros(n, dtype=torch.long)
        window = torch.zeros(n, dtype=torch.float64)
        previous = torch.full((n,), -math.inf, dtype=torch.float64)
        first = torch.full((n,), math.nan, dtype=torch.float64)
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
