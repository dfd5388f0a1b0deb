r"""The inference gap of an amortised posterior, split into approximation and amortisation.

.. math::

    \underbrace{\log p(x) - \mathcal{L}[q]}_{\text{inference gap}}
    = \underbrace{\log p(x) - \mathcal{L}[q^*]}_{\text{approximation gap}}
    + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q]}_{\text{amortisation gap}},

where :math:`q` is the encoder's posterior for :math:`x`, :math:`q^*` the
best member of the same family for that one datapoint
(:func:`~ppl_vae.inference.optimize_local`, started at :math:`q`), and
:math:`\log p(x)` is estimated by IWAE with ``K`` draws (the :math:`q^*`
with the highest mean ELBO as proposal) or by AIS. The ELBOs are estimated
with ``elbo_samples`` draws; every number is per datapoint, with Monte Carlo
standard errors. An IWAE :math:`\log \hat
p(x)` is a lower bound, so the approximation gap it gives is, if anything, an
underestimate.

**A log p̂(x) to trust.** The proposal matters more than ``K``: a
mean-field :math:`q^*` is narrower than a correlated posterior, its weights
then have infinite variance, and IWAE sits far below :math:`\log p(x)` with a
small, confident standard error (on a linear-Gaussian model with posterior
correlation 0.993: 1.65 nats low, reported SE 0.19). So by default a
full-covariance :math:`q^*` is fitted beside the guide's family as a
candidate proposal (``proposals``): where the posterior is near Gaussian its
weights are near constant. Each datapoint's PSIS :math:`\hat k` of the
weights is reported; where it exceeds the bound for ``K`` draws
(:func:`~ppl_vae.inference.gaps.bounds.khat_threshold`, 0.7 at ``K`` ≥ 2154)
the row is flagged unreliable, or with ``unreliable="ais"`` its log p̂ is
re-estimated by AIS. A datapoint whose :math:`q^*` did not converge is
flagged too (its approximation gap is overstated, its amortisation gap
understated), with a warning.

References
----------
Cremer, Li & Duvenaud (2018), Inference Suboptimality in Variational Autoencoders.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pandas as pd
import torch

from ... import io
from ...errors import ConfigError, ReliabilityWarning, check_int
from ...guides.local import FAMILIES, LocalMixture, LocalPosterior, family_of
from ..distributed import Checked, Collectives, Spread, spread_over_rows
from ..latent import guide_in_latent_space, latent_of
from ..random import Streams, Tag, dataset_index
from ..traces import analysed
from .ais import MIN_CHAINS_SE, ais
from .ais import check_options as check_ais_options
from .bounds import Bounds, importance_bounds, khat_threshold
from .local import LocalFit, optimize_local, start_distribution
from .local import check_options as check_local_options

__all__ = [
    "GapReport",
    "decompose",
    "check_decomposable",
    "defensive_proposal",
    "check_defensive",
    "GAPS_CSV",
    "GAPS_JSON",
    "WIDEN",
]

GAPS_CSV, GAPS_JSON = "gaps.csv", "gaps.json"
#: how much wider than q* the widened component of the defensive proposal is (its scale; the covariance WIDEN**2)
WIDEN = 2.0


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else math.nan


@dataclass(frozen=True, kw_only=True)
class GapReport:
    """Per-datapoint gap decomposition of one model and guide (tensors are ``[N]``); built by keyword, read-only mappings."""

    index: torch.Tensor
    log_px: torch.Tensor
    log_px_se: torch.Tensor
    elbo_q: torch.Tensor
    elbo_q_se: torch.Tensor
    elbo_local: dict[str, torch.Tensor]
    elbo_local_se: dict[str, torch.Tensor]
    family: str
    logpx_estimator: str
    num_samples: int
    local_steps: dict[str, float] = field(default_factory=dict)
    name: str = "model"
    q_in_family: bool = True
    log_px_khat: torch.Tensor | None = (
        None  # [N] PSIS k-hat of the IWAE weights (None: log p(x) by AIS)
    )
    log_px_unreliable: torch.Tensor | None = (
        None  # [N] bool: an IWAE estimate whose k-hat is above khat_threshold(K)
    )
    log_px_ais: torch.Tensor | None = None  # [N] bool: re-estimated by AIS (unreliable="ais")
    qstar_converged: dict[str, torch.Tensor] = field(default_factory=dict)  # family -> [N] bool
    qstar_change: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # family -> [N] nats, the last check window's change
    qstar_change_se: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # family -> [N] nats: the SE the change was judged against
    qstar_optima: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # family -> [N] int: distinct optima its starts ended at

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "index", self.index.cpu()
        )  # dataset indices live on the CPU, wherever the numbers were computed
        for name in (
            "elbo_local",
            "elbo_local_se",
            "local_steps",
            "qstar_converged",
            "qstar_change",
            "qstar_change_se",
            "qstar_optima",
        ):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def flags(self) -> dict[str, int]:
        """How many datapoints carry each warning: an unreliable log p̂, a q* that did not converge (per family)."""
        out = {}
        if self.log_px_unreliable is not None:
            out["log_px_unreliable"] = int(self.log_px_unreliable.sum())
        if self.log_px_ais is not None:
            out["log_px_by_ais"] = int(self.log_px_ais.sum())
        out |= {f"qstar_{f}_unconverged": int((~c).sum()) for f, c in self.qstar_converged.items()}
        out |= {
            f"qstar_{f}_several_optima": int((o > 1).sum()) for f, o in self.qstar_optima.items()
        }
        return out

    def warnings(self) -> list[str]:
        """One sentence per kind of flagged datapoint (empty when nothing is flagged)."""
        out = []
        n = len(self.index)
        bad = int(self.log_px_unreliable.sum()) if self.log_px_unreliable is not None else 0
        if bad:
            worst = float(self.log_px_khat.max()) if self.log_px_khat is not None else math.nan
            out.append(
                f"log p̂(x) is unreliable for {bad} of {n} datapoints (importance weights' Pareto k̂ above its bound, worst {worst:.2f}): "
                "their approximation gap may be understated; re-estimate them with AIS (unreliable='ais', CLI --unreliable ais)"
            )
        for fam, conv in self.qstar_converged.items():
            stuck = int((~conv).sum())
            if stuck:
                out.append(
                    f"q* ({fam}) did not converge for {stuck} of {n} datapoints: their approximation gap is overstated and amortisation gap "
                    "understated; raise the local max_steps (CLI --local-steps)"
                )
        for fam, optima in self.qstar_optima.items():
            several = int((optima > 1).sum())
            if several:
                out.append(
                    f"q* ({fam}): the starts of {several} of {n} datapoints ended at different optima (a saddle, a posterior with several "
                    "modes, or a start that stopped short on a flat ridge): the best start is kept, and log p̂'s proposal holds all of them"
                )
        return out

    @property
    def elbo_qstar(self) -> torch.Tensor:
        return self.elbo_local[self.family]

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_qstar

    @property
    def amortisation_gap(self) -> torch.Tensor:
        return self.elbo_qstar - self.elbo_q

    @property
    def inference_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_q

    @property
    def approximation_gap_se(self) -> torch.Tensor:
        """``[N]``: its Monte Carlo standard error (log p̂ and L[q*] come from independent draws)."""
        return torch.hypot(self.log_px_se, self.elbo_local_se[self.family])

    @property
    def amortisation_gap_se(self) -> torch.Tensor:
        """``[N]``: its Monte Carlo standard error, given q* (L[q*] and L[q] come from independent draws)."""
        return torch.hypot(self.elbo_local_se[self.family], self.elbo_q_se)

    @property
    def inference_gap_se(self) -> torch.Tensor:
        """``[N]``: its Monte Carlo standard error."""
        return torch.hypot(self.log_px_se, self.elbo_q_se)

    def to_dataframe(self) -> pd.DataFrame:
        cols: dict[str, Any] = {
            "index": self.index.cpu().numpy(),
            "log_px": self.log_px,
            "log_px_se": self.log_px_se,
            "elbo_q": self.elbo_q,
            "elbo_q_se": self.elbo_q_se,
        }
        for fam in self.elbo_local:
            cols[f"elbo_qstar_{fam}"] = self.elbo_local[fam]
            cols[f"elbo_qstar_{fam}_se"] = self.elbo_local_se[fam]
        for gap in ("approximation_gap", "amortisation_gap", "inference_gap"):
            cols[gap], cols[f"{gap}_se"] = getattr(self, gap), getattr(self, f"{gap}_se")
        for key in ("log_px_khat", "log_px_unreliable", "log_px_ais"):
            if getattr(self, key) is not None:
                cols[key] = getattr(self, key)
        for fam in self.qstar_converged:
            cols[f"qstar_{fam}_converged"] = self.qstar_converged[fam]
            cols[f"qstar_{fam}_change"] = self.qstar_change[fam]
            if fam in self.qstar_change_se:
                cols[f"qstar_{fam}_change_se"] = self.qstar_change_se[fam]
            if fam in self.qstar_optima:
                cols[f"qstar_{fam}_optima"] = self.qstar_optima[fam]
        return pd.DataFrame(
            {
                k: (
                    v.cpu().numpy()
                    if v.dtype in (torch.bool, torch.long)
                    else v.double().cpu().numpy()
                )
                if isinstance(v, torch.Tensor)
                else v
                for k, v in cols.items()
            }
        )

    def summary(self) -> dict[str, Any]:
        """Means over datapoints with standard errors (of the mean over datapoints)."""
        rows = {"log_px": self.log_px, "elbo_q": self.elbo_q}
        rows |= {f"elbo_qstar_{fam}": v for fam, v in self.elbo_local.items()}
        rows |= {
            "approximation_gap": self.approximation_gap,
            "amortisation_gap": self.amortisation_gap,
            "inference_gap": self.inference_gap,
        }
        out: dict[str, Any] = {
            "name": self.name,
            "num_points": len(self.index),
            "qstar_family": self.family,
            "q_in_family": self.q_in_family,
            "logpx_estimator": self.logpx_estimator,
            "num_samples": self.num_samples,
            "local_steps_mean": self.local_steps,
        }
        for k, v in rows.items():
            m, se = _mean_se(v)
            out[k], out[f"{k}_se"] = m, se
        out["flags"] = self.flags()
        if self.log_px_khat is not None:
            out["log_px_khat_max"] = float(self.log_px_khat.max())
        return out

    def verdict(self) -> str:
        """One line: the inference gap in nats, its two parts with their shares, and which dominates."""
        s = self.summary()
        gap, approx, amort = s["inference_gap"], s["approximation_gap"], s["amortisation_gap"]

        def part(key: str) -> str:
            share = (
                f", {s[key] / gap:.0%}"
                if gap > 2 * s["inference_gap_se"] and approx >= 0 and amort >= 0
                else ""
            )
            return f"{s[key]:.2f} ± {s[key + '_se']:.2f} nats{share}"

        diff = (
            self.approximation_gap - self.amortisation_gap
        ).double()  # per datapoint: the two gaps share L[q*] (with opposite signs)
        se_diff = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.inf
        if abs(approx - amort) < 2 * se_diff:
            which = "neither gap dominates (they differ by less than 2 standard errors)"
        elif approx > amort:
            which = f"the approximation gap dominates: a better encoder would close little of it, a family richer than {self.family} would"
        else:
            which = "the amortisation gap dominates: the encoder, not the family, is what falls short (a bigger encoder or more training)"
        family = (
            ""
            if self.q_in_family
            else " (q is not in this family: the amortisation gap includes the change of family)"
        )
        flagged = "".join(f" Warning: {w}." for w in self.warnings())
        return (
            f"{self.name}: inference gap {gap:.2f} ± {s['inference_gap_se']:.2f} nats per datapoint = approximation "
            f"{part('approximation_gap')} + amortisation {part('amortisation_gap')} (q* {self.family}{family}, {len(self.index)} datapoints); {which}.{flagged}"
        )

    @classmethod
    def concat(cls, parts: list[GapReport]) -> GapReport:
        """The reports of consecutive blocks of datapoints (one decomposition spread over processes), as one."""
        first = parts[0]
        if any(
            p.family != first.family or p.logpx_estimator != first.logpx_estimator for p in parts
        ):  # chosen from the means over all processes
            raise ValueError(
                "reports of one decomposition disagree on the family or the log p(x) estimator"
            )

        def cat(get: Callable[[GapReport], torch.Tensor]) -> torch.Tensor:
            return torch.cat([get(p) for p in parts])

        def cat_opt(key: str) -> torch.Tensor | None:
            return None if getattr(first, key) is None else cat(lambda p: getattr(p, key))

        return cls(
            index=cat(lambda p: p.index),
            log_px=cat(lambda p: p.log_px),
            log_px_se=cat(lambda p: p.log_px_se),
            elbo_q=cat(lambda p: p.elbo_q),
            elbo_q_se=cat(lambda p: p.elbo_q_se),
            elbo_local={f: cat(lambda p, f=f: p.elbo_local[f]) for f in first.elbo_local},
            elbo_local_se={f: cat(lambda p, f=f: p.elbo_local_se[f]) for f in first.elbo_local_se},
            family=first.family,
            logpx_estimator=first.logpx_estimator,
            num_samples=first.num_samples,
            local_steps=first.local_steps,
            name=first.name,
            q_in_family=first.q_in_family,
            log_px_khat=cat_opt("log_px_khat"),
            log_px_unreliable=cat_opt("log_px_unreliable"),
            log_px_ais=cat_opt("log_px_ais"),
            qstar_converged={
                f: cat(lambda p, f=f: p.qstar_converged[f]) for f in first.qstar_converged
            },
            qstar_change={f: cat(lambda p, f=f: p.qstar_change[f]) for f in first.qstar_change},
            qstar_change_se={
                f: cat(lambda p, f=f: p.qstar_change_se[f]) for f in first.qstar_change_se
            },
            qstar_optima={f: cat(lambda p, f=f: p.qstar_optima[f]) for f in first.qstar_optima},
        )

    def save(self, out: str | Path) -> None:
        """Write ``gaps.csv`` (per datapoint) and ``gaps.json`` (summary) into ``out``, atomically."""
        out = Path(out)
        io.write_csv(out / GAPS_CSV, self.to_dataframe().to_dict("records"))
        io.write_json(out / GAPS_JSON, self.summary())


def _families(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    families: tuple[str, ...] | None,
):
    """The guide as a distribution over the joint latent (or None), its family (or None), and the families of q* to fit."""
    latent = latent_of(model, *data, guide=guide, analysis="the gap decomposition")
    q, why = guide_in_latent_space(guide, latent, *data)
    own = family_of(q) if q is not None else None
    if own is None and not families:
        raise ConfigError(
            f"the gap decomposition compares q with the best q* of q's own family, and the guide's q over {latent.describe()} "
            f"is not in the diagonal, full or flow family ({why or 'not a Gaussian or IAF flow'}); pass families (CLI: --families) "
            "to compare with q* of those families, whose amortisation gap then also contains the change of family"
        )
    chosen = tuple(dict.fromkeys(((own,) if own else ()) + tuple(families or ())))
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    return q, own, chosen


def check_defensive(defensive: object) -> tuple[float, float]:
    """``defensive`` as two weights in [0, 1) that sum below 1 (``ConfigError`` otherwise)."""
    try:
        wide, prior = (float(w) for w in defensive)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(
            f"defensive must be two weights (widened q*, prior), got {defensive!r}"
        ) from None
    if not (0 <= wide < 1 and 0 <= prior < 1 and wide + prior < 1):
        raise ConfigError(
            f"defensive weights must be in [0, 1) and sum below 1 (q* keeps the rest), got {defensive!r}"
        )
    return wide, prior


def defensive_proposal(
    fit: LocalFit, prior: LocalPosterior | None, defensive: tuple[float, float]
) -> LocalPosterior | LocalMixture:
    r"""The importance-sampling proposal for :math:`\log p(x)` built from a fitted :math:`q^*`: a defensive mixture (Hesterberg 1995).

    .. math::

        \pi(u \mid x) = \frac{1 - a_w - a_p}{J} \sum_{j=1}^{J} q^*_j(u)
        + a_w\, q^*_{\times 2}(u) + a_p\, \tilde p(u),

    where :math:`q^*_1..q^*_J` are the datapoint's distinct optima among the
    starts of :func:`~ppl_vae.inference.optimize_local` (``LocalFit.modes``;
    :math:`J = 1` where they agree), :math:`q^*_{\times 2}` the kept
    :math:`q^*` with its scale times :data:`WIDEN` (tails :math:`q^*` makes too
    thin), and :math:`\tilde p` the prior's Gaussian (``prior``; exact where
    the prior is one Gaussian site), which reaches every mode the prior puts
    mass on: where it is exact the weights are bounded by
    :math:`p(x \mid z) / a_p`. ``defensive = (a_w, a_p)``; with both zero and
    one start the proposal is :math:`q^*` itself. Every start is a component
    (weight 0 where it is not a distinct optimum), so a datapoint's proposal
    and draws do not depend on the other datapoints.

    References
    ----------
    Hesterberg (1995), Weighted Average Importance Sampling and Defensive Mixture Distributions. Technometrics 37(2).
    """
    wide, weight_prior = defensive
    modes = fit.modes
    S, n = modes.shape
    if wide == 0 and weight_prior == 0 and S == 1:
        return fit.posterior
    rows = torch.arange(n, device=modes.device)
    share = ((1 - wide - weight_prior) / modes.sum(0).double()).log()
    components, logits = [], []
    for s in range(
        S
    ):  # every start, weight 0 where it is not a distinct optimum: the components do not depend on the other rows
        components.append(fit.candidates.take(s * n + rows))
        logits.append(torch.where(modes[s], share, -math.inf))
    for weight, component in (
        (wide, fit.posterior.widened(WIDEN) if wide > 0 else None),
        (weight_prior, prior),
    ):
        if weight > 0 and component is not None:
            components.append(component)
            logits.append(share.new_full((n,), math.log(weight)))
    return LocalMixture(
        fit.posterior.latent, components, torch.stack(logits, -1).to(fit.posterior.loc.dtype)
    )


def check_decomposable(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    families: tuple[str, ...] | None = None,
) -> str | None:
    """Refuse (``ConfigError``, by site and reason) a model and guide :func:`decompose` cannot handle; return the guide's family (None: none)."""
    return _families(model, guide, data, families)[1]


