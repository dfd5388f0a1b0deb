"""A mixture prior's log density: matrix products against ``MixtureSameFamily``, side by side in one process.

What is measured
----------------
``ppl_vae.distributions.gaussian_mixture`` (what the VampPrior and the mog-vae prior return) evaluates a
mixture of K diagonal Gaussians in D dimensions by three ``[N, D] x [D, K]`` matrix products; the baseline
is Pyro's ``MixtureSameFamily`` on the same parameters, which forms an ``[N, K, D]`` tensor. Cases: a
training step's prior term (N = 100 rows), and one image's IWAE estimate (N = 5000 draws), each with a
VampPrior's K = 500 pseudo-inputs in D = 50 and the mog-vae's K = 10. Each pair runs alternately
``--repeats`` times after a warm-up (forward and backward); the report gives the median time of each and
the median ratio baseline / matrix products (the speed-up), with the largest difference of the two log densities.

Usage: ``python benchmarks/mixture_log_prob.py [--repeats 7]``
"""

from __future__ import annotations

import argparse

import pyro.distributions as dist
import torch
from side_by_side import alternate

from ppl_vae.distributions import gaussian_mixture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(
        f"{a.repeats} repeats, {torch.get_num_threads()} threads; times of log_prob(z).sum() forward + backward"
    )
    for k, n, d in ((500, 100, 50), (500, 5000, 50), (10, 100, 50), (10, 5000, 50)):
        loc = torch.randn(k, d, generator=g).requires_grad_()
        scale = (0.05 + torch.rand(k, d, generator=g)).requires_grad_()
        logits = torch.zeros(k, requires_grad=True)
        z = torch.randn(n, d, generator=g)

        def step(make, logits=logits, loc=loc, scale=scale, z=z):
            lp = make(logits, dist.Normal(loc, scale).to_event(1)).log_prob(z)
            lp.sum().backward()
            return lp.detach()

        fast = lambda: step(gaussian_mixture)  # noqa: E731
        base = lambda: step(lambda w, c: dist.MixtureSameFamily(dist.Categorical(logits=w), c))  # noqa: E731
        diff = (fast() - base()).abs().max().item()
        print(
            f"K={k:4d} N={n:5d} D={d}: MixtureSameFamily vs matrix products {alternate(base, fast, a.repeats)}   max |difference| {diff:.1e} nats"
        )


if __name__ == "__main__":
    main()
