"""Explicit randomness: seeded blocks that leave the caller's random stream as it was, seeded pickers, and one stream per datapoint.

Library code never reseeds the global RNG for good: a stochastic function
takes a ``seed`` (or a ``torch.Generator``) and draws inside :class:`seeded`,
which forks torch's generator and restores the outer stream afterwards.

The per-datapoint analyses draw from :class:`Streams`: one generator per
datapoint, seeded from ``(seed, the datapoint's index in its dataset)``, its
draws made row by row and stacked along the datapoints' dimension. What a
datapoint gets therefore does not depend on the other datapoints in its batch,
on the batch size or on how many processes share the work: the table for a
datapoint is the same however it was computed (to float rounding of the
batched arithmetic). :class:`RowDraws` makes a Pyro program (a guide, a
model's prior) draw its latent sites from such streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..distributions import gaussian_base, gaussian_draw, point_mass
from ..errors import ConfigError

__all__ = ["pick", "seeded", "row_seed", "Tag", "Streams", "RowDraws", "draws_in_batches", "dataset_index", "base_seed"]


class seeded:
    """Context: seed torch's global RNG (used by Pyro) inside, restore the outer stream after.

    ``torch.manual_seed`` seeds the CPU and every CUDA device, so the outer
    streams of all of them are saved and restored (on a machine with CUDA this
    initialises it, as ``torch.random.fork_rng`` does by default).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self._fork = torch.random.fork_rng(devices=cuda)
        self._fork.__enter__()
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def pick(n: int, k: int | None = None, *, seed: int, sorted: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)`` (all ``n``, shuffled, when ``k`` is None): the first of a seeded permutation.

    The same ``(n, seed)`` gives the same permutation on every device (it is drawn on the CPU and
    moved to ``device``), so a subset of ``k`` is the start of the subset of ``k + 1``.
    """
    perm = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))
    idx = perm if k is None else perm[: min(k, n)]
    if sorted:
        idx = idx.sort().values
    return idx if device is None else idx.to(device)


def base_seed(seed: int | None) -> int:
    """``seed``, or (None) one seed drawn from torch's global stream, so that an enclosing :class:`seeded` block decides it."""
    return int(torch.randint(2**62, (), device="cpu")) if seed is None else int(seed)


def row_seed(seed: int, index: int, *tags: int) -> int:
    """A 63-bit seed for datapoint ``index`` of an analysis seeded with ``seed`` (NumPy's ``SeedSequence`` mixes them).

    Every number goes in as two 32-bit words after the count of tags: ``SeedSequence`` pads a short
    entropy with zeros, so ``[seed, index]`` and ``[seed, index, 0]`` would otherwise be one stream.
    """
    values = (seed % 2**64, index, len(tags), *tags)
    if any(v < 0 or v >= 2**64 for v in values):
        raise ValueError(f"seed, index and tags must be in [0, 2**64), got {values}")
    words = np.array([w for v in values for w in (v & 0xFFFFFFFF, v >> 32)], dtype=np.uint32)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def dataset_index(index: torch.Tensor | Sequence[int] | None, n: int) -> torch.Tensor:
    """The datapoints' indices in their dataset (default ``0..n-1``), one per row, on the CPU."""
    if index is None:
        return torch.arange(n, device="cpu")
    index = index.cpu() if isinstance(index, torch.Tensor) else torch.as_tensor(index, device="cpu")
    if index.shape != (n,):
        raise ConfigError(f"index must hold one dataset index per row ({n}), got shape {tuple(index.shape)}")
    if index.is_floating_point() or index.is_complex() or (n and int(index.min()) < 0):
        raise ConfigError("index must hold non-negative integer dataset indices")
    return index


class Tag:
    """The first tag of each analysis's streams: one namespace per analysis, so no two analyses with one seed share a stream."""

    BOUNDS, AIS, SIMULATED, HMC, LOCAL, VI = 1, 2, 3, 4, 5, 6


