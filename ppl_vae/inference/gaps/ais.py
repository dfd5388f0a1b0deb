r"""Annealed importance sampling with HMC transitions, batched over datapoints, and BDMC.

AIS moves ``C`` chains per datapoint through the intermediate densities

.. math::

    f_t(z) = p_0(z)^{1 - \beta_t}\, p(x, z)^{\beta_t}, \qquad 0 = \beta_0 < \dots < \beta_T = 1,

from :math:`p_0` = the prior (then :math:`f_t = p(z)\,p(x \mid z)^{\beta_t}`) or
an amortised :math:`q(z \mid x)`, accumulating
:math:`\log w = \sum_t \log f_t(z_{t-1}) - \log f_{t-1}(z_{t-1})`;
:math:`\log \frac{1}{C}\sum_c w_c` is a stochastic lower bound on
:math:`\log p(x)`. Every chain of every datapoint is one row of a ``[C, N, d]``
tensor; each transition is one HMC step (``leapfrog_steps`` leapfrogs, identity
mass). Step sizes are adapted per datapoint and step by a pilot run of
``PILOT_CHAINS`` extra chains toward an acceptance rate of ``target_accept``
(by the samplers' dual-averaging rule, :mod:`ppl_vae.inference.kernel`,
whose iterate follows the step size as the density anneals); the
estimate's chains then run with that schedule fixed, so that each transition
is a fixed kernel that leaves its :math:`f_t` invariant, as AIS requires.

Bidirectional Monte Carlo (:func:`bdmc`) simulates ``(z, x)`` from the model,
runs forward AIS on ``x``, and reverse AIS from the exact posterior sample
``z`` through the same densities backwards, with the same fixed step sizes: :math:`-\log \frac{1}{C}\sum_c w^{\mathrm{rev}}_c` is a stochastic
upper bound. The gap between the two brackets the error of AIS on such data.

References
----------
Neal (2001), Annealed Importance Sampling. Grosse, Ghahramani & Adams (2015),
Sandwiching the marginal likelihood using bidirectional Monte Carlo. Wu,
Burda, Salakhutdinov & Grosse (2017), On the Quantitative Analysis of
Decoder-Based Generative Models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy.stats import norm as normal
from scipy.stats import t as student_t

from ...errors import ConfigError
from ...guides.latent import Latent
from ...progress import bar
from ..distributed import Checked, spread_over_rows
from ..kernel import State, da_init, da_update, transition
from ..latent import guide_log_density, latent_draws, latent_of, log_joint
from ..random import Streams, Tag, base_seed, dataset_index, seeded
from ..traces import analysed
from .bounds import cat_optional, log_mean_exp

__all__ = [
    "AISResult",
    "BDMCResult",
    "ais",
    "bdmc",
    "check_options",
    "sigmoid_schedule",
    "chains_log_mean_exp",
    "MIN_CHAINS_SE",
]


#: chains of the pilot run that adapts the step sizes; the estimate's chains then run with them fixed
PILOT_CHAINS = 2
#: the fewest chains from which AIS and BDMC report a standard error (:func:`chains_log_mean_exp`)
MIN_CHAINS_SE = 4


def sigmoid_schedule(
    num_steps: int, delta: float = 4.0, *, device: torch.device | str | None = "cpu"
) -> torch.Tensor:
    """``num_steps + 1`` inverse temperatures from 0 to 1, dense at both ends (Grosse et al. 2015)."""
    t = torch.sigmoid(
        delta
        * (2 * torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps - 1)
    )
    return (t - t[0]) / (t[-1] - t[0])


@dataclass(frozen=True)
class AISResult:
    """AIS estimate of ``log p(x)`` per datapoint (``[N]``), its standard error over chains (``None`` below ``MIN_CHAINS_SE``), and diagnostics."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor | None
    accept_rate: torch.Tensor
    step_size: torch.Tensor
    num_steps: int
    num_chains: int
    init: str

    @property
    def description(self) -> str:
        return f"AIS from the {self.init}, {self.num_steps} HMC steps x {self.num_chains} chains"

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                k: v.cpu().numpy()
                for k in ("log_px", "log_px_se", "accept_rate", "step_size")
                if (v := getattr(self, k)) is not None
            }
        )

    @classmethod
    def concat(cls, parts: list[AISResult]) -> AISResult:
        """The estimates of consecutive blocks of datapoints, as one."""
        first = parts[0]
        return cls(
            **{
                k: cat_optional([getattr(p, k) for p in parts])
                for k in ("log_px", "log_px_se", "accept_rate", "step_size")
            },
            num_steps=first.num_steps,
            num_chains=first.num_chains,
            init=first.init,
        )


