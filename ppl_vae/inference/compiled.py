r"""A compiled training step: the step's loss and gradients traced once into one graph of (parameters, batch, indices, noise), compiled.

Pyro runs a model and guide through a stack of Python handlers (its messengers), which
``torch.compile`` cannot follow without breaking the graph at every site. So the step is not
compiled as Pyro code: it is *traced* once, with ``make_fx`` (``torch.fx.experimental.proxy_tensor``),
which runs Pyro's Python as it is and records only the tensor operations it dispatches, the
backward pass included. The recorded graph is a plain function

.. math::

    (\theta, x_B, \text{index}_B, \varepsilon) \mapsto (\text{loss}, \text{ok}, \nabla_\theta \text{loss}),

of the parameters, the batch, its dataset indices and the step's noise: every draw the step makes
(Gaussian or uniform) is an input, generated outside the graph from torch's generator in the order
and shapes the eager step draws them, so a compiled step and an eager step get the same numbers. The
graph is then compiled (``torch.compile``, inductor by default) and replayed at every step whose
arguments have the traced shapes; a batch of another shape (the last, smaller one) is traced again.

What cannot be traced once is refused by name before any training: a step that reads a value back
to the host (a branch on the data, or an estimator that keeps running statistics as numbers), a draw
of another kind (Bernoulli, categorical, Gamma: their noise is not an input), a ``pyro.param``
outside the networks (the graph takes the networks' parameters as inputs). A Python branch that does
not read a tensor (on a step counter, a random module) would be frozen as traced: the model's code
must be the same function of its inputs at every step.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import ConfigError
from .dispatch import OpMode

__all__ = ["CompiledStep", "Noise"]

#: the random operations a traced step may draw from, by what they draw
#: (standard draws; ``normal_`` / ``uniform_`` with their own mean and sd or bounds are the standard draw moved and scaled)
_NORMAL = {torch.ops.aten.normal_.default, torch.ops.aten.randn.default}
#: ``torch.normal(mean, std)`` with a tensor among them (a draw without a reparameterised path: the score-function
#: estimator's): torch fills its output with standard draws, then scales and shifts it in place, as the feed does
_NORMAL_AT = {
    torch.ops.aten.normal.Tensor_Tensor,
    torch.ops.aten.normal.Tensor_float,
    torch.ops.aten.normal.float_Tensor,
}
_UNIFORM = {torch.ops.aten.uniform_.default, torch.ops.aten.rand.default}


@dataclass(frozen=True)
class _Draw:
    """One random draw of a step: its kind (``"normal"`` or ``"uniform"``), shape, dtype and device."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        """The standard draw from torch's generator, as the eager step makes it (``empty(shape).normal_()`` / ``.uniform_()``)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return out.normal_() if self.kind == "normal" else out.uniform_()


def _where() -> str:
    """The innermost frame outside torch of the current stack: where the model or estimator asked for what is refused."""
    mode = inspect.unwrap(
        OpMode.__torch_dispatch__
    ).__code__  # the frame handing Noise.op its operation
    frames = [
        f
        for f in traceback.extract_stack()[:-2]
        if "/torch/" not in f.filename
        and "compiled.py" not in f.filename
        and (f.filename, f.name) != (mode.co_filename, mode.co_name)
    ]
    f = frames[-1] if frames else None
    return (
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.line})"
        if f is not None
        else "an unknown place"
    )


class Noise(OpMode):
    """Record a step's random draws (``feed=None``), or replace them, in order, by the tensors of ``feed``; refuse a host read.

    With ``strict`` (tracing), reading a value back to the host, or a draw other than a Gaussian or
    uniform one, raises a :class:`ConfigError` naming where.
    """

    def __init__(self, feed: Sequence[torch.Tensor] | None = None, *, strict: bool = False) -> None:
        super().__init__()
        self.feed, self.strict, self.draws, self.used = feed, strict, [], 0

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Record, replace or refuse a draw; refuse a host read (``strict``); run any other operation."""
        kind = (
            "normal"
            if func in _NORMAL or func in _NORMAL_AT
            else "uniform"
            if func in _UNIFORM
            else None
        )
        if kind is None:
            if self.strict and func is torch.ops.aten._local_scalar_dense.default:
                raise ConfigError(
                    f"compile: the step reads a value back to the host at {_where()}: what it computes may depend on the "
                    "data, so it cannot be traced once; train it without compile"
                )
            if self.strict and torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
                raise ConfigError(
                    f"compile: the step draws with {func} at {_where()}; a compiled step takes Gaussian and uniform "
                    "draws only (their noise is an input of the graph); train it without compile"
                )
            return func(*args, **kwargs)
        if self.feed is None:
            out = func(*args, **kwargs)
            self.draws.append(_Draw(kind, tuple(out.shape), out.dtype, out.device))
            return out
        given = self.feed[
            self.used
        ]  # the draw itself is not made: the generator's stream is the caller's
        self.used += 1
        if func is torch.ops.aten.normal_.default:
            mean, sd = _two(args[1:], kwargs, ("mean", 0.0), ("std", 1.0))
            return args[0].copy_(given * sd + mean if (mean, sd) != (0.0, 1.0) else given)
        if func in _NORMAL_AT:
            mean, sd = _two(args, kwargs, ("mean", 0.0), ("std", 1.0))
            return given * sd + mean
        if func is torch.ops.aten.uniform_.default:
            low, high = _two(args[1:], kwargs, ("from", 0.0), ("to", 1.0))
            return args[0].copy_(given * (high - low) + low if (low, high) != (0.0, 1.0) else given)
        return given.clone()


def _two(given: Sequence[Any], kwargs: dict[str, Any], *named: tuple[str, float]) -> list[Any]:
    """A draw's two parameters (mean and sd, or bounds): those given by position, then by name, then the defaults."""
    return (list(given) + [kwargs.get(name, default) for name, default in named][len(given) :])[:2]


