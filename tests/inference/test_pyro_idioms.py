"""Models and guides written as Pyro's own examples write them, against Pyro's ELBOs and SVI and against exact answers.

The idioms: ``pyro.module`` and a bare ``pyro.param``; a data plate of another name; a plate over the
whole data with ``subsample_size`` and per-datapoint parameters (and the same parameters indexed by the
plate's indices over the rows given); a global latent (the SVI tutorial's coin); indexing with a mask of
the batch's shape and a ``BatchNorm`` encoder (Pyro's CVAE); an enumerated discrete latent
(``config_enumerate``); a ``poutine.scale`` normaliser. For each: the ELBO on fixed parameters equals
Pyro's ``Trace_ELBO`` / ``TraceEnum_ELBO`` within Monte Carlo error; training reaches Pyro's SVI, or the
exact posterior; every analysis works or refuses by name after a probe (a handful of model runs); a
second fit never changes a first result.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import Z
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch import nn
from torch.distributions import constraints

from ppl_vae import FitResult, fit
from ppl_vae.errors import ConfigError, SequentialWarning
from ppl_vae.inference import decompose, evaluate_elbo, hmc_latent, importance_bounds

D, K = 4, 2


def pyro_elbo(loss: pyro.infer.ELBO, model, guide, *args, draws: int = 400) -> tuple[float, float]:
    """Pyro's ELBO estimate of the whole data (minus its loss), mean and standard error over ``draws`` independent single-draw losses."""
    values = torch.tensor(
        [-loss.loss(model, guide, *args) for _ in range(draws)], dtype=torch.float64
    )
    return float(values.mean()), float(values.std() / math.sqrt(draws))


def ours(model, guide, data, draws: int = 400, **kwargs) -> tuple[float, float]:
    """ppl-vae's ELBO of the whole data (its rows' sum), mean and standard error over ``draws`` independent single-draw evaluations.

    (Independent evaluations, not one with many particles: a global latent's draw is shared by the rows of a batch, so
    the rows' errors are correlated and their standard errors do not add in quadrature.)
    """
    values = torch.tensor(
        [float(evaluate_elbo(model, guide, data, **kwargs).value.sum()) for _ in range(draws)],
        dtype=torch.float64,
    )
    return float(values.mean()), float(values.std() / math.sqrt(draws))


def agree(a: tuple[float, float], b: tuple[float, float]) -> None:
    gap, se = a[0] - b[0], math.hypot(a[1], b[1])
    assert abs(gap) < Z * se, (a, b)


# --------------------------------------------------------------------------- pyro.module + a bare pyro.param, a plate named "batch"


def vae_with_module_and_param(seed: int = 0):
    torch.manual_seed(seed)
    dec, enc = nn.Linear(K, D), nn.Linear(D, 2 * K)

    def model(x):
        pyro.module("decoder", dec)
        scale = pyro.param("x_scale", torch.ones(()), constraint=constraints.positive)
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(dec(z), scale).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("batch", x.shape[0]):
            h = enc(x)
            pyro.sample(
                "z", dist.Normal(h[..., :K], nn.functional.softplus(h[..., K:]) + 1e-3).to_event(1)
            )

    return model, guide


X = torch.randn(48, D, generator=torch.Generator().manual_seed(11))


def test_the_elbo_of_a_module_and_param_model_with_a_batch_plate_equals_pyro_s():
    model, guide = vae_with_module_and_param()
    with pyro.get_param_store().scope():  # Pyro's own habit: the global store holds x_scale
        agree(ours(model, guide, (X,)), pyro_elbo(Trace_ELBO(), model, guide, X))


