"""q* steps and IWAE chunks before and after issue 30 (no host reads in inner loops), side by side in one process.

What is measured
----------------
On a VAE shaped like binarised MNIST (784-200-200-50, Bernoulli likelihood,
random weights: the counts and times depend on the shapes only):

* **q\\* steps**: the diagonal family, 10 draws a step, path-derivative
  gradient, on ``--qstar-rows`` rows ((datapoint, start) pairs):

  - "before": the loop body of ``optimize_local`` before issue 30, kept here
    (:class:`OldSteps`): the moving rows found with ``nonzero`` every step,
    the ELBO's finiteness read every step, ``torch.optim.Adam`` with each
    row's step size applied after it, converged rows copied back every step,
    Pyro's validation on; its check window judged with boolean indexing;
  - "after": :func:`~ppl_vae.inference.gaps.local.local_step` on a
    :class:`~ppl_vae.inference.gaps.local.LocalState`, the window
    :func:`~ppl_vae.inference.gaps.local.check_window` and its one read;
  - "after, compiled": the same with Adam's update under ``torch.compile``.

  Steps per second (``--steps`` steps a timed call, the variants alternated
  ``--repeats`` times after a warm-up, medians and the median of the paired
  ratios), and the operations dispatched and host synchronisations of one
  step and of one check window at 8 and 64 rows
  (:class:`~ppl_vae.inference.dispatch.Dispatches`).

* **IWAE K = 5000**: ``importance_bounds`` (ELBO, IWAE and PSIS k-hat from the
  same draws) on ``--iwae-rows`` images, against the chunk loop before issue
  30 (:func:`old_bounds`: Pyro's validation on, k-hat read back per chunk of
  rows). Images per second, peak memory, and the operations and host
  synchronisations per chunk (from runs of 2 and 5 chunks of 8 and of 64
  rows). The same from a defensive mixture proposal, as ``decompose``
  estimates log p(x) from: before issue 30 a mixture had no draw from noise
  and ran one datapoint a chunk (:class:`RowByRowMixture`); now it is drawn
  for all rows at once. Peak memory is the process's peak resident set above its size at the
  start, the peak reset before each run through ``/proc/self/clear_refs``
  (Linux; torch's CPU allocations are not seen by ``tracemalloc``), with
  glibc's mmap threshold fixed at 128 KiB so that a freed tensor leaves the
  resident set and the next run's peak is its own.

One torch thread unless ``--threads``.

Usage: ``python benchmarks/local_steps.py [--qstar-rows 200] [--steps 10] [--iwae-rows 20] [--repeats 7]``
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import numpy as np
import pyro
import torch
from side_by_side import median_ratio, status_kib, timings

from ppl_vae.distributions import Bernoulli
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.guides.local import LocalMixture, LocalPosterior, Mixture
from ppl_vae.inference.dispatch import Dispatches, host
from ppl_vae.inference.gaps import local
from ppl_vae.inference.gaps.bounds import (
    MAX_ELEMENTS,
    chunks,
    importance_bounds,
    khat_of_tail,
    log_mean_exp,
    tail_size,
)
from ppl_vae.inference.latent import latent_of
from ppl_vae.inference.random import Streams, Tag, base_seed, dataset_index, seeded
from ppl_vae.inference.traces import (
    analysed,
    log_weights,
    log_weights_of,
    plate_nesting,
    probe,
    restrict,
    traces,
)
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

SAMPLES, CHECK = 10, 100


def binarised_mnist_vae() -> tuple[Callable[..., object], Callable[..., object]]:
    torch.manual_seed(0)
    return vae(MLP(50, [200, 200], 784), Bernoulli(), 50), amortized_guide(
        GaussianEncoder(MLP(784, [200], 200), 200, 50)
    )


def images(n: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 784), 0.3), generator=torch.Generator().manual_seed(n))


class Setup:
    """The model (its data plate named), ``n`` images, a diagonal ``q*`` started at the prior, and the step and check streams."""

    def __init__(self, n: int) -> None:
        model, _ = binarised_mnist_vae()
        self.x = images(n)
        self.model, _ = analysed(model, None, (self.x,), "q*")
        latent = latent_of(self.model, self.x, analysis="q*")
        start = torch.distributions.Independent(
            torch.distributions.Normal(torch.zeros(n, 50), torch.ones(n, 50)), 1
        )
        self.posterior = LocalPosterior.initial("diagonal", start, latent)
        self.nesting = plate_nesting(self.model, self.posterior.select(slice(0, 1)), self.x[:1])
        self.n = n

    def streams(self, tag: int) -> Streams:
        return Streams(0, range(self.n), "cpu", Tag.LOCAL, tag)


class OldSteps:
    """The loop body of ``optimize_local`` before issue 30 (its step and its check window), on every row of a :class:`Setup`."""

    def __init__(self, s: Setup, lr: float = 0.01) -> None:
        self.s, self.lr = s, lr
        self.posterior = s.posterior.take(torch.arange(s.n))
        self.params = list(self.posterior.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.streams, self.check = s.streams(2), s.streams(3)
        n = s.n
        self.active = torch.ones(n, dtype=torch.bool)
        self.steps = torch.zeros(n, dtype=torch.long)
        self.scale = torch.ones(n, dtype=torch.float64)
        self.decays = torch.zeros(n, dtype=torch.long)
        self.change, self.change_se = (
            torch.full((n,), math.nan, dtype=torch.float64),
            torch.full((n,), math.nan, dtype=torch.float64),
        )
        self.frozen = [p.detach().clone() for p in self.params]
        lw = self.evaluate(torch.arange(n))
        self.last_lw, self.before_last_lw, self.anchor_lw = lw.clone(), lw.clone(), lw.clone()
        self.step_no = 0

    def evaluate(self, rows: torch.Tensor) -> torch.Tensor:
        """``check_log_weights`` before issue 30: the rows read back with ``tolist``."""
        s = self.s
        picked = self.check.select(rows.tolist())
        with torch.no_grad(), picked.replaying():
            model_tr, guide_tr = traces(
                s.model,
                self.posterior.select(rows),
                s.x[rows],
                num_samples=CHECK,
                nesting=s.nesting,
                streams=picked,
            )
            return log_weights_of(model_tr, guide_tr).double()

    def step(self) -> None:
        s, posterior, params, active, scale = (
            self.s,
            self.posterior,
            self.params,
            self.active,
            self.scale,
        )
        self.step_no += 1
        rows = active.nonzero().squeeze(-1)
        model_tr, guide_tr = traces(
            s.model,
            posterior.select(rows),
            s.x[rows],
            num_samples=SAMPLES,
            nesting=s.nesting,
            streams=self.streams.select(rows),
        )
        lw = log_weights_of(model_tr, guide_tr)
        if not torch.isfinite(lw).all():
            raise RuntimeError(f"non-finite ELBO at step {self.step_no}")
        u = guide_tr.nodes["z"]["value"]
        objective = (
            lw
            + guide_tr.nodes["z"]["fn"].log_prob(u)
            - posterior.distribution(rows, detach=True).log_prob(u)
        )
        grads = torch.autograd.grad(-objective.mean(0).sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        slowed = bool((scale < 1).any())
        before = [p.detach().clone() for p in params] if slowed else []
        self.opt.step()
        with torch.no_grad():
            for p, b0 in zip(params, before):
                p.copy_(b0 + scale.to(p.dtype).view(-1, *([1] * (p.dim() - 1))) * (p - b0))
            if not active.all():
                for p, f in zip(params, self.frozen):
                    p[~active] = f[~active]
            self.steps[rows] += 1

    def window(self, lr_decays: int = 8, tol: float = 0.01) -> None:
        rows = self.active.nonzero().squeeze(-1)
        with torch.no_grad():
            now = self.evaluate(rows)
            d, d_se = local.window_change(now, self.before_last_lw[:, rows])
            self.before_last_lw[:, rows] = self.last_lw[:, rows]
            g, g_se = local.window_change(now, self.anchor_lw[:, rows])
            first_halving = self.decays[rows] == 0
            g, g_se = torch.where(first_halving, d, g), torch.where(first_halving, d_se, g_se)
            self.change[rows], self.change_se[rows] = g, g_se
            self.last_lw[:, rows] = now
            slower, done = local.judge_window(d, d_se, g, g_se, self.decays[rows], lr_decays, tol)
            self.scale[rows[slower]] /= 2
            self.decays[rows[slower]] += 1
            self.anchor_lw[:, rows[slower]] = now[:, slower]
            stopped = rows[done]
            for p, f in zip(self.params, self.frozen):
                f[stopped] = p[stopped]
            self.active[stopped] = False
            f"{int(self.active.sum())} still moving"
            if not self.active.any():
                return


class NewSteps:
    """:func:`~ppl_vae.inference.gaps.local.local_step` and the check window of ``optimize_local`` on every row of a :class:`Setup`."""

    def __init__(self, s: Setup, lr: float = 0.01, compile: bool = False) -> None:
        self.s, self.lr = s, lr
        self.work = s.posterior.take(torch.arange(s.n))
        self.check, self.rows = s.streams(3), list(range(s.n))
        with pyro.validation_enabled(False):
            start = self.evaluate()
        self.state = local.LocalState.initial(self.work, start)
        self.objective = local.local_objective(
            s.model,
            self.work,
            (s.x,),
            s.streams(2),
            num_samples=SAMPLES,
            nesting=s.nesting,
            site="z",
            stl=True,
        )
        self.update = local.compiled_adam() if compile else local.adam_update

    def evaluate(self) -> torch.Tensor:
        return local.check_log_weights(
            self.s.model,
            self.work,
            (self.s.x,),
            self.rows,
            self.check,
            num_samples=CHECK,
            nesting=self.s.nesting,
        )

    def step(self) -> None:
        with pyro.validation_enabled(False):
            self.state = local.local_step(
                self.state, self.objective, lr=self.lr, update=self.update
            )

    def window(self, lr_decays: int = 8, tol: float = 0.01) -> None:
        with pyro.validation_enabled(False):
            self.state, done = local.check_window(
                self.state, self.evaluate(), lr_decays=lr_decays, tol=tol
            )
            host(torch.stack((done.long(), self.state.bad)))


def counted(fn: Callable[[], object]) -> Dispatches:
    fn()  # what the first call builds is not the step's
    with Dispatches() as d:
        fn()
    return d


def old_bounds(
    model: Callable[..., object],
    guide: Callable[..., object],
    *data: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_batch: int | None = None,
    seed: int | None = 0,
) -> dict[str, torch.Tensor]:
    """The chunk loop of ``importance_bounds`` before issue 30: Pyro's validation on, each chunk of rows' k-hat read back as it ends."""
    n = data[0].shape[0]
    index = dataset_index(None, n)
    model, guide = analysed(model, guide, data, "the importance bounds")
    width = max(1, math.prod(data[0].shape[1:]))
    K = num_samples
    k_chunk = sample_batch or max(1, min(K, MAX_ELEMENTS // width))
    out = {
        k: torch.empty(n, dtype=torch.float64)
        for k in ("elbo", "elbo_se", "iwae", "iwae_se", "khat")
    }
    m = tail_size(K)
    with seeded(seed), torch.no_grad():
        base = base_seed(seed)
        first, head = restrict(guide, slice(0, 1)), tuple(t[:1] for t in data)
        nesting = probe("importance bounds", lambda: plate_nesting(model, first, *head), data)
        rows_per_chunk = min(batch_size, max(1, MAX_ELEMENTS // (k_chunk * width)))
        for rows in chunks(n, rows_per_chunk):
            args = tuple(t[rows] for t in data)
            g = restrict(guide, rows)
            shift = s1 = s2 = lse1 = lse2 = top = low = None
            for j, ks in enumerate(chunks(K, k_chunk)):
                streams = Streams(base, index[rows], data[0].device, Tag.BOUNDS, j)
                lw = log_weights(
                    model,
                    g,
                    *args,
                    num_samples=ks.stop - ks.start,
                    nesting=nesting,
                    streams=streams,
                ).double()
                if shift is None:
                    shift = lw.mean(0)
                    s1, s2 = torch.zeros_like(shift), torch.zeros_like(shift)
                    lse1, lse2 = (
                        torch.full_like(shift, -math.inf),
                        torch.full_like(shift, -math.inf),
                    )
                    top, low = lw.new_zeros((0, *shift.shape)), torch.full_like(shift, math.inf)
                c = lw - shift
                s1 += c.sum(0)
                s2 += (c * c).sum(0)
                lse1 = torch.logaddexp(lse1, torch.logsumexp(lw, 0))
                lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * lw, 0))
                both = torch.cat([top, lw])
                top = both.topk(min(m, both.shape[0]), dim=0).values
                low = torch.minimum(low, lw.min(0).values)
            mean_c = s1 / K
            out["elbo"][rows] = shift + mean_c
            var = (s2 / K - mean_c**2).clamp_min(0) * K / max(K - 1, 1)
            out["elbo_se"][rows] = (var / K).sqrt()
            out["iwae"][rows], out["iwae_se"][rows] = log_mean_exp(lse1, lse2, K)
            out["khat"][rows] = khat_of_tail(top, low, K)
    if not torch.isfinite(out["elbo"]).all():
        raise ValueError("some log-weights are not finite")
    return out


def fixed_mmap_threshold() -> None:
    """Large blocks from ``mmap`` and back to the system when freed (glibc otherwise raises the threshold and keeps them resident)."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def peak_rss_above_start(fn: Callable[[], object]) -> float:
    """MiB: the process's peak resident set while ``fn`` runs, above its resident set at the start (Linux: VmHWM reset by /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - start) / 1024


def qstar_table(rows: int, steps: int, repeats: int, compile: bool) -> None:
    print(
        f"q* steps (diagonal, {SAMPLES} draws a step, path derivative), {torch.get_num_threads()} thread(s)"
    )
    print(
        f"{'':>22} | {'ops/step 8':>10} | {'ops/step 64':>11} | {'syncs/step':>10} | {'ops/window 8':>12} | {'ops/window 64':>13} | {'syncs/window':>12}"
    )
    kinds = {"before": OldSteps, "after": NewSteps}
    for name, kind in kinds.items():
        c = {n: (counted(kind(Setup(n)).step), counted(kind(Setup(n)).window)) for n in (8, 64)}
        print(
            f"{name:>22} | {c[8][0].ops:>10} | {c[64][0].ops:>11} | {c[8][0].syncs:>4} / {c[64][0].syncs:<3} | {c[8][1].ops:>12} | {c[64][1].ops:>13} | "
            f"{c[8][1].syncs:>5} / {c[64][1].syncs:<4}"
        )
    s = Setup(rows)
    old, new = OldSteps(s), NewSteps(s)

    def run(k):
        return lambda: [k.step() for _ in range(steps)]

    t_old, t_new = timings(run(old), run(new), repeats)
    print(
        f"{rows} rows, {steps} steps a call, {repeats} repeats: before {steps / statistics.median(t_old):.1f} steps/s, "
        f"after {steps / statistics.median(t_new):.1f} steps/s, after/before speed {median_ratio(t_old, t_new):.3g}"
    )
    if compile:
        import time

        fused = NewSteps(s, compile=True)
        t0 = time.perf_counter()
        fused.step()
        print(f"  compiling Adam's update: {time.perf_counter() - t0:.1f} s on the first step")
        t_new, t_fused = timings(run(new), run(fused), repeats)
        print(
            f"  eager {steps / statistics.median(t_new):.1f} steps/s, "
            f"compiled {steps / statistics.median(t_fused):.1f} steps/s, compiled/eager speed {median_ratio(t_new, t_fused):.3g}"
        )


def iwae_table(rows: int, K: int, repeats: int) -> None:
    model, guide = binarised_mnist_vae()
    print(f"\nIWAE K={K} with ELBO and k-hat, {torch.get_num_threads()} thread(s)")
    per_chunk = {}
    for name, fn in (("before", old_bounds), ("after", importance_bounds)):
        ops, syncs = {}, {}
        for n in (8, 64):
            for c in (2, 5):
                with Dispatches() as d:
                    fn(
                        model,
                        guide,
                        images(n),
                        num_samples=40 * c,
                        sample_batch=40,
                        batch_size=n,
                        seed=0,
                    )
                ops[n, c], syncs[n, c] = d.ops, d.syncs
        per_chunk[name] = {
            n: ((ops[n, 5] - ops[n, 2]) / 3, (syncs[n, 5] - syncs[n, 2]) / 3) for n in (8, 64)
        }
    x = images(rows)

    def old():
        return old_bounds(model, guide, x, num_samples=K, seed=0)

    def new():
        return importance_bounds(model, guide, x, num_samples=K, seed=0)

    a, b = old()["iwae"], new().iwae
    t_old, t_new = timings(old, new, repeats)
    mem = {"before": peak_rss_above_start(old), "after": peak_rss_above_start(new)}
    print(
        f"{'':>8} | {'ops/chunk 8':>11} | {'ops/chunk 64':>12} | {'syncs/chunk 8, 64':>17} | {'images/s':>8} | {'peak MiB':>8}"
    )
    for name, t in (("before", t_old), ("after", t_new)):
        (o8, s8), (o64, s64) = per_chunk[name][8], per_chunk[name][64]
        print(
            f"{name:>8} | {o8:>11.0f} | {o64:>12.0f} | {s8:>8.0f}, {s64:<7.0f} | {rows / statistics.median(t):>8.2f} | {mem[name]:>8.0f}"
        )
    print(
        f"{rows} images, {repeats} repeats: after/before speed {median_ratio(t_old, t_new):.3g}; "
        f"largest IWAE difference {float((a - b).abs().max()):.2g} nats (the same draws)"
    )


class RowByRowMixture(Mixture):
    """The defensive mixture before issue 30: no draw from noise, so a guide with it ran one datapoint at a time."""

    draw_from_noise = None

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> RowByRowMixture:
        return RowByRowMixture(
            [c.expand(batch_shape) for c in self.components],
            self.logits.expand(*batch_shape, len(self.components)),
        )


class RowByRowLocalMixture(LocalMixture):
    def distribution(self, rows: slice | torch.Tensor = slice(None)) -> Mixture:
        return RowByRowMixture([c.distribution(rows) for c in self.components], self.logits[rows])


def mixture_table(rows: int, K: int, repeats: int) -> None:
    """``importance_bounds`` from a defensive mixture proposal (as ``decompose``'s log p(x)), drawn row by row (before) and for all rows at once."""
    model, _ = binarised_mnist_vae()

    def proposal(kind: type, n: int) -> LocalMixture:
        x = images(n)
        latent = latent_of(analysed(model, None, (x,), "bounds")[0], x, analysis="bounds")
        q = LocalPosterior("diagonal", latent, torch.zeros(n, 50), torch.full((n, 50), 0.5))
        return kind(
            latent,
            [q, q.widened(2.0), q.widened(4.0)],
            torch.tensor([[0.8, 0.1, 0.1]]).log().expand(n, 3),
        )

    print(
        f"\nIWAE K={K} from a defensive mixture proposal (3 components), {torch.get_num_threads()} thread(s)"
    )
    print(
        f"{'':>8} | {'ops/chunk 8':>11} | {'ops/chunk 64':>12} | {'syncs/chunk 8, 64':>17} | {'images/s':>8}"
    )
    fns = {}
    for name, kind in (("before", RowByRowLocalMixture), ("after", LocalMixture)):
        ops, syncs = {}, {}
        for n in (8, 64):
            q = proposal(kind, n)
            for c in (2, 5):
                with Dispatches() as d:
                    importance_bounds(
                        model,
                        q,
                        images(n),
                        num_samples=40 * c,
                        sample_batch=40,
                        batch_size=n,
                        seed=0,
                    )
                ops[n, c], syncs[n, c] = d.ops, d.syncs
        fns[name] = (ops, syncs, proposal(kind, rows))
    x = images(rows)
    t_old, t_new = timings(
        lambda: importance_bounds(model, fns["before"][2], x, num_samples=K, seed=0),
        lambda: importance_bounds(model, fns["after"][2], x, num_samples=K, seed=0),
        repeats,
    )
    for name, t in (("before", t_old), ("after", t_new)):
        ops, syncs, _ = fns[name]
        per = {n: ((ops[n, 5] - ops[n, 2]) / 3, (syncs[n, 5] - syncs[n, 2]) / 3) for n in (8, 64)}
        print(
            f"{name:>8} | {per[8][0]:>11.0f} | {per[64][0]:>12.0f} | {per[8][1]:>8.0f}, {per[64][1]:<7.0f} | {rows / statistics.median(t):>8.2f}"
        )
    print(f"{rows} images, {repeats} repeats: after/before speed {median_ratio(t_old, t_new):.3g}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qstar-rows", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--iwae-rows", type=int, default=20)
    ap.add_argument("--K", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--compile", action="store_true", help="also time Adam's update under torch.compile"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    np.seterr(all="ignore")
    fixed_mmap_threshold()
    qstar_table(a.qstar_rows, a.steps, a.repeats, a.compile)
    iwae_table(a.iwae_rows, a.K, a.repeats)
    mixture_table(a.iwae_rows, a.K, a.repeats)


if __name__ == "__main__":
    main()
