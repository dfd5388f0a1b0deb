"""Explicit randomness: seeded blocks that leave the caller's random stream as it was, and seeded pickers.

Library code never reseeds the global RNG for good: a stochastic function
takes a ``seed`` (or a ``torch.Generator``) and draws inside :class:`seeded`,
which forks torch's generator and restores the outer stream afterwards.
"""

from __future__ import annotations

import torch

__all__ = ["seeded"]


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
