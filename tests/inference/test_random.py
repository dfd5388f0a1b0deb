"""Per-datapoint random streams: a datapoint's draws depend on its seed and dataset index only."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from conftest import Z
from pyro import poutine

from ppl_vae.errors import ConfigError
from ppl_vae.inference.dispatch import Dispatches
from ppl_vae.inference.random import (
    RowDraws,
    Streams,
    Tag,
    dataset_index,
    row_seed,
    seeded,
)


def test_a_datapoints_draws_do_not_depend_on_its_neighbours_or_position():
    a = Streams(0, [3, 7, 9], "cpu").normal((5, 3, 2), dim=1)
    b = Streams(0, [9, 7], "cpu").normal((2, 5, 2), dim=0)
    assert torch.equal(a[:, 2], b[0]) and torch.equal(a[:, 1], b[1])
    assert not torch.equal(a[:, 0], a[:, 1]), "datapoints have distinct streams"
    assert not torch.equal(Streams(1, [3], "cpu").normal((5, 1, 2)), a[:, :1]), (
        "another seed, another stream"
    )
    assert row_seed(0, 3) != row_seed(0, 3, 1), "a tag gives another stream"


def test_row_seeds_of_distinct_tags_differ_even_where_seed_sequence_pads_with_zeros():
    # NumPy's SeedSequence pads short entropy with zeros: [5, 3] and [5, 3, 0] would be one stream
    seeds = [
        row_seed(5, 3),
        row_seed(5, 3, 0),
        row_seed(5, 3, 0, 0),
        row_seed(5, 0, 3),
        row_seed(5 + 2**32, 3),
    ]
    assert len(set(seeds)) == len(seeds)


def test_a_selection_advances_the_same_generators_and_replaying_puts_them_back():
    s = Streams(4, [0, 1, 2], "cpu")
    fresh = Streams(4, [0, 1, 2], "cpu")
    s.select([1]).uniform((3, 1))
    assert torch.equal(s.uniform((3, 3))[:, 0], fresh.uniform((3, 3))[:, 0])  # row 0 untouched
    with s.replaying():
        first = s.normal((2, 3))
    assert torch.equal(s.normal((2, 3)), first)
    with pytest.raises(ValueError, match="3 datapoints"):
        s.normal((2, 4))


def test_row_draws_give_a_guide_the_draws_of_each_datapoint_alone():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("s", dist.LogNormal(x, 0.5).to_event(1))
            pyro.sample("c", dist.MultivariateNormal(x, scale_tril=torch.eye(x.shape[1]) * 0.3))

    x = torch.randn(3, 2)

    def run(rows):
        with RowDraws(Streams(5, rows, "cpu")), pyro.plate("_draws", 4, dim=-2):
            return poutine.trace(guide).get_trace(x[rows])

    together, alone = run([0, 1, 2]), run([2])
    for site in ("z", "s", "c"):
        assert torch.allclose(
            together.nodes[site]["value"][:, 2], alone.nodes[site]["value"][:, 0], atol=1e-6
        ), site
    lp = together.nodes["s"]["fn"].log_prob(together.nodes["s"]["value"])
    assert torch.isfinite(lp).all()


def test_row_draws_refuse_a_site_they_cannot_draw_for_many_datapoints_and_a_global_site():
    def gamma_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("g", dist.Gamma(x.new_ones(x.shape[0]), 1.0))

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    x = torch.ones(2, 1)
    with (
        pytest.raises(ConfigError, match="'g'.*one datapoint at a time"),
        RowDraws(Streams(0, [0, 1], "cpu")),
    ):
        gamma_guide(x)
    with RowDraws(Streams(0, [1], "cpu")):
        poutine.trace(gamma_guide).get_trace(x[:1])  # one datapoint: drawn from its stream
    with (
        pytest.raises(ConfigError, match="'w' is outside the 'data' plate"),
        RowDraws(Streams(0, [0, 1], "cpu")),
    ):
        global_guide(x)


def test_dataset_index_is_one_per_row():
    assert dataset_index(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="one dataset index per row"):
        dataset_index(torch.arange(4), 3)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
        ),
    ],
)
def test_a_seeded_block_leaves_the_callers_stream_where_it_was(device):
    """``seeded`` seeds every device's global generator (``torch.manual_seed`` does) and restores each after, CUDA's too."""
    torch.manual_seed(123)
    expected = torch.rand(3, device=device)
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(3, device=device)
    after = torch.rand(3, device=device)
    assert torch.equal(after, expected)  # the caller's stream continued as if the block had not run
    with seeded(7):
        assert torch.equal(
            torch.rand(3, device=device), inside
        )  # and the block's own draws are the seed's


# ----------------------------------------------------------------------------- the counter-based streams


def _rows(streams, kind, m, dtype=torch.float32):
    """``m`` draws per row, ``[n, m]`` (the rows along dim 0)."""
    return getattr(streams, kind)((len(streams), m), dim=0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_have_the_moments_and_the_bins_of_u01(dtype):
    u = (
        _rows(Streams(1, range(100), "cpu", Tag.BOUNDS), "uniform", 2000, dtype)
        .double()
        .reshape(-1)
    )
    n = u.numel()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) <= Z * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) <= Z * math.sqrt(
        (1 / 80 - 1 / 144) / n
    )  # Var(s^2) ~ (mu4 - sigma^4) / n
    bins = 100
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = ((counts - n / bins) ** 2 / (n / bins)).sum().item()
    assert chi2 <= scipy.stats.chi2.ppf(1 - 1e-5, bins - 1), (
        chi2
    )  # a true U(0, 1) exceeds this once in 10^5 seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_have_the_mean_variance_and_kurtosis_of_n01(dtype):
    z = (
        _rows(Streams(2, range(100), "cpu", Tag.AIS), "normal", 2001, dtype).double().reshape(-1)
    )  # an odd count: the last pair half used
    n = z.numel()
    assert abs(z.mean()) <= Z / math.sqrt(n)
    assert abs(z.pow(2).mean() - 1) <= Z * math.sqrt(2 / n)
    assert abs(z.pow(4).mean() - 3) <= Z * math.sqrt(96 / n)  # E z^8 - (E z^4)^2 = 105 - 9
    assert abs(z.pow(3).mean()) <= Z * math.sqrt(15 / n)


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_neighbouring_rows_and_successive_draws_are_uncorrelated(kind):
    s = Streams(3, range(400), "cpu", Tag.HMC)
    first, second = _rows(s, kind, 500, torch.float64), _rows(s, kind, 500, torch.float64)

    def corr(
        a, b
    ):  # pooled correlation of paired draws; its standard error is 1/sqrt(pairs) when they are independent
        a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
        return (a * b).mean().item(), 1 / math.sqrt(a.numel())

    for a, b, what in (
        (first[:-1], first[1:], "neighbouring rows"),
        (first[:, :-1], first[:, 1:], "successive values in a row"),
        (first, second, "successive draws of a row"),
        (
            first[:, :125],
            first[:, 125:250],
            "words 0 and 1 of a block: uniforms, or a Box-Muller pair's two normals",
        ),
    ):
        r, se = corr(a, b)
        assert abs(r) <= Z * se, (what, r, se)


def test_a_rows_draws_do_not_depend_on_its_batch_selection_or_device_count_of_rows():
    """The same bits for a datapoint whatever else is drawn with it, over a sequence of draws of several shapes and dtypes."""

    def sequence(s, row):
        n = len(s)
        return [
            s.normal((3, n, 5), dim=1)[:, row],
            s.uniform((n, 4), dim=0, dtype=torch.float64)[row],
            s.normal((n, 7), dim=0, dtype=torch.float64)[row],
            s.uniform((2, 2, n), dim=-1)[..., row],
            s.normal((n, 1), dim=0)[row],
        ]

    alone = sequence(Streams(9, [42], "cpu", Tag.LOCAL, 1), 0)
    batch = sequence(Streams(9, [7, 42, 3, 1000], "cpu", Tag.LOCAL, 1), 1)
    big = Streams(9, torch.arange(500), "cpu", Tag.LOCAL, 1)
    selected = sequence(big.select(slice(40, 45)), 2)
    for a, b, c in zip(alone, batch, selected):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(
        Streams(9, [42], "cpu", Tag.LOCAL, 2).normal((3, 1, 5))[:, 0], alone[0]
    ), "another tag, another stream"
    # the selection advanced the rows it holds, and only those
    fresh = Streams(9, torch.arange(500), "cpu", Tag.LOCAL, 1)
    assert torch.equal(big.uniform((500, 3), dim=0)[:40], fresh.uniform((500, 3), dim=0)[:40])
    assert not torch.equal(
        big.uniform((500, 3), dim=0)[40:45], fresh.uniform((500, 3), dim=0)[40:45]
    )


def test_selections_of_selections_share_the_positions_and_state_is_per_row():
    s = Streams(5, range(6), "cpu")
    ref = Streams(5, range(6), "cpu")
    inner = s.select([4, 1, 3]).select(slice(1, None))  # rows 1 and 3 of s
    state = s.get_state()
    x = inner.normal((2, 2))
    assert torch.equal(x, ref.normal((2, 6))[:, [1, 3]])
    assert s.get_state().tolist() == [0, 1, 0, 1, 0, 0]  # one block each, only the selected rows
    inner.set_state(torch.zeros(2, dtype=torch.int64))
    assert torch.equal(inner.normal((2, 2)), x)
    s.set_state(state)
    with s.select(slice(None, None, 2)).replaying():
        s.uniform((6, 9), dim=0)
    assert s.get_state().tolist() == [
        0,
        3,
        0,
        3,
        0,
        3,
    ]  # the replayed rows were put back, the others moved on
    with pytest.raises(ConfigError, match="name a row twice"):
        s.select([2, 2])
    with pytest.raises(ConfigError, match="state of these 6 streams"):
        s.set_state(torch.zeros(5, dtype=torch.int64))


def test_seed_of_is_deterministic_per_row():
    a, b = Streams(8, [1, 2], "cpu"), Streams(8, [2], "cpu")
    assert a.seed_of(1) == b.seed_of(0) and a.seed_of(1) == b.seed_of(0)
    assert a.seed_of(0) != a.seed_of(1)
    assert 0 <= a.seed_of(0) < 2**62
    assert a.get_state().tolist() == [2, 3]  # each call moved its own row on by one block


def test_float64_draws_refine_the_float32_draws_of_the_same_words():
    """Each value reads the same leading word in both types: uniforms agree to 2^-24, normals to what that moves them."""
    u32, u64 = (
        _rows(Streams(6, range(50), "cpu"), "uniform", 1000, dt)
        for dt in (torch.float32, torch.float64)
    )
    assert (u32.double() - u64).abs().max() <= 2.0**-24
    B = 250  # blocks per row: 1000 values, two Box-Muller pairs a block, values 2lB + j and (2l + 1)B + j
    z32, z64 = (
        _rows(Streams(6, range(50), "cpu"), "normal", 4 * B, dt).double().view(50, 2, 2, B)
        for dt in (torch.float32, torch.float64)
    )
    rho = torch.hypot(z64[:, :, 0], z64[:, :, 1])  # [rows, l, j]
    u = torch.exp(
        -(rho**2) / 2
    )  # the float64 radius's uniform; the float32 one is within 2^-24 of it
    keep = (u > 2.0**-20) & (
        rho > 2.0**-8
    )  # all but about 1e-5 of the pairs: away from the ends, where 23 bits resolve u poorly
    # |d rho| <= |d log u| / rho <= 2^-24 / ((u - 2^-24) rho); the angle moves at most pi 2^-23; float32 rounding ~ 8 ulp of rho
    bound = 2.0**-24 / ((u - 2.0**-24) * rho) + rho * math.pi * 2.0**-23 + 8 * 2.0**-24 * rho
    for part in (0, 1):
        assert ((z32[:, :, part] - z64[:, :, part]).abs() <= bound)[keep].all()
    assert keep.float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_are_filled_on_their_own_grid(dtype):
    s = Streams(0, range(20), "cpu")
    u = _rows(s, "uniform", 500, dtype)
    z = _rows(s, "normal", 500, dtype)
    assert u.dtype == z.dtype == dtype and 0 < u.min() and u.max() < 1 and torch.isfinite(z).all()


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"seed": -1}, "seed must be an integer in \\[0, 2\\*\\*64\\), got -1"),
        ({"seed": 2**64}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"index": [0, -3]}, "dataset index -3 must be an integer in \\[0, 2\\*\\*63\\)"),
        ({"index": [2**63]}, "dataset index"),
        (
            {"index": torch.tensor([0.0, 1.0])},
            "integer dataset indices, got a torch.float32 tensor",
        ),
        ({"tags": (Tag.BOUNDS, -1)}, "stream tag -1"),
        ({"tags": (0.5,)}, "stream tag 0.5"),
    ],
)
def test_bad_seeds_indices_and_tags_are_refused_by_name_before_any_draw(bad, match):
    args = {"seed": 0, "index": [0, 1], "tags": (Tag.BOUNDS,)} | bad
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with pytest.raises(ConfigError, match=match):
        Streams(args["seed"], args["index"], "cpu", *args["tags"])
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8, "float32"]
)
def test_a_dtype_the_streams_cannot_fill_is_refused_and_draws_nothing(dtype):
    s = Streams(0, [0, 1], "cpu")
    for kind in ("normal", "uniform"):
        with pytest.raises(ConfigError, match=f"streams draw {kind} values of a float dtype"):
            getattr(s, kind)((2, 3), dim=0, dtype=dtype)
    assert s.get_state().tolist() == [0, 0]


def _dispatched(fn):
    with Dispatches() as counted:
        fn()
    return counted.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_draws_tensor_operations_do_not_grow_with_the_rows(dtype):
    """A draw is one fixed sequence of tensor operations on all rows (counted as dispatched, views included)."""

    def ops(n):
        s = Streams(0, range(n), "cpu", Tag.HMC)
        return _dispatched(
            lambda: (
                s.normal((4, n, 50), dtype=dtype),
                s.uniform((4, n), dtype=dtype),
                s.select(slice(1, None)).normal((n - 1, 3), dim=0),
            )
        )

    small, large = ops(10), ops(300)
    assert small == large, (small, large)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_and_cuda_draw_the_same_bits(dtype):
    index = torch.arange(0, 3000, 7)
    cpu, gpu = Streams(4, index, "cpu", Tag.VI), Streams(4, index, "cuda", Tag.VI)
    for s in (cpu, gpu):
        s.uniform((len(index), 3), dim=0)  # move on, so the compared draws start mid-block
    for draw in (
        lambda s: s.normal((5, len(s), 17), dtype=dtype),
        lambda s: s.uniform((len(s), 33), dim=0, dtype=dtype),
        lambda s: s.select(slice(10, 20)).normal((3, 10), dtype=dtype),
    ):
        a, b = draw(cpu), draw(gpu)
        assert b.device.type == "cuda" and torch.equal(a, b.cpu())
    assert torch.equal(cpu.get_state(), gpu.get_state().cpu())
