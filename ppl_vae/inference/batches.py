"""The rows ``fit`` trains on: tensors indexed in one go, or a map-style ``Dataset`` read batch by batch, each batch checked.

A dataset's rows are checked as tensors are (floating point, finite) when a batch is read, each error
naming the row, so data that does not fit in memory trains; a model that subsamples its data plate
itself is given all the tensors (:attr:`Rows.whole`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import (
    DataError,
)


def as_tensors(
    data: torch.Tensor | Sequence[torch.Tensor],
    what: str = "data",
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Check ``data`` (a tensor or a tuple of tensors with one row per datapoint); an error names the row (``rows``: their dataset indices)."""
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"{what} must be a tensor or a tuple of tensors")
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    if n == 0:
        raise DataError(f"{what} is empty")
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise DataError(f"{what}: all tensors need the same number of rows ({n})")
    x = tensors[0]
    if not x.is_floating_point():
        raise DataError(f"{what}: x must be a floating-point tensor, got {x.dtype}")
    finite = torch.isfinite(x.reshape(n, -1)).all(1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise DataError(
            f"{what} row {int(rows[row]) if rows is not None else row} contains NaN or infinite values"
        )
    return tensors


def _row_kind(item: Any) -> str:
    """What one dataset row is, for a message: its type, and each tensor's shape and dtype."""
    parts = item if isinstance(item, (tuple, list)) else (item,)
    return ", ".join(
        f"a tensor of shape {tuple(p.shape)} ({p.dtype})"
        if isinstance(p, torch.Tensor)
        else f"a {type(p).__name__}"
        for p in parts
    )


class Rows:
    """The rows ``fit`` trains or scores: tensors (indexed in one go), or a map-style ``Dataset`` read batch by batch.

    A ``DataLoader`` gives its dataset and collate function (``fit`` draws its own batches, so
    that the processes split them and a resumed run continues them). A dataset's rows are
    checked when a batch is read (floating point, finite), so one that does not fit in memory
    trains.
    """

    def __init__(self, source: Any, what: str = "data") -> None:
        self.what, self.tensors, self.dataset, self.collate = what, None, None, default_collate
        self.first: str | None = (
            None  # what a dataset's first row is (its tensors' shapes and dtypes): every row must be so
        )
        #: the model and guide subsample the data plate themselves (Pyro's ``subsample_size``): they take all the tensors
        self.whole = False
        self.moved: tuple[torch.Tensor, ...] | None = None
        if isinstance(source, DataLoader):
            self.dataset, self.collate = source.dataset, source.collate_fn or default_collate
        elif isinstance(source, Dataset) and not isinstance(source, torch.Tensor):
            self.dataset = source
        else:
            self.tensors = as_tensors(source, what)
        if self.dataset is not None and not hasattr(self.dataset, "__len__"):
            raise DataError(
                f"{what}: a dataset needs a length (an iterable-style dataset cannot be split into batches here)"
            )
        self.n = len(self.tensors[0]) if self.tensors is not None else len(self.dataset)  # type: ignore[arg-type]
        if self.n == 0:
            raise DataError(f"{what} is empty")
        self.like = self.take(torch.zeros(1, dtype=torch.long, device="cpu"))[0]

    def __len__(self) -> int:
        return self.n

    def args(
        self, idx: torch.Tensor, to_device: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """What the model and guide take for the rows ``idx``: those rows, or (:attr:`whole`) all the tensors, moved by ``to_device`` once."""
        if not self.whole:
            return tuple(to_device(t) for t in self.take(idx))
        if self.moved is None:
            self.moved = tuple(to_device(t) for t in self.tensors)  # type: ignore[union-attr]
        return self.moved

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows ``idx`` as a tuple of tensors; a dataset's rows checked as tensors are, each error naming the row.

        A dataset's batch must be tensors (floating point and finite for ``x``) whose rows have the
        shapes of the dataset's first row; a row that cannot be collated with the others is named.
        """
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)] for t in self.tensors)
        items = [self.dataset[int(i)] for i in idx]  # type: ignore[index]
        if self.first is None:
            self.first = _row_kind(items[0])
        first = self.first
        for i, item in zip(
            idx, items
        ):  # the kind of each row against the first: a message that names the row
            if _row_kind(item) != first:
                raise DataError(
                    f"{self.what} row {int(i)} is {_row_kind(item)}; the first row is {first}"
                )
        try:
            batch = self.collate(items)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise DataError(
                f"{self.what}: the rows {int(idx[0])}..{int(idx[-1])} cannot be collated into a batch ({str(exc).splitlines()[0][:120]})"
            ) from None
        return as_tensors(
            batch if isinstance(batch, torch.Tensor) else tuple(batch), self.what, rows=idx
        )
