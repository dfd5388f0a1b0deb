"""Philox-4x32-10 in torch integer ops: the published known answers, a plain-Python reference, and the float conversions' accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.inference import philox
from ppl_vae.inference.random import Streams, Tag, stream_key

MASK = 0xFFFFFFFF

# Known-answer vectors of Random123 (D. E. Shaw Research), file tests/kat_vectors, its three "philox4x32 10" lines
# (github.com/DEShawResearch/random123; the same lines are quoted by Boost.Random's philox KAT and other ports):
# counter (4 words), key (2 words) -> output (4 words), word 0 first.
KAT = [
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def reference(counter, key, rounds=10):
    """Philox-4x32 on Python ints, from the round of Salmon et al. (2011): products hi/lo, XOR, key bumped by the Weyl constants."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapping products", "48-bit halves"])
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_of_random123(counter, key, expected, wrap):
    assert reference(counter, key) == expected  # the reference is Philox
    if wrap and not philox.products_wrap("cpu"):
        pytest.skip("this CPU's int64 products do not wrap")
    got = philox.philox4x32(torch.tensor(counter).view(4, 1), key, wrap=wrap)
    assert got.view(-1).tolist() == list(expected)


def test_both_ways_of_forming_the_products_give_the_same_streams(monkeypatch):
    def draws():
        s = Streams(3, [0, 9, 2**33], "cpu", Tag.AIS)
        return (
            s.normal((3, 3, 41)),
            s.uniform((3, 5), dim=0, dtype=torch.float64),
            s.normal((3, 7), dim=0, dtype=torch.float64),
        )

    monkeypatch.setitem(philox._WRAP, "cpu", True)
    wrapping = draws()
    monkeypatch.setitem(philox._WRAP, "cpu", False)
    assert not Streams(0, [0], "cpu")._consts.wrap
    for a, b in zip(wrapping, draws()):
        assert torch.equal(a, b)


def test_every_lane_of_a_batch_equals_the_reference():
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4, 3, 37), generator=g)  # any batch shape
    key = (0x9ABCDEF0, 0x13579BDF)
    got = philox.philox4x32(counters, key)
    assert got.shape == counters.shape
    flat_c, flat_g = counters.reshape(4, -1).T.tolist(), got.reshape(4, -1).T.tolist()
    for c, out in zip(flat_c, flat_g):
        assert tuple(out) == reference(c, key)


def test_a_rows_stream_is_philox_at_its_position_and_dataset_index():
    """Row ``i``'s block ``j`` is Philox at counter ``(position + j, index_i)`` under the key of ``(seed, tags)``; uniforms read it lane after lane."""
    index = [5, 2**40 + 3]
    s = Streams(11, index, "cpu", Tag.BOUNDS, 2)
    key = stream_key(11, Tag.BOUNDS, 2)
    s.uniform((2, 3), dim=0)  # 3 values: one block each
    x, y = s._blocks(2)  # the next two blocks, positions 1 and 2
    u = s.uniform((2, 8), dim=0)  # blocks 3 and 4: value k B + j is word k of block j (B = 2)
    for row, i in enumerate(index):
        for j, position in enumerate((1, 2)):
            w = reference((position, 0, i & MASK, i >> 32), key)
            assert (x[0, row, j], y[0, row, j], x[1, row, j], y[1, row, j]) == w
        words = [reference((position, 0, i & MASK, i >> 32), key) for position in (3, 4)]
        expected = [((words[j][k] >> 8) | 1) * 2.0**-24 for k in range(4) for j in range(2)]
        assert u[row].tolist() == expected


