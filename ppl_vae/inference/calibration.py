r"""Calibration of an amortised posterior by simulation (Yao, Vehtari, Simpson & Gelman 2018; Talts et al. 2018).

For ``m = 1..M`` draw :math:`(z_m, x_m)` from the fitted model's prior predictive
:math:`p(z)\,p(x \mid z)`, draw ``L`` samples of the guide's :math:`q(z \mid x_m)`, and
rank each coordinate of the true :math:`z_m` among them. If :math:`q(z \mid x) = p(z \mid x)`
the ranks are uniform on ``0..L`` for every coordinate (averaged over the prior predictive,
the amortised guide is tested across datapoints, as the paper's VSBC does for one coordinate
at a time). Per coordinate this reports

* a chi-square test of the rank histogram (``bins`` equal bins) and its p-value;
* the **bias**: the mean of :math:`u = (r + \tfrac12)/(L + 1)` minus 1/2 (standard error
  :math:`1/\sqrt{12 M}`); positive when the truth lies above q's draws, i.e. q sits too low;
* the **tail share**: the share of ranks in the outer fifth (lowest and highest 10%),
  0.2 when calibrated (binomial standard error); above 0.2 q is **under-dispersed** (too
  narrow: the truth often falls outside its draws), below 0.2 **over-dispersed**.

A coordinate is miscalibrated when its p-value is below ``alpha`` divided by the number of
coordinates (Bonferroni); its direction is the bias and tail share departing from their
calibrated values by more than ``Z`` standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .. import io
from ..errors import ConfigError, check_int
from .latent import latent_of
from .mcmc.vi import vi_draws
from .traces import PlaceFlat, analysed, data_like, prior_predictive

__all__ = ["Calibration", "calibrate", "Z"]

#: standard errors of a departure called a direction
Z = 4.0


def _observed_arguments(
    model: Callable[..., object], args: tuple[torch.Tensor, ...]
) -> dict[str, int]:
    """Which argument each observed site observes (its value is that tensor), found by one conditioned run."""
    with torch.no_grad(), poutine.block(), PlaceFlat(data_like(args)):
        tr = poutine.trace(model).get_trace(*args)
    out = {}
    for name, s in tr.nodes.items():
        if (
            s["type"] == "sample"
            and s["is_observed"]
            and not site_is_subsample(s)
            and type(s["fn"]).__name__ != "Unit"
        ):
            hits = [
                i
                for i, a in enumerate(args)
                if s["value"].shape == a.shape and s["value"].data_ptr() == a.data_ptr()
            ]
            if not hits:
                raise ConfigError(
                    f"calibration: cannot tell which argument observed site {name!r} observes (pass it as obs= one of the model's arguments)"
                )
            out[name] = hits[0]
    if not out:
        raise ConfigError("calibration: the model observes nothing: there are no data to simulate")
    return out


@dataclass(frozen=True)
class Calibration:
    """Ranks of the simulated truths among the guide's draws (``ranks`` ``[M, K]`` in ``0..num_draws``) and per-coordinate tests."""

    ranks: np.ndarray
    labels: tuple[str, ...]
    num_draws: int
    bins: int
    alpha: float

    @property
    def num_datasets(self) -> int:
        return int(self.ranks.shape[0])

    def table(self) -> Any:
        """One row per coordinate: p-value, bias (± SE), tail share (± SE), and the verdict in a word or two."""
        import pandas as pd
        from scipy.stats import chisquare

        m, k = self.ranks.shape
        u = (self.ranks + 0.5) / (self.num_draws + 1)
        edges = np.linspace(0, 1, self.bins + 1)
        rows = []
        level = self.alpha / k
        bias_se, tail_se = math.sqrt(1 / 12 / m), math.sqrt(0.2 * 0.8 / m)
        for j in range(k):
            counts = np.histogram(u[:, j], edges)[0]
            p = float(chisquare(counts).pvalue)
            bias = float(u[:, j].mean() - 0.5)
            tails = float(((u[:, j] < 0.1) | (u[:, j] > 0.9)).mean())
            if p >= level:
                verdict = "calibrated"
            else:
                words = []
                if tails > 0.2 + Z * tail_se:
                    words.append("under-dispersed (q too narrow)")
                elif tails < 0.2 - Z * tail_se:
                    words.append("over-dispersed (q too wide)")
                if abs(bias) > Z * bias_se:
                    words.append("biased: q too low" if bias > 0 else "biased: q too high")
                verdict = "; ".join(words) or "miscalibrated (shape)"
            rows.append(
                {
                    "coordinate": self.labels[j],
                    "p_value": p,
                    "bias": bias,
                    "bias_se": bias_se,
                    "tail_share": tails,
                    "tail_share_se": tail_se,
                    "verdict": verdict,
                }
            )
        return pd.DataFrame(rows)

    def verdict(self) -> str:
        """One paragraph: how many coordinates are miscalibrated, and in which direction."""
        t = self.table()
        bad = t[t["verdict"] != "calibrated"]
        head = f"Calibration of q(z | x) over {self.num_datasets} simulated datasets, {self.num_draws} draws each, {len(t)} coordinate(s): "
        if bad.empty:
            return (
                head
                + f"every coordinate's ranks are uniform (chi-square p >= {self.alpha:g}/{len(t)}): calibrated."
            )
        parts = [
            f"{r.coordinate}: {r.verdict} (bias {r.bias:+.3f}, tail share {r.tail_share:.3f} vs 0.2, p {r.p_value:.1e})"
            for r in bad.itertuples()
        ]
        return (
            head
            + f"{len(bad)} miscalibrated: "
            + "; ".join(parts[:10])
            + ("; ..." if len(parts) > 10 else "")
            + "."
        )

    def save(self, out: str | Path) -> None:
        """``calibration.csv`` (per coordinate) and ``calibration.json`` (options and verdict) in ``out``, atomically."""
        out = Path(out)
        io.write_csv(out / "calibration.csv", self.table().to_dict("records"))
        io.write_json(
            out / "calibration.json",
            {
                "num_datasets": self.num_datasets,
                "num_draws": self.num_draws,
                "bins": self.bins,
                "alpha": self.alpha,
                "verdict": self.verdict(),
            },
        )


