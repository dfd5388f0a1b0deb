r"""Variational draws in the layout of the MCMC draws, with their importance log-weights.

From an amortised guide or any per-datapoint guide (:func:`vi_draws`,
:func:`vi_draws_amortized`: every latent site of the model, vectorised), from
a batch of distributions over the joint latent (:func:`vi_draws_latent`, e.g.
a local :math:`q^*`), or from a Pyro autoguide fitted to any model
(:func:`vi_draws_autoguide`). Each returns
:class:`~ppl_vae.inference.mcmc.draws.Draws` with
``sample_stats["log_weight"]`` :math:`= \log p(x, z) - \log q(z)` per draw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, autoguide
from pyro.poutine.util import site_is_subsample

from ...distributions import gaussian_base, gaussian_draw
from ...errors import ConfigError, check_int
from ..latent import latent_of, log_joint
from ..random import Streams, Tag, dataset_index, draws_in_batches, seeded
from ..traces import (
    analysed,
    log_weights_of,
    model_latent_sites,
    restrict,
    sum_but_first,
    trace_nesting,
    traces,
    vectorized,
)
from .draws import Draws, point_layout, site_dims

__all__ = ["vi_draws", "vi_draws_latent", "vi_draws_amortized", "vi_draws_autoguide"]


#: autoguide family name -> class name in ``pyro.infer.autoguide``
AUTOGUIDES = {"normal": "AutoNormal", "mvn": "AutoMultivariateNormal", "iaf": "AutoIAFNormal"}


def vi_draws(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 1000,
    seed: int = 0,
    method: str = "vi",
    index: torch.Tensor | None = None,
) -> Draws:
    r"""Draws of a per-datapoint guide for every row of ``args``, with their importance log-weights.

    Every latent site of the model is drawn (vectorised, ``num_samples`` per
    datapoint); ``sample_stats["log_weight"]`` holds
    :math:`\log p(x_n, z) - \log q(z \mid x_n)` per draw and datapoint.
    Output layout as :func:`~ppl_vae.inference.mcmc.hmc_latent`:
    ``samples[site]`` ``[1, S, N, *event]``, the ``point`` coordinates the
    rows' dataset indices ``index`` (default ``0..N-1``). Each datapoint draws
    from its own stream, seeded from ``(seed, index)``
    (:class:`~ppl_vae.inference.random.Streams`; a guide with a site that is
    not a transformed Gaussian runs one row at a time), so its draws do not
    depend on the other rows.
    """
    check_int(num_samples, "number of VI draws")
    model, guide = analysed(model, guide, args, "VI draws")  # type: ignore[assignment]
    latent = latent_of(model, *args, guide=guide, analysis="VI draws")
    n = latent.num_points
    idx = dataset_index(index, n)
    values: dict[str, list[torch.Tensor]] = {s.name: [] for s in latent.sites}
    weights = []
    with (
        torch.no_grad(),
        seeded(seed),
    ):  # the probe run and a seed=None leave the caller's random stream as it was
        streams = Streams(seed, idx, args[0].device, Tag.VI)
        batched = draws_in_batches(restrict(guide, slice(0, 1)), *(t[:1] for t in args))
        for rows in [slice(None)] if batched else [slice(i, i + 1) for i in range(n)]:
            part = tuple(t[rows] for t in args)
            model_tr, guide_tr = traces(
                model,
                restrict(guide, rows),
                *part,
                num_samples=num_samples,
                streams=streams.select(rows),
            )
            weights.append(log_weights_of(model_tr, guide_tr))
            for s in latent.sites:
                values[s.name].append(
                    model_tr.nodes[s.name]["value"].reshape(num_samples, part[0].shape[0], *s.shape)
                )
    lw = torch.cat(weights, 1)
    samples = {name: torch.cat(v, 1)[None].cpu().numpy() for name, v in values.items()}
    dims, coords = point_layout(latent, ("log_weight",), idx.tolist())
    return Draws(samples, {"log_weight": lw[None].cpu().numpy()}, dims, coords, method)


def vi_draws_latent(
    model: Callable[..., object],
    q: torch.distributions.Distribution,
    *args: torch.Tensor,
    num_samples: int = 1000,
    seed: int = 0,
    method: str = "vi",
    index: torch.Tensor | None = None,
) -> Draws:
    r"""Draws from ``q`` over the model's joint latent (batch ``[N]``, event ``[K]``), as :func:`vi_draws`.

    ``q`` is a batch of distributions over the unconstrained joint latent
    (:class:`~ppl_vae.inference.latent.Latent`), e.g. a local :math:`q^*`'s
    ``distribution()``; for a model with one real-valued latent site with a
    1-d event, that site itself. A transformed Gaussian ``q`` draws from one
    stream per datapoint, as :func:`vi_draws` (any other ``q`` from one
    stream seeded by ``seed``).
    """
    model, _ = analysed(model, None, args, "VI draws")
    latent = latent_of(model, *args, analysis="VI draws")
    if tuple(q.batch_shape) != (latent.num_points,) or tuple(q.event_shape) != (latent.dim,):
        raise ConfigError(
            f"q must have batch shape ({latent.num_points},) and event shape ({latent.dim},) (the joint latent {latent.describe()}), "
            f"got {tuple(q.batch_shape)} and {tuple(q.event_shape)}"
        )
    idx = dataset_index(index, latent.num_points)
    base = gaussian_base(q)
    with torch.no_grad(), seeded(seed):
        if base is not None:
            streams = Streams(seed, idx, args[0].device, Tag.VI)
            u = gaussian_draw(
                q.expand((num_samples, *q.batch_shape)),
                lambda shape: streams.normal(tuple(shape), 1, base.loc.dtype),
            )
        else:
            u = q.sample((num_samples,))  # [S, N, K]
        lw = log_joint(model, latent, *args)(u) - q.log_prob(u)
        values, _ = latent.constrain(u)
    samples = {name: v[None].cpu().numpy() for name, v in values.items()}
    dims, coords = point_layout(latent, ("log_weight",), idx.tolist())
    return Draws(samples, {"log_weight": lw[None].cpu().numpy()}, dims, coords, method)


def vi_draws_amortized(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 1000,
    seed: int = 0,
    index: torch.Tensor | None = None,
) -> Draws:
    r"""Draws of the amortised guide's :math:`q(z \mid x_n)` for every row of ``args`` (see :func:`vi_draws`)."""
    return vi_draws(
        model, guide, *args, num_samples=num_samples, seed=seed, method="vi-amortized", index=index
    )


