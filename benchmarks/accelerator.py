"""What the analyses cost on the device at hand: CUDA when present, else the CPU, side by side in one process.

Sections (each timed against a named baseline in the same process, the callables run in turn
``--repeats`` times after a warm-up; medians, and the median of the per-repeat ratios):

* **streams**: one HMC transition's noise for ``N`` datapoints,
  ``Streams(0, range(N), device, 4).normal([4, N, 50])`` + ``.uniform([4, N])``, against
  ``torch.randn`` + ``torch.rand`` with one generator (baseline) (``benchmarks/row_streams.py``'s draw).
* **hmc**: batched HMC (``hmc_latent``, 4 chains, ``kernel="hmc"``, diagonal mass) on the 50-d
  latent posteriors of ``N`` images under a binarised-MNIST-shaped VAE (784-200-200-50,
  Bernoulli; random weights, random binary images: the cost does not depend on them). The public
  call cannot be cut to a number of transitions, so it is run twice, with ``1`` and ``1 + T`` kept
  draws (no warm-up, no initial ascent): the difference is ``T`` transitions, setup excluded. The
  trajectory is fixed at ``L`` leapfrog steps (``max_leapfrog=L`` and a trajectory length so long
  that the cap always binds; ``sample_stats["n_steps"]`` is checked). Baseline: ``L`` gradient
  evaluations of the same log joint written by hand in torch, on the same ``[4, N, 50]`` batch.
* **qstar**: ``optimize_local`` (diagonal family, 10 draws, 2 starts), run with ``max_steps`` 1 and
  ``1 + T`` and no check inside (``check_every`` beyond both): the difference is ``T`` steps.
  Baseline: a hand-written Adam step of the same reparameterised ELBO on the same ``[2N, 50]``
  parameters.
* **iwae**: ``importance_bounds(..., num_samples=K, diagnose=False)`` (K = 5000, the amortised
  Gaussian guide): images per second and peak memory. Baseline: the same log weights and
  log-mean-exp written by hand in torch, in chunks of the same number of rows. Peak memory: on
  CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the CPU
  the peak resident set of a fresh subprocess during one call above its resident set when the
  call starts (``VmHWM`` of ``/proc/self/status``, reset to ``VmRSS`` just before the call by writing
  5 to ``/proc/self/clear_refs``; the subprocess has built the model and data). It counts pages
  touched by torch's CPU allocator and Python, not bytes asked for. (``ru_maxrss`` would not do: a
  child inherits its parent's high-water mark through fork and exec, and ``tracemalloc`` does not
  see torch's allocator.)

For each: operations dispatched and host synchronisations per transition / step / chunk, counted
with :class:`ppl_vae.inference.dispatch.Dispatches` (by the same difference for hmc and qstar; an
IWAE chunk is the difference between one and two chunks of rows).

A size whose estimated wall time (linear in ``N`` from the largest size measured before it) is over
``--budget`` seconds is skipped, and the output says so.

Usage: ``python benchmarks/accelerator.py [--device cuda|cpu] [--sizes 100 1000 10000]
[--repeats 5] [--sections streams hmc qstar iwae] [--quick] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from row_streams import _noise
from side_by_side import counts, in_turn, status_kib

from ppl_vae.distributions import Bernoulli
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.gaps.bounds import importance_bounds
from ppl_vae.inference.gaps.local import optimize_local
from ppl_vae.inference.mcmc.hmc import hmc_latent
from ppl_vae.inference.random import Streams
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

LATENT, PIXELS, CHAINS = 50, 784, 4
SECTIONS = ("streams", "hmc", "qstar", "iwae")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------- the model and the hand-written baselines


def build(
    n: int, device: str, seed: int = 0
) -> tuple[Any, Any, torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A 784-200-200-50 Bernoulli VAE with random weights, its amortised Gaussian guide, and ``n`` random binary images."""
    torch.manual_seed(seed)
    decoder = MLP(LATENT, [200, 200], PIXELS).to(device)
    encoder = GaussianEncoder(MLP(PIXELS, [200], 200), 200, LATENT).to(device)
    x = (torch.rand(n, PIXELS, device=device) < 0.3).float()
    return vae(decoder, Bernoulli(), LATENT), amortized_guide(encoder), decoder, encoder, x


