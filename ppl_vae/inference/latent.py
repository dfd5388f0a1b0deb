r"""The latent state of a model, per datapoint: every continuous latent site, in one unconstrained vector.

The per-datapoint analyses (local :math:`q^*`, AIS, latent-posterior HMC,
VI-vs-MCMC) work on one vector per datapoint. For a model written the ppl-vae
way (a ``"data"`` plate over the rows), the latent state of datapoint ``n`` is
the concatenation of all its latent sites, each mapped to unconstrained space
by ``biject_to(site.support)`` (as Pyro's ``AutoContinuous`` guides and its
HMC do):

.. math::

    u_n = \big(T_1^{-1}(z_{1,n}), \dots, T_S^{-1}(z_{S,n})\big) \in \mathbb{R}^K,
    \qquad \log p(x_n, u_n) = \log p(x_n, T(u_n)) + \log\lvert\det J_T(u_n)\rvert.

:func:`latent_of` reads the sites off one traced run of the model and
refuses, by name and before any work, what such an analysis cannot handle: a
discrete site, a site outside the ``"data"`` plate (a global latent), a site
with batch dimensions besides the data plate, and, given a guide, a guide that
lacks one of the model's latent sites, samples a site the model does not have,
or is a point mass (an autoencoder's encoder).

:class:`LatentGuide` turns a batch of distributions over ``u`` into a guide for
the model's sites (an auxiliary site for ``u`` plus a ``Delta`` per site, whose
``log_density`` carries the Jacobian, as ``AutoContinuous`` does);
:func:`guide_in_latent_space` reads an amortised guide as such a distribution,
exactly when the guide is Gaussian (or one IAF flow) in unconstrained space
with independent sites, and says why not otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive
from torch.distributions import Transform, biject_to, constraints

from ..distributions import point_mass
from ..errors import ConfigError
from ..guides.latent import Latent, LatentSite
from .random import RowDraws, Streams, draws_in_batches
from .traces import (
    SAMPLES,
    check_rows,
    latent_nodes,
    per_datapoint,
    plate_nesting,
    probe,
    restrict,
    sample_sites,
)

__all__ = [
    "latent_of",
    "guide_in_latent_space",
    "latent_draws",
    "log_joint",
    "guide_log_density",
    "check_guide_pairs",
]


#: fixed (parameter-free or constant-affine) transforms whose composition with a Gaussian can be the pushforward of a Gaussian over ``u``
_FIXED = (
    torch.distributions.transforms.ExpTransform,
    torch.distributions.transforms.AffineTransform,
    torch.distributions.transforms.SigmoidTransform,
    torch.distributions.transforms.SoftplusTransform,
    torch.distributions.transforms.ComposeTransform,
    torch.distributions.transforms.IndependentTransform,
)


def check_guide_pairs(model_sites: Iterable[str], guide_tr: poutine.Trace, analysis: str) -> None:
    """Refuse a guide that lacks one of ``model_sites``, samples a site the model lacks, or is a point mass."""
    guide_sites = sample_sites(guide_tr)
    aux = {n for n, s in guide_sites.items() if s["infer"].get("is_auxiliary")}
    missing = [n for n in model_sites if n not in guide_sites]
    if missing:
        raise ConfigError(
            f"{analysis}: the guide has no site {missing[0]!r}, a latent site of the model (it would be drawn from the prior)"
        )
    extra = [n for n in guide_sites if n not in set(model_sites) and n not in aux]
    if extra:
        raise ConfigError(f"{analysis}: guide site {extra[0]!r} is not a latent site of the model")
    if not aux:
        for n in model_sites:
            if point_mass(guide_sites[n]["fn"]):
                raise ConfigError(
                    f"{analysis}: guide site {n!r} is a point mass (Delta): it has no density over the latent, so {analysis} does not apply"
                )


def _bijection(support: constraints.Constraint, name: str, analysis: str) -> Transform:
    """``biject_to(support)``; a mixture's support is its components' (torch has no bijection registered for the wrapper)."""
    while True:
        try:
            return biject_to(support)
        except NotImplementedError:
            inner = getattr(support, "base_constraint", None)
            if inner is None:
                raise ConfigError(
                    f"{analysis}: site {name!r} has a support ({support}) with no bijection to the reals"
                ) from None
            support = inner


def latent_of(
    model: Callable[..., object],
    *data: torch.Tensor,
    guide: Callable[..., object] | None = None,
    analysis: str = "this analysis",
) -> Latent:
    """The :class:`Latent` of ``model`` on the rows of ``data``; refuses what a per-datapoint analysis cannot handle.

    Raises
    ------
    ConfigError
        Naming the site and the reason: a discrete (or enumerated) latent site,
        one outside the ``"data"`` plate or with other batch dimensions, no
        latent site at all; with ``guide``: a model site the guide lacks, a
        guide site the model lacks, a point-mass guide site.
    """
    check_rows(data, analysis)
    n = data[0].shape[0]

    def run() -> tuple[poutine.Trace, poutine.Trace | None]:
        with poutine.block(), torch.no_grad():
            if guide is None:
                return poutine.trace(model).get_trace(*data), None
            g = poutine.trace(guide).get_trace(*data)
            return poutine.trace(poutine.replay(model, trace=g)).get_trace(*data), g

    tr, guide_tr = probe(analysis, run, data)  # type: ignore[misc]
    nodes = latent_nodes(tr)
    if not nodes:
        raise ConfigError(f"{analysis}: the model has no latent sample sites")
    sites = []
    for name, s in nodes.items():
        fn = s["fn"]
        if fn.support.is_discrete or s["infer"].get("enumerate"):
            raise ConfigError(
                f"{analysis} needs continuous latent sites; site {name!r} is discrete ({type(fn).__name__})"
            )
        if not any(f.name == "data" for f in s["cond_indep_stack"]):
            raise ConfigError(
                f"{analysis} is per datapoint; site {name!r} is outside the 'data' plate (a latent shared by all datapoints)"
            )
        value = s["value"]
        batch = tuple(value.shape[: value.dim() - fn.event_dim])
        if batch != (n,):
            raise ConfigError(
                f"{analysis}: site {name!r} has batch shape {batch}; each latent site must have one row per datapoint "
                f"(batch shape ({n},), its other dimensions in the event: .to_event)"
            )
        transform = _bijection(fn.support, name, analysis)
        shape = tuple(value.shape[1:])
        ushape = tuple(transform.inverse_shape(torch.Size((n, *shape))))[1:]
        sites.append(LatentSite(name, shape, ushape, transform))
    if guide_tr is not None:
        check_guide_pairs(nodes, guide_tr, analysis)
    return Latent(tuple(sites), n)


# --------------------------------------------------------------------------- densities over u


def _tile(data: tuple[torch.Tensor, ...], c: int) -> tuple[torch.Tensor, ...]:
    return tuple(a.repeat(c, *([1] * (a.dim() - 1))) for a in data)


def _conditioned(
    fn: Callable[..., object], latent: Latent, data: tuple[torch.Tensor, ...], u: torch.Tensor
) -> tuple[poutine.Trace, dict[str, torch.Tensor], torch.Tensor]:
    """``fn`` (model or guide) run on ``data`` repeated ``C`` times with its sites at ``T(u)``, ``u`` ``[C, N, K]``: trace, values, log|J| ``[C, N]``."""
    c, n = u.shape[0], latent.num_points
    values, ladj = latent.constrain(u)
    flat = {k: v.reshape(c * n, *v.shape[2:]) for k, v in values.items()}
    with poutine.block(), pyro.validation_enabled(False):
        tr = poutine.trace(poutine.condition(fn, data=flat)).get_trace(*_tile(data, c))
    return tr, values, sum(ladj.values())  # type: ignore[return-value]


def log_joint(
    model: Callable[..., object], latent: Latent, *data: torch.Tensor, split: bool = False
) -> Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    r"""``f(u) = log p(x_n, T(u_{c,n})) + log|J|`` for ``u`` ``[C, N, K]``: shape ``[C, N]``.

    The model runs once on ``data`` repeated ``C`` times along the rows, with
    every latent site conditioned on its value; each site's log-density is
    summed over all dimensions but the ``"data"`` plate. With ``split=True``
    returns ``(log prior + log|J|, log likelihood)``: the latent sites' terms
    and the observed sites' terms.
    """
    n = latent.num_points

    def f(u: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        c = u.shape[0]
        tr, values, prior = _conditioned(model, latent, data, u)
        lik: torch.Tensor | int = 0
        for name, s in sample_sites(tr).items():
            lp = per_datapoint(s, "data").reshape(c, n)
            if name in values:
                prior = prior + lp
            elif s["is_observed"]:
                lik = lik + lp
        unexpected = [k for k, s in latent_nodes(tr).items() if k not in values]
        if unexpected:
            raise ConfigError(
                f"site {unexpected[0]!r} appeared in a run of the model that did not have it before: the model's latent sites must not change between runs"
            )
        lik_t = lik if isinstance(lik, torch.Tensor) else prior.new_zeros(prior.shape)
        return (prior, lik_t) if split else prior + lik_t

    return f


def guide_log_density(
    guide: Callable[..., object], latent: Latent, *data: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""``f(u) = log q(T(u) | x_n) + log|J|`` for ``u`` ``[C, N, K]``: the guide's density over ``u``, ``[C, N]``.

    The guide runs on ``data`` repeated ``C`` times with its sites conditioned
    on the values. A guide with an auxiliary site (whose marginal density is
    not available) is refused.
    """
    n = latent.num_points

    def f(u: torch.Tensor) -> torch.Tensor:
        c = u.shape[0]
        tr, _, total = _conditioned(guide, latent, data, u)
        for name, s in sample_sites(tr).items():
            if s["infer"].get("is_auxiliary"):
                raise ConfigError(
                    f"the guide's density at a given latent is not available: its site {name!r} is auxiliary"
                )
            total = total + per_datapoint(s, "data").reshape(c, n)
        return total

    return f


