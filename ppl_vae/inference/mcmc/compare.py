r"""VI against MCMC: comparison metrics per datapoint and latent dimension.

The VI draws (:mod:`.vi`) have the layout of the MCMC draws
(:class:`~.draws.Draws`: the same variable names and dims); the MCMC
diagnostics come from ArviZ through :mod:`~ppl_vae.inference.azcompat`, the only module that
calls ArviZ.

:func:`compare` treats the MCMC draws as the truth and reports, per datapoint
``n`` and latent dimension ``k`` (:math:`m, s`: mean and sd; ``p``: MCMC,
``q``: VI):

* standardised mean error :math:`(m_q - m_p) / s_p` and sd ratio
  :math:`s_q / s_p` (and its log);
* the 1-Wasserstein distance of the marginals (``scipy.stats.wasserstein_distance``),
  raw and divided by :math:`s_p`;
* coverage: the fraction of MCMC draws inside the VI central 50% and 90%
  intervals (0.5 and 0.9 when the marginals agree; lower: VI under-dispersed);

and per datapoint:

* the energy distance (Székely & Rizzo 2013) between the joint draws, in
  coordinates standardised by :math:`s_p`,

  .. math:: E = 2\,\mathbb{E}\lVert X - Y\rVert - \mathbb{E}\lVert X - X'\rVert - \mathbb{E}\lVert Y - Y'\rVert,

* a **Gaussian-moment** KL estimate :math:`KL(N(m_q, S_q) \,\Vert\, N(m_p, S_p))`
  from the draws' means and covariances (exact when both are Gaussian; a
  moment summary otherwise);
* the PSIS Pareto :math:`\hat k` of VI as an importance proposal for the
  posterior (ArviZ's PSIS through :func:`~ppl_vae.inference.azcompat.pareto_khat` on :math:`\log p(x, z) - \log q(z)` of the VI
  draws): :math:`\hat k > 0.7` means the importance weights are unreliable,
  typically because q is narrower than the posterior;
* MCMC diagnostics from ArviZ: the largest R-hat, the smallest bulk and
  tail ESS, and the number of divergent transitions.

References
----------
Yao, Vehtari, Simpson & Gelman (2018), Yes, but did it work?: Evaluating
variational inference. ICML.
Vehtari et al. (2024), Pareto smoothed importance sampling. JMLR 25(72).
Székely & Rizzo (2013), Energy statistics. J. Stat. Plan. Inference 143.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ... import io
from ...errors import ConfigError
from ...progress import bar
from .. import azcompat
from .draws import Draws

__all__ = ["Comparison", "compare", "FLAG_THRESHOLDS"]


#: a dimension (datapoint) is flagged when any of these is exceeded
FLAG_THRESHOLDS = {
    "abs_std_mean_error": 0.3,
    "abs_log_sd_ratio": math.log(1.25),
    "coverage_90_below": 0.8,
    "pareto_k": 0.7,
}
#: the least bulk ESS of a sound MCMC reference: 100 per chain for the default 4 chains (Vehtari et al. 2021)
MIN_ESS = 400


# --------------------------------------------------------------------------- VI draws


# --------------------------------------------------------------------------- comparison


def _label(name: str, index: tuple[int, ...]) -> str:
    return name if not index else f"{name}[{','.join(map(str, index))}]"


def draws_matrix(draws: Draws, names: Sequence[str]) -> tuple[np.ndarray, list[str], bool]:
    """``[chain, draw, P, K]``: per-datapoint latents (all variables with a ``point`` dim, concatenated) or all variables as P = 1."""
    per_point = [n for n in names if "point" in draws.dims.get(n, [])]
    if per_point and len(per_point) != len(names):
        raise ConfigError(
            f"cannot compare per-datapoint variables ({', '.join(per_point)}) together with global ones"
        )
    if per_point:
        cols, labels = [], []
        for name in names:
            v = draws.samples[name]
            cols.append(v.reshape(*v.shape[:3], -1))
            labels += [_label(name, i) for i in np.ndindex(*v.shape[3:])]
        return np.concatenate(cols, axis=-1), labels, True
    cols, labels = [], []
    for name in names:
        v = draws.samples[name]
        flat = v.reshape(*v.shape[:2], -1)
        cols.append(flat)
        idx = list(np.ndindex(*v.shape[2:]))
        labels += [_label(name, i) for i in idx]
    return np.concatenate(cols, axis=-1)[:, :, None, :], labels, False


def _energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    tx, ty = (
        torch.as_tensor(v, dtype=torch.float64, device="cpu") for v in (x, y)
    )  # draws are host arrays
    n, m = (
        len(tx),
        len(ty),
    )  # within-sample terms as U-statistics (the zero diagonal excluded): unbiased

    def within(t: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cdist(t, t).sum() / (k * (k - 1))

    return float(2 * torch.cdist(tx, ty).mean() - within(tx, n) - within(ty, m))


def _gaussian_kl(x_q: np.ndarray, x_p: np.ndarray) -> float:
    """KL(N(m_q, S_q) || N(m_p, S_p)) from draws (rows)."""
    k = x_q.shape[1]
    mq, mp = x_q.mean(0), x_p.mean(0)
    sq, sp = np.atleast_2d(np.cov(x_q, rowvar=False)), np.atleast_2d(np.cov(x_p, rowvar=False))
    try:
        lp = np.linalg.cholesky(sp)
        _, logdet_q = np.linalg.slogdet(sq)
    except np.linalg.LinAlgError:
        return float("nan")
    sp_inv_sq = np.linalg.solve(sp, sq)
    diff = mp - mq
    maha = diff @ np.linalg.solve(sp, diff)
    return float(0.5 * (np.trace(sp_inv_sq) + maha - k + 2 * np.log(np.diag(lp)).sum() - logdet_q))


def _frozen(arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A read-only mapping of read-only copies of ``arrays``."""
    out = {}
    for k, v in arrays.items():
        a = np.array(v, copy=True)
        a.setflags(write=False)
        out[k] = a
    return MappingProxyType(out)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """VI-vs-MCMC metrics per datapoint (``point``) and latent dimension (``dim``).

    ``per_dim`` maps metric names to ``[P, K]`` arrays, ``per_point`` to
    ``[P]`` arrays (see the module docstring for the definitions).
    """

    points: tuple[Any, ...]
    dims: tuple[str, ...]
    per_dim: dict[str, np.ndarray]
    per_point: dict[str, np.ndarray]
    mcmc_method: str
    vi_method: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_dim", _frozen(self.per_dim))
        object.__setattr__(self, "per_point", _frozen(self.per_point))

    def to_dataframe(self, level: str = "dim") -> Any:
        """Long table: one row per (point, dim) with the point's metrics repeated; ``level="point"``: one row per point."""
        import pandas as pd

        points = pd.DataFrame({"point": list(self.points), **self.per_point})
        if level == "point":
            return points
        if level != "dim":
            raise ConfigError(f"level must be 'dim' or 'point', got {level!r}")
        p, k = len(self.points), len(self.dims)
        rows = pd.DataFrame(
            {
                "point": np.repeat(list(self.points), k),
                "dim": np.tile(list(self.dims), p),
                **{name: v.reshape(-1) for name, v in self.per_dim.items()},
            }
        )
        return rows.merge(points, on="point")

    def flagged(self, thresholds: dict[str, float] | None = None) -> Any:
        """The rows of :meth:`to_dataframe` (one per datapoint and dimension) where that dimension's own evidence says VI disagrees with MCMC.

        A row is flagged when its standardised mean error, log sd ratio or 90% coverage passes its
        threshold (:data:`FLAG_THRESHOLDS`), or one of them is NaN (not computable is not agreement).
        The Pareto k-hat is a property of a datapoint's joint draws, not of one dimension: it is
        reported once per datapoint by :meth:`flagged_points`, never copied onto its dimensions
        (a whole-model k-hat above 0.7 would otherwise flag parameters VI gets right).
        """
        t = {**FLAG_THRESHOLDS, **(thresholds or {})}
        df = self.to_dataframe()
        bad = (
            df[["std_mean_error", "log_sd_ratio", "coverage_90"]].isna().any(axis=1)
            | (df["std_mean_error"].abs() > t["abs_std_mean_error"])
            | (df["log_sd_ratio"].abs() > t["abs_log_sd_ratio"])
            | (df["coverage_90"] < t["coverage_90_below"])
        )
        return df[bad]

    def flagged_points(self, thresholds: dict[str, float] | None = None) -> Any:
        """The rows of ``to_dataframe("point")`` whose joint Pareto k-hat passes its threshold: importance sampling cannot repair VI's draws there."""
        t = {**FLAG_THRESHOLDS, **(thresholds or {})}
        df = self.to_dataframe("point")
        return df[df["pareto_k"] > t["pareto_k"]]

    def summary(self) -> dict[str, float]:
        """Worst cases over all points and dims (JSON-ready)."""
        d, p = self.per_dim, self.per_point

        def worst(x: np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
            x = np.asarray(x, dtype=float)
            return float(fn(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")

        return {
            "max_abs_std_mean_error": worst(np.abs(d["std_mean_error"]), np.max),
            "min_sd_ratio": worst(d["sd_ratio"], np.min),
            "max_sd_ratio": worst(d["sd_ratio"], np.max),
            "mean_coverage_50": worst(d["coverage_50"], np.mean),
            "mean_coverage_90": worst(d["coverage_90"], np.mean),
            "mean_energy_distance": worst(p["energy_distance"], np.mean),
            "mean_kl_gaussian": worst(p["kl_gaussian"], np.mean),
            "max_pareto_k": _max_khat(p["pareto_k"]),
            "mcmc_max_rhat": worst(p["mcmc_max_rhat"], np.max),
            "mcmc_min_ess_bulk": worst(p["mcmc_min_ess_bulk"], np.min),
            "mcmc_divergences": float(np.sum(p["mcmc_divergences"])),
            "num_flagged_dims": float(len(self.flagged())),
            "num_points_pareto_k_above": float(len(self.flagged_points())),
        }

    def verdict(self, thresholds: dict[str, float] | None = None) -> str:
        """The comparison in plain words: is the MCMC reference sound, how many datapoints and dimensions VI gets wrong and how."""
        t = {**FLAG_THRESHOLDS, **(thresholds or {})}
        s, d = self.summary(), self.to_dataframe()
        n, k = len(self.points), len(self.dims)
        sound, reference = _reference_line(s, self.per_point)
        return "\n".join(
            [
                f"VI ({self.vi_method}) against MCMC ({self.mcmc_method}) on {n} datapoint(s) x {k} latent dimension(s):",
                reference,
                *_moment_lines(s, d, t, n * k),
                _khat_line(s["max_pareto_k"], t, n, len(self.flagged_points(thresholds))),
                _verdict_line(self.flagged(thresholds), t, n, n * k, sound, s["max_pareto_k"]),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mcmc_method": self.mcmc_method,
            "vi_method": self.vi_method,
            "summary": self.summary(),
            "points": self.to_dataframe("point").to_dict(orient="records"),
            "dims": self.to_dataframe("dim").to_dict(orient="records"),
        }

    def save(self, out: str | Path, prefix: str = "comparison") -> list[Path]:
        """Write ``PREFIX.csv`` (per point and dim) and ``PREFIX.json`` (summary, points, dims) atomically."""
        out = Path(out)
        df = self.to_dataframe()
        return [
            io.write_csv(out / f"{prefix}.csv", df.to_dict(orient="records")),
            io.write_json(out / f"{prefix}.json", self.to_dict()),
        ]


def _reference_line(s: dict[str, float], p: Mapping[str, np.ndarray]) -> tuple[bool, str]:
    """Whether the MCMC reference is sound (every diagnostic computable, R-hat < 1.01, no divergence, bulk ESS >= :data:`MIN_ESS`), and the verdict's line saying so."""
    missing = int(
        sum(
            (~np.isfinite(np.asarray(p[k], dtype=float))).sum()
            for k in ("mcmc_max_rhat", "mcmc_min_ess_bulk")
        )
    )
    sound = (
        missing == 0
        and s["mcmc_max_rhat"] < 1.01
        and s["mcmc_divergences"] == 0
        and s["mcmc_min_ess_bulk"] >= MIN_ESS
    )
    return sound, (
        f"- MCMC reference: max R-hat {s['mcmc_max_rhat']:.3f}, min bulk ESS {s['mcmc_min_ess_bulk']:.0f}, "
        f"{s['mcmc_divergences']:.0f} divergences"
        + (f", {missing} diagnostics not computable" if missing else "")
        + ": "
        + (
            f"sound (R-hat < 1.01, bulk ESS >= {MIN_ESS}, no divergences)."
            if sound
            else "NOT sound: run longer chains (more draws and warm-up) before trusting the rows below."
        )
    )


def _moment_lines(s: dict[str, float], d: Any, t: dict[str, float], dims: int) -> list[str]:
    """The verdict's lines on means, spreads and coverage, from the summary ``s`` and the per-dimension table ``d`` of ``dims`` rows."""
    err = d["std_mean_error"].abs()
    worst = d.loc[err.idxmax()] if err.notna().any() else None
    where = f" (datapoint {worst['point']}, {worst['dim']})" if worst is not None else ""
    ratio = d["sd_ratio"]
    spread = (
        "VI is too narrow (overconfident) in "
        + str(int((ratio < 1 / math.exp(t["abs_log_sd_ratio"])).sum()))
        + " and too wide in "
        + str(int((ratio > math.exp(t["abs_log_sd_ratio"])).sum()))
        + f" of {dims} dimensions"
    )
    return [
        f"- Means: worst error {s['max_abs_std_mean_error']:.2f} posterior sds{where}; "
        f"{int((err > t['abs_std_mean_error']).sum())} of {dims} dimensions off by more than {t['abs_std_mean_error']:g} sd.",
        f"- Spread: VI sd / MCMC sd from {s['min_sd_ratio']:.2f} to {s['max_sd_ratio']:.2f}; {spread}.",
        f"- Coverage: VI's 90% intervals hold the MCMC draws {s['mean_coverage_90']:.0%} of the time on average (90% if calibrated).",
    ]


def _khat_line(khat: float, t: dict[str, float], n: int, high: int) -> str:
    """The verdict's line on the largest Pareto k-hat ``khat`` of ``n`` datapoints, ``high`` of them above the threshold."""
    if math.isnan(khat):
        return "- Pareto k-hat: none (the VI draws carry no importance log-weights)."
    if khat == -math.inf:
        return (
            "- Pareto k-hat: -inf at every datapoint: the importance log-weights are constant, so q is an exact proposal "
            "(its draws are the posterior's, up to round-off)."
        )
    if khat > t["pareto_k"]:
        return (
            f"- Pareto k-hat of the importance weights (joint, one per datapoint): max {khat:.2f}; {high} of {n} datapoint(s) above "
            f"{t['pareto_k']:g}: there importance sampling cannot repair VI's draws (flagged_points() lists them)."
        )
    return (
        f"- Pareto k-hat of the importance weights: max {khat:.2f} (<= {t['pareto_k']:g}: importance sampling "
        "can repair VI's draws where needed)."
    )


def _verdict_line(
    bad: Any, t: dict[str, float], n: int, dims: int, sound: bool, khat: float
) -> str:
    """The verdict's last line, from the flagged rows ``bad`` (:meth:`Comparison.flagged`) of ``n`` datapoints and ``dims`` dimensions."""
    wrong_points = sorted(set(bad["point"].tolist()))
    caveat = "" if sound else " (against an MCMC reference that is not sound)"
    if bad.empty:
        return (
            f"Verdict: VI agrees with MCMC on every datapoint and dimension within the thresholds {t}{caveat}"
            + (
                " (dimension by dimension; see the joint k-hat above)."
                if khat > t["pareto_k"]
                else "."
            )
        )
    nan = int(bad[["std_mean_error", "log_sd_ratio", "coverage_90"]].isna().any(axis=1).sum())
    why = f", {nan} of them for a metric that could not be computed (NaN)" if nan else ""
    return (
        f"Verdict: VI gets {len(wrong_points)} of {n} datapoint(s) wrong{caveat} ({len(bad)} of {dims} dimensions flagged{why}: "
        f"points {', '.join(map(str, wrong_points[:10]))}{', ...' if len(wrong_points) > 10 else ''}); flagged() lists them."
    )


def _max_khat(khat: np.ndarray) -> float:
    """The largest k-hat over datapoints: ``-inf`` where every datapoint's log-weights are constant (an exact proposal), NaN where none has any."""
    k = np.asarray(khat, dtype=float)
    finite = k[np.isfinite(k)]
    if finite.size:
        return float(finite.max())
    return (
        -math.inf if (k == -math.inf).any() else math.nan
    )  # +inf: too few draws to fit a tail, as NaN: no k-hat to report


def _distances(
    pm: np.ndarray,
    pv: np.ndarray,
    m_sd: np.ndarray,
    points: tuple[Any, ...],
    seed: int,
    max_energy_draws: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per datapoint, from the MCMC and VI draws ``[S, P, K]``: the energy distance (standardised by the MCMC sds ``m_sd``), the Gaussian-moment KL ``[P]`` and the Wasserstein distance of each marginal ``[P, K]``."""
    from scipy.stats import wasserstein_distance

    p_count = pm.shape[1]
    energy, kl, w1 = np.zeros(p_count), np.zeros(p_count), np.zeros((p_count, pm.shape[2]))
    for i in bar(range(p_count), desc="compare", unit="datapoint", enabled=progress):
        w1[i] = [wasserstein_distance(pm[:, i, j], pv[:, i, j]) for j in range(pm.shape[2])]
        rng = np.random.default_rng(
            [seed, int(points[i])]
        )  # each datapoint's own subset, whatever else is compared with it
        a = pm[rng.permutation(len(pm))[:max_energy_draws], i] / m_sd[i]
        b = pv[rng.permutation(len(pv))[:max_energy_draws], i] / m_sd[i]
        energy[i] = _energy_distance(a, b)
        kl[i] = _gaussian_kl(pv[:, i], pm[:, i])
    return energy, kl, w1


def _khat_and_divergences(mcmc: Draws, vi: Draws, p_count: int) -> tuple[np.ndarray, np.ndarray]:
    """``[P]``: the Pareto k-hat of each datapoint's VI log-weights (NaN without them) and its MCMC divergences (the total at every datapoint where they are not per datapoint)."""
    lw = vi.sample_stats.get("log_weight")
    if lw is not None:
        khat = np.atleast_1d(
            azcompat.pareto_khat(np.asarray(lw).reshape(-1, p_count).T)
        )  # [P, S] -> [P]
    else:
        khat = np.full(p_count, np.nan)
    div = mcmc.sample_stats.get("diverging")
    divs = (
        np.asarray(div).reshape(*np.asarray(div).shape[:2], -1).sum((0, 1))
        if div is not None
        else np.zeros(p_count)
    )
    if divs.shape[0] != p_count:
        divs = np.full(p_count, divs.sum())
    return khat, divs


def compare(
    mcmc: Draws,
    vi: Draws,
    *,
    var_names: Sequence[str] | None = None,
    max_energy_draws: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> Comparison:
    """Compare VI draws with MCMC draws of the same variables (see the module docstring).

    Parameters
    ----------
    mcmc, vi : Draws
        E.g. from :func:`~ppl_vae.inference.mcmc.hmc_latent` and
        :func:`vi_draws_amortized` (latent posteriors: one row per
        datapoint) or :func:`~ppl_vae.inference.mcmc.nuts` and
        :func:`vi_draws_autoguide` (a whole model: one row).
    var_names : sequence of str, optional
        Variables to compare; default: those both have.
    max_energy_draws : int
        Draws of each side (a random subset, seeded from ``seed`` and the
        datapoint's ``point`` coordinate) in the energy distance.
    progress : bool
        A progress bar over the datapoints (their Wasserstein and energy distances, the slow part).
    """
    names = (
        list(var_names) if var_names is not None else [n for n in mcmc.samples if n in vi.samples]
    )
    missing = [n for n in names if n not in mcmc.samples or n not in vi.samples]
    if not names or missing:
        raise ConfigError(
            f"no common variables to compare (MCMC: {', '.join(mcmc.samples)}; VI: {', '.join(vi.samples)})"
        )
    xm, labels, latent = draws_matrix(mcmc, names)
    xv, _, _ = draws_matrix(vi, names)
    if xm.shape[2:] != xv.shape[2:]:
        raise ConfigError(
            f"MCMC and VI draws have different shapes: {xm.shape[2:]} vs {xv.shape[2:]}"
        )
    p_count = xm.shape[2]
    pm, pv = xm.reshape(-1, *xm.shape[2:]), xv.reshape(-1, *xv.shape[2:])  # [S, P, K]
    m_mean, m_sd = pm.mean(0), pm.std(0, ddof=1)
    v_mean, v_sd = pv.mean(0), pv.std(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_dim: dict[str, np.ndarray] = {
            "mcmc_mean": m_mean,
            "mcmc_sd": m_sd,
            "vi_mean": v_mean,
            "vi_sd": v_sd,
            "std_mean_error": (v_mean - m_mean) / m_sd,
            "sd_ratio": v_sd / m_sd,
            "log_sd_ratio": np.log(v_sd / m_sd),
        }
    points = tuple(mcmc.coords.get("point", range(p_count))) if latent else (0,)
    energy, kl, w1 = _distances(pm, pv, m_sd, points, seed, max_energy_draws, progress)
    per_dim["wasserstein"] = w1
    with np.errstate(divide="ignore", invalid="ignore"):
        per_dim["wasserstein_std"] = w1 / m_sd
    for level in (50, 90):
        lo, hi = np.quantile(pv, [(1 - level / 100) / 2, (1 + level / 100) / 2], axis=0)
        per_dim[f"coverage_{level}"] = ((pm >= lo) & (pm <= hi)).mean(0)
    per_dim["mcmc_ess_bulk"] = azcompat.ess(xm, "bulk").reshape(p_count, -1)
    per_dim["mcmc_ess_tail"] = azcompat.ess(xm, "tail").reshape(p_count, -1)
    per_dim["mcmc_rhat"] = azcompat.rhat(xm).reshape(p_count, -1)

    khat, divs = _khat_and_divergences(mcmc, vi, p_count)
    per_point = {
        "energy_distance": energy,
        "kl_gaussian": kl,
        "pareto_k": khat,
        "mcmc_max_rhat": per_dim["mcmc_rhat"].max(1),
        "mcmc_min_ess_bulk": per_dim["mcmc_ess_bulk"].min(1),
        "mcmc_min_ess_tail": per_dim["mcmc_ess_tail"].min(1),
        "mcmc_divergences": divs.astype(int),
    }
    return Comparison(
        points=points,
        dims=tuple(labels),
        per_dim=per_dim,
        per_point=per_point,
        mcmc_method=mcmc.method,
        vi_method=vi.method,
    )
