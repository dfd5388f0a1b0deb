"""Time two callables alternately in one process: the shared loop of the side-by-side benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ppl_vae.inference.dispatch import Dispatches


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timings(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[list[float], list[float]]:
    """Both once as a warm-up, then alternately ``repeats`` times: the two lists of seconds."""
    first(), second()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(first))
        tb.append(_time(second))
    return ta, tb


def alternate(first: Callable[[], object], second: Callable[[], object], repeats: int) -> str:
    """Both once as a warm-up, then alternately ``repeats`` times: "A ms   B ms   ratio A/B median (min, max)"."""
    ta, tb = timings(first, second, repeats)
    ratios = [x / y for x, y in zip(ta, tb)]
    return (
        f"{statistics.median(ta) * 1e3:9.2f} ms vs {statistics.median(tb) * 1e3:9.2f} ms   "
        f"ratio median {median_ratio(ta, tb):.3g} (min {min(ratios):.3g}, max {max(ratios):.3g})"
    )


def in_turn(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Each once as a warm-up, then all in turn ``repeats`` times: the seconds of each (one list per callable)."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            t.append(_time(f))
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median of the pairwise ratios ``a[i] / b[i]`` (times taken in turn, so each pair shares the machine's load)."""
    return statistics.median(x / y for x, y in zip(a, b))


def counts(fn: Callable[[], object]) -> tuple[int, int]:
    """The tensor operations ``fn()`` dispatches and its host synchronisations (:class:`Dispatches`)."""
    with Dispatches() as d:
        fn()
    return d.ops, d.syncs


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` entry (``VmRSS``, ``VmHWM``) in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)
