"""``fit`` and the per-datapoint analyses on several processes (Lightning Fabric, DDP over gloo, forked CPU processes) against one process.

With ``W`` processes at global batch ``B`` each process takes every ``W``-th row of the epoch's
permutation at batch ``B / W``, so a step covers the same rows as one process at batch ``B``, and
DDP's mean of the processes' gradients of ``(N / (B / W)) * sum`` equals the one-process gradient
of ``(N / B) * sum``. Where the loss is deterministic (an autoencoder with a point-mass guide)
the parameters after the same steps must therefore agree to float64 round-off.

An analysis spread over processes gives each a block of the datapoints; every draw of a datapoint
comes from its own stream (seed, dataset index), so its row of the table is the one-process row
up to the float rounding of batched arithmetic over other batch sizes (float64 here: 1e-9).
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from conftest import Z, frozen_ppca, inflated_guide

from ppl_vae import io
from ppl_vae.distributions import get_likelihood
from ppl_vae.errors import CheckpointError, ConfigError, DataError
from ppl_vae.guides.amortized import amortized_guide, delta_guide
from ppl_vae.inference.distributed import Checked, Spread, spread_over_rows
from ppl_vae.inference.elbo import elbo_per_datapoint
from ppl_vae.inference.gaps.ais import ais
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.decompose import decompose
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.random import dataset_index
from ppl_vae.inference.svi import fit
from ppl_vae.models.vae import autoencoder, vae
from ppl_vae.nn import MLP, GaussianEncoder

TWO = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork"}


def data(rows: int = 60) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((rows, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(3)
    )


def ae():
    torch.manual_seed(0)
    dec, enc = MLP(2, [8], 6).double(), MLP(6, [8], 2).double()
    return autoencoder(dec, get_likelihood("bernoulli"), 2), delta_guide(enc), [dec, enc]


def small_vae():
    torch.manual_seed(0)
    dec, enc = MLP(2, [16], 6).double(), GaussianEncoder(MLP(6, [], 16), 16, 2).double()
    return vae(dec, get_likelihood("bernoulli"), 2), amortized_guide(enc), [dec, enc]


def params(nets) -> list[torch.Tensor]:
    return [p.detach().clone() for n in nets for p in n.parameters()]


def test_two_processes_take_the_same_steps_as_one_on_a_deterministic_loss():
    x = data()
    runs = {}
    for name, options in (("one", {}), ("two", TWO)):
        model, guide, nets = ae()
        result = fit(
            model, guide, x, epochs=2, batch_size=20, lr=1e-2, progress=False, seed=4, **options
        )
        runs[name] = (params(nets), result)
    (one, r1), (two, r2) = runs["one"], runs["two"]
    assert r1.steps == r2.steps == 6
    assert [a.shape for a in one] == [b.shape for b in two]
    moved = max((a - b).abs().max().item() for a, b in zip(one, params(ae()[2])))
    assert (
        moved > 1e-3
    )  # training changed the parameters (so agreeing is not agreeing at the start)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert r2.train_elbo == pytest.approx(
        r1.train_elbo, rel=1e-9
    )  # the evaluation is sharded and summed, deterministically


def test_a_vae_trained_on_two_processes_reaches_the_same_elbo_within_its_monte_carlo_error():
    x = data(120)
    scores = []
    for options in ({}, TWO):
        model, guide, _ = small_vae()
        fit(model, guide, x, epochs=20, batch_size=20, lr=1e-2, progress=False, seed=4, **options)
        with torch.no_grad():
            elbo = elbo_per_datapoint(model, guide, x, num_particles=200).value
        scores.append(elbo)
    # two fits differ by their draws (each process has its own stream); their per-point ELBOs are paired
    diff = scores[0] - scores[1]
    se = diff.std().item() / math.sqrt(len(diff))
    assert abs(diff.mean().item()) < Z * se + 0.05 * abs(scores[0].mean().item()) / math.sqrt(
        len(diff)
    ), (diff.mean().item(), se)


def test_two_process_resume_continues_as_an_uninterrupted_two_process_run(tmp_path):
    x = data()
    model, guide, nets = ae()
    fit(
        model,
        guide,
        x,
        epochs=4,
        batch_size=20,
        lr=1e-2,
        progress=False,
        out=tmp_path / "straight",
        **TWO,
    )
    straight = params(nets)
    model, guide, nets = ae()
    fit(
        model,
        guide,
        x,
        epochs=2,
        batch_size=20,
        lr=1e-2,
        progress=False,
        out=tmp_path / "resumed",
        **TWO,
    )
    model, guide, nets = ae()  # fresh networks: everything comes from the checkpoint
    result = fit(
        model,
        guide,
        x,
        epochs=4,
        batch_size=20,
        lr=1e-2,
        progress=False,
        out=tmp_path / "resumed",
        resume=True,
        **TWO,
    )
    assert result.epochs == 4
    for a, b in zip(straight, params(nets)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resuming_on_another_number_of_processes_is_refused_before_any_work(tmp_path):
    x = data()
    model, guide, _ = ae()
    fit(model, guide, x, epochs=1, batch_size=20, progress=False, out=tmp_path / "run", **TWO)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    model, guide, nets = ae()
    start = params(nets)
    with pytest.raises(
        ConfigError,
        match=r"trained by 2 process\(es\); resume it on the same number \(this run has 1\)",
    ):
        fit(
            model,
            guide,
            x,
            epochs=2,
            batch_size=20,
            progress=False,
            out=tmp_path / "run",
            resume=True,
        )
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert all(torch.equal(a, b) for a, b in zip(start, params(nets)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"devices": 0}, "devices must be a positive number"),
        ({"accelerator": "tpu"}, "unknown accelerator 'tpu'"),
        ({"accelerator": "cpu", "devices": (os.cpu_count() or 1) + 1}, "more than this machine's"),
        (
            {"accelerator": "cuda"}
            if not torch.cuda.is_available()
            else {"accelerator": "cpu", "devices": 10**6},
            "cannot run on accelerator",
        ),
        ({"strategy": "warp-drive"}, "cannot run on .*strategy='warp-drive'"),
        (
            {"devices": 2, "strategy": "ddp_fork", "accelerator": "cpu", "batch_size": 21},
            "multiple of the number of processes",
        ),
    ],
)
def test_bad_device_options_are_refused_by_name(options, message):
    model, guide, nets = ae()
    start = params(nets)
    kwargs = {"epochs": 1, "batch_size": 20, "progress": False, **options}
    with pytest.raises(ConfigError, match=message):
        fit(model, guide, data(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(start, params(nets)))


def test_a_crash_of_one_process_ends_the_run_with_one_line_naming_it_and_keeps_the_last_checkpoint(
    tmp_path,
):
    x = data()
    model, guide, _ = ae()
    calls: dict[int, int] = {}

    def crashing(batch):  # rank 1's fourth training step (the first of epoch 2) fails
        pid = os.getpid()
        calls[pid] = calls.get(pid, 0) + 1
        if dist.is_initialized() and dist.get_rank() == 1 and calls[pid] == 4:
            raise ValueError("boom in the decoder")
        return model(batch)

    with pytest.raises(RuntimeError) as failed:
        fit(
            crashing, guide, x, epochs=3, batch_size=20, progress=False, out=tmp_path / "run", **TWO
        )
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and message.startswith(
        "training process 1 failed: ValueError: boom in the decoder"
    ), message
    assert io.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_a_ppl_vae_error_in_a_process_keeps_its_type(tmp_path):
    x = data()
    x[41, 2] = float(
        "nan"
    )  # read by one process only: a DataError there (exit 2 on the command line)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> torch.Tensor:
            return x[i]

    model, guide, _ = ae()
    with pytest.raises(
        DataError,
        match=r"data row 41 contains NaN or infinite values \(step \d+, epoch 1 on rank [01]\)",
    ):
        fit(model, guide, Rows(), epochs=1, batch_size=20, progress=False, **TWO)


SPREAD = Spread("cpu", 2, "ddp_fork")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_bounds_and_ais_spread_over_two_processes_equal_one_process_per_datapoint():
    m = frozen_ppca(
        rowwise=True
    )  # each row rounded alike in any batch: AIS's chaotic chains would grow a matmul's last-bit difference
    x = m.sample(5)  # 3 + 2 rows: blocks of unequal size
    at = torch.tensor([11, 3, 7, 0, 5])
    one = importance_bounds(m, inflated_guide(m), x, num_samples=300, seed=1, index=at)
    two = importance_bounds(
        m, inflated_guide(m), x, num_samples=300, seed=1, index=at, spread=SPREAD
    )
    assert all(
        close(getattr(one, k), getattr(two, k)) for k in ("elbo", "elbo_se", "iwae", "iwae_se")
    )
    one = ais(m, x, num_steps=40, num_chains=4, seed=2, index=at)
    two = ais(m, x, num_steps=40, num_chains=4, seed=2, index=at, spread=SPREAD)
    assert all(
        close(getattr(one, k), getattr(two, k))
        for k in ("log_px", "log_px_se", "accept_rate", "step_size")
    )
    assert not close(one.log_px, ais(m, x, num_steps=40, num_chains=4, seed=3, index=at).log_px), (
        "another seed, other chains"
    )


def test_hmc_spread_over_two_processes_gives_each_datapoint_its_own_chains():
    import numpy as np

    m = frozen_ppca(
        rowwise=True
    )  # as for AIS: HMC's chains would grow a matmul's last-bit difference between block sizes
    x = m.sample(4)
    one = hmc_latent(
        m,
        x,
        num_samples=15,
        warmup_steps=15,
        num_chains=2,
        seed=4,
        index=torch.tensor([8, 6, 4, 2]),
    )
    two = hmc_latent(
        m,
        x,
        num_samples=15,
        warmup_steps=15,
        num_chains=2,
        seed=4,
        index=torch.tensor([8, 6, 4, 2]),
        spread=SPREAD,
    )
    assert list(two.coords["point"]) == [8, 6, 4, 2]
    assert np.allclose(one.samples["z"], two.samples["z"], rtol=1e-9, atol=1e-9)
    for k in one.sample_stats:
        assert np.allclose(one.sample_stats[k], two.sample_stats[k], rtol=1e-9, atol=1e-9), k


def test_decompose_spread_over_two_processes_equals_one_process_with_choices_over_all_datapoints():
    m = frozen_ppca()
    x = m.sample(5)
    # two families: the IWAE proposal is the one with the best mean over all datapoints, summed across processes
    kw = dict(
        num_samples=200,
        elbo_samples=50,
        families=("diagonal", "full"),
        local_options={"max_steps": 60, "check_every": 20},
        seed=6,
    )
    one = decompose(m, inflated_guide(m), x, **kw)
    two = decompose(m, inflated_guide(m), x, **kw, spread=SPREAD)
    assert one.logpx_estimator == two.logpx_estimator and one.family == two.family
    assert torch.equal(one.index, two.index)
    for k in ("log_px", "log_px_se", "elbo_q", "elbo_q_se"):
        assert close(getattr(one, k), getattr(two, k)), k
    for f in one.elbo_local:
        assert close(one.elbo_local[f], two.elbo_local[f]), f
        assert math.isclose(one.local_steps[f], two.local_steps[f], rel_tol=1e-12), f


@dataclass(frozen=True)
class Seen:
    """What the body of a toy analysis saw, per row: its dataset index, seed, progress flag, the rows of every process, its option."""

    index: torch.Tensor
    seed: torch.Tensor
    progress: torch.Tensor
    total: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def concat(cls, parts: list[Seen]) -> Seen:
        return cls(*(torch.cat([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__))


def _check_seen(model, *data, scale, seed, index, progress, spread):
    if scale <= 0:
        raise ConfigError(f"scale must be positive, got {scale}")
    checked = dataset_index(index, data[0].shape[0])
    return Checked((model,), data, checked, (model,), {"scale": 2.0 * scale})


def _no_model(x):
    return None


@spread_over_rows(Seen, _check_seen, collectives=True)
def seen(model, *data, scale=1.0, seed=None, index=None, progress=False, coll):
    """A toy analysis: what each row's process handed its body."""

    def each(value: float) -> torch.Tensor:
        return torch.full((data[0].shape[0],), float(value), dtype=torch.float64)

    total = coll.sum(float(data[0].shape[0]))
    return Seen(index.clone(), each(seed), each(progress), each(total), each(scale))


