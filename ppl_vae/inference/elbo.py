r"""Per-datapoint ELBO of any model and guide written the ppl-vae way.

.. math::

    \mathcal{L}_n = \frac{1}{S} \sum_{s=1}^{S}
        \log p(x_n, z_n^{(s)}) - \log q(z_n^{(s)} \mid x_n),
    \qquad z_n^{(s)} \sim q(\cdot \mid x_n)

One value per datapoint (shape ``[N]``): the log-densities of every site are
summed over all dimensions except the ``"data"`` plate. Scales set by
handlers (minibatch scaling, beta) are ignored: this is the true ELBO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from ..errors import ConfigError, DataError, NonFiniteError, PplVaeError

__all__ = ["SAMPLES", "traces", "plate_nesting", "log_weights", "log_weights_of", "check_pairs", "first_nonfinite_site", "elbo_per_datapoint", "evaluate_elbo"]


SAMPLES = "_samples"  # the plate of vectorised draws added by ``traces(..., num_samples=S)``


def _keep_dim(lp: torch.Tensor, site: dict, name: str) -> int | None:
    dims = [f.dim for f in site["cond_indep_stack"] if f.name == name]
    if not dims:
        return None
    return lp.dim() + dims[0] if dims[0] < 0 else dims[0]


def _per_datapoint(site: dict, plate: str) -> torch.Tensor:
    """A site's log-density summed over everything but the data plate (and the draws plate, if any)."""
    lp = site["fn"].log_prob(site["value"])
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
) -> tuple[Trace, Trace]:
    """``(model_trace, guide_trace)``: the guide run on ``args``, the model replayed on its draws.

    With ``num_samples=S`` both run inside a plate of ``S`` vectorised draws
    (to the left of ``nesting`` plates, found by :func:`plate_nesting` if not
    given), as Pyro's ``vectorize_particles`` does. Blocked from outer
    handlers, so it can run inside another inference.
    """
    with poutine.block():
        if num_samples is None:
            guide_tr = poutine.trace(guide).get_trace(*args)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
            return model_tr, guide_tr
        depth = plate_nesting(model, guide, *args) if nesting is None else nesting
        with pyro.plate(SAMPLES, num_samples, dim=-(depth + 1)):
            guide_tr = poutine.trace(guide).get_trace(*args)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    return model_tr, guide_tr


def log_weights(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    plate: str = "data",
    num_samples: int | None = None,
    nesting: int | None = None,
) -> torch.Tensor:
    """Importance log-weights ``log p(x, z) - log q(z | x)`` per datapoint, ``z ~ q``.

    Returns shape ``[N]`` (one draw each), or ``[S, N]`` with ``num_samples=S``
    vectorised draws; their mean over draws is the ELBO.
    """
    model_tr, guide_tr = traces(model, guide, *args, num_samples=num_samples, nesting=nesting)
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
                total = total + sign * _per_datapoint(site, plate)
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
                if not bool(torch.isfinite(_per_datapoint(site, plate)).all()):
                    return name, f"{role} site {name!r} has a non-finite log-density"
    return None, "no single site (the sum overflowed)"


def elbo_per_datapoint(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_particles: int = 1,
    plate: str = "data",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELBO per datapoint and its Monte Carlo standard error, each ``[N]``.

    The standard error is zero-width (NaN) for a single particle.

    Raises
    ------
    NonFiniteError
        When some datapoint's estimate is not finite, naming the site (found in
        the traces that produced it) or the invalid distribution parameter.
    """
    if num_particles < 1:
        raise ConfigError(f"num_particles must be >= 1, got {num_particles}")
    draws = []
    with torch.no_grad():
        for _ in range(num_particles):
            rng, invalid = torch.get_rng_state(), ""
            try:
                model_tr, guide_tr = traces(model, guide, *args)
            except ValueError as exc:  # torch's argument validation meets an invalid parameter
                if "Expected parameter" not in str(exc):
                    raise
                invalid = f"a distribution got an invalid parameter ({str(exc).splitlines()[0][:120]}); "
                torch.set_rng_state(rng)  # the same draws again, unvalidated, to find the site
                with pyro.validation_enabled(False):
                    model_tr, guide_tr = traces(model, guide, *args)
            lw = log_weights_of(model_tr, guide_tr, plate)
            if invalid or not bool(torch.isfinite(lw).all()):
                name, where = first_nonfinite_site(model_tr, guide_tr, plate)
                raise NonFiniteError(f"{invalid}the ELBO of {int((~torch.isfinite(lw)).sum())} datapoint(s) is not finite: {where}", site=name)
            draws.append(lw)
    stacked = torch.stack(draws)
    mean = stacked.mean(0)
    se = stacked.std(0) / num_particles**0.5 if num_particles > 1 else torch.full_like(mean, float("nan"))
    return mean, se


def evaluate_elbo(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: Sequence[torch.Tensor],
    *,
    batch_size: int = 1000,
    num_particles: int = 1,
) -> torch.Tensor:
    """Per-datapoint ELBO (``[N]``, nats) over ``data`` (a tuple of tensors), in batches."""
    n = data[0].shape[0]
    out = [
        elbo_per_datapoint(model, guide, *(t[i : i + batch_size] for t in data), num_particles=num_particles)[0]
        for i in range(0, n, batch_size)
    ]
    return torch.cat(out)