def decompose(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    logpx: str = "iwae",
    num_samples: int = 5000,
    elbo_samples: int = 1000,
    families: tuple[str, ...] | None = None,
    proposals: tuple[str, ...] | None = None,
    defensive: tuple[float, float] = (0.1, 0.1),
    unreliable: str = "flag",
    local_options: dict[str, Any] | None = None,
    ais_options: dict[str, Any] | None = None,
    index: torch.Tensor | None = None,
    name: str = "model",
    batch_size: int = 100,
    seed: int = 0,
    spread: Spread | None = None,
    progress: bool = False,
    warn: bool = True,
) -> GapReport:
    r"""Decompose the inference gap of ``guide`` on every row of ``data``.

    Parameters
    ----------
    model, guide : callable
        A trained model and its amortised guide. The latent state is every
        continuous latent site of the model, concatenated in unconstrained
        space (:func:`~ppl_vae.inference.latent.latent_of`); a discrete
        site, a global latent, a point-mass guide or a guide that does not
        pair with the model's sites is refused before any work.
    *data : torch.Tensor
        The datapoints (rows) to analyse.
    logpx : {"iwae", "ais"}
        How :math:`\log \hat p(x)` is estimated: IWAE with ``num_samples``
        draws from the best :math:`q^*`, or AIS (``ais_options``, started
        from the prior).
    num_samples : int
        ``K`` of the IWAE estimate of :math:`\log \hat p(x)`.
    elbo_samples : int
        Draws for each ELBO (:math:`\mathcal{L}[q]`, :math:`\mathcal{L}[q^*]`).
    families : tuple of str, optional
        Families of :math:`q^*` to fit (default: the guide's own). The gaps
        use the guide's family; the others are reported alongside (as
        Cremer et al.'s Table 2 reports both FFG and flow :math:`q^*`). A
        guide in none of the families (sites that depend on each other, or
        not Gaussian in unconstrained space) is refused unless ``families``
        is given; the gaps then use the best of them, and the report says
        ``q_in_family=False``: its amortisation gap also contains the change
        of family.
    proposals : tuple of str, optional
        Further families of :math:`q^*` fitted as candidate IWAE proposals
        (default ``("full",)``: a full-covariance Gaussian, whose weights stay
        light-tailed on correlated posteriors where a mean-field one's do not;
        ``()`` for none). They are reported beside ``families``; the proposal
        is built from the candidate with the highest mean ELBO.
    defensive : (float, float)
        Weights of the widened :math:`q^*` and of the prior in the IWAE
        proposal, a defensive mixture with the distinct optima of
        :math:`q^*`'s starts (:func:`defensive_proposal`): a mode that
        :math:`q^*` misses is still sampled, so log p̂ is not low by the mass
        of that mode with a confident standard error. ``(0, 0)``: :math:`q^*`
        alone (and its starts' other optima).
    unreliable : {"flag", "ais"}
        What to do with a datapoint whose IWAE weights have a Pareto
        :math:`\hat k` above :func:`~ppl_vae.inference.gaps.bounds.khat_threshold`:
        flag it in the report (``log_px_unreliable``, the table and the verdict), or
        re-estimate its log p̂ by AIS (``ais_options``; ``log_px_ais``).
    local_options : dict, optional
        Passed to :func:`~ppl_vae.inference.optimize_local`.
    index : tensor, optional
        Dataset indices of the rows, kept in the report.
    seed : int
        Seeds every step.
    spread : Spread, optional
        Spread the datapoints over devices and processes
        (:func:`~ppl_vae.inference.distributed.spread_over_rows`). Every draw of a
        datapoint comes from its own streams and the two choices made over all
        datapoints (the IWAE proposal's family, the reported family when q is
        in none) use the means over all of them (summed across processes), so
        each datapoint's row is the one computed here (to float rounding).
    progress : bool
        Progress bars for each step (the ELBO of q, each q* family, log p(x)).
    warn : bool
        Issue a :class:`~ppl_vae.errors.ReliabilityWarning` (a ``UserWarning``) per kind of flagged datapoint
        (:meth:`GapReport.warnings`; the verdict says the same).
    """
    report = _decompose(
        model,
        guide,
        *data,
        logpx=logpx,
        num_samples=num_samples,
        elbo_samples=elbo_samples,
        families=families,
        proposals=proposals,
        defensive=defensive,
        unreliable=unreliable,
        local_options=local_options,
        ais_options=ais_options,
        index=index,
        name=name,
        batch_size=batch_size,
        seed=seed,
        spread=spread,
        progress=progress,
    )
    for line in report.warnings() if warn else ():
        warnings.warn(f"{name}: {line}", ReliabilityWarning, stacklevel=2)
    return report


