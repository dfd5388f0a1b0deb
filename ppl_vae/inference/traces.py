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
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.distributions.transforms import biject_to
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ..errors import ConfigError, DataError, PplVaeError, SequentialWarning
from .plates import find_data_plate, on_data_plate
from .random import RowDraws, Streams, seeded

__all__ = [
    "SAMPLES",
    "per_datapoint",
    "probe",
    "trace_nesting",
    "plate_nesting",
    "traces",
    "log_weights",
    "check_pairs",
    "log_weights_of",
    "first_nonfinite_site",
    "nonfinite_at",
    "ObservedSupport",
    "check_rows",
    "analysed",
    "vectorises",
    "sample_sites",
    "latent_nodes",
    "model_latent_sites",
    "vectorized",
    "sum_but_first",
    "restrict",
    "PlaceFlat",
    "data_like",
    "prior_predictive",
]

SAMPLES = "_samples"  # the plate of vectorised draws added by ``traces(..., num_samples=S)``


def _keep_dim(lp: torch.Tensor, site: dict, name: str) -> int | None:
    dims = [f.dim for f in site["cond_indep_stack"] if f.name == name]
    if not dims:
        return None
    return lp.dim() + dims[0] if dims[0] < 0 else dims[0]


def per_datapoint(
    site: dict,
    plate: str,
    values: torch.Tensor | None = None,
    *,
    spread: int | None = None,
    draws: str = SAMPLES,
    masked: bool = False,
    what: str = "bounds",
) -> torch.Tensor:
    """A site's log-density (or ``values`` of its batch shape, e.g. a KL) summed over everything but the data plate (and the draws plate, if any).

    A site outside the data plate (a global latent, shared by every datapoint) is refused, unless ``spread``
    (the dataset's number of rows) is given: its term is then divided evenly between the datapoints,
    ``1 / spread`` of it in each row, so that the rows of the whole dataset sum to the ELBO.

    The one reducer of per-datapoint terms, for the bounds here and the estimators' particle terms:
    ``draws`` names the plate of draws kept beside the data plate (the estimators' vectorised
    particles); ``masked`` says ``values`` are already masked (a log-density Pyro scaled and masked);
    ``what`` names the caller in a refusal. ``values`` with fewer dimensions than the plates reach are
    taken as broadcast from the left; a data plate run sequentially (no dimension) is summed over.
    """
    lp = site["fn"].log_prob(site["value"]) if values is None else values
    if not masked and site.get("mask") is not None:
        lp = lp * site["mask"]
    dims = {f.name: f.dim for f in site["cond_indep_stack"]}
    if plate not in dims and spread is not None:
        kept = _keep_dim(lp, site, draws)
        total = lp.sum([d for d in range(lp.dim()) if d != kept]) if lp.dim() else lp
        return (total / spread).unsqueeze(-1)  # [S, 1] or [1]: broadcast over the rows
    if plate not in dims:
        raise ConfigError(
            f"site {site['name']!r} is outside the {plate!r} plate; per-datapoint {what} need every site inside it"
        )
    keep = [d for d in (dims.get(draws), dims[plate]) if d is not None]
    ndim = max(lp.dim(), -min(keep, default=0))
    if ndim > lp.dim():
        lp = lp.reshape((1,) * (ndim - lp.dim()) + lp.shape)
    other = [i for i in range(ndim) if i - ndim not in keep]
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
        raise DataError(
            f"{what}: the model or guide failed on the data of shape {shapes} ({first})"
        ) from None


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


