"""Discrete-latent models and guides, the relaxation, enumeration, and the estimators' command line.

Training tests use 200 rows of 16 binary pixels drawn around 4 prototypes, so
a model with a few latent bits can explain them; "improves" means the mean
test ELBO rises by more than 1 nat and by more than 4 standard errors of the
difference of the two per-datapoint means.
"""

from __future__ import annotations

import csv
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.app.registry import discrete_vae
from ppl_vae.cli import main
from ppl_vae.distributions import Bernoulli, Gaussian
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.estimators import Relaxed, get_estimator
from ppl_vae.inference.svi import fit
from ppl_vae.models.discrete import GaussianMixturePrior, gmm_vae
from ppl_vae.nn import MLP, GaussianEncoder


def _binary_data(n: int = 200, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, d, generator=g) < 0.5).float()
    x = protos[torch.randint(0, 4, (n,), generator=g)]
    flip = torch.rand(n, d, generator=g) < 0.05
    return torch.where(flip, 1 - x, x)


def _elbo(model, guide, x):
    pyro.set_rng_seed(123)
    values = elbo_per_datapoint(model, guide, x).value
    return values


def _assert_improves(before: torch.Tensor, after: torch.Tensor) -> None:
    diff = after.mean() - before.mean()
    se = math.sqrt(before.var() / len(before) + after.var() / len(after))
    assert diff > max(1.0, 4 * se), (before.mean(), after.mean(), se)


@pytest.mark.parametrize(
    ("kind", "estimator", "k"),
    [
        ("bernoulli-vae", "score", 1),
        ("bernoulli-vae", "score+nvil", 1),
        ("bernoulli-vae", "relaxed", 1),
        ("categorical-vae", "score+loo", 2),
        ("categorical-vae", "relaxed:0.5", 1),
        ("bernoulli-vae", "iwae", 2),
    ],
)
def test_discrete_vae_trains(kind, estimator, k):
    x = _binary_data()
    torch.manual_seed(0)
    model, guide, _, _ = discrete_vae(
        kind, 16, 4 if kind == "bernoulli-vae" else 2, (), Bernoulli(), num_classes=4
    )
    before = _elbo(model, guide, x)
    result = fit(
        model,
        guide,
        x,
        estimator=estimator,
        num_particles=k,
        epochs=15,
        batch_size=50,
        lr=2e-2,
        progress=False,
    )
    assert result.estimator == get_estimator(estimator).name
    _assert_improves(before, _elbo(model, guide, x))


def _tiny_bernoulli():
    logits = nn.Parameter(torch.tensor([0.4, -0.8]))

    def bmodel(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3 * torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def bguide(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))
        draws.append(z)

    draws: list[torch.Tensor] = []
    return bmodel, bguide, logits, draws


def test_relaxed_samples_are_exact_and_its_value_is_the_discrete_elbo():
    bmodel, bguide, logits, draws = _tiny_bernoulli()
    x = torch.tensor([[1.3]])
    loss = Relaxed(0.5).loss(bmodel, bguide, 1)
    values = torch.stack([loss(x).detach() for _ in range(1500)])
    z = torch.cat(draws)
    assert set(z.unique().tolist()) <= {0.0, 1.0}  # hard samples (straight-through)
    # their frequencies are q's probabilities: 4 binomial standard errors
    p = torch.sigmoid(logits.detach())
    assert ((z.mean(0) - p).abs() <= 4 * torch.sqrt(p * (1 - p) / len(z))).all()
    zs = torch.tensor([[a, b] for a in (0.0, 1.0) for b in (0.0, 1.0)])
    log_q = dist.Bernoulli(logits=logits.detach()).log_prob(zs).sum(-1)
    kl = (log_q.exp() * (log_q - dist.Bernoulli(0.3 * torch.ones(2)).log_prob(zs).sum(-1))).sum()
    exact = (log_q.exp() * dist.Normal(zs.sum(-1), 1.0).log_prob(x[0, 0])).sum() - kl
    assert abs(-values.mean() - exact) <= 4 * values.std() / math.sqrt(len(values))
    loss(x).backward()  # straight-through: the guide's logits get a pathwise gradient
    assert (
        logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad != 0).all()
    )


