r"""The data plate: found in any model and guide, named ``"data"`` for the package, driven through Pyro's subsampling.

Every per-datapoint tool of the package reads a site's terms along one plate, the *data plate*, the plate
over the rows of the data. Pyro users name it as they like (``"batch"``, ``"cells"``) and write it in one of
two ways:

* **over the rows they are given**, ``pyro.plate(name, x.shape[0])``: ``fit`` gives the model and guide one
  minibatch at a time;
* **over the whole data, subsampled by Pyro**, ``pyro.plate(name, len(x), subsample_size=B) as ind`` with
  ``x[ind]`` inside (Pyro's own idiom): the model and guide take the whole data and Pyro picks the rows.

:func:`find_data_plate` finds the plate on a probe run of one or two rows: the plate whose size is the
number of rows (or the one that subsamples; or the one named with ``plate=``), and says which way it is
written. :class:`DataRows` then drives it in both cases through Pyro's own subsampling: the plate's
indices are the dataset indices of the rows (so a guide with per-datapoint ``pyro.param`` s indexed by them
meets its own rows), and only the sites inside the plate are scaled to the whole dataset,
:math:`N / B`, as Pyro's subsampling does: a global latent's term is counted once. It also renames the
plate ``"data"`` in the sites' frames, so the rest of the package reads any model as it reads its own.

.. math::

    \mathcal{L} \approx \log p(\theta) - \log q(\theta)
        + \frac{N}{|B|} \sum_{n \in B} \big(\log p(x_n, z_n \mid \theta) - \log q(z_n \mid x_n)\big)

References
----------
Hoffman, Blei, Wang & Paisley (2013), Stochastic Variational Inference. Pyro's ``plate`` (subsampling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from ..errors import ConfigError, DataError, PplVaeError

__all__ = ["DATA", "DataPlate", "DataRows", "find_data_plate", "on_data_plate", "subsampled_size"]

#: the data plate's name inside the package (the user's plate is renamed to it by :class:`DataRows`)
DATA = "data"


@dataclass(frozen=True)
class DataPlate:
    """The data plate of a model and guide: its ``name``, and whether they subsample it themselves.

    ``subsample_size`` is set for a plate written over the whole data with Pyro's ``subsample_size``
    (the model and guide then take the whole data, ``full_size`` rows, and draw ``subsample_size``
    of them per run); it is None for a plate over the rows given.
    """

    name: str
    subsample_size: int | None = None
    full_size: int | None = None
    #: the ``pyro.param`` s the probe found missing from Pyro's parameter store (they would start from their initial values)
    fresh: tuple[str, ...] = ()
    #: the latent sites outside the data plate (global latents, shared by every datapoint)
    shared: tuple[str, ...] = ()

    @property
    def subsampled(self) -> bool:
        return self.subsample_size is not None


class _Subsampling(Exception):
    """Raised from a probe at a plate that subsamples itself, before Pyro draws its indices."""

    def __init__(self, name: str, size: int, subsample_size: int) -> None:
        super().__init__(name)
        self.name, self.size, self.subsample_size = name, size, subsample_size


class _Plates(Messenger):
    """Record every plate a probe run enters (name -> size) and every ``pyro.param`` it would create; stop at a plate that subsamples itself."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}
        self.fresh: list[str] = []
        self.latents: dict[str, set[str]] = {}  # each latent site's plates

    def _pyro_param(self, msg: dict[str, Any]) -> None:
        # a pyro.param not in the store would start from its initial value; pyro.module's are the module's own tensors
        init = msg["args"][1] if len(msg["args"]) > 1 else None
        if msg["name"] not in pyro.get_param_store() and not isinstance(init, torch.nn.Parameter):
            self.fresh.append(msg["name"])

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):
            if fn.subsample_size is not None and msg["value"] is None:
                raise _Subsampling(msg["name"], int(fn.size), int(fn.subsample_size))
            self.sizes.setdefault(msg["name"], int(fn.size))
            return
        for f in msg[
            "cond_indep_stack"
        ]:  # (a plate that a handler inside renamed is known by its new name here)
            if f.vectorized:
                self.sizes.setdefault(f.name, int(f.size))
        if not msg["is_observed"] and not msg["infer"].get("is_auxiliary"):
            self.latents.setdefault(msg["name"], {f.name for f in msg["cond_indep_stack"]})