def plate_nesting(
    model: Callable[..., object], guide: Callable[..., object], *args: torch.Tensor
) -> int:
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
        if not _sequential(model, guide):
            state = (
                streams.get_state() if streams is not None else None
            )  # a failed attempt's draws are not the draws' own
            try:
                with draws, pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
                    guide_tr = poutine.trace(guide).get_trace(*args)
                with pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
                return model_tr, guide_tr
            except (RuntimeError, IndexError, ValueError, TypeError) as exc:
                if isinstance(exc, PplVaeError):
                    raise
                failed = exc
            if streams is not None:
                streams.set_state(state)  # type: ignore[arg-type]
            one = traces(
                model, guide, *args, streams=streams
            )  # fails as the code fails, if it fails without the draws' plate too
            _SEQUENTIAL.setdefault(_unwrapped(model), weakref.WeakSet()).add(_unwrapped(guide))
            first = (
                str(failed).strip().splitlines()[0][:160]
                if str(failed).strip()
                else type(failed).__name__
            )
            warnings.warn(
                f"the model or guide cannot run {num_samples} draws at once ({type(failed).__name__}: {first}): they run one at a "
                f"time, about {num_samples} times the time of vectorised draws",
                SequentialWarning,
                stacklevel=2,
            )
        else:
            one = traces(model, guide, *args, streams=streams)
        runs = [one] + [
            traces(model, guide, *args, streams=streams) for _ in range(num_samples - 1)
        ]
    frame = CondIndepStackFrame(SAMPLES, -(depth + 1), num_samples, 0, num_samples)
    return _stack([m for m, _ in runs], frame), _stack([g for _, g in runs], frame)


def vectorises(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 2,
) -> str | None:
    """None if ``model`` and ``guide`` run ``num_samples`` draws at once (in a plate left of theirs); else why not, in one line."""
    depth = plate_nesting(model, guide, *args)
    try:
        with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
            with pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
                guide_tr = poutine.trace(guide).get_trace(*args)
            with pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
                poutine.replay(model, trace=guide_tr)(*args)
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        if isinstance(exc, PplVaeError):
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}"
    return None


#: the (model, guide) pairs whose code failed under vectorised draws: they run their draws one at a time (:func:`traces`)
_SEQUENTIAL: weakref.WeakKeyDictionary[
    Callable[..., object], weakref.WeakSet[Callable[..., object]]
] = weakref.WeakKeyDictionary()


def _sequential(model: Callable[..., object], guide: Callable[..., object]) -> bool:
    try:
        return _unwrapped(guide) in _SEQUENTIAL.get(_unwrapped(model), ())
    except TypeError:  # not weakly referenceable: tried again each time
        return False


def _unwrapped(program: Callable[..., object]) -> Callable[..., object]:
    """The user's own program inside the package's wrappers (``__wrapped__``): what is or is not vectorisable is its code."""
    while hasattr(program, "__wrapped__"):
        program = program.__wrapped__  # type: ignore[attr-defined]
    return program


class _Stacked(TorchDistribution):
    """The distributions of one site in ``S`` separate runs, as one distribution with the draws' dimension in front.

    What a site of a vectorised run would be, built from runs that could not be vectorised: its
    batch shape is ``(S, *batch)`` (``batch`` padded to ``depth`` dimensions), and its log-density at
    a stacked value is each run's log-density at its own value, stacked.
    """

    arg_constraints: dict[str, Any] = {}

    def __init__(self, fns: Sequence[Any], depth: int, *, observed: bool = False) -> None:
        self.fns, self.depth, self.observed = list(fns), depth, observed
        first = self.fns[0]
        batch = torch.broadcast_shapes(*(fn.batch_shape for fn in self.fns))
        batch = torch.Size((1,) * (depth - len(batch)) + tuple(batch))
        super().__init__(
            torch.Size((len(self.fns), *batch)), first.event_shape, validate_args=False
        )

    @property
    def support(self) -> Any:
        return self.fns[0].support

    @property
    def has_rsample(self) -> bool:
        return self.fns[0].has_rsample

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        values = (
            [value] * len(self.fns) if self.observed else value.unbind(0)
        )  # an observed value is every run's
        return torch.stack(
            [fn.log_prob(v).expand(self.batch_shape[1:]) for fn, v in zip(self.fns, values)]
        )


