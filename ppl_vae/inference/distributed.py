"""Devices and processes through Lightning Fabric: building a :class:`Fabric` from user options, and the collectives ``fit`` uses.

``fit`` runs its loop through Fabric (Pyro's own route to several devices): the
accelerator, the devices, the strategy (``ddp`` and the others Fabric offers),
the precision and ``num_nodes`` are Fabric's. :func:`make_fabric` turns the
options into a :class:`Fabric` or a :class:`ConfigError` naming the option, before
any work. The data-parallel strategies are built with
``find_unused_parameters=True``: a model and guide are arbitrary Pyro code, and a
network that one step does not use (a branch not taken) must not stall DDP.

The per-datapoint analyses spread their datapoints the same way
(:func:`spread_rows`, chosen by a :class:`Spread`): each process takes a
contiguous block of rows, the blocks are gathered in order and combined. The
analyses draw from one random stream per datapoint
(:class:`~ppl_vae.inference.random.Streams`), so a datapoint's result does not
depend on how many processes computed the table. An analysis is written for
the rows of one process; :func:`spread_over_rows` (a decorator, as BlackJAX
leaves ``vmap`` and ``pmap`` to its caller) gives it its ``spread`` argument:
the checks before any process starts, the split, the one base seed and the
combination.

Processes started by a fork or spawn hand rank 0's result back to the caller
through a file in a temporary folder, written by :func:`ppl_vae.io.save_torch`
as plain tensors and containers (:func:`ppl_vae.io.to_plain`) and read with
``weights_only`` (:func:`ppl_vae.io.load_torch`): nothing is unpickled from disk.

Lightning is imported here only, and lazily (it takes seconds to import).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from .. import errors, io
from ..errors import ConfigError, NonFiniteError, PplVaeError, ProcessFailed, TrainingDiverged
from .params import discover
from .random import base_seed, seeded

__all__ = [
    "ACCELERATORS",
    "DDP_STRATEGIES",
    "Checked",
    "Collectives",
    "Spread",
    "launched_rank",
    "make_fabric",
    "rank_seed",
    "run_processes",
    "shared_cores",
    "spread_over_rows",
    "spread_rows",
]

T = TypeVar("T")

ACCELERATORS = ("cpu", "cuda", "mps", "gpu", "auto")
#: Fabric's data-parallel strategy names and their process start methods (``ddp``: see :func:`_ddp_start`)
DDP_STRATEGIES = {"ddp": "", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
#: the strategies an analysis can be spread with (:class:`Spread`)
SPREAD_STRATEGIES = ("ddp", "ddp_fork", "ddp_notebook")
#: set by launchers that start the processes themselves (torchrun, SLURM's srun)
EXTERNAL_LAUNCH = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID")


def launched_rank() -> int | None:
    """This process's global rank where torchrun (``RANK``) or SLURM's srun (``SLURM_PROCID``) started it; None otherwise."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def _ddp_start() -> str:
    """How ``ddp`` starts its processes: not at all under torchrun or srun (``popen``: Fabric joins them), else by ``fork``.

    Forking runs the training function in children of the calling process, so ``fit`` from Python
    and ``ppl-vae fit`` behave as in one process (the caller's networks get the trained values),
    instead of re-running the whole script or command in each process. The children initialise
    their accelerator after the fork, which CUDA allows (Lightning's ``ddp_notebook`` does the same).
    """
    if any(os.environ.get(k) for k in EXTERNAL_LAUNCH):
        return "popen"
    return "fork" if hasattr(os, "fork") else "spawn"