@dataclass(frozen=True)
class BDMCResult:
    """Forward (lower) and reverse (upper) AIS on data simulated from the model; standard errors over chains (``None`` below ``MIN_CHAINS_SE``)."""

    x: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    num_steps: int
    num_chains: int
    lower_se: torch.Tensor | None = None
    upper_se: torch.Tensor | None = None

    @property
    def width(self) -> torch.Tensor:
        return self.upper - self.lower

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "lower": self.lower.cpu().numpy(),
                "upper": self.upper.cpu().numpy(),
                "width": self.width.cpu().numpy(),
            }
        )


def _is_sample(s: dict) -> bool:
    return s["type"] == "sample" and not site_is_subsample(s)


def _start(
    model: Callable[..., object],
    init: object,
    latent: Latent,
    data: tuple[torch.Tensor, ...],
    C: int,
    streams: Streams,
):
    """Initial draws of the joint latent ``u`` ``[C, N, K]`` and ``log p0(u)`` (``None``: the prior)."""
    if init == "prior":
        return latent_draws(model, latent, *data, num_samples=C, streams=streams), None
    if not callable(init):
        raise ConfigError(f"init must be 'prior' or a guide, got {init!r}")
    return latent_draws(
        model, latent, *data, guide=init, num_samples=C, streams=streams
    ), guide_log_density(init, latent, *data)


def _run(
    dens,
    z,
    log_q,
    betas,
    noise,
    *,
    leapfrog_steps,
    step_size,
    target_accept,
    adapt,
    eps_schedule=None,
    reverse=False,
    shown=None,
):
    """Anneal ``z`` through ``betas`` (forward) or backwards; return log-weights ``[C, N]``, eps record, acceptance.

    Each transition is :func:`~ppl_vae.inference.kernel.transition` with ``leapfrog_steps``
    steps and the identity mass; with ``adapt`` the step size of each datapoint follows the
    samplers' dual averaging (:func:`~ppl_vae.inference.kernel.da_update`) from one annealing
    step to the next, otherwise the recorded ``eps_schedule``. The run reads one value back from
    the device, the temperatures, before it starts; its steps read none.
    """
    C, N = z.shape[:2]
    eps = z.new_full((N,), step_size)
    da = da_init(eps, target_accept)
    lw = z.new_zeros(C, N, dtype=torch.float64)
    acc_total = z.new_zeros(N, dtype=torch.float64)
    record = []

    def ends(zz):
        """``(log p0(u), log p(x, u))``: f_beta = log p0 + beta (log p(x, u) - log p0), one model run (Jacobians included)."""
        prior, lik = dens(zz)
        return (prior, prior + lik) if log_q is None else (log_q(zz), prior + lik)

    def annealed(beta):
        def logf(zz):
            base, target = ends(zz)
            return base + beta * (target - base)

        return logf

    T = len(betas) - 1
    betas = betas.tolist()  # the temperatures, on the host: one read for the whole run
    order = range(1, T + 1) if not reverse else range(T, 0, -1)
    for t in order:
        b_from, b_to = (betas[t - 1], betas[t]) if not reverse else (betas[t], betas[t - 1])
        with torch.no_grad():
            base, target = ends(z)
            lw += (float(b_to - b_from) * (target - base)).double()
        if eps_schedule is not None:
            eps = eps_schedule[t - 1 if not reverse else max(t - 2, 0)].to(z.dtype)
        record.append(eps)  # the step size this transition uses
        f = annealed(float(b_to))
        state, info = transition(f, State.at(f, z), eps, leapfrog_steps, noise)
        z, acc = state.u, info.accept_prob
        acc_total += acc.double().mean(0)
        if shown is not None:
            shown.update()
        if adapt:
            da = da_update(da, acc.mean(0))
            eps = torch.exp(da.x)
    return lw, torch.stack(record), acc_total / T


def chains_log_mean_exp(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    r""":math:`\log \frac{1}{C}\sum_c w_c` over the chains of ``lw`` ``[C, N]``, and its standard error (``None`` below :data:`MIN_CHAINS_SE` chains).

    The delta-method SE, :math:`\operatorname{sd}(w) / (\sqrt{C}\,\bar w)`
    (:func:`~ppl_vae.inference.gaps.bounds.log_mean_exp`), comes from the
    sample variance of ``C`` weights, itself uncertain when ``C`` is small: an
    interval of :math:`\pm 1.96` of it covers far less than 95 %. It is
    therefore scaled by :math:`t_{0.975,\,C-1} / z_{0.975}` (Student's t with
    :math:`C - 1` degrees of freedom), so that :math:`\pm 1.96` SE is the
    t-interval (a factor 1.62 at 4 chains, 1.09 at 16). Below
    :data:`MIN_CHAINS_SE` chains no SE is given.
    """
    C = lw.shape[0]
    est, se = log_mean_exp(torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0), C)
    if C < MIN_CHAINS_SE or se is None:
        return est, None
    return est, se * (student_t.ppf(0.975, C - 1) / normal.ppf(0.975))


