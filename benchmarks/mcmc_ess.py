"""Batched HMC and NUTS vs one-at-a-time Pyro NUTS on VAE latent posteriors: min-bulk-ESS per second and per gradient.

All samplers run side by side in one process on the same trained model and
datapoints. The batched samplers do all ``N`` datapoints at once; Pyro's
NUTS runs on a random subset of ``k`` of them, one datapoint after another, and
its per-datapoint time and ESS are scaled to ``N`` (stated in the output). The
figure of merit is the sum over datapoints of the minimum (over latent
dimensions) bulk ESS, divided by the wall time it took, and by the gradient
evaluations it took (counted as model runs: a batched run evaluates every chain
of every datapoint, waiting chains included, so that is what it is charged).
For the batched samplers a second per-gradient figure counts only the leapfrog
steps each chain used while sampling (``sample_stats["n_steps"]``, Stan's
``n_leapfrog``): the sampler's own efficiency, without the cost of lockstep
(a chain whose trajectory ended early waits for the longest one of its batch).

    python benchmarks/mcmc_ess.py                       # trains a 5-d VAE on digits
    python benchmarks/mcmc_ess.py --run runs/mnist-ffg  # a trained run directory
    python benchmarks/mcmc_ess.py --samplers nuts/diag,nuts/dense --pyro-points 2
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
from ppl_vae.app.runs import open_run
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.mcmc.nuts import nuts_latent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--run", default=None, help="trained run directory (default: train a small digits VAE)"
    )
    p.add_argument("--latent-dim", type=int, default=5)
    p.add_argument("--num-points", type=int, default=100)
    p.add_argument(
        "--pyro-points",
        type=int,
        default=3,
        help="datapoints Pyro's NUTS runs on (scaled to --num-points)",
    )
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--pyro-chains", type=int, default=2)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--samplers",
        default="hmc/diag,nuts/diag,nuts/dense",
        help="batched samplers to run, kernel/mass, comma-separated",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.run is None:
        tmp = tempfile.mkdtemp(prefix="mcmc-ess-")
        cfg = Config(
            model="vae",
            dataset="digits",
            binarize="threshold",
            latent_dim=a.latent_dim,
            hidden=(128, 128),
            epochs=30,
            lr=3e-3,
            seed=a.seed,
        )
        run(cfg, tmp, progress=False, figures=False)
        a.run = tmp
    built, splits = open_run(a.run)
    test = splits["test"]
    idx = pick_points(len(test), num_points=a.num_points, seed=a.seed)
    x = test.x[idx]
    sub = torch.randperm(len(idx), generator=torch.Generator().manual_seed(a.seed + 1))[
        : a.pyro_points
    ].tolist()
    print(
        f"model: {a.run} (latent dim {built.config.latent_dim}), N = {len(idx)} datapoints, torch threads = 1"
    )

    model = built.model
    calls = [0]

    def counted(
        *args, **kwargs
    ):  # every gradient evaluation runs the model once (a batched run: all chains of all points at once)
        calls[0] += 1
        return model(*args, **kwargs)

    rows = []
    for kernel, mass in [k.split("/") for k in a.samplers.split(",")]:
        calls[0] = 0
        t0 = time.perf_counter()
        d = hmc_latent(
            counted,
            x,
            num_samples=a.draws,
            warmup_steps=a.warmup,
            num_chains=a.chains,
            seed=a.seed,
            kernel=kernel,
            mass=mass,
        )
        wall = time.perf_counter() - t0
        ess = d.min_ess_per_point()
        grads = (
            calls[0] * a.chains * len(idx)
        )  # per-chain evaluations, masked (waiting) chains included
        useful = float(d.sample_stats["n_steps"].sum())
        rows.append(
            dict(
                sampler=f"batched {kernel.upper()} ({mass} mass)",
                points=len(idx),
                wall=wall,
                ess=ess,
                grads=grads,
                used=useful,
                note=f"{useful / (a.chains * a.draws * len(idx)):.1f} leapfrog steps per draw while sampling; {d.num_divergences} divergences",
            )
        )
    calls[0] = 0
    t0 = time.perf_counter()
    pyro_draws = nuts_latent(
        counted,
        x[sub],
        num_samples=a.draws,
        warmup_steps=a.warmup,
        num_chains=a.pyro_chains,
        seed=a.seed,
    )
    tp = time.perf_counter() - t0
    ess_p = pyro_draws.min_ess_per_point()
    rows.append(
        dict(
            sampler="Pyro NUTS, one datapoint at a time",
            points=len(sub),
            wall=tp,
            ess=ess_p,
            grads=calls[0] * 1,
            used=None,
            note=f"{a.pyro_chains} chains; scaled to N = {len(idx)} at its per-point rate ({tp / len(sub):.1f} s per point)",
        )
    )

    print(
        f"\n{a.chains} chains x ({a.warmup} warmup + {a.draws} draws) per datapoint for the batched samplers\n"
    )
    print(
        "| sampler | datapoints run | wall s | min-bulk-ESS per point (median) | total min-bulk-ESS/s, scaled to N | min-bulk-ESS per gradient evaluation | per leapfrog step used while sampling | vs Pyro NUTS (ESS/s) | |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[-1]["ess"].mean() / (rows[-1]["wall"] / rows[-1]["points"])
    for r in rows:
        per_s = r["ess"].mean() / (
            r["wall"] / r["points"]
        )  # total ESS over N points / the time all N take (k points: scaled)
        print(
            f"| {r['sampler']} | {r['points']} | {r['wall']:.1f} | {np.median(r['ess']):.0f} | {per_s:.1f} | {r['ess'].sum() / r['grads']:.4f} | "
            f"{'—' if r['used'] is None else format(r['ess'].sum() / r['used'], '.4f')} | {per_s / base:.1f}x | {r['note']} |"
        )


if __name__ == "__main__":
    main()
