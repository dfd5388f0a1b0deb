"""Explicit randomness: seeded blocks that leave the caller's random stream as it was, and seeded pickers.

Library code never reseeds the global RNG for good: a stochastic function
takes a ``seed`` (or a ``torch.Generator``) and draws inside :class:`seeded`,
which forks torch's generator and restores the outer stream afterwards.
"""

from __future__ import annotations

import torch

__all__ = ["generator_like", "pick", "seeded"]


class seeded:
    """Context: seed torch's global RNG (used by Pyro) inside, restore the outer stream after."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)


def pick(n: int, k: int | None = None, *, seed: int, sorted: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)`` (all ``n``, shuffled, when ``k`` is None): the first of a seeded permutation.

    The same ``(n, seed)`` gives the same permutation on every device (it is drawn on the CPU and
    moved to ``device``), so a subset of ``k`` is the start of the subset of ``k + 1``.
    """
    perm = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))
    idx = perm if k is None else perm[: min(k, n)]
    if sorted:
        idx = idx.sort().values
    return idx if device is None else idx.to(device)


def generator_like(t: torch.Tensor) -> torch.Generator:
    """A generator on ``t``'s device, seeded from torch's global stream (so a :class:`seeded` block decides it)."""
    return torch.Generator(device=t.device).manual_seed(int(torch.randint(2**62, (), device="cpu")))