@pytest.mark.slow
def test_fit_of_a_module_and_param_model_reaches_what_pyro_s_svi_reaches():
    """The same model, steps, batch size and Adam from the same start: the final ELBOs over 4 seeds agree within their spread."""
    steps, batch = 60, 16

    def ppl_vae_run(seed: int) -> float:
        model, guide = vae_with_module_and_param(seed)
        result = fit(
            model,
            guide,
            X,
            epochs=steps * batch // len(X),
            batch_size=batch,
            lr=0.02,
            seed=seed,
            progress=False,
        )
        return float(result.elbo(X, num_particles=200, seed=0).value.sum())

    def pyro_run(seed: int) -> float:
        model, guide = vae_with_module_and_param(seed)
        torch.manual_seed(seed)

        def sub_model(
            x,
        ):  # Pyro's idiom: the whole data, a random minibatch per step, scaled by N / B
            with poutine.scale(scale=len(X) / batch):
                model(x)

        def sub_guide(x):
            with poutine.scale(scale=len(X) / batch):
                guide(x)

        with pyro.get_param_store().scope():
            svi = SVI(sub_model, sub_guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
            for _ in range(steps):
                svi.step(X[torch.randperm(len(X))[:batch]])
            return -sum(Trace_ELBO().loss(model, guide, X) for _ in range(200)) / 200

    a = torch.tensor([ppl_vae_run(s) for s in range(4)], dtype=torch.float64)
    b = torch.tensor([pyro_run(s) for s in range(4)], dtype=torch.float64)
    assert abs(a.mean() - b.mean()) < Z * math.sqrt(a.var() / 4 + b.var() / 4), (a, b)


def test_a_result_owns_its_parameters_whatever_is_fitted_or_cleared_later(tmp_path):
    model, guide = vae_with_module_and_param(0)
    first = fit(model, guide, X, epochs=3, batch_size=16, seed=0, progress=False)
    before = first.elbo(X, num_particles=20, seed=3).value
    assert "x_scale" not in pyro.get_param_store()  # Pyro's global store is as fit found it
    other_model, other_guide = vae_with_module_and_param(5)  # the same param names, other networks
    second = fit(other_model, other_guide, X * 3, epochs=3, batch_size=16, seed=1, progress=False)
    pyro.clear_param_store()
    pyro.param(
        "x_scale", torch.tensor(50.0)
    )  # the global store holds the same name, with another value
    assert torch.equal(first.elbo(X, num_particles=20, seed=3).value, before)
    assert not torch.equal(second.elbo(X, num_particles=20, seed=3).value, before)
    saved = first.save(tmp_path / "first.pt")
    loaded = FitResult.load(
        saved, *vae_with_module_and_param(0)
    )  # loads although the global store holds x_scale
    assert torch.equal(loaded.elbo(X, num_particles=20, seed=3).value, before)
    assert float(pyro.param("x_scale").detach()) == 50.0  # and leaves it alone
    pyro.clear_param_store()


def test_an_analysis_of_a_bare_param_outside_its_result_is_refused_by_name():
    model, guide = vae_with_module_and_param(0)
    result = fit(model, guide, X, epochs=1, batch_size=16, progress=False)
    with pytest.raises(
        ConfigError, match="pyro.param 'x_scale' is not in Pyro's parameter store.*result.scope"
    ):
        importance_bounds(model, guide, X[:3], num_samples=10, seed=0)
    with result.scope():
        bounds = importance_bounds(model, guide, X[:3], num_samples=10, seed=0)
    assert torch.allclose(bounds.iwae, result.iwae(X[:3], K=10).value)


# --------------------------------------------------------------------------- per-datapoint parameters: subsample_size, and the plate's indices


N, B, NOISE = 60, 20, 0.5
XS = torch.randn(N, generator=torch.Generator().manual_seed(2)) * 1.5
POST_LOC, POST_SD = (
    XS / (1 + NOISE**2),
    math.sqrt(NOISE**2 / (1 + NOISE**2)),
)  # z ~ N(0, 1), x | z ~ N(z, 0.5^2)


def local_model(subsample: bool):
    """z_n ~ N(0, 1), x_n ~ N(z_n, 0.5^2); a guide with one (loc, scale) per datapoint, indexed by the plate's indices."""

    def plate(x):
        return pyro.plate(
            "data", len(x) if subsample else x.shape[0], subsample_size=B if subsample else None
        )

    def model(x):
        with plate(x) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x[ind] if subsample else x)

    def guide(x):
        loc = pyro.param("q_loc", torch.zeros(N))
        scale = pyro.param("q_scale", torch.ones(N), constraint=constraints.positive)
        with plate(x) as ind:
            pyro.sample("z", dist.Normal(loc[ind], scale[ind]))

    return model, guide


