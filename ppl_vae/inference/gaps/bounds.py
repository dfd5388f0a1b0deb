r"""Per-datapoint ELBO and IWAE bounds from one stream of importance draws.

For draws :math:`z_k \sim q(\cdot \mid x)`, :math:`k = 1..K`, and log-weights
:math:`\ell_k = \log p(x, z_k) - \log q(z_k \mid x)`:

.. math::

    \hat{\mathcal{L}}_{\mathrm{ELBO}} = \frac{1}{K} \sum_k \ell_k, \qquad
    \hat{\mathcal{L}}_K = \log \frac{1}{K} \sum_k e^{\ell_k}
    \;\le\; \log p(x) \text{ in expectation.}

Both come from the same draws. The draws are taken in chunks of data rows and
of samples, so memory stays bounded for any ``K``: per data chunk only running
sums are kept (in float64): :math:`\sum \ell`, :math:`\sum \ell^2`, and the
running log-sum-exps of :math:`\ell` and :math:`2\ell`.

The standard error of the IWAE estimate is the delta-method one,
:math:`\operatorname{sd}(w) / (\sqrt{K}\,\bar w)`, computed from those
log-sum-exps without leaving log space. It describes the spread of the
estimate only where the weights have a light enough tail: with a heavy tail
(a proposal narrower than the posterior in some direction) the sample
variance misses the rare large weights, the estimate sits below
:math:`\log p(x)` by more than its SE says, and repeats scatter far more.
Each datapoint's tail is therefore checked by the PSIS Pareto
:math:`\hat k` of its weights (Vehtari et al. 2024; ArviZ through
:func:`~ppl_vae.inference.azcompat.pareto_khat`), from the largest
:math:`\lceil\min(0.2K, 3\sqrt K)\rceil + 1` log-weights, kept as the
chunks go by (the fit uses no others). The SE is reported reliable where
:math:`\hat k \le` :func:`khat_threshold` (:math:`K`) :math:`=
\min(0.7,\, 1 - 1/\log_{10} K)`, that paper's sample-size-dependent bound;
with fewer than 25 draws the tail cannot be fitted and nothing is
reliable. Measured in ``tests/inference/gaps/test_bounds.py``: where the
flag says reliable, the SE matches the spread across seeds; where it does not,
the SE falls short of it.

References
----------
Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders.
Vehtari, Simpson, Gelman, Yao & Gabry (2024), Pareto Smoothed Importance Sampling, JMLR 25(72).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch

from ...errors import ConfigError, check_int
from ...progress import bar
from ..azcompat import pareto_khat
from ..dispatch import host
from ..distributed import Checked, Spread, spread_over_rows
from ..random import Streams, Tag, base_seed, dataset_index, draws_in_batches, seeded
from ..traces import (
    ObservedSupport,
    analysed,
    log_weights,
    plate_nesting,
    probe,
    restrict,
)

__all__ = [
    "MAX_SAMPLES",
    "Bounds",
    "importance_bounds",
    "chunks",
    "log_mean_exp",
    "cat_optional",
    "khat_threshold",
    "tail_size",
    "khat_of_tail",
]

#: how many decoder outputs (samples x rows x data width) one chunk may hold
MAX_ELEMENTS = 20_000_000
#: the most importance samples per datapoint: the IWAE bound's gap falls as 1/K, and 10^7 draws of one binarised-MNIST
#: image already take minutes on a CPU; a larger K would run for days without a line of output
MAX_SAMPLES = 10**7


@dataclass(frozen=True)
class Bounds:
    r"""ELBO and IWAE bound per datapoint (``[N]`` tensors, nats) with Monte Carlo standard errors.

    With one draw per datapoint (``num_samples == 1``) there is no spread to
    estimate a standard error from: ``elbo_se`` and ``iwae_se`` are ``None``
    (and absent from :meth:`to_dataframe`), never a NaN standing in for a number.

    ``khat`` is the PSIS Pareto :math:`\hat k` of each datapoint's importance
    weights (``None`` where not computed); :attr:`reliable` says where the
    IWAE estimate and its SE can be trusted (:func:`khat_threshold`).
    """

    elbo: torch.Tensor
    elbo_se: torch.Tensor | None
    iwae: torch.Tensor
    iwae_se: torch.Tensor | None
    num_samples: int
    khat: torch.Tensor | None = None

    @property
    def reliable(self) -> torch.Tensor | None:
        """``[N]`` bool: the weights' tail is light enough for the IWAE estimate's SE to describe its spread (``None`` without ``khat``)."""
        return None if self.khat is None else self.khat <= khat_threshold(self.num_samples)

    def to_dataframe(self) -> pd.DataFrame:
        cols = {
            k: v.cpu().numpy()
            for k in ("elbo", "elbo_se", "iwae", "iwae_se", "khat")
            if (v := getattr(self, k)) is not None
        }
        if self.khat is not None:
            cols["reliable"] = self.reliable.cpu().numpy()  # type: ignore[union-attr]
        return pd.DataFrame(cols)

    @classmethod
    def concat(cls, parts: list[Bounds]) -> Bounds:
        """The bounds of consecutive blocks of datapoints, as one."""
        return cls(
            **{
                k: cat_optional([getattr(p, k) for p in parts])
                for k in ("elbo", "elbo_se", "iwae", "iwae_se", "khat")
            },
            num_samples=parts[0].num_samples,
        )


def khat_threshold(K: int) -> float:
    r"""The largest Pareto :math:`\hat k` at which an importance-sampling estimate from ``K`` draws is reliable: :math:`\min(0.7, 1 - 1/\log_{10} K)`.

    Vehtari et al. (2024), section 3.2.4: the sample size needed for a
    reliable estimate grows as :math:`10^{1/(1-k)}`, so at :math:`K = 100`
    the bound is 0.5 (finite variance), at 1000 0.67, from 2154 on 0.7.
    Below 25 draws PSIS cannot fit a tail at all (``-inf``: nothing passes).
    """
    if K < 25:
        return -math.inf
    return min(0.7, 1.0 - 1.0 / math.log10(K))


def tail_size(K: int) -> int:
    """How many of the largest of ``K`` log-weights PSIS's tail fit looks at: the tail (``ceil(min(0.2 K, 3 sqrt K))``) and the cutoff below it."""
    return min(K, math.ceil(min(0.2 * K, 3 * math.sqrt(K))) + 1)


