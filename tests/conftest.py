"""Shared by the tests: seeding and the param-store check before and after every test, fixtures, and helpers.

Helpers (import them with ``from conftest import ...``; no test module imports another):

* statistics: ``Z`` (standard errors at which a check fails by chance with probability < 1e-4),
  ``se_of_mean``, ``log_mean_exp_bias``;
* exact answers: ``frozen_ppca`` (a float64 PPCA with frozen parameters; ``rowwise=True``: its mean
  computed row by row, ``RowwisePPCA``), ``inflated_guide``;
* library-built models the tests share: ``two_level_vae`` (the hierarchical VAE ``ppl-vae fit --model hvae`` builds);
* a conjugate scalar model with closed-form gradients: ``X``, ``model``, ``Guide``,
  ``exact_loss_grad``, ``grad_draws``;
* the command line: ``TINY`` and ``BINARY`` option lists (a 60-row digits run of two epochs);
* files: ``write_fake_mnist`` (small MNIST IDX and binarised-MNIST files of noisy prototypes);
* what a command did: ``snapshot`` (a folder's files) and ``one_line`` (its one line on stderr).

This file imports nothing of the application layer (the app and its command line): only the tests of ``tests/app``
use it, and their fixtures that run it (``finished``, ``run_copy``) live in ``tests/app/conftest.py``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.distributions import get_likelihood
from ppl_vae.inference.estimators import get_estimator
from ppl_vae.models.hierarchical import hierarchical_guide, hierarchical_vae
from ppl_vae.models.ppca import PPCA
from ppl_vae.nn import MLP, GaussianEncoder

# the posteriordb reference posteriors the tests use ship with the tests (tests/fixtures/posteriordb)
os.environ.setdefault(
    "PPL_VAE_POSTERIORDB", str(Path(__file__).parent / "fixtures" / "posteriordb")
)


def pytest_configure(config: pytest.Config) -> None:
    # toy settings in many tests (K < 25 draws, a few q* steps) rightly flag their numbers as unreliable;
    # warnings stay errors otherwise (pyproject.toml), and the tests of the flags catch them with pytest.warns
    config.addinivalue_line("filterwarnings", "ignore::ppl_vae.errors.ReliabilityWarning")


Z = 4.0


def se_of_mean(se: torch.Tensor) -> float:
    return (se.pow(2).sum().sqrt() / len(se)).item()


def log_mean_exp_bias(se: torch.Tensor) -> float:
    """The delta-method bias of a log-mean-exp estimate, averaged over datapoints: mean(SE^2) / 2."""
    return (se.pow(2).mean() / 2).item()


class RowwisePPCA(PPCA):
    """The same PPCA, its mean ``W z + mu`` computed by elementwise products and a sum instead of one BLAS matmul.

    A matmul need not round a row the same way whatever the number of rows: MKL's dgemm picks its kernel
    by the matrix sizes, and on an AVX-512 CPU rounds a row of ``z @ W.T`` (6 x 2) without an FMA among at
    most 5 rows and with one among more. The chains of AIS or HMC are chaotic and grow that last-bit
    difference to ~1e-8 in a few hundred leapfrog steps, so a datapoint run alone (a few rows: its chains)
    ends where it would not in its batch. With this mean each row is rounded alike in any batch, and a
    test of per-datapoint invariance checks the samplers' own arithmetic bit for bit.
    """

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            loc = (z.unsqueeze(-2) * self.W).sum(-1) + self.mu
            pyro.sample("x", dist.Normal(loc, self.sigma.expand_as(loc)).to_event(1), obs=x)


def frozen_ppca(
    D: int = 6, d: int = 2, sigma: float = 0.7, seed: int = 0, rowwise: bool = False
) -> PPCA:
    torch.manual_seed(seed)
    m = (RowwisePPCA if rowwise else PPCA)(D, d, sigma=sigma).double()
    with torch.no_grad():
        m.mu.normal_()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def inflated_guide(m: PPCA, factor: float = 1.6):
    """A diagonal guide with the exact marginal means and sds inflated by ``factor``: a loose proposal."""

    def guide(x: torch.Tensor) -> None:
        post = m.posterior(x)
        sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(post.mean, factor * sd).to_event(1))

    return guide


def two_level_vae(
    data_dim: int = 6, hidden: int = 8, latent_dim: int = 2, likelihood: str = "bernoulli"
):
    """``(model, guide)`` of a two-site hierarchical VAE, ``z2 -> z1 (2 latent_dim) -> x``, with guide ``q(z1 | x) q(z2 | z1)``:
    the networks ``ppl-vae fit --model hvae --hidden {hidden} --latent-dim {latent_dim}`` builds, made with the library."""
    lik, d1 = get_likelihood(likelihood, dim=data_dim), 2 * latent_dim
    enc1 = GaussianEncoder(MLP(data_dim, [], hidden), hidden, d1)
    enc2 = GaussianEncoder(MLP(d1, [], hidden), hidden, latent_dim)
    dec1 = MLP(d1, [hidden], data_dim)
    dec2 = GaussianEncoder(MLP(latent_dim, [], hidden), hidden, d1)
    return hierarchical_vae(dec1, dec2, lik, latent_dim), hierarchical_guide(enc1, enc2)


X = torch.tensor([[0.7]])


def model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


class Guide(nn.Module):
    def __init__(self, m: float = 0.3, log_s: float = math.log(0.8)) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.tensor([m]))
        self.log_s = nn.Parameter(torch.tensor([log_s]))
        self.draws: list[torch.Tensor] = []

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            # to_event inside a plate: the case has_rsample_(False) cannot handle
            z = pyro.sample("z", dist.Normal(self.m, self.log_s.exp()).to_event(1))
        self.draws.append(z.detach())


def exact_loss_grad(guide: Guide) -> torch.Tensor:
    x, m, s = X.item(), guide.m.item(), guide.log_s.exp().item()
    return -torch.tensor([x - 2 * m, 1 - 2 * s * s])


def grad_draws(estimator, guide: Guide, n: int, num_particles: int = 1) -> torch.Tensor:
    loss = get_estimator(estimator).loss(model, guide, num_particles)
    out = []
    for _ in range(n):
        guide.m.grad = guide.log_s.grad = None
        loss(X).backward()
        out.append(torch.cat([guide.m.grad, guide.log_s.grad]))
    return torch.stack(out)


TINY = [
    "--dataset",
    "digits",
    "--limit",
    "60",
    "--hidden",
    "16",
    "--latent-dim",
    "2",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--no-progress",
]
BINARY = [*TINY, "--binarize", "threshold"]


@pytest.fixture(autouse=True)
def _seed_and_check_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    leaked = list(pyro.get_param_store().keys())
    pyro.clear_param_store()
    assert not leaked, f"test leaked parameters into Pyro's global param store: {leaked}"


@pytest.fixture
def binarized_mnist():
    """``make(root)``: write tiny binarized-MNIST ``.amat`` files (4 random rows per split) under ``root``; returns ``root``."""

    def make(root: Path) -> Path:
        rng = np.random.default_rng(0)
        folder = root / "binarized_mnist"
        folder.mkdir(parents=True)
        for split in ("train", "valid", "test"):
            rows = rng.integers(0, 2, size=(4, 784))
            (folder / f"binarized_mnist_{split}.amat").write_text(
                "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
            )
        return root

    return make


@pytest.fixture
def empty_data_home(tmp_path, monkeypatch):
    """Point the default data folder (``$PPL_VAE_DATA``) at an empty temporary folder; no debug tracebacks."""
    data = tmp_path / "data-home"
    data.mkdir()
    monkeypatch.setenv("PPL_VAE_DATA", str(data))
    monkeypatch.delenv("PPL_VAE_DEBUG", raising=False)
    return data


def write_fake_mnist(root, n_classes=10, per_class=6, seed=0):
    """Fake MNIST files under ``root``: grey test IDX images of ``n_classes`` noisy prototypes with their labels, their
    Bernoulli binarisation as the binarised test set (sorted by class, as the real file) and 200 binarised training rows.
    Returns the number of test images."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    prototypes = rng.random((n_classes, 784)) ** 3
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.uint8)
    rng.shuffle(labels)  # MNIST's order: not sorted by class
    grey = np.clip(prototypes[labels] + 0.05 * rng.standard_normal((len(labels), 784)), 0, 1)
    raw = root / "mnist" / "raw"
    raw.mkdir(parents=True)
    images = np.round(grey * 255).astype(np.uint8).reshape(-1, 28, 28)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">iiii", 0x803, *images.shape) + images.tobytes())
    )
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">ii", 0x801, len(labels)) + labels.tobytes())
    )
    binarised = (rng.random(grey.shape) < images.reshape(len(labels), 784) / 255).astype(np.uint8)[
        np.argsort(labels, kind="stable")
    ]
    folder = root / "binarized_mnist"
    folder.mkdir()
    savemat(
        folder / "binarized_mnist_test.mat", {"X": binarised}
    )  # sorted by class, as the real file
    train = (rng.random((200, 784)) < prototypes[rng.integers(0, n_classes, 200)]).astype(np.uint8)
    savemat(folder / "binarized_mnist_train.mat", {"X": train})
    return len(labels)


# --------------------------------------------------------------------------- command-line helpers (tests/app)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (its lock file aside), by relative path, with its bytes: what "nothing changed" compares."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".ppl-vae.lock"
    }


def one_line(capsys, *fragments: str, prefix: str = "ppl-vae: error: ") -> str:
    """The one line a command wrote on stderr (no traceback anywhere), starting with ``prefix`` and holding every fragment."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(prefix) and len(lines[0]) > len(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