def latent_draws(
    model: Callable[..., object],
    latent: Latent,
    *data: torch.Tensor,
    guide: Callable[..., object] | None = None,
    num_samples: int = 1,
    streams: Streams | None = None,
) -> torch.Tensor:
    """``num_samples`` draws of ``u`` per datapoint, ``[S, N, K]``, from ``guide`` (or the model's prior).

    With ``streams`` each datapoint draws from its own stream (:class:`~ppl_vae.inference.random.RowDraws`);
    a program with a site that is not a transformed Gaussian then runs one datapoint at a time.
    """
    n = latent.num_points
    fn = guide if guide is not None else model
    with poutine.block(), torch.no_grad():
        nesting = (
            plate_nesting(model, guide, *data)
            if guide is not None
            else plate_nesting(model, lambda *a: None, *data)
        )
        if streams is None:
            with pyro.plate(SAMPLES, num_samples, dim=-(nesting + 1)):
                tr = poutine.trace(fn).get_trace(*data)
            values = {
                s.name: tr.nodes[s.name]["value"].reshape(num_samples, n, *s.shape)
                for s in latent.sites
            }
            return latent.unconstrain(values)
        batched = draws_in_batches(
            restrict(fn, slice(0, 1)) if guide is not None else fn, *(t[:1] for t in data)
        )
        parts = []
        for rows in [slice(None)] if batched else [slice(i, i + 1) for i in range(n)]:
            args = tuple(t[rows] for t in data)
            program = restrict(guide, rows) if guide is not None else model
            with (
                RowDraws(streams.select(rows)),
                pyro.plate(SAMPLES, num_samples, dim=-(nesting + 1)),
            ):
                tr = poutine.trace(program).get_trace(*args)
            m = args[0].shape[0]
            parts.append(
                latent.unconstrain(
                    {
                        s.name: tr.nodes[s.name]["value"].reshape(num_samples, m, *s.shape)
                        for s in latent.sites
                    }
                )
            )
    return torch.cat(parts, 1)