def _check_decompose(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    logpx: str,
    num_samples: int,
    elbo_samples: int,
    families: tuple[str, ...] | None,
    proposals: tuple[str, ...] | None,
    defensive: tuple[float, float],
    unreliable: str,
    local_options: dict[str, Any] | None,
    ais_options: dict[str, Any] | None,
    index: torch.Tensor | None,
    **_: object,
) -> Checked:
    """:func:`decompose`'s refusals, before any work; ``families`` becomes the families reported, ``proposals`` every family of q* to fit."""
    if logpx not in ("iwae", "ais"):
        raise ConfigError(f"unknown log p(x) estimator {logpx!r}; choose iwae or ais")
    defensive = check_defensive(defensive)
    if unreliable not in ("flag", "ais"):
        raise ConfigError(
            f"unknown treatment of unreliable log p(x) estimates {unreliable!r}; choose flag or ais"
        )
    for label, k in (
        ("importance samples K", num_samples),
        ("ELBO samples", elbo_samples),
    ):  # every number in the report carries a standard error
        check_int(k, f"the number of {label} (at least 2 for a standard error)", low=2)
    if local_options:
        check_local_options(**local_options)
    if ais_options:
        check_ais_options(**ais_options)
        if logpx == "ais" or unreliable == "ais":
            chains = ais_options.get("num_chains", MIN_CHAINS_SE)
            check_int(
                chains,
                f"the number of AIS chains (at least {MIN_CHAINS_SE} for a standard error)",
                low=MIN_CHAINS_SE,
            )
    model, guide = analysed(model, guide, data, "the gap decomposition")  # type: ignore[assignment]
    _, _, families = _families(model, guide, data, families)
    extra = ("full",) if proposals is None else tuple(proposals)
    if any(f not in FAMILIES for f in extra):
        raise ConfigError(
            f"unknown proposal family {next(f for f in extra if f not in FAMILIES)!r}; choose from {', '.join(FAMILIES)}"
        )
    fitted = tuple(dict.fromkeys(families + (extra if logpx == "iwae" else ())))
    options = {"families": families, "proposals": fitted, "defensive": defensive}
    return Checked(
        (model, guide), data, dataset_index(index, data[0].shape[0]), (model, guide), options
    )


