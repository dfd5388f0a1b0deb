"""``fit``'s loss as a :class:`lightning.LightningModule`, for users who bring their own ``Trainer``, loggers and callbacks.

The module holds the same pieces ``fit`` trains: the networks a model and guide
use (found by running them once on an example batch), the estimator's own
networks (NVIL's baseline), and the loss of a minibatch scaled to the ``num_data``
datapoints, with the KL weight ``beta``. Lightning then owns the loop: devices,
DDP, precision, logging, checkpoints.

Example (a CSV logger; a ``TensorBoardLogger`` works the same way)::

    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset
    from ppl_vae.lightning import SVIModule

    module = SVIModule(model, guide, x[:100], num_data=len(x), estimator="score+nvil", num_particles=2)
    trainer = Trainer(max_epochs=10, accelerator="cpu", devices=2, strategy="ddp", logger=CSVLogger("logs"))
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=100, shuffle=True),
                DataLoader(TensorDataset(x_valid), batch_size=1000))

``train_elbo`` (the minibatch's ELBO per datapoint) is logged every step and
``val_elbo`` every validation epoch, in nats per datapoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from .errors import ConfigError
from .inference.batches import as_tensors
from .inference.elbo import elbo_per_datapoint
from .inference.estimators import Estimator
from .inference.plates import on_data_plate
from .inference.step import SVI

__all__ = ["SVIModule"]


class SVIModule(LightningModule):
    """The loss of a model and guide as a LightningModule (see the module docstring).

    Parameters
    ----------
    model, guide : callable
        Pyro functions ``f(*batch)`` with a ``"data"`` plate, as for ``fit``.
    example : tensor or tuple of tensors
        A batch like the training batches: the model and guide run on it once
        to find their networks (and the estimator builds its own).
    num_data : int
        Datapoints in the training set: each minibatch's loss is scaled to it.
    estimator, num_particles, beta, lr, modules
        As for ``fit`` (``lr``: Adam's learning rate).
    """

    def __init__(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        example: torch.Tensor | tuple[torch.Tensor, ...],
        *,
        num_data: int,
        estimator: str | Estimator = "reparam",
        num_particles: int = 1,
        beta: float = 1.0,
        lr: float = 1e-3,
        modules: Iterable[nn.Module] = (),
    ) -> None:
        super().__init__()
        example = as_tensors(example, "example")
        self.svi = SVI(
            model,
            guide,
            estimator=estimator,
            num_particles=num_particles,
            lr=lr,
            beta=beta,
            num_data=num_data,
            modules=modules,
            own_store=False,
        )
        self.svi.setup(
            *example
        )  # the step fit takes: the data plate, the parameters, every refusal
        plate = self.svi.data_plate
        if plate.subsampled:
            raise ConfigError(
                f"SVIModule: plate {plate.name!r} subsamples the data itself; a Trainer's DataLoader gives the batches: "
                f"write the plate over the rows given, pyro.plate({plate.name!r}, x.shape[0])"
            )
        self.model, self.guide, self.lr = (
            on_data_plate(model, plate),
            on_data_plate(guide, plate),
            lr,
        )
        self.objective = self.svi.objective
        loose = [p for p in self.svi.params if self.objective.holds_not(p)]
        if loose:
            raise ConfigError(
                f"{len(loose)} trained tensor(s) belong to no nn.Module (pyro.param sites); hold them in an nn.Module for Lightning"
            )
        self.objective.validate = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        out = self.svi.loss(
            *batch
        )  # the step's loss; Lightning does the backward pass and the optimiser's step
        self.log(
            "train_elbo",
            -out.loss.detach() / self.objective.n,
            prog_bar=True,
            batch_size=batch[0].shape[0],
        )
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        elbo = elbo_per_datapoint(self.model, self.guide, *batch, spread=self.objective.n).value
        self.log("val_elbo", elbo.mean(), batch_size=batch[0].shape[0], sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