def _autoguide(model: Callable[..., object], family: str, options: dict[str, Any]) -> Any:

    if family not in AUTOGUIDES:
        raise ConfigError(
            f"unknown autoguide family {family!r}; choose one of {', '.join(AUTOGUIDES)}"
        )
    return getattr(autoguide, AUTOGUIDES[family])(model, **options)


def vi_draws_autoguide(
    model: Callable[..., object],
    *args: Any,
    family: str = "normal",
    num_steps: int = 2000,
    lr: float = 0.01,
    lr_decay: float = 0.01,
    num_particles: int = 4,
    num_samples: int = 1000,
    seed: int = 0,
    guide_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Draws:
    r"""Fit a Pyro autoguide to any model by SVI and draw from it.

    ``family`` is ``"normal"`` (:class:`~pyro.infer.autoguide.AutoNormal`,
    mean-field), ``"mvn"`` (``AutoMultivariateNormal``) or ``"iaf"``
    (``AutoIAFNormal``), built with ``guide_options`` (e.g. ``init_scale``). The guide's parameters live in the guide module
    (``module_local_params``), never in Pyro's global param store; it is
    trained by ``torch.optim.Adam`` on ``Trace_ELBO`` with ``num_particles``
    vectorised particles, the learning rate decaying exponentially from ``lr``
    to ``lr * lr_decay`` over ``num_steps``. Draws are taken under a vectorised particle plate;
    ``sample_stats["log_weight"]`` (``[1, S]``) holds
    :math:`\log p(x, z) - \log q(z)` per draw.

    Returns
    -------
    Draws
        ``samples[name]`` ``[1, S, *site_shape]`` for every latent site of the model.
    """

    check_int(num_samples, "number of VI draws")
    plain, latent = model_latent_sites(model, args, kwargs)
    dim = -(trace_nesting(plain) + 1)
    with pyro.settings.context(module_local_params=True), seeded(seed):
        guide = _autoguide(model, family, dict(guide_options or {}))
        guide(*args, **kwargs)  # creates the parameters
        opt = torch.optim.Adam(guide.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(
            opt, gamma=lr_decay ** (1 / max(num_steps, 1))
        )
        elbo = Trace_ELBO(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=-dim - 1,
        )
        for _ in range(num_steps):
            opt.zero_grad()
            loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
            loss.backward()
            opt.step()
            sched.step()

        with torch.no_grad(), poutine.block():
            guide_tr = poutine.trace(vectorized(guide, num_samples, dim)).get_trace(*args, **kwargs)
            model_tr = poutine.trace(
                poutine.replay(vectorized(model, num_samples, dim), trace=guide_tr)
            ).get_trace(*args, **kwargs)
            lw: torch.Tensor | float = 0.0  # on the draws' device
            for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
                tr.compute_log_prob(site_filter=lambda name, s: not site_is_subsample(s))
                for s in tr.nodes.values():
                    if s["type"] == "sample" and "log_prob" in s:
                        lw = lw + sign * sum_but_first(s["log_prob"], num_samples)
    shapes = {name: tuple(plain.nodes[name]["value"].shape) for name in latent}
    samples = {
        name: model_tr.nodes[name]["value"].reshape(1, num_samples, *shape).cpu().numpy()
        for name, shape in shapes.items()
    }
    return Draws(
        samples,
        {"log_weight": lw[None].cpu().numpy()},
        site_dims(shapes),
        {},
        f"vi-{AUTOGUIDES[family]}",
    )
