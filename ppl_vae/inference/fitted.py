r"""A fitted model's record: what training produced, the trained model with it, saved, loaded and sampled.

:class:`FitRecord` is the training record (history, final ELBOs, options) and,
when it came from :func:`~ppl_vae.inference.fit`, :meth:`FitRecord.load` or
:func:`ppl_vae.app.runs.load_run`, the trained model and guide with it. It knows
no analysis: the training loop builds it, and :class:`~.result.FitResult` (what
``fit`` returns) adds the analyses of the model to it (:meth:`~.result.FitResult.posterior`,
:meth:`~.result.FitResult.elbo`, :meth:`~.result.FitResult.iwae`).

* :meth:`~FitRecord.save` / :meth:`~FitRecord.load` -- the parameters the model
  and guide use (in the order :func:`~.params.discover` finds them), the
  shapes of the model's arguments and the record, in a file read back with
  ``torch.load(..., weights_only=True)`` (tensors and plain containers only:
  loading never runs code). The model and guide are code: ``load`` takes them
  from the caller, built as they were for ``fit``.
* :meth:`~FitRecord.sample` -- draws from the prior predictive
  :math:`p(z)\,p(x \mid z)`: the model run with its observed sites
  unconditioned (``poutine.uncondition``), so ``x`` is a real draw from the
  likelihood (a model whose forward run is not that draw is refused by site).

``FitResult`` read from here is the record, with a ``DeprecationWarning``: the
``FitResult`` with the analyses is :class:`ppl_vae.inference.FitResult`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyro
import torch
from pyro import poutine
from torch import nn

from .. import io
from ..errors import CheckpointError, ConfigError, RunDirectoryError, check_int
from .params import Discovered, discover, load_params, owner
from .plates import DATA, DataPlate, find_data_plate, on_data_plate
from .random import seeded
from .traces import prior_predictive

__all__ = ["FitRecord", "FORMAT", "attach"]

#: the class of a record (a method returns one of its own class: a :class:`~.result.FitResult` gives one)
Record = TypeVar("Record", bound="FitRecord")

#: the ``kind`` a saved fitted model's file carries
FORMAT = "ppl-vae fitted model"


@dataclass(frozen=True)
class _Trained:
    """The model, guide, their parameters, the shapes of the model's arguments (one row each), their data plate and parameter store.

    ``store`` is the Pyro parameter-store state the model and guide were trained in (their bare
    ``pyro.param`` s; :meth:`pyro.params.param_store.ParamStoreDict.scope`), None where they have none of
    their own (networks only): every use of the model runs inside it, whatever Pyro's global store holds.
    """

    model: Callable[..., object]
    guide: Callable[..., object]
    found: Discovered
    args: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    plate: DataPlate = DataPlate(DATA)
    store: dict[str, Any] | None = None

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        return (
            pyro.get_param_store().scope(self.store)
            if self.store is not None
            else contextlib.nullcontext()
        )

    def programs(self, what: str) -> tuple[Callable[..., object], Callable[..., object]]:
        """The model and guide with their data plate named ``"data"``; a model that subsamples its plate is refused by ``what``."""
        if self.plate.subsampled:
            raise ConfigError(
                f"{what}: plate {self.plate.name!r} subsamples the data itself (subsample_size={self.plate.subsample_size}), "
                f"so the model does not score the rows it is given; {what} needs a plate over them, pyro.plate(name, x.shape[0])"
            )
        return on_data_plate(self.model, self.plate), on_data_plate(self.guide, self.plate)


def _saved_model(path: Path) -> bool:
    """Whether ``path`` holds a model written by :meth:`FitRecord.save` (read with ``weights_only``: nothing in it runs)."""
    try:
        saved = io.load_torch(path)
    except CheckpointError:
        return False
    return isinstance(saved, dict) and saved.get("kind") == FORMAT


@dataclass(frozen=True)
class FitRecord:
    """What a ``fit`` run produced, and (when it holds one) the trained model, without its analyses. ELBOs are in nats per datapoint."""

    history: tuple[dict[str, float], ...]
    train_elbo: float
    val_elbo: float | None
    epochs: int
    steps: int
    wall_time: float
    stopped_early: bool
    best_epoch: int
    estimator: str
    options: dict[str, Any] = field(default_factory=dict)
    trained: _Trained | None = field(default=None, repr=False, compare=False)

    def to_dataframe(self) -> Any:
        """The per-epoch history as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(list(self.history))

    def to_dict(self) -> dict[str, Any]:
        """The training record (everything but the model) as plain values."""
        out = {k: getattr(self, k) for k in _RECORD}
        return {
            **out,
            "history": [dict(row) for row in self.history],
            "options": dict(self.options),
        }

    # ------------------------------------------------------------------ the model

    def _model(self, what: str) -> _Trained:
        if self.trained is None:
            raise ConfigError(
                f"{what} needs the trained model, and this FitResult holds none; use the one fit returned, "
                "FitResult.load(path, model, guide) or load_run(run_dir)"
            )
        return self.trained

    def _blank(self, n: int) -> tuple[torch.Tensor, ...]:
        """Zeros in the shape of the model's arguments, ``n`` rows, on the parameters' device."""
        t = self._model("sample")
        like = t.found.params[0]
        return tuple(like.new_zeros((n, *shape), dtype=dtype) for shape, dtype in t.args)

    @property
    def model(self) -> Callable[..., object]:
        return self._model("model").model

    @property
    def guide(self) -> Callable[..., object]:
        return self._model("guide").guide

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Inside the block, Pyro's parameter store is this result's own: run the model and guide (or any analysis of them) on its parameters.

        ``fit`` trains in a store of its own, so a bare ``pyro.param`` of the model or guide lives in the
        result, not in Pyro's global store (which is as it was before ``fit``, and is again after the block)::

            with result.scope():
                report = decompose(model, guide, x)
        """
        with self._model("scope").scope():
            yield

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the trained parameters, argument shapes and record to ``path`` atomically (no overwrite without ``force``)."""
        t = self._model("save")
        if not str(path).strip():
            raise RunDirectoryError(
                "the path to save to is empty; give the path of a file, such as 'model.pt'"
            )
        path = Path(path)
        if path.is_dir():
            raise RunDirectoryError(
                f"{path} is a directory; save to a file in it, such as {path / 'model.pt'}"
            )
        if path.exists() and not force:
            raise RunDirectoryError(f"{path} exists; pass force=True to replace it")
        if path.exists() and not _saved_model(path):
            raise RunDirectoryError(
                f"{path} is not a model saved by FitResult.save; force=True replaces only such a file, so it was kept"
            )
        payload = {
            "kind": FORMAT,
            "version": 1,
            "params": [p.detach().cpu() for p in t.found.params],
            "args": [
                {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                for shape, dtype in t.args
            ],
            "record": io.to_plain(self.to_dict()),
        }
        try:
            return io.save_torch(path, payload, overwrite=force)
        except FileExistsError:  # made since the check above (another process)
            raise RunDirectoryError(f"{path} exists; pass force=True to replace it") from None

    @classmethod
    def load(
        cls: type[Record],
        path: str | Path,
        model: Callable[..., object],
        guide: Callable[..., object],
        *,
        modules: Iterable[nn.Module] = (),
    ) -> Record:
        """The fitted model saved at ``path``, its parameters copied into ``model``'s and ``guide``'s networks.

        ``model`` and ``guide`` must be built as they were for ``fit`` (the same
        networks and shapes; ``modules`` as given to ``fit``). The file is read
        with ``weights_only=True``; a file of another kind, a NaN parameter or
        parameters that do not match are a :class:`CheckpointError`.
        """
        saved = io.load_checkpoint(path)
        if saved.get("kind") != FORMAT:
            raise CheckpointError(
                f"{path} is not a saved ppl-vae model (a run's checkpoint.pt is read with load_run(run_dir))"
            )
        try:
            if saved.get("version") != 1:
                raise ValueError(f"format version {saved.get('version')!r}, this ppl-vae reads 1")
            args = tuple(
                (tuple(int(s) for s in a["shape"]), getattr(torch, a["dtype"]))
                for a in saved["args"]
            )
            if not all(isinstance(d, torch.dtype) for _, d in args):
                raise ValueError("an argument's dtype is not a torch dtype")
            record = io.from_plain(saved["record"])
            result = cls(**{**record, "history": tuple(record["history"])})
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is corrupted or incomplete ({type(exc).__name__}: {exc})"
            ) from None
        return attach(result, model, guide, args, saved["params"], str(path), modules)

    def sample(
        self, n: int, *args: torch.Tensor, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        r"""``n`` draws from the prior predictive: every sample site of the model, its observations drawn from the likelihood.

        The model runs on ``args`` (default: zeros in the shape of its training
        arguments, ``n`` rows; pass them for a model whose other arguments
        matter, e.g. the labels of a conditional VAE) with its observed sites
        unconditioned. Returns ``{site: tensor}`` with ``n`` rows each, in the
        order the model samples them. A model with a ``pyro.factor``, a scaled
        or masked site (an auxiliary term) or a latent outside the ``"data"``
        plate is refused by the site's name: running it forward is not a draw
        from its prior predictive.
        """
        check_int(n, "number of samples")
        t = self._model("sample")
        if args and any(a.shape[0] != n for a in args):
            raise ConfigError(
                f"sample: the model's arguments have {[a.shape[0] for a in args]} rows; give n={n} rows each"
            )
        if not args and len(t.args) > 1:
            raise ConfigError(
                f"sample: the model takes {len(t.args)} arguments (a conditional model's labels, say); "
                f"give them, n={n} rows each: result.sample(n, x, y)"
            )
        model, _ = t.programs("sample")
        with t.scope():
            return prior_predictive(model, *(args or self._blank(n)), seed=seed, what="sample")


#: the fields of the training record (all but the model)
_RECORD = tuple(k for k in FitRecord.__dataclass_fields__ if k != "trained")


def attach(
    result: Record,
    model: Callable[..., object],
    guide: Callable[..., object],
    args: Sequence[tuple[tuple[int, ...], torch.dtype]],
    values: Sequence[torch.Tensor] | None,
    where: str,
    modules: Iterable[nn.Module] = (),
    found: Discovered | None = None,
    plate: DataPlate | None = None,
    store: dict[str, Any] | None = None,
) -> Record:
    """``result`` (of its own class) holding ``model`` and ``guide``; with ``values``, their parameters (found by running them on zeros of ``args``) set to those.

    ``plate`` and ``store`` are the data plate and the parameter-store state of the fit (:class:`_Trained`); found
    here where not given: the parameters are then found in a store of their own, whatever Pyro's global one holds.
    """
    if (
        found is None
    ):  # trial arguments where the networks are (a module given, or the model's or guide's owner), else the CPU
        owners = [*modules, owner(model), owner(guide)]
        first = next((p for m in owners if m is not None for p in m.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        example = tuple(
            torch.zeros((2, *shape), dtype=dtype, device=device) for shape, dtype in args
        )
        with seeded(0), poutine.block(), pyro.get_param_store().scope() as state:
            try:
                plate = plate or find_data_plate(model, guide, example, what=where)
                rows = (
                    plate.subsample_size or 2
                )  # a plate that subsamples itself takes that many indices, of as many rows at least
                example = tuple(
                    torch.zeros((rows, *shape), dtype=dtype, device=device) for shape, dtype in args
                )
                index = torch.arange(rows, device=device)
                found = discover(
                    on_data_plate(model, plate, index=index),
                    on_data_plate(guide, plate, index=index),
                    example,
                    modules,
                )
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CheckpointError(
                    f"{where}: the model and guide do not run on arguments of the saved shapes "
                    f"{[tuple(s) for s, _ in args]} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
                ) from None
        store = state if state["params"] else None
    if values is not None:
        load_params(found.params, values, where)
    found.train(False)
    trained = _Trained(
        model, guide, found, tuple((tuple(s), d) for s, d in args), plate or DataPlate(DATA), store
    )
    return type(result)(**{k: getattr(result, k) for k in _RECORD}, trained=trained)


def __getattr__(name: str) -> Any:
    if name == "FitResult":  # the record kept its old name here for one release
        warnings.warn(
            "ppl_vae.inference.fitted.FitResult moved: import it from ppl_vae.inference (with posterior, elbo and iwae); "
            "ppl_vae.inference.fitted holds the record, FitRecord (the old name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return FitRecord
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
