"""Find the parameters a plain-function model and guide use, without a global store.

A model written as a plain function closes over its networks. ``fit`` runs
the guide and the model once while a forward pre-hook records every
``nn.Module`` they call; their parameters, those of a model or guide that is
itself a module (or a bound method of one), and any ``pyro.param`` sites are
the parameters to train. Nothing is registered anywhere, so two models built
in one process never share parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from pyro import poutine
from torch import nn

from ..errors import CheckpointError
from .traces import PlaceFlat, data_like

__all__ = ["Discovered", "discover", "load_params", "owner"]


@dataclass(frozen=True)
class Discovered:
    """The modules and the trainable parameters (in a stable order) of a model and guide."""

    modules: tuple[nn.Module, ...]
    params: tuple[torch.Tensor, ...]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)


def owner(fn: object) -> nn.Module | None:
    """The module ``fn`` is, or whose bound method it is; else None."""
    if isinstance(fn, nn.Module):
        return fn
    bound = getattr(fn, "__self__", None)
    return bound if isinstance(bound, nn.Module) else None


def discover(
    model: Callable[..., object],
    guide: Callable[..., object],
    args: tuple[torch.Tensor, ...],
    modules: Iterable[nn.Module] = (),
) -> Discovered:
    """Run ``guide(*args)`` and ``model(*args)`` once and collect what they use.

    The modules are recorded by a forward pre-hook that torch only offers process-wide; it is
    installed for this one call and removed after it (also on an error). A module that another
    thread runs during the call would be collected too: it gets no gradient from the loss, so the
    optimiser leaves it as it is.
    """
    seen: list[nn.Module] = [*modules, *(m for m in (owner(model), owner(guide)) if m is not None)]
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: seen.append(module)
    )
    try:
        with (
            torch.no_grad(),
            poutine.block(),
            poutine.trace(param_only=True) as param_tr,
            PlaceFlat(data_like(args)),
        ):  # a flat prior is given a value, not sampled
            guide_tr = poutine.trace(guide).get_trace(*args)
            poutine.replay(model, trace=guide_tr)(*args)
    finally:
        handle.remove()
    unique_modules = list({id(m): m for m in seen}.values())
    params: dict[int, torch.Tensor] = {}
    for m in unique_modules:
        for p in m.parameters():
            if p.requires_grad:
                params.setdefault(id(p), p)
    for site in param_tr.trace.nodes.values():
        value = site["value"]
        value = value.unconstrained() if hasattr(value, "unconstrained") else value
        if value.requires_grad:
            params.setdefault(id(value), value)
    return Discovered(tuple(unique_modules), tuple(params.values()))


def load_params(
    params: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor] | None,
    where: str,
    *,
    extra: bool = False,
) -> None:
    """Copy checkpointed values into ``params`` in place, after checking that they match in number and shapes.

    With ``extra``, ``saved`` may hold more tensors after those of ``params`` (an estimator's own
    networks, saved after the model's and guide's). A mismatch is a :class:`CheckpointError` naming ``where``.
    """
    if (
        saved is None
        or (len(saved) < len(params) if extra else len(saved) != len(params))
        or any(s.shape != p.shape for s, p in zip(saved, params))
    ):
        raise CheckpointError(f"checkpoint {where} does not match this model and guide")
    for i, (s, p) in enumerate(zip(saved, params)):
        if s.dtype != p.dtype:  # copy_ would cast without a word
            raise CheckpointError(
                f"checkpoint {where} holds parameter #{i} as {s.dtype}, the model's is {p.dtype}; build the model in {s.dtype}"
            )
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
