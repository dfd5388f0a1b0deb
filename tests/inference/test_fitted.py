"""The fitted model ``fit`` returns: save and load (safe format), prior-predictive samples, posteriors, per-datapoint bounds."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Z

from ppl_vae import FitResult, fit
from ppl_vae.errors import CheckpointError, ConfigError, RunDirectoryError
from ppl_vae.guides import amortized_guide
from ppl_vae.inference import azcompat
from ppl_vae.inference.fitted import attach
from ppl_vae.io import load_torch
from ppl_vae.models import PPCA
from ppl_vae.nn import MLP, GaussianEncoder


def bernoulli_vae(seed: int, hidden: int = 16):
    torch.manual_seed(seed)
    decoder = MLP(2, [hidden], 12)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    return model, amortized_guide(GaussianEncoder(MLP(12, [], hidden), hidden, 2))


@pytest.fixture
def data():
    torch.manual_seed(0)
    return (torch.rand(80, 12) < torch.linspace(0.1, 0.9, 12)).float()


@pytest.fixture
def fitted_ppca():
    torch.manual_seed(0)
    truth = PPCA(6, 2, sigma=0.5).double()
    x = truth.sample(200)
    ppca = PPCA(6, 2).double()
    return fit(ppca, ppca.exact_guide, x, epochs=3, batch_size=50, lr=1e-2, progress=False), ppca, x


def test_a_saved_model_loads_into_fresh_networks_with_its_record(tmp_path, data):
    model, guide = bernoulli_vae(0)
    result = fit(model, guide, data, epochs=2, batch_size=20, lr=1e-2, progress=False)
    path = result.save(tmp_path / "model.pt")
    assert isinstance(
        load_torch(path), dict
    )  # read back with weights_only=True: plain containers and tensors
    model2, guide2 = bernoulli_vae(1)  # other initial values
    before = [p.clone() for p in result.trained.found.params]
    back = FitResult.load(path, model2, guide2)
    assert back == result  # the record: history, ELBOs, options
    loaded = back.trained.found.params
    assert len(loaded) == len(before) and all(torch.equal(a, b) for a, b in zip(loaded, before))
    # the same draws through the loaded networks give the same bounds
    assert torch.equal(
        back.elbo(data, num_particles=3, seed=5).value,
        result.elbo(data, num_particles=3, seed=5).value,
    )


def test_save_and_load_refuse_what_would_lose_or_mismatch_work(tmp_path, data, monkeypatch):
    model, guide = bernoulli_vae(0)
    result = fit(model, guide, data, epochs=1, batch_size=20, progress=False)
    path = result.save(tmp_path / "model.pt")
    saved = path.read_bytes()
    with pytest.raises(RunDirectoryError, match="exists; pass force=True"):
        result.save(path)
    assert path.read_bytes() == saved
    # a file that appears after save()'s check (another process writing it) is not replaced either, and no temporary is left
    with monkeypatch.context() as patch:
        patch.setattr(type(path), "exists", lambda self: False)
        with pytest.raises(RunDirectoryError, match="exists; pass force=True"):
            result.save(path)
    assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    result.save(path, force=True)
    with pytest.raises(CheckpointError, match="does not match this model and guide"):
        FitResult.load(path, *bernoulli_vae(0, hidden=8))  # other network widths
    run_checkpoint = tmp_path / "run"
    fit(*bernoulli_vae(0), data, epochs=1, batch_size=20, progress=False, out=run_checkpoint)
    with pytest.raises(CheckpointError, match="not a saved ppl-vae model"):
        FitResult.load(run_checkpoint / "checkpoint.pt", *bernoulli_vae(0))
    by_hand = FitResult(
        history=(),
        train_elbo=0.0,
        val_elbo=None,
        epochs=0,
        steps=0,
        wall_time=0.0,
        stopped_early=False,
        best_epoch=0,
        estimator="reparam",
    )
    for use in (
        lambda: by_hand.sample(3),
        lambda: by_hand.save(tmp_path / "x.pt"),
        lambda: by_hand.elbo(data),
    ):
        with pytest.raises(ConfigError, match="holds none"):
            use()


def test_samples_are_draws_from_the_prior_predictive(fitted_ppca):
    result, ppca, x = fitted_ppca
    n = 4000
    draws = result.sample(n, seed=0)
    assert list(draws) == ["z", "x"] and draws["x"].shape == (n, 6) and draws["z"].shape == (n, 2)
    with torch.no_grad():
        cov = ppca.W @ ppca.W.T + ppca.sigma**2 * torch.eye(6, dtype=torch.float64)
        mean = ppca.mu
    # the observation is drawn, not the data it was conditioned on: its moments are p(x)'s (Monte Carlo error bounds)
    var = cov.diagonal()
    assert (draws["x"].mean(0) - mean).abs().lt(Z * (var / n).sqrt()).all()
    assert (draws["x"].var(0) - var).abs().lt(Z * var * math.sqrt(2 / (n - 1))).all()
    off = torch.cov(draws["x"].T)[0, 1]
    se_off = ((cov[0, 0] * cov[1, 1] + cov[0, 1] ** 2) / (n - 1)).sqrt()
    assert abs(off - cov[0, 1]) < Z * se_off
    # seeded: the same draws again, other draws with another seed
    assert torch.equal(result.sample(5, seed=3)["x"], result.sample(5, seed=3)["x"])
    assert not torch.equal(result.sample(5, seed=3)["x"], result.sample(5, seed=4)["x"])


def test_bernoulli_samples_are_binary_draws_not_the_zeros_they_ran_on(data):
    result = fit(*bernoulli_vae(0), data, epochs=1, batch_size=20, progress=False)
    x = result.sample(500, seed=0)["x"]
    assert set(x.unique().tolist()) == {
        0.0,
        1.0,
    }  # drawn from the Bernoulli, not the all-zero arguments
    with pytest.raises(ConfigError, match="number of samples"):
        result.sample(0)


def test_bounds_of_an_exact_guide_equal_log_px(fitted_ppca):
    result, ppca, x = fitted_ppca
    with torch.no_grad():
        exact = ppca.log_marginal(x[:20])
    elbo = result.elbo(x[:20], num_particles=4)
    assert elbo.num_draws == 4 and elbo.se is not None
    torch.testing.assert_close(
        elbo.value, exact, rtol=1e-9, atol=1e-9
    )  # an exact guide's log-weights are all log p(x)
    iwae = result.iwae(x[:20], K=50)
    assert iwae.num_draws == 50
    torch.testing.assert_close(iwae.value, exact, rtol=1e-9, atol=1e-9)
    assert result.elbo(x[:20], num_particles=1).se is None  # one draw: no standard error, not a NaN
    assert result.iwae(x[:20], K=1).se is None


def test_posterior_of_new_data_as_arviz(fitted_ppca):
    result, ppca, x = fitted_ppca
    rows = x[:3]
    vi = azcompat.posterior_dataset(result.posterior(rows, num_samples=2000, seed=1))
    z = vi["z"].values  # [chain, draw, point, dim]
    assert z.shape == (1, 2000, 3, 2)
    with torch.no_grad():
        exact = ppca.posterior(rows)
    sd = exact.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt().numpy()
    assert (
        abs(z.mean((0, 1)) - exact.mean.numpy()) < Z * sd / math.sqrt(2000)
    ).all()  # exact guide: draws of p(z|x)
    mc = result.posterior(rows, method="hmc", num_samples=200, num_chains=2, seed=0)
    zm = azcompat.posterior_dataset(mc)["z"].values
    assert zm.shape == (2, 200, 3, 2)
    mcse = azcompat.mcse(zm[:, :, 0, 0])
    assert abs(zm[:, :, 0, 0].mean() - exact.mean[0, 0].item()) < Z * float(mcse)
    with pytest.raises(ConfigError, match="'vi' or 'hmc'"):
        result.posterior(rows, method="nuts")


def test_sample_refuses_what_is_not_a_prior_predictive_draw(data):
    result = fit(*bernoulli_vae(0), data, epochs=1, batch_size=20, progress=False)
    with pytest.raises(ConfigError, match="give n=5 rows"):
        result.sample(5, data[:3])
    model, guide = result.model, result.guide

    def with_factor(x):
        model(x)
        with pyro.plate("rows", x.shape[0]):
            pyro.factor("penalty", -x.sum(-1))

    def with_global(x):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        model(x)

    for wrapped, fragment in (
        (with_factor, "'penalty' is a pyro.factor"),
        (with_global, "'shift' is outside the 'data' plate"),
    ):
        other = attach(
            result,
            wrapped,
            guide,
            [((12,), torch.float32)],
            None,
            "test",
            found=result.trained.found,
        )
        with pytest.raises(ConfigError, match=fragment):
            other.sample(4)
    with pytest.raises(ConfigError, match="num_chains are options of method='hmc'"):
        result.posterior(data[:2], num_chains=2)


def test_load_refuses_parameters_of_another_dtype(tmp_path, data):
    result = fit(*bernoulli_vae(0), data, epochs=1, batch_size=20, progress=False)
    path = result.save(tmp_path / "model.pt")
    model, guide = bernoulli_vae(1)
    torch.manual_seed(1)
    decoder64 = MLP(2, [16], 12).double()

    def model64(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample(
                "x", dist.Bernoulli(logits=decoder64(z.double()).float()).to_event(1), obs=x
            )

    with pytest.raises(CheckpointError, match="as torch.float32, the model's is torch.float64"):
        FitResult.load(path, model64, guide)


def test_a_conditional_model_samples_and_infers_given_its_input():
    """A conditional VAE (p(z | x_in) p(y | z)): ``sample`` draws from the conditional prior of the inputs given, ``posterior`` from q(z | x_in, y)."""
    from ppl_vae.models.cvae_so import mask_quadrants, so_cvae, so_cvae_guide

    torch.manual_seed(0)
    prior, recognition = (
        GaussianEncoder(MLP(16, [], 8), 8, 2),
        GaussianEncoder(MLP(16, [], 8), 8, 2),
    )
    y = (torch.rand(60, 16) < 0.4).float()
    x_in = mask_quadrants(y, 2)
    result = fit(
        so_cvae(prior, MLP(2, [8], 16)),
        so_cvae_guide(recognition),
        (x_in, y),
        epochs=1,
        batch_size=20,
        progress=False,
    )
    n = 4000
    given = x_in[:1].expand(
        n, 16
    )  # one input, n times: the draws of z are n draws of its conditional prior
    draws = result.sample(n, given, seed=0)
    assert list(draws) == ["z", "y"] and draws["y"].shape == (n, 16)
    with torch.no_grad():
        loc, scale = prior(x_in[:1])
    assert ((draws["z"].mean(0) - loc[0]).abs() < Z * scale[0] / math.sqrt(n)).all()
    assert (
        (draws["z"].std(0) / scale[0] - 1).abs() < Z * math.sqrt(1 / (2 * (n - 1)))
    ).all()  # an sd from n draws: relative SE 1/sqrt(2(n-1))
    post = azcompat.posterior_dataset(result.posterior(x_in[:3], y[:3], num_samples=2000, seed=1))[
        "z"
    ].values
    with torch.no_grad():
        q_loc, q_scale = recognition(y[:3])
    assert post.shape == (1, 2000, 3, 2)
    assert (abs(post.mean((0, 1)) - q_loc.numpy()) < Z * q_scale.numpy() / math.sqrt(2000)).all()


def test_m2_samples_its_labels_from_the_prior_and_refuses_what_it_cannot_do():
    """M2: without labels ``sample`` draws y from its uniform prior; with them the auxiliary classifier term is refused by name, as is HMC over the discrete y."""
    from ppl_vae.distributions import get_likelihood
    from ppl_vae.models.m2 import UNLABELLED, m2, m2_guide

    torch.manual_seed(0)
    C, D = 4, 12
    clf = MLP(D, [8], C)
    model = m2(MLP(2 + C, [8], D), get_likelihood("bernoulli"), clf, 2, C, alpha=1.0)
    guide = m2_guide(GaussianEncoder(MLP(D + C, [], 8), 8, 2), clf, C)
    x = (torch.rand(40, D) < 0.5).float()
    labels = torch.randint(C, (40,)).masked_fill(torch.arange(40) % 2 == 0, UNLABELLED)
    result = fit(
        model, guide, (x, labels), estimator="enum", epochs=1, batch_size=20, progress=False
    )
    n = 4000
    draws = result.sample(
        n, x.new_zeros(n, D), seed=0
    )  # the model's x only: y is then a latent drawn from p(y)
    assert list(draws) == ["z", "y", "x"]
    freq = torch.bincount(draws["y"].long(), minlength=C).double() / n
    assert ((freq - 1 / C).abs() < Z * math.sqrt((1 / C) * (1 - 1 / C) / n)).all(), (
        freq
    )  # binomial SE of each class's share
    with pytest.raises(ConfigError, match="the model takes 2 arguments"):
        result.sample(
            n
        )  # no arguments: zeros for the labels would be labels of class 0, not draws of y
    with pytest.raises(ConfigError, match="site 'y_aux' is scaled or masked"):
        result.sample(
            n, x.new_zeros(n, D), torch.zeros(n, dtype=torch.long)
        )  # labels given, so the auxiliary term runs
    with pytest.raises(ConfigError, match="'y'"):
        result.posterior(x[:2], method="hmc", num_samples=10)  # HMC cannot move a discrete latent


def test_sample_refuses_a_flat_prior_instead_of_drawing_from_its_placeholder():
    """An autoencoder's code has a flat improper prior: there is nothing to draw, so sample() says so by name."""
    from ppl_vae.distributions import get_likelihood
    from ppl_vae.guides import delta_guide
    from ppl_vae.models import autoencoder

    torch.manual_seed(0)
    enc, dec = MLP(12, [], 2), MLP(2, [], 12)
    result = fit(
        autoencoder(dec, get_likelihood("bernoulli"), 2),
        delta_guide(enc),
        (torch.rand(40, 12) < 0.5).float(),
        epochs=1,
        batch_size=20,
        progress=False,
    )
    with pytest.raises(ConfigError, match="site 'z' has a flat improper prior"):
        result.sample(5)
