"""The validation table of docs/compare.md: batched HMC and NUTS against exact and reference posteriors, in MCSEs.

For each case and sampler: the largest |z| of a posterior mean and of a posterior sd against the
reference, z = (ours - reference) / MCSE (ArviZ's, ESS-based; a reference that is itself a sample
adds its own MCSE in quadrature), the mean of z^2 over all of them (1 expected), the largest R-hat
and the number of divergent transitions. The same settings as the tests in
tests/inference/mcmc/ (which assert |z| < 4); a few minutes on one thread.

    python docs/mcmc_validation.py
"""

from __future__ import annotations

import numpy as np
import torch

from ppl_vae.data.posteriordb import load_posteriordb_data, load_posteriordb_draws
from ppl_vae.distributions import Gaussian
from ppl_vae.inference import azcompat
from ppl_vae.inference.mcmc.hmc import hmc, hmc_latent
from ppl_vae.inference.mcmc.nuts import nuts_latent
from ppl_vae.models.classic import eight_schools_noncentered, linear_regression
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import vae
from ppl_vae.nn import MLP


def zs(
    ours: np.ndarray, mean: np.ndarray, sd: np.ndarray, ref: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """z of the means and sds of ``ours`` ``[chain, draw, ...]`` against ``mean``/``sd`` (a reference sample's MCSE added if given)."""
    e_m, e_s = azcompat.mcse(ours, "mean"), azcompat.mcse(ours, "sd")
    if ref is not None:
        e_m, e_s = (
            np.hypot(e_m, azcompat.mcse(ref, "mean")),
            np.hypot(e_s, azcompat.mcse(ref, "sd")),
        )
    return (ours.mean((0, 1)) - mean) / e_m, (ours.std((0, 1), ddof=1) - sd) / e_s


def row(
    case: str,
    sampler: str,
    parts: list[tuple[np.ndarray, np.ndarray]],
    draws: list[np.ndarray],
    divergences: int,
    n: str,
) -> None:
    zm = np.concatenate([np.ravel(a) for a, _ in parts])
    zsd = np.concatenate([np.ravel(b) for _, b in parts])
    rhat = max(float(np.max(azcompat.rhat(d))) for d in draws)
    both = np.concatenate([zm, zsd])
    print(
        f"| {case} | {sampler} | {n} | {np.abs(zm).max():.2f} | {np.abs(zsd).max():.2f} | {np.mean(both**2):.2f} ({both.size}) | {rhat:.3f} | {divergences} |"
    )


def sample(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return draws.mean((0, 1)), draws.std((0, 1), ddof=1)


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| case | sampler | draws | max \\|z\\| of a mean | max \\|z\\| of an sd | mean z² (count) | max R-hat | divergences |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kernel in ("hmc", "nuts"):
        torch.manual_seed(1)
        ppca = PPCA(8, 3, sigma=0.5).double()
        x = ppca.sample(10)
        d = hmc_latent(
            ppca, x, num_samples=1000, warmup_steps=400, num_chains=4, seed=0, kernel=kernel
        )
        post = ppca.posterior(x)
        z = d.samples["z"]
        # in the exact posterior's whitened coordinates w = L^-1 (z - mean): independent N(0, 1) coordinates, so their
        # z-scores are independent too (those of correlated coordinates are not; docs/compare.md, condition number 711)
        white = torch.linalg.inv(torch.linalg.cholesky(post.covariance_matrix)).detach().numpy()
        w = np.einsum("nkl,csnl->csnk", white, z - post.mean.detach().numpy())
        row(
            "PPCA 8/3, 10 points, exact (whitened)",
            f"batched {kernel.upper()}",
            [zs(w, 0.0, 1.0)],
            [z],
            d.num_divergences,
            "4 x 1000",
        )

        data = load_posteriordb_data("eight_schools-eight_schools_noncentered")
        ref = load_posteriordb_draws("eight_schools-eight_schools_noncentered")
        d = hmc(
            eight_schools_noncentered,
            data["sigma"],
            data["y"],
            num_samples=500,
            warmup_steps=300,
            num_chains=4,
            seed=0,
            kernel=kernel,
            target_accept=0.9 if kernel == "nuts" else 0.8,
        )
        s = dict(d.samples)
        s["theta"] = s["mu"][..., None] + s["tau"][..., None] * s["theta_trans"]
        parts = [zs(s[k], *sample(ref[k]), ref=ref[k]) for k in ("mu", "tau", "theta")]
        row(
            "eight schools (posteriordb)",
            f"batched {kernel.upper()}",
            parts,
            [s[k] for k in ("mu", "tau", "theta")],
            d.num_divergences,
            "4 x 500",
        )

        data = load_posteriordb_data("sblrc-blr")
        ref = load_posteriordb_draws("sblrc-blr")
        d = hmc(
            linear_regression,
            data["X"],
            data["y"],
            num_samples=1000,
            warmup_steps=250,
            num_chains=4,
            seed=0,
            kernel=kernel,
        )
        parts = [zs(d.samples[k], *sample(ref[k]), ref=ref[k]) for k in ("beta", "sigma")]
        row(
            "linear regression (posteriordb)",
            f"batched {kernel.upper()}",
            parts,
            [d.samples[k] for k in ("beta", "sigma")],
            d.num_divergences,
            "4 x 1000",
        )

        torch.manual_seed(0)
        decoder = MLP(2, [16], 8)
        model = vae(decoder, Gaussian(scale=0.5), 2)
        x = torch.randn(3, 8)[:2]
        d = hmc_latent(
            model, x, num_samples=400, warmup_steps=200, num_chains=4, seed=0, kernel=kernel
        )
        ours = d.samples["z"]
        theirs = nuts_latent(
            model, x, num_samples=200, warmup_steps=150, num_chains=2, seed=0
        ).samples["z"]
        row(
            "2-d VAE latents, 2 points, vs Pyro NUTS (2 x 200)",
            f"batched {kernel.upper()}",
            [zs(ours, *sample(theirs), ref=theirs)],
            [ours],
            d.num_divergences,
            "4 x 400",
        )


if __name__ == "__main__":
    main()
