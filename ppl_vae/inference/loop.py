"""The training loop, in each of Lightning Fabric's processes: epochs of steps, validation, the best epoch, checkpoints.

Every process runs :func:`run_epochs`: it shuffles the rows by (seed, epoch), takes its share of each
batch, steps, and, after each epoch, scores the validation rows and writes the checkpoint (rank 0).
A failure that one process meets is decided by all of them together and raised in each, so no
process waits on another that has stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from .. import io
from ..errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    NonFiniteError,
    RunDirectoryError,
    TrainingDiverged,
)
from ..progress import bar
from .batches import Rows
from .checkpoints import CHECKPOINT, HISTORY, check_resume, per_process, read_checkpoint
from .dispatch import host
from .distributed import (
    Collectives,
    rank_seed,
    shared_cores,
)
from .elbo import evaluate_elbo
from .fitted import FitRecord
from .params import load_params
from .plates import DATA, DataPlate, DataRows
from .random import seeded
from .schedules import replan
from .step import SVI, culprit
from .traces import ObservedSupport
from .watch import DivergenceWatch


@dataclass
class State:
    """Where a run is: what a checkpoint holds beside the parameters, optimiser and RNG states."""

    history: list[dict[str, float]] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    wall_time: float = 0.0
    best_params: list[torch.Tensor] | None = None
    stopped_early: bool = False

    def end_epoch(
        self, row: dict[str, float], params: Sequence[torch.Tensor], patience: int | None
    ) -> bool:
        """Record an epoch's row; keep the best parameters (with ``patience``); whether to stop early."""
        self.history.append(row)
        self.epoch = int(row["epoch"])
        score = row.get("val_elbo", row["train_elbo"])
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, self.epoch, 0
            if patience is not None:
                self.best_params = [p.detach().clone() for p in params]
        else:
            self.bad_epochs += 1
        self.stopped_early = patience is not None and self.bad_epochs >= patience
        return self.stopped_early