def calibrate(
    model: Callable[..., object],
    guide: Callable[..., object],
    *template: torch.Tensor,
    num_datasets: int = 1000,
    num_draws: int = 99,
    bins: int = 10,
    alpha: float = 0.01,
    seed: int = 0,
) -> Calibration:
    r"""Simulation-based calibration of the amortised guide ``q(z | x)`` of ``model`` (see the module docstring).

    ``template`` are the model's arguments with ``num_datasets`` rows (or one row, repeated):
    their observed arguments are replaced by simulated data, the others (labels of a
    conditional model) are kept. ``num_draws`` + 1 must be a multiple of ``bins``. Refused by
    name before any work: a ``pyro.factor`` or auxiliary term, a global, discrete or
    point-mass latent.
    """
    check_int(num_datasets, "the number of simulated datasets", low=2)
    check_int(num_draws, "the number of draws per dataset")
    check_int(bins, "the number of bins", low=2)
    if (num_draws + 1) % bins:
        raise ConfigError(
            f"num_draws + 1 ({num_draws + 1}) must be a multiple of bins ({bins}), so that every bin holds as many ranks"
        )
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if not template or any(t.shape[0] not in (1, num_datasets) for t in template):
        raise ConfigError(
            f"give the model's arguments with {num_datasets} rows (or one row, repeated)"
        )
    args = tuple(
        t if t.shape[0] == num_datasets else t[:1].expand(num_datasets, *t.shape[1:]).clone()
        for t in template
    )
    model, guide = analysed(model, guide, args, "calibration")  # type: ignore[assignment]
    sim = prior_predictive(
        model, *args, seed=seed, what="calibration"
    )  # refuses a factor, an auxiliary term, a global latent
    latent = latent_of(
        model, *args, guide=guide, analysis="calibration"
    )  # refuses a discrete or point-mass latent
    observed = _observed_arguments(model, args)
    simulated = list(args)
    for name, i in observed.items():
        simulated[i] = sim[name].reshape(args[i].shape).to(args[i].dtype)
    draws = vi_draws(
        model, guide, *simulated, num_samples=num_draws, seed=seed + 1, method="calibration"
    )
    ranks, labels = [], []
    for site in latent.sites:
        truth = sim[site.name].reshape(num_datasets, -1).cpu().numpy()  # [M, k]
        q = draws.samples[site.name][0].reshape(num_draws, num_datasets, -1)  # [L, M, k]
        ranks.append((q < truth[None]).sum(0))
        width = truth.shape[1]
        labels += [site.name if width == 1 else f"{site.name}[{j}]" for j in range(width)]
    return Calibration(np.concatenate(ranks, 1), tuple(labels), num_draws, bins, alpha)
