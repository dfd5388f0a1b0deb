"""Per-datapoint random streams: a datapoint's draws depend on its seed and dataset index only."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from ppl_vae.errors import ConfigError
from ppl_vae.inference.random import RowDraws, Streams, dataset_index, row_seed, seeded


def test_a_datapoints_draws_do_not_depend_on_its_neighbours_or_position():
    a = Streams(0, [3, 7, 9], "cpu").normal((5, 3, 2), dim=1)
    b = Streams(0, [9, 7], "cpu").normal((2, 5, 2), dim=0)
    assert torch.equal(a[:, 2], b[0]) and torch.equal(a[:, 1], b[1])
    assert not torch.equal(a[:, 0], a[:, 1]), "datapoints have distinct streams"
    assert not torch.equal(Streams(1, [3], "cpu").normal((5, 1, 2)), a[:, :1]), "another seed, another stream"
    assert row_seed(0, 3) != row_seed(0, 3, 1), "a tag gives another stream"


def test_row_seeds_of_distinct_tags_differ_even_where_seed_sequence_pads_with_zeros():
    # NumPy's SeedSequence pads short entropy with zeros: [5, 3] and [5, 3, 0] would be one stream
    seeds = [row_seed(5, 3), row_seed(5, 3, 0), row_seed(5, 3, 0, 0), row_seed(5, 0, 3), row_seed(5 + 2**32, 3)]
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
        assert torch.allclose(together.nodes[site]["value"][:, 2], alone.nodes[site]["value"][:, 0], atol=1e-6), site
    lp = together.nodes["s"]["fn"].log_prob(together.nodes["s"]["value"])
    assert torch.isfinite(lp).all()


def test_row_draws_refuse_a_site_they_cannot_draw_for_many_datapoints_and_a_global_site():
    def gamma_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("g", dist.Gamma(x.new_ones(x.shape[0]), 1.0))

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    x = torch.ones(2, 1)
    with pytest.raises(ConfigError, match="'g'.*one datapoint at a time"), RowDraws(Streams(0, [0, 1], "cpu")):
        gamma_guide(x)
    with RowDraws(Streams(0, [1], "cpu")):
        poutine.trace(gamma_guide).get_trace(x[:1])  # one datapoint: drawn from its stream
    with pytest.raises(ConfigError, match="'w' is outside the 'data' plate"), RowDraws(Streams(0, [0, 1], "cpu")):
        global_guide(x)


def test_dataset_index_is_one_per_row():
    assert dataset_index(None, 3).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="one dataset index per row"):
        dataset_index(torch.arange(4), 3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
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
        assert torch.equal(torch.rand(3, device=device), inside)  # and the block's own draws are the seed's