def _check(
    num_steps: int,
    num_chains: int,
    leapfrog_steps: int,
    step_size: float,
    target_accept: float = 0.65,
    batch_size: int | None = None,
) -> None:
    for name, v in (
        ("num_steps", num_steps),
        ("num_chains", num_chains),
        ("leapfrog_steps", leapfrog_steps),
    ):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ConfigError(f"step size must be a positive number, got {step_size!r}")
    if not 0 < target_accept < 1:
        raise ConfigError(f"target acceptance must be in (0, 1), got {target_accept!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")


def check_options(**options: object) -> None:
    """Validate keyword options of :func:`ais` before any work (unknown names, bad values)."""
    known = (
        "num_steps",
        "num_chains",
        "leapfrog_steps",
        "step_size",
        "target_accept",
        "batch_size",
    )
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"unknown AIS option {unknown[0]!r}; known: {', '.join(known)}")
    defaults = {
        "num_steps": 1000,
        "num_chains": 16,
        "leapfrog_steps": 10,
        "step_size": 0.05,
        "target_accept": 0.65,
        "batch_size": None,
    }
    _check(**{**defaults, **options})  # type: ignore[arg-type]


def _check_ais(
    model: Callable[..., object],
    *data: torch.Tensor,
    init: Callable[..., object] | str,
    num_steps: int,
    num_chains: int,
    leapfrog_steps: int,
    step_size: float,
    target_accept: float,
    batch_size: int | None,
    index: torch.Tensor | None,
    **_: object,
) -> Checked:
    """:func:`ais`'s refusals (options, the model's latent state), before any work."""
    _check(num_steps, num_chains, leapfrog_steps, step_size, target_accept, batch_size)
    guide = init if callable(init) else None
    if guide is None and init != "prior":
        raise ConfigError(f"init must be 'prior' or a guide, got {init!r}")
    model, guide = analysed(model, guide, data, "AIS")
    n = latent_of(model, *data, guide=guide, analysis="AIS").num_points
    return Checked(
        (model,),
        data,
        dataset_index(index, n),
        (model, guide) if guide is not None else (model,),
        {"init": guide if guide is not None else init},
    )


@spread_over_rows(AISResult, _check_ais)
def ais(
    model: Callable[..., object],
    *data: torch.Tensor,
    init: Callable[..., object] | str = "prior",
    num_steps: int = 1000,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    batch_size: int | None = None,
    seed: int | None = 0,
    index: torch.Tensor | None = None,
    progress: bool = False,
) -> AISResult:
    """AIS estimate of ``log p(x)`` for every row of ``data``, all chains in one tensor program.

    Parameters
    ----------
    model : callable
        A model written the ppl-vae way. AIS anneals its whole latent state:
        every continuous latent site, concatenated in unconstrained space
        (:func:`~ppl_vae.inference.latent.latent_of`; discrete sites and
        global latents are refused before any work). With ``init="prior"``
        the first density is the prior of all latent sites (a hierarchical
        prior included) and the annealed factor is the likelihood of the
        observed sites.
    init : "prior" or guide
        The start density :math:`p_0`: the prior, or a guide's ``q(z | x)``
        (its log-density at arbitrary ``z`` must be computable, as for
        Gaussians; a flow guide needs its inverse).
    num_steps, num_chains, leapfrog_steps : int
        Intermediate densities ``T``, chains ``C`` per datapoint, leapfrogs per
        HMC step. The standard error is over the chains
        (:func:`chains_log_mean_exp`; none below :data:`MIN_CHAINS_SE`).
    step_size, target_accept : float
        Initial HMC step size and the acceptance rate adaptation aims at.
    batch_size : int, optional
        Datapoints per batch (default all at once).
    seed : int, optional
        Seeds every draw.
    index : tensor, optional
        The rows' indices in their dataset (default ``0..N-1``): each
        datapoint's chains draw from its own stream, seeded from ``(seed,
        index)`` (:class:`~ppl_vae.inference.random.Streams`), so its estimate
        does not depend on ``batch_size`` or on the other rows.
    spread : Spread, optional
        Spread the datapoints over devices and processes
        (:func:`~ppl_vae.inference.distributed.spread_over_rows`), with the same
        per-datapoint estimates (to float rounding).
    progress : bool
        A progress bar over the annealing steps (pilot and estimate, every batch).
    """
    betas = sigmoid_schedule(num_steps, device=data[0].device)
    guide = init if callable(init) else None
    n = len(index)
    parts = {"log_px": [], "log_px_se": [], "accept_rate": [], "step_size": []}
    with bar(
        total=2 * num_steps * math.ceil(n / (batch_size or n)),
        desc=f"AIS {num_steps} steps",
        unit="step",
        enabled=progress,
    ) as shown:
        with seeded(seed):
            base = base_seed(seed)
            for i in range(0, n, batch_size or n):
                args = tuple(t[i : i + (batch_size or n)] for t in data)
                latent = latent_of(model, *args, guide=guide, analysis="AIS")
                dens = log_joint(model, latent, *args, split=True)
                gen = Streams(base, index[i : i + (batch_size or n)], data[0].device, Tag.AIS)
                z, log_q = _start(model, init, latent, args, num_chains + PILOT_CHAINS, gen)
                kw = dict(
                    leapfrog_steps=leapfrog_steps,
                    step_size=step_size,
                    target_accept=target_accept,
                    shown=shown,
                )
                _, record, _ = _run(
                    dens, z[num_chains:], log_q, betas, gen, adapt=True, **kw
                )  # pilot: adapts step sizes
                lw, _, acc = _run(
                    dens, z[:num_chains], log_q, betas, gen, adapt=False, eps_schedule=record, **kw
                )
                est, se = chains_log_mean_exp(lw)
                for k, v in (
                    ("log_px", est),
                    ("log_px_se", se),
                    ("accept_rate", acc),
                    ("step_size", record[-1].double()),
                ):
                    parts[k].append(v)
    out = {k: cat_optional(v) for k, v in parts.items()}
    return AISResult(
        **out,
        num_steps=num_steps,
        num_chains=num_chains,
        init="prior" if init == "prior" else "guide",
    )