def exact_kl(loc: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """KL(q_n || p(z | x_n)) of each datapoint's Gaussian q, in closed form: its ELBO's shortfall from log p(x_n)."""
    return torch.distributions.kl_divergence(dist.Normal(loc, sd), dist.Normal(POST_LOC, POST_SD))


@pytest.mark.slow
@pytest.mark.parametrize(
    "subsample", [True, False], ids=["subsample_size", "indices-of-the-rows-given"]
)
def test_per_datapoint_parameters_train_to_each_datapoint_s_exact_posterior_as_pyro_s_svi_does(
    subsample,
):
    """Each row meets its own parameters (the bug: another row's, a KL of several nats each). After 300 epochs the mean
    closed-form KL to the exact posteriors is what Pyro's SVI reaches on the same steps (3 seeds each, within their spread)."""
    model, guide = local_model(subsample)

    def ours_run(seed: int) -> float:
        result = fit(model, guide, XS, epochs=300, batch_size=B, lr=0.05, seed=seed, progress=False)
        with result.scope():
            return float(
                exact_kl(pyro.param("q_loc").detach(), pyro.param("q_scale").detach()).mean()
            )

    def pyro_run(seed: int) -> float:
        pyro_model, pyro_guide = local_model(True)  # Pyro's own subsampling draws the rows
        torch.manual_seed(seed)
        with pyro.get_param_store().scope():
            svi = SVI(pyro_model, pyro_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
            for _ in range(300 * N // B):
                svi.step(XS)
            return float(
                exact_kl(pyro.param("q_loc").detach(), pyro.param("q_scale").detach()).mean()
            )

    a = torch.tensor([ours_run(s) for s in range(3)], dtype=torch.float64)
    b = torch.tensor([pyro_run(s) for s in range(3)], dtype=torch.float64)
    assert abs(a.mean() - b.mean()) < Z * math.sqrt(a.var() / 3 + b.var() / 3), (a, b)
    wrong_rows = float(
        exact_kl(POST_LOC.roll(1), torch.full((N,), POST_SD)).mean()
    )  # each row with its neighbour's exact posterior
    assert a.mean() < wrong_rows / 10, (a, wrong_rows)


def test_the_elbo_of_a_self_subsampling_model_equals_pyro_s():
    model, guide = local_model(True)
    with pyro.get_param_store().scope():
        pyro.param("q_loc", POST_LOC + 0.3)
        pyro.param("q_scale", torch.full((N,), 0.7), constraint=constraints.positive)
        agree(
            ours(model, guide, (XS,), draws=300, plate="data"),
            pyro_elbo(Trace_ELBO(), model, guide, XS, draws=2000),
        )


def test_a_self_subsampling_model_is_refused_where_it_cannot_be_driven():
    model, guide = local_model(True)
    with pytest.raises(ConfigError, match="give batch_size=20"):
        fit(model, guide, XS, epochs=1, batch_size=10, progress=False)
    with pytest.raises(ConfigError, match="one process"):
        fit(
            model,
            guide,
            XS,
            epochs=1,
            batch_size=B,
            progress=False,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
        )
    result = fit(model, guide, XS, epochs=1, batch_size=B, progress=False)
    for what, call in (
        ("iwae", lambda: result.iwae(XS[:3], K=10)),
        ("posterior", lambda: result.posterior(XS[:3], num_samples=5)),
        ("sample", lambda: result.sample(3)),
    ):
        with pytest.raises(ConfigError, match=f"{what}: plate 'data' subsamples the data itself"):
            call()


# --------------------------------------------------------------------------- a global latent: the SVI tutorial's coin

FLIPS = torch.cat([torch.ones(60), torch.zeros(40)])
A0, B0 = 10.0, 10.0
EXACT = dist.Beta(A0 + FLIPS.sum(), B0 + (1 - FLIPS).sum())


def coin():
    def model(data):
        f = pyro.sample("latent_fairness", dist.Beta(A0, B0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Bernoulli(f), obs=data)

    def guide(data):
        a = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
        b = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
        pyro.sample("latent_fairness", dist.Beta(a, b))

    return model, guide


def test_a_global_latent_s_elbo_equals_pyro_s_and_its_kl_is_counted_once():
    model, guide = coin()
    with pyro.get_param_store().scope():
        agree(
            ours(model, guide, (FLIPS,), draws=1000, batch_size=30),
            pyro_elbo(Trace_ELBO(), model, guide, FLIPS, draws=2000),
        )


@pytest.mark.slow
def test_a_global_latent_trains_to_its_exact_conjugate_posterior_as_pyro_s_svi_does():
    """Minibatches of 10 of 100 flips: only the plate's sites are scaled by N / B, so q reaches Beta(70, 50), as with Pyro's SVI.

    (Scaling every site by N / B, the global Beta's KL counted ten times, pulls q to the prior: a mean near 0.5.)
    Over 3 seeds each, q's mean and sd from ``fit`` and from Pyro's ``SVI`` (Pyro's own subsampling) agree within the
    spread of the seeds; fit's mean is within its seeds' standard error of the exact mean, its sd within a fifth of
    the exact sd (a 10x KL acts as a prior ten times as strong: a mean near 0.53 and an sd near 0.03).
    """
    model, guide = coin()

    def ours_run(seed: int) -> tuple[float, float]:
        result = fit(
            model, guide, FLIPS, epochs=300, batch_size=10, lr=0.05, seed=seed, progress=False
        )
        with result.scope():
            q = dist.Beta(pyro.param("alpha_q").detach(), pyro.param("beta_q").detach())
        assert math.isfinite(result.train_elbo)
        return float(q.mean), float(q.stddev)

    def pyro_run(seed: int) -> tuple[float, float]:
        def sub_model(data):
            f = pyro.sample("latent_fairness", dist.Beta(A0, B0))
            with pyro.plate("data", len(data), subsample_size=10) as ind:
                pyro.sample("obs", dist.Bernoulli(f), obs=data[ind])

        torch.manual_seed(seed)
        with pyro.get_param_store().scope():
            svi = SVI(sub_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
            for _ in range(3000):
                svi.step(FLIPS)
            q = dist.Beta(pyro.param("alpha_q").detach(), pyro.param("beta_q").detach())
        return float(q.mean), float(q.stddev)

    a = torch.tensor([ours_run(s) for s in range(3)], dtype=torch.float64)
    b = torch.tensor([pyro_run(s) for s in range(3)], dtype=torch.float64)
    for k in range(2):  # the mean, the sd
        assert abs(a[:, k].mean() - b[:, k].mean()) < Z * math.sqrt(
            a[:, k].var() / 3 + b[:, k].var() / 3
        ), (a, b)
    # Adam's last iterate jitters about the optimum, the exact posterior: the mean over seeds is within its standard error of it
    assert abs(float(a[:, 0].mean()) - float(EXACT.mean)) < Z * float(a[:, 0].std()) / math.sqrt(
        3
    ), (a, EXACT.mean)
    assert abs(float(a[:, 1].mean()) / float(EXACT.stddev) - 1) < 0.2, (a, EXACT.stddev)


def test_the_per_datapoint_analyses_refuse_a_global_latent_by_name_after_a_probe():
    model, guide = coin()
    result = fit(model, guide, FLIPS, epochs=1, batch_size=10, progress=False)
    calls = {"n": 0}

    def counted(data):
        calls["n"] += 1
        return model(data)

    with result.scope():
        for analysis in (
            lambda: importance_bounds(counted, guide, FLIPS[:4], num_samples=10),
            lambda: decompose(counted, guide, FLIPS[:4]),
            lambda: hmc_latent(counted, FLIPS[:4], num_samples=10),
        ):
            calls["n"] = 0
            with pytest.raises(
                ConfigError, match="site 'latent_fairness' is outside the data plate 'data'"
            ):
                analysis()
            assert calls["n"] <= 2  # the probe's run, not the analysis's


# --------------------------------------------------------------------------- Pyro's CVAE: a mask of the batch's shape, and a BatchNorm encoder


def masked_cvae():
    torch.manual_seed(3)
    dec = nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, D))
    enc = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2 * K))

    def model(x):
        pyro.module("generation_net", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(K), 1.0).to_event(1))
            mask = x >= 0  # as Pyro's CVAE picks the hidden pixels with a mask of the batch's shape
            probs = torch.sigmoid(dec(z))[mask].reshape(x.shape)
            pyro.sample("x", dist.Bernoulli(probs).to_event(1), obs=x)

    def guide(x):
        pyro.module("recognition_net", enc)
        with pyro.plate("data", x.shape[0]):
            h = enc(x)
            pyro.sample(
                "z", dist.Normal(h[..., :K], nn.functional.softplus(h[..., K:]) + 1e-3).to_event(1)
            )

    return model, guide, enc


