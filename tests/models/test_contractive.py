"""Contractive autoencoder: the Jacobian penalty, exact and by Hutchinson's estimator, and what training with it does.

The exact penalty is checked against ``torch.func``'s per-datapoint Jacobians (value and gradient, float64); the
Hutchinson estimate against the exact value within ``Z`` standard errors of its own draws (``Z = 4``: a chance failure
has probability below 1e-4). Training runs on the embedded 8x8 digits.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import Z
from torch import nn

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.guides.amortized import delta_guide
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.mcmc.vi import vi_draws_amortized
from ppl_vae.models.autoencoders import contractive_autoencoder, jacobian_norm
from ppl_vae.nn import MLP


def small_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 9), nn.Softplus(), nn.Linear(9, 3)
    ).double()


def reference(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every datapoint's full Jacobian ``[N, d, D]`` from torch.func, squared and summed."""
    params = dict(encoder.named_parameters())

    def one(p, row):
        return torch.func.functional_call(encoder, p, (row,))

    jac = torch.func.vmap(torch.func.jacrev(one, argnums=1), in_dims=(None, 0))(params, x)
    return jac.pow(2).sum((-2, -1))


def test_exact_penalty_and_its_gradient_equal_the_autograd_jacobians():
    enc = small_encoder()
    x = torch.randn(7, 6, dtype=torch.float64)
    got, want = jacobian_norm(enc, x), reference(enc, x)
    assert torch.allclose(got, want, rtol=1e-12, atol=0), (got, want)
    params = list(enc.parameters())
    grads = torch.autograd.grad(
        got.sum(), params, allow_unused=True
    )  # the last bias does not move the Jacobian
    ref_grads = torch.autograd.grad(want.sum(), params, allow_unused=True)
    assert sum(g is not None for g in grads) == len(params) - 1
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None) and (
            g is None or torch.allclose(g, r, rtol=1e-10, atol=1e-14)
        )
    # Rifai et al.'s closed form for one sigmoid layer h = s(Wx + b): sum_j (h_j (1 - h_j))^2 ||W_j||^2
    layer = nn.Linear(6, 4).double()
    sig = nn.Sequential(layer, nn.Sigmoid())
    h = sig(x)
    closed = ((h * (1 - h)) ** 2 * layer.weight.pow(2).sum(1)).sum(1)
    assert torch.allclose(jacobian_norm(sig, x), closed, rtol=1e-12)
    with torch.no_grad():  # evaluation: the same numbers, no graph kept
        assert not jacobian_norm(enc, x).requires_grad


def test_hutchinson_estimate_is_unbiased():
    enc = small_encoder(1)
    x = torch.randn(5, 6, dtype=torch.float64)
    exact = jacobian_norm(enc, x).detach()
    torch.manual_seed(0)
    P = 400
    draws = torch.stack(
        [jacobian_norm(enc, x, method="hutchinson").detach() for _ in range(P)]
    )  # one probe each
    se = draws.std(0) / math.sqrt(P)
    assert ((draws.mean(0) - exact).abs() < Z * se).all(), (draws.mean(0), exact, se)
    assert (draws.std(0) > 0).all()  # a real estimate, not the exact value in disguise
    averaged = jacobian_norm(enc, x, method="hutchinson", probes=P).detach()
    assert ((averaged - exact).abs() < Z * draws.std(0) / math.sqrt(P)).all()
    with pytest.raises(ConfigError, match="unknown Jacobian method"):
        jacobian_norm(enc, x, method="forward")
    with pytest.raises(ConfigError, match="Hutchinson probes"):
        jacobian_norm(enc, x, method="hutchinson", probes=0)


@pytest.mark.slow
def test_a_trained_cae_contracts_more_than_a_plain_autoencoder_at_nearly_the_same_reconstruction():
    """Same networks, seed and budget; weight 0.01. "Nearly the same": the test images' mean reconstruction
    log-likelihood within 1 nat of the plain autoencoder's (of about 9 nats per 64-pixel image), while the mean squared
    Jacobian norm falls at least threefold."""
    train = load("digits", binarize="threshold").x
    test = load("digits", split="test", binarize="threshold").x
    lik = get_likelihood("bernoulli")
    example = _example("contractive")  # the numbers docs/models.md quotes come from this script
    out = {}
    for weight, (enc, dec) in example.train_pair(train, weight=0.01).items():
        with torch.no_grad():
            rec = lik(dec(enc(test))).log_prob(test)
        out[weight] = (jacobian_norm(enc, test).detach(), rec)
    (j_ae, rec_ae), (j_cae, rec_cae) = out[0.0], out[0.01]
    assert j_cae.mean() < j_ae.mean() / 3, (j_cae.mean(), j_ae.mean())
    assert (j_cae.mean() + Z * j_cae.std() / math.sqrt(len(j_cae))) < (
        j_ae.mean() - Z * j_ae.std() / math.sqrt(len(j_ae))
    )
    diff = rec_ae - rec_cae  # paired over the test images
    assert diff.mean() < 1.0 + Z * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analyses_of_the_guide_refuse_its_point_mass_by_name():
    torch.manual_seed(0)
    enc, dec = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), MLP(2, [4], 8)
    model, guide = (
        contractive_autoencoder(dec, get_likelihood("bernoulli"), enc, 2, weight=0.1),
        delta_guide(enc),
    )
    x = (torch.rand(6, 8) < 0.5).float()
    with pytest.raises(ConfigError, match="'z'"):
        decompose(model, guide, x)
    with pytest.raises(ConfigError, match="'z'"):
        vi_draws_amortized(model, guide, x, num_samples=5)