@spread_over_rows(GapReport, _check_decompose, collectives=True)
def _decompose(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    logpx: str,
    num_samples: int,
    elbo_samples: int,
    families: tuple[str, ...],
    proposals: tuple[str, ...],
    defensive: tuple[float, float],
    unreliable: str,
    local_options: dict[str, Any] | None,
    ais_options: dict[str, Any] | None,
    index: torch.Tensor,
    name: str,
    batch_size: int,
    seed: int,
    progress: bool,
    coll: Collectives,
) -> GapReport:
    """:func:`decompose` of the rows ``data`` (dataset indices ``index``), checked (``proposals``: every family of q* to fit); a choice over all datapoints takes its means over every process."""
    q, own, _ = _families(model, guide, data, families)  # the guide's q over these rows
    total = coll.sum(float(data[0].shape[0]))
    rows = {"index": index, "batch_size": batch_size, "progress": progress}

    def mean(v: torch.Tensor) -> float:  # over the datapoints of every process
        return coll.sum(v.double().sum().item()) / total

    on_q = importance_bounds(
        model, guide, *data, num_samples=elbo_samples, seed=seed, diagnose=False, **rows
    )
    init = q if q is not None else guide
    options = {"elbo_samples": elbo_samples, "local_options": local_options or {}, "rows": rows}
    fits = {
        fam: _fit_local(model, data, fam, init, seed=seed + 1 + i, **options)
        for i, fam in enumerate(proposals)
    }
    local = {f: b.elbo for f, (_, b) in fits.items()}
    local_se = {f: b.elbo_se for f, (_, b) in fits.items()}
    steps = {f: mean(fit.steps) for f, (fit, _) in fits.items()}
    if logpx == "iwae":
        means = {f: mean(local[f]) for f in fits}
        best = max(fits, key=lambda f: means[f])
        px = _logpx_iwae(
            model,
            data,
            fits[best][0],
            best,
            local,
            local_se,
            num_samples=num_samples,
            defensive=defensive,
            unreliable=unreliable,
            ais_options=ais_options or {},
            seed=seed,
            **rows,
        )
    else:
        r = ais(
            model, *data, seed=seed + 1000, index=index, progress=progress, **(ais_options or {})
        )
        px = _LogPx(r.log_px.double(), r.log_px_se.double(), r.description)
    means = {f: mean(local[f]) for f in families}
    return GapReport(
        index=index,
        log_px=px.log_px,
        log_px_se=px.log_px_se,
        elbo_q=on_q.elbo,
        elbo_q_se=on_q.elbo_se,
        elbo_local=local,
        elbo_local_se=local_se,
        family=own if own is not None else max(families, key=lambda f: means[f]),
        logpx_estimator=px.estimator,
        num_samples=elbo_samples,
        local_steps=steps,
        name=name,
        q_in_family=own is not None,
        log_px_khat=px.khat,
        log_px_unreliable=px.unreliable,
        log_px_ais=px.by_ais,
        qstar_converged={f: fit.converged for f, (fit, _) in fits.items()},
        qstar_change={f: fit.final_change for f, (fit, _) in fits.items()},
        qstar_change_se={f: fit.final_change_se for f, (fit, _) in fits.items()},
        qstar_optima={f: fit.optima for f, (fit, _) in fits.items()},
    )