def _gmm(enumerate: bool):
    torch.manual_seed(0)
    prior = GaussianMixturePrior(3, 2)
    decoder = MLP(2, [8], 6)
    encoder = GaussianEncoder(MLP(6, [], 8), 8, 2)
    return (
        gmm_vae(decoder, Gaussian(0.5), prior, enumerate=enumerate),
        amortized_guide(encoder),
        (prior, decoder, encoder),
    )


def test_enumeration_sums_out_the_mixture_component():
    x = torch.randn(5, 6)
    model, guide, nets = _gmm(True)
    marginal = gmm_vae(nets[1], Gaussian(0.5), nets[0], enumerate=False)
    enum = get_estimator("enum").loss(model, guide)
    enum(x)  # TraceEnum_ELBO's first call guesses max_plate_nesting by running the guide once
    pyro.set_rng_seed(1)
    enum_loss = enum(x)
    pyro.set_rng_seed(1)
    marginal_loss = get_estimator("reparam").loss(marginal, guide)(x)
    torch.testing.assert_close(enum_loss, marginal_loss)
    enum_loss.backward()
    assert nets[0].logits.grad is not None and torch.isfinite(nets[0].logits.grad).all()


def test_gmm_vae_trains_with_enumeration():
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(100, 6, generator=g) * 0.3 + 2, torch.randn(100, 6, generator=g) * 0.3 - 2]
    )
    model, guide, nets = _gmm(True)
    marginal = gmm_vae(nets[1], Gaussian(0.5), nets[0], enumerate=False)
    before = _elbo(marginal, guide, x)
    fit(model, guide, x, estimator="enum", epochs=10, batch_size=50, lr=1e-2, progress=False)
    _assert_improves(before, _elbo(marginal, guide, x))


TINY = [
    "--dataset",
    "digits",
    "--binarize",
    "threshold",
    "--limit",
    "60",
    "--batch-size",
    "30",
    "--no-progress",
]


@pytest.mark.parametrize(
    ("estimator", "fragment"),
    [
        ("nope", "unknown estimator 'nope'"),
        ("reparam+average", "applies to the score-function estimator only"),
        ("relaxed:0", "temperature must be positive"),
        ("relaxed:-2", "temperature must be positive"),
        ("score+loo", "needs --num-particles >= 2"),
        ("reparam", "bernoulli-vae has discrete latents"),
    ],
)
def test_cli_bad_estimators(tmp_path, capsys, estimator, fragment):
    out = tmp_path / "run"
    code = main(
        ["fit", "--model", "bernoulli-vae", "--estimator", estimator, *TINY, "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and fragment in err[0] and err[0].startswith("ppl-vae: error:")
    )
    assert not out.exists()
    gv = tmp_path / "gv"
    assert (
        main(
            [
                "grad-variance",
                "--run",
                str(tmp_path),
                "--estimators",
                f"score,{estimator}",
                "--out",
                str(gv),
            ]
        )
        == 2
    )
    if estimator != "reparam":  # the estimator is refused before the run is read
        assert fragment in capsys.readouterr().err
    assert not gv.exists()


def test_cli_grad_variance_on_an_nvil_run(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", "bernoulli-vae", "--latent-dim", "8", "--hidden", "", *TINY]
    assert (
        main(["fit", *common, "--estimator", "score+nvil", "--epochs", "2", "--out", str(run)]) == 0
    )
    out = tmp_path / "gv"
    args = [
        "grad-variance",
        "--run",
        str(run),
        "--estimators",
        "score,score+average,score+nvil,relaxed",
        "--repeats",
        "30",
        "--batch-size",
        "30",
        "--track-epochs",
        "0,2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "grad_variance.csv").read_text().splitlines()))
    assert {(r["epoch"], r["estimator"], r["group"]) for r in rows} == {
        (e, est, g)
        for e in ("0", "2")
        for est in ("score", "score+average", "score+nvil", "relaxed")
        for g in ("encoder", "decoder")
    }
    enc = {
        (r["epoch"], r["estimator"]): float(r["variance"]) for r in rows if r["group"] == "encoder"
    }
    assert all(enc[(e, "score+average")] < enc[(e, "score")] for e in ("0", "2"))
    assert (out / "grad_variance.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(args) == 2  # no overwrite without --force
    assert "already exists" in capsys.readouterr().err
