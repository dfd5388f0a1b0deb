"""Divergence diagnostics of training: an ELBO estimate that is impossible, or that jumped by orders of magnitude.

The checks run on the one value each step reads back to the host (:mod:`.step`), as Python floats.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import pyro
import torch
from pyro.poutine.util import site_is_subsample

from .traces import traces


class DivergenceWatch:
    r"""Stops training on an ELBO estimate that is impossible or that jumped by orders of magnitude.

    * **Above the bound.** When every observed site is discrete, :math:`\log p(x) \le 0`, and by
      Markov's inequality :math:`P(\log w > t) \le p(x)\, e^{-t} \le e^{-t}` for a weight
      :math:`w = p(x, z) / q(z)` (also for an IWAE mean of weights; with a KL weight ``beta`` the
      bound holds for :math:`t / \max(\beta, 1)`). A minibatch mean above :math:`t = 50` nats per
      datapoint therefore has probability below :math:`B e^{-50} \approx 10^{-20}` for a valid model
      and guide: it means a distribution left its valid set or float round-off broke a density.
    * **Growth.** An estimate whose magnitude is :data:`GROWTH` times the median magnitude of the
      last :data:`WINDOW` steps (at least 1 nat).
    """

    BOUND_SLACK, GROWTH, WINDOW = 50.0, 1e4, 100

    def __init__(self, bounded: bool, beta: float) -> None:
        self.limit = self.BOUND_SLACK * max(beta, 1.0) if bounded else None
        self.recent: list[float] = []

    def check(self, elbo: float) -> str | None:
        if self.limit is not None and elbo > self.limit:
            return f"the ELBO estimate {elbo:.3g} nats per datapoint is above what discrete data allow (log p(x) <= 0; > {self.limit:g} has probability < 1e-20)"
        if self.recent:
            ref = max(_median_magnitude(self.recent), 1.0)
            if abs(elbo) > self.GROWTH * ref:
                return f"the ELBO estimate jumped to {elbo:.3g} nats per datapoint from a recent median magnitude of {ref:.3g}"
        self.recent = (self.recent + [elbo])[-self.WINDOW :]
        return None


def _median_magnitude(values: list[float]) -> float:
    """The lower median of ``|values|`` in single precision, on the host: ``float(torch.tensor(values).abs().median())``
    without a tensor op (``array("f")`` rounds as ``torch.tensor`` does, an overflow to infinity)."""
    magnitudes = sorted(map(abs, array("f", values)))
    return magnitudes[(len(magnitudes) - 1) // 2]


def inspect_sites(
    model: Callable[..., object], guide: Callable[..., object], example: tuple[torch.Tensor, ...]
) -> tuple[bool, list[str]]:
    """Whether every observed site is discrete (then log p(x) <= 0 per datapoint), and the model's enumerated sites the guide lacks."""
    with torch.no_grad(), pyro.validation_enabled(False):
        model_tr, guide_tr = traces(model, guide, *example)
    sites = [
        s for s in model_tr.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
    ]
    observed = [s for s in sites if s["is_observed"]]
    enumerated = [
        s["name"]
        for s in sites
        if not s["is_observed"] and s["infer"].get("enumerate") and s["name"] not in guide_tr.nodes
    ]
    return bool(observed) and all(s["fn"].support.is_discrete for s in observed), enumerated
