r"""One trace and one reducer: the guide run on the data, the model replayed on its draws, log-densities per datapoint.

:func:`traces` runs a guide and replays the model on its draws (optionally
``S`` vectorised draws in a plate left of the model's plates, as Pyro's
``vectorize_particles``); :func:`per_datapoint` reduces one site's
log-density to one value per datapoint (summed over every dimension but the
``"data"`` plate and the draws plate); :func:`log_weights` is
:math:`\log p(x, z) - \log q(z \mid x)` per datapoint. Every per-datapoint
bound and analysis of the package is built on these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ..errors import ConfigError, DataError, PplVaeError
from .random import RowDraws, Streams, seeded

__all__ = [
    "SAMPLES", "per_datapoint", "probe", "trace_nesting", "plate_nesting", "traces", "log_weights", "check_pairs", "log_weights_of",
    "first_nonfinite_site", "ObservedSupport", "sample_sites", "latent_nodes", "model_latent_sites", "vectorized", "sum_but_first", "restrict", "PlaceFlat", "data_like", "prior_predictive",
]

SAMPLES = "_samples"  # the plate of vectorised draws added by ``traces(..., num_samples=S)``

def _keep_dim(lp: torch.Tensor, site: dict, name: str) -> int | None:
    dims = [f.dim for f in site["cond_indep_stack"] if f.name == name]
    if not dims:
        return None
    return lp.dim() + dims[0] if dims[0] < 0 else dims[0]

def per_datapoint(site: dict, plate: str, values: torch.Tensor | None = None) -> torch.Tensor:
    """A site's log-density (or ``values`` of its batch shape, e.g. a KL) summed over everything but the data plate (and the draws plate, if any)."""
    lp = site["fn"].log_prob(site["value"]) if values is None else values
    if site.get("mask") is not None:
        lp = lp * site["mask"]
    keep_data = _keep_dim(lp, site, plate)
    if keep_data is None:
        raise ConfigError(f"site {site['name']!r} is outside the {plate!r} plate; per-datapoint bounds need every site inside it")
    keep = [d for d in (_keep_dim(lp, site, SAMPLES), keep_data) if d is not None]
    other = [d for d in range(lp.dim()) if d not in keep]
    return lp.sum(other) if other else lp

