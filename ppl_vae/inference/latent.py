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

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive
from pyro.poutine.util import site_is_subsample
from torch.distributions import Transform, biject_to

from ..errors import ConfigError
from .elbo import SAMPLES, _per_datapoint, plate_nesting, probe

__all__ = [
    "LatentSite",
    "Latent",
    "latent_of",
    "LatentGuide",
    "guide_in_latent_space",
    "moment_matched",
    "latent_draws",
    "log_joint",
    "guide_log_density",
    "AUX_SITE",
]

#: the name of the auxiliary site of :class:`LatentGuide` that carries ``u``
AUX_SITE = "_ppl_vae_latent"


def _is_identity(t: Transform) -> bool:
    while isinstance(t, torch.distributions.transforms.IndependentTransform):
        t = t.base_transform
    return isinstance(t, torch.distributions.transforms.ComposeTransform) and not t.parts


#: fixed (parameter-free or constant-affine) transforms whose composition with a Gaussian can be the pushforward of a Gaussian over ``u``
_FIXED = (
    torch.distributions.transforms.ExpTransform,
    torch.distributions.transforms.AffineTransform,
    torch.distributions.transforms.SigmoidTransform,
    torch.distributions.transforms.SoftplusTransform,
    torch.distributions.transforms.ComposeTransform,
    torch.distributions.transforms.IndependentTransform,
)


@dataclass(frozen=True)
class LatentSite:
    """One latent site: its per-datapoint shape, constrained and unconstrained, and ``biject_to`` of its support."""

    name: str
    shape: tuple[int, ...]
    ushape: tuple[int, ...]
    transform: Transform

    @property
    def size(self) -> int:
        return math.prod(self.ushape)

    @property
    def identity(self) -> bool:
        return _is_identity(self.transform)


