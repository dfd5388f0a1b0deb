"""Batched HMC vs one-at-a-time Pyro NUTS on VAE latent posteriors: total min-bulk-ESS per second.

Both samplers run side by side in one process on the same trained model and
datapoints. The batched sampler does all ``N`` datapoints at once; Pyro's
NUTS runs on a random subset of ``k`` of them, one datapoint after another, and
its per-datapoint time and ESS are scaled to ``N`` (stated in the output). The
figure of merit is the sum over datapoints of the minimum (over latent
dimensions) bulk ESS, divided by the wall time it took.

    python benchmarks/mcmc_ess.py                       # trains a 5-d VAE on digits
    python benchmarks/mcmc_ess.py --run runs/mnist-ffg  # a trained run directory
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from ppl_vae.app.commands.compare import pick_points
from ppl_vae.app.commands.fit import run
from ppl_vae.app.config import Config
from ppl_vae.app.runs import load_run
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.mcmc.nuts import nuts_latent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=None, help="trained run directory (default: train a small digits VAE)")
    p.add_argument("--latent-dim", type=int, default=5)
    p.add_argument("--num-points", type=int, default=100)
    p.add_argument("--pyro-points", type=int, default=3, help="datapoints Pyro's NUTS runs on (scaled to --num-points)")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--pyro-chains", type=int, default=2)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.run is None:
        tmp = tempfile.mkdtemp(prefix="mcmc-ess-")
        cfg = Config(model="vae", dataset="digits", binarize="threshold", latent_dim=a.latent_dim, hidden=(128, 128), epochs=30, lr=3e-3, seed=a.seed)
        run(cfg, tmp, progress=False, figures=False)
        a.run = tmp
    built, splits = load_run(a.run)
    test = splits["test"]
    idx = pick_points(len(test), num_points=a.num_points, seed=a.seed)
    x = test.x[idx]
    sub = torch.randperm(len(idx), generator=torch.Generator().manual_seed(a.seed + 1))[: a.pyro_points].tolist()
    print(f"model: {a.run} (latent dim {built.config.latent_dim}), N = {len(idx)} datapoints, torch threads = 1")

    t0 = time.perf_counter()
    batched = hmc_latent(built.model, x, num_samples=a.draws, warmup_steps=a.warmup, num_chains=a.chains, seed=a.seed)
    tb = time.perf_counter() - t0
    ess_b = batched.min_ess_per_point()
    print(f"batched HMC: {a.chains} chains x ({a.warmup} warmup + {a.draws}) for all {len(idx)} points in {tb:.1f} s; "
          f"min-bulk-ESS per point: median {np.median(ess_b):.0f}, min {ess_b.min():.0f}; divergences {batched.num_divergences}; "
          f"mean leapfrog steps {batched.sample_stats['n_steps'].mean():.1f}")

    t0 = time.perf_counter()
    pyro_draws = nuts_latent(built.model, x[sub], num_samples=a.draws, warmup_steps=a.warmup, num_chains=a.pyro_chains, seed=a.seed)
    tp = time.perf_counter() - t0
    ess_p = pyro_draws.min_ess_per_point()
    print(f"Pyro NUTS, one datapoint at a time: {a.pyro_chains} chains x ({a.warmup} warmup + {a.draws}) on a random subset of "
          f"k = {len(sub)} points in {tp:.1f} s ({tp / len(sub):.1f} s per point); min-bulk-ESS per point: {np.round(ess_p).tolist()}")

    rate_b = ess_b.sum() / tb
    rate_p = ess_p.mean() * len(idx) / (tp / len(sub) * len(idx))  # scaled from k points to N: same ratio per point
    print(f"total min-bulk-ESS/s over N = {len(idx)}: batched {rate_b:.1f}, Pyro NUTS one-at-a-time {rate_p:.1f} "
          f"(scaled from k = {len(sub)}: {tp / len(sub) * len(idx):.0f} s estimated for all N)")
    print(f"ratio batched / one-at-a-time: {rate_b / rate_p:.1f}x")


if __name__ == "__main__":
    main()