def test_the_log_and_sine_series_are_accurate_to_a_few_units_in_the_last_place():
    g = torch.Generator().manual_seed(1)
    for dtype, eps in ((torch.float32, 2.0**-23), (torch.float64, 2.0**-52)):
        edges = torch.tensor(
            [2.0**-53, 2.0**-24, 0.5, math.sqrt(0.5), 1 - 2.0**-24, 1 - 2.0**-53],
            dtype=torch.float64,
        )
        u = torch.cat((torch.rand(200_000, generator=g, dtype=torch.float64), edges)).to(dtype)
        u = u[(u > 0) & (u < 1)]
        exact = torch.log(u.double())
        err = (philox._log(u).double() - exact).abs() / exact.abs()
        assert err.max() <= 4 * eps, (dtype, err.max() / eps)  # measured: under 2 units
        r = (torch.rand(200_000, generator=g, dtype=torch.float64) - 0.5).to(dtype)
        r = r[r != 0]
        exact = torch.sin(math.pi / 2 * r.double())
        err = (
            philox._horner(r * r, philox._SIN[dtype]).mul_(r).double() - exact
        ).abs() / exact.abs()
        assert err.max() <= 4 * eps, (dtype, err.max() / eps)


def test_uniforms_are_odd_multiples_of_the_types_grid_and_never_0_or_1():
    low, high = (
        torch.zeros(2, 1, 2, dtype=torch.int64),
        torch.full((2, 1, 2), MASK),
    )  # two blocks of the smallest, two of the largest words
    for dtype, bits in ((torch.float32, 23), (torch.float16, 10), (torch.bfloat16, 7)):
        u = philox.uniform_from_blocks(
            low, high, 8, dtype
        )  # values: word 0 of both blocks (x), word 1 (y), ...
        assert u.dtype == dtype
        assert u[0, 0].item() == 2.0 ** -(bits + 1) and u[0, 2].item() == 1 - 2.0 ** -(bits + 1)
    u = philox.uniform_from_blocks(
        low, high, 4, torch.float64
    )  # block 0's words refined by block 1's
    assert u[0, 0].item() == 2.0**-53 and u[0, 1].item() == 1 - 2.0**-53


def _draws(compiled):
    s = Streams(5, [0, 3, 2**40 + 1, 17, 8], "cpu", Tag.HMC, compiled=compiled)
    out = []
    for dtype in (torch.float32, torch.float64):
        out += [
            s.uniform((5, 3), dim=0, dtype=dtype),  # leaves the rows mid-block
            s.normal((2, 5, 41), dtype=dtype),
            s.select(slice(1, 4)).uniform((3, 9), dim=0, dtype=dtype),
            s.select([4, 0]).normal((2, 6), dim=0, dtype=dtype),
        ]
    return out, s.get_state()


def test_the_compiled_switch_follows_the_environment_and_a_failed_check_draws_eagerly(
    monkeypatch,
):
    monkeypatch.setenv("PPL_VAE_COMPILED_STREAMS", "1")
    s = Streams(0, range(4), "cpu")
    assert (
        s.compiled
        and s.select([1, 2]).compiled
        and not Streams(0, [0], "cpu", compiled=False).compiled
    )
    monkeypatch.delenv("PPL_VAE_COMPILED_STREAMS")
    assert not Streams(0, [0], "cpu").compiled
    for kind in (
        "normal",
        "uniform",
    ):  # as if the compiled kernels had failed their check: eager, no compiling
        for dtype in (torch.float32, torch.float64):
            monkeypatch.setitem(philox._COMPILED, (kind, dtype), False)
    (eager, state), (fallback, state_fallback) = _draws(False), _draws(True)
    assert all(torch.equal(a, b) for a, b in zip(eager, fallback))
    assert torch.equal(state, state_fallback)


@pytest.mark.slow
def test_compiled_draws_are_the_eager_draws_bit_for_bit():
    """Streams(compiled=True): torch.compile kernels give the same values, float32 and float64, whole and mid-block."""
    (eager, state), (compiled, state_compiled) = _draws(False), _draws(True)
    if not all(
        philox._COMPILED.get((k, d))
        for k in ("normal", "uniform")
        for d in (torch.float32, torch.float64)
    ):
        pytest.skip("torch.compile does not work here: the streams drew eagerly")
    for a, b in zip(eager, compiled):
        assert a.dtype == b.dtype and torch.equal(
            a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        )
    assert torch.equal(state, state_compiled)
