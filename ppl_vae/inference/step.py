"""One training step: :class:`SVI` (the public step), the objective it differentiates, the optimiser, the diagnosis of a failed step.

:class:`SVI` is the step ``fit`` takes, for a loop of your own. :class:`Objective` is the loss of a
minibatch with the data plate driven through Pyro's subsampling (:class:`~.plates.DataRows`), the KL
weight (beta, warm-up) and the checks of every observed value, recorded so that a bad value is named
from the step that produced it. :func:`make_optimizer` builds the optimiser from what ``fit`` takes
(a torch class, a function, a ``pyro.optim`` wrapper).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import is_validation_enabled, site_is_subsample
from torch import nn

from ..errors import (
    ConfigError,
    DataError,
    PplVaeError,
    SequentialWarning,
)
from .batches import Rows
from .compiled import CompiledStep, Noise
from .estimators import Estimator, EstimatorLoss, get_estimator, is_latent
from .params import Discovered, discover, load_params
from .plates import DATA, DataPlate, DataRows, find_data_plate, on_data_plate, subsampled_size
from .traces import ObservedSupport, nonfinite_at, vectorises
from .validation import retry_unvalidated


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) site by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg):
            msg["scale"] = msg["scale"] * self.beta


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
        self.names: set[str] = set()  # the names in sites

    def clear(self) -> None:
        self.sites, self.scales, self.names = [], set(), set()

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            scale = msg["scale"]
            if isinstance(
                scale, torch.Tensor
            ):  # not read back to the host: taken as a per-site weight
                self.scales.add(math.nan)
                return
            for f in msg["cond_indep_stack"]:
                if f.name == self.plate and f.full_size:
                    scale = scale * f.size / f.full_size
            self.scales.add(float(scale))

    def user_scale(self) -> float:
        """The one scale the model's own handlers gave every site of the step (a normaliser such as ``1 / N``), else 1."""
        return (
            self.scales.pop()
            if len(self.scales) == 1
            and math.isfinite(next(iter(self.scales)))
            and next(iter(self.scales)) > 0
            else 1.0
        )

    def _postprocess_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            name = msg["name"]
            role = "model" if msg["is_observed"] or name in self.names else "guide"
            self.sites.append((role, name, msg["fn"], msg["value"]))
            self.names.add(name)


