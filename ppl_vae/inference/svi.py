r"""``fit``: stochastic variational inference for any model and guide.

One loop, run through Lightning Fabric (:mod:`.distributed`) on any accelerator
and any number of processes: minibatches scaled to the full dataset, the ELBO
of the chosen estimator, a ``torch.optim`` optimiser over the parameters the
model and guide use, validation each epoch, optional early stopping and
learning-rate schedule, atomic checkpoints and bit-for-bit resumption.
Read top to bottom: :func:`fit` checks the options and builds the pieces
(:func:`_setup`), Fabric starts the processes, and :func:`_train` runs the
epochs of :class:`_Trainer` steps in each.

A checkpoint holds only tensors and plain containers (parameters, optimiser
and schedule state, each process's torch RNG state, the estimator's running
statistics, history and counters; the shuffling is a function of the seed and
the epoch), so it is read back with ``torch.load(..., weights_only=True)`` and
never executes code.

.. math::

    \mathcal{L}(x_{1:N}) \approx \frac{N}{|B|} \sum_{n \in B} \mathcal{L}_n,
    \qquad \mathcal{L}_n = \mathbb{E}_{q(z_n \mid x_n)}[\log p(x_n, z_n) - \log q(z_n \mid x_n)]

References
----------
Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .. import io
from ..errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    NonFiniteError,
    PplVaeError,
    ProcessFailed,
    RunDirectoryError,
    SequentialWarning,
    TrainingDiverged,
    check_finite,
    check_int,
    check_positive,
    check_seed,
)
from ..progress import bar
from .distributed import (
    Collectives,
    make_fabric,
    rank_seed,
    run_processes,
    shared_cores,
)
from .elbo import evaluate_elbo
from .estimators import Estimator, EstimatorLoss, get_estimator, is_latent
from .fitted import FitResult, attach
from .params import Discovered, discover, load_params
from .random import seeded
from .plates import DATA, DataPlate, DataRows, find_data_plate, on_data_plate, subsampled_size
from .traces import ObservedSupport, probe, traces, vectorises

__all__ = ["fit", "FitResult", "StepInfo", "make_optimizer", "Objective", "Rows", "as_tensors", "check_checkpoint", "check_resume", "read_checkpoint", "lr_factor", "CHECKPOINT", "HISTORY", "SCHEDULES"]

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) site by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg):
            msg["scale"] = msg["scale"] * self.beta


def as_tensors(data: torch.Tensor | Sequence[torch.Tensor], what: str = "data", rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Check ``data`` (a tensor or a tuple of tensors with one row per datapoint); an error names the row (``rows``: their dataset indices)."""
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"{what} must be a tensor or a tuple of tensors")
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    if n == 0:
        raise DataError(f"{what} is empty")
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise DataError(f"{what}: all tensors need the same number of rows ({n})")
    x = tensors[0]
    if not x.is_floating_point():
        raise DataError(f"{what}: x must be a floating-point tensor, got {x.dtype}")
    finite = torch.isfinite(x.reshape(n, -1)).all(1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise DataError(f"{what} row {int(rows[row]) if rows is not None else row} contains NaN or infinite values")
    return tensors


def _row_kind(item: Any) -> str:
    """What one dataset row is, for a message: its type, and each tensor's shape and dtype."""
    parts = item if isinstance(item, (tuple, list)) else (item,)
    return ", ".join(f"a tensor of shape {tuple(p.shape)} ({p.dtype})" if isinstance(p, torch.Tensor) else f"a {type(p).__name__}" for p in parts)


class Rows:
    """The rows ``fit`` trains or scores: tensors (indexed in one go), or a map-style ``Dataset`` read batch by batch.

    A ``DataLoader`` gives its dataset and collate function (``fit`` draws its own batches, so
    that the processes split them and a resumed run continues them). A dataset's rows are
    checked when a batch is read (floating point, finite), so one that does not fit in memory
    trains.
    """

    def __init__(self, source: Any, what: str = "data") -> None:
        self.what, self.tensors, self.dataset, self.collate = what, None, None, default_collate
        self.first: str | None = None  # what a dataset's first row is (its tensors' shapes and dtypes): every row must be so
        #: the model and guide subsample the data plate themselves (Pyro's ``subsample_size``): they take all the tensors
        self.whole = False
        self.moved: tuple[torch.Tensor, ...] | None = None
        if isinstance(source, DataLoader):
            self.dataset, self.collate = source.dataset, source.collate_fn or default_collate
        elif isinstance(source, Dataset) and not isinstance(source, torch.Tensor):
            self.dataset = source
        else:
            self.tensors = as_tensors(source, what)
        if self.dataset is not None and not hasattr(self.dataset, "__len__"):
            raise DataError(f"{what}: a dataset needs a length (an iterable-style dataset cannot be split into batches here)")
        self.n = len(self.tensors[0]) if self.tensors is not None else len(self.dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise DataError(f"{what} is empty")
        self.like = self.take(torch.zeros(1, dtype=torch.long, device="cpu"))[0]

    def __len__(self) -> int:
        return self.n

    def args(self, idx: torch.Tensor, to_device: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What the model and guide take for the rows ``idx``: those rows, or (:attr:`whole`) all the tensors, moved by ``to_device`` once."""
        if not self.whole:
            return tuple(to_device(t) for t in self.take(idx))
        if self.moved is None:
            self.moved = tuple(to_device(t) for t in self.tensors)  # type: ignore[union-attr]
        return self.moved

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows ``idx`` as a tuple of tensors; a dataset's rows checked as tensors are, each error naming the row.

        A dataset's batch must be tensors (floating point and finite for ``x``) whose rows have the
        shapes of the dataset's first row; a row that cannot be collated with the others is named.
        """
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)] for t in self.tensors)
        items = [self.dataset[int(i)] for i in idx]  # type: ignore[index]
        if self.first is None:
            self.first = _row_kind(items[0])
        first = self.first
        for i, item in zip(idx, items):  # the kind of each row against the first: a message that names the row
            if _row_kind(item) != first:
                raise DataError(f"{self.what} row {int(i)} is {_row_kind(item)}; the first row is {first}")
        try:
            batch = self.collate(items)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise DataError(f"{self.what}: the rows {int(idx[0])}..{int(idx[-1])} cannot be collated into a batch ({str(exc).splitlines()[0][:120]})") from None
        return as_tensors(batch if isinstance(batch, torch.Tensor) else tuple(batch), self.what, rows=idx)


class _StepRecord(Messenger):
    """Keep the sample sites of one step (guide and model), so a bad value is named from that step, not a re-run.

    It also keeps the scale each site had from the model's own handlers (a ``poutine.scale`` in it),
    read before ``fit``'s (the data plate's ``N / B``, beta), which sit outside it, and without the
    subsampling scale of a data plate ``plate`` that subsamples itself.
    """

    def __init__(self, plate: str = DATA) -> None:
        super().__init__()
        self.plate = plate
        self.sites: list[tuple[str, str, Any, torch.Tensor]] = []
        self.scales: set[float] = set()

    def clear(self) -> None:
        self.sites, self.scales = [], set()

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            scale = msg["scale"]
            if isinstance(scale, torch.Tensor):  # not read back to the host: taken as a per-site weight
                self.scales.add(math.nan)
                return
            for f in msg["cond_indep_stack"]:
                if f.name == self.plate and f.full_size:
                    scale = scale * f.size / f.full_size
            self.scales.add(float(scale))

    def user_scale(self) -> float:
        """The one scale the model's own handlers gave every site of the step (a normaliser such as ``1 / N``), else 1."""
        return self.scales.pop() if len(self.scales) == 1 and math.isfinite(next(iter(self.scales))) and next(iter(self.scales)) > 0 else 1.0

    def _postprocess_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            seen = any(n == msg["name"] for _, n, _, _ in self.sites)
            role = "model" if msg["is_observed"] or seen else "guide"
            self.sites.append((role, msg["name"], msg["fn"], msg["value"]))


