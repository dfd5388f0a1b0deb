"""The counter the benchmarks and the accelerator tests use: operations dispatched and host synchronisations."""

import torch

from ppl_vae.inference.dispatch import Dispatches, host


def test_it_counts_each_kind_of_host_synchronisation_and_nothing_else_as_one():
    x = torch.linspace(-1.0, 1.0, 7)
    with Dispatches() as free:
        y = (x * 2).exp().cumsum(0)
        torch.where(y > 1, y, -y).sum()
    assert free.syncs == 0 and free.ops >= 5
    reads = [
        lambda: float(x.sum()),
        lambda: bool((x > 0).any()),
        lambda: x.max().item(),
        lambda: x[x > 0],
        lambda: torch.nonzero(x),
        lambda: x.masked_select(x > 0),
        lambda: torch.unique(x),
    ]
    for read in reads:
        with Dispatches() as d:
            read()
        assert d.syncs == 1, (read, dict(d.sync_ops))


def test_a_read_of_many_values_at_once_is_one_synchronisation():
    x = torch.arange(6.0).view(2, 3)
    with Dispatches() as d:
        values = host(x > 2)
    assert values == [[False, False, False], [True, True, True]]
    assert d.syncs == 1 and d.sync_ops["host"] == 1
