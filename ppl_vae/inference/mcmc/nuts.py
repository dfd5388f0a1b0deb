"""Pyro's NUTS on any Pyro model (chains one after another), or on the latent posterior of one datapoint at a time.

The reference and benchmark baseline of the batched sampler in
:mod:`ppl_vae.inference.mcmc.hmc`; the same output type,
:class:`~ppl_vae.inference.mcmc.draws.Draws`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro.infer.mcmc import MCMC, NUTS

from ..latent import latent_of
from ..random import seeded
from ..traces import model_latent_sites
from .draws import Draws, check_counts, freeze_model, point_layout, site_dims

__all__ = ["nuts", "nuts_latent"]


def nuts(
    model: Callable[..., object],
    *args: Any,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
    **kwargs: Any,
) -> Draws:
    """Pyro's NUTS (diagonal mass adaptation) on any Pyro model; chains run one after another.

    Chain ``c`` is seeded with ``seed + c`` inside a forked RNG (the global
    RNG is unchanged). Divergent post-warmup transitions are recorded in
    ``sample_stats["diverging"]``.

    Returns
    -------
    Draws
        ``samples[name]`` ``[C, S, *site_shape]``, ``sample_stats``
        ``diverging`` ``[C, S]`` and ``step_size`` ``[C, S]``.
    """

    check_counts(num_samples, warmup_steps, num_chains)
    plain, latent = model_latent_sites(model, args, kwargs)
    t0 = time.perf_counter()
    chains: list[dict[str, torch.Tensor]] = []
    diverging = np.zeros((num_chains, num_samples), dtype=bool)
    step_size = np.zeros((num_chains, num_samples))
    with freeze_model(lambda *a, **k: model(*args, **kwargs), ()):
        for c in range(num_chains):
            with seeded(seed + c):
                kernel = NUTS(
                    model,
                    target_accept_prob=target_accept,
                    max_tree_depth=max_tree_depth,
                    jit_compile=False,
                )
                mcmc = MCMC(
                    kernel,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    num_chains=1,
                    disable_progbar=not progress,
                )
                mcmc.run(*args, **kwargs)
            chains.append(mcmc.get_samples())
            idx = [i for i in mcmc.diagnostics()["divergences"]["chain 0"] if 0 <= i < num_samples]
            diverging[c, idx] = True
            step_size[c] = float(kernel.step_size)
    wall = time.perf_counter() - t0
    samples = {name: torch.stack([ch[name] for ch in chains]).cpu().numpy() for name in latent}
    shapes = {name: tuple(plain.nodes[name]["value"].shape) for name in latent}
    return Draws(
        samples,
        {"diverging": diverging, "step_size": step_size},
        site_dims(shapes),
        {},
        "pyro-nuts",
        wall,
    )


def nuts_latent(
    model: Callable[..., object],
    *args: torch.Tensor,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    num_chains: int = 4,
    seed: int = 0,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    progress: bool = False,
) -> Draws:
    r"""Pyro's NUTS on :math:`p(z \mid x_n)` for each row of ``args``, one datapoint at a time.

    The reference (and benchmark baseline) for :func:`hmc_latent`; same
    output layout: ``samples[site]`` ``[C, S, N, *event]`` for every latent
    site, ``diverging`` ``[C, S, N]``. Datapoint ``n`` uses seeds
    ``seed + 1000 n + c``.
    """
    check_counts(num_samples, warmup_steps, num_chains)
    latent = latent_of(model, *args, analysis="latent-posterior MCMC")
    runs = [
        nuts(
            model,
            *(a[i : i + 1] for a in args),
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            num_chains=num_chains,
            seed=seed + 1000 * i,
            target_accept=target_accept,
            max_tree_depth=max_tree_depth,
            progress=progress,
        )
        for i in range(latent.num_points)
    ]
    samples = {
        s.name: np.concatenate([r.samples[s.name] for r in runs], axis=2) for s in latent.sites
    }  # [C, S, 1, ...] -> [C, S, N, ...]
    stats = {
        k: np.stack([r.sample_stats[k] for r in runs], axis=-1) for k in ("diverging", "step_size")
    }
    dims, coords = point_layout(latent, ("diverging", "step_size"))
    return Draws(samples, stats, dims, coords, "pyro-nuts", sum(r.wall_time for r in runs))