def _named(found: Discovered, params: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Each parameter's name: its module's class and attribute, or its name in the (current) Pyro parameter store, else its number."""
    names = {id(p): f"{type(m).__name__}.{n}" for m in found.modules for n, p in m.named_parameters()}
    store = pyro.get_param_store()
    return [(names.get(id(p)) or store.param_name(p) or f"#{i}", p) for i, p in enumerate(params)]


def _culprit(record: _StepRecord, named: list[tuple[str, torch.Tensor]]) -> tuple[str | None, str]:
    """``(site, description)`` of what went wrong in the recorded step: a non-finite parameter, a site's non-finite value or log-density, or the largest term."""
    bad = [f"parameter {name} {tuple(p.shape)}" for name, p in named if not bool(torch.isfinite(p).all())]
    params = f"; non-finite {bad[0]}" if bad else ""
    largest, where = -1.0, (None, f"no site recorded{params}")
    with torch.no_grad(), pyro.validation_enabled(False):
        for role, name, fn, value in record.sites:
            if not bool(torch.isfinite(value).all()):
                return name, f"{role} site {name!r} has a non-finite value{params}"
            try:
                lp = fn.log_prob(value)
            except Exception as exc:  # a distribution that cannot even score its own draw
                return name, f"{role} site {name!r} cannot evaluate its log-density ({str(exc).splitlines()[0][:100]}){params}"
            if not bool(torch.isfinite(lp).all()):
                return name, f"{role} site {name!r} has a non-finite log-density{params}"
            size = lp.abs().max().item()
            if size > largest:
                largest, where = size, (name, f"largest term: {role} site {name!r}, |log-density| {size:.3g}{params}")
    return where


class _DivergenceWatch:
    r"""Stops training on an ELBO estimate that is impossible or that jumped by orders of magnitude.

    * **Above the bound.** When every observed site is discrete, :math:`\log p(x) \le 0`, and by
      Markov's inequality :math:`P(\log w > t) \le p(x)\, e^{-t} \le e^{-t}` for a weight
      :math:`w = p(x, z) / q(z)` (also for an IWAE mean of weights; with a KL weight ``beta`` the
      bound holds for :math:`t / \max(eta, 1)`). A minibatch mean above :math:`t = 50` nats per
      datapoint therefore has probability below :math:`B e^{-50} pprox 10^{-20}` for a valid model
      and guide: it means a distribution left its valid set or float round-off broke a density.
    * **Growth.** An estimate whose magnitude is :data:`GROWTH` times the median magnitude of the
      last :data:`WINDOW` steps (at least 1 nat).
    """

    BOUND_SLACK, GROWTH, WINDOW = 50.0, 1e4, 100

    def __init__(self, bounded: bool, beta: float) -> None:
        self.limit = self.BOUND_SLACK * max(beta, 1.0) if bounded else None
        self.recent: list[float] = []

    def check(self, elbo: float) -> str | None:
        if self.limit is not None and elbo > self.limit:
            return f"the ELBO estimate {elbo:.3g} nats per datapoint is above what discrete data allow (log p(x) <= 0; > {self.limit:g} has probability < 1e-20)"
        if self.recent:
            ref = max(float(torch.tensor(self.recent, device="cpu").abs().median()), 1.0)
            if abs(elbo) > self.GROWTH * ref:
                return f"the ELBO estimate jumped to {elbo:.3g} nats per datapoint from a recent median magnitude of {ref:.3g}"
        self.recent = (self.recent + [elbo])[-self.WINDOW :]
        return None


def _inspect(model: Callable[..., object], guide: Callable[..., object], example: tuple[torch.Tensor, ...]) -> tuple[bool, list[str]]:
    """Whether every observed site is discrete (then log p(x) <= 0 per datapoint), and the model's enumerated sites the guide lacks."""
    with torch.no_grad(), pyro.validation_enabled(False):
        model_tr, guide_tr = traces(model, guide, *example)
    sites = [s for s in model_tr.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
    observed = [s for s in sites if s["is_observed"]]
    enumerated = [s["name"] for s in sites if not s["is_observed"] and s["infer"].get("enumerate") and s["name"] not in guide_tr.nodes]
    return bool(observed) and all(s["fn"].support.is_discrete for s in observed), enumerated


class _Evaluator:
    """The mean per-datapoint ELBO after an epoch; a non-finite value stops training like a non-finite loss, naming the site.

    A model whose discrete sites are summed out by the estimator (``enum``) cannot be scored by
    sampling them (that would be a different, wrong number): its ELBO is the estimator's own
    objective, which sums them out, averaged over the data.
    """

    def __init__(self, model: Callable[..., object], guide: Callable[..., object], loss_fn: Callable[..., torch.Tensor], enumerated: list[str], batch_size: int,
                 plate: DataPlate = DataPlate(DATA)) -> None:
        self.model, self.guide, self.loss_fn, self.enumerated, self.batch_size = model, guide, loss_fn, enumerated, batch_size
        self.plate = plate
        self.coll: Collectives | None = None  # set by the training process: each process scores its shard of the rows

    def _score(self, rows: Rows, idx: torch.Tensor) -> float:
        """The sum of the ELBOs of the dataset rows ``idx`` (a global latent's term shared by all of ``rows``)."""
        assert self.coll is not None
        batch = rows.args(idx, self.coll.fabric.to_device)
        if not self.enumerated:
            index = idx.to(batch[0].device)
            return evaluate_elbo(self.model, self.guide, batch, batch_size=self.batch_size, plate=self.plate, index=index, spread=len(rows)).value.sum().item()
        # (Pyro's TraceEnum_ELBO refuses to run under no_grad) the rows' share of the objective: a global term counted B / N times
        with DataRows(self.plate, index=idx, total=len(rows)):
            return -self.loss_fn(*batch).item() * len(idx) / len(rows)

    def __call__(self, rows: Rows, what: str) -> float:
        assert self.coll is not None
        shard, total, failed = self.coll.shard(len(rows)), 0.0, None
        try:  # a failure in one process is decided by all of them together (a lone raise would leave the others waiting)
            for i in range(0, len(shard), self.batch_size):
                idx = shard[i : i + (self.plate.subsample_size or self.batch_size)]
                with ObservedSupport(eager=True, rows=idx):  # a value outside its support names its row, not Pyro's message
                    total += self._score(rows, idx)
        except (DataError, NonFiniteError) as exc:  # its first line: Pyro's trace appends the sites' shapes to an error raised inside it
            failed = (type(exc).__name__, str(exc).splitlines()[0], getattr(exc, "site", None))
        bad = self.coll.first_bad(failed is not None)
        if bad >= 0:
            kind, message, site = self.coll.from_rank(failed, bad)
            if kind == "DataError":
                raise DataError(message)
            raise TrainingDiverged(f"training diverged: {what} is not finite: {message}", step=-1, site=site)
        total = self.coll.sum(total)
        if not math.isfinite(total):
            raise TrainingDiverged(f"training diverged: {what} is not finite: the objective is {total}", step=-1, site=None)
        return total / len(rows)


SCHEDULES = ("cosine", "exponential")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    r"""The learning rate of ``epoch`` (0-based) as a fraction of the initial one, over ``epochs`` in all.

    A closed form of ``(epoch, epochs)``, so a resumed run continues the same
    curve and a run extended to more epochs re-plans it for the new total:

    .. math::

        \text{cosine: } \tfrac12 (1 + \cos(\pi e / E)), \qquad \text{exponential: } 0.01^{e / E}
    """
    t = epoch / max(epochs, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        return 0.01**t
    raise ConfigError(f"unknown lr_schedule {schedule!r}; choose {', '.join(SCHEDULES)} or pass a callable")


def _schedule(optimizer: torch.optim.Optimizer, lr_schedule: str | Callable[..., Any] | None, epochs: int) -> Any:
    if lr_schedule is None:
        return None
    if callable(lr_schedule):
        return lr_schedule(optimizer)
    lr_factor(lr_schedule, 0, epochs)  # ConfigError for an unknown name
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(lr_schedule, e, epochs))


def _replan(sched: Any, optimizer: torch.optim.Optimizer) -> None:
    """Set the learning rates a restored ``LambdaLR`` gives at its epoch (the same numbers, or a re-planned curve)."""
    lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


@dataclass(frozen=True)
class StepInfo:
    """What :func:`fit` hands its ``callback`` after each optimisation step."""

    step: int
    epoch: int
    elbo: float
    params: tuple[torch.Tensor, ...]


def make_optimizer(optimizer: Any, params: list[torch.Tensor], lr: float, names: Sequence[str] = ()) -> tuple[torch.optim.Optimizer, Callable[[], None] | None]:
    """A torch optimiser over ``params`` from what :func:`fit` takes as ``optimizer``, and the gradient clipping to apply before its steps.

    None: Adam(lr). A ``torch.optim.Optimizer`` class: that class (with ``lr`` where its constructor takes one).
    A ``pyro.optim`` wrapper (:class:`pyro.optim.PyroOptim`): its torch class with its arguments (a callable
    of per-parameter arguments is called with each parameter's name, giving one group per parameter) and its
    ``clip_args`` (``clip_norm`` / ``clip_value`` per parameter, as Pyro clips). A callable: ``optimizer(params)``.
    """
    if optimizer is None:
        return torch.optim.Adam(params, lr=lr), None
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer: pass the class ({type(optimizer).__name__}) or a function of the parameters, not an optimiser "
                          "already built over parameters (fit finds them)")
    if isinstance(optimizer, PyroOptim):
        args, names = optimizer.pt_optim_args, list(names) or [f"#{i}" for i in range(len(params))]
        if callable(args):
            groups = [{"params": [p], **(args(n, p) if optimizer.pt_optim_args_argc == 2 else args(n))} for n, p in zip(names, params)]
            built = optimizer.pt_optim_constructor(groups)
        else:
            built = optimizer.pt_optim_constructor(params, **args)
        clip = dict(optimizer.pt_clip_args or {})
        unknown = set(clip) - {"clip_norm", "clip_value"}
        if unknown:
            raise ConfigError(f"optimizer: unknown clip_args {', '.join(sorted(unknown))}; Pyro's are clip_norm and clip_value")

        def clipping() -> None:  # per parameter, as PyroOptim clips each one's own gradient
            for p in params:
                if p.grad is not None:
                    if "clip_norm" in clip:
                        torch.nn.utils.clip_grad_norm_(p, clip["clip_norm"])
                    if "clip_value" in clip:
                        torch.nn.utils.clip_grad_value_(p, clip["clip_value"])

        return built, clipping if clip else None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        takes_lr = "lr" in inspect.signature(optimizer).parameters
        return (optimizer(params, lr=lr) if takes_lr else optimizer(params)), None
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise ConfigError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built, None
    raise ConfigError(f"optimizer must be a torch.optim.Optimizer class, a function of the parameters or a pyro.optim optimiser, got {optimizer!r}")


class Objective(nn.Module):
    """What one step differentiates: the loss of a minibatch, its data plate's sites scaled to the ``n`` datapoints (:class:`~.plates.DataRows`).

    A module holding every network the loss trains (the model's, the guide's and the estimator's
    own), whose ``forward`` is the loss: wrapped by a data-parallel module, its forward pass is
    what lets the wrapper reduce the gradients. Each call records its sample sites, so a bad
    value is named from the step that produced it.
    """

    def __init__(self, loss_fn: EstimatorLoss, modules: Sequence[nn.Module], n: int, beta: float, kl_warmup: int = 0,
                 plate: DataPlate = DataPlate(DATA)) -> None:
        super().__init__()
        self.loss_fn, self.n = loss_fn, n
        #: the data plate, driven by Pyro's subsampling: its indices are the batch's dataset indices (set each step), the sites inside it scaled by N / B
        self.rows = DataRows(plate, total=n)
        self.networks = nn.ModuleList(modules)
        self.beta, self.kl_warmup = beta, kl_warmup
        self.scale_latents = _ScaleLatents(beta) if beta != 1.0 or kl_warmup else None
        self.record = _StepRecord(plate.name)
        self.support = ObservedSupport()  # every observed value inside its support, read with the loss
        self.validate = True

    def anneal(self, step: int, per_epoch: int) -> None:
        """Set the KL weight of step ``step`` (from 0): ``beta`` times a linear ramp from 0 to 1 over the first ``kl_warmup`` epochs."""
        if self.scale_latents is not None:
            ramp = min(1.0, (step + 1) / (self.kl_warmup * per_epoch)) if self.kl_warmup else 1.0
            self.scale_latents.beta = self.beta * ramp

    def holds_not(self, param: torch.Tensor) -> bool:
        """Whether ``param`` (a ``pyro.param`` tensor, say) is outside every network here: data parallelism cannot reduce it."""
        return all(param is not p for p in self.parameters())

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        self.record.clear()
        with ExitStack() as stack:
            stack.enter_context(self.rows)
            if self.scale_latents is not None:
                stack.enter_context(self.scale_latents)
            stack.enter_context(pyro.validation_enabled(self.validate))
            stack.enter_context(self.record)
            self.support.eager = self.validate  # with validation on, Pyro would raise first: say which row
            stack.enter_context(self.support)
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)  # Pyro's; fit reports it, naming the site
            return self.loss_fn(*batch)


