"""Throughput of a spread analysis: IWAE bounds on 1 process against 2 processes (CPU, gloo), side by side in one process.

The same VAE (784-200-200-50 Gaussian encoder, 50-200-200-784 decoder, Bernoulli
logits; trained for ``--epochs`` on the first ``--rows`` binarised-MNIST training
images) is scored by :func:`~ppl_vae.inference.importance_bounds` with ``K`` =
``--K`` importance samples on ``--points`` test images, once in this process
(``spread=None``) and once spread over two forked CPU processes
(``Spread("cpu", 2)``, each taking half of the datapoints), alternately
``--repeats`` times after one warm-up of each. Throughput is datapoints per
second, process start-up included. Both runs give the same per-datapoint bounds
(checked here: the largest difference is printed). On a 2-core machine the
processes share the cores (torch threads are split between them), so the ratio
shows what splitting the work by datapoints costs or gains against torch's own
threading, not a speed-up from more hardware.

    python benchmarks/analysis_processes.py --data-dir ../shared/data   # binarised MNIST
    python benchmarks/analysis_processes.py                             # the embedded digits (64-d) instead
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference import Spread, fit, importance_bounds
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


def trained(x: torch.Tensor, epochs: int):
    torch.manual_seed(0)
    d = x.shape[1]
    decoder, encoder = MLP(50, [200, 200], d), GaussianEncoder(MLP(d, [200], 200), 200, 50)
    model, guide = vae(decoder, get_likelihood("bernoulli"), 50), amortized_guide(encoder)
    fit(model, guide, x, epochs=epochs, batch_size=100, progress=False)
    return model, guide


def timed(model, guide, x: torch.Tensor, K: int, spread: Spread | None):
    t0 = time.perf_counter()
    b = importance_bounds(model, guide, x, num_samples=K, seed=0, spread=spread)
    return len(x) / (time.perf_counter() - t0), b


def main() -> None:
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    p = argparse.ArgumentParser()
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with binarized_mnist/ (default: the embedded digits)",
    )
    p.add_argument("--rows", type=int, default=10000, help="training rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--points", type=int, default=200, help="test datapoints scored")
    p.add_argument("--K", type=int, default=1000, help="importance samples per datapoint")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    name = "binarized-mnist" if a.data_dir else "digits"
    kw = {"data_dir": a.data_dir} if a.data_dir else {"binarize": "threshold"}
    x, test = load(name, "train", **kw).x[: a.rows], load(name, "test", **kw).x[: a.points]
    print(
        f"data: {name}, {len(test)} test points x {test.shape[1]}, K {a.K}, torch threads {torch.get_num_threads()}"
    )
    model, guide = trained(x, a.epochs)
    two = Spread("cpu", 2)
    timed(model, guide, test[:4], a.K, None), timed(model, guide, test[:4], a.K, two)  # warm-up
    rows = []
    for r in range(a.repeats):
        (one, b1), (both, b2) = (
            timed(model, guide, test, a.K, None),
            timed(model, guide, test, a.K, two),
        )
        diff = (b1.iwae - b2.iwae).abs().max().item()
        rows.append((one, both))
        print(
            f"repeat {r + 1}: 1 process {one:7.1f} points/s   2 processes {both:7.1f} points/s   ratio {both / one:.2f}x   max |IWAE diff| {diff:.1e}",
            flush=True,
        )
    one, both = statistics.median(o for o, _ in rows), statistics.median(t for _, t in rows)
    print(
        f"median: 1 process {one:.1f} points/s, 2 processes {both:.1f} points/s; ratio 2/1 {statistics.median(t / o for o, t in rows):.2f}x"
    )


if __name__ == "__main__":
    main()