def named_parameters(
    found: Discovered, params: Sequence[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Each parameter's name: its module's class and attribute, or its name in the (current) Pyro parameter store, else its number."""
    names = {
        id(p): f"{type(m).__name__}.{n}" for m in found.modules for n, p in m.named_parameters()
    }
    store = pyro.get_param_store()
    return [(names.get(id(p)) or store.param_name(p) or f"#{i}", p) for i, p in enumerate(params)]


def culprit(record: _StepRecord, named: list[tuple[str, torch.Tensor]]) -> tuple[str | None, str]:
    """``(site, description)`` of what went wrong in the recorded step: a non-finite parameter, a site's non-finite value or log-density, or the largest term."""
    bad = [
        f"parameter {name} {tuple(p.shape)}"
        for name, p in named
        if not bool(torch.isfinite(p).all())
    ]
    params = f"; non-finite {bad[0]}" if bad else ""
    largest, where = -1.0, (None, f"no site recorded{params}")
    with torch.no_grad(), pyro.validation_enabled(False):
        for role, name, fn, value in record.sites:
            try:
                found, lp = nonfinite_at(role, name, value, partial(fn.log_prob, value))
            except Exception as exc:  # a distribution that cannot even score its own draw
                return (
                    name,
                    f"{role} site {name!r} cannot evaluate its log-density ({str(exc).splitlines()[0][:100]}){params}",
                )
            if found is not None:
                return name, f"{found}{params}"
            size = lp.abs().max().item()  # type: ignore[union-attr]
            if size > largest:
                largest, where = (
                    size,
                    (name, f"largest term: {role} site {name!r}, |log-density| {size:.3g}{params}"),
                )
    return where


@dataclass(frozen=True)
class StepInfo:
    """What :func:`fit` hands its ``callback`` after each optimisation step."""

    step: int
    epoch: int
    elbo: float
    params: tuple[torch.Tensor, ...]


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused where torch offers it for the parameters' device and dtype: its step then reads nothing back to the host
    (the unfused one reads each parameter's step count), one kernel per step on a GPU."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


def make_optimizer(
    optimizer: Any, params: list[torch.Tensor], lr: float, names: Sequence[str] = ()
) -> tuple[torch.optim.Optimizer, Callable[[], None] | None]:
    """A torch optimiser over ``params`` from what :func:`fit` takes as ``optimizer``, and the gradient clipping to apply before its steps.

    None: Adam(lr), fused where torch offers it. A ``torch.optim.Optimizer`` class: that class (with ``lr`` where its constructor takes one).
    A ``pyro.optim`` wrapper (:class:`pyro.optim.PyroOptim`): its torch class with its arguments (a callable
    of per-parameter arguments is called with each parameter's name, giving one group per parameter) and its
    ``clip_args`` (``clip_norm`` / ``clip_value`` per parameter, as Pyro clips). A callable: ``optimizer(params)``.
    """
    if optimizer is None:
        return _adam(params, lr), None
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer: pass the class ({type(optimizer).__name__}) or a function of the parameters, not an optimiser "
            "already built over parameters (fit finds them)"
        )
    if isinstance(optimizer, PyroOptim):
        args, names = optimizer.pt_optim_args, list(names) or [f"#{i}" for i in range(len(params))]
        if callable(args):
            groups = [
                {"params": [p], **(args(n, p) if optimizer.pt_optim_args_argc == 2 else args(n))}
                for n, p in zip(names, params)
            ]
            built = optimizer.pt_optim_constructor(groups)
        else:
            built = optimizer.pt_optim_constructor(params, **args)
        clip = dict(optimizer.pt_clip_args or {})
        unknown = set(clip) - {"clip_norm", "clip_value"}
        if unknown:
            raise ConfigError(
                f"optimizer: unknown clip_args {', '.join(sorted(unknown))}; Pyro's are clip_norm and clip_value"
            )

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
            raise ConfigError(
                f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}"
            )
        return built, None
    raise ConfigError(
        f"optimizer must be a torch.optim.Optimizer class, a function of the parameters or a pyro.optim optimiser, got {optimizer!r}"
    )


class Objective(nn.Module):
    """What one step differentiates: the loss of a minibatch, its data plate's sites scaled to the ``n`` datapoints (:class:`~.plates.DataRows`).

    A module holding every network the loss trains (the model's, the guide's and the estimator's
    own), whose ``forward`` is the loss: wrapped by a data-parallel module, its forward pass is
    what lets the wrapper reduce the gradients. Each call records its sample sites, so a bad
    value is named from the step that produced it.
    """

    def __init__(
        self,
        loss_fn: EstimatorLoss,
        modules: Sequence[nn.Module],
        n: int,
        beta: float,
        kl_warmup: int = 0,
        plate: DataPlate = DataPlate(DATA),
    ) -> None:
        super().__init__()
        self.loss_fn, self.n = loss_fn, n
        #: the data plate, driven by Pyro's subsampling: its indices are the batch's dataset indices (set each step), the sites inside it scaled by N / B
        self.rows = DataRows(plate, total=n)
        self.networks = nn.ModuleList(modules)
        self.beta, self.kl_warmup = beta, kl_warmup
        self.scale_latents = _ScaleLatents(beta) if beta != 1.0 or kl_warmup else None
        self.record = _StepRecord(plate.name)
        self.support = (
            ObservedSupport()
        )  # every observed value inside its support, read with the loss
        self.validate = True

    def set_beta(self, beta: float) -> None:
        """A new KL weight (from the next step on)."""
        self.beta = beta
        if self.scale_latents is None and beta != 1.0:
            self.scale_latents = _ScaleLatents(beta)
        elif self.scale_latents is not None:
            self.scale_latents.beta = beta

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
        support = self.support
        support.eager = self.validate  # with validation on, Pyro would raise first: say which row
        with (
            self.rows,
            self.scale_latents or _NOTHING,
            pyro.validation_enabled(self.validate),
            self.record,
            support.entered(),  # nothing where the rows were already checked
            _quiet() if self.validate or self.loss_fn.warns else _NOTHING,
        ):
            return self.loss_fn(*batch)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Pyro's "Encountered NaN" warnings silenced (fit reports a non-finite loss itself, naming the site)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        yield


_NOTHING = contextlib.nullcontext()


def probe_loss(objective: Objective, args: tuple[torch.Tensor, ...]) -> None:
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
    except (
        ConfigError,
        DataError,
    ) as exc:  # one line (Pyro's trace appends the sites' shapes to an error raised inside it)
        raise type(exc)(str(exc).splitlines()[0]) from None
    except PplVaeError:
        raise
    except Exception:  # noqa: BLE001 - the first training step meets it again, and names it
        pass
    finally:
        objective.train(mode)
        objective.loss_fn.load_state_dict(state)


@dataclass(frozen=True)
class StepLoss:
    """What :meth:`SVI.loss` computed: the differentiable ``loss`` and, as one tensor to read back at once, ``[loss, ok]``.

    ``ok`` is 1 where every observed value lay in its distribution's support. ``invalid`` says, where
    torch's argument validation met an invalid parameter (the loss was then computed again without
    validation, with the same draws, so that the failing site can be named), what it met.
    """

    loss: torch.Tensor
    flags: torch.Tensor
    invalid: str = ""


class SVI:
    r"""Stochastic variational inference one step at a time: the step :func:`~ppl_vae.inference.fit` takes, for a loop of your own.

    As Pyro's ``SVI.step`` and NumPyro's ``SVI.update``: build it once, call :meth:`step` on each batch,
    and write the rest of the loop as you like (your own schedule, an extra loss, your own logging)::

        svi = SVI(model, guide, estimator="reparam", lr=1e-3, num_data=len(x))
        for epoch in range(10):
            for rows in torch.randperm(len(x)).split(100):
                loss = svi.step(x[rows], index=rows)       # a tensor: nothing is read back to the host
            for group in svi.optimizer.param_groups:      # a schedule of your own
                group["lr"] *= 0.9

    The first step (or :meth:`setup`) finds the data plate and the parameters on that batch and
    builds the loss and the optimiser; what the estimator refuses is refused then. Each step
    drives the data plate through Pyro's subsampling (its indices are ``index``, the batch's dataset
    indices; only its sites are scaled by ``num_data / B``), scales the latent sites' densities by
    ``beta`` (settable between steps: a KL warm-up of your own), checks every observed value against
    its support, and runs in a parameter store of its own (:meth:`scope`).

    .. math::

        \mathcal{L} \approx \log p(\theta) - \log q(\theta)
            + \frac{N}{|B|} \sum_{n \in B} \mathbb{E}_q\big[\log p(x_n, z_n \mid \theta) - \log q(z_n \mid x_n)\big]

    Parameters
    ----------
    model, guide : callable
        Pyro functions of the batch, as for ``fit``.
    estimator : str or Estimator
        Any of :func:`~ppl_vae.inference.estimators.get_estimator`'s.
    num_particles : int
        Samples per datapoint per step (vectorised where the code allows, else one after another).
    optimizer, lr
        As for ``fit`` (:func:`make_optimizer`): Adam(lr) by default (fused: no host reads).
    beta : float
        The KL weight (beta-VAE); :attr:`beta` may be changed between steps.
    num_data : int, optional
        The dataset's size N (default: each batch is the whole data).
    plate : str, optional
        The data plate's name (default: found by its size).
    modules : iterable of nn.Module
        Networks the model and guide reach in ways a run does not show.
    callback : callable, optional
        Called after each update with a :class:`StepInfo`.
    kl_warmup : int
        ``fit``'s KL warm-up (epochs), applied by its loop (:meth:`Objective.anneal`).
    own_store : bool
        Train in a parameter store of its own (the default), or in Pyro's store as it is where the steps run.

    References
    ----------
    Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference.
    """

    def __init__(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        *,
        estimator: str | Estimator = "reparam",
        num_particles: int = 1,
        optimizer: Any = None,
        lr: float = 1e-3,
        beta: float = 1.0,
        num_data: int | None = None,
        plate: str | None = None,
        modules: Iterable[nn.Module] = (),
        callback: Callable[[StepInfo], None] | None = None,
        kl_warmup: int = 0,
        own_store: bool = True,
        compile: bool | str = False,
    ) -> None:
        self.model, self.guide, self.estimator = model, guide, get_estimator(estimator)
        self.num_particles, self.optimizer_spec, self.lr, self.num_data = (
            num_particles,
            optimizer,
            lr,
            num_data,
        )
        self.plate_name, self.modules, self.callback, self.kl_warmup = (
            plate,
            tuple(modules),
            callback,
            kl_warmup,
        )
        self._beta = beta
        #: the parameter store this SVI trains in (None: Pyro's store as it is where the steps run)
        self.store: dict[str, Any] | None = {"params": {}, "constraints": {}} if own_store else None
        self._inside = False  # within scope(): a nested scope() keeps the store as it is
        self.objective: Objective | None = None
        self.module: Any = None  # what a step's forward runs: the objective, or a data-parallel wrapper of it (fit's Fabric)
        self.steps = 0
        #: ``True`` (inductor), a ``torch.compile`` backend's name, or False: the steps after the first run a traced, compiled graph
        self.compile = compile
        self.compiled: CompiledStep | None = None
        self._grads: tuple[torch.Tensor, ...] | None = (
            None  # a compiled step's gradients, for update
        )
        self._last: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None

    # ------------------------------------------------------------------ building

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = value
        if self.objective is not None:
            self.objective.set_beta(value)

    def scope(self) -> contextlib.AbstractContextManager[None]:
        """Pyro's parameter store as this SVI's own, inside the block (a bare ``pyro.param`` of the model lives here).

        Re-entrant: a step inside ``with svi.scope():`` (fit's loop) keeps the store it is in. Pyro's
        ``scope`` writes the store back only on leaving it, so entering it again would start from the
        state of the last exit and create afresh a parameter made since, apart from the optimiser's.
        """
        if self.store is None or self._inside:
            return _NOTHING
        return self._scope()

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        assert self.store is not None
        self._inside = True
        try:
            with pyro.get_param_store().scope(self.store):
                yield
        finally:
            self._inside = False

    def setup(self, *example: torch.Tensor, index: torch.Tensor | None = None) -> SVI:
        """Build everything from a first batch (the first :meth:`step` calls it): see :meth:`prepare`."""
        rows = Rows(example)
        with self.scope():
            self.prepare(rows, len(rows), index=index)
        return self

    def prepare(
        self, data: Rows, batch_size: int, *, index: torch.Tensor | None = None, what: str = "SVI"
    ) -> tuple[torch.Tensor, ...]:
        """Find the data plate and the parameters on the first ``batch_size`` rows of ``data``, build the loss and the optimiser.

        Everything refused is refused here, before any step: the data plate (:func:`~.plates.find_data_plate`;
        a plate that subsamples the data itself needs tensors, ``batch_size`` equal to its subsample
        size and its full size equal to the rows'), a site the estimator refuses (one loss on the batch,
        :func:`probe_loss`), particles that compare side by side in code that cannot run them at once.
        Call inside :meth:`scope`. Returns the arguments of the first batch.
        """
        n = self.num_data if self.num_data is not None else len(data)
        positions = torch.arange(min(len(data), batch_size), device="cpu")
        example = data.take(positions)
        rows = (
            positions if index is None else index.cpu()
        )  # the data plate's indices: the batch's dataset indices
        self.data_plate = _data_plate(
            self.model, self.guide, data, example, batch_size, self.plate_name, what
        )
        if self.data_plate.subsampled:
            rows = rows[: self.data_plate.subsample_size]
            example = data.args(rows, lambda t: t)
        model, guide, k = self.model, self.guide, self.num_particles
        why = (
            vectorises(
                on_data_plate(model, self.data_plate, index=rows),
                on_data_plate(guide, self.data_plate, index=rows),
                *example,
            )
            if k > 1
            else None
        )
        if why is not None:
            warnings.warn(
                f"{what}: the model or guide cannot run its {k} particles at once ({why}): they run one after another, "
                f"about {k} times the time of vectorised particles per step",
                SequentialWarning,
                stacklevel=3,
            )
        with DataRows(self.data_plate, index=rows, total=n):  # the first batch as a step sees it
            self.found = discover(model, guide, example, self.modules)
            loss_fn = self.estimator.loss(model, guide, k, vectorize=why is None)
            extra, networks = loss_fn.parameters(*example), loss_fn.networks(*example)
        # networks the estimator trains itself (NVIL's baseline) come last, so the model's and guide's keep their order
        own = {id(p) for p in self.found.params}
        self.params = list(self.found.params) + [p for p in extra if id(p) not in own]
        if not self.params:
            raise ConfigError("the model and guide use no trainable parameters")
        self.named = named_parameters(self.found, self.params)
        self.optimizer, self.clipping = make_optimizer(
            self.optimizer_spec, self.params, self.lr, [name for name, _ in self.named]
        )
        self.objective = Objective(
            loss_fn,
            [*self.found.modules, *networks],
            n,
            self._beta,
            self.kl_warmup,
            plate=self.data_plate,
        )
        self.objective.rows.index = rows
        self.module = self.objective
        probe_loss(self.objective, example)
        if self.compile:
            self._compile(example, rows)
        return example

    def _compile(self, example: tuple[torch.Tensor, ...], rows: torch.Tensor) -> None:
        """Trace and compile the step on the first batch (:class:`~.compiled.CompiledStep`): what it refuses, refused now."""
        assert self.objective is not None
        if not self.estimator.compiles:
            raise ConfigError(
                f"compile: estimator {self.estimator.name} {self.estimator.compiles_not}; train it without compile"
            )
        backend = self.compile if isinstance(self.compile, str) else "inductor"
        self.compiled = CompiledStep(self.objective, self.params, backend=backend)
        validate, self.objective.validate = (
            self.objective.validate,
            False,
        )  # the compiled steps are the unvalidated ones
        try:
            self.compiled.trace(example, rows.to(example[0].device))
        finally:
            self.objective.validate = validate

    # ------------------------------------------------------------------ stepping

    def loss(self, *batch: torch.Tensor, index: torch.Tensor | None = None) -> StepLoss:
        """The batch's loss, its data plate driven at ``index`` (default ``0..B-1``), without any update; nothing read back.

        When torch's argument validation (on for the first step) meets an invalid parameter, the same
        draws are taken again without validation, so that the step's record names the failing site.
        """
        if self.objective is None:
            self.setup(*batch, index=index)
        assert self.objective is not None
        rows = torch.arange(batch[0].shape[0], device="cpu") if index is None else index
        self.objective.support.rows = rows
        self.objective.rows.index = rows
        if (
            self.compiled is not None and not self.objective.validate
        ):  # a traced, compiled step (the first, validating one is eager)
            self._last = (tuple(batch), rows)
            with self.scope():
                loss, flags, self._grads = self.compiled(batch, rows.to(batch[0].device))
            return StepLoss(loss, flags)
        objective = self.objective

        def unvalidated() -> torch.Tensor:
            objective.validate = False
            return self.module(*batch)

        with self.scope():
            loss, invalid = retry_unvalidated(
                lambda: self.module(*batch),
                unvalidated,
                validating=is_validation_enabled() and objective.validate,
                device=batch[0].device,
            )
        ok = self.objective.support.flag(loss)
        return StepLoss(loss, torch.stack([loss.detach().to(torch.float64), ok]), invalid)

    def update(
        self,
        loss: torch.Tensor,
        *,
        backward: Callable[[torch.Tensor], None] | None = None,
        epoch: int = 0,
        elbo: float | None = None,
    ) -> None:
        """Zero the gradients, ``backward`` (default ``loss.backward()``; fit's is Fabric's), clip (a ``pyro.optim``'s clip_args), step the optimiser."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._grads is not None:  # a compiled step computed them
            for p, g in zip(self.params, self._grads):
                p.grad = g
            self._grads = None
        else:
            (backward or torch.Tensor.backward)(loss)
        if self.clipping is not None:
            self.clipping()
        self.optimizer.step()
        if self.callback is not None:
            self.callback(
                StepInfo(
                    self.steps, epoch, elbo if elbo is not None else math.nan, tuple(self.params)
                )
            )
        self.steps += 1
        self.objective.validate = False  # Pyro's and torch's argument validation: the first step's only (about 20 % per step)

    def gradients(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` after :meth:`update` set every gradient to None: the same gradients, by ``torch.autograd.grad``
        over the optimiser's parameters, each set as its ``.grad`` (None where the loss does not reach it).

        ``backward`` would store them through one accumulation node and one ``detach`` per parameter;
        fit's one-process loop passes this as :meth:`update`'s ``backward``. Where a gradient is already
        there (an optimiser whose own ``zero_grad`` keeps them), it is ``loss.backward()``, which adds to it.
        """
        wanted = [
            p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad
        ]
        if not loss.requires_grad or any(p.grad is not None for p in wanted):
            loss.backward()
            return
        for p, g in zip(wanted, torch.autograd.grad(loss, wanted, allow_unused=True)):
            p.grad = g

    def step(self, *batch: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step on ``batch`` (dataset indices ``index``); the loss, a tensor (read it when you want: ``float(loss)``)."""
        out = self.loss(*batch, index=index)
        with self.scope():
            self.update(out.loss)
        return out.loss.detach()

    def replay(self) -> None:
        """Run the last compiled step again eagerly, with the same draws, so that its record names a failing site or data row."""
        if self.compiled is None or self._last is None:
            return
        batch, rows = self._last
        self._grads = None
        with self.scope(), Noise(self.compiled.noise), torch.no_grad():
            self.objective.rows.index = rows  # type: ignore[union-attr]
            self.module(*batch)

    def elbo(self, value: float) -> float:
        """The ELBO per datapoint of a step's loss ``value`` (a number read back): without a normaliser the model applies to every site."""
        assert self.objective is not None
        return -value / self.objective.n / self.objective.record.user_scale()

    # ------------------------------------------------------------------ saving

    def state_dict(self) -> dict[str, Any]:
        """Parameters, optimiser state and the estimator's running statistics (tensors and plain containers)."""
        assert self.objective is not None
        return {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.objective.loss_fn.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`setup` on a batch like the first)."""
        assert self.objective is not None
        load_params(self.params, state["params"], "of the SVI state")
        self.optimizer.load_state_dict(state["optimizer"])
        self.objective.loss_fn.load_state_dict(state["estimator"])
        self.steps = int(state.get("steps", 0))


def _data_plate(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: Rows,
    example: tuple[torch.Tensor, ...],
    batch_size: int,
    plate: str | None,
    what: str,
) -> DataPlate:
    """The data plate of ``model`` and ``guide``; for one they subsample themselves, the checks that a step can drive it."""
    found = find_data_plate(model, guide, example, plate=plate, what=what)
    if not found.subsampled:
        return found
    where = (
        f"plate {found.name!r} subsamples the data itself (subsample_size={found.subsample_size})"
    )
    if data.tensors is None:
        raise ConfigError(
            f"{what}: {where}, so the model takes the whole data: give tensors, not a Dataset read batch by batch"
        )
    if found.subsample_size != batch_size:
        raise ConfigError(
            f"{what}: {where}; the batch size is {batch_size}: give batch_size={found.subsample_size}, "
            "so that the batches are the plate's subsamples"
        )
    size = subsampled_size(model, guide, data.tensors, found)
    if size != len(data):
        raise ConfigError(
            f"{what}: {where} over {size} rows, and the data has {len(data)}: the plate's size must be the number of rows"
        )
    data.whole = True
    return found
