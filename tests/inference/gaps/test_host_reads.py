"""Shaped for an accelerator: q* steps and bounds chunks read nothing back to the host, and dispatch as many operations for 8 datapoints as for 64.

Counted with :class:`~ppl_vae.inference.dispatch.Dispatches` (operations dispatched, host
synchronisations), on a small Bernoulli VAE with random weights: the counts depend on the
program's shape, not on its sizes.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import frozen_ppca

from ppl_vae.distributions import Bernoulli
from ppl_vae.errors import ConfigError, DataError
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.guides.local import LocalMixture, LocalPosterior
from ppl_vae.inference.dispatch import Dispatches, host
from ppl_vae.inference.gaps import local
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.latent import latent_of
from ppl_vae.inference.random import Streams
from ppl_vae.inference.traces import analysed, plate_nesting
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

D, H, K = 20, 16, 5


def small_vae():
    torch.manual_seed(0)
    return vae(MLP(K, [H, H], D), Bernoulli(), K), amortized_guide(
        GaussianEncoder(MLP(D, [H], H), H, K)
    )


def pixels(n: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, D), 0.3), generator=torch.Generator().manual_seed(n))


def qstar_counts(n: int, family: str) -> tuple[Dispatches, Dispatches]:
    """The counts of one q* step and of one check window (its check, its judgement and its read), over ``n`` datapoints."""
    model, _ = small_vae()
    x = pixels(n)
    model, _ = analysed(model, None, (x,), "q*")
    latent = latent_of(model, x, analysis="q*")
    start = dist.Normal(torch.zeros(n, K), torch.ones(n, K)).to_event(1)
    q = LocalPosterior.initial(family, start, latent, normal=Streams(0, range(n), "cpu", 9).normal)
    nesting = plate_nesting(model, q.select(slice(0, 1)), x[:1])
    check = Streams(0, range(n), "cpu", 3)
    state = local.LocalState.initial(
        q, local.check_log_weights(model, q, (x,), range(n), check, num_samples=20, nesting=nesting)
    )
    objective = local.local_objective(
        model,
        q,
        (x,),
        Streams(0, range(n), "cpu", 2),
        num_samples=4,
        nesting=nesting,
        site="z",
        stl=family != "flow",
    )
    with pyro.validation_enabled(False):
        state = local.local_step(
            state, objective, lr=0.01
        )  # the first step builds what later ones reuse
        with Dispatches() as step:
            state = local.local_step(state, objective, lr=0.01)
        with Dispatches() as window:
            now = local.check_log_weights(
                model, q, (x,), range(n), check, num_samples=20, nesting=nesting
            )
            state, done = local.check_window(state, now, lr_decays=8, tol=0.01)
            host(torch.stack((done.long(), state.bad)))
    return step, window


@pytest.mark.parametrize("family", ["diagonal", "full", "flow"])
def test_a_qstar_step_reads_nothing_back_a_window_once_and_both_dispatch_as_much_for_8_datapoints_as_for_64(
    family,
):
    (step8, window8), (step64, window64) = qstar_counts(8, family), qstar_counts(64, family)
    assert step8.syncs == step64.syncs == 0, (dict(step8.sync_ops), dict(step64.sync_ops))
    assert window8.syncs == window64.syncs == 1, (dict(window8.sync_ops), dict(window64.sync_ops))
    assert abs(step64.ops - step8.ops) <= 0.1 * step8.ops
    assert abs(window64.ops - window8.ops) <= 0.1 * window8.ops


def test_optimize_local_reads_back_once_a_window():
    model, _ = small_vae()
    x = pixels(6)
    kw = dict(
        family="diagonal", check_every=5, tol=0.0, check_samples=10, num_samples=2, starts=2, seed=0
    )  # tol 0: few converge
    counts = []
    for windows in (2, 6):
        with Dispatches() as d:
            fit = local.optimize_local(model, x, max_steps=5 * windows, **kw)
        assert int(fit.steps.max()) == 5 * windows  # some row ran every window
        counts.append(d.syncs)
    assert counts[1] - counts[0] <= 4, counts


def test_a_non_finite_elbo_met_inside_a_window_stops_the_optimisation_naming_its_step():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample(
                "x", dist.Normal(torch.where(z.abs() < 5, z, torch.nan), 1.0), obs=x
            )  # no density beyond |z| = 5

    with pytest.raises(ConfigError, match=r"non-finite ELBO at step \d+; lower lr"):
        local.optimize_local(
            model, torch.full((3,), 100.0), lr=0.5, check_every=50, max_steps=200, starts=1, seed=0
        )


def test_an_optimisation_asked_to_compile_with_a_word_is_refused():
    model, _ = small_vae()
    with pytest.raises(ConfigError, match="compile must be True or False"):
        local.optimize_local(model, pixels(2), compile="yes")


def test_local_options_are_checked_by_name_with_the_optimisations_defaults():
    local.check_options()  # every default passes
    with pytest.raises(ConfigError, match="unknown local option 'seed'; known: family, "):
        local.check_options(seed=1)  # decompose passes its own seed: not a local option
    with pytest.raises(ConfigError, match="check-samples"):
        local.check_options(check_samples=1)
    with pytest.raises(ConfigError, match="tol must be a non-negative number"):
        local.check_options(tol=-0.5, lr=0.1)


def test_bounds_read_back_nothing_per_chunk_and_dispatch_as_much_per_chunk_for_8_datapoints_as_for_64():
    model, guide = small_vae()
    ops, syncs = {}, {}
    for n in (8, 64):
        for chunks in (2, 5):
            with Dispatches() as d:
                importance_bounds(
                    model,
                    guide,
                    pixels(n),
                    num_samples=40 * chunks,
                    sample_batch=40,
                    batch_size=n,
                    seed=0,
                )
            ops[n, chunks], syncs[n, chunks] = d.ops, d.syncs
        assert syncs[n, 5] == syncs[n, 2], syncs
    per_chunk = {n: (ops[n, 5] - ops[n, 2]) / 3 for n in (8, 64)}
    assert abs(per_chunk[64] - per_chunk[8]) <= 0.1 * per_chunk[8], per_chunk
    with Dispatches() as d:  # eight chunks of rows read back what one does
        importance_bounds(
            model, guide, pixels(64), num_samples=80, sample_batch=40, batch_size=8, seed=0
        )
    assert d.syncs == syncs[64, 2]


def test_bounds_from_a_mixture_proposal_draw_all_rows_at_once():
    model, _ = small_vae()
    ops, syncs = {}, {}
    for n in (8, 64):
        x = pixels(n)
        latent = latent_of(analysed(model, None, (x,), "bounds")[0], x, analysis="bounds")
        q = LocalPosterior("diagonal", latent, torch.zeros(n, K), torch.full((n, K), 0.5))
        mixture = LocalMixture(
            latent, [q, q.widened(2.0)], torch.tensor([[0.8, 0.2]]).log().expand(n, 2)
        )
        for chunks in (2, 5):
            with Dispatches() as d:
                importance_bounds(
                    model,
                    mixture,
                    x,
                    num_samples=40 * chunks,
                    sample_batch=40,
                    batch_size=n,
                    seed=0,
                )
            ops[n, chunks], syncs[n, chunks] = d.ops, d.syncs
        assert syncs[n, 5] == syncs[n, 2], syncs
    per_chunk = {n: (ops[n, 5] - ops[n, 2]) / 3 for n in (8, 64)}
    assert abs(per_chunk[64] - per_chunk[8]) <= 0.1 * per_chunk[8], per_chunk


def test_bounds_name_the_row_whose_observed_value_is_outside_the_support():
    model, guide = small_vae()
    x = pixels(12)
    x[7, 3] = 0.5
    with pytest.raises(DataError, match="data row 17"):
        importance_bounds(
            model, guide, x, num_samples=20, batch_size=4, seed=0, index=torch.arange(10, 22)
        )


@pytest.mark.slow
def test_adam_under_torch_compile_gives_the_eager_qstar():
    m = frozen_ppca(D=6, d=3, sigma=0.5)
    x = m.sample(4)
    kw = dict(
        family="full",
        init="prior",
        lr=0.05,
        num_samples=10,
        tol=0.05,
        max_steps=120,
        check_every=20,
        seed=3,
    )
    eager, fused = local.optimize_local(m, x, **kw), local.optimize_local(m, x, compile=True, **kw)
    assert torch.equal(eager.steps, fused.steps)
    for a, b in zip(eager.posterior.parameters(), fused.posterior.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
