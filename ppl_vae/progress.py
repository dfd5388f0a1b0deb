"""Progress bars for the long steps (training, IWAE, local q*, AIS, HMC, comparison).

:func:`bar` is tqdm's: a redrawn bar in a terminal, a widget in a notebook
(``tqdm.auto``). When the output is neither (a log file, CI, a pipe) a
redrawn bar would write a carriage-return update per step, thousands of them;
there it writes one plain line every ``PPL_VAE_PROGRESS_INTERVAL`` seconds
(default 10) and one at the end.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from tqdm.auto import tqdm as _auto
from tqdm.std import tqdm as _plain

__all__ = ["bar"]


class _Lines:
    """A stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    shell = (
        ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    )
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _interval() -> float:
    try:
        return max(0.1, float(os.environ.get("PPL_VAE_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def bar(
    iterable: Any = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
) -> Any:
    """A tqdm bar over ``iterable`` (or to ``update`` by hand up to ``total``); a disabled one when not ``enabled``."""
    if not enabled:
        return _plain(iterable, total=total, disable=True)
    shown = {"total": total, "desc": desc, "unit": unit}
    if _notebook():
        return _auto(iterable, leave=leave, **shown)
    stream = sys.stderr
    if stream is None:  # pythonw, some daemons: nowhere to draw
        return _plain(iterable, total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return _plain(iterable, leave=leave, file=stream, **shown)
    every = _interval()
    # maxinterval above mininterval: tqdm's monitor thread redraws only a stalled bar, not one that an update redraws at the same moment
    return _plain(
        iterable,
        leave=True,
        file=_Lines(stream),
        mininterval=every,
        maxinterval=3 * every,
        ascii=True,
        dynamic_ncols=False,
        ncols=100,
        **shown,
    )