def _stack(trs: Sequence[Trace], frame: CondIndepStackFrame) -> Trace:
    """One trace of the ``S`` runs ``trs`` of one program, as a run with ``S`` vectorised draws would be (in the draws' plate ``frame``)."""
    depth = -frame.dim - 1
    out = Trace()
    for name, site in trs[0].nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            out.add_node(name, **site)
            continue
        sites = [tr.nodes[name] for tr in trs]
        event = site["fn"].event_dim

        def padded(v: torch.Tensor, event: int = event) -> torch.Tensor:
            return (
                v.reshape((1,) * (depth + event - v.dim()) + tuple(v.shape))
                if v.dim() < depth + event
                else v
            )

        stacked = dict(site)
        stacked["fn"] = _Stacked([s["fn"] for s in sites], depth, observed=site["is_observed"])
        stacked["value"] = (
            torch.stack([padded(s["value"]) for s in sites])
            if not site["is_observed"]
            else site["value"]
        )
        masks = [s.get("mask") for s in sites]
        if all(isinstance(m, torch.Tensor) for m in masks):
            stacked["mask"] = torch.stack(
                [m.reshape((1,) * (depth - m.dim()) + tuple(m.shape)) for m in masks]
            )  # type: ignore[union-attr]
        stacked["cond_indep_stack"] = (frame, *site["cond_indep_stack"])
        out.add_node(name, **stacked)
    return out


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
    model_tr, guide_tr = traces(
        model, guide, *args, num_samples=num_samples, nesting=nesting, streams=streams
    )
    total = log_weights_of(model_tr, guide_tr, plate)
    if num_samples is not None and total.dim() == 1:  # nothing depended on the draws
        total = total.expand(num_samples, -1)
    return total


def check_pairs(model_tr: Trace, guide_tr: Trace, what: str = "the ELBO") -> None:
    """Refuse a guide that lacks a latent site of the model (it would be drawn from the prior) or samples one the model lacks."""
    guide_sites = {
        n for n, s in guide_tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    }
    for name, site in model_tr.nodes.items():
        if (
            site["type"] == "sample"
            and not site_is_subsample(site)
            and not site["is_observed"]
            and name not in guide_sites
        ):
            raise ConfigError(
                f"{what}: the guide has no site {name!r}, a latent site of the model (it would be drawn from the prior)"
            )
    model_sites = {n for n, s in model_tr.nodes.items() if s["type"] == "sample"}
    for name in guide_sites:
        if name not in model_sites and not guide_tr.nodes[name]["infer"].get("is_auxiliary"):
            raise ConfigError(f"{what}: guide site {name!r} is not a latent site of the model")


def log_weights_of(
    model_tr: Trace, guide_tr: Trace, plate: str = "data", *, spread: int | None = None
) -> torch.Tensor:
    """``log p(x, z) - log q(z | x)`` per datapoint (and draw) from a guide trace and the model replayed on it (``spread``: :func:`per_datapoint`)."""
    check_pairs(model_tr, guide_tr, "the importance weights")
    total: torch.Tensor | int = 0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for site in tr.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + sign * per_datapoint(site, plate, spread=spread)
    if isinstance(total, int):
        raise ConfigError("the model has no sample sites")
    return total


def nonfinite_at(
    role: str, name: str, value: torch.Tensor, log_density: Callable[[], torch.Tensor]
) -> tuple[str | None, torch.Tensor | None]:
    """What went non-finite at one sample site, its value first, then its log-density (``log_density()``, computed only for a
    finite value): ``(description, log-density)``, the description None where both are finite.

    The one check of a site behind :func:`first_nonfinite_site` (on traces) and the training step's
    diagnosis of a diverged step (on the sites it recorded).
    """
    if not bool(torch.isfinite(value).all()):
        return f"{role} site {name!r} has a non-finite value", None
    lp = log_density()
    if not bool(torch.isfinite(lp).all()):
        return f"{role} site {name!r} has a non-finite log-density", lp
    return None, lp


def first_nonfinite_site(
    model_tr: Trace, guide_tr: Trace, plate: str = "data"
) -> tuple[str | None, str]:
    """``(name, description)`` of the first guide or model site whose value or per-datapoint log-density is not finite, or
    whose distribution has a parameter outside its constraint (in the traces themselves)."""
    for role, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                found, _ = nonfinite_at(
                    role, name, site["value"], partial(per_datapoint, site, plate, spread=1)
                )
                if found is not None:
                    return name, found
                bad = _invalid_parameter(site["fn"])
                if bad is not None:
                    return (
                        name,
                        f"{role} site {name!r} has its parameter {bad} outside its constraint",
                    )
    return None, "no single site (the sum overflowed)"


