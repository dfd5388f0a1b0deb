r"""``fit``: stochastic variational inference for any model and guide.

One loop, written out: minibatches scaled to the full dataset, the ELBO of
the chosen estimator, a ``torch.optim`` optimiser over the parameters the
model and guide use, validation each epoch, optional early stopping and
learning-rate schedule, atomic checkpoints and bit-for-bit resumption.

.. math::

    \mathcal{L}(x_{1:N}) \approx \frac{N}{|B|} \sum_{n \in B} \mathcal{L}_n,
    \qquad \mathcal{L}_n = \mathbb{E}_{q(z_n \mid x_n)}[\log p(x_n, z_n) - \log q(z_n \mid x_n)]

References
----------
Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .elbo import evaluate_elbo, traces
from .estimators import Estimator, get_estimator, is_latent
from .params import discover

__all__ = ["fit", "FitResult", "as_tensors", "CHECKPOINT", "HISTORY"]

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"


@dataclass(frozen=True)
class FitResult:
    """What a ``fit`` run produced. ELBOs are in nats per datapoint."""

    history: tuple[dict[str, float], ...]
    train_elbo: float
    val_elbo: float | None
    epochs: int
    steps: int
    wall_time: float
    stopped_early: bool
    best_epoch: int
    estimator: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> Any:
        """The per-epoch history as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(list(self.history))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = list(self.history)
        return out


