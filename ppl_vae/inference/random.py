"""Explicit randomness: seeded blocks that leave the caller's random stream as it was, seeded pickers, and one stream per datapoint.

Library code never reseeds the global RNG for good: a stochastic function
takes a ``seed`` (or a ``torch.Generator``) and draws inside :class:`seeded`,
which forks torch's generator and restores the outer stream afterwards.

The per-datapoint analyses draw from :class:`Streams`: one counter-based
(Philox) stream per datapoint, keyed by ``(seed, tags)`` and counted from the
datapoint's index in its dataset, every row's draws made at once by a fixed
number of tensor operations. What a datapoint gets therefore does not depend on
the other datapoints in its batch, on the batch size, on how many processes
share the work or on the device: the table for a datapoint is the same however
it was computed (to float rounding of the batched arithmetic). :class:`RowDraws`
makes a Pyro program (a guide, a model's prior) draw its latent sites from such
streams.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..distributions import noise_draw, noise_leaf, point_mass
from ..errors import ConfigError
from . import philox

__all__ = [
    "pick",
    "seeded",
    "row_seed",
    "Tag",
    "Streams",
    "RowDraws",
    "draws_in_batches",
    "dataset_index",
    "base_seed",
    "stream_key",
]


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


def pick(
    n: int,
    k: int | None = None,
    *,
    seed: int,
    sorted: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
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
        raise ConfigError(
            f"index must hold one dataset index per row ({n}), got shape {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or (n and int(index.min()) < 0):
        raise ConfigError("index must hold non-negative integer dataset indices")
    return index


class Tag:
    """The first tag of each analysis's streams: one namespace per analysis, so no two analyses with one seed share a stream."""

    BOUNDS, AIS, SIMULATED, HMC, LOCAL, VI = 1, 2, 3, 4, 5, 6


def stream_key(seed: int, *tags: int) -> tuple[int, int]:
    """The Philox key of the streams of an analysis seeded with ``seed`` and tagged ``tags``: two 32-bit words (NumPy's ``SeedSequence`` mixes them).

    As :func:`row_seed`, every number goes in as two 32-bit words after the count of tags, so no two
    tag lists share a key.
    """
    values = (seed, len(tags), *tags)
    words = np.array([w for v in values for w in (v & 0xFFFFFFFF, v >> 32)], dtype=np.uint32)
    k0, k1 = (int(w) for w in np.random.SeedSequence(words).generate_state(2, np.uint32))
    return k0, k1


def _whole(value: object, what: str, below: int) -> int:
    """``value`` as an int in ``[0, below)``, or a :class:`ConfigError` naming ``what``."""
    if isinstance(value, bool) or (
        isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    ):
        raise ConfigError(
            f"{what} must be an integer in [0, 2**{below.bit_length() - 1}), got {value!r}"
        )
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"{what} must be an integer in [0, 2**{below.bit_length() - 1}), got {value!r}"
        ) from None
    if not 0 <= v < below:
        raise ConfigError(f"{what} must be an integer in [0, 2**{below.bit_length() - 1}), got {v}")
    return v


def _indices(index: torch.Tensor | Sequence[int]) -> list[int]:
    """The dataset indices as ints in ``[0, 2**63)``, or a :class:`ConfigError` naming the first that is not."""
    if isinstance(index, torch.Tensor):
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ConfigError(
                f"index must hold integer dataset indices, got a {index.dtype} tensor"
            )
        index = index.reshape(-1).tolist()
    return [_whole(i, f"dataset index {i!r}", 2**63) for i in index]


