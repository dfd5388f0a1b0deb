"""Cost of one training step of ``ppl_vae.fit`` against a plain-PyTorch loop.

What is measured
----------------
The wall-clock time per optimisation step of the same VAE trained two ways,
in one process, on the same data:

* **fit**: ``ppl_vae.fit(vae(...), amortized_guide(...), data, epochs=1)``;
  per-step time = ``history[-1]["wall_time"] / steps`` (the training loop
  only; ``fit``'s final ELBO evaluation is not counted).
* **plain** (the baseline): a hand-written PyTorch loop with the same networks
  (``ppl_vae.nn.MLP`` / ``GaussianEncoder`` are plain ``nn.Module``), shuffled
  batches from ``torch.randperm`` with a generator, the single-sample pathwise
  (reparameterised) ELBO ``-(N/B) * sum_b [log p(x|z) + log p(z) - log q(z|x)]``
  via ``torch.distributions`` (argument validation off, as ``fit`` has it
  after its first step), ``zero_grad`` / ``backward`` / Adam ``step`` and
  ``loss.item()``. Timed with ``time.perf_counter`` around the whole loop.

VAE 784-200-200-50 Gaussian encoder, 50-200-200-784 decoder, Bernoulli
logits likelihood, batch 100, Adam lr 1e-3, random binary data of N =
steps * 100 rows. After one warm-up run of each, the two are run alternately
(fit, plain, fit, plain, ...) ``--repeats`` times; the report gives the median
ms/step of each and the median (min, max) of the per-repeat ratios fit/plain;
a ``min`` row (best run of each) is printed too, as it is the figure least
disturbed by other processes on a shared machine.

With ``--estimator score`` or ``analytic-kl`` only the fit side changes; the
plain baseline is always the pathwise (reparam) loop.

Usage: ``python benchmarks/fit_step.py [--steps N] [--repeats R] [--estimator reparam]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributions as D

from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide
from ppl_vae.inference.svi import fit
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP, GaussianEncoder

X_DIM, H, Z_DIM, BATCH, LR, SEED = 784, 200, 50, 100, 1e-3, 0


def make_nets() -> tuple[MLP, GaussianEncoder]:
    """Decoder 50-200-200-784 and encoder 784-200-200 -> (loc, scale) in R^50, seeded."""
    torch.manual_seed(SEED)
    decoder = MLP(Z_DIM, [H, H], X_DIM)
    encoder = GaussianEncoder(MLP(X_DIM, [H], H), H, Z_DIM)
    return decoder, encoder


def run_fit(data: torch.Tensor, estimator: str) -> float:
    """Seconds per step of ``ppl_vae.fit`` (training loop only)."""
    decoder, encoder = make_nets()
    model = vae(decoder, get_likelihood("bernoulli"), Z_DIM)
    guide = amortized_guide(encoder)
    res = fit(model, guide, data, epochs=1, batch_size=BATCH, lr=LR, progress=False, estimator=estimator, seed=SEED)
    return res.history[-1]["wall_time"] / res.steps


def run_plain(data: torch.Tensor) -> float:
    """Seconds per step of the hand-written PyTorch loop."""
    decoder, encoder = make_nets()
    opt = torch.optim.Adam([*decoder.parameters(), *encoder.parameters()], lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    n = data.shape[0]
    steps = -(-n // BATCH)
    prior = D.Normal(torch.zeros(Z_DIM), torch.ones(Z_DIM), validate_args=False)
    total = 0.0
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=gen)
    for b in range(steps):
        x = data[perm[b * BATCH : (b + 1) * BATCH]]
        loc, scale = encoder(x)
        q = D.Normal(loc, scale, validate_args=False)
        z = q.rsample()
        logits = decoder(z)
        log_px = D.Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)
        elbo = log_px + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        loss = -(n / x.shape[0]) * elbo.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += -loss.item() / n * x.shape[0]
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps per run (N = steps * 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved")
    parser.add_argument("--estimator", default="reparam", choices=["reparam", "score", "analytic-kl"], help="fit's estimator")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    data = (torch.rand(args.steps * BATCH, X_DIM) < 0.5).float()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={data.shape[0]}, "
          f"{args.steps} steps/run, batch {BATCH}, {args.repeats} repeats")
    print(f"fit estimator: {args.estimator}; plain baseline: pathwise (reparam) single-sample ELBO, torch.distributions")
    if args.estimator != "reparam":
        print("note: the plain side is the reparam loop whatever --estimator is; the ratio compares different estimators")

    run_fit(data, args.estimator), run_plain(data)  # warm-up
    fit_ms, plain_ms = [], []
    print(f"\n{'repeat':>6}  {'fit ms/step':>11}  {'plain ms/step':>13}  {'fit/plain':>9}")
    for r in range(args.repeats):
        fit_ms.append(1e3 * run_fit(data, args.estimator))
        plain_ms.append(1e3 * run_plain(data))
        print(f"{r + 1:>6}  {fit_ms[-1]:>11.3f}  {plain_ms[-1]:>13.3f}  {fit_ms[-1] / plain_ms[-1]:>8.2f}x")
    ratios = [f / p for f, p in zip(fit_ms, plain_ms)]
    print(f"{'median':>6}  {statistics.median(fit_ms):>11.3f}  {statistics.median(plain_ms):>13.3f}  "
          f"{statistics.median(ratios):>8.2f}x")
    print(f"{'min':>6}  {min(fit_ms):>11.3f}  {min(plain_ms):>13.3f}  {min(fit_ms) / min(plain_ms):>8.2f}x"
          "  (best of each; least sensitive to other load on the machine)")
    print(f"\nratio fit/plain ({args.estimator}): {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