def probe(what: str, run: Callable[[], object], data: Sequence[torch.Tensor]) -> object:
    """``run()``; a shape or value error from inside the model or guide becomes one :class:`DataError` naming ``what`` and the data's shapes."""
    try:
        return run()
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        if isinstance(exc, PplVaeError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(str(tuple(t.shape)) for t in data if isinstance(t, torch.Tensor))
        raise DataError(f"{what}: the model or guide failed on the data of shape {shapes} ({first})") from None

def restrict(guide: Callable[..., object], rows: slice | torch.Tensor) -> Callable[..., object]:
    """The guide for a subset of rows: a per-datapoint guide (one with ``select``) is cut, others kept."""
    select = getattr(guide, "select", None)
    return select(rows) if callable(select) else guide

def trace_nesting(*trs: Trace) -> int:
    """How many vectorised plates deep the sample sites of ``trs`` go (Pyro's ``max_plate_nesting``)."""
    depth = [
        -f.dim
        for tr in trs
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(depth, default=0)

def plate_nesting(model: Callable[..., object], guide: Callable[..., object], *args: torch.Tensor) -> int:
    """How many plates deep the model and guide go (Pyro's ``max_plate_nesting``), from one traced run."""
    return trace_nesting(*traces(model, guide, *args))

def traces(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int | None = None,
    nesting: int | None = None,
    streams: Streams | None = None,
) -> tuple[Trace, Trace]:
    """``(model_trace, guide_trace)``: the guide run on ``args``, the model replayed on its draws.

    With ``num_samples=S`` both run inside a plate of ``S`` vectorised draws
    (to the left of ``nesting`` plates, found by :func:`plate_nesting` if not
    given), as Pyro's ``vectorize_particles`` does. With ``streams`` the guide
    draws from one stream per datapoint (:class:`~ppl_vae.inference.random.RowDraws`).
    Blocked from outer handlers, so it can run inside another inference.
    """
    draws = RowDraws(streams) if streams is not None else contextlib.nullcontext()
    with poutine.block():
        if num_samples is None:
            with draws:
                guide_tr = poutine.trace(guide).get_trace(*args)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
            return model_tr, guide_tr
        depth = plate_nesting(model, guide, *args) if nesting is None else nesting
        with draws, pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
            guide_tr = poutine.trace(guide).get_trace(*args)
        with pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return model_tr, guide_tr

def log_weights(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    plate: str = "data",
    num_samples: int | None = None,
    nesting: int | None = None,
    streams: Streams | None = None,
) -> torch.Tensor:
    """Importance log-weights ``log p(x, z) - log q(z | x)`` per datapoint, ``z ~ q``.

    Returns shape ``[N]`` (one draw each), or ``[S, N]`` with ``num_samples=S``
    vectorised draws; their mean over draws is the ELBO. ``streams``: see :func:`traces`.
    """
    model_tr, guide_tr = traces(model, guide, *args, num_samples=num_samples, nesting=nesting, streams=streams)
    total = log_weights_of(model_tr, guide_tr, plate)
    if num_samples is not None and total.dim() == 1:  # nothing depended on the draws
        total = total.expand(num_samples, -1)
    return total

def check_pairs(model_tr: Trace, guide_tr: Trace, what: str = "the ELBO") -> None:
    """Refuse a guide that lacks a latent site of the model (it would be drawn from the prior) or samples one the model lacks."""
    guide_sites = {n for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    for name, site in model_tr.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site) and not site["is_observed"] and name not in guide_sites:
            raise ConfigError(f"{what}: the guide has no site {name!r}, a latent site of the model (it would be drawn from the prior)")
    model_sites = {n for n, s in model_tr.nodes.items() if s["type"] == "sample"}
    for name in guide_sites:
        if name not in model_sites and not guide_tr.nodes[name]["infer"].get("is_auxiliary"):
            raise ConfigError(f"{what}: guide site {name!r} is not a latent site of the model")

def log_weights_of(model_tr: Trace, guide_tr: Trace, plate: str = "data") -> torch.Tensor:
    """``log p(x, z) - log q(z | x)`` per datapoint (and draw) from a guide trace and the model replayed on it."""
    check_pairs(model_tr, guide_tr, "the importance weights")
    total: torch.Tensor | int = 0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for site in tr.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + sign * per_datapoint(site, plate)
    if isinstance(total, int):
        raise ConfigError("the model has no sample sites")
    return total

def first_nonfinite_site(model_tr: Trace, guide_tr: Trace, plate: str = "data") -> tuple[str | None, str]:
    """``(name, description)`` of the first guide or model site whose value or per-datapoint log-density is not finite (in the traces themselves)."""
    for role, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                if not bool(torch.isfinite(site["value"]).all()):
                    return name, f"{role} site {name!r} has a non-finite value"
                if not bool(torch.isfinite(per_datapoint(site, plate)).all()):
                    return name, f"{role} site {name!r} has a non-finite log-density"
    return None, "no single site (the sum overflowed)"


class ObservedSupport(Messenger):
    """Check every observed site's value against its distribution's support (0/1 under a Bernoulli, say).

    Pyro scores a value outside the support without a word when its validation is off (a Bernoulli
    gives ``0.5 log p + 0.5 log(1 - p)`` for a pixel of 0.5), so a bad row met after the first step
    would train silently. With ``eager`` the first bad site raises at once (one host read per observed
    site); without it the checks only accumulate in :attr:`ok`, a boolean tensor on the data's device,
    so that the caller reads it with its other values and calls :meth:`raise_bad` when it is false.
    A site masked off as a whole (``mask`` False) is not checked, as Pyro does not validate it either.
    """

    def __init__(self, *, eager: bool = False, rows: torch.Tensor | None = None, plate: str = "data") -> None:
        super().__init__()
        self.eager, self.rows, self.plate = eager, rows, plate
        self.ok: torch.Tensor | bool = True
        self.checks: list[tuple[dict[str, Any], torch.Tensor]] = []

    def __enter__(self) -> ObservedSupport:
        self.ok, self.checks = True, []
        return super().__enter__()

    def _postprocess_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample" or not msg["is_observed"] or site_is_subsample(msg) or msg.get("mask") is False:
            return
        fn = msg["fn"]
        if fn.support is torch.distributions.constraints.real or not isinstance(msg["value"], torch.Tensor):
            return
        inside = fn.support.check(msg["value"])
        self.checks.append((msg, inside))
        self.ok = inside.all() if self.ok is True else self.ok & inside.all()
        if self.eager and not bool(inside.all()):
            self.raise_bad()

    def raise_bad(self) -> None:
        """A :class:`DataError` naming the first observed site and data row with a value outside the support."""
        for msg, inside in self.checks:
            if bool(inside.all()):
                continue
            where = (~inside).nonzero()[0] if inside.dim() else inside.new_zeros(0, dtype=torch.long)
            frames = [f.dim for f in msg["cond_indep_stack"] if f.name == self.plate]
            dim = inside.dim() + frames[0] if frames else -1
            row = int(where[dim]) if 0 <= dim < where.numel() else None
            if row is not None and self.rows is not None:
                row = int(self.rows[row])
            event = msg["value"][tuple(where)].flatten()
            base = _base(msg["fn"])
            try:
                outside = event[~base.support.check(event)]
            except (RuntimeError, ValueError, TypeError):  # a support that needs the whole event
                outside = event
            shown = f"holds {float(outside[0]):g}, " if outside.numel() else ""
            named = f"data row {row}" if row is not None else "the data"
            raise DataError(
                f"{named}: observed site {msg['name']!r} {shown}outside the support of its {type(base).__name__} "
                f"({base.support}); fix the data (binarise it, say) or choose a likelihood for such values"
            )
        raise DataError("an observed value is outside its distribution's support")


def _base(fn: Any) -> Any:
    """The distribution inside Pyro's ``Independent`` / ``MaskedDistribution`` / ``ExpandedDistribution`` wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def sample_sites(tr: poutine.Trace) -> dict[str, dict]:
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}

def latent_nodes(tr: poutine.Trace) -> dict[str, dict]:
    return {n: s for n, s in sample_sites(tr).items() if not s["is_observed"] and not s["infer"].get("is_auxiliary")}


def data_like(args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> torch.Tensor | None:
    """The first floating-point tensor among a model's arguments: the device and dtype its chains and values should have."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


class PlaceFlat(Messenger):
    """Give a latent site whose distribution cannot be sampled (a flat ``ImproperUniform`` prior) a value without sampling it.

    The value is the support's image of zeros in unconstrained space (``biject_to``), in the dtype and on the
    device of ``like`` (the model's data), so that a model with a flat prior can be traced for its sites' shapes.
    """

    def __init__(self, like: torch.Tensor | None = None) -> None:
        super().__init__()
        self.like = like

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if not isinstance(fn, pyro.distributions.ImproperUniform) and not isinstance(getattr(fn, "base_dist", None), pyro.distributions.ImproperUniform):
            return
        t = biject_to(fn.support)
        shape = t.inverse_shape(fn.batch_shape + fn.event_shape)
        kw = {"dtype": self.like.dtype, "device": self.like.device} if self.like is not None else {}
        msg["value"] = t(torch.zeros(shape, **kw))


def model_latent_sites(model: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    with poutine.block(), torch.no_grad(), PlaceFlat(data_like(args, kwargs)):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    if not latent:
        raise ConfigError("the model has no latent sample sites: nothing to sample")
    return tr, latent

def vectorized(fn: Callable[..., object], size: int, dim: int, name: str = "_vectorized") -> Callable[..., object]:
    """``fn`` run inside a plate of ``size`` at ``dim`` (left of its own plates): ``size`` independent copies in one batch."""

    def run(*args: Any, **kwargs: Any) -> object:
        with pyro.plate(name, size, dim=dim):
            return fn(*args, **kwargs)

    return run


def sum_but_first(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over all dimensions but the leading (chain) one, of size ``n``."""
    return t.expand(n) if t.dim() == 0 else t.reshape(n, -1).sum(1)


def prior_predictive(model: Callable[..., object], *args: torch.Tensor, seed: int | None = None, what: str = "sample") -> dict[str, torch.Tensor]:
    """One run of ``model`` on ``args`` with its observed sites unconditioned: a draw of every sample site, in order.

    A model with a ``pyro.factor``, a scaled or masked site (an auxiliary term) or a latent outside
    the ``"data"`` plate is refused by the site's name: running it forward is not a draw from its
    prior predictive.
    """
    with seeded(seed), torch.no_grad(), poutine.block(), PlaceFlat(data_like(args)):  # a flat site gets a value here, then is refused below
        tr = poutine.trace(poutine.uncondition(model)).get_trace(*args)
    sites = {name: s for name, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    n = args[0].shape[0] if args else 0
    for name, s in sites.items():
        if isinstance(s["fn"], pyro.distributions.ImproperUniform) or isinstance(getattr(s["fn"], "base_dist", None), pyro.distributions.ImproperUniform):
            raise ConfigError(f"{what}: site {name!r} has a flat improper prior (an autoencoder's code): the model has no prior predictive to draw from")
        if type(s["fn"]).__name__ == "Unit":
            raise ConfigError(f"{what}: site {name!r} is a pyro.factor, which reweights the model: running it forward does not draw from it")
        if not (isinstance(s["scale"], (int, float)) and s["scale"] == 1.0) or s["mask"] is not None:
            raise ConfigError(f"{what}: site {name!r} is scaled or masked (an auxiliary term such as M2's classifier), not part of p(z) p(x | z); "
                              "pass the model's arguments that leave it out (for M2: x without labels)")
        if not any(f.name == "data" for f in s["cond_indep_stack"]):
            raise ConfigError(f"{what}: site {name!r} is outside the 'data' plate (a global latent): its draw would be shared by all {n} rows")
    return {name: s["value"] for name, s in sites.items()}
