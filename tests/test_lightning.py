"""``ppl_vae.lightning.SVIModule``: fit's loss under a user's own Lightning ``Trainer`` and logger."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import Z
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.lightning import SVIModule
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

# Lightning's advice for real workloads, not failures (few dataloader workers, a small logging interval), and a
# deprecation inside Lightning's own use of torch's pytree
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*GPU available but not used.*",
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning",
)


def test_a_users_trainer_and_csv_logger_train_the_model(tmp_path):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((200, 6), 0.3), generator=torch.Generator().manual_seed(1))
    x[:, :3] = x[:, 3:]  # structure the VAE can learn
    dec, enc = MLP(2, [16], 6), GaussianEncoder(MLP(6, [], 16), 16, 2)
    model, guide = vae(dec, get_likelihood("bernoulli"), 2), amortized_guide(enc)

    def score() -> torch.Tensor:
        with torch.no_grad():
            return elbo_per_datapoint(model, guide, x, num_particles=50).value

    before = score()
    module = SVIModule(
        model, guide, x[:20], num_data=len(x), estimator="score+nvil", num_particles=2, lr=1e-2
    )
    trainer = Trainer(
        max_epochs=15,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(
        module,
        DataLoader(TensorDataset(x), batch_size=20, shuffle=True),
        DataLoader(TensorDataset(x), batch_size=100),
    )
    after = score()
    gain = after - before  # paired per datapoint
    assert gain.mean().item() > Z * gain.std().item() / math.sqrt(len(gain)), gain.mean().item()
    with open(next(tmp_path.rglob("metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    train = [float(r["train_elbo"]) for r in rows if r.get("train_elbo")]
    val = [float(r["val_elbo"]) for r in rows if r.get("val_elbo")]
    assert (
        len(train) == 15 * 10 and len(val) == 15
    )  # every step and every validation epoch was logged
    # the last logged validation ELBO (one draw per datapoint, the final parameters) is the model's ELBO up to its
    # Monte Carlo error, whose size a fresh one-draw estimate shows
    with torch.no_grad():
        one = elbo_per_datapoint(model, guide, x).value
    mc_se = (one - after).std().item() / math.sqrt(len(x))
    assert abs(val[-1] - after.mean().item()) < Z * mc_se, (val[-1], after.mean().item(), mc_se)
    # the NVIL baseline's network is trained with the model (it is part of the module)
    assert any("networks" in name for name, _ in module.named_parameters())