def _put_back(module: torch.nn.Module, originals: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
    """Register ``originals`` as ``module``'s parameters again: tracing a functional call may leave other tensor objects in their place,
    and the optimiser steps the originals."""
    for name, param in originals:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if getattr(owner, leaf) is not param:
            setattr(owner, leaf, param)


class CompiledStep:
    """The loss, the data check and the gradients of an :class:`~.step.Objective`, traced and compiled once per batch shape.

    Call it with the batch and its dataset indices: it returns ``(loss, flags, grads)`` (``flags``:
    ``[loss, ok]`` as the eager step gives them; ``grads`` in the order of ``params``), drawing the
    step's noise from torch's generator as the eager step would.
    """

    def __init__(
        self, objective: Any, params: Sequence[torch.Tensor], *, backend: str = "inductor"
    ) -> None:
        names = {id(p): n for n, p in objective.named_parameters()}
        loose = [i for i, p in enumerate(params) if id(p) not in names]
        if loose:
            raise ConfigError(
                f"compile: {len(loose)} trained tensor(s) (pyro.param sites) belong to no nn.Module; the compiled step takes "
                "the networks' parameters as inputs: hold them in an nn.Module (a PyroModule), or train without compile"
            )
        self.objective, self.params, self.names, self.backend = (
            objective,
            list(params),
            [names[id(p)] for p in params],
            backend,
        )
        self.graphs: dict[tuple[Any, ...], tuple[Callable[..., Any], list[_Draw]]] = {}

    @staticmethod
    def signature(batch: Sequence[torch.Tensor], index: torch.Tensor) -> tuple[Any, ...]:
        return tuple((tuple(t.shape), t.dtype, t.device) for t in (*batch, index))

    def _function(self, batch: Sequence[torch.Tensor]) -> Callable[..., Any]:
        objective, names, k = self.objective, self.names, len(batch)

        def step(params: list[torch.Tensor], *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            args, index, noise = rest[:k], rest[k], list(rest[k + 1 :])
            objective.rows.index = index
            with Noise(noise, strict=True):
                loss = torch.func.functional_call(objective, dict(zip(names, params)), args)
                # not support.flag: its cached constant must not be made while tracing
                ok = torch.as_tensor(objective.support.ok, device=loss.device).to(torch.float64)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = tuple(
                g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)
            )
            return (loss.detach(), torch.stack([loss.detach().to(torch.float64), ok]), *grads)

        return step

    def trace(
        self, batch: Sequence[torch.Tensor], index: torch.Tensor
    ) -> tuple[Callable[..., Any], list[_Draw]]:
        """The compiled graph for batches shaped as ``batch`` (and the draws it takes): traced, compiled and run once now."""
        key = self.signature(batch, index)
        if key in self.graphs:
            return self.graphs[key]
        state = torch.get_rng_state()
        recorder = Noise(strict=True)
        self.objective.rows.index = index
        with torch.no_grad(), recorder:  # the draws' kinds and shapes, in order
            self.objective(*batch)
        draws = recorder.draws
        inputs = [p.detach().requires_grad_() for p in self.params]
        noise = [d.make() for d in draws]
        originals = list(self.objective.named_parameters())
        try:
            graph = make_fx(self._function(batch))(inputs, *batch, index, *noise)
        finally:
            _put_back(self.objective, originals)
        try:
            compiled = (
                torch.compile(graph, backend=self.backend) if self.backend != "eager" else graph
            )
            compiled(
                [p.detach() for p in self.params], *batch, index, *noise
            )  # compiled now, before any training
        except Exception as exc:  # noqa: BLE001 - no compiler, an unsupported operation: said in one line
            first = (
                str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            )
            raise ConfigError(
                f"compile: torch.compile ({self.backend}) cannot compile the step here ({type(exc).__name__}: {first}); "
                "train without compile"
            ) from None
        finally:
            torch.set_rng_state(state)  # tracing drew nothing from the run's stream
        self.graphs[key] = (compiled, draws)
        return compiled, draws

    def __call__(
        self, batch: Sequence[torch.Tensor], index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        compiled, draws = self.trace(batch, index)
        noise = [
            d.make() for d in draws
        ]  # the eager step's draws, in its order, from torch's generator
        self.noise = noise
        out = compiled([p.detach() for p in self.params], *batch, index, *noise)
        return out[0], out[1], tuple(out[2:])