XB = (torch.rand(40, D, generator=torch.Generator().manual_seed(4)) < 0.5).float()


def test_code_that_cannot_be_vectorised_trains_and_is_analysed_one_draw_at_a_time():
    model, guide, enc = masked_cvae()
    with pytest.warns(SequentialWarning, match="cannot run its 4 particles at once.*IndexError"):
        result = fit(
            model,
            guide,
            XB,
            estimator="score",
            num_particles=4,
            epochs=2,
            batch_size=20,
            progress=False,
        )
    assert (
        not enc.training
    )  # analyses see the encoder in evaluation mode: a datapoint's q does not depend on its batch
    with pytest.warns(
        SequentialWarning, match="cannot run 30 draws at once"
    ):  # said once, when first met
        both = result.iwae(XB[:3], K=30, seed=1).value
    one = result.iwae(XB[:1], K=30, seed=1).value
    assert torch.allclose(
        one, both[:1], rtol=1e-5
    )  # per-datapoint streams and BatchNorm's running statistics: batch-free
    with result.scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SequentialWarning)
        draws = hmc_latent(
            model, XB[:2], num_samples=20, warmup_steps=20, num_chains=2
        )  # tiles the rows: no vectorised draws needed
    assert draws.samples["z"].shape[-2:] == (2, K)


