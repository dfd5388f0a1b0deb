"""Batched local optimisation of q* against a loop of per-datapoint optimisations; IWAE throughput and memory.

What is measured
----------------
1. **IWAE K**: ``importance_bounds`` (ELBO and IWAE from the same K draws)
   on ``--iwae-points`` test images of the run: datapoints per second, and
   the process's peak resident memory (``ru_maxrss``), measured first so that
   the peak is this step's. Chunking keeps memory independent of the number
   of datapoints, so the peak holds for all 10,000 test images.
2. **Local q\\***: the same ``--steps`` Adam steps (no early stop) of the
   diagonal family, started from the encoder, on ``--points`` test images:

   * **batched**: ``optimize_local`` on all of them at once;
   * **loop** (the baseline): ``optimize_local`` on one datapoint at a time,
     for the first ``--loop-points`` of them (timed), scaled to ``--points``
     by the per-datapoint time.

   The two agree when the batched and looped q* of the same datapoints have
   the same ELBO within Monte Carlo error (both evaluated with 500 draws);
   the mean difference and its standard error are printed.

Usage: ``python benchmarks/local_opt.py --run runs/mnist-ffg [--points 1000] [--loop-points 50] [--steps 200] [--K 5000] [--iwae-points 200]``
(``--run``: any run directory written by ``ppl-vae fit``).
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from ppl_vae.app.runs import load_run
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.local import optimize_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--loop-points", type=int, default=50)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--K", type=int, default=5000)
    p.add_argument("--iwae-points", type=int, default=200)
    args = p.parse_args()
    built, splits = load_run(args.run)
    x = splits["test"].x
    g = torch.Generator().manual_seed(0)
    x = x[torch.randperm(len(x), generator=g)]

    t = time.perf_counter()
    b = importance_bounds(
        built.model, built.guide, x[: args.iwae_points], num_samples=args.K, seed=0
    )
    dt = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"IWAE K={args.K}: {args.iwae_points / dt:.2f} datapoints/s ({dt:.1f} s for {args.iwae_points}); peak RSS {peak_gb:.2f} GB"
    )
    print(f"  mean ELBO {b.elbo.mean():.2f}, mean IWAE {b.iwae.mean():.2f} nats")

    # a fixed number of steps from one start: tol 0 (no gain is credibly below it), one check at the end
    kw = dict(
        family="diagonal",
        init=built.guide,
        max_steps=args.steps,
        check_every=args.steps,
        tol=0.0,
        lr=1e-2,
        starts=1,
    )
    xs = x[: args.points]
    t = time.perf_counter()
    batched = optimize_local(built.model, xs, seed=0, **kw)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    looped = [
        optimize_local(built.model, xs[i : i + 1], seed=1 + i, **kw)
        for i in range(args.loop_points)
    ]
    t_loop = (time.perf_counter() - t) * args.points / args.loop_points

    m = args.loop_points
    e_b = importance_bounds(
        built.model, batched.posterior.select(slice(0, m)), xs[:m], num_samples=500, seed=1
    )
    e_l = torch.cat(
        [
            importance_bounds(built.model, f.posterior, xs[i : i + 1], num_samples=500, seed=1).elbo
            for i, f in enumerate(looped)
        ]
    )
    diff = e_b.elbo - e_l
    print(
        f"local q* ({args.steps} steps, {args.points} datapoints): batched {t_batched:.1f} s; "
        f"loop {t_loop:.1f} s (measured on {m}, scaled); ratio loop/batched = {t_loop / t_batched:.1f}x"
    )
    print(
        f"  ELBO batched - loop on the {m} shared datapoints: {diff.mean():.3f} ± {diff.std() / math.sqrt(m):.3f} nats "
        f"(batched {e_b.elbo.mean():.2f}, loop {e_l.mean():.2f})"
    )


if __name__ == "__main__":
    main()
