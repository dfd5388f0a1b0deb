"""The latent state of a model per datapoint, as one unconstrained vector, and guides over it.

A model's latent sites (:class:`LatentSite`: per-datapoint shape and
``biject_to(support)``) concatenated in unconstrained space make a
:class:`Latent` of size :math:`K` per datapoint. :class:`LatentGuide` turns a
batch of distributions over that vector into a guide for the model's sites;
:func:`moment_matched` is the Gaussian with the moments of draws of it. Which
sites a model has is read off a traced run by
:func:`ppl_vae.inference.latent.latent_of`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import Transform

from ..errors import ConfigError

__all__ = ["LatentSite", "Latent", "LatentGuide", "moment_matched"]

#: the name of the auxiliary site of :class:`LatentGuide` that carries ``u``
AUX_SITE = "_ppl_vae_latent"


def _is_identity(t: Transform) -> bool:
    while isinstance(t, torch.distributions.transforms.IndependentTransform):
        t = t.base_transform
    return isinstance(t, torch.distributions.transforms.ComposeTransform) and not t.parts


@dataclass(frozen=True)
class LatentSite:
    """One latent site: its per-datapoint shape, constrained and unconstrained, and ``biject_to`` of its support."""

    name: str
    shape: tuple[int, ...]
    ushape: tuple[int, ...]
    transform: Transform

    @property
    def size(self) -> int:
        return math.prod(self.ushape)

    @property
    def identity(self) -> bool:
        return _is_identity(self.transform)


@dataclass(frozen=True)
class Latent:
    """The latent sites of a model for ``num_points`` datapoints, as one unconstrained vector of size :attr:`dim`."""

    sites: tuple[LatentSite, ...]
    num_points: int

    @property
    def dim(self) -> int:
        return sum(s.size for s in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    @property
    def plain(self) -> bool:
        """One site with a 1-d event over the reals: ``u`` is that site's value."""
        return len(self.sites) == 1 and self.sites[0].identity and len(self.sites[0].shape) == 1

    def describe(self) -> str:
        return ", ".join(f"{s.name}{list(s.shape)}" for s in self.sites)

    def labels(self) -> list[str]:
        """One label per coordinate of the *constrained* values, site by site (``z[0]``, ``s``, ``w[1,2]``)."""
        out = []
        for s in self.sites:
            if not s.shape:
                out.append(s.name)
            else:
                out += [f"{s.name}[{','.join(map(str, i))}]" for i in _ndindex(s.shape)]
        return out

    def split(self, u: torch.Tensor) -> list[torch.Tensor]:
        """``u`` ``[..., K]`` cut into each site's unconstrained value ``[..., *ushape]``."""
        chunks = u.split([s.size for s in self.sites], dim=-1)
        return [c.reshape(*u.shape[:-1], *s.ushape) for c, s in zip(chunks, self.sites)]

    def constrain(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each site's constrained value ``[..., *shape]`` and log-Jacobian ``[...]`` for ``u`` ``[..., K]``."""
        lead = u.shape[:-1]
        values, ladj = {}, {}
        for s, chunk in zip(self.sites, self.split(u)):
            if s.identity:
                values[s.name] = chunk
                ladj[s.name] = u.new_zeros(lead)
                continue
            v = s.transform(chunk)
            values[s.name] = v
            ladj[s.name] = s.transform.log_abs_det_jacobian(chunk, v).reshape(*lead, -1).sum(-1)
        return values, ladj

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`constrain`: site values ``[..., *shape]`` -> ``u`` ``[..., K]``."""
        parts = []
        for s in self.sites:
            v = values[s.name]
            lead = v.shape[: v.dim() - len(s.shape)]
            w = v if s.identity else s.transform.inv(v)
            parts.append(w.reshape(*lead, s.size))
        return torch.cat(parts, -1)

    def flat_values(self, u: torch.Tensor) -> torch.Tensor:
        """Constrained values of ``u`` ``[..., K]`` flattened and concatenated: ``[..., len(labels())]``."""
        values, _ = self.constrain(u)
        return torch.cat([values[s.name].reshape(*u.shape[:-1], -1) for s in self.sites], -1)


def _ndindex(shape: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    import itertools

    return itertools.product(*(range(n) for n in shape))


class LatentGuide:
    """A guide for a model's latent sites from a batch of distributions over ``u`` (batch ``[N]``, event ``[K]``).

    For a :attr:`Latent.plain` model the one site is sampled from the
    distribution directly. Otherwise ``u`` is an auxiliary site and each site
    a ``Delta`` at its constrained value with ``log_density = -log|J|``, so
    the guide's log-density is :math:`\\log q(u) - \\log|J| = \\log q(z)`.
    ``distribution(rows)`` gives the distribution of some datapoints.
    """

    def __init__(
        self,
        latent: Latent,
        distribution: Callable[[torch.Tensor], torch.distributions.Distribution],
        index: torch.Tensor | None = None,
    ) -> None:
        self.latent, self._distribution = latent, distribution
        self.index = index if index is not None else torch.arange(latent.num_points)

    def select(self, rows: slice | torch.Tensor) -> LatentGuide:
        """The guide of the datapoints ``rows`` only (as :func:`~ppl_vae.inference.gaps.bounds.importance_bounds` chunks)."""
        return LatentGuide(self.latent, self._distribution, self.index[rows])

    def __call__(self, x: torch.Tensor, *args: torch.Tensor) -> None:
        if len(self.index) != x.shape[0]:
            raise ConfigError(
                f"this guide covers {len(self.index)} datapoints, it got {x.shape[0]}"
            )
        q = self._distribution(self.index)
        with pyro.plate("data", x.shape[0]):
            if self.latent.plain:
                pyro.sample(self.latent.sites[0].name, q)
                return
            u = pyro.sample(AUX_SITE, q, infer={"is_auxiliary": True})
            values, ladj = self.latent.constrain(u)
            for s in self.latent.sites:
                pyro.sample(
                    s.name,
                    dist.Delta(values[s.name], log_density=-ladj[s.name], event_dim=len(s.shape)),
                )


def moment_matched(u: torch.Tensor, jitter: float = 1e-6) -> dist.MultivariateNormal:
    """The Gaussian with the mean and covariance of draws ``u`` ``[S, N, K]`` (float64 sums, in chunks)."""
    s = u.shape[0]
    if s < 2:
        raise ConfigError("moment matching needs at least 2 draws")
    total = u.new_zeros(u.shape[1:], dtype=torch.float64)
    second = u.new_zeros((*u.shape[1:], u.shape[-1]), dtype=torch.float64)
    for k in range(0, s, 100):
        d = u[k : k + 100].double()
        total += d.sum(0)
        second += torch.einsum("snd,sne->nde", d, d)
    loc = total / s
    cov = (second - s * loc.unsqueeze(-1) * loc.unsqueeze(-2)) / (s - 1)
    eye = torch.eye(u.shape[-1], dtype=cov.dtype, device=cov.device)
    tril = torch.linalg.cholesky(cov + jitter * eye)
    return dist.MultivariateNormal(loc.to(u.dtype), scale_tril=tril.to(u.dtype))