def test_the_sequential_elbo_equals_pyro_s_non_vectorised_one():
    model, guide, enc = masked_cvae()
    enc.eval()
    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SequentialWarning)
        a = ours(model, guide, (XB,), draws=300)
        agree(a, pyro_elbo(Trace_ELBO(), model, guide, XB, draws=1000))


def test_an_estimator_that_compares_particles_side_by_side_refuses_code_that_cannot_run_them_so():
    model, guide, _ = masked_cvae()
    with (
        pytest.warns(SequentialWarning),
        pytest.raises(ConfigError, match="estimator iwae compares its 4 particles side by side"),
    ):
        fit(
            model,
            guide,
            XB,
            estimator="iwae",
            num_particles=4,
            epochs=1,
            batch_size=20,
            progress=False,
        )


# --------------------------------------------------------------------------- an enumerated discrete latent (config_enumerate)

LOCS = torch.tensor([-2.0, 2.0])
XM = torch.cat(
    [
        torch.randn(30, generator=torch.Generator().manual_seed(5)) - 2,
        torch.randn(30, generator=torch.Generator().manual_seed(6)) + 2,
    ]
)


def mixture():
    @config_enumerate
    def model(x):
        weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
        locs = pyro.param("locs", LOCS.clone())
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    def guide(x):
        pass

    return model, guide


def test_an_enumerated_mixture_trains_to_the_exact_log_likelihood_and_matches_traceenum():
    model, guide = mixture()
    result = fit(
        model,
        guide,
        XM,
        estimator="enum",
        epochs=60,
        batch_size=20,
        lr=0.05,
        seed=0,
        progress=False,
    )
    with result.scope():
        w, locs = pyro.param("weights").detach(), pyro.param("locs").detach()
        pyro_loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, XM)
    exact = torch.logsumexp(
        dist.Normal(locs, 1.0).log_prob(XM[:, None]) + w.log(), -1
    ).sum()  # the mixture's log p(x), summed out
    assert math.isclose(-pyro_loss, float(exact), rel_tol=1e-6)
    assert math.isclose(
        result.train_elbo * len(XM), float(exact), rel_tol=1e-5
    )  # enumeration: the ELBO is log p(x), no noise
    with pytest.raises(ConfigError, match="'c'"):
        result.iwae(XM[:2], K=10)  # a discrete latent the guide does not draw: refused by name


# --------------------------------------------------------------------------- a poutine.scale normaliser (scANVI's 1 / N)