# --------------------------------------------------------------------------- guides over u


def _gaussian_part(
    fn: torch.distributions.Distribution, site: LatentSite, n: int
) -> tuple[torch.Tensor, torch.Tensor, bool] | str:
    """``(loc [N, k], scale_tril-or-scale [N, k(, k)], diagonal)`` of a site's guide distribution over its ``u``, or why not."""
    base, reinterpreted = fn, 0
    while isinstance(base, torch.distributions.Independent):
        reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    k = site.size
    if isinstance(base, torch.distributions.TransformedDistribution) and not site.identity:
        g = base.base_dist  # Gaussian in u-space if the guide's transform is the site's bijection
        if not all(isinstance(t, _FIXED) for t in base.transforms):
            return f"its transforms ({', '.join(type(t).__name__ for t in base.transforms)}) are not a fixed bijection"
        with torch.no_grad():
            v = g.sample((4,))
            if not torch.allclose(
                site.transform.inv(_apply(base.transforms, v)), v, rtol=1e-4, atol=1e-5
            ):
                return f"its transform is not the site's bijection to {site.transform.codomain}"
        base = g
        while isinstance(base, torch.distributions.Independent):
            reinterpreted += base.reinterpreted_batch_ndims
            base = base.base_dist
    elif not site.identity:
        return f"{type(fn).__name__} is not Gaussian in the site's unconstrained space"
    if isinstance(base, torch.distributions.Normal):
        return (
            base.loc.expand(base.batch_shape).reshape(n, k),
            base.scale.expand(base.batch_shape).reshape(n, k),
            True,
        )
    if isinstance(base, torch.distributions.MultivariateNormal) and len(site.shape) <= 1:
        return base.loc.reshape(n, k), base.scale_tril.expand(n, k, k), False
    return f"{type(base).__name__} is not a Gaussian"


