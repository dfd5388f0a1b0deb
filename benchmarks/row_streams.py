"""Cost of per-datapoint random streams against one global stream, side by side in one process.

What is measured
----------------
The analyses draw each datapoint's random numbers from its own stream
(``ppl_vae.inference.random.Streams``: Philox-4x32-10 blocks at a counter per
datapoint, all rows drawn at once), so that a datapoint's result does not depend
on its batch. This measures:

* **HMC noise**, the table: the momenta and accept draws of one transition,
  ``Streams(0, range(N), "cpu", 4).normal([C, N, 50])`` + ``.uniform([C, N])``,
  for ``N`` in ``--rows``:

  - the tensor operations one such draw dispatches (counted with a
    ``TorchDispatchMode``, views included), for the Philox streams ("after") and
    for one ``torch.Generator`` per datapoint with its draws stacked, the streams
    before issue 30 ("before", rebuilt here in a few lines);
  - the median time of each against ``torch.randn`` + ``torch.rand`` with one
    generator (the baseline), all run in turn ``--repeats`` times after a
    warm-up; one torch thread unless ``--threads``;
  - the same draws with ``Streams(..., compiled=True)`` (``torch.compile``
    kernels, the same bits; their compiling is in the warm-up, not in the times),
    in float32 and float64, unless ``--no-compiled``;

* **importance weights**: ``log_weights(vae, guide, x, num_samples=K)`` on a
  batch of binarised-MNIST-shaped rows (VAE 784-200-200-50, Bernoulli
  likelihood), with ``streams=Streams(...)`` against the global stream
  (``streams=None``: Pyro's own draws).

Usage: ``python benchmarks/row_streams.py [--rows 10 1000] [--K 1000] [--repeats 9] [--no-compiled] [--skip-weights]``
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from side_by_side import alternate, in_turn

from ppl_vae.distributions import Bernoulli
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.dispatch import Dispatches
from ppl_vae.inference.random import Streams, row_seed
from ppl_vae.inference.traces import log_weights
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


class PerRowGenerators:
    """The streams before issue 30: one ``torch.Generator`` per datapoint, draws made row by row and stacked."""

    def __init__(self, seed: int, index: range, device: str, *tags: int) -> None:
        self.gens = [
            torch.Generator(device=device).manual_seed(row_seed(seed, i, *tags)) for i in index
        ]

    def _draw(
        self, fill: Callable[..., torch.Tensor], shape: list[int], dim: int = 1
    ) -> torch.Tensor:
        row = shape[:dim] + shape[dim + 1 :]
        return torch.stack([fill(row, generator=g) for g in self.gens], dim)

    def normal(self, shape: list[int]) -> torch.Tensor:
        return self._draw(torch.randn, shape)

    def uniform(self, shape: list[int]) -> torch.Tensor:
        return self._draw(torch.rand, shape)


def _ops(fn: Callable[[], object]) -> int:
    with Dispatches() as count:
        fn()
    return count.ops


def _noise(
    kind: type,
    n: int,
    chains: int,
    dtype: torch.dtype,
    device: str = "cpu",
    compiled: bool = False,
) -> Callable[[], object]:
    """One HMC transition's noise for ``n`` datapoints: normal ``[chains, n, 50]`` + uniform ``[chains, n]`` from ``kind``'s streams."""
    if kind is Streams:
        s = Streams(0, range(n), device, 4, compiled=compiled)
        return lambda: (s.normal([chains, n, 50], dtype=dtype), s.uniform([chains, n], dtype=dtype))
    g = kind(0, range(n), device, 4)
    return lambda: (g.normal([chains, n, 50]), g.uniform([chains, n]))


def noise_table(rows: list[int], chains: int, repeats: int, compiled: bool = True) -> None:
    print(
        f"HMC noise: normal [{chains}, N, 50] + uniform [{chains}, N], float32 (f64: the Philox streams' own draws in float64; "
        f"compiled: Streams(..., compiled=True)), {repeats} repeats, {torch.get_num_threads()} thread(s); times as ratios to the baseline"
    )
    names = ["before", "after", "after f64"] + (["compiled", "compiled f64"] if compiled else [])
    print(
        f"{'N':>6} | {'ops before':>10} | {'ops after':>9} | "
        + " | ".join(f"{name:>12}" for name in names)
        + " | baseline ms"
    )
    for n in rows:
        gen = torch.Generator().manual_seed(0)

        def base(n=n, gen=gen):
            return (
                torch.randn(chains, n, 50, generator=gen),
                torch.rand(chains, n, generator=gen),
            )

        draws = [
            _noise(PerRowGenerators, n, chains, torch.float32),
            _noise(Streams, n, chains, torch.float32),
            _noise(Streams, n, chains, torch.float64),
        ]
        if compiled:
            draws += [
                _noise(Streams, n, chains, dt, compiled=True)
                for dt in (torch.float32, torch.float64)
            ]
        ops_before, ops_after = _ops(draws[0]), _ops(draws[1])
        *times, t0 = in_turn([*draws, base], repeats)
        ratio = [statistics.median(x / y for x, y in zip(t, t0)) for t in times]
        print(
            f"{n:>6} | {ops_before:>10} | {ops_after:>9} | "
            + " | ".join(f"{r:>11.3g}x" for r in ratio)
            + f" | {statistics.median(t0) * 1e3:.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--K", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-weights", action="store_true", help="only the HMC-noise table")
    ap.add_argument(
        "--no-compiled", action="store_true", help="leave out the compiled streams' columns"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with torch.no_grad():
        noise_table(a.rows, a.chains, a.repeats, not a.no_compiled)
        if a.skip_weights:
            return
        torch.manual_seed(0)
        rows = max(a.rows)
        decoder, encoder = MLP(50, [200, 200], 784), GaussianEncoder(MLP(784, [200], 200), 200, 50)
        model, guide = vae(decoder, Bernoulli(), 50), amortized_guide(encoder)
        x = (torch.rand(rows, 784) < 0.3).float()
        index = torch.arange(rows)

        def streams():
            return log_weights(
                model, guide, x, num_samples=a.K, streams=Streams(0, index, x.device)
            )

        def plain():
            return log_weights(model, guide, x, num_samples=a.K)

        print(
            f"importance weights, {rows} rows, K={a.K}: streams vs global stream: {alternate(streams, plain, a.repeats)}"
        )


if __name__ == "__main__":
    main()