class _ScaleLatents(Messenger):
    """Multiply the log-density of every latent (unobserved) site by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg):
            msg["scale"] = msg["scale"] * self.beta


def as_tensors(data: torch.Tensor | Sequence[torch.Tensor], what: str = "data") -> tuple[torch.Tensor, ...]:
    """Check ``data`` (a tensor or a tuple of tensors with one row per datapoint)."""
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
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{what} contains NaN or infinite values")
    return tensors


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(), "shuffle": gen.get_state()}


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    gen.set_state(state["shuffle"])


def _bad_site(model: Callable[..., object], guide: Callable[..., object], batch: tuple[torch.Tensor, ...], params: Iterable[torch.Tensor]) -> str | None:
    """Name the first site (or parameter) with a non-finite log-density (value)."""
    for i, p in enumerate(params):
        if not bool(torch.isfinite(p).all()):
            return f"parameter #{i} {tuple(p.shape)}"
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            model_tr, guide_tr = traces(model, guide, *batch)
        for tr in (guide_tr, model_tr):
            for name, site in tr.nodes.items():
                if site["type"] == "sample" and not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all()):
                    return name
    except Exception as exc:  # a NaN parameter can make a distribution refuse its arguments
        return f"(tracing failed: {str(exc).splitlines()[0][:120]})"
    return None


def _schedule(optimizer: torch.optim.Optimizer, lr_schedule: str | Callable[..., Any] | None, epochs: int) -> Any:
    if lr_schedule is None:
        return None
    if callable(lr_schedule):
        return lr_schedule(optimizer)
    if lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1 / max(epochs, 1)))
    raise ConfigError(f"unknown lr_schedule {lr_schedule!r}; choose cosine, exponential or pass a callable")


def fit(
    model: Callable[..., object],
    guide: Callable[..., object],
    data: torch.Tensor | Sequence[torch.Tensor],
    *,
    estimator: str | Estimator = "reparam",
    num_particles: int = 1,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    lr_schedule: str | Callable[[torch.optim.Optimizer], Any] | None = None,
    validation: torch.Tensor | Sequence[torch.Tensor] | None = None,
    patience: int | None = None,
    beta: float = 1.0,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    modules: Iterable[nn.Module] = (),
    eval_batch_size: int = 1000,
    validate_every_step: bool = False,
) -> FitResult:
    r"""Fit ``model`` and ``guide`` to ``data`` by maximising the ELBO.

    Parameters
    ----------
    model, guide : callable
        Pyro functions ``f(*batch)`` with a ``"data"`` plate over the rows of
        the batch. Their networks are found by running them once
        (:mod:`ppl_vae.inference.params`); pass networks they reach in other
        ways through ``modules``.
    data : tensor or tuple of tensors
        One row per datapoint; a batch is ``tuple(t[idx] for t in data)``.
    estimator : {"reparam", "score", "analytic-kl"} or Estimator
        The gradient estimator (:mod:`ppl_vae.inference.estimators`).
    num_particles : int
        Samples per datapoint per step, vectorised.
    epochs, batch_size, lr : int, int, float
        Passes over the data, minibatch size, Adam learning rate.
    optimizer : callable, optional
        ``params -> torch.optim.Optimizer``; Adam(lr) by default.
    lr_schedule : {"cosine", "exponential"} or callable, optional
        Stepped once per epoch.
    validation : tensor or tuple of tensors, optional
        Held-out data: its ELBO is computed after every epoch.
    patience : int, optional
        Stop after this many epochs without a better validation ELBO and
        restore the best parameters.
    beta : float
        Weight of the KL term (beta-VAE; Higgins et al. 2017): every latent
        site's log-density in model and guide is scaled by ``beta``. The
        reported ELBOs are always the true ELBO (beta = 1).
    seed : int
        Seeds Pyro, torch, numpy, random and the shuffling; a seeded CPU run
        is reproducible bit for bit.
    out : path, optional
        Directory for ``checkpoint.pt`` and ``history.csv``, written
        atomically after every epoch.
    resume : bool
        Continue the run checkpointed in ``out`` up to ``epochs``.
    validate_every_step : bool
        Keep Pyro's and torch's argument validation on for every step;
        by default it is on for the first step only (it costs ~20 % per step).

    Returns
    -------
    FitResult

    Raises
    ------
    TrainingDiverged
        When the loss is NaN or infinite; names the step and the site. The
        checkpoint of the last completed epoch is kept.
    """
    est = get_estimator(estimator)
    tensors = as_tensors(data)
    val = as_tensors(validation, "validation data") if validation is not None else None
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_particles", num_particles)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ConfigError(f"beta must be positive, got {beta}")
    if patience is not None and patience < 1:
        raise ConfigError(f"patience must be >= 1, got {patience}")
    if resume and out is None:
        raise ConfigError("resume needs the run directory `out`")

    n = tensors[0].shape[0]
    options = {
        "estimator": est.name, "num_particles": num_particles, "epochs": epochs, "batch_size": batch_size,
        "lr": lr, "beta": beta, "seed": seed, "patience": patience,
        "lr_schedule": lr_schedule if isinstance(lr_schedule, str) or lr_schedule is None else "custom",
    }
    pyro.set_rng_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    example = tuple(t[: min(n, batch_size)] for t in tensors)
    found = discover(model, guide, example, modules)
    loss_fn = est.loss(model, guide, num_particles)
    # networks the estimator trains itself (NVIL's baseline) come last, so the model's and guide's keep their order
    own = {id(p) for p in found.params}
    extra = loss_fn.parameters(*example) if hasattr(loss_fn, "parameters") else []
    params = list(found.params) + [p for p in extra if id(p) not in own]
    if not params:
        raise ConfigError("the model and guide use no trainable parameters")
    optim = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    sched = _schedule(optim, lr_schedule, epochs)

    scale_latents = _ScaleLatents(beta) if beta != 1.0 else None
    history: list[dict[str, float]] = []
    start_epoch, step, best, best_epoch, bad_epochs, wall = 0, 0, -math.inf, 0, 0, 0.0
    best_params: list[torch.Tensor] | None = None
    ckpt_path = Path(out) / CHECKPOINT if out is not None else None

    if resume:
        assert ckpt_path is not None
        ckpt = io.load_torch(ckpt_path)
        try:
            saved = ckpt["params"]
            if len(saved) != len(params) or any(s.shape != p.shape for s, p in zip(saved, params)):
                raise CheckpointError(f"checkpoint {ckpt_path} does not match this model and guide")
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            optim.load_state_dict(ckpt["optimizer"])
            if sched is not None and ckpt.get("scheduler") is not None:
                sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"], shuffle)
            history = list(ckpt["history"])
            start_epoch, step, best, best_epoch, bad_epochs, wall = (
                ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["best_epoch"], ckpt["bad_epochs"], ckpt["wall_time"],
            )
            best_params = ckpt.get("best_params")
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path} is corrupted or incomplete ({type(exc).__name__}: {exc})") from None

    num_batches = math.ceil(n / batch_size)
    stopped_early = False
    bar = tqdm(total=(epochs - start_epoch) * num_batches, disable=not progress, desc="fit", unit="step", leave=False)
    t0 = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            found.train(True)
            perm = torch.randperm(n, generator=shuffle)
            total, seen = 0.0, 0
            for b in range(num_batches):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                batch = tuple(t[idx] for t in tensors)
                with ExitStack() as stack:
                    stack.enter_context(poutine.scale(scale=n / len(idx)))
                    if scale_latents is not None:
                        stack.enter_context(scale_latents)
                    if step > 0 and not validate_every_step:
                        stack.enter_context(pyro.validation_enabled(False))
                    try:
                        loss = loss_fn(*batch)
                    except ValueError as exc:  # torch's argument validation meets a NaN parameter
                        if "Expected parameter" not in str(exc):
                            raise
                        loss = torch.tensor(float("nan"))
                if not bool(torch.isfinite(loss)):
                    site = _bad_site(model, guide, batch, params)
                    kept = f"; the last good checkpoint (epoch {epoch}) is kept in {out}" if out is not None and epoch > 0 else ""
                    raise TrainingDiverged(
                        f"training diverged at step {step} (epoch {epoch + 1}): loss is {loss.item()}, "
                        f"first non-finite site: {site}{kept}",
                        step=step, site=site,
                    )
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                step += 1
                total += -loss.item() / n * len(idx)
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, elbo=f"{total / seen:.2f}")
            if sched is not None:
                sched.step()
            found.train(False)
            row: dict[str, float] = {"epoch": epoch + 1, "step": step, "train_elbo": total / seen, "lr": optim.param_groups[0]["lr"]}
            if val is not None:
                row["val_elbo"] = evaluate_elbo(model, guide, val, batch_size=eval_batch_size).mean().item()
            wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            row["wall_time"] = wall
            history.append(row)
            score = row.get("val_elbo", row["train_elbo"])
            if score > best:
                best, best_epoch, bad_epochs = score, epoch + 1, 0
                if patience is not None:
                    best_params = [p.detach().clone() for p in params]
            else:
                bad_epochs += 1
            if ckpt_path is not None:
                io.save_torch(ckpt_path, {
                    "params": [p.detach().clone() for p in params], "optimizer": optim.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None, "rng": _rng_state(shuffle),
                    "history": history, "epoch": epoch + 1, "step": step, "best": best, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "wall_time": wall, "best_params": best_params, "options": options,
                })
                io.write_csv(Path(out) / HISTORY, history)  # type: ignore[arg-type]
            if patience is not None and bad_epochs >= patience:
                stopped_early = True
                break
    finally:
        bar.close()
        found.train(False)

    if stopped_early and best_params is not None:
        with torch.no_grad():
            for p, s in zip(params, best_params):
                p.copy_(s)
    train_elbo = evaluate_elbo(model, guide, tensors, batch_size=eval_batch_size).mean().item()
    val_elbo = evaluate_elbo(model, guide, val, batch_size=eval_batch_size).mean().item() if val is not None else None
    return FitResult(
        history=tuple(history), train_elbo=train_elbo, val_elbo=val_elbo, epochs=len(history), steps=step,
        wall_time=wall, stopped_early=stopped_early, best_epoch=best_epoch, estimator=est.name, options=options,
    )
