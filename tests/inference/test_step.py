"""The public step: ``SVI`` is the step ``fit`` takes, bit for bit; it and fit's loop read back to the host what they say they do."""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.utils.data import DistributedSampler

from ppl_vae import fit
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import ConfigError
from ppl_vae.guides import amortized_guide
from ppl_vae.inference import SVI, loop
from ppl_vae.inference.dispatch import Dispatches
from ppl_vae.inference.estimators import ESTIMATORS, get_estimator
from ppl_vae.inference.random import seeded
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

D, K, N = 12, 2, 60
X = (torch.rand(N, D, generator=torch.Generator().manual_seed(7)) < 0.5).float()


def build(seed: int = 0):
    torch.manual_seed(seed)
    dec, enc = MLP(K, [16], D), GaussianEncoder(MLP(D, [], 16), 16, K)
    return vae(dec, get_likelihood("bernoulli"), K), amortized_guide(enc)


def local_params(seed: int = 0):
    """A model as Pyro's examples write one: z_n ~ N(0, 1), x_n ~ N(z_n, 1), a guide of bare ``pyro.param`` tensors, one per row."""
    del seed  # nothing random to build

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("q_loc", torch.zeros(N, D))
        scale = pyro.param("q_scale", torch.ones(N, D), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]) as rows:
            pyro.sample("z", dist.Normal(loc[rows], scale[rows]).to_event(1))

    return model, guide


@pytest.mark.parametrize("make", [build, local_params], ids=["modules", "bare-pyro-param"])
def test_a_loop_of_svi_steps_is_fit_bit_for_bit(make):
    """fit's loop, written by hand over SVI.step: the same shuffling (seed, epoch), the same draws (seed), the same parameters.

    The parameters compared are the ones a user reads after each: in the run's parameter store for bare ``pyro.param``
    tensors (the bug this guards: fit's steps re-entered the store and trained fresh copies, leaving them at their start).
    """
    seed, epochs, batch = 3, 2, 20
    model, guide = make()
    result = fit(
        model, guide, X, epochs=epochs, batch_size=batch, lr=0.01, seed=seed, progress=False
    )
    with result.scope():
        fitted = [p.detach().clone() for p in result.trained.found.params]
        in_store = {
            name: pyro.param(name).detach().clone() for name in pyro.get_param_store().keys()
        }

    model, guide = make()
    svi = SVI(model, guide, lr=0.01, num_data=N)
    with seeded(seed):
        svi.setup(
            *X[:batch].split(batch), index=torch.arange(batch)
        )  # fit builds the step on its first batch, in its seeded block
        start = [p.detach().clone() for p in svi.params]
    with seeded(seed):
        for epoch in range(epochs):
            sampler = DistributedSampler(range(N), num_replicas=1, rank=0, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            for rows in torch.tensor(list(sampler)).split(batch):
                svi.step(X[rows], index=rows)
    assert all(torch.equal(a, b) for a, b in zip(svi.params, fitted))
    assert not any(
        torch.equal(a, b) for a, b in zip(svi.params, start)
    )  # both trained: not two copies of the start
    with svi.scope():
        assert all(
            torch.equal(pyro.param(name).detach(), value) for name, value in in_store.items()
        )


@pytest.mark.parametrize("estimator", ["reparam", "score+nvil"])
def test_svi_gradients_are_loss_backward_bit_for_bit(estimator):
    """fit's one-process step takes the gradients with torch.autograd.grad (SVI.gradients): the same as loss.backward()."""
    grads = []
    for use in ("backward", "gradients"):
        model, guide = build()
        svi = SVI(model, guide, estimator=estimator, num_data=N)
        with seeded(0):
            svi.setup(X[:20], index=torch.arange(20))
            svi.objective.validate = False
            loss = svi.loss(X[:20], index=torch.arange(20)).loss
        with svi.scope():
            svi.update(loss, backward=svi.gradients if use == "gradients" else None)
        grads.append([p.grad for p in svi.params])
        assert all(g is not None for g in grads[-1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_step_reads_nothing_back_and_fit_reads_one_value_per_step():
    for estimator in ("reparam", "score", "analytic-kl"):
        model, guide = build()
        svi = SVI(model, guide, estimator=estimator, num_data=N)
        svi.step(
            X[:20], index=torch.arange(20)
        )  # the first step validates its arguments (Pyro's and torch's checks read)
        with Dispatches() as counted:
            for rows in torch.arange(20, 60).split(20):
                svi.step(X[rows], index=rows)
        assert counted.syncs == 0, (estimator, counted.syncs)

    counts: list[int] = []
    real = loop.Trainer.step

    def counted_step(self, *args, **kwargs):
        with Dispatches() as c:
            out = real(self, *args, **kwargs)
        counts.append(c.syncs)
        return out

    loop.Trainer.step = counted_step
    try:
        fit(*build(), X, epochs=2, batch_size=20, progress=False)
    finally:
        loop.Trainer.step = real
    assert counts[1:] == [1] * (len(counts) - 1), (
        counts
    )  # the loss and the data check, in one read; the first step validates


def test_an_svi_state_saved_and_loaded_continues_as_if_uninterrupted():
    def steps(svi: SVI, epochs: range) -> None:
        for epoch in epochs:
            torch.manual_seed(100 + epoch)
            for rows in torch.randperm(N).split(20):
                svi.step(X[rows], index=rows)

    whole = SVI(*build(), lr=0.02, num_data=N)
    steps(whole, range(4))
    first = SVI(*build(), lr=0.02, num_data=N)
    steps(first, range(2))
    saved = first.state_dict()
    second = SVI(*build(seed=9), lr=0.02, num_data=N).setup(
        X[:20]
    )  # other initial values, overwritten by the state
    second.load_state_dict(saved)
    second.objective.validate = (
        False  # the first step was taken: validation is off after it, as in the uninterrupted run
    )
    steps(second, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(second.params, whole.params))


def test_svi_refuses_on_its_first_batch_what_it_cannot_train():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[0], D]).to_event(1), obs=x)

    def guide(x):
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(p))

    svi = SVI(model, guide, estimator="reparam", num_data=N)
    with pytest.raises(
        Exception, match="'z'"
    ):  # no pathwise sampler for a Bernoulli: named, on the first batch
        svi.step(X[:20])
    assert "p" not in pyro.get_param_store()  # the step's own store
    with pytest.raises(ConfigError, match="give batch_size=10"):

        def sub_model(x):
            with pyro.plate("data", len(x), subsample_size=10) as ind:
                pyro.sample("x", dist.Normal(0.0, 1.0).expand([10, D]).to_event(1), obs=x[ind])

        SVI(sub_model, lambda x: None, num_data=N).prepare(loop.Rows(X), 20)