def _invalid_parameter(fn: Any) -> str | None:
    """The name of a parameter of ``fn`` (or of a distribution it wraps) outside its ``arg_constraints``, as torch's validation checks them."""
    while fn is not None:
        for name, constraint in getattr(fn, "arg_constraints", {}).items():
            value = fn.__dict__.get(
                name
            )  # a lazily computed parameter (probs of a logits-built Bernoulli) is not checked
            if isinstance(value, torch.Tensor) and not torch.distributions.constraints.is_dependent(
                constraint
            ):
                try:
                    inside = constraint.check(value)
                except (RuntimeError, ValueError, TypeError):
                    continue
                if not bool(inside.all()):
                    return f"{name} ({type(fn).__name__})"
        fn = getattr(fn, "base_dist", None)
    return None


class ObservedSupport(Messenger):
    """Check every observed site's value against its distribution's support (0/1 under a Bernoulli, say).

    Pyro scores a value outside the support without a word when its validation is off (a Bernoulli
    gives ``0.5 log p + 0.5 log(1 - p)`` for a pixel of 0.5), so a bad row met after the first step
    would train silently. With ``eager`` the first bad site raises at once (one host read per observed
    site); without it the checks only accumulate in :attr:`ok`, a boolean tensor on the data's device,
    so that the caller reads it with its other values and calls :meth:`raise_bad` when it is false.
    A site masked off as a whole (``mask`` False) is not checked, as Pyro does not validate it either.
    """

    def __init__(
        self, *, eager: bool = False, rows: torch.Tensor | None = None, plate: str = "data"
    ) -> None:
        super().__init__()
        self.eager, self.rows, self.plate = eager, rows, plate
        self.active = True  # off: nothing is checked (rows already checked, in a loop that reads the same tensors again)
        self.ok: torch.Tensor | bool = True
        self.checks: list[tuple[dict[str, Any], torch.Tensor]] = []
        self._one: torch.Tensor | None = (
            None  # the flag of a pass that checked nothing, made once per device
        )

    def __enter__(self) -> ObservedSupport:
        self.ok, self.checks = True, []
        return super().__enter__()

    def entered(self) -> contextlib.AbstractContextManager[Any]:
        """What a pass enters: this checker, or (inactive) nothing, its result an empty check's."""
        if self.active:
            return self
        self.ok, self.checks = True, []
        return contextlib.nullcontext()

    def flag(self, like: torch.Tensor) -> torch.Tensor:
        """The last pass's result as a float64 scalar on ``like``'s device: 1 where every value was inside its support."""
        if self.ok is not True:
            return self.ok.to(device=like.device, dtype=torch.float64)
        if self._one is None or self._one.device != like.device:
            self._one = torch.ones((), dtype=torch.float64, device=like.device)
        return self._one

    def _postprocess_message(self, msg: dict[str, Any]) -> None:
        if (
            msg["type"] != "sample"
            or not msg["is_observed"]
            or site_is_subsample(msg)
            or msg.get("mask") is False
        ):
            return
        fn = msg["fn"]
        if fn.support is torch.distributions.constraints.real or not isinstance(
            msg["value"], torch.Tensor
        ):
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
            where = (
                (~inside).nonzero()[0] if inside.dim() else inside.new_zeros(0, dtype=torch.long)
            )
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
    return {
        n: s
        for n, s in sample_sites(tr).items()
        if not s["is_observed"] and not s["infer"].get("is_auxiliary")
    }


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
        if not isinstance(fn, pyro.distributions.ImproperUniform) and not isinstance(
            getattr(fn, "base_dist", None), pyro.distributions.ImproperUniform
        ):
            return
        t = biject_to(fn.support)
        shape = t.inverse_shape(fn.batch_shape + fn.event_shape)
        kw = {"dtype": self.like.dtype, "device": self.like.device} if self.like is not None else {}
        msg["value"] = t(torch.zeros(shape, **kw))


