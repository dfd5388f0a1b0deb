r"""``fit``: stochastic variational inference for any model and guide.

One loop, run through Lightning Fabric (:mod:`.distributed`) on any accelerator
and any number of processes: minibatches scaled to the full dataset, the ELBO
of the chosen estimator, a ``torch.optim`` optimiser over the parameters the
model and guide use, validation each epoch, optional early stopping and
learning-rate schedule, atomic checkpoints and bit-for-bit resumption.
Read top to bottom: :func:`fit` checks the options and builds the pieces
(:func:`_setup`), Fabric starts the processes, and :func:`train` runs the
epochs of :class:`Trainer` steps in each.

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

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import (
    ConfigError,
    DataError,
    ProcessFailed,
    TrainingDiverged,
    check_int,
    check_positive,
    check_seed,
)
from .batches import Rows, as_tensors
from .checkpoints import CHECKPOINT, HISTORY, check_checkpoint, check_resume, kept, read_checkpoint
from .distributed import (
    make_fabric,
    run_processes,
)
from .estimators import Estimator, get_estimator
from .fitted import attach
from .loop import Evaluator, Run, Trainer, train
from .params import load_params
from .plates import on_data_plate
from .random import seeded
from .result import FitResult
from .schedules import SCHEDULES, lr_factor, make_schedule
from .step import SVI, Objective, StepInfo, make_optimizer
from .watch import DivergenceWatch, inspect_sites

__all__ = [
    "fit",
    "FitResult",
    "SVI",
    "StepInfo",
    "make_optimizer",
    "Objective",
    "Rows",
    "as_tensors",
    "check_checkpoint",
    "check_resume",
    "read_checkpoint",
    "lr_factor",
    "CHECKPOINT",
    "HISTORY",
    "SCHEDULES",
]


def _check_options(
    epochs: int,
    batch_size: int,
    num_particles: int,
    beta: float,
    lr: float,
    seed: int,
    patience: int | None,
    resume: bool,
    out: str | Path | None,
) -> None:
    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("num_particles", num_particles),
    ):
        check_int(value, name)
    check_positive(beta, "beta")
    check_positive(lr, "lr")
    check_seed(seed)
    if patience is not None:
        check_int(patience, "patience")
    if resume and out is None:
        raise ConfigError("resume needs the run directory `out`")


def fit(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: torch.Tensor | Sequence[torch.Tensor] | Dataset | DataLoader,
    *,
    # what is optimised
    estimator: str | Estimator = "reparam",
    num_particles: int = 1,
    beta: float = 1.0,
    kl_warmup: int = 0,
    plate: str | None = None,
    modules: Iterable[nn.Module] = (),
    # how: the loop, the optimiser, the randomness
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None = None,
    seed: int = 0,
    callback: Callable[[StepInfo], None] | None = None,
    # held-out data and early stopping
    validation: torch.Tensor | Sequence[torch.Tensor] | Dataset | DataLoader | None = None,
    patience: int | None = None,
    eval_batch_size: int = 1000,
    # what is written and shown
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    # where and how the steps run
    accelerator: str | None = None,
    devices: int | str | Sequence[int] = 1,
    strategy: str = "auto",
    precision: str | int | None = None,
    num_nodes: int = 1,
    compile: bool | str = False,
    validate_every_step: bool = False,
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
    beta : float
        Weight of the KL term (beta-VAE; Higgins et al. 2017): every latent
        site's log-density in model and guide is scaled by ``beta``. The
        reported ELBOs are always the true ELBO (beta = 1).
    kl_warmup : int
        Epochs over which the KL weight rises linearly from 0 to ``beta``, step
        by step (Sønderby et al. 2016's warm-up, which keeps the upper layers
        of a deep hierarchy from collapsing to their priors); 0: none.
    plate : str, optional
        The data plate's name; by default the plate over the rows of the
        batch (any name), or the one plate that subsamples the data itself
        (:mod:`.plates`). Its indices inside the model and guide are the
        batch's dataset indices; only the sites inside it are scaled by
        ``N / B``, so a global latent's KL is counted once. A plate written
        over the whole data with Pyro's ``subsample_size=B`` (``x[ind]``
        inside) is given the whole ``data`` each step, with the batch as its
        subsample (``batch_size`` must be ``B``; one process; tensors).
    modules : iterable of nn.Module
        Networks the model or guide reach other than by calling them (the
        ones they call are found by running them once).
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
    seed : int
        Seeds the draws of the whole run (torch's generator, forked: the
        caller's random stream is left as it was) and the shuffling; a
        seeded CPU run is reproducible bit for bit.
    callback : callable, optional
        Called after every optimisation step with a :class:`StepInfo`
        (step, epoch, the minibatch's ELBO, the parameters): to clip or
        project parameters, or log, from your own code.
    validation : tensor, tuple of tensors, Dataset or DataLoader, optional
        Held-out data: its ELBO is computed after every epoch.
    patience : int, optional
        Stop after this many epochs without a better validation ELBO and
        restore the best parameters.
    eval_batch_size : int
        Rows per batch of the ELBO of the validation data and of the final
        training ELBO (no gradients: larger than ``batch_size`` is fine).
    out : path, optional
        Directory for ``checkpoint.pt`` and ``history.csv``, written
        atomically after every epoch.
    resume : bool
        Continue the run checkpointed in ``out`` up to ``epochs`` (at least
        the epochs already done), bit for bit as if it had not stopped:
        parameters, optimiser, schedule, RNG states and the estimator's
        running statistics are restored.
    progress : bool
        A progress bar (tqdm) over the run's steps, in the first process only.
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
    compile : bool or str
        Run the steps after the first under ``torch.compile`` (``True``: inductor; or a backend's name):
        the step is traced once into a graph of (parameters, batch, indices, noise) and compiled before
        training (:mod:`.compiled`), with the eager step's draws; what cannot be traced so (a value read
        back to the host, a non-Gaussian draw, an estimator with running statistics) is refused by
        name. One process.
    validate_every_step : bool
        Keep Pyro's and torch's argument validation on for every step;
        by default it is on for the first step only (it costs ~20 % per step).
    Returns
    -------
    FitResult
        The training record (``history``, ``train_elbo``, ...) and the trained
        model: ``save``, ``sample``, ``posterior``, ``elbo``, ``iwae``
        (:mod:`.result`).

    Raises
    ------
    TrainingDiverged
        When the loss is NaN or infinite, when an ELBO estimate is impossible
        (above 0 by 50 nats under discrete observations) or jumped by four
        orders of magnitude (:class:`DivergenceWatch`), or when a validation
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
        "estimator": est.name,
        "num_particles": num_particles,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "beta": beta,
        "kl_warmup": kl_warmup,
        "seed": seed,
        "patience": patience,
        "lr_schedule": lr_schedule
        if isinstance(lr_schedule, str) or lr_schedule is None
        else "custom",
        **({"compile": compile} if compile else {}),
    }
    fabric = make_fabric(accelerator, devices, strategy, precision, num_nodes, like=tensors.like)
    if batch_size % fabric.world_size:
        raise ConfigError(
            f"batch_size {batch_size} must be a multiple of the number of processes ({fabric.world_size})"
        )
    if compile and fabric.world_size > 1:
        raise ConfigError(
            f"compile trains in one process; this run has {fabric.world_size} (data-parallel training reduces gradients "
            "in the backward pass, which a compiled step computes inside its graph)"
        )
    svi = SVI(
        model,
        guide,
        estimator=est,
        num_particles=num_particles,
        optimizer=optimizer,
        lr=lr,
        beta=beta,
        num_data=len(tensors),
        plate=plate,
        modules=modules,
        callback=callback,
        kl_warmup=kl_warmup,
        compile=compile,
    )
    with (
        svi.scope()
    ):  # the result's own parameter store: a bare pyro.param lives here, not in Pyro's global one
        with seeded(seed):
            trainer, evaluate, example = _setup(
                svi, tensors, batch_size, lr_schedule, epochs, seed, out, eval_batch_size
            )
        _refuse_processes(svi, trainer, fabric.world_size)
        if resume:  # refused before any process starts
            check_resume(
                read_checkpoint(Path(out) / CHECKPOINT),
                epochs,
                patience,
                out,
                world_size=fabric.world_size,
            )  # type: ignore[arg-type]
        run = Run(
            epochs, batch_size, patience, seed, resume, progress, validate_every_step, options
        )
        payload = _run(fabric, trainer, evaluate, tensors, val, run, out)
    result = FitResult(**{**payload["result"], "history": tuple(payload["result"]["history"])})
    return attach(
        result,
        model,
        guide,
        [(tuple(t.shape[1:]), t.dtype) for t in example],
        None,
        "fit",
        found=svi.found,
        plate=svi.data_plate,
        store=svi.store if svi.store and svi.store["params"] else None,
    )


def _refuse_processes(svi: SVI, trainer: Trainer, world_size: int) -> None:
    """What several processes cannot train: ``pyro.param`` tensors outside any module, a data plate that subsamples itself."""
    trainer.refuse_loose_params(world_size)
    plate = svi.data_plate
    if plate.subsampled and world_size > 1:
        raise ConfigError(
            f"plate {plate.name!r} subsamples the data itself (subsample_size={plate.subsample_size}), so each step "
            "takes one subsample: train it in one process, or write the plate over the rows given, pyro.plate(name, x.shape[0])"
        )


def _run(
    fabric: Any,
    trainer: Trainer,
    evaluate: Evaluator,
    tensors: Rows,
    val: Rows | None,
    run: Run,
    out: str | Path | None,
) -> dict[str, Any]:
    """The loop in Fabric's processes (:func:`~.loop.train`); rank 0's payload, its failure raised here, its parameters in the caller's networks."""
    try:
        payload, handed = run_processes(
            fabric, train, trainer, evaluate, tensors, val, run, what="training process"
        )
    except ProcessFailed as exc:  # the processes are gone: what they left is on disk
        raise ProcessFailed(f"{exc}; {kept(out)}") from None
    if "error" in payload:  # a failure every process met, composed by the process that met it first
        error = payload["error"]
        if error["kind"] == "DataError":
            raise DataError(error["message"])
        raise TrainingDiverged(error["message"], step=error["step"], site=error["site"])
    if handed:  # rank 0 ran in another process: its final values go into the caller's networks
        load_params(trainer.params, payload["params"], "of the training process")
    return payload