def _fit_local(
    model: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    family: str,
    init: Callable[..., object] | torch.distributions.Distribution,
    *,
    seed: int,
    elbo_samples: int,
    local_options: dict[str, Any],
    rows: dict[str, Any],
) -> tuple[LocalFit, Bounds]:
    """The local q* of ``family`` (fitted with ``seed``) and its ELBO bounds (drawn with ``seed + 100``); ``rows``: ``index``, ``batch_size``, ``progress``."""
    fit = optimize_local(
        model,
        *data,
        family=family,
        init=init,
        seed=seed,
        index=rows["index"],
        progress=rows["progress"],
        **local_options,
    )
    bounds = importance_bounds(
        model,
        fit.posterior,
        *data,
        num_samples=elbo_samples,
        seed=seed + 100,
        diagnose=False,
        **rows,
    )
    return fit, bounds


class _LogPx(NamedTuple):
    """log p̂(x) of the rows with its SE, how it was estimated, and (IWAE) each row's k̂, unreliable flag and whether AIS re-estimated it."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor
    estimator: str
    khat: torch.Tensor | None = None
    unreliable: torch.Tensor | None = None
    by_ais: torch.Tensor | None = None


def _logpx_iwae(
    model: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    fit: LocalFit,
    best: str,
    local: dict[str, torch.Tensor],
    local_se: dict[str, torch.Tensor],
    *,
    num_samples: int,
    defensive: tuple[float, float],
    unreliable: str,
    ais_options: dict[str, Any],
    index: torch.Tensor,
    batch_size: int,
    seed: int,
    progress: bool,
) -> _LogPx:
    """IWAE's log p̂(x) with the defensive proposal around ``fit`` (the q* of family ``best``); where the proposal is that q*, its ELBO in ``local`` and ``local_se`` becomes the one of these ``num_samples`` draws."""
    prior = None
    if (
        defensive[1] > 0
    ):  # the prior's Gaussian over the joint latent (where not exact, moments of each datapoint's own prior draws)
        draws = Streams(seed + 998, index, data[0].device, Tag.LOCAL, 6)
        prior_q = start_distribution(
            model, fit.posterior.latent, *data, init="prior", streams=draws
        )
        prior = LocalPosterior.initial("full", prior_q, fit.posterior.latent)
    proposal = defensive_proposal(fit, prior, defensive)
    b = importance_bounds(
        model,
        proposal,
        *data,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed + 999,
        index=index,
        progress=progress,
    )
    log_px, log_px_se = b.iwae.clone(), b.iwae_se.clone()
    if proposal is fit.posterior:  # the same family's ELBO, now from K draws
        local[best], local_se[best] = b.elbo, b.elbo_se
    if isinstance(proposal, LocalMixture):
        what = (
            f"a defensive mixture of the local {best} q* (its starts' distinct optima, {1 - sum(defensive):.0%}), "
            f"q* widened x{WIDEN:g} ({defensive[0]:.0%}) and the prior ({defensive[1]:.0%})"
        )
    else:
        what = f"the local {best} q*"
    estimator = f"IWAE K={num_samples} with {what} as proposal (reliable where Pareto k̂ <= {khat_threshold(num_samples):.2f})"
    bad = ~b.reliable
    if unreliable != "ais":
        return _LogPx(log_px, log_px_se, estimator, b.khat, bad)
    # AIS of this process's flagged rows (each datapoint's draws are its own: no other process is involved)
    rows = bad.nonzero().squeeze(-1)
    if len(rows):
        r = ais(
            model,
            *(t[rows] for t in data),
            seed=seed + 1000,
            index=index[rows],
            progress=progress,
            **ais_options,
        )
        log_px[rows], log_px_se[rows] = r.log_px.double(), r.log_px_se.double()
    given = ", ".join(f"{k}={v}" for k, v in sorted(ais_options.items()))
    estimator += f"; AIS ({given or 'default options'}) for the datapoints above it"
    return _LogPx(log_px, log_px_se, estimator, b.khat, torch.zeros_like(bad), bad.clone())
