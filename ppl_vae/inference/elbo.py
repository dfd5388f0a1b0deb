r"""Per-datapoint ELBO of any model and guide written the ppl-vae way.

.. math::

    \mathcal{L}_n = \frac{1}{S} \sum_{s=1}^{S}
        \log p(x_n, z_n^{(s)}) - \log q(z_n^{(s)} \mid x_n),
    \qquad z_n^{(s)} \sim q(\cdot \mid x_n)

One value per datapoint (shape ``[N]``): the log-densities of every site are
summed over all dimensions except the data plate (:mod:`.plates`; any name).
Scales set by handlers (minibatch scaling, beta, a ``poutine.scale`` in the
model) are ignored: this is the true ELBO. :func:`evaluate_elbo` scores a
whole dataset: a global latent's term (a site outside the data plate) is
shared evenly by its rows, and a model that subsamples its data plate itself
is given the whole data and, in turn, every row as its subsample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, NonFiniteError, check_int
from .plates import DataPlate, find_data_plate, on_data_plate
from .random import seeded
from .traces import (
    analysed,
    check_pairs,
    first_nonfinite_site,
    latent_nodes,
    log_weights_of,
    per_datapoint,
    restrict,
    traces,
)
from .validation import retry_unvalidated

__all__ = ["Estimate", "elbo_per_datapoint", "evaluate_elbo", "kl_per_site"]


@dataclass(frozen=True, eq=False)
class Estimate:
    """A per-datapoint Monte Carlo estimate (nats): ``value`` and its standard error ``se`` (each ``[N]``) from ``num_draws`` draws per datapoint.

    ``se`` is ``None`` when one draw per datapoint gives no spread to estimate
    it from (ask for more particles), never a NaN standing in for a number.
    """

    value: torch.Tensor
    se: torch.Tensor | None
    num_draws: int

    def mean(self) -> tuple[float, float | None]:
        """The mean over datapoints and its standard error (from the spread across datapoints; ``None`` for one datapoint)."""
        n = self.value.numel()
        spread = float(self.value.std()) / n**0.5 if n > 1 else None
        return float(self.value.mean()), spread

    def __str__(self) -> str:
        m, se = self.mean()
        pm = f" ± {se:.3f}" if se is not None else ""
        return f"{m:.3f}{pm} nats (mean of {self.value.numel()} datapoints, {self.num_draws} draw(s) each)"


def elbo_per_datapoint(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_particles: int = 1,
    plate: str = "data",
    spread: int | None = None,
) -> Estimate:
    """ELBO per datapoint and its Monte Carlo standard error, each ``[N]``, as an :class:`Estimate`.

    With a single particle there is no standard error (``se`` is ``None``). ``spread``: a global latent's
    term is divided between that many rows (:func:`~.traces.per_datapoint`); without it such a site is refused.

    Raises
    ------
    NonFiniteError
        When some datapoint's estimate is not finite, naming the site (found in
        the traces that produced it) or the invalid distribution parameter.
    """
    if num_particles < 1:
        raise ConfigError(f"num_particles must be >= 1, got {num_particles}")
    draws = []
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), "cpu")
    with torch.no_grad():
        for _ in range(num_particles):
            (model_tr, guide_tr), invalid = retry_unvalidated(
                lambda: traces(model, guide, *args), device=device
            )
            lw = log_weights_of(model_tr, guide_tr, plate, spread=spread)
            if invalid or not bool(torch.isfinite(lw).all()):
                name, where = first_nonfinite_site(model_tr, guide_tr, plate)
                raise NonFiniteError(
                    f"{invalid}the ELBO of {int((~torch.isfinite(lw)).sum())} datapoint(s) is not finite: {where}",
                    site=name,
                )
            draws.append(lw)
    stacked = torch.stack(draws)
    mean = stacked.mean(0)
    se = stacked.std(0) / num_particles**0.5 if num_particles > 1 else None
    return Estimate(mean, se, num_particles)


def evaluate_elbo(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: Sequence[torch.Tensor],
    *,
    batch_size: int = 1000,
    num_particles: int = 1,
    plate: DataPlate | str | None = None,
    index: torch.Tensor | None = None,
    spread: int | None = None,
) -> Estimate:
    """The ELBO of every row of ``data`` (a tuple of tensors), scored ``batch_size`` rows at a time, as an :class:`Estimate`.

    ``plate`` is the data plate (a :class:`~.plates.DataPlate`, its name, or None: found on a probe of the
    first rows). Its indices are the rows' dataset indices, ``index`` (default ``0..N-1``), so a guide with
    per-datapoint parameters scores each row with its own. A global latent's term is shared evenly by
    ``spread`` rows (default: the ``N`` rows scored; each batch draws it anew, so the rows' sum is an
    unbiased estimate of the ELBO). A model that subsamples its data plate (``subsample_size=B``) is given
    the whole ``data`` and scores the rows ``index`` (default all), ``B`` at a time.
    """
    if not isinstance(plate, DataPlate):
        head = tuple(t[:2] for t in data)
        plate = find_data_plate(
            model, restrict(guide, slice(0, head[0].shape[0])), head, plate=plate, what="the ELBO"
        )
    device = data[0].device
    index = torch.arange(data[0].shape[0], device=device) if index is None else index.to(device)
    if not plate.subsampled and len(index) != data[0].shape[0]:
        raise ConfigError(
            f"index must hold one dataset index per row ({data[0].shape[0]}), got {len(index)}"
        )
    step = plate.subsample_size or batch_size
    parts = []
    for i in range(0, len(index), step):
        rows = index[i : i + step]
        if plate.subsampled:  # the model takes the whole data and exactly B indices: the last block is padded with its own rows
            args, driven = tuple(data), rows[torch.arange(step, device=device) % len(rows)]
        else:
            args, driven = tuple(t[i : i + step] for t in data), rows
        part = elbo_per_datapoint(
            on_data_plate(model, plate, index=driven),
            on_data_plate(guide, plate, index=driven),
            *args,
            num_particles=num_particles,
            spread=spread or len(index),
        )
        parts.append(
            Estimate(
                part.value[: len(rows)],
                part.se[: len(rows)] if part.se is not None else None,
                num_particles,
            )
        )
    se = torch.cat([p.se for p in parts]) if num_particles > 1 else None  # type: ignore[misc]
    return Estimate(torch.cat([p.value for p in parts]), se, num_particles)


def kl_per_site(
    model: Callable[..., object],
    guide: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 100,
    seed: int | None = 0,
    plate: str = "data",
) -> dict[str, Estimate]:
    r"""Each latent site's KL term of the ELBO per datapoint, :math:`E_q[\log q(z_s \mid \cdot) - \log p(z_s \mid \cdot)]`, as :class:`Estimate` s.

    The ELBO is :math:`E_q[\log p(x \mid z)] - \sum_s \mathrm{KL}_s`, one term per latent site
    ``s`` in the order the model samples them (for a hierarchical VAE: the KL per layer, each
    conditional on the layers drawn before it). Over ``num_samples`` guide draws, each term is
    torch's closed-form ``kl_divergence`` between the guide's and the model's distribution of
    the site given the draws upstream, where one is registered, else the log-ratio at the draw;
    both are unbiased. A site that collapsed to its prior has a term near 0.
    """
    check_int(num_samples, "the number of samples")
    model, guide = analysed(model, guide, args, "the KL per site")  # type: ignore[assignment]
    with seeded(seed), torch.no_grad():
        model_tr, guide_tr = traces(model, guide, *args, num_samples=num_samples)
        check_pairs(model_tr, guide_tr, "the KL per site")
        out = {}
        for name, site in latent_nodes(model_tr).items():
            q_site = guide_tr.nodes[name]
            q, p = q_site["fn"], site["fn"]
            shape = torch.broadcast_shapes(
                q.batch_shape, p.batch_shape
            )  # one side may lack the draws' dimension (a fixed prior)
            try:
                kl = torch.distributions.kl.kl_divergence(q.expand(shape), p.expand(shape))
            except NotImplementedError:
                kl = q_site["fn"].log_prob(q_site["value"]) - site["fn"].log_prob(site["value"])
            draws = per_datapoint(q_site, plate, kl.expand(q_site["fn"].batch_shape))  # [S, N]
            if draws.dim() == 1:
                draws = draws.expand(num_samples, -1)
            se = draws.std(0) / num_samples**0.5 if num_samples > 1 else None
            out[name] = Estimate(draws.mean(0), se, num_samples)
    return out