@dataclass(frozen=True)
class Latent:
    """The latent sites of a model for ``num_points`` datapoints, as one unconstrained vector of size :attr:`dim`."""

    sites: tuple[LatentSite, ...]
    num_points: int

    @property
    def dim(self) -> int:
        return sum(s.size for s in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def plain(self) -> bool:
        """One site with a 1-d event over the reals: ``u`` is that site's value."""
        return len(self.sites) == 1 and self.sites[0].identity and len(self.sites[0].shape) == 1

    def describe(self) -> str:
        return ", ".join(f"{s.name}{list(s.shape)}" for s in self.sites)

    def labels(self) -> list[str]:
        """One label per coordinate of the *constrained* values, site by site (``z[0]``, ``s``, ``w[1,2]``)."""
        out = []
        for s in self.sites:
            if not s.shape:
                out.append(s.name)
            else:
                out += [f"{s.name}[{','.join(map(str, i))}]" for i in _ndindex(s.shape)]
        return out

    def split(self, u: torch.Tensor) -> list[torch.Tensor]:
        """``u`` ``[..., K]`` cut into each site's unconstrained value ``[..., *ushape]``."""
        chunks = u.split([s.size for s in self.sites], dim=-1)
        return [c.reshape(*u.shape[:-1], *s.ushape) for c, s in zip(chunks, self.sites)]

    def constrain(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each site's constrained value ``[..., *shape]`` and log-Jacobian ``[...]`` for ``u`` ``[..., K]``."""
        lead = u.shape[:-1]
        values, ladj = {}, {}
        for s, chunk in zip(self.sites, self.split(u)):
            if s.identity:
                values[s.name] = chunk
                ladj[s.name] = u.new_zeros(lead)
                continue
            v = s.transform(chunk)
            values[s.name] = v
            ladj[s.name] = s.transform.log_abs_det_jacobian(chunk, v).reshape(*lead, -1).sum(-1)
        return values, ladj

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`constrain`: site values ``[..., *shape]`` -> ``u`` ``[..., K]``."""
        parts = []
        for s in self.sites:
            v = values[s.name]
            lead = v.shape[: v.dim() - len(s.shape)]
            w = v if s.identity else s.transform.inv(v)
            parts.append(w.reshape(*lead, s.size))
        return torch.cat(parts, -1)

    def flat_values(self, u: torch.Tensor) -> torch.Tensor:
        """Constrained values of ``u`` ``[..., K]`` flattened and concatenated: ``[..., len(labels())]``."""
        values, _ = self.constrain(u)
        return torch.cat([values[s.name].reshape(*u.shape[:-1], -1) for s in self.sites], -1)


def _ndindex(shape: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    import itertools

    return itertools.product(*(range(n) for n in shape))


def _sample_sites(tr: poutine.Trace) -> dict[str, dict]:
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}


def _latent_nodes(tr: poutine.Trace) -> dict[str, dict]:
    return {n: s for n, s in _sample_sites(tr).items() if not s["is_observed"] and not s["infer"].get("is_auxiliary")}


def _point_mass(fn: object) -> bool:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def check_guide_pairs(model_sites: Iterable[str], guide_tr: poutine.Trace, analysis: str) -> None:
    """Refuse a guide that lacks one of ``model_sites``, samples a site the model lacks, or is a point mass."""
    guide_sites = _sample_sites(guide_tr)
    aux = {n for n, s in guide_sites.items() if s["infer"].get("is_auxiliary")}
    missing = [n for n in model_sites if n not in guide_sites]
    if missing:
        raise ConfigError(f"{analysis}: the guide has no site {missing[0]!r}, a latent site of the model (it would be drawn from the prior)")
    extra = [n for n in guide_sites if n not in set(model_sites) and n not in aux]
    if extra:
        raise ConfigError(f"{analysis}: guide site {extra[0]!r} is not a latent site of the model")
    if not aux:
        for n in model_sites:
            if _point_mass(guide_sites[n]["fn"]):
                raise ConfigError(f"{analysis}: guide site {n!r} is a point mass (Delta): it has no density over the latent, so {analysis} does not apply")


def latent_of(model: Callable[..., object], *data: torch.Tensor, guide: Callable[..., object] | None = None, analysis: str = "this analysis") -> Latent:
    """The :class:`Latent` of ``model`` on the rows of ``data``; refuses what a per-datapoint analysis cannot handle.

    Raises
    ------
    ConfigError
        Naming the site and the reason: a discrete (or enumerated) latent site,
        one outside the ``"data"`` plate or with other batch dimensions, no
        latent site at all; with ``guide``: a model site the guide lacks, a
        guide site the model lacks, a point-mass guide site.
    """
    if not data or not isinstance(data[0], torch.Tensor) or data[0].dim() < 1 or data[0].shape[0] < 1:
        raise ConfigError(f"{analysis} needs at least one datapoint (a tensor with rows)")
    n = data[0].shape[0]

    def run() -> tuple[poutine.Trace, poutine.Trace | None]:
        with poutine.block(), torch.no_grad():
            if guide is None:
                return poutine.trace(model).get_trace(*data), None
            g = poutine.trace(guide).get_trace(*data)
            return poutine.trace(poutine.replay(model, trace=g)).get_trace(*data), g

    tr, guide_tr = probe(analysis, run, data)  # type: ignore[misc]
    nodes = _latent_nodes(tr)
    if not nodes:
        raise ConfigError(f"{analysis}: the model has no latent sample sites")
    sites = []
    for name, s in nodes.items():
        fn = s["fn"]
        if fn.support.is_discrete or s["infer"].get("enumerate"):
            raise ConfigError(f"{analysis} needs continuous latent sites; site {name!r} is discrete ({type(fn).__name__})")
        if not any(f.name == "data" for f in s["cond_indep_stack"]):
            raise ConfigError(f"{analysis} is per datapoint; site {name!r} is outside the 'data' plate (a latent shared by all datapoints)")
        value = s["value"]
        batch = tuple(value.shape[: value.dim() - fn.event_dim])
        if batch != (n,):
            raise ConfigError(
                f"{analysis}: site {name!r} has batch shape {batch}; each latent site must have one row per datapoint "
                f"(batch shape ({n},), its other dimensions in the event: .to_event)"
            )
        transform = biject_to(fn.support)
        shape = tuple(value.shape[1:])
        ushape = tuple(transform.inverse_shape(torch.Size((n, *shape))))[1:]
        sites.append(LatentSite(name, shape, ushape, transform))
    if guide_tr is not None:
        check_guide_pairs(nodes, guide_tr, analysis)
    return Latent(tuple(sites), n)


# --------------------------------------------------------------------------- densities over u


def _tile(data: tuple[torch.Tensor, ...], c: int) -> tuple[torch.Tensor, ...]:
    return tuple(a.repeat(c, *([1] * (a.dim() - 1))) for a in data)


def _conditioned(fn: Callable[..., object], latent: Latent, data: tuple[torch.Tensor, ...], u: torch.Tensor) -> tuple[poutine.Trace, dict[str, torch.Tensor], torch.Tensor]:
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
        for name, s in _sample_sites(tr).items():
            lp = _per_datapoint(s, "data").reshape(c, n)
            if name in values:
                prior = prior + lp
            elif s["is_observed"]:
                lik = lik + lp
        unexpected = [k for k, s in _latent_nodes(tr).items() if k not in values]
        if unexpected:
            raise ConfigError(f"site {unexpected[0]!r} appeared in a run of the model that did not have it before: the model's latent sites must not change between runs")
        lik_t = lik if isinstance(lik, torch.Tensor) else prior.new_zeros(prior.shape)
        return (prior, lik_t) if split else prior + lik_t

    return f


def guide_log_density(guide: Callable[..., object], latent: Latent, *data: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""``f(u) = log q(T(u) | x_n) + log|J|`` for ``u`` ``[C, N, K]``: the guide's density over ``u``, ``[C, N]``.

    The guide runs on ``data`` repeated ``C`` times with its sites conditioned
    on the values. A guide with an auxiliary site (whose marginal density is
    not available) is refused.
    """
    n = latent.num_points

    def f(u: torch.Tensor) -> torch.Tensor:
        c = u.shape[0]
        tr, _, total = _conditioned(guide, latent, data, u)
        for name, s in _sample_sites(tr).items():
            if s["infer"].get("is_auxiliary"):
                raise ConfigError(f"the guide's density at a given latent is not available: its site {name!r} is auxiliary")
            total = total + _per_datapoint(s, "data").reshape(c, n)
        return total

    return f


def latent_draws(
    model: Callable[..., object], latent: Latent, *data: torch.Tensor, guide: Callable[..., object] | None = None, num_samples: int = 1
) -> torch.Tensor:
    """``num_samples`` draws of ``u`` per datapoint, ``[S, N, K]``, from ``guide`` (or the model's prior)."""
    n = latent.num_points
    with poutine.block(), torch.no_grad():
        fn = guide if guide is not None else model
        nesting = plate_nesting(model, guide, *data) if guide is not None else plate_nesting(model, lambda *a: None, *data)
        with pyro.plate(SAMPLES, num_samples, dim=-(nesting + 1)):
            tr = poutine.trace(fn).get_trace(*data)
    values = {s.name: tr.nodes[s.name]["value"].reshape(num_samples, n, *s.shape) for s in latent.sites}
    return latent.unconstrain(values)


# --------------------------------------------------------------------------- guides over u


class LatentGuide:
    """A guide for a model's latent sites from a batch of distributions over ``u`` (batch ``[N]``, event ``[K]``).

    For a :attr:`Latent.plain` model the one site is sampled from the
    distribution directly. Otherwise ``u`` is an auxiliary site and each site
    a ``Delta`` at its constrained value with ``log_density = -log|J|``, so
    the guide's log-density is :math:`\\log q(u) - \\log|J| = \\log q(z)`.
    ``distribution(rows)`` gives the distribution of some datapoints.
    """

    def __init__(self, latent: Latent, distribution: Callable[[torch.Tensor], torch.distributions.Distribution], index: torch.Tensor | None = None) -> None:
        self.latent, self._distribution = latent, distribution
        self.index = index if index is not None else torch.arange(latent.num_points)

    def select(self, rows: slice | torch.Tensor) -> LatentGuide:
        """The guide of the datapoints ``rows`` only (as :func:`~ppl_vae.inference.bounds.importance_bounds` chunks)."""
        return LatentGuide(self.latent, self._distribution, self.index[rows])

    def __call__(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        if len(self.index) != x.shape[0]:
            raise ConfigError(f"this guide covers {len(self.index)} datapoints, it got {x.shape[0]}")
        q = self._distribution(self.index)
        with pyro.plate("data", x.shape[0]):
            if self.latent.plain:
                pyro.sample(self.latent.sites[0].name, q)
                return
            u = pyro.sample(AUX_SITE, q, infer={"is_auxiliary": True})
            values, ladj = self.latent.constrain(u)
            for s in self.latent.sites:
                pyro.sample(s.name, dist.Delta(values[s.name], log_density=-ladj[s.name], event_dim=len(s.shape)))


def moment_matched(u: torch.Tensor, jitter: float = 1e-6) -> dist.MultivariateNormal:
    """The Gaussian with the mean and covariance of draws ``u`` ``[S, N, K]`` (float64 sums, in chunks)."""
    s = u.shape[0]
    if s < 2:
        raise ConfigError("moment matching needs at least 2 draws")
    total = u.new_zeros(u.shape[1:], dtype=torch.float64)
    second = u.new_zeros((*u.shape[1:], u.shape[-1]), dtype=torch.float64)
    for k in range(0, s, 100):
        d = u[k : k + 100].double()
        total += d.sum(0)
        second += torch.einsum("snd,sne->nde", d, d)
    loc = total / s
    cov = (second - s * loc.unsqueeze(-1) * loc.unsqueeze(-2)) / (s - 1)
    eye = torch.eye(u.shape[-1], dtype=cov.dtype, device=cov.device)
    tril = torch.linalg.cholesky(cov + jitter * eye)
    return dist.MultivariateNormal(loc.to(u.dtype), scale_tril=tril.to(u.dtype))


def _gaussian_part(fn: torch.distributions.Distribution, site: LatentSite, n: int) -> tuple[torch.Tensor, torch.Tensor, bool] | str:
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
            if not torch.allclose(site.transform.inv(_apply(base.transforms, v)), v, rtol=1e-4, atol=1e-5):
                return f"its transform is not the site's bijection to {site.transform.codomain}"
        base = g
        while isinstance(base, torch.distributions.Independent):
            reinterpreted += base.reinterpreted_batch_ndims
            base = base.base_dist
    elif not site.identity:
        return f"{type(fn).__name__} is not Gaussian in the site's unconstrained space"
    if isinstance(base, torch.distributions.Normal):
        return base.loc.expand(base.batch_shape).reshape(n, k), base.scale.expand(base.batch_shape).reshape(n, k), True
    if isinstance(base, torch.distributions.MultivariateNormal) and len(site.shape) <= 1:
        return base.loc.reshape(n, k), base.scale_tril.expand(n, k, k), False
    return f"{type(base).__name__} is not a Gaussian"


def _apply(transforms: list[Transform], v: torch.Tensor) -> torch.Tensor:
    for t in transforms:
        v = t(v)
    return v


def guide_in_latent_space(guide: Callable[..., object], latent: Latent, *data: torch.Tensor) -> tuple[torch.distributions.Distribution | None, str]:
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
        if isinstance(fn, torch.distributions.TransformedDistribution) and fn.transforms and all(isinstance(t, AffineAutoregressive) for t in fn.transforms):
            return fn, ""
    if len(latent.sites) > 1:
        moved = {s.name: s.transform(s.transform.inv(tr.nodes[s.name]["value"]) + 0.5) for s in latent.sites}
        with poutine.block(), torch.no_grad():
            tr2 = poutine.trace(poutine.condition(guide, data=moved)).get_trace(*data)
        for s in latent.sites:
            v = tr.nodes[s.name]["value"]
            if not torch.allclose(fns[s.name].log_prob(v), tr2.nodes[s.name]["fn"].log_prob(v), rtol=1e-5, atol=1e-5):
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