def make_fabric(
    accelerator: str | None,
    devices: int | str | Sequence[int],
    strategy: str,
    precision: str | int | None,
    num_nodes: int,
    *,
    like: torch.Tensor,
) -> Any:
    """A :class:`lightning.fabric.Fabric` for these options; ``accelerator=None`` means where ``like`` (the data) is."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if accelerator is None:
        accelerator = like.device.type
        if like.device.type != "cpu" and like.device.index is not None and devices == 1:
            devices = [like.device.index]
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}"
        )
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        raise ConfigError(
            f"devices must be a positive number of devices (or -1 for all), got {devices!r}"
        )
    cores = os.cpu_count() or 1
    if accelerator == "cpu" and isinstance(devices, int) and devices > cores:
        raise ConfigError(
            f"devices={devices} CPU processes is more than this machine's {cores} cores; choose at most {cores}"
        )
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if num_nodes > 1 and launched_rank() is None:
        raise ConfigError(
            f"num_nodes={num_nodes}: the processes of several machines are started by torchrun or srun on each (docs/devices.md), not from here"
        )
    chosen: Any = strategy
    if strategy in DDP_STRATEGIES:
        start = DDP_STRATEGIES[strategy] or _ddp_start()
        if (
            start == "fork"
            and accelerator in ("cuda", "gpu", "auto")
            and torch.cuda.is_initialized()
        ):
            raise ConfigError(
                f"strategy {strategy!r} forks its processes, and CUDA is already initialised in this one (a forked process cannot use it); "
                "start the processes with torchrun, or call before any CUDA work"
            )
        chosen = DDPStrategy(start_method=start, find_unused_parameters=True)  # type: ignore[arg-type]
    try:
        return Fabric(
            accelerator=accelerator,
            devices=devices,
            strategy=chosen,
            precision=precision,
            num_nodes=num_nodes,
        )  # type: ignore[arg-type]
    except (
        ValueError,
        RuntimeError,
        TypeError,
    ) as exc:  # Fabric's MisconfigurationException is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot run on accelerator={accelerator!r}, devices={devices!r}, strategy={strategy!r}, precision={precision!r}: {first}"
        ) from None


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 draws from ``seed`` itself (one process is the plain run); the others from distinct derived seeds."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


class Collectives:
    """The few collectives ``fit`` and the spread analyses need, each a no-op in one process."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric
        self.rank, self.world = (
            (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
        )

    @classmethod
    def alone(cls) -> Collectives:
        """The collectives of a computation that runs in this one process."""
        return cls(None)

    def shard(self, n: int) -> torch.Tensor:
        """This process's row indices of ``n`` (``rank::world``)."""
        return torch.arange(self.rank, n, self.world, device="cpu")

    def _scalar(self, value: float) -> torch.Tensor:
        # on the process's device: NCCL reduces device tensors only (float32: MPS has no float64)
        return torch.tensor(
            value,
            dtype=torch.float64 if self.fabric.device.type != "mps" else torch.float32,
            device=self.fabric.device,
        )

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        if self.world == 1:
            return value
        return float(self.fabric.all_reduce(self._scalar(value), reduce_op="sum"))

    def first_bad(self, bad: bool) -> int:
        """The lowest rank whose ``bad`` is true (``-1``: none): every process takes the same decision."""
        if self.world == 1:
            return 0 if bad else -1
        flag = self._scalar(self.world - self.rank if bad else 0)
        top = int(self.fabric.all_reduce(flag, reduce_op="max"))
        return self.world - top if top else -1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_rank(self, obj: Any, rank: int) -> Any:
        """Process ``rank``'s ``obj`` (picklable) on every process."""
        return obj if self.world == 1 else self.fabric.broadcast(obj, src=rank)

    def from_rank_zero(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return obj if self.world == 1 else self.fabric.broadcast(obj, src=0)


@contextlib.contextmanager
def shared_cores(fabric: Any, coll: Collectives) -> Iterator[None]:
    """The processes of a node share its cores (torch's thread count divided between them, restored after)."""
    threads = torch.get_num_threads()
    if coll.world > 1 and fabric.device.type == "cpu":
        torch.set_num_threads(
            max(1, threads // getattr(fabric.strategy, "num_processes", coll.world))
        )
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_HANDED = "ppl-vae: handed over through a file"


def _in_process(
    fabric: Any, fn: Callable[..., Any], args: tuple[Any, ...], caller: int, handoff: Path
) -> Any:
    result = fn(fabric, *args)
    if (
        os.getpid() == caller
    ):  # one process, or each of those torchrun started: the result stays here
        return result
    if (
        fabric.global_rank == 0
    ):  # a forked or spawned process: through a file (a queue would block on a large payload)
        io.save_torch(handoff, io.to_plain(result))
    return _HANDED


def run_processes(
    fabric: Any, fn: Callable[..., T], *args: Any, what: str, types: Sequence[type] = ()
) -> tuple[T, bool]:
    """``fn(fabric, *args)`` in each of Fabric's processes; rank 0's result, and whether it came from another process.

    A result from a forked or spawned process comes back through :func:`ppl_vae.io.to_plain` and
    :func:`~ppl_vae.io.from_plain` (dataclasses of ``types`` only). A failed process ends the
    call with one line naming it (``what``, e.g. "training process").
    """
    with tempfile.TemporaryDirectory(prefix="ppl-vae-") as tmp:
        handoff = Path(tmp) / "result.pt"
        try:
            out = fabric.launch(_in_process, fn, args, os.getpid(), handoff)
        except ProcessRaisedException as exc:  # the launcher stopped the other processes
            raise from_process(exc, what) from None
        except (
            ProcessExitedException
        ) as exc:  # killed (by hand, or the kernel's out-of-memory killer): the others were stopped
            how = (
                f"was killed by signal {exc.signal_name}"
                if exc.signal_name
                else f"exited with status {exc.exit_code}"
            )
            raise ProcessFailed(
                f"{what} {exc.error_index} {how} before it finished (out of memory, or stopped by hand)"
            ) from None
        if isinstance(out, str) and out == _HANDED:
            return io.from_plain(io.load_torch(handoff), types), True
    return out, False


def from_process(exc: ProcessRaisedException, what: str) -> Exception:
    """One line naming the failed process; a ppl-vae error keeps its type (one line and exit 2 on the command line)."""
    # the exception's own line: "ValueError: ..." at the margin (Pyro appends trace-shape lines after it)
    heads = [line for line in str(exc.msg).splitlines() if re.match(r"[A-Za-z_][\w.]*: \S", line)]
    last = heads[-1] if heads else (str(exc.msg).strip().splitlines() or ["no message"])[-1]
    name, _, message = last.partition(": ")
    text = f"{what} {exc.error_index} failed: {message or last}"
    cls = (
        getattr(errors, name.rsplit(".", 1)[-1], None)
        if name.startswith("ppl_vae.errors.")
        else None
    )
    if cls is TrainingDiverged:
        return TrainingDiverged(text, step=-1, site=None)
    if isinstance(cls, type) and issubclass(cls, PplVaeError) and cls is not NonFiniteError:
        return cls(text)
    return RuntimeError(f"{what} {exc.error_index} failed: {last}")


@dataclass(frozen=True)
class Spread:
    """Where a per-datapoint analysis runs: Lightning Fabric's ``accelerator``, ``devices`` per node, ``strategy`` and ``num_nodes``.

    ``accelerator=None`` means where the data is. With one device the analysis runs in this
    process (on that device); with several, :func:`spread_rows` gives each process a block of
    the datapoints.
    """

    accelerator: str | None = None
    devices: int | str | Sequence[int] = 1
    strategy: str = "ddp"
    num_nodes: int = 1

    @classmethod
    def given(
        cls,
        accelerator: str | None = None,
        devices: int | None = None,
        strategy: str | None = None,
        num_nodes: int | None = None,
    ) -> Spread | None:
        """The spread of the options given (``None`` for each not given); ``None`` when none is: run here, as the data is."""
        if accelerator is None and devices is None and strategy is None and num_nodes is None:
            return None
        return cls(
            accelerator,
            1 if devices is None else devices,
            strategy or "ddp",
            1 if num_nodes is None else num_nodes,
        )

    def fabric(self, like: torch.Tensor) -> Any:
        """The :class:`Fabric` of these options (a :class:`ConfigError` naming a bad one, before any work).

        Only the forking data-parallel strategies (``ddp``, which joins torchrun's or srun's processes,
        ``ddp_fork``, ``ddp_notebook``) are offered: a spawned process would need the model's code
        pickled (a closure is not), and a re-run of the script would redo the whole command.
        """
        if self.strategy not in SPREAD_STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r} for spreading an analysis; choose one of {', '.join(SPREAD_STRATEGIES)}"
            )
        one = self.num_nodes == 1 and (
            self.devices == 1
            or (
                isinstance(self.devices, Sequence)
                and not isinstance(self.devices, str)
                and len(self.devices) == 1
            )
        )
        return make_fabric(
            self.accelerator,
            self.devices,
            "auto" if one else self.strategy,
            None,
            self.num_nodes,
            like=like,
        )

    def check(self, n: int, like: torch.Tensor) -> Any:
        """The Fabric for ``n`` datapoints like ``like``; a :class:`ConfigError` for bad options or fewer datapoints than processes."""
        fabric = self.fabric(like)
        if n < fabric.world_size:
            raise ConfigError(
                f"{n} datapoint(s) cannot be spread over {fabric.world_size} processes; use at most {n} devices"
            )
        return fabric


def _nothing(*args: Any) -> None:
    return None


@contextlib.contextmanager
def _on(device: torch.device, modules: Sequence[nn.Module], home: torch.device) -> Iterator[None]:
    """The networks on ``device`` inside the block, back on ``home`` after (they are the caller's own in one process)."""
    if device == home:
        yield
        return
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to(home)


def _rows(
    fabric: Any,
    work: Callable[..., Any],
    data: tuple[torch.Tensor, ...],
    index: torch.Tensor,
    modules: Sequence[nn.Module],
    combine: Callable[[list[Any]], Any],
    types: Sequence[type],
) -> Any:
    """In each process: the work on this process's block of rows, every block gathered in rank order and combined."""
    coll = Collectives(fabric)
    rows = torch.tensor_split(torch.arange(len(index), device="cpu"), coll.world)[coll.rank]
    with shared_cores(fabric, coll), _on(fabric.device, modules, data[0].device):
        part = work(tuple(fabric.to_device(t[rows.to(t.device)]) for t in data), index[rows], coll)
    if coll.world == 1:
        return part
    parts = coll.gather(io.to_plain(part))  # CPU tensors and plain containers
    return combine([io.from_plain(p, types) for p in parts])


def spread_rows(
    work: Callable[[tuple[torch.Tensor, ...], torch.Tensor, Collectives], T],
    data: tuple[torch.Tensor, ...],
    index: torch.Tensor,
    spread: Spread | None,
    *,
    programs: Sequence[Callable[..., object]],
    combine: Callable[[list[T]], T],
    types: Sequence[type],
) -> T:
    """``work(rows, their dataset indices, collectives)`` over the datapoints, in this process or spread over Fabric's processes.

    With ``spread=None`` the work runs here on all rows. Otherwise each of the ``W``
    processes takes a contiguous block of rows (on its device, with the networks of
    ``programs`` moved there), the blocks' results are gathered in rank order and
    ``combine``-d, and the result comes back on the data's device. ``work`` may use the
    collectives (every process must then call them equally often) for a decision that
    needs all the datapoints. Tensors a program holds outside ``nn.Module`` s are not moved.
    """
    if spread is None:
        return work(data, index, Collectives.alone())
    fabric = spread.check(len(index), data[0])
    example = tuple(t[:1] for t in data)
    with seeded(None):  # the probe run's draws leave the caller's random stream as it was
        modules = discover(
            programs[0], programs[1] if len(programs) > 1 else _nothing, example
        ).modules
    result, _ = run_processes(
        fabric,
        _rows,
        work,
        data,
        index.cpu(),
        modules,
        combine,
        types,
        what="analysis process",
        types=types,
    )
    if fabric.device.type == "cpu" and data[0].device.type == "cpu":
        return result
    return io.from_plain(
        io.to_plain(result), types, data[0].device
    )  # computed on another device: back where the data is


@dataclass(frozen=True)
class Checked:
    """A per-datapoint analysis's call once checked (before any work): what it runs on, in one process or in each of several.

    ``args`` are the arguments before the rows (the model, the guide) as the analysis runs them
    (with their data plate named), ``index`` the rows' dataset indices (on the CPU), ``programs``
    those whose networks each process moves to its device, and ``options`` the keyword arguments
    the checks replaced (``init``: the analysed guide).
    """

    args: tuple[Any, ...]
    data: tuple[torch.Tensor, ...]
    index: torch.Tensor
    programs: tuple[Callable[..., object], ...]
    options: dict[str, Any] = field(default_factory=dict)


def _public(body: inspect.Signature, collectives: bool) -> inspect.Signature:
    """The analysis's signature: the body's with ``spread`` (keyword only, before ``progress``) and, for ``collectives``, without ``coll``."""
    params = [p for p in body.parameters.values() if not (collectives and p.name == "coll")]
    spread = inspect.Parameter(
        "spread", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Spread | None"
    )
    at = next((i for i, p in enumerate(params) if p.name == "progress"), len(params))
    return body.replace(parameters=[*params[:at], spread, *params[at:]])


def spread_over_rows(
    result: type[Any], check: Callable[..., Checked], *, collectives: bool = False
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate the body of a per-datapoint analysis, written for one process's rows, with ``spread``: its rows over Fabric's processes.

    The decorated analysis takes the body's arguments and ``spread`` (a :class:`Spread`, keyword
    only). Each call first runs ``check`` on them (the body's arguments with their defaults, and
    ``spread``): its refusals and probes come before any work and before any process starts.
    Without ``spread`` the body then runs here, on the checked arguments (:class:`Checked`). With it,
    each process runs the body on its block of rows (:func:`spread_rows`) with their dataset
    indices, the one base seed of ``seed`` for every process (:func:`~.random.base_seed`, drawn here
    where ``seed`` is None) and a progress bar on rank 0 only; ``result.concat`` combines the blocks'
    results (``result`` is also the one type that crosses from a process). With ``collectives`` the
    body takes ``coll``, the processes' :class:`Collectives` (this process's alone without ``spread``),
    for a choice over all the datapoints.
    """

    def decorate(body: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(body)
        bindable = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "coll"]
        )

        @functools.wraps(body)
        def analysis(*args: Any, spread: Spread | None = None, **kwargs: Any) -> T:
            call = bindable.bind(*args, **kwargs)
            call.apply_defaults()
            checked = check(*call.args, spread=spread, **call.kwargs)
            options = {**call.kwargs, **checked.options, "index": checked.index}
            if spread is None:
                alone = {"coll": Collectives.alone()} if collectives else {}
                return body(*checked.args, *checked.data, **options, **alone)
            with seeded(options["seed"]):
                options["seed"] = base_seed(options["seed"])  # one seed for every process
            progress = options.pop("progress")

            def rows(part: tuple[torch.Tensor, ...], at: torch.Tensor, coll: Collectives) -> T:
                shared = {"coll": coll} if collectives else {}
                mine = {**options, "index": at, "progress": progress and coll.rank == 0}
                return body(*checked.args, *part, **mine, **shared)

            return spread_rows(
                rows,
                checked.data,
                checked.index,
                spread,
                programs=checked.programs,
                combine=result.concat,
                types=(result,),
            )

        analysis.__signature__ = _public(signature, collectives)  # type: ignore[attr-defined]
        return analysis

    return decorate