def bare_log_joint(decoder: torch.nn.Module, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(z) + log p(x | z)`` written by hand: ``z`` ``[..., N, 50]``, ``x`` ``[N, 784]`` -> ``[..., N]``."""
    logits = decoder(z)
    ll = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    return ll - 0.5 * (z * z).sum(-1) - LATENT * HALF_LOG_2PI


def bare_gradients(
    decoder: torch.nn.Module, x: torch.Tensor, leapfrog: int
) -> Callable[[], object]:
    """``leapfrog`` evaluations of the log joint and its gradient in ``z`` on ``[4, N, 50]``: the floor under one transition."""
    z0 = torch.randn(CHAINS, x.shape[0], LATENT, device=x.device)

    def run() -> object:
        z = z0
        for _ in range(leapfrog):
            zz = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(bare_log_joint(decoder, zz, x).sum(), zz)
            z = z + 1e-3 * g
        return z

    return run


def bare_qstar_step(
    decoder: torch.nn.Module, x: torch.Tensor, draws: int, starts: int
) -> Callable[[], object]:
    """One Adam step of a diagonal Gaussian's reparameterised ELBO for ``starts`` copies of every row."""
    xs = x.repeat(starts, 1)
    loc = torch.zeros(xs.shape[0], LATENT, device=x.device, requires_grad=True)
    log_scale = torch.zeros(xs.shape[0], LATENT, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([loc, log_scale], lr=1e-2)

    def step() -> object:
        eps = torch.randn(draws, *loc.shape, device=x.device)
        z = loc + log_scale.exp() * eps
        log_q = (-0.5 * eps * eps - log_scale - HALF_LOG_2PI).sum(-1)
        loss = -(bare_log_joint(decoder, z, xs) - log_q).mean(0).sum()
        grads = torch.autograd.grad(
            loss, [loc, log_scale]
        )  # not the decoder's weights (optimize_local freezes them)
        loc.grad, log_scale.grad = grads
        opt.step()
        return loss

    return step


def bare_iwae(
    decoder: torch.nn.Module, encoder: torch.nn.Module, x: torch.Tensor, K: int, rows: int
) -> Callable[[], object]:
    """The IWAE bound of every row from ``K`` draws of the encoder's Gaussian, ``rows`` rows at a time, by hand."""

    @torch.no_grad()
    def run() -> object:
        out = []
        for r in range(0, x.shape[0], rows):
            xr = x[r : r + rows]
            loc, scale = encoder(xr)
            eps = torch.randn(K, *loc.shape, device=x.device)
            z = loc + scale * eps
            log_q = (-0.5 * eps * eps - scale.log() - HALF_LOG_2PI).sum(-1)
            lw = bare_log_joint(decoder, z, xr) - log_q
            out.append(torch.logsumexp(lw, 0) - math.log(K))
        return torch.cat(out)

    return run


# --------------------------------------------------------------------------- the package's calls, cut to a difference


def hmc_run(model: Any, x: torch.Tensor, kept: int, leapfrog: int) -> Callable[[], Any]:
    """``hmc_latent`` keeping ``kept`` draws after no warm-up, every transition exactly ``leapfrog`` leapfrog steps."""
    return lambda: hmc_latent(
        model,
        x,
        num_samples=kept,
        warmup_steps=0,
        num_chains=CHAINS,
        seed=0,
        init_steps=0,
        trajectory_length=1e9,
        max_leapfrog=leapfrog,
    )


def qstar_run(model: Any, x: torch.Tensor, steps: int) -> Callable[[], Any]:
    """``optimize_local`` for ``steps`` steps with no check window inside them (its setup and final checks are the same for any ``steps``)."""
    return lambda: optimize_local(
        model,
        x,
        family="diagonal",
        num_samples=10,
        starts=2,
        max_steps=steps,
        check_every=10**9,
        check_samples=10,
        seed=0,
    )


def iwae_run(model: Any, guide: Any, x: torch.Tensor, K: int) -> Callable[[], Any]:
    return lambda: importance_bounds(model, guide, x, num_samples=K, seed=0, diagnose=False)


def iwae_rows_per_chunk(K: int) -> int:
    """Rows per chunk of ``importance_bounds`` at ``K`` draws of a 784-pixel image. An internal: it reads the bounds'
    ``MAX_ELEMENTS`` and repeats their chunking rule (``batch_size=100``); the only place this benchmark reaches inside."""
    from ppl_vae.inference.gaps import bounds

    k_chunk = max(1, min(K, bounds.MAX_ELEMENTS // PIXELS))
    return min(100, max(1, bounds.MAX_ELEMENTS // (k_chunk * PIXELS)))


# --------------------------------------------------------------------------- measuring


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` followed by waiting for the device (CUDA's launches are asynchronous)."""
    if device.startswith("cuda"):
        return lambda: (fn(), torch.cuda.synchronize())
    return fn


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_memory(what: str, n: int, K: int, device: str) -> float:
    """Peak memory of one IWAE pass (``what``: "package" or "bare"), in MiB: see the module docstring."""
    if device.startswith("cuda"):
        model, guide, decoder, encoder, x = build(n, device)
        fn = (
            iwae_run(model, guide, x, K)
            if what == "package"
            else bare_iwae(decoder, encoder, x, K, iwae_rows_per_chunk(K))
        )
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p),
    )
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", what, str(n), str(K), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(what: str, n: int, K: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, guide, decoder, encoder, x = build(n, "cpu")
    fn = (
        iwae_run(model, guide, x, K)
        if what == "package"
        else bare_iwae(decoder, encoder, x, K, iwae_rows_per_chunk(K))
    )
    try:  # "5": reset the peak resident set to the current one (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS")
    except OSError:
        before = status_kib("VmHWM")
    fn()
    print((status_kib("VmHWM") - before) / 1024)


class Sizes:
    """Which sizes of a section to run: skip one whose wall time, linear in ``N`` from the last run, is over the budget."""

    def __init__(
        self, section: str, sizes: list[int], budget: float, skipped: list[dict[str, Any]]
    ) -> None:
        self.section, self.sizes, self.budget, self.skipped = section, sizes, budget, skipped
        self.last: tuple[int, float] | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        for n in self.sizes:
            if self.last is not None:
                n0, wall = self.last
                estimate = wall * n / n0
                if estimate > self.budget:
                    why = f"estimated {estimate:.0f} s (linear in N from {wall:.1f} s at N={n0}) is over --budget {self.budget:g} s"
                    print(f"  skipped N={n}: {why}")
                    self.skipped.append({"section": self.section, "N": n, "why": why})
                    continue
            t0 = time.perf_counter()
            yield n
            self.last = (n, time.perf_counter() - t0)


# --------------------------------------------------------------------------- sections


def streams_section(a: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\n== streams: Streams(0, range(N), {a.device!r}, 4).normal([4, N, 50]) + .uniform([4, N]), float32; "
        f"baseline: torch.randn + torch.rand with one generator =="
    )
    print(
        f"{'N':>6} | {'ops':>5} | {'syncs':>5} | {'baseline ops':>12} | {'streams ms':>10} | {'baseline ms':>11} | {'streams / baseline':>18}"
    )
    for n in a.stream_sizes:
        gen = torch.Generator(device=a.device).manual_seed(0)

        def base(n=n, gen=gen):
            return (
                torch.randn(CHAINS, n, LATENT, generator=gen, device=a.device),
                torch.rand(CHAINS, n, generator=gen, device=a.device),
            )

        ours = _noise(Streams, n, CHAINS, torch.float32, a.device)
        ops, syncs = counts(ours)
        base_ops, _ = counts(base)
        ts, tb = in_turn([synced(ours, a.device), synced(base, a.device)], a.repeats)
        ratio = med([s / b for s, b in zip(ts, tb)])
        print(
            f"{n:>6} | {ops:>5} | {syncs:>5} | {base_ops:>12} | {med(ts) * 1e3:>10.3f} | {med(tb) * 1e3:>11.3f} | {ratio:>18.3g}"
        )
        rows.append(
            {
                "section": "streams",
                "N": n,
                "ops": ops,
                "syncs": syncs,
                "baseline_ops": base_ops,
                "ms": med(ts) * 1e3,
                "baseline_ms": med(tb) * 1e3,
                "ratio": ratio,
            }
        )


def hmc_section(
    a: argparse.Namespace, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> None:
    T, L = a.transitions, a.leapfrog
    print(
        f"\n== hmc: hmc_latent, {CHAINS} chains, {L} leapfrog steps per transition, time and counts per transition "
        f"from runs of 1 and 1+{T} kept draws; baseline: {L} hand-written gradient evaluations on [{CHAINS}, N, 50] =="
    )
    print(
        f"{'N':>6} | {'ops/trans':>9} | {'syncs/trans':>11} | {'ms/trans':>9} | {'trans/s':>8} | {'baseline ms':>11} | {'trans / baseline':>16}"
    )
    for n in Sizes("hmc", a.sizes, a.budget, skipped):
        model, _, decoder, _, x = build(n, a.device)
        short, long = hmc_run(model, x, 1, L), hmc_run(model, x, 1 + T, L)
        steps = long().sample_stats["n_steps"]
        assert (steps == L).all(), (
            f"expected {L} leapfrog steps in every transition, got {steps.min()}..{steps.max()}"
        )
        (o1, s1), (o2, s2) = counts(short), counts(long)
        ops, syncs = (o2 - o1) / T, (s2 - s1) / T
        t1, t2, tb = in_turn(
            [
                synced(short, a.device),
                synced(long, a.device),
                synced(bare_gradients(decoder, x, L), a.device),
            ],
            a.repeats,
        )
        per = [(y - x_) / T for x_, y in zip(t1, t2)]
        ratio = med([p / b for p, b in zip(per, tb)])
        print(
            f"{n:>6} | {ops:>9.1f} | {syncs:>11.1f} | {med(per) * 1e3:>9.2f} | {1 / med(per):>8.2f} | {med(tb) * 1e3:>11.2f} | {ratio:>16.3g}"
        )
        rows.append(
            {
                "section": "hmc",
                "N": n,
                "leapfrog": L,
                "ops": ops,
                "syncs": syncs,
                "ms": med(per) * 1e3,
                "per_second": 1 / med(per),
                "baseline_ms": med(tb) * 1e3,
                "ratio": ratio,
            }
        )


def qstar_section(
    a: argparse.Namespace, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> None:
    T = a.qstar_steps
    print(
        f"\n== qstar: optimize_local (diagonal, 10 draws, 2 starts), time and counts per step from runs of 1 and 1+{T} steps "
        f"(no check window among them); baseline: a hand-written Adam step of the same ELBO =="
    )
    print(
        f"{'N':>6} | {'ops/step':>8} | {'syncs/step':>10} | {'ms/step':>8} | {'steps/s':>8} | {'baseline ms':>11} | {'step / baseline':>15}"
    )
    for n in Sizes("qstar", a.sizes, a.budget, skipped):
        model, _, decoder, _, x = build(n, a.device)
        short, long = qstar_run(model, x, 1), qstar_run(model, x, 1 + T)
        (o1, s1), (o2, s2) = counts(short), counts(long)
        ops, syncs = (o2 - o1) / T, (s2 - s1) / T
        t1, t2, tb = in_turn(
            [
                synced(short, a.device),
                synced(long, a.device),
                synced(bare_qstar_step(decoder, x, 10, 2), a.device),
            ],
            a.repeats,
        )
        per = [(y - x_) / T for x_, y in zip(t1, t2)]
        ratio = med([p / b for p, b in zip(per, tb)])
        print(
            f"{n:>6} | {ops:>8.1f} | {syncs:>10.1f} | {med(per) * 1e3:>8.2f} | {1 / med(per):>8.2f} | {med(tb) * 1e3:>11.2f} | {ratio:>15.3g}"
        )
        rows.append(
            {
                "section": "qstar",
                "N": n,
                "ops": ops,
                "syncs": syncs,
                "ms": med(per) * 1e3,
                "per_second": 1 / med(per),
                "baseline_ms": med(tb) * 1e3,
                "ratio": ratio,
            }
        )


def iwae_section(
    a: argparse.Namespace, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> None:
    K, r = a.K, iwae_rows_per_chunk(a.K)
    memory = (
        "torch.cuda.max_memory_allocated above the allocation before the call"
        if a.device.startswith("cuda")
        else "VmHWM over VmRSS at the call, in a fresh subprocess (clear_refs)"
    )
    print(
        f"\n== iwae: importance_bounds K={K} (diagnose=False), {r} rows per chunk; baseline: the same bound by hand in torch, "
        f"{r} rows at a time; peak memory: {memory} =="
    )
    print(
        f"{'N':>6} | {'ops/chunk':>9} | {'syncs/chunk':>11} | {'images/s':>8} | {'baseline img/s':>14} | {'time / baseline':>15} | {'peak MiB':>8} | {'baseline MiB':>12}"
    )
    model1, guide1, _, _, x1 = build(2 * r, a.device)
    (o1, s1), (o2, s2) = (
        counts(iwae_run(model1, guide1, x1[:r], K)),
        counts(iwae_run(model1, guide1, x1, K)),
    )
    ops, syncs = o2 - o1, s2 - s1
    for n in Sizes("iwae", a.iwae_sizes, a.budget, skipped):
        model, guide, decoder, encoder, x = build(n, a.device)
        tp, tb = in_turn(
            [
                synced(iwae_run(model, guide, x, K), a.device),
                synced(bare_iwae(decoder, encoder, x, K, r), a.device),
            ],
            a.repeats,
        )
        ratio = med([p / b for p, b in zip(tp, tb)])
        mem, mem_base = peak_memory("package", n, K, a.device), peak_memory("bare", n, K, a.device)
        print(
            f"{n:>6} | {ops:>9} | {syncs:>11} | {n / med(tp):>8.1f} | {n / med(tb):>14.1f} | {ratio:>15.3g} | {mem:>8.0f} | {mem_base:>12.0f}"
        )
        rows.append(
            {
                "section": "iwae",
                "N": n,
                "K": K,
                "rows_per_chunk": r,
                "ops": ops,
                "syncs": syncs,
                "per_second": n / med(tp),
                "baseline_per_second": n / med(tb),
                "ratio": ratio,
                "peak_mib": mem,
                "baseline_peak_mib": mem_base,
                "memory": memory,
            }
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_memory":  # a child of peak_memory
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 10000],
        help="datapoints for hmc and qstar",
    )
    ap.add_argument(
        "--iwae-sizes",
        type=int,
        nargs="+",
        default=None,
        help="images for iwae (default: 100 1000 on CUDA, 100 on the CPU)",
    )
    ap.add_argument("--stream-sizes", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--transitions", type=int, default=5, help="HMC transitions in the timed difference"
    )
    ap.add_argument("--leapfrog", type=int, default=8, help="leapfrog steps per HMC transition")
    ap.add_argument("--qstar-steps", type=int, default=5, help="q* steps in the timed difference")
    ap.add_argument("--K", type=int, default=5000, help="IWAE importance samples")
    ap.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="skip a size whose estimated wall time in a section is over this many seconds",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that every section runs"
    )
    ap.add_argument("--json", metavar="OUT", help="write the table as JSON")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not cuda:
        ap.error("--device cuda: no CUDA device here")
    if a.quick:
        a.sizes, a.stream_sizes, a.iwae_sizes = [4, 8], [10, 100], [4]
        a.repeats, a.transitions, a.leapfrog, a.qstar_steps, a.K = 1, 2, 2, 2, 50
    if a.iwae_sizes is None:
        a.iwae_sizes = [100, 1000] if a.device.startswith("cuda") else [100]
    torch.set_num_threads(a.threads)
    name = (
        torch.cuda.get_device_name(a.device)
        if a.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} torch thread(s)"
    )
    print(
        f"accelerator benchmark on {a.device} ({name}), torch {torch.__version__}, {a.repeats} repeats, medians; "
        f"VAE 784-200-200-50 Bernoulli, random weights, random binary images"
    )
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if (
        "iwae" in a.sections
        and not a.device.startswith("cuda")
        and a.iwae_sizes == [100]
        and not a.quick
    ):
        print(
            "(iwae on the CPU: 100 images by default; K=5000 draws of 1,000 images take minutes a pass: --iwae-sizes 100 1000 to run them)"
        )
    if "streams" in a.sections:
        with torch.no_grad():
            streams_section(a, rows)
    for section in ("hmc", "qstar", "iwae"):
        if section in a.sections:
            globals()[f"{section}_section"](a, rows, skipped)
    if skipped:
        print("\nskipped: " + "; ".join(f"{s['section']} N={s['N']} ({s['why']})" for s in skipped))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "device": a.device,
                    "device_name": name,
                    "torch": torch.__version__,
                    "repeats": a.repeats,
                    "rows": rows,
                    "skipped": skipped,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
