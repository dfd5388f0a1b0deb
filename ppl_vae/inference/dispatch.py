"""Count what an accelerator pays for: tensor operations dispatched and values read back to the host.

On a GPU every dispatched operation is a kernel launch, and every value read back
(``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``) or every output whose shape
depends on the data (``nonzero``, a boolean mask index) waits for the device to
finish what was queued. Neither needs a GPU to be counted: a
``TorchDispatchMode`` sees each operation as it is dispatched, on any device.
The benchmarks and the tests that bound these counts use :class:`Dispatches`::

    with Dispatches() as d:
        step()
    d.ops, d.syncs      # operations dispatched, host synchronisations

A loop that must read several values back reads them at once with :func:`host`
(one synchronisation, counted as one).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
)

__all__ = ["OpMode", "Dispatches", "host"]

_aten = torch.ops.aten
#: operations that read a value back to the host, or whose output's shape depends on the data (the host waits for both)
_SYNCS = {
    _aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), ``if t:``
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
}


def _bool_index(args: tuple[Any, ...]) -> bool:
    """Whether an ``aten.index`` call indexes with a boolean mask (it finds the mask's nonzero entries on the host's behalf)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class OpMode(TorchDispatchMode):
    """A dispatch mode that hands every tensor operation to :meth:`op` as ``(func, args, kwargs)``, with ``kwargs`` a dict."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return self.op(func, args, kwargs or {})

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the operation (a subclass records or replaces it)."""
        return func(*args, **kwargs)


class Dispatches(OpMode):
    """Within the block: ``ops`` (tensor operations dispatched, views included), ``syncs`` (host synchronisations) and ``by_op``.

    A synchronisation is a read of a value back to the host or an operation whose output shape
    depends on the data (``nonzero``, ``masked_select``, ``unique``, a boolean-mask index). On a
    CPU these cost little; on an accelerator each one stalls the queue, and each operation is
    one kernel launch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Count the operation (and a synchronisation), then run it."""
        self.ops += 1
        name = str(func.overloadpacket.__name__)
        self.by_op[name] += 1
        if func in _SYNCS or (func is _aten.index.Tensor and _bool_index(args)):
            self.syncs += 1
            self.sync_ops[name] += 1
        return func(*args, **kwargs)


def host(t: torch.Tensor) -> list:
    """The values of ``t`` as a (nested) list on the host, read at once: one host synchronisation, counted by every enclosing :class:`Dispatches`.

    ``tolist`` is not an operation a dispatch mode sees (on the CPU nothing is copied), so the read
    is counted here, the same on every device.
    """
    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, Dispatches):
            mode.syncs += 1
            mode.sync_ops["host"] += 1
    return t.detach().to("cpu").tolist()