def _apply(transforms: list[Transform], v: torch.Tensor) -> torch.Tensor:
    for t in transforms:
        v = t(v)
    return v


def guide_in_latent_space(
    guide: Callable[..., object], latent: Latent, *data: torch.Tensor
) -> tuple[torch.distributions.Distribution | None, str]:
    """The guide's ``q(u | x_n)`` as one distribution (batch ``[N]``, event ``[K]``) where it is exactly one, and why not otherwise.

    Exact when every site is Gaussian in its unconstrained space (diagonal or
    full covariance; a ``LogNormal`` for a positive site counts) and no site's
    distribution depends on another site's value (checked by re-running the
    guide with the other sites moved), or when the one site of a
    :attr:`Latent.plain` model is an IAF flow. Returns ``(q, "")`` or
    ``(None, reason)``.
    """
    n = latent.num_points
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(guide).get_trace(*data)
    fns = {s.name: tr.nodes[s.name]["fn"] for s in latent.sites}
    if latent.plain:
        fn = fns[latent.sites[0].name]
        if (
            isinstance(fn, torch.distributions.TransformedDistribution)
            and fn.transforms
            and all(isinstance(t, AffineAutoregressive) for t in fn.transforms)
        ):
            return fn, ""
    if len(latent.sites) > 1:
        moved = {
            s.name: s.transform(s.transform.inv(tr.nodes[s.name]["value"]) + 0.5)
            for s in latent.sites
        }
        with poutine.block(), torch.no_grad():
            tr2 = poutine.trace(poutine.condition(guide, data=moved)).get_trace(*data)
        for s in latent.sites:
            v = tr.nodes[s.name]["value"]
            if not torch.allclose(
                fns[s.name].log_prob(v), tr2.nodes[s.name]["fn"].log_prob(v), rtol=1e-5, atol=1e-5
            ):
                return None, f"the guide's site {s.name!r} depends on another site's value"
    locs, trils, diagonal = [], [], True
    for s in latent.sites:
        part = _gaussian_part(fns[s.name], s, n)
        if isinstance(part, str):
            return None, f"the guide's site {s.name!r}: {part}"
        loc, scale, diag = part
        locs.append(loc)
        trils.append(scale)
        diagonal &= diag
    loc = torch.cat(locs, -1)
    if diagonal:
        return dist.Normal(loc, torch.cat(trils, -1)).to_event(1), ""
    tril = loc.new_zeros(n, latent.dim, latent.dim)
    start = 0
    for t in trils:
        k = t.shape[-1]
        tril[:, start : start + k, start : start + k] = t if t.dim() == 3 else torch.diag_embed(t)
        start += k
    return dist.MultivariateNormal(loc, scale_tril=tril), ""