def bdmc(
    model: Callable[..., object],
    *template: torch.Tensor,
    num_steps: int = 1000,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    seed: int | None = 0,
    progress: bool = False,
) -> BDMCResult:
    """Bidirectional Monte Carlo on data simulated from ``model`` (shaped like ``template``).

    Returns, per simulated datapoint, the forward-AIS lower bound and the
    reverse-AIS upper bound on ``log p(x)``, both from the prior, each with
    its standard error over the ``num_chains`` chains
    (:func:`chains_log_mean_exp`; none below :data:`MIN_CHAINS_SE`). ``progress``
    shows a bar over the annealing steps (pilot, forward and reverse runs).
    """
    _check(num_steps, num_chains, leapfrog_steps, step_size, target_accept)
    model, _ = analysed(model, None, template, "BDMC")
    with (
        seeded(seed),
        bar(
            total=3 * num_steps, desc=f"BDMC {num_steps} steps", unit="step", enabled=progress
        ) as shown,
    ):
        with poutine.block(), torch.no_grad():
            tr = poutine.trace(poutine.uncondition(model)).get_trace(*template)
        latent = latent_of(model, *template, analysis="BDMC")
        observed = [s for n, s in tr.nodes.items() if _is_sample(s) and n not in latent.names]
        if len(observed) != 1:
            raise ConfigError(
                f"BDMC simulates a model with one observed site; this one has {len(observed)}"
            )
        x = observed[0]["value"].detach()
        u_true = latent.unconstrain({n: tr.nodes[n]["value"].detach() for n in latent.names})
        data = (x, *template[1:])
        betas = sigmoid_schedule(num_steps, device=x.device)
        dens = log_joint(model, latent, *data, split=True)
        gen = Streams(
            None, range(x.shape[0]), x.device, Tag.SIMULATED
        )  # the simulated points' own streams
        z0, _ = _start(model, "prior", latent, data, num_chains + PILOT_CHAINS, gen)
        kw = dict(
            leapfrog_steps=leapfrog_steps,
            step_size=step_size,
            target_accept=target_accept,
            shown=shown,
        )
        _, record, _ = _run(dens, z0[num_chains:], None, betas, gen, adapt=True, **kw)
        lw_f, _, _ = _run(
            dens, z0[:num_chains], None, betas, gen, adapt=False, eps_schedule=record, **kw
        )
        zT = u_true.expand(num_chains, *u_true.shape).clone()
        lw_r, _, _ = _run(
            dens, zT, None, betas, gen, adapt=False, eps_schedule=record, reverse=True, **kw
        )
    lower, lower_se = chains_log_mean_exp(lw_f)
    inv, upper_se = chains_log_mean_exp(lw_r)
    return BDMCResult(
        x=x,
        lower=lower,
        upper=-inv,
        num_steps=num_steps,
        num_chains=num_chains,
        lower_se=lower_se,
        upper_se=upper_se,
    )