def test_spread_over_rows_checks_first_and_gives_each_process_its_rows_one_seed_and_rank_zero_the_bar():
    params = inspect.signature(
        seen
    ).parameters  # spread added before progress, coll the decorator's own
    assert list(params)[-3:] == ["index", "spread", "progress"] and "coll" not in params
    assert (
        params["spread"].kind is inspect.Parameter.KEYWORD_ONLY and params["spread"].default is None
    )
    x, at = data(5), torch.tensor([11, 3, 7, 0, 5])
    with pytest.raises(
        ConfigError, match="scale must be positive"
    ):  # the check, before any process
        seen(_no_model, x, scale=0, spread=SPREAD)
    one = seen(_no_model, x, scale=1.5, seed=9, index=at, progress=True)
    assert torch.equal(one.index, at) and one.seed.eq(9).all() and one.progress.all()
    assert one.total.eq(5).all() and one.scale.eq(3.0).all()  # the checked option
    two = seen(_no_model, x, scale=1.5, index=at, progress=True, spread=SPREAD)
    assert torch.equal(two.index, at)  # blocks of 3 and 2 rows, in order
    assert two.total.eq(5).all() and two.scale.eq(3.0).all()  # the sum over both processes
    assert two.seed.unique().numel() == 1  # seed=None: one base seed, drawn once, for every process
    assert two.progress.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]  # the bar on rank 0 only