def khat_of_tail(top: torch.Tensor, low: torch.Tensor, K: int) -> torch.Tensor:
    r"""PSIS :math:`\hat k` per datapoint from its ``tail_size(K)`` largest log-weights ``top`` ``[m, N]`` and its smallest ``low`` ``[N]``.

    The fit depends only on the values above the cutoff (the ``m``-th
    largest) and on the range of the weights, so the row PSIS sees, ``top``
    followed by ``K - m`` copies of ``low``, gives the :math:`\hat k` of all ``K``.
    """
    top_np, low_np = top.double().cpu().numpy(), low.double().cpu().numpy()
    out = np.empty(top_np.shape[1])
    for i in range(top_np.shape[1]):
        out[i] = pareto_khat(
            np.concatenate([top_np[:, i], np.full(K - top_np.shape[0], low_np[i])])
        )
    return torch.from_numpy(out).to(top.device)


def cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """``torch.cat`` of the blocks' tensors, or ``None`` where the blocks have none (a standard error from one draw)."""
    return None if parts[0] is None else torch.cat(parts)  # type: ignore[arg-type]


def log_mean_exp(
    lse1: torch.Tensor, lse2: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log mean w`` and its delta-method SE from ``logsumexp(log w)`` and ``logsumexp(2 log w)`` over ``K`` weights (SE ``None`` for ``K == 1``)."""
    est = lse1 - math.log(K)
    if K == 1:
        return est, None
    rel = (lse2 - math.log(K) - 2 * est).exp() - 1  # var(w) / mean(w)^2 = mean(w^2) / mean(w)^2 - 1
    return est, (rel.clamp_min(0) / (K - 1)).sqrt()


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _check_data(data: tuple[torch.Tensor, ...]) -> int:
    if not data or not all(isinstance(t, torch.Tensor) for t in data):
        raise ConfigError("bounds need the model's data as tensors")
    n = data[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in data):
        raise ConfigError(
            f"data tensors must share a non-zero first dimension, got {[tuple(t.shape) for t in data]}"
        )
    return n


def _raise_outside(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: tuple[torch.Tensor, ...],
    index: list[int],
    size: int,
    nesting: int,
) -> None:
    """The :class:`~ppl_vae.errors.DataError` naming the first data row with an observed value outside its support (chunks of ``size`` rows, one draw each)."""
    for rows in chunks(len(index), size):
        support = ObservedSupport(eager=True, rows=torch.tensor(index[rows]))
        log_weights(
            _checked(model, support),
            restrict(guide, rows),
            *(t[rows] for t in data),
            num_samples=1,
            nesting=nesting,
        )


def _checked(model: Callable[..., object], support: ObservedSupport) -> Callable[..., object]:
    """``model`` run inside ``support`` (inside the traces' block, where it sees the observed sites)."""

    def run(*args: object, **kwargs: object) -> object:
        with support:
            return model(*args, **kwargs)

    run.__wrapped__ = model  # type: ignore[attr-defined]
    return run


class _Running:
    r"""The running sums of one chunk of rows' log-weights ``[k, rows]`` over its sample chunks, in float64.

    Sums of :math:`\ell` and :math:`\ell^2` about the first chunk's mean, the log-sum-exps of
    :math:`\ell` and :math:`2\ell` and, for the Pareto fit, the ``tail`` largest and the smallest
    (none kept with ``tail=0``).
    """

    def __init__(self, first: torch.Tensor, tail: int) -> None:
        self.shift = first.mean(0)
        self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        self.lse1 = torch.full_like(self.shift, -math.inf)
        self.lse2 = torch.full_like(self.shift, -math.inf)
        self.top = first.new_zeros((0, *self.shift.shape))
        self.low = torch.full_like(self.shift, math.inf)
        self.tail = tail

    def add(self, lw: torch.Tensor) -> None:
        c = lw - self.shift
        self.s1 += c.sum(0)
        self.s2 += (c * c).sum(0)
        self.lse1 = torch.logaddexp(self.lse1, torch.logsumexp(lw, 0))
        self.lse2 = torch.logaddexp(self.lse2, torch.logsumexp(2 * lw, 0))
        if self.tail:
            both = torch.cat([self.top, lw])
            self.top = both.topk(min(self.tail, both.shape[0]), dim=0).values
            self.low = torch.minimum(self.low, lw.min(0).values)

    def bounds(
        self, K: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """ELBO, its SE, IWAE and its SE (NaN for ``K == 1``) of the chunk's rows after all ``K`` draws."""
        mean_c = self.s1 / K
        var = (self.s2 / K - mean_c**2).clamp_min(0) * K / max(K - 1, 1)
        iwae, iwae_se = log_mean_exp(self.lse1, self.lse2, K)
        return (
            self.shift + mean_c,
            (var / K).sqrt(),
            iwae,
            iwae_se if iwae_se is not None else math.nan,
        )


def _check_bounds(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    num_samples: int,
    batch_size: int,
    seed: int | None,
    index: torch.Tensor | None,
    spread: Spread | None,
    **_: object,
) -> Checked:
    """:func:`importance_bounds`'s refusals, before any work; spread over processes, the probe of one row too (its errors here, before any process starts)."""
    check_int(num_samples, "the number of importance samples K", high=MAX_SAMPLES)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    index = dataset_index(index, _check_data(data))
    model, guide = analysed(model, guide, data, "the importance bounds")  # type: ignore[assignment]
    if spread is not None:
        with seeded(seed), torch.no_grad():
            first, head = restrict(guide, slice(0, 1)), tuple(t[:1] for t in data)
            probe("importance bounds", lambda: plate_nesting(model, first, *head), data)
    return Checked((model, guide), data, index, (model, guide))


@spread_over_rows(Bounds, _check_bounds)
def importance_bounds(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_batch: int | None = None,
    seed: int | None = None,
    index: torch.Tensor | None = None,
    progress: bool = False,
    diagnose: bool = True,
) -> Bounds:
    r"""ELBO and IWAE (:math:`K` = ``num_samples``) per datapoint, with standard errors.

    Parameters
    ----------
    model, guide : callable
        Written the ppl-vae way (a ``"data"`` plate over the rows of
        ``data``). A per-datapoint guide such as
        :class:`~ppl_vae.inference.local.LocalPosterior` is cut to each chunk.
    *data : torch.Tensor
        The model's arguments, rows in the first dimension.
    num_samples : int
        Importance samples :math:`K` per datapoint.
    batch_size : int
        At most this many data rows per chunk (fewer when ``K`` draws of
        them would not fit in ``MAX_ELEMENTS``).
    sample_batch : int, optional
        Samples per chunk (default: as many as fit in ``MAX_ELEMENTS`` for one row).
    seed : int, optional
        Seeds the draws; the caller's random stream is left as it was.
    index : tensor, optional
        The rows' indices in their dataset (default ``0..N-1``). Each
        datapoint draws from its own stream (:class:`~ppl_vae.inference.random.Streams`),
        seeded from ``(seed, index)`` and the sample chunk, so its bounds do
        not depend on the batch size or on the rows it shares a chunk with.
        A guide with a site that is not a transformed Gaussian is run one row
        at a time.
    spread : Spread, optional
        Spread the datapoints over devices and processes
        (:func:`~ppl_vae.inference.distributed.spread_over_rows`); each datapoint's
        bounds are the same as here (to float rounding).
    progress : bool
        A progress bar over the chunks of rows and samples (:func:`ppl_vae.progress.bar`).
    diagnose : bool
        Compute each datapoint's Pareto :math:`\hat k` (``Bounds.khat``; one
        ArviZ fit per datapoint). Off where only the ELBO is wanted.
    """
    n, K, device = data[0].shape[0], num_samples, data[0].device
    width = max(1, math.prod(data[0].shape[1:]))
    k_chunk = sample_batch or max(1, min(K, MAX_ELEMENTS // width))
    out = {
        k: torch.empty(n, dtype=torch.float64, device=device)
        for k in ("elbo", "elbo_se", "iwae", "iwae_se")
    }
    tails: list[_Running] = []
    ok: torch.Tensor | bool = True
    with seeded(seed), torch.no_grad():
        base = base_seed(seed)
        first, head = restrict(guide, slice(0, 1)), tuple(t[:1] for t in data)
        nesting = probe("importance bounds", lambda: plate_nesting(model, first, *head), data)
        batched = draws_in_batches(first, *head)
        rows_per_chunk = (
            min(batch_size, max(1, MAX_ELEMENTS // (k_chunk * width))) if batched else 1
        )
        at = index.tolist()  # the streams' dataset indices, on the host once
        # no distribution checks a value per chunk (each check would read it back): the observed values are checked as tensors,
        # read with the result, and a bad parameter shows as a non-finite weight
        with (
            bar(
                total=math.ceil(n / rows_per_chunk) * math.ceil(K / k_chunk),
                desc=f"bounds K={K}",
                unit="chunk",
                enabled=progress,
            ) as shown,
            pyro.validation_enabled(False),
        ):
            for rows in chunks(n, rows_per_chunk):
                args, g = tuple(t[rows] for t in data), restrict(guide, rows)
                for j, ks in enumerate(chunks(K, k_chunk)):
                    support = ObservedSupport()
                    lw = log_weights(
                        _checked(model, support) if j == 0 else model,
                        g,
                        *args,
                        num_samples=ks.stop - ks.start,
                        nesting=nesting,
                        streams=Streams(base, at[rows], device, Tag.BOUNDS, j),
                    ).double()
                    if j == 0:
                        ok = support.ok if ok is True else ok & support.ok
                        running = _Running(lw, tail_size(K) if diagnose else 0)
                    running.add(lw)
                    shown.update()
                out["elbo"][rows], out["elbo_se"][rows], out["iwae"][rows], out["iwae_se"][rows] = (
                    running.bounds(K)
                )
                tails.append(running)
        finite, inside = host(
            torch.stack((torch.isfinite(out["elbo"]).all(), torch.as_tensor(ok, device=device)))
        )  # the one read
        if not inside:
            _raise_outside(model, guide, data, at, rows_per_chunk, nesting)
    if not finite:
        raise ConfigError(
            "some log-weights are not finite: the guide puts mass where the model has none"
        )
    khat = (
        khat_of_tail(torch.cat([r.top for r in tails], 1), torch.cat([r.low for r in tails]), K)
        if diagnose
        else None
    )
    if K == 1:
        out["elbo_se"] = out["iwae_se"] = None
    return Bounds(num_samples=K, khat=khat, **out)