class Trainer:
    """The pieces around the step: optimiser and schedule, shuffling, divergence watch, checkpoints.

    Built once before the processes start; :meth:`attach` then hands the objective and the
    optimiser to Fabric in each process (DDP wraps the objective there).
    """

    def __init__(
        self, svi: SVI, sched: Any, seed: int, watch: DivergenceWatch, out: str | Path | None
    ) -> None:
        assert svi.objective is not None
        self.svi, self.objective, self.params, self.named, self.optim = (
            svi,
            svi.objective,
            svi.params,
            svi.named,
            svi.optimizer,
        )
        self.sched, self.seed, self.watch, self.out = sched, seed, watch, out
        self.ckpt_path = Path(out) / CHECKPOINT if out is not None else None
        self.saved_epoch: int | None = None
        # set by :meth:`attach`: Fabric's backward and device move, or (one plain process) SVI's own
        self.backward: Callable[[torch.Tensor], None]
        self.to_device: Callable[..., Any]
        self.coll: Collectives | None = None
        self.checked = (
            False  # an epoch over the tensors was run: their observed values were checked
        )

    def refuse_loose_params(self, world_size: int) -> None:
        """Several processes reduce the gradients of module parameters only: refuse ``pyro.param`` tensors by name."""
        loose = [name for name, p in self.named if self.objective.holds_not(p)]
        if world_size > 1 and loose:
            raise ConfigError(
                f"{len(loose)} trained tensor(s) ({', '.join(loose[:3])}) belong to no nn.Module, so data-parallel training cannot reduce "
                "their gradients; hold them in an nn.Module (e.g. a PyroModule), or train in one process"
            )

    def attach(self, fabric: Any, coll: Collectives) -> None:
        """Hand the objective to Fabric in this process (DDP wraps it here); the steps run the wrapped one.

        One process in full precision (Fabric's single-device strategy and its 32-bit ``Precision``) is
        the exception: there Fabric's wrapper and its ``backward`` change nothing (no cast, no autocast,
        no reduction) but cost Python at every step, so the steps run the objective itself and take
        the gradients with :meth:`SVI.gradients`, after Fabric has put it on its device.
        """
        from lightning.fabric.plugins.precision import Precision
        from lightning.fabric.strategies import SingleDeviceStrategy

        self.coll = coll
        wrapped, _ = fabric.setup(self.objective, self.optim)
        plain = (
            isinstance(fabric.strategy, SingleDeviceStrategy)
            and type(fabric.strategy.precision) is Precision
        )
        self.svi.module = self.objective if plain else wrapped
        self.backward = self.svi.gradients if plain else fabric.backward
        self.to_device = partial(_to, device=fabric.device) if plain else fabric.to_device

    def step(self, data: Rows, rows: torch.Tensor, step: int, epoch: int) -> float:
        """One optimisation step (:meth:`SVI.loss`, :meth:`SVI.update`) on the dataset rows ``rows`` of ``data``; the minibatch's ELBO per datapoint.

        The loss and whether every observed value lay in its support come back to the host in one
        read. A step that diverged, or whose rows are damaged (:meth:`Rows.take`) or hold a value
        outside an observed site's support, raises in every process the same error, composed by the
        lowest such rank: :class:`TrainingDiverged` naming the step and the site, or
        :class:`DataError` naming the data row.
        """
        assert self.coll is not None
        failed = None
        try:
            out = self.svi.loss(*data.args(rows, self.to_device), index=rows)
        except DataError as exc:  # a damaged row, or (with validation on) a value outside the support: found before any collective
            where = f" on rank {self.coll.rank}" if self.coll.world > 1 else ""
            first = str(exc).splitlines()[
                0
            ]  # (Pyro's trace appends the sites' shapes to an error raised inside it)
            failed = ("data", f"{first} (step {step}, epoch {epoch + 1}{where})", None)
        if failed is None:
            value, data_ok = host(out.flags)  # the step's one read back to the host
            elbo = self.svi.elbo(value)
            reason = (
                "data"
                if not data_ok
                else f"loss is {value}"
                if not math.isfinite(elbo)
                else self.watch.check(elbo)
            )
        bad = self.coll.first_bad(failed is not None or reason is not None)
        if bad >= 0:
            error = (
                (failed or self._failure(reason, out.invalid, step, epoch, bad))
                if bad == self.coll.rank
                else None
            )
            kind, message, site = self.coll.from_rank(error, bad)
            if kind == "data":
                raise DataError(message)
            raise TrainingDiverged(message, step=step, site=site)
        self.svi.update(out.loss, backward=self.backward, epoch=epoch, elbo=elbo)
        return elbo

    def _failure(
        self, reason: str | None, invalid: str, step: int, epoch: int, rank: int
    ) -> tuple[str, str, str | None]:
        """``(kind, message, site)`` of this process's failed step: bad data (the row, from the step's observed sites) or divergence."""
        where = f" on rank {rank}" if self.coll is not None and self.coll.world > 1 else ""
        kept = (
            f"; the last good checkpoint (epoch {self.saved_epoch}) is kept in {self.out}"
            if self.saved_epoch
            else ""
        )
        self.svi.replay()  # a compiled step is run again eagerly, with its draws, so that its record names the site or row
        if reason == "data":
            try:
                self.objective.support.raise_bad()
            except DataError as exc:
                return "data", f"{exc} (step {step}, epoch {epoch + 1}{where}){kept}", None
        site, found = culprit(self.objective.record, self.named)
        return (
            "diverged",
            f"training diverged at step {step} (epoch {epoch + 1}){where}: {reason}; {invalid}{found}{kept}; try a smaller --lr",
            site,
        )

    def order(self, n: int, epoch: int) -> torch.Tensor:
        """This process's rows for ``epoch``: a permutation seeded by (seed, epoch), split across the processes.

        The permutation depends on the epoch only (a resumed run continues it), and process ``r``
        of ``W`` takes every ``W``-th row of it: step ``k`` of ``W`` processes at batch ``B / W``
        covers the same rows as step ``k`` of one process at batch ``B``.
        """
        assert self.coll is not None
        sampler = DistributedSampler(
            range(n),
            num_replicas=self.coll.world,
            rank=self.coll.rank,
            shuffle=True,
            seed=self.seed,
        )  # type: ignore[arg-type]
        sampler.set_epoch(epoch)
        with torch.device("cpu"):  # the sampler draws on the default device; indices are host-side
            return torch.tensor(list(sampler), dtype=torch.long)

    def epoch(
        self, data: Rows, batch_size: int, state: State, bar: Any, validate_every_step: bool
    ) -> dict[str, float]:
        """One pass over the shuffled data; the row of the history (without validation)."""
        assert self.coll is not None
        epoch, order = state.epoch, self.order(len(data), state.epoch)
        local = batch_size // self.coll.world
        total = 0.0
        self.svi.module.train(True)
        # every observed value is checked against its support in the first epoch this loop runs, when every row is read once;
        # tensors are the same rows afterwards (a Dataset's rows are read anew, and checked at every epoch)
        self.objective.support.active = not self.checked or data.tensors is None
        per_epoch = math.ceil(len(order) / local)
        shown = not getattr(
            bar, "disable", False
        )  # a disabled bar's postfix is formatted for no one
        for start in range(0, len(order), local):
            self.objective.validate = state.step == 0 or validate_every_step
            self.objective.anneal(state.step, per_epoch)
            idx = order[start : start + local]
            total += self.step(data, idx, state.step, epoch) * len(idx)
            state.step += 1
            if shown:
                bar.set_postfix(
                    epoch=epoch + 1,
                    elbo=f"{total / min(len(order), start + local):.2f}",
                    refresh=False,
                )
            bar.update(1)  # redraws at most every mininterval (a log file: every 10 s)
        self.checked = True
        if self.sched is not None:
            self.sched.step()
        self.svi.module.train(False)
        train_elbo = self.coll.sum(total) / self.coll.sum(float(len(order)))
        row = {"epoch": epoch + 1, "step": state.step, "train_elbo": train_elbo}
        lr = self.optim.param_groups[0].get(
            "lr"
        )  # an optimiser without one (Pyro's AdagradRMSProp) records none
        return {**row, "lr": float(lr)} if isinstance(lr, (int, float)) else row

    def save(self, state: State, options: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint, then the history beside it; a failed write (a full disk) leaves the previous checkpoint intact.

        Each process's random state and estimator statistics are gathered into it, so a run resumes
        bit for bit on the same number of processes.
        """
        assert self.coll is not None
        if self.ckpt_path is None:
            return
        # Pyro and torch draw from torch's global generator only, so its state (one per process) is all a
        # bit-for-bit resumption needs besides the epoch (the shuffling is a function of seed and epoch)
        rng = self.coll.gather(torch.get_rng_state())
        estimator = self.coll.gather(self.objective.loss_fn.state_dict())
        error = None
        if self.coll.rank == 0:
            ckpt = {
                "params": [p.detach().clone() for p in self.params],
                "optimizer": self.optim.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "rng": {"torch": rng, "world_size": self.coll.world},
                "estimator": estimator,
                "options": options,
                **asdict(state),
            }
            error = self._write(ckpt, state)
        error = self.coll.from_rank_zero(error)
        if error is not None:
            raise RunDirectoryError(error)
        self.saved_epoch = state.epoch

    def _write(self, ckpt: dict[str, Any], state: State) -> str | None:
        assert self.ckpt_path is not None
        kept = (
            f"the previous checkpoint (epoch {self.saved_epoch}) is intact"
            if self.saved_epoch
            else "no checkpoint was written"
        )
        try:
            io.save_torch(self.ckpt_path, ckpt)
        except OSError as exc:
            return f"could not write the checkpoint of epoch {state.epoch} to {self.ckpt_path} ({exc.strerror or exc}); {kept}"
        try:
            io.write_csv(self.ckpt_path.parent / HISTORY, state.history)
        except OSError as exc:
            return f"could not write {self.ckpt_path.parent / HISTORY} ({exc.strerror or exc}); the checkpoint of epoch {state.epoch} in {self.ckpt_path} is intact"
        return None

    def restore(self, epochs: int, patience: int | None) -> State:
        """Parameters, optimiser, schedule, this process's RNG state and estimator statistics from the checkpoint; the run's state."""
        assert self.ckpt_path is not None and self.out is not None and self.coll is not None
        ckpt = read_checkpoint(
            self.ckpt_path
        )  # weights_only; finite parameters; every field checked
        try:  # before anything is changed
            stopped = check_resume(ckpt, epochs, patience, self.out, world_size=self.coll.world)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} is corrupted or incomplete ({type(exc).__name__}: {exc})"
            ) from None
        try:
            load_params(self.params, ckpt["params"], str(self.ckpt_path))
            self.optim.load_state_dict(ckpt["optimizer"])
            if self.sched is not None and ckpt.get("scheduler") is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
                if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR):
                    replan(self.sched)  # this run's total of epochs
            torch.set_rng_state(per_process(ckpt["rng"]["torch"])[self.coll.rank])
            self.objective.loss_fn.load_state_dict(
                per_process(ckpt.get("estimator") or {})[self.coll.rank]
            )
            state = State(
                history=list(ckpt["history"]),
                epoch=ckpt["epoch"],
                step=ckpt["step"],
                best=ckpt["best"],
                best_epoch=ckpt["best_epoch"],
                bad_epochs=ckpt["bad_epochs"],
                wall_time=ckpt["wall_time"],
                best_params=ckpt.get("best_params"),
                stopped_early=stopped,
            )
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} is corrupted or incomplete ({type(exc).__name__}: {exc})"
            ) from None
        self.saved_epoch = state.epoch
        return state


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, as Fabric's ``to_device`` moves a tensor (without blocking, but to the host)."""
    return t.to(device, non_blocking=device.type not in ("cpu", "mps"))


class Evaluator:
    """The mean per-datapoint ELBO after an epoch; a non-finite value stops training like a non-finite loss, naming the site.

    A model whose discrete sites are summed out by the estimator (``enum``) cannot be scored by
    sampling them (that would be a different, wrong number): its ELBO is the estimator's own
    objective, which sums them out, averaged over the data.
    """

    def __init__(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        loss_fn: Callable[..., torch.Tensor],
        enumerated: list[str],
        batch_size: int,
        plate: DataPlate = DataPlate(DATA),
    ) -> None:
        self.model, self.guide, self.loss_fn, self.enumerated, self.batch_size = (
            model,
            guide,
            loss_fn,
            enumerated,
            batch_size,
        )
        self.plate = plate
        self.coll: Collectives | None = (
            None  # set by the training process: each process scores its shard of the rows
        )

    def _score(self, rows: Rows, idx: torch.Tensor) -> float:
        """The sum of the ELBOs of the dataset rows ``idx`` (a global latent's term shared by all of ``rows``)."""
        assert self.coll is not None
        batch = rows.args(idx, self.coll.fabric.to_device)
        if not self.enumerated:
            index = idx.to(batch[0].device)
            return (
                evaluate_elbo(
                    self.model,
                    self.guide,
                    batch,
                    batch_size=self.batch_size,
                    plate=self.plate,
                    index=index,
                    spread=len(rows),
                )
                .value.sum()
                .item()
            )
        # (Pyro's TraceEnum_ELBO refuses to run under no_grad) the rows' share of the objective: a global term counted B / N times
        with DataRows(self.plate, index=idx, total=len(rows)):
            return -self.loss_fn(*batch).item() * len(idx) / len(rows)

    def __call__(self, rows: Rows, what: str) -> float:
        assert self.coll is not None
        shard, total, failed = self.coll.shard(len(rows)), 0.0, None
        try:  # a failure in one process is decided by all of them together (a lone raise would leave the others waiting)
            for i in range(0, len(shard), self.batch_size):
                idx = shard[i : i + (self.plate.subsample_size or self.batch_size)]
                with ObservedSupport(
                    eager=True, rows=idx
                ):  # a value outside its support names its row, not Pyro's message
                    total += self._score(rows, idx)
        except (
            DataError,
            NonFiniteError,
        ) as exc:  # its first line: Pyro's trace appends the sites' shapes to an error raised inside it
            failed = (type(exc).__name__, str(exc).splitlines()[0], getattr(exc, "site", None))
        bad = self.coll.first_bad(failed is not None)
        if bad >= 0:
            kind, message, site = self.coll.from_rank(failed, bad)
            if kind == "DataError":
                raise DataError(message)
            raise TrainingDiverged(
                f"training diverged: {what} is not finite: {message}", step=-1, site=site
            )
        total = self.coll.sum(total)
        if not math.isfinite(total):
            raise TrainingDiverged(
                f"training diverged: {what} is not finite: the objective is {total}",
                step=-1,
                site=None,
            )
        return total / len(rows)


@dataclass(frozen=True)
class Run:
    epochs: int
    batch_size: int
    patience: int | None
    seed: int
    resume: bool
    progress: bool
    validate_every_step: bool
    options: dict[str, Any]


def train(
    fabric: Any, trainer: Trainer, evaluate: Evaluator, tensors: Rows, val: Rows | None, run: Run
) -> dict[str, Any]:
    """In each process: share the node's cores between its processes (restored after), then :func:`run_epochs`."""
    coll = Collectives(fabric)
    with shared_cores(fabric, coll):
        try:
            return run_epochs(fabric, coll, trainer, evaluate, tensors, val, run)
        except (TrainingDiverged, DataError) as exc:
            if coll.world == 1:
                raise
            # every process raised the same error (decided together): rank 0 hands it back whole, with its step and site
            return {
                "error": {
                    "kind": type(exc).__name__,
                    "message": str(exc),
                    "step": getattr(exc, "step", None),
                    "site": getattr(exc, "site", None),
                }
            }


def run_epochs(
    fabric: Any,
    coll: Collectives,
    trainer: Trainer,
    evaluate: Evaluator,
    tensors: Rows,
    val: Rows | None,
    run: Run,
) -> dict[str, Any]:
    """The loop: epochs of steps, validation, the best epoch, checkpoints; the result and the final parameters (for a caller in another process)."""
    with seeded(rank_seed(run.seed, coll.rank)):
        trainer.attach(fabric, coll)
        evaluate.coll = coll
        state = trainer.restore(run.epochs, run.patience) if run.resume else State()
        steps = math.ceil(math.ceil(len(tensors) / coll.world) / (run.batch_size // coll.world))
        shown = bar(
            total=(run.epochs - state.epoch) * steps,
            desc="fit",
            unit="step",
            enabled=run.progress and coll.rank == 0,
        )
        try:
            while state.epoch < run.epochs and not state.stopped_early:
                t0 = time.perf_counter()
                row = trainer.epoch(tensors, run.batch_size, state, shown, run.validate_every_step)
                if val is not None:
                    row["val_elbo"] = evaluate(
                        val, f"the validation ELBO after epoch {row['epoch']}"
                    )
                state.wall_time += time.perf_counter() - t0
                row["wall_time"] = state.wall_time
                state.end_epoch(row, trainer.params, run.patience)
                trainer.save(state, run.options)
        except KeyboardInterrupt:
            where = (
                f"the last checkpoint is epoch {trainer.saved_epoch} (in {trainer.out})"
                if trainer.saved_epoch
                else "there is no checkpoint"
            )
            raise Interrupted(f"interrupted; {where}", epoch=trainer.saved_epoch) from None
        finally:
            shown.close()
            trainer.objective.train(False)
        if state.stopped_early and state.best_params is not None:
            load_params(trainer.params, state.best_params, "best parameters")
        train_elbo = evaluate(tensors, "the final training ELBO")
        val_elbo = evaluate(val, "the final validation ELBO") if val is not None else None
    result = FitRecord(
        history=tuple(state.history),
        train_elbo=train_elbo,
        val_elbo=val_elbo,
        epochs=len(state.history),
        steps=state.step,
        wall_time=state.wall_time,
        stopped_early=state.stopped_early,
        best_epoch=state.best_epoch,
        estimator=run.options["estimator"],
        options=run.options,
    )
    return {"result": result.to_dict(), "params": [p.detach() for p in trainer.params]}