def test_spreading_more_processes_than_datapoints_is_refused_before_any_work():
    m = frozen_ppca()
    with pytest.raises(ConfigError, match="1 datapoint.* cannot be spread over 2 processes"):
        importance_bounds(m, inflated_guide(m), m.sample(1), num_samples=10, spread=SPREAD)
    with pytest.raises(ConfigError, match="devices must be a positive number"):
        importance_bounds(
            m, inflated_guide(m), m.sample(3), num_samples=10, spread=Spread("cpu", 0)
        )
    with pytest.raises(
        ConfigError, match="unknown strategy 'ddp_spawn' for spreading"
    ):  # a spawned process would need the model pickled
        importance_bounds(
            m, inflated_guide(m), m.sample(3), num_samples=10, spread=Spread("cpu", 2, "ddp_spawn")
        )
    with pytest.raises(ConfigError, match="num_nodes=2: .* torchrun or srun"):
        importance_bounds(
            m, inflated_guide(m), m.sample(3), num_samples=10, spread=Spread("cpu", 1, "ddp", 2)
        )
    with pytest.raises(ConfigError, match="non-negative integer dataset indices"):
        importance_bounds(
            m,
            inflated_guide(m),
            m.sample(3),
            num_samples=10,
            index=torch.tensor([0, -1, 2]),
            spread=SPREAD,
        )