class Streams:
    r"""One random stream per datapoint: Philox-4x32-10 blocks at a counter of the datapoint's own, all rows drawn at once.

    The stream of datapoint ``index[i]`` of an analysis seeded with ``seed`` and tagged ``tags`` is
    the sequence of Philox blocks :math:`f_k(p, \mathrm{index}_i)`, :math:`p = 0, 1, \ldots`
    (:mod:`~ppl_vae.inference.philox`): the key :math:`k` = :func:`stream_key` ``(seed, *tags)``,
    the counter's words 0-1 the block's position :math:`p` in the stream, words 2-3 the dataset
    index. So two datapoints never share a block, and a datapoint's draws do not depend on the
    other rows, on the batch size, on the process or on the device: every draw of ``[..., N, ...]``
    is one fixed sequence of tensor operations on the rows' counters, whatever ``N``, and its bits
    are the same on a CPU and a GPU.

    A draw of ``m`` values per datapoint takes the next :math:`\lceil m / 4 \rceil` blocks of each
    row's stream (float64: twice as many; one 32-bit word per uniform and per normal, two in
    float64) and moves every row's position past them. The state is those positions (:meth:`get_state`): one int64 per row on ``device``.

    ``index`` holds the datapoints' indices in their dataset (the same index gives the same
    stream in every batch and process); ``seed=None`` takes the seed from torch's global stream
    (one draw, so an enclosing :class:`seeded` block decides it). A seed or tag outside
    :math:`[0, 2^{64})` or an index outside :math:`[0, 2^{63})`, or one that is not an integer, is
    refused by name.

    ``compiled=True`` makes a CPU draw with ``torch.compile`` kernels
    (:func:`~ppl_vae.inference.philox.draw`: the same bits, checked once per process; the first
    draw of a shape compiles, seconds); the default is ``True`` where the environment variable
    ``PPL_VAE_COMPILED_STREAMS`` is ``1``, else eager tensor operations.

    References
    ----------
    J. K. Salmon, M. A. Moraes, R. O. Dror and D. E. Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC '11 (2011).
    """

    def __init__(
        self,
        seed: int | None,
        index: torch.Tensor | Sequence[int],
        device: torch.device | str,
        *tags: int,
        compiled: bool | None = None,
    ) -> None:
        checked = None if seed is None else _whole(seed, "seed", 2**64)
        tags = tuple(_whole(t, f"stream tag {t!r}", 2**64) for t in tags)
        self.index = _indices(index)
        self.device = torch.device(device)
        self.compiled = (
            os.environ.get("PPL_VAE_COMPILED_STREAMS") == "1"
            if compiled is None
            else bool(compiled)
        )
        self._consts = philox.constants(stream_key(base_seed(checked), *tags), self.device)
        idx = torch.tensor(self.index, dtype=torch.int64, device=self.device)
        self._lanes = torch.stack(
            (idx & philox.MASK, idx >> 32)
        )  # counter words 2-3: the row's dataset index
        self._position = torch.zeros(
            len(self.index), dtype=torch.int64, device=self.device
        )  # counter words 0-1: blocks drawn
        self._rows: torch.Tensor | None = (
            None  # the rows of a shared position tensor that are these streams (None: all of it)
        )

    def __len__(self) -> int:
        return len(self.index)

    def select(self, rows: slice | torch.Tensor | Sequence[int]) -> Streams:
        """The streams of some datapoints: the same streams, at the same positions (drawing from the selection advances them here too).

        ``rows`` is a slice or distinct row numbers (negative ones count from the end); a row named
        twice would draw the same numbers twice, and is refused.
        """
        n = len(self)
        if isinstance(rows, slice):
            picked = list(range(n)[rows])
        else:
            if isinstance(rows, torch.Tensor) and (
                rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool
            ):
                raise ConfigError(
                    f"rows must be a slice or integer row numbers, got a {rows.dtype} tensor"
                )
            given = rows.reshape(-1).tolist() if isinstance(rows, torch.Tensor) else list(rows)
            picked = [
                _whole(
                    r + n if isinstance(r, int) and not isinstance(r, bool) and -n <= r < 0 else r,
                    f"row {r!r} of {n} streams",
                    n,
                )
                for r in given
            ]
            if len(set(picked)) != len(picked):
                raise ConfigError(
                    f"rows {picked} name a row twice: a stream cannot give one draw to two rows"
                )
        out = object.__new__(Streams)
        out.device, out.compiled, out._consts, out.index = (
            self.device,
            self.compiled,
            self._consts,
            [self.index[r] for r in picked],
        )
        where = torch.tensor(picked, dtype=torch.int64, device=self.device)
        out._lanes = self._lanes[:, where]
        if isinstance(rows, slice) and self._rows is None:
            out._position, out._rows = (
                self._position[rows],
                None,
            )  # a view: advancing it advances this object's positions
        else:
            out._position, out._rows = (
                self._position,
                (where if self._rows is None else self._rows[where]),
            )
        return out

    def get_state(self) -> torch.Tensor:
        """Where every datapoint's stream is: the rows' block positions (for :meth:`set_state`: draws made after it come again)."""
        return self._position.clone() if self._rows is None else self._position[self._rows]

    def set_state(self, state: torch.Tensor) -> None:
        """Put every datapoint's stream back where :meth:`get_state` found it."""
        if (
            not isinstance(state, torch.Tensor)
            or state.dtype != torch.int64
            or tuple(state.shape) != (len(self),)
        ):
            raise ConfigError(
                f"a state of these {len(self)} streams is an int64 tensor of shape ({len(self)},) from get_state(), got {state!r}"
            )
        if self._rows is None:
            self._position.copy_(state)
        else:
            self._position[self._rows] = state.to(self.device)

    def _positions(self) -> torch.Tensor:
        """The rows' positions in their streams (a copy where these are a selection of the rows)."""
        return self._position if self._rows is None else self._position[self._rows]

    def _blocks(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``count`` blocks of every row's stream (:func:`~ppl_vae.inference.philox.blocks`); the rows move ``count`` blocks on."""
        position = self._positions()
        x, y = philox.blocks(position, self._lanes, count, self._consts)
        self._advance(position, count)
        return x, y

    def _advance(self, position: torch.Tensor, count: int) -> None:
        """Move the rows ``count`` blocks on from ``position`` (the rows' positions as read before the draw)."""
        if self._rows is None:
            self._position.add_(count)
        else:
            self._position[self._rows] = position.add_(count)

    def _draw(self, kind: str, shape: Sequence[int], dim: int, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(dtype, torch.dtype) or dtype not in philox.FLOAT_DTYPES:
            raise ConfigError(
                f"streams draw {kind} values of a float dtype ({', '.join(map(str, philox.FLOAT_DTYPES))}), got {dtype}"
            )
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ConfigError(
                f"draws need a dimension for the {len(self)} datapoints, got shape ()"
            )
        dim = dim % len(shape)
        if shape[dim] != len(self):
            raise ConfigError(
                f"draws of shape {shape} have {shape[dim]} rows in dim {dim}; these streams are for {len(self)} datapoints"
            )
        rest = shape[:dim] + shape[dim + 1 :]
        count = math.prod(rest)
        if count == 0 or len(self) == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        blocks = (philox.normal_blocks if kind == "normal" else philox.uniform_blocks)(count, dtype)
        position = self._positions()
        values = philox.draw(
            kind, position, self._lanes, (rest, dim), dtype, self._consts, self.compiled
        )
        self._advance(position, blocks)
        return values

    def normal(
        self, shape: Sequence[int], dim: int = 1, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard-normal draws of ``shape``, the datapoints along ``dim`` (Box-Muller: :func:`~ppl_vae.inference.philox.normal_from_blocks`)."""
        return self._draw("normal", shape, dim, dtype)

    def uniform(
        self, shape: Sequence[int], dim: int = 1, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """U(0, 1) draws of ``shape`` (never 0 or 1), the datapoints along ``dim`` (:func:`~ppl_vae.inference.philox.uniform_from_blocks`)."""
        return self._draw("uniform", shape, dim, dtype)

    def seed_of(self, row: int) -> int:
        """A seed in :math:`[0, 2^{62})` drawn from one datapoint's stream (for a :class:`seeded` block that runs that datapoint alone)."""
        x, y = self.select([row])._blocks(1)
        return ((int(y[0, 0, 0]) << 32) | int(x[0, 0, 0])) >> 2

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Draws inside the block come again in the next such block: the positions are put back after it."""
        state = self.get_state()
        try:
            yield
        finally:
            self.set_state(state)


def draws_in_batches(program: Callable[..., object], *args: Any) -> bool:
    """Whether :class:`RowDraws` can draw ``program``'s latent sites for many datapoints at once (each a point mass or a family of :func:`~ppl_vae.distributions.noise_leaf`), from one run on ``args``."""
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(program).get_trace(*args)
    return all(
        point_mass(s["fn"]) or noise_leaf(s["fn"]) is not None
        for s in tr.nodes.values()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    )


class RowDraws(Messenger):
    """Draw every latent site of a Pyro program from per-datapoint :class:`Streams` (the datapoints: the ``plate`` dim).

    A site whose distribution :func:`~ppl_vae.distributions.noise_draw` reads -- a Gaussian
    (``Normal``, full-covariance, low-rank) or a family drawn from uniforms (``Uniform``,
    ``Exponential``, ``Laplace``, ``Cauchy``, ``Logistic``, relaxed Bernoulli and categorical),
    under ``Independent``, mask, expand and transform wrappers (``LogNormal``, ``Gumbel``, flows),
    or one that draws itself from such noise (the mixture proposal :class:`~ppl_vae.guides.local.Mixture`) --
    is drawn for all its datapoints at once from their streams' noise; a point mass is left to
    Pyro; any other distribution (``Gamma``, ``Beta``, ``Dirichlet``, discrete ones) is drawn from
    the one datapoint's stream when the program runs on one datapoint (callers run such programs
    row by row: :func:`draws_in_batches`). Enter it outside the plate of vectorised draws, so that
    it sees the site's full shape.
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
            raise ConfigError(
                f"site {msg['name']!r} is outside the {self.plate!r} plate; per-datapoint draws need every latent site inside it"
            )
        dim = len(fn.batch_shape) + frames[0].dim
        value = noise_draw(
            fn,
            lambda shape, dtype: self.streams.normal(shape, dim, dtype),
            lambda shape, dtype: self.streams.uniform(shape, dim, dtype),
        )
        if value is not None:
            value = value if fn.has_rsample else value.detach()
        elif len(self.streams) == 1:
            with seeded(self.streams.seed_of(0)):
                value = fn.rsample() if fn.has_rsample else fn.sample()
        else:
            raise ConfigError(
                f"site {msg['name']!r} ({type(fn).__name__}) is drawn one datapoint at a time; this program ran on {len(self.streams)}"
            )
        msg["value"] = value
        msg["done"] = True
