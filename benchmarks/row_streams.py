"""Cost of per-datapoint random streams against one global stream, side by side in one process.

What is measured
----------------
The analyses draw each datapoint's random numbers from its own generator
(``ppl_vae.inference.random.Streams``), so that a datapoint's result does not
depend on its batch. This times the two places that cost:

* **importance weights**: ``log_weights(vae, guide, x, num_samples=K)`` on a
  batch of binarised-MNIST-shaped rows (VAE 784-200-200-50, Bernoulli
  likelihood), with ``streams=Streams(...)`` against the global stream
  (``streams=None``, the baseline: Pyro's own draws);
* **HMC noise**: the momenta and accept draws of one transition,
  ``Streams.normal([C, N, d])`` + ``Streams.uniform([C, N])`` against
  ``torch.randn`` + ``torch.rand`` with one generator (the baseline).

Each pair is run alternately ``--repeats`` times after a warm-up; the report
gives the median time of each and the median ratio streams/baseline.

Usage: ``python benchmarks/row_streams.py [--rows 100] [--K 1000] [--repeats 7]``
"""

from __future__ import annotations

import argparse

import torch
from side_by_side import alternate

from ppl_vae.distributions import Bernoulli
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.random import Streams
from ppl_vae.inference.traces import log_weights
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--K", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    decoder, encoder = MLP(50, [200, 200], 784), GaussianEncoder(MLP(784, [200], 200), 200, 50)
    model, guide = vae(decoder, Bernoulli(), 50), amortized_guide(encoder)
    x = (torch.rand(a.rows, 784) < 0.3).float()
    index = torch.arange(a.rows)
    cases = {
        "importance weights": (
            lambda: log_weights(model, guide, x, num_samples=a.K, streams=Streams(0, index, x.device)),
            lambda: log_weights(model, guide, x, num_samples=a.K),
        ),
        "HMC noise": (
            lambda: (lambda s: (s.normal((a.chains, a.rows, 50)), s.uniform((a.chains, a.rows))))(Streams(0, index, x.device)),
            lambda: (lambda g: (torch.randn(a.chains, a.rows, 50, generator=g), torch.rand(a.chains, a.rows, generator=g)))(torch.Generator().manual_seed(0)),
        ),
    }
    print(f"{a.rows} rows, K={a.K}, {a.chains} chains, {a.repeats} repeats, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for name, (streams, base) in cases.items():
            print(f"{name:20s} streams vs global stream: {alternate(streams, base, a.repeats)}")


if __name__ == "__main__":
    main()
