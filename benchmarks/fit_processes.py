"""Training throughput of ``fit`` on 1 process against 2 processes (DDP over gloo, CPU), side by side in one process.

The same VAE (784-200-200-50 Gaussian encoder, 50-200-200-784 decoder, Bernoulli
logits) is trained for one epoch on the first ``--rows`` binarised-MNIST training
images at global batch ``--batch-size``, once with ``devices=1`` and once with
``devices=2, strategy="ddp"`` (each process takes half of every batch), alternately
``--repeats`` times after one warm-up of each. Throughput is datapoints per second
of the training loop (``history[-1]["wall_time"]``, which excludes process start-up
and the final evaluation). Reported: the median of each and the median ratio
2-process / 1-process. Both processes share the machine's cores (torch threads are
split between them), so on a 2-core machine the ratio measures DDP's overhead more
than its speed-up.

    python benchmarks/fit_processes.py --data-dir ../shared/data   # binarised MNIST
    python benchmarks/fit_processes.py                             # the embedded digits (64-d) instead
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.svi import fit
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder


def throughput(x: torch.Tensor, batch_size: int, processes: int) -> float:
    torch.manual_seed(0)
    d = x.shape[1]
    decoder, encoder = MLP(50, [200, 200], d), GaussianEncoder(MLP(d, [200], 200), 200, 50)
    model, guide = vae(decoder, get_likelihood("bernoulli"), 50), amortized_guide(encoder)
    options = (
        {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
        if processes == 2
        else {"accelerator": "cpu"}
    )
    result = fit(model, guide, x, epochs=1, batch_size=batch_size, progress=False, **options)
    return len(x) / result.history[-1]["wall_time"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with binarized_mnist/ (default: the embedded digits)",
    )
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    x = (
        load("binarized-mnist", "train", data_dir=a.data_dir).x[: a.rows]
        if a.data_dir
        else load("digits", "train", binarize="threshold").x
    )
    print(
        f"data: {'binarised MNIST' if a.data_dir else 'digits'}, {len(x)} rows x {x.shape[1]}, batch {a.batch_size}, torch threads {torch.get_num_threads()}"
    )
    (
        throughput(x[: 10 * a.batch_size], a.batch_size, 1),
        throughput(x[: 10 * a.batch_size], a.batch_size, 2),
    )  # warm-up
    rows = []
    for r in range(a.repeats):
        one, two = throughput(x, a.batch_size, 1), throughput(x, a.batch_size, 2)
        rows.append((one, two))
        print(
            f"repeat {r + 1}: 1 process {one:8.0f} rows/s   2 processes {two:8.0f} rows/s   ratio {two / one:.2f}x",
            flush=True,
        )
    one, two = statistics.median(o for o, _ in rows), statistics.median(t for _, t in rows)
    print(
        f"median: 1 process {one:.0f} rows/s, 2 processes {two:.0f} rows/s; ratio 2/1 {statistics.median(t / o for o, t in rows):.2f}x"
    )


if __name__ == "__main__":
    main()