def test_a_normaliser_leaves_the_history_and_the_final_elbo_the_same_quantity():
    model, guide = vae_with_module_and_param(1)

    def normalised(handler_of):
        def program(x):
            with poutine.scale(scale=1.0 / len(X)):
                handler_of(x)

        return program

    result = fit(
        normalised(model),
        normalised(guide),
        X,
        epochs=40,
        batch_size=48,
        lr=0.01,
        seed=0,
        progress=False,
    )
    last = result.history[-1][
        "train_elbo"
    ]  # one batch of all 48 rows: the mean of one draw's ELBO per row
    final = result.elbo(X, num_particles=200, seed=1)
    one_draw = final.se * math.sqrt(200)  # each row's single-draw standard deviation
    noise = float(one_draw.pow(2).sum().sqrt()) / len(
        X
    )  # of the history's mean over the rows; the 200-draw mean's is 14x smaller
    assert abs(last - float(final.value.mean())) < Z * math.sqrt(2) * noise, (
        last,
        float(final.value.mean()),
    )


def test_a_batch_norm_encoder_in_training_mode_is_analysed_in_evaluation_mode_and_left_as_it_was():
    model, guide, enc = masked_cvae()
    enc.train()
    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SequentialWarning)
        one = importance_bounds(model, guide, XB[:1], num_samples=20, seed=0).iwae
        three = importance_bounds(model, guide, XB[:3], num_samples=20, seed=0).iwae
    assert torch.allclose(
        one, three[:1], rtol=1e-5
    )  # the running statistics, not the batch's: a row's bound is its own
    assert enc.training  # the user's module is back in its own mode


# --------------------------------------------------------------------------- Pyro's optimisers, a per-step callback, a validation failure


def test_pyro_optimisers_without_an_lr_key_and_their_clipping_train():
    model, guide = vae_with_module_and_param(2)
    result = fit(
        model,
        guide,
        X,
        epochs=3,
        batch_size=16,
        optimizer=pyro.optim.AdagradRMSProp({"eta": 0.1}),
        progress=False,
    )
    assert (
        math.isfinite(result.train_elbo) and "lr" not in result.history[-1]
    )  # AdagradRMSProp has an eta, not an lr
    seen = []
    model, guide = vae_with_module_and_param(2)
    clipped = pyro.optim.ClippedAdam(
        {"lr": 0.01, "clip_norm": 1e-9}
    )  # gradients clipped to ~0: the parameters barely move
    result = fit(
        model,
        guide,
        X,
        epochs=2,
        batch_size=16,
        optimizer=clipped,
        progress=False,
        callback=lambda info: seen.append(info.step),
    )
    with result.scope():
        assert (
            abs(float(pyro.param("x_scale").detach()) - 1.0) < 2 * 0.01 * 6
        )  # Adam moves each by at most ~lr per step: 6 steps
    assert seen == list(range(6))
    with pytest.raises(ConfigError, match="lr_schedule needs an optimiser with a learning rate"):
        fit(
            *vae_with_module_and_param(2),
            X,
            epochs=1,
            optimizer=pyro.optim.AdagradRMSProp({"eta": 0.1}),
            lr_schedule="cosine",
            progress=False,
        )


def test_a_callback_can_project_the_parameters_after_every_step():
    model, guide = vae_with_module_and_param(3)

    def cap(info):
        for p in info.params:
            p.data.clamp_(-0.05, 0.05)

    result = fit(model, guide, X, epochs=2, batch_size=16, lr=0.1, callback=cap, progress=False)
    assert all(
        bool(p.detach().abs().max() <= torch.tensor(0.05)) for p in result.trained.found.params
    )  # (0.05 in float32)


def test_an_invalid_parameter_is_named_not_reported_as_an_overflow():
    from ppl_vae.errors import NonFiniteError
    from ppl_vae.inference import elbo_per_datapoint

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(x.new_zeros(()), 1.0), obs=x)
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), -x.new_ones(())))  # a negative scale

    with pytest.raises(
        NonFiniteError,
        match=r"guide site 'z' has its parameter scale \(Normal\) outside its constraint|guide site 'z'",
    ):
        elbo_per_datapoint(model, guide, torch.zeros(3))