@dataclass
class _State:
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

    def end_epoch(self, row: dict[str, float], params: Sequence[torch.Tensor], patience: int | None) -> bool:
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


class _Trainer:
    """The pieces around the step: optimiser and schedule, shuffling, divergence watch, checkpoints.

    Built once before the processes start; :meth:`attach` then hands the objective and the
    optimiser to Fabric in each process (DDP wraps the objective there).
    """

    def __init__(self, objective: Objective, params: list[torch.Tensor], named: list[tuple[str, torch.Tensor]], optim: torch.optim.Optimizer,
                 sched: Any, seed: int, watch: _DivergenceWatch, out: str | Path | None) -> None:
        self.objective, self.params, self.named, self.optim, self.sched = objective, params, named, optim, sched
        self.seed, self.watch, self.out = seed, watch, out
        self.ckpt_path = Path(out) / CHECKPOINT if out is not None else None
        self.saved_epoch: int | None = None
        self.module: Any = objective
        self.fabric: Any = None
        self.coll: Collectives | None = None
        self.clipping: Callable[[], None] | None = None  # a pyro.optim optimiser's gradient clipping, before each step
        self.callback: Callable[[StepInfo], None] | None = None  # fit's per-step callback

    def refuse_loose_params(self, world_size: int) -> None:
        """Several processes reduce the gradients of module parameters only: refuse ``pyro.param`` tensors by name."""
        loose = [name for name, p in self.named if self.objective.holds_not(p)]
        if world_size > 1 and loose:
            raise ConfigError(
                f"{len(loose)} trained tensor(s) ({', '.join(loose[:3])}) belong to no nn.Module, so data-parallel training cannot reduce "
                "their gradients; hold them in an nn.Module (e.g. a PyroModule), or train in one process"
            )

    def attach(self, fabric: Any, coll: Collectives) -> None:
        self.fabric, self.coll = fabric, coll
        self.module, _ = fabric.setup(self.objective, self.optim)

    def loss(self, batch: tuple[torch.Tensor, ...], step: int) -> tuple[torch.Tensor, str]:
        """The step's loss; when torch's argument validation meets an invalid parameter, the same draws again without validation, to name the site."""
        rng = torch.get_rng_state()
        try:
            return self.module(*batch), ""
        except ValueError as exc:
            if "Expected parameter" not in str(exc):
                raise
            torch.set_rng_state(rng)
            self.objective.validate = False
            return self.module(*batch), f"a distribution got an invalid parameter ({str(exc).splitlines()[0][:120]}); "

    def step(self, data: Rows, rows: torch.Tensor, step: int, epoch: int) -> float:
        """One optimisation step on the dataset rows ``rows`` of ``data``; the minibatch's ELBO per datapoint.

        The loss and whether every observed value lay in its support come back to the host in one
        read. A step that diverged, or whose rows are damaged (:meth:`Rows.take`) or hold a value
        outside an observed site's support, raises in every process the same error, composed by the
        lowest such rank: :class:`TrainingDiverged` naming the step and the site, or
        :class:`DataError` naming the data row.
        """
        assert self.coll is not None
        failed = None
        try:
            batch = data.args(rows, self.fabric.to_device)
            self.objective.support.rows = rows
            self.objective.rows.index = rows
            loss, invalid = self.loss(batch, step)
        except DataError as exc:  # a damaged row, or (with validation on) a value outside the support: found before any collective
            where = f" on rank {self.coll.rank}" if self.coll.world > 1 else ""
            first = str(exc).splitlines()[0]  # (Pyro's trace appends the sites' shapes to an error raised inside it)
            failed = ("data", f"{first} (step {step}, epoch {epoch + 1}{where})", None)
        if failed is None:
            flags = torch.stack([loss.detach().to(torch.float64), torch.as_tensor(self.objective.support.ok, device=loss.device).to(torch.float64)])
            value, data_ok = flags.tolist()  # the step's one read back to the host
            # per datapoint, without a normaliser the model applies to every site (its ELBO, as the final evaluation reports it)
            elbo = -value / self.objective.n / self.objective.record.user_scale()
            reason = "data" if not data_ok else f"loss is {value}" if not math.isfinite(elbo) else self.watch.check(elbo)
        bad = self.coll.first_bad(failed is not None or reason is not None)
        if bad >= 0:
            error = (failed or self._failure(reason, invalid, step, epoch, bad)) if bad == self.coll.rank else None
            kind, message, site = self.coll.from_rank(error, bad)
            if kind == "data":
                raise DataError(message)
            raise TrainingDiverged(message, step=step, site=site)
        self.optim.zero_grad(set_to_none=True)
        self.fabric.backward(loss)
        if self.clipping is not None:
            self.clipping()
        self.optim.step()
        if self.callback is not None:
            self.callback(StepInfo(step, epoch, elbo, tuple(self.params)))
        return elbo

    def _failure(self, reason: str | None, invalid: str, step: int, epoch: int, rank: int) -> tuple[str, str, str | None]:
        """``(kind, message, site)`` of this process's failed step: bad data (the row, from the step's observed sites) or divergence."""
        where = f" on rank {rank}" if self.coll is not None and self.coll.world > 1 else ""
        kept = f"; the last good checkpoint (epoch {self.saved_epoch}) is kept in {self.out}" if self.saved_epoch else ""
        if reason == "data":
            try:
                self.objective.support.raise_bad()
            except DataError as exc:
                return "data", f"{exc} (step {step}, epoch {epoch + 1}{where}){kept}", None
        site, culprit = _culprit(self.objective.record, self.named)
        return "diverged", f"training diverged at step {step} (epoch {epoch + 1}){where}: {reason}; {invalid}{culprit}{kept}; try a smaller --lr", site

    def order(self, n: int, epoch: int) -> torch.Tensor:
        """This process's rows for ``epoch``: a permutation seeded by (seed, epoch), split across the processes.

        The permutation depends on the epoch only (a resumed run continues it), and process ``r``
        of ``W`` takes every ``W``-th row of it: step ``k`` of ``W`` processes at batch ``B / W``
        covers the same rows as step ``k`` of one process at batch ``B``.
        """
        assert self.coll is not None
        sampler = DistributedSampler(range(n), num_replicas=self.coll.world, rank=self.coll.rank, shuffle=True, seed=self.seed)  # type: ignore[arg-type]
        sampler.set_epoch(epoch)
        with torch.device("cpu"):  # the sampler draws on the default device; indices are host-side
            return torch.tensor(list(sampler), dtype=torch.long)

    def epoch(self, data: Rows, batch_size: int, state: _State, bar: Any, validate_every_step: bool) -> dict[str, float]:
        """One pass over the shuffled data; the row of the history (without validation)."""
        assert self.coll is not None
        epoch, order = state.epoch, self.order(len(data), state.epoch)
        local = batch_size // self.coll.world
        total = 0.0
        self.module.train(True)
        per_epoch = math.ceil(len(order) / local)
        for start in range(0, len(order), local):
            self.objective.validate = state.step == 0 or validate_every_step
            self.objective.anneal(state.step, per_epoch)
            idx = order[start : start + local]
            total += self.step(data, idx, state.step, epoch) * len(idx)
            state.step += 1
            bar.set_postfix(epoch=epoch + 1, elbo=f"{total / min(len(order), start + local):.2f}", refresh=False)
            bar.update(1)  # redraws at most every mininterval (a log file: every 10 s)
        if self.sched is not None:
            self.sched.step()
        self.module.train(False)
        train_elbo = self.coll.sum(total) / self.coll.sum(float(len(order)))
        row = {"epoch": epoch + 1, "step": state.step, "train_elbo": train_elbo}
        lr = self.optim.param_groups[0].get("lr")  # an optimiser without one (Pyro's AdagradRMSProp) records none
        return {**row, "lr": float(lr)} if isinstance(lr, (int, float)) else row

    def save(self, state: _State, options: dict[str, Any]) -> None:
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
                "params": [p.detach().clone() for p in self.params], "optimizer": self.optim.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "rng": {"torch": rng, "world_size": self.coll.world}, "estimator": estimator, "options": options, **asdict(state),
            }
            error = self._write(ckpt, state)
        error = self.coll.from_rank_zero(error)
        if error is not None:
            raise RunDirectoryError(error)
        self.saved_epoch = state.epoch

    def _write(self, ckpt: dict[str, Any], state: _State) -> str | None:
        assert self.ckpt_path is not None
        kept = f"the previous checkpoint (epoch {self.saved_epoch}) is intact" if self.saved_epoch else "no checkpoint was written"
        try:
            io.save_torch(self.ckpt_path, ckpt)
        except OSError as exc:
            return f"could not write the checkpoint of epoch {state.epoch} to {self.ckpt_path} ({exc.strerror or exc}); {kept}"
        try:
            io.write_csv(self.ckpt_path.parent / HISTORY, state.history)
        except OSError as exc:
            return f"could not write {self.ckpt_path.parent / HISTORY} ({exc.strerror or exc}); the checkpoint of epoch {state.epoch} in {self.ckpt_path} is intact"
        return None

    def restore(self, epochs: int, patience: int | None) -> _State:
        """Parameters, optimiser, schedule, this process's RNG state and estimator statistics from the checkpoint; the run's state."""
        assert self.ckpt_path is not None and self.out is not None and self.coll is not None
        ckpt = read_checkpoint(self.ckpt_path)  # weights_only; finite parameters; every field checked
        try:  # before anything is changed
            stopped = check_resume(ckpt, epochs, patience, self.out, world_size=self.coll.world)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {self.ckpt_path} is corrupted or incomplete ({type(exc).__name__}: {exc})") from None
        try:
            load_params(self.params, ckpt["params"], str(self.ckpt_path))
            self.optim.load_state_dict(ckpt["optimizer"])
            if self.sched is not None and ckpt.get("scheduler") is not None:
                self.sched.load_state_dict(ckpt["scheduler"])
                if isinstance(self.sched, torch.optim.lr_scheduler.LambdaLR):
                    _replan(self.sched, self.optim)  # this run's total of epochs
            torch.set_rng_state(_per_process(ckpt["rng"]["torch"])[self.coll.rank])
            self.objective.loss_fn.load_state_dict(_per_process(ckpt.get("estimator") or {})[self.coll.rank])
            state = _State(
                history=list(ckpt["history"]), epoch=ckpt["epoch"], step=ckpt["step"], best=ckpt["best"], best_epoch=ckpt["best_epoch"],
                bad_epochs=ckpt["bad_epochs"], wall_time=ckpt["wall_time"], best_params=ckpt.get("best_params"),
                stopped_early=stopped,
            )
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {self.ckpt_path} is corrupted or incomplete ({type(exc).__name__}: {exc})") from None
        self.saved_epoch = state.epoch
        return state


