"""Batched HMC transitions on a binarised-MNIST VAE posterior: the transition before and after issue 30, side by side in one process.

What is measured
----------------
One HMC transition of ``C`` chains for each of ``N`` datapoints of the 50-d latent posterior
of a VAE shaped like binarised MNIST (decoder 50-200-200-784, Bernoulli likelihood, random
weights; ``ppl_vae.inference.latent.log_joint``), for ``N`` in ``--rows``:

* **before**: the transition as it was before issue 30 (a copy below, :func:`transition_before`):
  it runs ``max(steps)`` leapfrog steps, read from the device, and reads per leapfrog step
  whether any chain is still moving and whether any diverged;
* **after**: :func:`ppl_vae.inference.kernel.transition`, which runs a number of leapfrog
  steps given on the host (``max_steps``, which the sampler reads once per check window) and
  masks the chains that are done, reading nothing back.

Two step plans: ``jittered``, the sampler's (every chain ``ceil(U(0, 2T) / eps_n)`` steps, a
step size per datapoint in ``[0.1, 0.2]``, ``T = 1``: at most 20 steps), and ``fixed``, AIS's
(10 steps every chain). Both transitions get the same state, step sizes and steps; the streams
are drawn afresh each call. Printed per row: operations dispatched and host synchronisations per
transition (:class:`~ppl_vae.inference.dispatch.Dispatches`), the median time of each over
``--repeats`` alternate runs after a warm-up (``side_by_side.timings``), transitions per second,
and the median of the per-pair time ratios. One torch thread unless ``--threads``.

Usage: ``python benchmarks/hmc_transition.py [--rows 100 1000] [--repeats 5] [--chains 4]``
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics

import torch
from side_by_side import counts, timings

from ppl_vae.distributions import Bernoulli
from ppl_vae.inference.kernel import (
    State,
    momentum,
    transition,
    value_and_grad,
    velocity,
)
from ppl_vae.inference.latent import latent_of, log_joint
from ppl_vae.inference.random import Streams
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP


def transition_before(f, state, eps, steps, noise, *, inv_mass=None, max_energy_error=math.inf):  # type: ignore[no-untyped-def]
    """The HMC transition before issue 30: ``int(steps.max())`` leapfrog steps, two reads back per step."""
    u0, lp0, g0 = state
    C, G = lp0.shape
    e = (eps if eps.dim() == 2 else eps.expand(C, G))[..., None]
    m = inv_mass if inv_mass is not None else u0.new_ones(())
    steps_t = (
        steps
        if isinstance(steps, torch.Tensor)
        else torch.full((C, G), steps, dtype=torch.long, device=u0.device)
    )
    r = momentum(m, noise.normal(u0.shape, dim=1, dtype=u0.dtype))

    def energy(lp, r):  # type: ignore[no-untyped-def]
        return -lp + 0.5 * (r * velocity(m, r)).sum(-1)

    h0 = energy(lp0, r)
    z, lp, g = u0, lp0, g0
    r = r + 0.5 * e * g
    diverging = torch.zeros(C, G, dtype=torch.bool, device=u0.device)
    for step in range(int(steps_t.max())):
        act = (step < steps_t) & ~diverging
        if not act.any():
            break
        a = act[..., None]
        z = torch.where(a, z + e * velocity(m, r), z)
        lp_new, g_new = value_and_grad(f, z)
        lp = torch.where(act, lp_new, lp)
        g = torch.where(a, g_new, g)
        r = torch.where(a, r + torch.where((step == steps_t - 1)[..., None], 0.5 * e, e) * g, r)
        h = energy(lp, r)
        bad = act & (~torch.isfinite(h) | (h - h0 > max_energy_error))
        if bad.any():
            diverging |= bad
            z = torch.where(bad[..., None], u0, z)
            lp = torch.where(bad, lp0, lp)
            g = torch.where(bad[..., None], g0, g)
    delta = energy(lp, r) - h0
    delta = torch.where(torch.isfinite(delta) & ~diverging, delta, torch.full_like(delta, math.inf))
    accept_prob = torch.exp(-delta.clamp(min=0))
    accept = noise.uniform(accept_prob.shape, dim=1, dtype=accept_prob.dtype) < accept_prob
    new = State(
        torch.where(accept[..., None], z, u0),
        torch.where(accept, lp, lp0),
        torch.where(accept[..., None], g, g0),
    )
    return new, accept_prob, diverging


def posterior(n: int, chains: int):  # type: ignore[no-untyped-def]
    """The VAE's latent log density on ``n`` binary rows, and a state at draws from the prior."""
    torch.manual_seed(0)
    decoder = MLP(50, [200, 200], 784)
    for p in decoder.parameters():
        p.requires_grad_(False)
    model = vae(decoder, Bernoulli(), 50)
    x = (torch.rand(n, 784) < 0.3).float()
    f = log_joint(model, latent_of(model, x, analysis="benchmark"), x)
    return f, State.at(f, torch.randn(chains, n, 50))


def table(rows: list[int], chains: int, repeats: int) -> None:
    print(
        f"HMC transition, VAE 50-200-200-784 Bernoulli, {chains} chains per datapoint, float32, {repeats} alternate repeats, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"{'N':>5} | {'steps':>8} | {'ops before':>10} | {'ops after':>9} | {'syncs before':>12} | {'syncs after':>11} | "
        f"{'ms before':>9} | {'ms after':>8} | {'trans/s before':>14} | {'trans/s after':>13} | before/after (median of pairs)"
    )
    for n in rows:
        f, state = posterior(n, chains)
        noise = Streams(0, range(n), "cpu", 4)
        gen = torch.Generator().manual_seed(1)
        eps = 0.1 + 0.1 * torch.rand(n, generator=gen)
        jitter = (
            torch.ceil(2 * 1.0 * torch.rand(chains, n, generator=gen) / eps).clamp(1, 256).long()
        )
        bound = int(
            torch.ceil(2 * 1.0 / eps).clamp(1, 256).max()
        )  # the sampler's plan: read once per window, not per transition
        for plan, steps, max_steps in (("jittered", jitter, bound), ("fixed", 10, 10)):
            before = functools.partial(transition_before, f, state, eps, steps, noise)
            after = functools.partial(transition, f, state, eps, steps, noise, max_steps=max_steps)
            (ob, sb), (oa, sa) = counts(before), counts(after)
            tb, ta = timings(before, after, repeats)
            mb, ma = statistics.median(tb), statistics.median(ta)
            ratio = statistics.median(x / y for x, y in zip(tb, ta))
            print(
                f"{n:>5} | {plan:>8} | {ob:>10} | {oa:>9} | {sb:>12} | {sa:>11} | {mb * 1e3:>9.1f} | {ma * 1e3:>8.1f} | "
                f"{1 / mb:>14.3g} | {1 / ma:>13.3g} | {ratio:.3g} (min {min(x / y for x, y in zip(tb, ta)):.3g}, max {max(x / y for x, y in zip(tb, ta)):.3g})"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    table(a.rows, a.chains, a.repeats)


if __name__ == "__main__":
    main()