def model_latent_sites(
    model: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, list[str]]:
    with poutine.block(), torch.no_grad(), PlaceFlat(data_like(args, kwargs)):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    latent = [
        n
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    if not latent:
        raise ConfigError("the model has no latent sample sites: nothing to sample")
    return tr, latent


def vectorized(
    fn: Callable[..., object], size: int, dim: int, name: str = "_vectorized"
) -> Callable[..., object]:
    """``fn`` run inside a plate of ``size`` at ``dim`` (left of its own plates): ``size`` independent copies in one batch."""

    def run(*args: Any, **kwargs: Any) -> object:
        with pyro.plate(name, size, dim=dim):
            return fn(*args, **kwargs)

    return run


def sum_but_first(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over all dimensions but the leading (chain) one, of size ``n``."""
    return t.expand(n) if t.dim() == 0 else t.reshape(n, -1).sum(1)


def prior_predictive(
    model: Callable[..., object], *args: torch.Tensor, seed: int | None = None, what: str = "sample"
) -> dict[str, torch.Tensor]:
    """One run of ``model`` on ``args`` with its observed sites unconditioned: a draw of every sample site, in order.

    A model with a ``pyro.factor``, a scaled or masked site (an auxiliary term) or a latent outside
    the ``"data"`` plate is refused by the site's name: running it forward is not a draw from its
    prior predictive.
    """
    with (
        seeded(seed),
        torch.no_grad(),
        poutine.block(),
        PlaceFlat(data_like(args)),
    ):  # a flat site gets a value here, then is refused below
        tr = poutine.trace(poutine.uncondition(model)).get_trace(*args)
    sites = {
        name: s
        for name, s in tr.nodes.items()
        if s["type"] == "sample" and not site_is_subsample(s)
    }
    n = args[0].shape[0] if args else 0
    for name, s in sites.items():
        if isinstance(s["fn"], pyro.distributions.ImproperUniform) or isinstance(
            getattr(s["fn"], "base_dist", None), pyro.distributions.ImproperUniform
        ):
            raise ConfigError(
                f"{what}: site {name!r} has a flat improper prior (an autoencoder's code): the model has no prior predictive to draw from"
            )
        if type(s["fn"]).__name__ == "Unit":
            raise ConfigError(
                f"{what}: site {name!r} is a pyro.factor, which reweights the model: running it forward does not draw from it"
            )
        if (
            not (isinstance(s["scale"], (int, float)) and s["scale"] == 1.0)
            or s["mask"] is not None
        ):
            raise ConfigError(
                f"{what}: site {name!r} is scaled or masked (an auxiliary term such as M2's classifier), not part of p(z) p(x | z); "
                "pass the model's arguments that leave it out (for M2: x without labels)"
            )
        if not any(f.name == "data" for f in s["cond_indep_stack"]):
            raise ConfigError(
                f"{what}: site {name!r} is outside the 'data' plate (a global latent): its draw would be shared by all {n} rows"
            )
    return {name: s["value"] for name, s in sites.items()}


def _no_guide(*args: Any, **kwargs: Any) -> None:
    return None


def check_rows(data: Sequence[torch.Tensor], analysis: str) -> None:
    """Refuse ``data`` without a datapoint (no argument, or a first one that is not a tensor with rows): a ``ConfigError`` naming ``analysis``."""
    if (
        not data
        or not isinstance(data[0], torch.Tensor)
        or data[0].dim() < 1
        or data[0].shape[0] < 1
    ):
        raise ConfigError(f"{analysis} needs at least one datapoint (a tensor with rows)")


def analysed(
    model: Callable[..., object],
    guide: Callable[..., object] | None,
    data: Sequence[torch.Tensor],
    analysis: str,
    *,
    plate: str | None = None,
    local: bool = True,
) -> tuple[Callable[..., object], Callable[..., object] | None]:
    """The model and guide a per-datapoint analysis runs, with its data plate named ``"data"``; what it refuses, refused now.

    Found on a probe run of the first two rows (:func:`~.plates.find_data_plate`), before any work:
    the data plate (any name, or ``plate``), which is then named ``"data"``. Refused by name: a model
    that subsamples its data plate itself (it does not score the rows it is given); a ``pyro.param``
    missing from Pyro's parameter store (the analysis would run on its initial value, not on what
    ``fit`` trained: run it inside ``result.scope()``); with ``local``, a latent site outside the data
    plate (a global latent: the analysis is per datapoint).
    """
    check_rows(data, analysis)
    head = tuple(t[:2] for t in data)
    first = (
        restrict(guide, slice(0, head[0].shape[0])) if guide is not None else _no_guide
    )  # a per-datapoint guide, cut to the probe's rows
    with (
        torch.no_grad(),
        poutine.block(),
        pyro.get_param_store().scope(pyro.get_param_store().get_state()),
    ):
        modules = _modules_called(model, first, head)
    with _evaluation(modules):
        found = find_data_plate(model, first, head, plate=plate, what=analysis, data=data)
    if found.subsampled:
        raise ConfigError(
            f"{analysis}: plate {found.name!r} subsamples the data itself (subsample_size={found.subsample_size}), so the model "
            f"does not score the rows it is given; write it over them, pyro.plate({found.name!r}, x.shape[0])"
        )
    if found.fresh:
        raise ConfigError(
            f"{analysis}: pyro.param {found.fresh[0]!r} is not in Pyro's parameter store, so the analysis would use its initial "
            "value; a fit keeps its parameters in its result: run the analysis inside `with result.scope():`"
        )
    if local and found.shared:
        raise ConfigError(
            f"{analysis} is per datapoint; site {found.shared[0]!r} is outside the data plate {found.name!r} "
            "(a latent shared by all datapoints)"
        )
    return _evaluating(on_data_plate(model, found), modules), (
        _evaluating(on_data_plate(guide, found), modules) if guide is not None else None
    )


@contextlib.contextmanager
def _evaluation(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """``modules`` in evaluation mode inside the block, each back in its own mode after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.train(False)
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _modules_called(
    model: Callable[..., object], guide: Callable[..., object], args: tuple[torch.Tensor, ...]
) -> list[torch.nn.Module]:
    """The modules with a training mode that matters (batch norm, dropout) that one run of ``guide`` and ``model`` calls.

    Each is put in evaluation mode as it is first called (so that a batch norm in training mode runs on a
    probe of one row), and back in its own mode after the run. A run that fails gives the modules called
    until then: the probe after it (:func:`~.plates.find_data_plate`) names what failed.
    """
    seen: dict[int, tuple[torch.nn.Module, bool]] = {}

    def hook(module: torch.nn.Module, inputs: Any) -> None:
        if isinstance(module, _MODED) and id(module) not in seen:
            seen[id(module)] = (module, module.training)
            module.train(False)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        guide_tr = poutine.trace(guide).get_trace(*args)
        poutine.replay(model, trace=guide_tr)(*args)
    except Exception:  # noqa: BLE001 - named by the probe that follows
        pass
    finally:
        handle.remove()
        for module, mode in seen.values():
            module.train(mode)
    return [module for module, _ in seen.values()]


#: the layers whose training mode changes what they compute
_MODED = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _evaluating(
    program: Callable[..., object], modules: Sequence[torch.nn.Module]
) -> Callable[..., object]:
    """``program`` with ``modules`` in evaluation mode while it runs (:func:`_evaluation`): a datapoint's result does not
    depend on its batch (batch norm's running statistics, not the batch's) and draws no dropout noise."""
    if not modules:
        return program

    def run(*args: Any, **kwargs: Any) -> object:
        with _evaluation(modules):
            return program(*args, **kwargs)

    run.__wrapped__ = program  # type: ignore[attr-defined]

    select = getattr(program, "select", None)
    if callable(select):
        run.select = lambda rows: _evaluating(select(rows), modules)  # type: ignore[attr-defined]
    return run