def _per_process(saved: Any) -> list[Any]:
    """A checkpoint's per-process list (one process wrote a single value before the Fabric loop)."""
    return list(saved) if isinstance(saved, list) else [saved]


def _check_options(epochs: int, batch_size: int, num_particles: int, beta: float, lr: float, seed: int, patience: int | None,
                   resume: bool, out: str | Path | None) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_particles", num_particles)):
        check_int(value, name)
    check_positive(beta, "beta")
    check_positive(lr, "lr")
    check_seed(seed)
    if patience is not None:
        check_int(patience, "patience")
    if resume and out is None:
        raise ConfigError("resume needs the run directory `out`")


#: the checkpoint's ``options`` a resumed run must repeat, with their checks (``epochs`` and ``patience`` may change)
_OPTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "estimator": lambda v, n: v if isinstance(v, str) and v else _bad(n, "must be an estimator's name", v),
    "num_particles": lambda v, n: check_int(v, n, error=CheckpointError),
    "epochs": lambda v, n: check_int(v, n, error=CheckpointError),
    "batch_size": lambda v, n: check_int(v, n, error=CheckpointError),
    "lr": lambda v, n: check_positive(v, n, error=CheckpointError),
    "beta": lambda v, n: check_positive(v, n, error=CheckpointError),
    "kl_warmup": lambda v, n: check_int(v, n, low=0, error=CheckpointError),
    "seed": lambda v, n: check_int(v, n, low=0, high=2**32 - 1, error=CheckpointError),
    "patience": lambda v, n: v if v is None else check_int(v, n, error=CheckpointError),
    "lr_schedule": lambda v, n: v if v is None or isinstance(v, str) else _bad(n, "must be a schedule's name or null", v),
}


