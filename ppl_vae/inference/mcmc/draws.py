"""Draws of any inference method in ArviZ's ``(chain, draw, ...)`` layout, shared by MCMC and VI."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, check_int
from ...guides.latent import Latent
from .. import azcompat
from ..params import discover

__all__ = ["Draws", "frozen_parameters", "point_layout", "site_dims"]


@dataclass(frozen=True)
class Draws:
    """Draws of one inference method, in ArviZ's ``(chain, draw, ...)`` layout.

    Attributes
    ----------
    samples : dict of str to ndarray
        Each variable as ``[chain, draw, *shape]``.
    sample_stats : dict of str to ndarray
        Per-transition statistics (``diverging``, ``acceptance_rate``,
        ``n_steps``, ``log_weight`` for VI draws ...), ``[chain, draw, ...]``.
    dims, coords : dict
        ArviZ dimension names (beyond ``chain`` and ``draw``) and coordinates.
    method : str
        ``"batched-hmc"``, ``"pyro-nuts"``, ``"vi-amortized"`` ...
    wall_time : float
        Seconds spent sampling (warmup included).
    """

    samples: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray] = field(default_factory=dict)
    dims: dict[str, list[str]] = field(default_factory=dict)
    coords: dict[str, list[Any]] = field(default_factory=dict)
    method: str = ""
    wall_time: float = float("nan")

    def __post_init__(self) -> None:  # read-only: a result is not edited after the fact
        for name in ("samples", "sample_stats"):
            arrays = {}
            for k, v in getattr(self, name).items():
                a = np.asarray(v)
                if a.flags.writeable:
                    a = a.copy()
                    a.setflags(write=False)
                arrays[k] = a
            object.__setattr__(self, name, MappingProxyType(arrays))
        object.__setattr__(
            self, "dims", MappingProxyType({k: tuple(v) for k, v in self.dims.items()})
        )
        object.__setattr__(
            self, "coords", MappingProxyType({k: tuple(v) for k, v in self.coords.items()})
        )

    @property
    def num_chains(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_draws(self) -> int:
        return next(iter(self.samples.values())).shape[1]

    @property
    def num_divergences(self) -> int:
        """Divergent post-warmup transitions (0 if the method has none)."""
        div = self.sample_stats.get("diverging")
        return 0 if div is None else int(np.asarray(div).sum())

    def to_inference_data(self) -> Any:
        """The installed ArviZ's container (``InferenceData`` for 0.x, ``DataTree`` for 1.x), via :mod:`~ppl_vae.inference.azcompat`."""
        return azcompat.to_inference_data(
            self.samples,
            sample_stats=self.sample_stats,
            dims=self.dims,
            coords=self.coords,
            attrs={"method": self.method, "wall_time_s": self.wall_time},
        )

    def diagnostics(self) -> Any:
        """R-hat, bulk and tail ESS and MCSE per scalar element (a DataFrame; labels ``z[0, 1]``)."""
        return azcompat.diagnostics(self.samples, self.dims, self.coords)

    def to_dataframe(self) -> Any:
        """Same as :meth:`diagnostics`."""
        return self.diagnostics()

    @classmethod
    def concat(cls, parts: list[Draws]) -> Draws:
        """The draws of consecutive blocks of datapoints, as one (every variable has a ``point`` dim); the longest wall time."""
        first = parts[0]

        def joined(name: str, arrays: list[np.ndarray]) -> np.ndarray:
            dims = list(first.dims.get(name, ()))
            if "point" not in dims:
                raise ConfigError(
                    f"variable {name!r} has no point dim: draws of several datapoint blocks cannot be joined"
                )
            return np.concatenate(arrays, axis=2 + dims.index("point"))

        samples = {k: joined(k, [p.samples[k] for p in parts]) for k in first.samples}
        stats = {k: joined(k, [p.sample_stats[k] for p in parts]) for k in first.sample_stats}
        coords = {**first.coords, "point": [c for p in parts for c in p.coords["point"]]}
        return cls(
            samples, stats, dict(first.dims), coords, first.method, max(p.wall_time for p in parts)
        )

    def min_ess_per_point(self, method: str = "bulk") -> np.ndarray:
        """Minimum ESS over every per-datapoint variable's dimensions, one value per ``point``."""
        per_point = [n for n in self.samples if self.dims.get(n, [None])[0] == "point"]
        if not per_point:
            raise ConfigError("these draws have no per-datapoint (point) variables")
        mins = [
            azcompat.ess(self.samples[n], method).reshape(self.samples[n].shape[2], -1).min(1)
            for n in per_point
        ]  # type: ignore[arg-type]
        return np.min(np.stack(mins), axis=0)


def site_dims(
    shapes: dict[str, tuple[int, ...]], lead: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    """ArviZ dims of each site: ``lead`` then ``{site}_dim_0, ...`` (a scalar site without ``lead`` needs none)."""
    return {
        name: [*lead, *(f"{name}_dim_{i}" for i in range(len(shape)))]
        for name, shape in shapes.items()
        if shape or lead
    }


def point_layout(
    latent: Latent, stats: tuple[str, ...], index: Sequence[int] | None = None
) -> tuple[dict[str, list[str]], dict[str, list[Any]]]:
    """ArviZ dims and coords of per-datapoint draws of every latent site and of the per-datapoint ``stats`` (``point`` first).

    The ``point`` coordinates are the datapoints' indices in their dataset (default ``0..N-1``).
    """
    shapes = {s.name: tuple(s.shape) for s in latent.sites}
    dims = {**{k: ["point"] for k in stats}, **site_dims(shapes, ("point",))}
    coords: dict[str, list[Any]] = {
        "point": [int(i) for i in index] if index is not None else list(range(latent.num_points))
    }
    for name, shape in shapes.items():
        coords |= {f"{name}_dim_{i}": list(range(e)) for i, e in enumerate(shape)}
    return dims, coords


@contextlib.contextmanager
def frozen_parameters(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Switch ``requires_grad`` off for ``params`` inside the block, restore it after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def freeze_model(
    model: Callable[..., object], args: tuple[torch.Tensor, ...]
) -> contextlib.AbstractContextManager[None]:
    found = discover(model, lambda *a: None, tuple(a[:1] for a in args))
    return frozen_parameters(found.params)


def check_counts(num_samples: int, warmup_steps: int, num_chains: int) -> None:
    check_int(num_samples, "number of draws")
    check_int(num_chains, "number of chains")
    check_int(warmup_steps, "warmup steps", low=0)
