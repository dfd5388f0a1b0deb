r"""Gradient diagnostics: mean, variance and signal-to-noise ratio of each estimator's gradient.

At fixed parameters, draw the gradient of the per-datapoint negative ELBO
(or bound) ``repeats`` times on the same data and summarise each parameter
group :math:`g \in \mathbb{R}^P`:

.. math::

    \mu = \hat{\mathbb{E}}[g], \qquad
    \mathrm{variance} = \sum_{p=1}^{P} \widehat{\mathrm{Var}}[g_p], \qquad
    \mathrm{SNR} = \frac1P \sum_{p=1}^{P} \frac{|\mu_p|}{\widehat{\mathrm{sd}}[g_p]}

(the per-parameter SNR of Rainforth et al. 2018, averaged over the group).
:func:`gradient_course` repeats this at chosen epochs while training.

References
----------
Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), Tighter Variational
Bounds are Not Necessarily Better. Mohamed et al. (2020), Monte Carlo
Gradient Estimation in Machine Learning.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from .batches import as_tensors
from .estimators import Estimator, get_estimator
from .params import discover
from .random import seeded
from .step import SVI
from .svi import fit

__all__ = ["GradientStats", "gradient_stats", "gradient_course", "parameter_groups"]


@dataclass(frozen=True)
class GradientStats:
    """One row per (estimator, parameter group[, epoch]): ``mean_norm``, ``variance``, ``snr`` and sizes."""

    rows: tuple[dict[str, Any], ...]

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))


def parameter_groups(
    model: Callable[..., object], guide: Callable[..., object], example: Sequence[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """The parameters of each outermost module the model and guide call, named ``"i:Class"``."""
    found = discover(model, guide, tuple(example))
    inner = {id(sub) for m in found.modules for sub in m.modules() if sub is not m}
    groups = {}
    for i, m in enumerate(m for m in found.modules if id(m) not in inner):
        params = [p for p in m.parameters() if p.requires_grad]
        if params:
            groups[f"{i}:{type(m).__name__}"] = params
    return groups


def _warm(loss: Any, data: tuple[torch.Tensor, ...], steps: int, lr: float) -> None:
    """Train the estimator's own state (moving averages, NVIL's network) with the model held fixed."""
    own = loss.parameters(*data) if hasattr(loss, "parameters") else []
    optim = torch.optim.Adam(own, lr=lr) if own else None
    for _ in range(steps):
        value = loss(*data)
        if optim is not None:
            optim.zero_grad(set_to_none=True)
            value.backward(inputs=own)
            optim.step()


def gradient_stats(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: torch.Tensor | Sequence[torch.Tensor],
    *,
    estimators: Sequence[str | Estimator],
    repeats: int = 100,
    groups: Mapping[str, Sequence[torch.Tensor]] | None = None,
    num_particles: int = 1,
    warmup: int = 50,
    warmup_lr: float = 1e-2,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> GradientStats:
    r"""Mean, variance (trace) and SNR of each estimator's gradient per parameter group.

    Parameters
    ----------
    model, guide : callable
        As for :func:`ppl_vae.inference.fit`; their parameters are not changed.
    data : tensor or tuple of tensors
        The batch every draw uses; gradients are of the *mean* per-datapoint
        negative objective over it.
    estimators : sequence of str or Estimator
        E.g. ``["reparam", "score", "score+average", "score+nvil"]``.
    repeats : int
        Gradient draws per estimator (R); variance has relative standard
        error about :math:`\sqrt{2/(R-1)}` for Gaussian gradients.
    groups : mapping, optional
        Name -> parameters; by default one group per outermost module
        (:func:`parameter_groups`).
    num_particles : int
        Samples per datapoint per draw (``score+loo`` needs >= 2).
    warmup : int
        Draws that only train the estimator's own state (the decaying
        average, NVIL's network; Adam at ``warmup_lr``) before measuring.
    seed : int
        Seeds every estimator's draws identically.
    extra : mapping, optional
        Columns added to every row (e.g. the epoch).

    Returns
    -------
    GradientStats
    """
    tensors = as_tensors(data)
    if not isinstance(repeats, int) or repeats < 2:
        raise ConfigError(f"repeats must be an integer >= 2, got {repeats!r}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ConfigError(f"num-particles must be an integer >= 1, got {num_particles!r}")
    if not estimators:
        raise ConfigError("no estimators given")
    ests = [get_estimator(e) for e in estimators]
    for est in ests:
        est.validate(num_particles)
    groups = dict(groups) if groups is not None else parameter_groups(model, guide, tensors)
    n = tensors[0].shape[0]
    rows: list[dict[str, Any]] = []
    for est in ests:
        with seeded(
            seed
        ):  # every estimator sees the same draws sequence; the caller's RNG is left as it was
            svi = SVI(
                model, guide, estimator=est, num_particles=num_particles, own_store=False
            ).setup(*tensors)  # the step fit takes
            svi.objective.validate = False  # type: ignore[union-attr]
            if getattr(est, "baseline", None) in ("average", "nvil"):  # stateful baselines
                _warm(svi.objective.loss_fn, tensors, warmup, warmup_lr)  # type: ignore[union-attr]
            flat = {name: [p for p in ps] for name, ps in groups.items()}
            total = {
                name: ps[0].new_zeros(sum(p.numel() for p in ps), dtype=torch.float64)
                for name, ps in flat.items()
            }
            total_sq = {name: torch.zeros_like(t) for name, t in total.items()}
            every = [p for ps in flat.values() for p in ps]
            for _ in range(repeats):
                grads = torch.autograd.grad(svi.loss(*tensors).loss / n, every, allow_unused=True)
                it = iter(grads)
                for name, ps in flat.items():
                    g = torch.cat(
                        [
                            (gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                            for p, gr in zip(ps, it)
                        ]
                    ).double()
                    total[name] += g
                    total_sq[name] += g * g
            for name in flat:
                mean = total[name] / repeats
                var = ((total_sq[name] - repeats * mean * mean) / (repeats - 1)).clamp_min(0)
                sd = var.sqrt()
                snr = torch.where(sd > 0, mean.abs() / sd, torch.zeros_like(sd))
                rows.append(
                    {
                        **(extra or {}),
                        "estimator": est.name,
                        "group": name,
                        "num_params": mean.numel(),
                        "mean_norm": mean.norm().item(),
                        "variance": var.sum().item(),
                        "snr": snr.mean().item(),
                        "repeats": repeats,
                        "num_particles": num_particles,
                        "batch_size": n,
                    }
                )
    return GradientStats(tuple(rows))


def gradient_course(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: torch.Tensor | Sequence[torch.Tensor],
    *,
    train_estimator: str | Estimator,
    estimators: Sequence[str | Estimator],
    epochs: Sequence[int],
    probe: Sequence[torch.Tensor] | None = None,
    groups: Mapping[str, Sequence[torch.Tensor]] | None = None,
    repeats: int = 100,
    num_particles: int = 1,
    seed: int = 0,
    **fit_options: Any,
) -> GradientStats:
    """:func:`gradient_stats` at each of ``epochs`` (0 = initialisation) of one training run.

    Trains with ``fit(model, guide, data, estimator=train_estimator, ...)``
    in chunks, resuming bit for bit from a temporary checkpoint, and measures
    the gradients on ``probe`` (default: the first 100 rows of ``data``)
    after each chunk. The rows carry an ``epoch`` column.
    """
    tensors = as_tensors(data)
    marks = sorted(set(int(e) for e in epochs))
    if not marks or marks[0] < 0:
        raise ConfigError(f"epochs must be non-negative integers, got {list(epochs)}")
    probe_t = tuple(probe) if probe is not None else tuple(t[:100] for t in tensors)
    rows: list[dict[str, Any]] = []
    done = 0
    with tempfile.TemporaryDirectory(prefix="ppl-vae-course-") as tmp:
        for mark in marks:
            if mark > done:
                fit(
                    model,
                    guide,
                    tensors,
                    estimator=train_estimator,
                    num_particles=num_particles,
                    epochs=mark,
                    seed=seed,
                    out=tmp,
                    resume=done > 0,
                    progress=False,
                    **fit_options,
                )
                done = mark
            stats = gradient_stats(
                model,
                guide,
                probe_t,
                estimators=estimators,
                repeats=repeats,
                groups=groups,
                num_particles=num_particles,
                seed=seed,
                extra={"epoch": mark},
            )
            rows.extend(stats.rows)
    return GradientStats(tuple(rows))