def _probe(
    model: Callable[..., object],
    guide: Callable[..., object],
    args: tuple[Any, ...],
    what: str,
    driven: DataRows | None = None,
    shown: Sequence[Any] | None = None,
) -> tuple[_Plates, _Subsampling | None]:
    """The plates of one run of the guide and the model replayed on it (name -> size), or the plate that subsamples itself.

    ``driven`` (inside the recorder, so that it gives a plate its indices before the recorder sees them) drives the data plate;
    ``shown``: the data whose shapes a failure's message gives (default ``args``, the probe's rows).
    The run sees Pyro's parameter store as it is, and a ``pyro.param`` it creates is dropped after it.
    """
    plates = _Plates()
    store = pyro.get_param_store()
    try:
        with (
            torch.no_grad(),
            poutine.block(),
            store.scope(store.get_state()),
            plates,
            driven or contextlib.nullcontext(),
        ):
            guide_tr = poutine.trace(guide).get_trace(*args)
            poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    except _Subsampling as found:
        return plates, found
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
        if isinstance(exc, PplVaeError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shapes = ", ".join(
            str(tuple(t.shape))
            for t in (shown if shown is not None else args)
            if isinstance(t, torch.Tensor)
        )
        raise DataError(
            f"{what}: the model or guide failed on the data of shape {shapes} ({first[:200]})"
        ) from None
    return plates, None


def find_data_plate(
    model: Callable[..., object],
    guide: Callable[..., object],
    args: Sequence[Any],
    *,
    plate: str | None = None,
    what: str = "this analysis",
    data: Sequence[Any] | None = None,
) -> DataPlate:
    """The data plate of ``model`` and ``guide`` run on ``args`` (a few rows), found by its size or named by ``plate``.

    The plate whose size is the number of rows of ``args``; where several are, the one named ``"data"``;
    a plate that subsamples itself (Pyro's ``subsample_size``) is the data plate of a model that takes
    the whole data.

    Raises
    ------
    ConfigError
        No plate over the rows, several (name one with ``plate=``), a ``plate`` that the model does not
        have, a plate named ``"data"`` that is not the data plate, or several plates that subsample.
    """
    rows = next(
        (int(a.shape[0]) for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None
    )
    seen, subsampling = _probe(model, guide, tuple(args), what, shown=data)
    sizes, fresh = seen.sizes, tuple(dict.fromkeys(seen.fresh))
    if subsampling is not None:
        if plate is not None and plate != subsampling.name:
            raise ConfigError(
                f"{what}: plate {subsampling.name!r} subsamples the data (subsample_size={subsampling.subsample_size}); "
                f"it is the data plate, not {plate!r}"
            )
        return DataPlate(subsampling.name, subsampling.subsample_size, subsampling.size, fresh)
    if plate is not None:
        if plate not in sizes:
            raise ConfigError(
                f"{what}: the model and guide have no plate {plate!r} (their plates: {', '.join(sizes) or 'none'})"
            )
        found = plate
    else:
        over_rows = [name for name, size in sizes.items() if size == rows]
        if not over_rows:
            listed = ", ".join(f"{n!r} of size {s}" for n, s in sizes.items()) or "none"
            raise ConfigError(
                f"{what}: no plate of the model and guide is over the {rows} rows of the data (their plates: {listed}); "
                "write the model's sites of each datapoint inside pyro.plate(name, x.shape[0])"
            )
        if len(over_rows) > 1 and DATA not in over_rows:
            raise ConfigError(
                f"{what}: several plates are over the {rows} rows of the data ({', '.join(map(repr, over_rows))}); "
                "name the data plate with plate="
            )
        found = DATA if DATA in over_rows else over_rows[0]
    if found != DATA and DATA in sizes:
        raise ConfigError(
            f"{what}: the data plate is {found!r}, and another plate is named {DATA!r}; rename that one"
        )
    return DataPlate(
        found,
        fresh=fresh,
        shared=tuple(n for n, names in seen.latents.items() if found not in names),
    )


def subsampled_size(
    model: Callable[..., object],
    guide: Callable[..., object],
    args: Sequence[Any],
    plate: DataPlate,
) -> int:
    """The full size of a data plate that subsamples itself, on the whole data ``args`` (its first ``subsample_size`` rows driven)."""
    assert plate.subsample_size is not None
    index = torch.arange(
        plate.subsample_size,
        device=next((a.device for a in args if isinstance(a, torch.Tensor)), None),
    )
    seen, _ = _probe(model, guide, tuple(args), "fit", DataRows(plate, index=index))
    return seen.sizes.get(plate.name, -1)


class DataRows(Messenger):
    """Drive the data plate ``plate`` of a model or guide through Pyro's subsampling, and name it ``"data"``.

    ``index`` (optional) becomes the plate's subsample: its indices inside the model are the dataset
    indices of the rows (for a plate that subsamples itself, Pyro takes them instead of drawing its own).
    With ``total`` (the dataset's size) every site inside the plate is scaled by ``total`` over the
    plate's full size (``N / B`` for a plate over the ``B`` rows given; 1 for a plate over the whole data,
    which Pyro scales itself); the sites outside it are not scaled.
    """

    def __init__(
        self, plate: DataPlate, *, index: torch.Tensor | None = None, total: int | None = None
    ) -> None:
        super().__init__()
        self.plate, self.index, self.total = plate, index, total

    def _process_message(self, msg: dict[str, Any]) -> None:
        name = self.plate.name
        if msg["type"] == "sample" and isinstance(msg["fn"], _Subsample):
            if msg["name"] == name and self.index is not None and msg["value"] is None:
                msg["value"] = (
                    self.index
                )  # where the caller keeps it (Pyro's _Subsample takes torch's default device, not the data's)
            return
        stack = msg.get("cond_indep_stack") or ()
        frames = [f for f in stack if f.name == name]
        if not frames:
            return
        if self.total is not None:
            full = frames[0].full_size or frames[0].size
            msg["scale"] = msg["scale"] * (self.total / full)
        if name != DATA:
            msg["cond_indep_stack"] = tuple(
                f._replace(name=DATA) if f.name == name else f for f in stack
            )


def on_data_plate(
    program: Callable[..., object],
    plate: DataPlate,
    *,
    index: torch.Tensor | None = None,
    total: int | None = None,
) -> Callable[..., object]:
    """``program`` run under :class:`DataRows` (itself where nothing would change: a plate named ``"data"``, no index or total)."""
    if plate.name == DATA and index is None and total is None:
        return program
    rows = DataRows(plate, index=index, total=total)

    def run(*args: Any, **kwargs: Any) -> object:
        with rows:
            return program(*args, **kwargs)

    run.__wrapped__ = program  # type: ignore[attr-defined]

    select = getattr(program, "select", None)
    if callable(select):  # a per-datapoint guide cut to some rows stays driven the same way
        run.select = lambda rows_: on_data_plate(select(rows_), plate, index=index, total=total)  # type: ignore[attr-defined]
    return run
