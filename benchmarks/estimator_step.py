"""Cost of one ``fit`` step of each score-function variant against the plain score function.

What is measured
----------------
The wall-clock time per optimisation step of ``ppl_vae.fit`` on the
Bernoulli-latent VAE 784-200-784 (linear encoder and decoder, 200 Bernoulli
latents, Bernoulli likelihood), batch 100, Adam lr 1e-3, random binary data
of ``steps * 100`` rows, for the estimators ``score`` (the named baseline,
Pyro's ``Trace_ELBO``), ``score+average``, ``score+nvil``, ``score+loo``
(2 particles), ``relaxed`` and ``iwae`` (2 particles, VIMCO). Per-step time
= ``history[-1]["wall_time"] / steps`` (the training loop only). After one
warm-up run of each, the estimators are run round-robin ``--repeats`` times;
the report gives the median ms/step and the median ratio to ``score`` of the
same round. Estimators with 2 particles do twice the sampling work per step.

Usage: ``python benchmarks/estimator_step.py [--steps N] [--repeats R]``
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ppl_vae.app.registry import discrete_vae
from ppl_vae.distributions import get_likelihood
from ppl_vae.inference.svi import fit

SPECS = (
    ("score", 1),
    ("score+average", 1),
    ("score+nvil", 1),
    ("score+loo", 2),
    ("relaxed", 1),
    ("iwae", 2),
)


def step_ms(estimator: str, k: int, x: torch.Tensor) -> float:
    torch.manual_seed(0)
    model, guide, _, _ = discrete_vae("bernoulli-vae", 784, 200, (), get_likelihood("bernoulli"))
    r = fit(
        model,
        guide,
        x,
        estimator=estimator,
        num_particles=k,
        epochs=1,
        batch_size=100,
        lr=1e-3,
        progress=False,
    )
    return 1000 * r.history[-1]["wall_time"] / r.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    x = (
        torch.rand(args.steps * 100, 784, generator=torch.Generator().manual_seed(0)) < 0.3
    ).float()
    for est, k in SPECS:  # warm-up
        step_ms(est, k, x[:200])
    times: dict[str, list[float]] = {est: [] for est, _ in SPECS}
    for _ in range(args.repeats):
        for est, k in SPECS:
            times[est].append(step_ms(est, k, x))
    base = times["score"]
    print(f"{'estimator':<15}{'K':>3}{'ms/step':>10}{'ratio vs score':>16}")
    for est, k in SPECS:
        ratios = [t / b for t, b in zip(times[est], base)]
        print(
            f"{est:<15}{k:>3}{statistics.median(times[est]):>10.2f}{statistics.median(ratios):>16.2f}"
        )


if __name__ == "__main__":
    main()