def _setup(
    svi: SVI,
    tensors: Rows,
    batch_size: int,
    lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None,
    epochs: int,
    seed: int,
    out: str | Path | None,
    eval_batch_size: int,
) -> tuple[Trainer, Evaluator, tuple[torch.Tensor, ...]]:
    """The step (:meth:`SVI.prepare`: every refusal, on the first batch), the schedule, the divergence watch and the evaluator."""
    example = svi.prepare(tensors, batch_size, what="fit")
    optim, plate = svi.optimizer, svi.data_plate
    if lr_schedule is not None and not all("lr" in g for g in optim.param_groups):
        raise ConfigError(
            f"lr_schedule needs an optimiser with a learning rate ('lr' in its parameter groups); {type(optim).__name__} has none"
        )
    rows = svi.objective.rows.index  # type: ignore[union-attr]
    bounded, enumerated = inspect_sites(
        on_data_plate(svi.model, plate, index=rows),
        on_data_plate(svi.guide, plate, index=rows),
        example,
    )
    trainer = Trainer(
        svi,
        make_schedule(optim, lr_schedule, epochs),
        seed,
        DivergenceWatch(bounded, svi.beta),
        out,
    )
    evaluator = Evaluator(
        svi.model, svi.guide, svi.objective.loss_fn, enumerated, eval_batch_size, plate
    )  # type: ignore[union-attr]
    return trainer, evaluator, example