# --------------------------------------------------------------------------- the compiled step


def test_a_traced_step_gives_the_eager_step_s_loss_and_gradients_for_the_same_draws():
    """The graph of (parameters, batch, indices, noise) replayed (backend "eager": the trace alone) against the eager step."""
    from ppl_vae.inference.compiled import CompiledStep

    model, guide = build()
    svi = SVI(model, guide, num_data=N).setup(X[:20])
    svi.objective.validate = False
    compiled = CompiledStep(svi.objective, svi.params, backend="eager")
    rows = torch.arange(20, 40)
    torch.manual_seed(5)
    loss, flags, grads = compiled((X[rows],), rows)
    torch.manual_seed(5)  # the same draws, from torch's generator in the same order
    svi.objective.rows.index = rows
    eager = svi.objective(X[rows])
    eager_grads = torch.autograd.grad(eager, svi.params)
    assert torch.allclose(loss, eager.detach(), rtol=1e-6) and float(flags[1]) == 1.0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, eager_grads))


def test_fit_with_a_traced_step_takes_the_eager_steps_and_refuses_what_it_cannot_trace():
    model, guide = build()
    eager = fit(model, guide, X, epochs=2, batch_size=20, seed=1, progress=False)
    model, guide = build()
    traced = fit(model, guide, X, epochs=2, batch_size=20, seed=1, progress=False, compile="eager")
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(traced.trained.found.params, eager.trained.found.params)
    )
    with pytest.raises(
        ConfigError, match="compile: estimator score\\+average keeps its moving-average baseline"
    ):
        fit(
            *build(),
            X,
            epochs=1,
            batch_size=20,
            estimator="score+average",
            progress=False,
            compile="eager",
        )

    def branching(x):  # a branch on the data: a value read back to the host
        scale = 1.0 if float(x.mean()) > 0.5 else 2.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.zeros(D), scale).to_event(1), obs=x)

    def empty(x):
        with pyro.plate("data", x.shape[0]):
            pass

    with pytest.raises(
        ConfigError, match="compile: the step reads a value back to the host at test_step.py"
    ):
        fit(
            branching,
            empty,
            X,
            epochs=1,
            batch_size=20,
            progress=False,
            compile="eager",
            modules=[torch.nn.Linear(1, 1)],
        )


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_either_traces_to_its_eager_steps_or_refuses_by_name(name):
    """Each estimator, on the Gaussian VAE: a traced run takes the eager run's steps, or compile is refused with the estimator's reason.

    (The score-function estimator draws with ``torch.normal(loc, scale)``: its noise is fed to the graph as standard draws.)
    """
    estimator, particles = get_estimator(name), 2 if name in ("iwae", "score+loo") else 1
    options = dict(
        epochs=2, batch_size=20, seed=1, progress=False, estimator=name, num_particles=particles
    )
    if not estimator.compiles:
        with pytest.raises(
            ConfigError,
            match=f"compile: estimator {re.escape(name)} {re.escape(estimator.compiles_not)}",
        ):
            fit(*build(), X, compile="eager", **options)
        return
    eager = fit(*build(), X, **options)
    traced = fit(*build(), X, compile="eager", **options)
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(traced.trained.found.params, eager.trained.found.params)
    )
    start = SVI(*build(), num_data=N).setup(X[:20]).params
    assert not any(
        torch.equal(a, b) for a, b in zip(traced.trained.found.params, start)
    )  # trained, not two copies of the start


@pytest.mark.slow
def test_fit_compiled_by_inductor_takes_the_eager_steps_to_float_tolerance():
    model, guide = build()
    eager = fit(model, guide, X, epochs=2, batch_size=20, seed=1, progress=False)
    model, guide = build()
    compiled = fit(model, guide, X, epochs=2, batch_size=20, seed=1, progress=False, compile=True)
    assert all(
        torch.allclose(a, b, rtol=1e-3, atol=1e-5)
        for a, b in zip(compiled.trained.found.params, eager.trained.found.params)
    )


def test_a_compiled_run_resumes_bit_for_bit(tmp_path):
    whole = fit(*build(), X, epochs=3, batch_size=20, seed=2, progress=False, compile="eager")
    fit(
        *build(),
        X,
        epochs=1,
        batch_size=20,
        seed=2,
        progress=False,
        compile="eager",
        out=tmp_path / "run",
    )
    resumed = fit(
        *build(),
        X,
        epochs=3,
        batch_size=20,
        seed=2,
        progress=False,
        compile="eager",
        out=tmp_path / "run",
        resume=True,
    )
    assert all(
        torch.equal(a, b) for a, b in zip(resumed.trained.found.params, whole.trained.found.params)
    )