def _bad(name: str, what: str, value: Any) -> Any:
    shown = repr(value) if not isinstance(value, (list, dict, torch.Tensor)) else f"a {type(value).__name__}"
    raise CheckpointError(f"{name} {what}, got {shown}")


def _check_tensors(value: Any, name: str, like: Sequence[torch.Tensor] | None = None) -> None:
    """``value`` is a list of tensors (of ``like``'s shapes, where given); else a :class:`CheckpointError` naming ``name``."""
    if not (isinstance(value, list) and all(isinstance(t, torch.Tensor) for t in value)):
        _bad(name, "must be a list of tensors", value)
    if like is not None and [tuple(t.shape) for t in value] != [tuple(t.shape) for t in like]:
        _bad(name, "must have the shapes of params", [tuple(t.shape) for t in value])


def _check_history(history: Any, name: str = "history") -> list[dict[str, Any]]:
    """A training history: a list of dicts, row ``i`` of epoch ``i + 1``, increasing steps, finite ELBOs; else a :class:`CheckpointError` naming the field."""
    if not isinstance(history, (list, tuple)):
        _bad(name, "must be a list of per-epoch records", history)
    step = 0
    for i, row in enumerate(history):
        at = f"{name}[{i}]"
        if not isinstance(row, dict):
            _bad(at, "must be a record of one epoch (a dict)", row)
        for key in ("epoch", "step", "train_elbo"):
            if key not in row:
                raise CheckpointError(f"{at} has no {key}")
        if check_int(row["epoch"], f"{at}.epoch", error=CheckpointError) != i + 1:
            _bad(f"{at}.epoch", f"must be {i + 1} (its place in the history)", row["epoch"])
        step = check_int(row["step"], f"{at}.step", low=step + 1, error=CheckpointError)
        check_finite(row["train_elbo"], f"{at}.train_elbo", error=CheckpointError)
        for key, low in (("val_elbo", None), ("lr", 0.0), ("wall_time", 0.0)):
            if key in row:
                check_finite(row[key], f"{at}.{key}", low=low, error=CheckpointError)
    return list(history)