def test_a_failed_analysis_process_is_one_line_naming_it():
    m = frozen_ppca()

    def failing(x):  # the second process's block fails
        if dist.is_initialized() and dist.get_rank() == 1:
            raise ValueError("boom in the model")
        return m(x)

    with pytest.raises(
        DataError
    ) as failed:  # the bounds' own probe names the failure; the process is named before it
        importance_bounds(failing, inflated_guide(m), m.sample(4), num_samples=10, spread=SPREAD)
    message = str(failed.value)
    assert (
        len(message.splitlines()) == 1
        and message.startswith("analysis process 1 failed: ")
        and message.endswith("(boom in the model)")
    ), message


def test_a_result_crosses_processes_as_plain_tensors_and_only_known_types_come_back(tmp_path):
    import numpy as np

    from ppl_vae.inference.mcmc.draws import Draws

    draws = Draws(
        {"z": np.arange(12.0).reshape(1, 3, 2, 2)},
        {"diverging": np.zeros((1, 3, 2), bool)},
        {"z": ["point", "z_dim_0"], "diverging": ["point"]},
        {"point": [4, 9], "z_dim_0": [0, 1]},
        "batched-hmc",
        1.5,
    )
    io.save_torch(tmp_path / "r.pt", io.to_plain({"draws": draws, "pair": (1, "a")}))
    back = io.from_plain(
        io.load_torch(tmp_path / "r.pt"), (Draws,)
    )  # weights_only: plain tensors and containers
    assert (
        np.array_equal(back["draws"].samples["z"], draws.samples["z"])
        and back["draws"].sample_stats["diverging"].dtype == bool
    )
    assert back["draws"].coords == draws.coords and back["pair"] == (1, "a")
    import enum

    class Level(enum.IntEnum):
        HIGH = 2

    assert (
        type(io.to_plain(Level.HIGH)) is int
    )  # a subclass would be pickled as its class, which weights_only refuses
    with pytest.raises(TypeError, match="NumPy array of <U1"):
        io.to_plain(np.array(["a"]))
    with pytest.raises(CheckpointError, match="unexpected type .Draws."):
        io.from_plain(io.load_torch(tmp_path / "r.pt"), ())
