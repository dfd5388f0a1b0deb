"""Per-datapoint variational families over the joint latent: diagonal, full-covariance, flow.

:class:`LocalPosterior` holds the variational parameters of ``N``
datapoints, with a leading ``[N]`` dimension; calling it is a guide.
``"flow"`` pushes a Gaussian through inverse autoregressive flow steps whose
MADE weights are the datapoint's own (:class:`BatchedMADE`, plugged into
Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive`).
Started from an amortised :class:`~ppl_vae.guides.IAFEncoder`, it copies the
encoder's weights and folds the context term :math:`W_h h(x_n)` into
datapoint ``n``'s first-layer bias, so it starts exactly at the encoder's
:math:`q`. :func:`ppl_vae.inference.optimize_local` fits them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn.auto_reg_nn import create_mask
from torch import nn
from torch.nn import functional as F

from ..distributions import Noise, gaussian_base, gaussian_draw, noise_draw, noise_leaf
from ..errors import ConfigError
from .latent import Latent, LatentGuide, moment_matched

__all__ = ["family_of", "BatchedMADE", "LocalPosterior", "LocalMixture", "Mixture", "Normal"]

#: a source of standard-normal noise: ``normal(shape, dim, dtype)`` with the datapoints along ``dim``
#: (e.g. :meth:`ppl_vae.inference.random.Streams.normal`, one stream per datapoint)
Normal = Callable[[tuple[int, ...], int, torch.dtype], torch.Tensor]

FAMILIES = ("diagonal", "full", "flow")


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _flow_parts(
    q: torch.distributions.Distribution,
) -> tuple[torch.distributions.Distribution, list[AffineAutoregressive]] | None:
    if (
        isinstance(q, torch.distributions.TransformedDistribution)
        and q.transforms
        and all(isinstance(t, AffineAutoregressive) for t in q.transforms)
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

    def __init__(
        self,
        num_points: int,
        latent_dim: int,
        hidden: int,
        permutation: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        like: torch.Tensor | None = None,
        w0: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        if masks is None:
            with torch.device("cpu"):  # Pyro's create_mask takes no device
                masks = tuple(
                    m.to(**kw)
                    for m in create_mask(latent_dim, 0, [hidden], permutation.cpu(), 2)[0]
                )
        self.register_buffer("mask0", masks[0].clone())
        self.register_buffer("mask1", masks[1].clone())
        self.register_buffer("permutation", permutation)
        self.latent_dim = latent_dim
        self.w0 = nn.Parameter(
            w0.detach().clone()
            if w0 is not None
            else torch.randn(num_points, hidden, latent_dim, **kw) / math.sqrt(latent_dim)
        )
        self.b0 = nn.Parameter(torch.zeros(num_points, hidden, **kw))
        self.w1 = nn.Parameter(
            torch.zeros(num_points, 2 * latent_dim, hidden, **kw)
        )  # zero: starts at the identity
        self.b1 = nn.Parameter(torch.zeros(num_points, 2 * latent_dim, **kw))

    def rows(
        self, idx: slice | torch.Tensor
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The network of the datapoints ``idx``, as the callable an ``AffineAutoregressive`` needs."""
        w0, b0 = self.w0[idx] * self.mask0, self.b0[idx]
        w1, b1 = self.w1[idx] * self.mask1, self.b1[idx]
        d = self.latent_dim

        def arn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lead = z.shape[:-2]  # draws: one batched matmul per datapoint over all of them
            zt = z.reshape(-1, *z.shape[-2:]).transpose(0, 1)  # [N, S, d]
            h = F.relu(torch.baddbmm(b0.unsqueeze(1), zt, w0.transpose(1, 2)))
            out = torch.baddbmm(b1.unsqueeze(1), h, w1.transpose(1, 2)).transpose(
                0, 1
            )  # [S, N, 2d]
            out = out.reshape(*lead, z.shape[-2], 2, d)
            return out[..., 0, :], out[..., 1, :]

        arn.permutation = self.permutation  # type: ignore[attr-defined]
        return arn

    def take(self, rows: torch.Tensor) -> BatchedMADE:
        """A copy holding the weights of the datapoints ``rows`` (an index tensor; a row may repeat), detached."""
        out = BatchedMADE(
            len(rows),
            self.latent_dim,
            self.b0.shape[-1],
            self.permutation,
            (self.mask0, self.mask1),
            like=self.b0,
            w0=self.w0[rows],
        )
        with torch.no_grad():
            for name in ("b0", "w1", "b1"):
                getattr(out, name).copy_(getattr(self, name)[rows])
        return out

    @classmethod
    def from_conditional(cls, transform: AffineAutoregressive) -> BatchedMADE:
        """Copy an amortised IAF step conditioned on features ``h`` ``[N, H]`` (see the module docstring)."""
        cond = transform.arn
        net, h = cond.func, cond.keywords["context"]
        if (
            len(net.layers) != 2
            or net.skip_layer is not None
            or net.output_multiplier != 2
            or not isinstance(net.f, nn.ReLU)
        ):
            raise ConfigError(
                "only one-hidden-layer ReLU conditional MADEs without skip connections can be copied"
            )
        first, last = net.layers
        ctx = net.context_dim
        w = first.weight * first.mask
        masks = (
            first.mask[:, ctx:],
            last.mask,
        )  # a conditional MADE's input degrees differ from an unconditional one's
        new = cls(
            h.shape[0], net.input_dim, first.out_features, net.permutation.clone(), masks, like=h
        )
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

    def __init__(
        self,
        family: str,
        latent: Latent,
        loc: torch.Tensor,
        scale: torch.Tensor,
        *,
        scale_tril: torch.Tensor | None = None,
        flows: list[BatchedMADE] | None = None,
        clamp: tuple[float, float] = (-5.0, 3.0),
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        self.family, self.latent, self.clamp = family, latent, clamp
        self.loc = nn.Parameter(loc.detach().clone())
        if family == "full":
            tril = scale_tril if scale_tril is not None else torch.diag_embed(scale)
            d = loc.shape[-1]
            self.register_buffer(
                "_off", torch.tril_indices(d, d, offset=-1, device=loc.device), persistent=False
            )
            self.raw_diag = nn.Parameter(
                _inv_softplus(tril.diagonal(dim1=-2, dim2=-1).detach().clamp_min(1e-6))
            )
            self.offdiag = nn.Parameter(tril[..., self._off[0], self._off[1]].detach().clone())
        else:
            self.raw_scale = nn.Parameter(_inv_softplus(scale.detach().clamp_min(1e-6)))
        self.flows = nn.ModuleList(flows or [])

    @property
    def num_points(self) -> int:
        return self.loc.shape[0]

    def distribution(
        self, rows: slice | torch.Tensor = slice(None), *, detach: bool = False
    ) -> torch.distributions.Distribution:
        """``q*`` of the datapoints ``rows`` over ``u``: batch shape ``[len(rows)]``, event ``[K]``.

        ``detach=True`` (Gaussian families): the same distribution with its
        parameters cut from the graph, for the path-derivative gradient.
        """

        def get(t: torch.Tensor) -> torch.Tensor:
            return t[rows].detach() if detach else t[rows]

        loc = get(self.loc)
        if self.family == "full":
            tril = torch.diag_embed(F.softplus(get(self.raw_diag)) + 1e-6)
            tril[..., self._off[0], self._off[1]] = get(self.offdiag)
            return dist.MultivariateNormal(loc, scale_tril=tril)
        if detach and self.family == "flow":
            raise ValueError(
                "a flow's path derivative needs its inverse; only the Gaussian families detach"
            )
        base = dist.Normal(loc, F.softplus(get(self.raw_scale)) + 1e-6).to_event(1)
        if self.family == "diagonal":
            return base
        lo, hi = self.clamp
        steps = [
            AffineAutoregressive(f.rows(rows), log_scale_min_clip=lo, log_scale_max_clip=hi)
            for f in self.flows
        ]
        return dist.TransformedDistribution(base, steps)

    def select(self, rows: slice | torch.Tensor) -> LatentGuide:
        """The guide of the datapoints ``rows`` only (itself cut further by ``select``)."""
        return LatentGuide(
            self.latent,
            self.distribution,
            torch.arange(self.num_points, device=self.loc.device)[rows],
        )

    def base_scale_tril(self) -> torch.Tensor:
        """The Cholesky factor ``[N, K, K]`` of each datapoint's Gaussian (the flow family's base), detached."""
        with torch.no_grad():
            if self.family == "full":
                return self.distribution().scale_tril
            return torch.diag_embed(F.softplus(self.raw_scale) + 1e-6)

    def take(self, rows: torch.Tensor) -> LocalPosterior:
        """A new posterior (detached copies) of the datapoints ``rows``, an index tensor in which a row may repeat.

        ``take(torch.arange(N).repeat(S))`` holds ``S`` copies of every datapoint (one per start of
        :func:`~ppl_vae.inference.optimize_local`), ``take(best)`` keeps one row of each.
        """
        rows = torch.as_tensor(rows, device=self.loc.device)
        latent = dataclasses.replace(self.latent, num_points=len(rows))
        with torch.no_grad():
            loc = self.loc[rows]
            out = LocalPosterior(
                self.family,
                latent,
                loc,
                torch.ones_like(loc),
                flows=[f.take(rows) for f in self.flows],
                clamp=self.clamp,
            )
            for name, p in self.named_parameters(
                recurse=False
            ):  # the raw parameters themselves: no softplus round trip
                getattr(out, name).copy_(p[rows])
        return out

    def widened(self, factor: float) -> LocalPosterior:
        r"""A detached copy whose Gaussian (a flow's base) has its scale multiplied by ``factor``: covariance :math:`\times` ``factor**2``."""
        out = self.take(torch.arange(self.num_points, device=self.loc.device))
        with torch.no_grad():
            if out.family == "full":
                out.raw_diag.copy_(_inv_softplus((F.softplus(out.raw_diag) + 1e-6) * factor - 1e-6))
                out.offdiag.mul_(factor)
            else:
                out.raw_scale.copy_(
                    _inv_softplus((F.softplus(out.raw_scale) + 1e-6) * factor - 1e-6)
                )
        return out

    def forward(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        self.select(slice(None))(x, *args)

    @classmethod
    def initial(
        cls,
        family: str,
        q: torch.distributions.Distribution,
        latent: Latent,
        *,
        num_flows: int = 2,
        flow_hidden: int | None = None,
        seed_draws: int = 2000,
        normal: Normal | None = None,
        generator: torch.Generator | None = None,
    ) -> LocalPosterior:
        """Start ``q*`` of ``family`` at (or, across families, near) a batch of distributions ``q`` over ``u``.

        Same family: copied exactly (a flow's MADEs included). Otherwise the
        Gaussian part is moment-matched (from draws when ``q`` is a flow) and
        flow steps start at the identity, their first layer's weights random.
        ``normal`` is where that randomness comes from (default: torch's global
        stream); with one stream per datapoint, a datapoint's start does not
        depend on the others. The flow steps' variable orders, shared by all
        datapoints, are drawn from the CPU ``generator`` (default: the global stream).
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
                mm = moment_matched(
                    torch.cat(
                        [
                            _draws(q, min(100, seed_draws - k), normal)
                            for k in range(0, seed_draws, 100)
                        ]
                    )
                )
                loc, tril = mm.loc, mm.scale_tril
            scale = (
                tril.diagonal(dim1=-2, dim2=-1)
                if family == "full"
                else (tril @ tril.mT).diagonal(dim1=-2, dim2=-1).sqrt()
            )
            if family == "full":
                return cls("full", latent, loc, scale, scale_tril=tril)
            if family == "diagonal":
                return cls("diagonal", latent, loc, scale)
            n, d = loc.shape
            hidden = flow_hidden if flow_hidden is not None else 2 * d
            if hidden < d or d < 2:
                raise ConfigError(
                    f"a local flow needs a latent of size >= 2 and hidden width >= that size, got {d} and {hidden}"
                )
            flows = [
                BatchedMADE(
                    n,
                    d,
                    hidden,
                    torch.randperm(d, generator=generator, device="cpu").to(loc.device),
                    like=loc,
                    w0=normal((n, hidden, d), 0, loc.dtype) / math.sqrt(d)
                    if normal is not None
                    else None,
                )
                for _ in range(num_flows)
            ]
            return cls("flow", latent, loc, scale, flows=flows)


class Mixture(dist.TorchDistribution):
    r"""A finite mixture of distributions that share their batch and event shapes, with per-row log-weights.

    .. math::

        \pi(u) = \sum_c \alpha_c\, q_c(u), \qquad \alpha = \operatorname{softmax}(\text{logits}),

    ``logits`` ``[*batch, C]`` (``-inf``: a component absent from that row).
    A draw picks a component by its weight, then draws from it (not
    reparameterised). The density of a draw needs every component's density
    there: a flow component's costs its inverse (``d`` passes of its MADE).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        components: list[torch.distributions.Distribution],
        logits: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        first = components[0]
        if any(
            c.batch_shape != first.batch_shape or c.event_shape != first.event_shape
            for c in components
        ) or logits.shape != (*first.batch_shape, len(components)):
            raise ValueError(
                "mixture components must share batch and event shapes, and logits must be [*batch, components]"
            )
        self.components, self.logits = list(components), logits
        super().__init__(first.batch_shape, first.event_shape, validate_args=False)

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> Mixture:
        batch_shape = torch.Size(batch_shape)
        return Mixture(
            [c.expand(batch_shape) for c in self.components],
            self.logits.expand(*batch_shape, len(self.components)),
        )

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            draws = torch.stack(
                [c.sample(sample_shape) for c in self.components], -1 - len(self.event_shape)
            )  # [*sample, *batch, C, *event]
            which = dist.Categorical(logits=self.logits).sample(sample_shape)  # [*sample, *batch]
            return self._pick(draws, which)

    def _pick(self, draws: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """From ``draws`` ``[*shape, C, *event]`` of every component, component ``which`` ``[*shape]``'s."""
        at = which.reshape(*which.shape, 1, *([1] * len(self.event_shape))).expand(
            *which.shape, 1, *self.event_shape
        )
        return draws.gather(len(which.shape), at).squeeze(len(which.shape))

    @property
    def drawn_from_noise(self) -> bool:
        """Whether :meth:`draw_from_noise` can draw it: every component is drawn from noise (:func:`~ppl_vae.distributions.noise_leaf`)."""
        return all(noise_leaf(c) is not None for c in self.components)

    def draw_from_noise(self, normal: Noise, uniform: Noise) -> torch.Tensor:
        """A draw made from given noise (:func:`~ppl_vae.distributions.noise_draw`), not reparameterised: the component
        picked by the inverse CDF of the row's weights at one uniform, its draw from the noise. Every component is drawn
        from the same noise (only the picked one's draw is kept, and the pick does not depend on it), so a mixture costs
        the noise of one component."""
        u = uniform(self.batch_shape, self.logits.dtype)
        shared_normal, shared_uniform = _SharedNoise(normal), _SharedNoise(uniform)
        parts = []
        for c in self.components:
            shared_normal.at = shared_uniform.at = 0
            parts.append(noise_draw(c, shared_normal, shared_uniform))
        draws = torch.stack(parts, -1 - len(self.event_shape))  # type: ignore[misc]
        cdf = torch.softmax(self.logits, -1).cumsum(-1)
        which = (
            (u.unsqueeze(-1) * cdf[..., -1:] > cdf).sum(-1).clamp_max(len(self.components) - 1)
        )  # [*batch]; never a component of weight 0
        return self._pick(draws, which).detach()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lp = torch.stack([c.log_prob(value) for c in self.components], -1)
        return torch.logsumexp(lp + torch.log_softmax(self.logits, -1), -1)


class _SharedNoise:
    """Noise drawn from ``source`` once and handed again to each caller that asks for it in the same order (``at``: the next call's place)."""

    def __init__(self, source: Noise) -> None:
        self.source, self.tape, self.at = source, [], 0

    def __call__(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if (
            self.at < len(self.tape)
            and self.tape[self.at].shape == tuple(shape)
            and self.tape[self.at].dtype == dtype
        ):
            noise = self.tape[self.at]
        else:
            noise = self.source(shape, dtype)
            if self.at == len(self.tape):
                self.tape.append(noise)
        self.at += 1
        return noise


class LocalMixture:
    """A per-datapoint :class:`Mixture` of per-datapoint families over ``u`` (e.g. an importance-sampling proposal); calling it is a guide.

    ``components`` are objects with ``distribution(rows)`` (a :class:`LocalPosterior`)
    over the same ``N`` datapoints; ``logits`` ``[N, C]`` their log-weights per datapoint.
    """

    def __init__(
        self, latent: Latent, components: list[LocalPosterior], logits: torch.Tensor
    ) -> None:
        if logits.shape != (latent.num_points, len(components)):
            raise ValueError(
                f"logits must be [{latent.num_points}, {len(components)}], got {tuple(logits.shape)}"
            )
        self.latent, self.components, self.logits = latent, list(components), logits

    @property
    def num_points(self) -> int:
        return self.latent.num_points

    def distribution(self, rows: slice | torch.Tensor = slice(None)) -> Mixture:
        """The mixture of the datapoints ``rows``: batch shape ``[len(rows)]``, event ``[K]``."""
        return Mixture([c.distribution(rows) for c in self.components], self.logits[rows])

    def select(self, rows: slice | torch.Tensor) -> LatentGuide:
        """The guide of the datapoints ``rows`` only."""
        return LatentGuide(
            self.latent,
            self.distribution,
            torch.arange(self.num_points, device=self.logits.device)[rows],
        )

    def __call__(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        self.select(slice(None))(x, *args)


def _draws(q: torch.distributions.Distribution, m: int, normal: Normal | None) -> torch.Tensor:
    """``m`` draws ``[m, N, K]`` of a batch ``[N]`` of distributions, from ``normal`` where ``q`` is a transformed Gaussian."""
    base = gaussian_base(q)
    if normal is None or base is None:
        return q.sample((m,))
    return gaussian_draw(
        q.expand((m, *q.batch_shape)), lambda shape: normal(tuple(shape), 1, base.loc.dtype)
    )
