"""Devices and processes through Lightning Fabric: building a :class:`Fabric` from user options, and the collectives ``fit`` uses.

``fit`` runs its loop through Fabric (Pyro's own route to several devices): the
accelerator, the devices, the strategy (``ddp`` and the others Fabric offers),
the precision and ``num_nodes`` are Fabric's. :func:`make_fabric` turns the
options into a :class:`Fabric` or a :class:`ConfigError` naming the option, before
any work. The data-parallel strategies are built with
``find_unused_parameters=True``: a model and guide are arbitrary Pyro code, and a
network that one step does not use (a branch not taken) must not stall DDP.

Lightning is imported here only, and lazily (it takes seconds to import).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["ACCELERATORS", "DDP_STRATEGIES", "Collectives", "make_fabric", "rank_seed"]

ACCELERATORS = ("cpu", "cuda", "mps", "gpu", "auto")
#: Fabric's data-parallel strategy names and their process start methods (``ddp``: see :func:`_ddp_start`)
DDP_STRATEGIES = {"ddp": "", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
#: set by launchers that start the processes themselves (torchrun, SLURM's srun)
EXTERNAL_LAUNCH = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID")


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
    accelerator: str | None, devices: int | str | Sequence[int], strategy: str, precision: str | int | None, num_nodes: int, *, like: torch.Tensor
) -> Any:
    """A :class:`lightning.fabric.Fabric` for these options; ``accelerator=None`` means where ``like`` (the data) is."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if accelerator is None:
        accelerator = like.device.type
        if like.device.type != "cpu" and like.device.index is not None and devices == 1:
            devices = [like.device.index]
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if isinstance(devices, bool) or (isinstance(devices, int) and devices < 1 and devices != -1):
        raise ConfigError(f"devices must be a positive number of devices (or -1 for all), got {devices!r}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    chosen: Any = strategy
    if strategy in DDP_STRATEGIES:
        chosen = DDPStrategy(start_method=DDP_STRATEGIES[strategy] or _ddp_start(), find_unused_parameters=True)  # type: ignore[arg-type]
    try:
        return Fabric(accelerator=accelerator, devices=devices, strategy=chosen, precision=precision, num_nodes=num_nodes)  # type: ignore[arg-type]
    except (ValueError, RuntimeError, TypeError) as exc:  # Fabric's MisconfigurationException is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot run on accelerator={accelerator!r}, devices={devices!r}, strategy={strategy!r}, precision={precision!r}: {first}") from None


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 draws from ``seed`` itself (one process is the plain run); the others from distinct derived seeds."""
    return seed if rank == 0 else (seed + 1_000_003 * rank) % 2**63


class Collectives:
    """The few collectives ``fit`` needs, each a no-op in one process."""

    def __init__(self, fabric: Any) -> None:
        self.fabric = fabric
        self.rank, self.world = fabric.global_rank, fabric.world_size

    def shard(self, n: int) -> torch.Tensor:
        """This process's row indices of ``n`` (``rank::world``)."""
        return torch.arange(self.rank, n, self.world, device="cpu")

    def _scalar(self, value: float) -> torch.Tensor:
        # on the process's device: NCCL reduces device tensors only (float32: MPS has no float64)
        return torch.tensor(value, dtype=torch.float64 if self.fabric.device.type != "mps" else torch.float32, device=self.fabric.device)

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

    def from_rank_zero(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        return obj if self.world == 1 else self.fabric.broadcast(obj, src=0)
