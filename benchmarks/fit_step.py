"""One training step of the 784-200-200-50 VAE, six ways, side by side in one process: times, host reads and operations.

What is measured
----------------
The same VAE (Gaussian encoder 784-200-200 -> 50, decoder 50-200-200-784, Bernoulli logits), batch 100,
Adam lr 1e-3, on random binary data of N = steps * 100 rows, trained for one epoch by:

* **plain eager** (the baseline): a hand-written PyTorch loop, the single-sample pathwise ELBO
  ``-(N/B) sum_b [log p(x|z) + log p(z) - log q(z|x)]`` by ``torch.distributions`` (validation off),
  ``zero_grad`` / ``backward`` / fused Adam ``step``, the loss read back once per step;
* **plain compiled**: the same loop with its loss-and-gradient function under ``torch.compile``;
* **fit eager**: ``ppl_vae.fit``, the steps of its second epoch (the first validates its first step's
  arguments and checks every row's observed values against their supports, once);
* **fit compiled**: ``ppl_vae.fit(..., compile=True)`` (the step traced once and compiled by inductor
  before training; its compile time is not counted, as the plain compiled loop's warm-up is not);
* **Pyro Trace_ELBO** and **Pyro JitTrace_ELBO**: Pyro's own ``SVI.step`` with ``pyro.optim.Adam``
  (the model and guide under ``poutine.scale(N/B)``; JitTrace_ELBO traces with TorchScript).

``--estimator score`` or ``analytic-kl`` changes fit's estimator (and Pyro's ELBO to TraceMeanField_ELBO
for analytic-kl; Pyro's side runs the score-function estimator with a guide whose sites are not
reparameterised); the plain sides stay pathwise. Each variant runs once as a warm-up, then the
variants run in turn ``--repeats`` times; the report gives each one's median, min and max ms/step
and its median ratio to plain eager, and, counted with a ``TorchDispatchMode`` over one epoch after the
first step, the host synchronisations (values read back, outputs of data-dependent shape:
``ppl_vae.inference.dispatch.Dispatches``) and the operations dispatched, per step. (JitTrace_ELBO's
TorchScript graph cannot always run under a dispatch mode: its counts are then "n/a".)

Usage: ``python benchmarks/fit_step.py [--steps 50] [--repeats 5] [--estimator reparam] [--device cpu]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.distributions as D
from pyro import poutine

from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference import loop
from ppl_vae.inference.dispatch import Dispatches
from ppl_vae.inference.svi import fit
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

X_DIM, H, Z_DIM, BATCH, LR, SEED = 784, 200, 50, 100, 1e-3, 0


def make_nets(device: str) -> tuple[MLP, GaussianEncoder]:
    torch.manual_seed(SEED)
    return MLP(Z_DIM, [H, H], X_DIM).to(device), GaussianEncoder(MLP(X_DIM, [H], H), H, Z_DIM).to(
        device
    )


# --------------------------------------------------------------------------- plain PyTorch


def plain(data: torch.Tensor, compiled: bool, counts: Dispatches | None = None) -> float:
    """Seconds per step of the hand-written loop (its first step not counted), eager or with its loss and gradients compiled."""
    decoder, encoder = make_nets(str(data.device))
    params = [*decoder.parameters(), *encoder.parameters()]
    opt = torch.optim.Adam(params, lr=LR, fused=True)
    n = data.shape[0]
    prior_loc, prior_scale = data.new_zeros(Z_DIM), data.new_ones(Z_DIM)

    def loss_and_grads(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loc, scale = encoder(x)
        q = D.Normal(loc, scale, validate_args=False)
        z = q.rsample()
        log_px = D.Bernoulli(logits=decoder(z), validate_args=False).log_prob(x).sum(-1)
        elbo = (
            log_px
            + D.Normal(prior_loc, prior_scale, validate_args=False).log_prob(z).sum(-1)
            - q.log_prob(z).sum(-1)
        )
        loss = -(n / x.shape[0]) * elbo.sum()
        return (loss.detach(), *torch.autograd.grad(loss, params))

    step_fn: Callable[..., tuple[torch.Tensor, ...]] = (
        torch.compile(loss_and_grads) if compiled else loss_and_grads
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).to(data.device)
    rows = list(perm.split(BATCH))
    step_fn(data[rows[0]])  # the first step (compiles where compiled) is not timed
    t0, total = time.perf_counter(), 0.0
    with counts or _nothing():
        for r in rows[1:]:
            loss, *grads = step_fn(
                data[r]
            )  # the batch gathered in the loop, as fit and Pyro's loops do
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            total += float(loss)  # the one read per step
    _sync(data)
    return (time.perf_counter() - t0) / (len(rows) - 1)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _sync(data: torch.Tensor) -> None:
    if data.device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- fit


def run_fit(
    data: torch.Tensor, estimator: str, compiled: bool, counts: Dispatches | None = None
) -> float:
    """Seconds per step of ``ppl_vae.fit`` in its second epoch (the first validates its first step and checks every row), eager or compiled."""
    decoder, encoder = make_nets(str(data.device))
    times: list[float] = []
    real = loop.Trainer.step
    steps = -(-data.shape[0] // BATCH)

    def timed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        if (
            counts is not None and len(times) >= steps + 1
        ):  # the second epoch's steps, its first left out as in the others
            with counts:
                out = real(self, *args, **kwargs)
        else:
            out = real(self, *args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    loop.Trainer.step = timed
    try:
        fit(
            vae(decoder, get_likelihood("bernoulli"), Z_DIM),
            amortized_guide(encoder),
            data,
            epochs=2,
            batch_size=BATCH,
            lr=LR,
            progress=False,
            estimator=estimator,
            seed=SEED,
            compile=compiled,
        )
    finally:
        loop.Trainer.step = real
    return sum(times[steps + 1 :]) / (steps - 1)


# --------------------------------------------------------------------------- Pyro


class _ScoreNormal(dist.Normal):
    """A Normal without a pathwise sampler, so that Pyro's ELBO takes the score-function estimator.

    (``has_rsample_(False)`` is lost when a plate expands the distribution, and torch 2.14's
    ``Independent`` cannot take it back; a class attribute survives ``expand``.)
    """

    has_rsample = False


def run_pyro(
    data: torch.Tensor, estimator: str, jit: bool, counts: Dispatches | None = None
) -> float:
    """Seconds per step of Pyro's ``SVI.step`` (its first step not counted), Trace_ELBO or JitTrace_ELBO."""
    decoder, encoder = make_nets(str(data.device))
    n = data.shape[0]

    def model(x: torch.Tensor) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=n / x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z_DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=n / x.shape[0]):
            loc, scale = encoder(x)
            q = (_ScoreNormal if estimator == "score" else dist.Normal)(
                loc, scale
            )  # score: no pathwise sampler
            pyro.sample("z", q.to_event(1))

    mean_field = estimator == "analytic-kl"
    elbo = (
        (pyro.infer.JitTraceMeanField_ELBO if jit else pyro.infer.TraceMeanField_ELBO)()
        if mean_field
        else (pyro.infer.JitTrace_ELBO if jit else pyro.infer.Trace_ELBO)()
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).to(data.device)
    rows = list(perm.split(BATCH))
    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": LR}), elbo)
        svi.step(data[rows[0]])
        t0 = time.perf_counter()
        with counts or _nothing():
            for r in rows[1:]:
                svi.step(data[r])
        _sync(data)
        return (time.perf_counter() - t0) / (len(rows) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=50, help="optimisation steps per run (N = steps * 100)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, in turn")
    parser.add_argument(
        "--estimator",
        default="reparam",
        choices=["reparam", "score", "analytic-kl"],
        help="fit's and Pyro's estimator",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--skip", default="", help="comma-separated variants to leave out (e.g. 'pyro jit')"
    )
    args = parser.parse_args()

    torch.manual_seed(SEED)
    data = (torch.rand(args.steps * BATCH, X_DIM) < 0.5).float().to(args.device)
    variants: dict[str, Callable[..., float]] = {
        "plain eager": lambda c=None: plain(data, False, c),
        "plain compiled": lambda c=None: plain(data, True, c),
        "fit eager": lambda c=None: run_fit(data, args.estimator, False, c),
        "fit compiled": lambda c=None: run_fit(data, args.estimator, True, c),
        "pyro Trace_ELBO": lambda c=None: run_pyro(data, args.estimator, False, c),
        "pyro JitTrace_ELBO": lambda c=None: run_pyro(data, args.estimator, True, c),
    }
    variants = {
        k: v for k, v in variants.items() if k not in set(filter(None, args.skip.split(",")))
    }
    print(
        f"torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}, N={data.shape[0]}, {args.steps} steps/run, "
        f"batch {BATCH}, {args.repeats} repeats; estimator {args.estimator} (the plain loops: pathwise)"
    )
    counted: dict[str, tuple[float, float] | None] = {}
    for name, run in variants.items():  # warm-up, and the counts of one epoch
        run()
        c = Dispatches()
        try:
            run(c)
        except (
            RuntimeError
        ) as exc:  # TorchScript (JitTrace*) cannot always run under a dispatch mode
            print(f"{name}: not counted ({str(exc).splitlines()[0][:100]})")
            counted[name] = None
        else:
            counted[name] = (c.syncs / (args.steps - 1), c.ops / (args.steps - 1))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            times[name].append(1e3 * run())
    base = times.get("plain eager")
    print(
        f"\n{'variant':<20} {'ms/step median':>14} {'min':>8} {'max':>8} {'/plain eager':>13} {'(min, max)':>14} {'syncs/step':>10} {'ops/step':>9}"
    )
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)] if base else [float("nan")]
        count = counted[name]
        reads, ops = (f"{count[0]:.1f}", f"{count[1]:.0f}") if count is not None else ("n/a", "n/a")
        print(
            f"{name:<20} {statistics.median(ts):>14.3f} {min(ts):>8.3f} {max(ts):>8.3f} {statistics.median(ratios):>12.2f}x "
            f"({min(ratios):.2f}, {max(ratios):.2f}) {reads:>10} {ops:>9}"
        )


if __name__ == "__main__":
    main()