class Streams:
    """One random stream per datapoint: a ``torch.Generator`` on ``device`` seeded by :func:`row_seed`.

    ``index`` holds the datapoints' indices in their dataset (the same index gives the same
    stream in every batch and process); ``seed=None`` takes the seed from torch's global stream
    (one draw, so an enclosing :class:`seeded` block decides it). Draws for ``[..., N, ...]``
    are made row by row from each datapoint's generator and stacked along the datapoints' dim.
    """

    def __init__(self, seed: int | None, index: torch.Tensor | Sequence[int], device: torch.device | str, *tags: int) -> None:
        base = base_seed(seed)
        self.device = torch.device(device)
        self.index = [int(i) for i in index]
        self._gens = [torch.Generator(device=self.device).manual_seed(row_seed(base, i, *tags)) for i in self.index]

    def __len__(self) -> int:
        return len(self._gens)

    def select(self, rows: slice | torch.Tensor | Sequence[int]) -> Streams:
        """The streams of some datapoints (the same generators: drawing from the selection advances them)."""
        out = object.__new__(Streams)
        picked = range(len(self))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        out.device, out.index, out._gens = self.device, [self.index[r] for r in picked], [self._gens[r] for r in picked]
        return out

    def _draw(self, fill: Any, shape: Sequence[int], dim: int, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        dim = dim % len(shape)
        if shape[dim] != len(self):
            raise ValueError(f"draws of shape {shape} have {shape[dim]} rows in dim {dim}; these streams are for {len(self)} datapoints")
        row = shape[:dim] + shape[dim + 1 :]
        return torch.stack([fill(row, generator=g, dtype=dtype, device=self.device) for g in self._gens], dim)

    def normal(self, shape: Sequence[int], dim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard-normal draws of ``shape``, the datapoints along ``dim``."""
        return self._draw(torch.randn, shape, dim, dtype)

    def uniform(self, shape: Sequence[int], dim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """U(0, 1) draws of ``shape``, the datapoints along ``dim``."""
        return self._draw(torch.rand, shape, dim, dtype)

    def seed_of(self, row: int) -> int:
        """A seed drawn from one datapoint's stream (for a :class:`seeded` block that runs that datapoint alone)."""
        return int(torch.randint(2**62, (), generator=self._gens[row], device=self.device))

    def get_state(self) -> list[torch.Tensor]:
        """Where every datapoint's stream is (for :meth:`set_state`: draws made after it come again)."""
        return [g.get_state() for g in self._gens]

    def set_state(self, state: list[torch.Tensor]) -> None:
        """Put every datapoint's stream back where :meth:`get_state` found it."""
        for g, s in zip(self._gens, state):
            g.set_state(s)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Draws inside the block come again in the next such block: the generators are put back after it."""
        states = [g.get_state() for g in self._gens]
        try:
            yield
        finally:
            for g, s in zip(self._gens, states):
                g.set_state(s)


def draws_in_batches(program: Callable[..., object], *args: Any) -> bool:
    """Whether :class:`RowDraws` can draw ``program``'s latent sites for many datapoints at once (each a transformed Gaussian or a point mass), from one run on ``args``."""
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(program).get_trace(*args)
    return all(point_mass(s["fn"]) or gaussian_base(s["fn"]) is not None
               for s in tr.nodes.values() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s))


class RowDraws(Messenger):
    """Draw every latent site of a Pyro program from per-datapoint :class:`Streams` (the datapoints: the ``plate`` dim).

    A transformed Gaussian (Normal, MultivariateNormal, LogNormal, a flow) is drawn from its
    datapoints' normal noise (:func:`~ppl_vae.distributions.gaussian_draw`); a point mass is left
    to Pyro; any other distribution is drawn from the one datapoint's stream when the program runs
    on one datapoint (callers run such programs row by row: :func:`draws_in_batches`). Enter it
    outside the plate of vectorised draws, so that it sees the site's full shape.
    """

    def __init__(self, streams: Streams, plate: str = "data") -> None:
        super().__init__()
        self.streams, self.plate = streams, plate

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["done"] or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if point_mass(fn):
            return
        frames = [f for f in msg["cond_indep_stack"] if f.name == self.plate]
        if not frames:
            raise ConfigError(f"site {msg['name']!r} is outside the {self.plate!r} plate; per-datapoint draws need every latent site inside it")
        dim = len(fn.batch_shape) + frames[0].dim
        base = gaussian_base(fn)
        if base is not None:
            value = gaussian_draw(fn, lambda shape: self.streams.normal(shape, dim, dtype=base.loc.dtype))
        elif len(self.streams) == 1:
            with seeded(self.streams.seed_of(0)):
                value = fn.rsample() if fn.has_rsample else fn.sample()
        else:
            raise ConfigError(f"site {msg['name']!r} ({type(fn).__name__}) is drawn one datapoint at a time; this program ran on {len(self.streams)}")
        msg["value"] = value
        msg["done"] = True