def check_checkpoint(ckpt: dict[str, Any], path: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ckpt`` (a ``fit`` checkpoint, its parameters checked by :func:`~ppl_vae.io.load_checkpoint`) if every training-state field is sound.

    Checks each field's type and range, and their agreement: ``epoch`` is the length of ``history`` and at most
    ``options["epochs"]``, ``step`` the last row's, ``best_epoch`` an epoch done whose score is ``best``, ``bad_epochs`` the
    epochs since it, ``best_params`` of the shapes of ``params``, a finite non-negative ``wall_time``. With ``options`` (what
    the run's config says, e.g. :meth:`ppl_vae.app.config.Config.fit_options`), each of them must equal the checkpoint's.

    Raises
    ------
    CheckpointError
        One line: ``checkpoint {path} is damaged ({field} ...)``, naming the first field that is wrong.
    """
    try:
        _check_checkpoint(ckpt, options or {})
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({exc})") from None
    return ckpt


def _check_checkpoint(ckpt: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in ("params", "optimizer", "rng", "options", "history", "epoch", "step", "best", "best_epoch", "bad_epochs", "wall_time", "stopped_early"):
        if key not in ckpt:
            raise CheckpointError(f"no {key}")
    if not (isinstance(ckpt["optimizer"], dict) and isinstance(ckpt["optimizer"].get("param_groups"), list)):
        _bad("optimizer", "must be an optimiser's state (a dict with param_groups)", ckpt["optimizer"])
    if not (ckpt.get("scheduler") is None or isinstance(ckpt["scheduler"], dict)):
        _bad("scheduler", "must be a schedule's state or null", ckpt["scheduler"])
    rng = ckpt["rng"]
    if not (isinstance(rng, dict) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in _per_process(rng.get("torch")))):
        _bad("rng", "must hold torch's random state (rng.torch: byte tensors)", rng)
    if not all(isinstance(s, dict) for s in _per_process(ckpt.get("estimator") or {})):
        _bad("estimator", "must be the estimator's state (a dict per process)", ckpt.get("estimator"))
    saved = ckpt["options"]
    if not isinstance(saved, dict):
        _bad("options", "must be a dict of fit's options", saved)
    for key, check in _OPTION_CHECKS.items():
        if key in saved:
            check(saved[key], f"options.{key}")
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"options.{key} is {saved[key]!r}, but the run's config says {value!r}")
    history = _check_history(ckpt["history"])
    epoch = check_int(ckpt["epoch"], "epoch", low=0, error=CheckpointError)
    if epoch != len(history):
        _bad("epoch", f"must be the number of epochs in history ({len(history)})", epoch)
    if isinstance(saved.get("epochs"), int) and epoch > saved["epochs"]:
        _bad("epoch", f"must be at most options.epochs ({saved['epochs']})", epoch)
    step = check_int(ckpt["step"], "step", low=0, error=CheckpointError)
    if step != (history[-1]["step"] if history else 0):
        _bad("step", f"must be the last epoch's step ({history[-1]['step'] if history else 0})", step)
    best_epoch = check_int(ckpt["best_epoch"], "best_epoch", low=0, high=epoch, error=CheckpointError)
    best = ckpt["best"]
    if isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best):
        _bad("best", "must be a number", best)
    if best_epoch:
        row = history[best_epoch - 1]
        if best != row.get("val_elbo", row["train_elbo"]):
            _bad("best", f"must be the score of best_epoch {best_epoch} ({row.get('val_elbo', row['train_elbo'])!r})", best)
    bad_epochs = check_int(ckpt["bad_epochs"], "bad_epochs", low=0, error=CheckpointError)
    if bad_epochs != epoch - best_epoch:
        _bad("bad_epochs", f"must be the epochs since best_epoch ({epoch - best_epoch})", bad_epochs)
    check_finite(ckpt["wall_time"], "wall_time", low=0.0, error=CheckpointError)
    if not isinstance(ckpt["stopped_early"], bool):
        _bad("stopped_early", "must be true or false", ckpt["stopped_early"])
    if ckpt.get("best_params") is not None:
        _check_tensors(ckpt["best_params"], "best_params", ckpt["params"])


def read_checkpoint(path: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``fit`` checkpoint at ``path``: :func:`~ppl_vae.io.load_checkpoint` (safe load, finite parameters), then :func:`check_checkpoint`."""
    return check_checkpoint(io.load_checkpoint(path), path, options=options)


def check_resume(ckpt: dict[str, Any], epochs: int, patience: int | None, out: str | Path, *, prefix: str = "", world_size: int | None = None) -> bool:
    """Whether a checkpointed run resumed to ``epochs`` with ``patience`` stays stopped early.

    Refuses (:class:`ConfigError`) fewer epochs than the run has done, and training on past an
    early stop that this patience would repeat; the messages name the options as
    ``{prefix}epochs`` and ``{prefix}patience`` (``prefix="--"`` for the command line).
    """
    done, bad = ckpt["epoch"], ckpt.get("bad_epochs", 0)
    saved_world = ckpt.get("rng", {}).get("world_size", 1) if isinstance(ckpt.get("rng"), dict) else 1
    if world_size is not None and world_size != saved_world:
        raise ConfigError(
            f"the run in {out} was trained by {saved_world} process(es); resume it on the same number (this run has {world_size}), "
            "so that each process continues its own random stream"
        )
    if epochs < done:
        raise ConfigError(f"{prefix}epochs {epochs} is fewer than the {done} epochs the run in {out} has done")
    stopped = bool(ckpt.get("stopped_early")) and patience is not None and bad >= patience
    if stopped and epochs > done:
        raise ConfigError(
            f"the run in {out} stopped early at epoch {done} ({bad} epochs without improvement); resume it with a {prefix}patience above {bad} to train on"
        )
    return stopped


def fit(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: torch.Tensor | Sequence[torch.Tensor] | Dataset | DataLoader,
    *,
    estimator: str | Estimator = "reparam",
    num_particles: int = 1,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None = None,
    validation: torch.Tensor | Sequence[torch.Tensor] | Dataset | DataLoader | None = None,
    patience: int | None = None,
    beta: float = 1.0,
    kl_warmup: int = 0,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    modules: Iterable[nn.Module] = (),
    eval_batch_size: int = 1000,
    validate_every_step: bool = False,
    accelerator: str | None = None,
    devices: int | str | Sequence[int] = 1,
    strategy: str = "auto",
    precision: str | int | None = None,
    num_nodes: int = 1,
    plate: str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> FitResult:
    r"""Fit ``model`` and ``guide`` to ``data`` by maximising the ELBO.

    Parameters
    ----------
    model, guide : callable
        Pyro functions ``f(*batch)`` with a data plate over the rows of the
        batch (see ``plate``). Their networks (and ``pyro.module`` /
        ``pyro.param`` parameters) are found by running them once
        (:mod:`ppl_vae.inference.params`); pass networks they reach in other
        ways through ``modules``. Training runs in a parameter store of its
        own (Pyro's ``ParamStoreDict.scope``): a bare ``pyro.param`` starts
        from its initial value, lives in the returned result, and neither
        Pyro's global store nor a later fit changes it.
    data : tensor, tuple of tensors, Dataset or DataLoader
        One row per datapoint; a batch is ``tuple(t[idx] for t in data)``, or
        a map-style dataset's rows collated (:class:`Rows`; a DataLoader gives
        its dataset and collate function), read batch by batch.
    estimator : {"reparam", "score", "analytic-kl"} or Estimator
        The gradient estimator (:mod:`ppl_vae.inference.estimators`).
    num_particles : int
        Samples per datapoint per step, vectorised.
    epochs, batch_size, lr : int, int, float
        Passes over the data, minibatch size, Adam learning rate.
    optimizer : optimiser class, callable or ``pyro.optim`` optimiser, optional
        Adam(lr) by default; a ``torch.optim.Optimizer`` class (given ``lr=lr``
        where it takes one), a callable ``params -> torch.optim.Optimizer``, or
        one of Pyro's ``pyro.optim`` wrappers (``pyro.optim.Adam({"lr": 1e-3})``,
        ``pyro.optim.AdagradRMSProp({"eta": 0.5})``, ``ClippedAdam``: its
        arguments, per-parameter ones included, and its gradient clipping).
        No ``lr`` key is assumed: the history records the learning rate where
        the optimiser has one.
    lr_schedule : {"cosine", "exponential"} or callable, optional
        Stepped once per epoch; the named ones are :func:`lr_factor` of
        (epoch, ``epochs``). Resuming with a larger ``epochs`` re-plans the
        curve for the new total from the epoch reached on.
    validation : tensor, tuple of tensors, Dataset or DataLoader, optional
        Held-out data: its ELBO is computed after every epoch.
    patience : int, optional
        Stop after this many epochs without a better validation ELBO and
        restore the best parameters.
    beta : float
        Weight of the KL term (beta-VAE; Higgins et al. 2017): every latent
        site's log-density in model and guide is scaled by ``beta``. The
        reported ELBOs are always the true ELBO (beta = 1).
    kl_warmup : int
        Epochs over which the KL weight rises linearly from 0 to ``beta``, step
        by step (Sønderby et al. 2016's warm-up, which keeps the upper layers
        of a deep hierarchy from collapsing to their priors); 0: none.
    seed : int
        Seeds the draws of the whole run (torch's generator, forked: the
        caller's random stream is left as it was) and the shuffling; a
        seeded CPU run is reproducible bit for bit.
    out : path, optional
        Directory for ``checkpoint.pt`` and ``history.csv``, written
        atomically after every epoch.
    resume : bool
        Continue the run checkpointed in ``out`` up to ``epochs`` (at least
        the epochs already done), bit for bit as if it had not stopped:
        parameters, optimiser, schedule, RNG states and the estimator's
        running statistics are restored.
    validate_every_step : bool
        Keep Pyro's and torch's argument validation on for every step;
        by default it is on for the first step only (it costs ~20 % per step).
    plate : str, optional
        The data plate's name; by default the plate over the rows of the
        batch (any name), or the one plate that subsamples the data itself
        (:mod:`.plates`). Its indices inside the model and guide are the
        batch's dataset indices; only the sites inside it are scaled by
        ``N / B``, so a global latent's KL is counted once. A plate written
        over the whole data with Pyro's ``subsample_size=B`` (``x[ind]``
        inside) is given the whole ``data`` each step, with the batch as its
        subsample (``batch_size`` must be ``B``; one process; tensors).
    callback : callable, optional
        Called after every optimisation step with a :class:`StepInfo`
        (step, epoch, the minibatch's ELBO, the parameters): to clip or
        project parameters, or log, from your own code.
    accelerator, devices, strategy, precision, num_nodes
        Where and how the loop runs, through Lightning Fabric
        (:mod:`ppl_vae.inference.distributed`): ``accelerator`` ``cpu``,
        ``cuda``, ``mps`` or ``auto`` (default: where ``data`` is), ``devices``
        per node, ``strategy`` ``ddp`` (or ``ddp_fork``, ``ddp_spawn``, ...).
        With ``W`` processes each takes every ``W``-th row of the epoch's
        permutation at batch ``batch_size / W`` (so a step covers the same rows
        as one process at ``batch_size``), DDP averages the gradients, rank 0
        writes the checkpoint, and a run resumes on the same ``W``. The
        networks' final parameters are copied back into the caller's.

    Returns
    -------
    FitResult
        The training record (``history``, ``train_elbo``, ...) and the trained
        model: ``save``, ``sample``, ``posterior``, ``elbo``, ``iwae``
        (:mod:`.fitted`).

    Raises
    ------
    TrainingDiverged
        When the loss is NaN or infinite, when an ELBO estimate is impossible
        (above 0 by 50 nats under discrete observations) or jumped by four
        orders of magnitude (:class:`_DivergenceWatch`), or when a validation
        ELBO is not finite. Names the step and, from that step's own sites, the
        non-finite parameter or site (or the largest term). The checkpoint of
        the last completed epoch is kept.
    RunDirectoryError
        When a checkpoint cannot be written (a full disk): the previous one is intact.
    Interrupted
        On Ctrl-C (a :class:`KeyboardInterrupt`), saying which epoch the last checkpoint holds.
    """
    est = get_estimator(estimator)
    tensors = Rows(data)
    val = Rows(validation, "validation data") if validation is not None else None
    _check_options(epochs, batch_size, num_particles, beta, lr, seed, patience, resume, out)
    check_int(kl_warmup, "the KL warm-up (epochs)", low=0)
    options = {
        "estimator": est.name, "num_particles": num_particles, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "beta": beta, "kl_warmup": kl_warmup, "seed": seed, "patience": patience,
        "lr_schedule": lr_schedule if isinstance(lr_schedule, str) or lr_schedule is None else "custom",
    }
    fabric = make_fabric(accelerator, devices, strategy, precision, num_nodes, like=tensors.like)
    if batch_size % fabric.world_size:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of the number of processes ({fabric.world_size})")
    store = pyro.get_param_store()
    with store.scope() as state:  # the result's own parameter store: a bare pyro.param lives here, not in Pyro's global one
        payload, handed, trainer, found, example, data_plate = _fit(
            model, guide, tensors, val, est, fabric, options, num_particles=num_particles, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, lr_schedule=lr_schedule, patience=patience, beta=beta, kl_warmup=kl_warmup, seed=seed, out=out, resume=resume,
            progress=progress, modules=modules, eval_batch_size=eval_batch_size, validate_every_step=validate_every_step, plate=plate,
            callback=callback,
        )
    result = FitResult(**{**payload["result"], "history": tuple(payload["result"]["history"])})
    return attach(result, model, guide, [(tuple(t.shape[1:]), t.dtype) for t in example], None, "fit", found=found, plate=data_plate,
                  store=state if state["params"] else None)


def _fit(model: Callable[..., object], guide: Callable[..., object], tensors: Rows, val: Rows | None, est: Estimator, fabric: Any,
         options: dict[str, Any], *, num_particles: int, epochs: int, batch_size: int, lr: float, optimizer: Any, lr_schedule: Any,
         patience: int | None, beta: float, kl_warmup: int, seed: int, out: str | Path | None, resume: bool, progress: bool,
         modules: Iterable[nn.Module], eval_batch_size: int, validate_every_step: bool, plate: str | None, callback: Any) -> tuple[Any, ...]:
    """:func:`fit` inside its parameter scope: the pieces, the processes, the payload of rank 0 (its failure raised here)."""
    with seeded(seed):
        trainer, evaluate, found, example, data_plate = _setup(model, guide, tensors, est, num_particles, batch_size, lr, optimizer, lr_schedule,
                                                               epochs, beta, seed, out, modules, eval_batch_size, kl_warmup, plate)
    trainer.callback = callback
    trainer.refuse_loose_params(fabric.world_size)
    if data_plate.subsampled and fabric.world_size > 1:
        raise ConfigError(f"plate {data_plate.name!r} subsamples the data itself (subsample_size={data_plate.subsample_size}), so each step "
                          "takes one subsample: train it in one process, or write the plate over the rows given, pyro.plate(name, x.shape[0])")
    if resume:  # refused before any process starts
        check_resume(read_checkpoint(Path(out) / CHECKPOINT), epochs, patience, out, world_size=fabric.world_size)  # type: ignore[arg-type]
    run = _Run(epochs, batch_size, patience, seed, resume, progress, validate_every_step, options)
    try:
        payload, handed = run_processes(fabric, _train, trainer, evaluate, tensors, val, run, what="training process")
    except ProcessFailed as exc:  # the processes are gone: what they left is on disk
        raise ProcessFailed(f"{exc}; {_kept(out)}") from None
    if "error" in payload:  # a failure every process met, composed by the process that met it first
        error = payload["error"]
        if error["kind"] == "DataError":
            raise DataError(error["message"])
        raise TrainingDiverged(error["message"], step=error["step"], site=error["site"])
    if handed:  # rank 0 ran in another process: its final values go into the caller's networks
        load_params(trainer.params, payload["params"], "of the training process")
    return payload, handed, trainer, found, example, data_plate


def _kept(out: str | Path | None) -> str:
    """Which checkpoint a run that stopped left in ``out``, and how to continue it."""
    if out is None or not (Path(out) / CHECKPOINT).is_file():
        return "no checkpoint was written"
    try:
        epoch = io.load_checkpoint(Path(out) / CHECKPOINT).get("epoch")
    except CheckpointError:
        return f"the checkpoint in {out} is unreadable"
    return f"the last checkpoint (epoch {epoch}) is kept in {out}: continue it with resume (ppl-vae fit --out {out} --resume)"


@dataclass(frozen=True)
class _Run:
    epochs: int
    batch_size: int
    patience: int | None
    seed: int
    resume: bool
    progress: bool
    validate_every_step: bool
    options: dict[str, Any]


def _train(fabric: Any, trainer: _Trainer, evaluate: _Evaluator, tensors: Rows, val: Rows | None, run: _Run) -> dict[str, Any]:
    """In each process: share the node's cores between its processes (restored after), then :func:`_loop`."""
    coll = Collectives(fabric)
    with shared_cores(fabric, coll):
        try:
            return _loop(fabric, coll, trainer, evaluate, tensors, val, run)
        except (TrainingDiverged, DataError) as exc:
            if coll.world == 1:
                raise
            # every process raised the same error (decided together): rank 0 hands it back whole, with its step and site
            return {"error": {"kind": type(exc).__name__, "message": str(exc), "step": getattr(exc, "step", None), "site": getattr(exc, "site", None)}}


def _loop(fabric: Any, coll: Collectives, trainer: _Trainer, evaluate: _Evaluator, tensors: Rows, val: Rows | None, run: _Run) -> dict[str, Any]:
    """The loop: epochs of steps, validation, the best epoch, checkpoints; the result and the final parameters (for a caller in another process)."""
    with seeded(rank_seed(run.seed, coll.rank)):
        trainer.attach(fabric, coll)
        evaluate.coll = coll
        state = trainer.restore(run.epochs, run.patience) if run.resume else _State()
        steps = math.ceil(math.ceil(len(tensors) / coll.world) / (run.batch_size // coll.world))
        shown = bar(total=(run.epochs - state.epoch) * steps, desc="fit", unit="step", enabled=run.progress and coll.rank == 0)
        try:
            while state.epoch < run.epochs and not state.stopped_early:
                t0 = time.perf_counter()
                row = trainer.epoch(tensors, run.batch_size, state, shown, run.validate_every_step)
                if val is not None:
                    row["val_elbo"] = evaluate(val, f"the validation ELBO after epoch {row['epoch']}")
                state.wall_time += time.perf_counter() - t0
                row["wall_time"] = state.wall_time
                state.end_epoch(row, trainer.params, run.patience)
                trainer.save(state, run.options)
        except KeyboardInterrupt:
            where = f"the last checkpoint is epoch {trainer.saved_epoch} (in {trainer.out})" if trainer.saved_epoch else "there is no checkpoint"
            raise Interrupted(f"interrupted; {where}", epoch=trainer.saved_epoch) from None
        finally:
            shown.close()
            trainer.objective.train(False)
        if state.stopped_early and state.best_params is not None:
            load_params(trainer.params, state.best_params, "best parameters")
        train_elbo = evaluate(tensors, "the final training ELBO")
        val_elbo = evaluate(val, "the final validation ELBO") if val is not None else None
    result = FitResult(
        history=tuple(state.history), train_elbo=train_elbo, val_elbo=val_elbo, epochs=len(state.history), steps=state.step,
        wall_time=state.wall_time, stopped_early=state.stopped_early, best_epoch=state.best_epoch, estimator=run.options["estimator"],
        options=run.options,
    )
    return {"result": result.to_dict(), "params": [p.detach() for p in trainer.params]}


def _setup(model: Callable[..., object], guide: Callable[..., object], tensors: Rows, est: Estimator, num_particles: int,
           batch_size: int, lr: float, optimizer: Any, lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None, epochs: int,
           beta: float, seed: int, out: str | Path | None, modules: Iterable[nn.Module], eval_batch_size: int, kl_warmup: int = 0,
           plate: str | None = None) -> tuple[_Trainer, _Evaluator, Discovered, tuple[torch.Tensor, ...], DataPlate]:
    """Find the data plate and the networks, build the loss, the optimiser and schedule, the divergence watch and the evaluator.

    Everything ``fit`` refuses is found here, on the first batch, before any training: the data plate
    (:func:`~.plates.find_data_plate`), and one evaluation of the loss, which refuses (by name) a site
    the estimator cannot handle.
    """
    n = len(tensors)
    rows = torch.arange(min(n, batch_size), device="cpu")
    example = tensors.take(rows)
    data_plate = _data_plate(model, guide, tensors, example, batch_size, plate)
    args = tensors.args(rows[: data_plate.subsample_size], lambda t: t) if data_plate.subsampled else example
    rows = rows[: data_plate.subsample_size]
    why = vectorises(on_data_plate(model, data_plate, index=rows), on_data_plate(guide, data_plate, index=rows), *args) if num_particles > 1 else None
    if why is not None:
        warnings.warn(f"fit: the model or guide cannot run its {num_particles} particles at once ({why}): they run one after another, "
                      f"about {num_particles} times the time of vectorised particles per step", SequentialWarning, stacklevel=3)
    with DataRows(data_plate, index=rows, total=n):  # the first batch as training sees it
        found = discover(model, guide, args, modules)
        loss_fn = est.loss(model, guide, num_particles, vectorize=why is None)
        extra, networks = loss_fn.parameters(*args), loss_fn.networks(*args)
    # networks the estimator trains itself (NVIL's baseline) come last, so the model's and guide's keep their order
    own = {id(p) for p in found.params}
    params = list(found.params) + [p for p in extra if id(p) not in own]
    if not params:
        raise ConfigError("the model and guide use no trainable parameters")
    named = _named(found, params)
    optim, clipping = make_optimizer(optimizer, params, lr, [name for name, _ in named])
    if lr_schedule is not None and not all("lr" in g for g in optim.param_groups):
        raise ConfigError(f"lr_schedule needs an optimiser with a learning rate ('lr' in its parameter groups); {type(optim).__name__} has none")
    objective = Objective(loss_fn, [*found.modules, *networks], n, beta, kl_warmup, plate=data_plate)
    objective.rows.index = rows
    _probe_loss(objective, args)
    bounded, enumerated = _inspect(on_data_plate(model, data_plate, index=rows), on_data_plate(guide, data_plate, index=rows), args)
    trainer = _Trainer(
        objective, params, named, optim, _schedule(optim, lr_schedule, epochs),
        seed, _DivergenceWatch(bounded, beta), out,
    )
    trainer.clipping = clipping
    return trainer, _Evaluator(model, guide, loss_fn, enumerated, eval_batch_size, data_plate), found, args, data_plate


def _probe_loss(objective: Objective, args: tuple[torch.Tensor, ...]) -> None:
    """One loss on the first batch, so that a site the estimator refuses is named now, not after an epoch.

    Only the package's own refusals (a :class:`~ppl_vae.errors.PplVaeError`) come out of it: any other
    failure is the first step's to meet and name. The networks are in evaluation mode (no batch-norm
    statistics move), without gradients, and the estimator's running statistics are put back after
    it: training starts as if it had not run.
    """
    state, mode = objective.loss_fn.state_dict(), objective.training
    objective.train(False)
    try:
        with torch.no_grad(), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objective(*args)
    except (ConfigError, DataError) as exc:  # one line (Pyro's trace appends the sites' shapes to an error raised inside it)
        raise type(exc)(str(exc).splitlines()[0]) from None
    except PplVaeError:
        raise
    except Exception:  # noqa: BLE001 - the first training step meets it again, and names it
        pass
    finally:
        objective.train(mode)
        objective.loss_fn.load_state_dict(state)


def _data_plate(model: Callable[..., object], guide: Callable[..., object], tensors: Rows, example: tuple[torch.Tensor, ...], batch_size: int,
                plate: str | None) -> DataPlate:
    """The data plate of ``model`` and ``guide``; for one they subsample themselves, the checks that ``fit`` can drive it."""
    found = find_data_plate(model, guide, example, plate=plate, what="fit")
    if not found.subsampled:
        return found
    where = f"plate {found.name!r} subsamples the data itself (subsample_size={found.subsample_size})"
    if tensors.tensors is None:
        raise ConfigError(f"fit: {where}, so the model takes the whole data: give fit tensors, not a Dataset read batch by batch")
    if found.subsample_size != batch_size:
        raise ConfigError(f"fit: {where}; fit's batch_size is {batch_size}: give batch_size={found.subsample_size}, "
                          "so that fit's batches are the plate's subsamples")
    size = subsampled_size(model, guide, tensors.tensors, found)
    if size != len(tensors):
        raise ConfigError(f"fit: {where} over {size} rows, and the data has {len(tensors)}: the plate's size must be the number of rows")
    tensors.whole = True
    return found
