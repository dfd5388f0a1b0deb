"""The one place in ``ppl_vae`` that talks to ArviZ, for ArviZ 0.2x and 1.x alike.

ArviZ 1.0 (2026) split into ``arviz_base`` / ``arviz_stats`` / ``arviz_plots``
and changed its API: ``from_dict`` takes ``{group: {var: array}}`` and returns
an :class:`xarray.DataTree` instead of ``InferenceData``; ``psislw`` moved to
``arviz_stats`` with the opposite sign convention (see :func:`pareto_khat`).
ArviZ 0.23 warns about that refactor (a ``FutureWarning``, once a day) when it
is imported. This module imports ArviZ lazily, silences exactly that import
warning, and exposes the few things the package needs with one behaviour under
both major versions:

* :func:`to_inference_data` and :func:`posterior_dataset`: build the native
  container (``InferenceData`` or ``DataTree``) and read a group back;
* :func:`ess`, :func:`rhat`, :func:`mcse`: array-level MCMC diagnostics;
* :func:`diagnostics`: a per-element table like
  ``az.summary(kind="diagnostics")`` with version-independent labels;
* :func:`pareto_khat`: the PSIS k-hat of importance log-weights.

Draw arrays are always ``[chain, draw, *shape]``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "arviz_version",
    "diagnostics",
    "ess",
    "mcse",
    "pareto_khat",
    "posterior_dataset",
    "rhat",
    "to_inference_data",
]

#: ArviZ 0.23's import-time notice about the 1.0 refactor (``FutureWarning``; the
#: message starts with a newline).
_REFACTOR_NOTICE = r"\s*ArviZ is undergoing a major refactor"
#: ArviZ's warning that k-hat exceeds its threshold.
_KHAT_WARNING = r"Estimated shape parameter of Pareto distribution is greater than"
#: ArviZ's own minimum: fewer draws per chain give NaN (with a logged warning).
_MIN_DRAWS = 4
#: PSIS fits a generalised Pareto to the largest ``min(S/5, 3 sqrt(S))`` weights
#: and needs at least 5 of them.
_MIN_PSIS_DRAWS = 25
#: Log-weights whose range is below this are treated as constant weights.
_CONSTANT_LOG_WEIGHT_RANGE = 1e-9
#: Columns of :func:`diagnostics`, in ``az.summary(kind="diagnostics")`` order.
DIAGNOSTIC_COLUMNS = ("mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat")


@functools.cache
def _arviz() -> Any:
    """Import ``arviz`` once, without its 0.23 refactor notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REFACTOR_NOTICE, category=FutureWarning)
        import arviz
    return arviz


def arviz_version() -> str:
    """The installed ArviZ version string, e.g. ``"0.23.4"`` or ``"1.3.0"``."""
    return str(_arviz().__version__)


@functools.cache
def _major() -> int:
    return int(arviz_version().split(".")[0])


def _array_stats() -> Any:
    """ArviZ 1.x's NumPy-level statistics (``arviz_stats.base.array_stats``)."""
    _arviz()
    from arviz_stats.base import array_stats

    return array_stats


# --------------------------------------------------------------------------- containers


def _attr_value(value: Any) -> Any:
    """``value`` as a type netCDF attributes accept (None is dropped by the caller)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [_attr_value(v) for v in np.asarray(value, dtype=object).ravel()]
        if all(isinstance(v, (int, float)) for v in items) or all(
            isinstance(v, str) for v in items
        ):
            return items
    return str(value)


def to_inference_data(
    posterior: Mapping[str, np.ndarray],
    *,
    sample_stats: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Any:
    """Draws as the installed ArviZ's native container.

    Parameters
    ----------
    posterior : dict of str to ndarray
        Variables, each ``[chain, draw, *shape]``.
    sample_stats : dict of str to ndarray, optional
        Sampler statistics, ``[chain, draw, *shape]``; omitted when empty.
    dims : dict of str to list of str, optional
        Dimension names of each variable beyond ``chain`` and ``draw``.
    coords : dict of str to sequence, optional
        Coordinate values of named dimensions.
    attrs : dict, optional
        Attributes of the whole object and of each group. Values are
        made netCDF-safe: ``None`` is dropped, booleans become ints, NumPy
        scalars Python scalars, anything else not a number, string or flat
        list of them becomes its ``str``.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``InferenceData`` under ArviZ 0.x, ``DataTree`` under 1.x; read a group
        back with :func:`posterior_dataset`.
    """
    clean = {str(k): _attr_value(v) for k, v in (attrs or {}).items() if v is not None}
    groups = {"posterior": dict(posterior)}
    if sample_stats:
        groups["sample_stats"] = dict(sample_stats)
    dims = {k: list(v) for k, v in (dims or {}).items()}
    coords = {k: list(v) for k, v in (coords or {}).items()}
    az = _arviz()
    if _major() == 0:
        group_attrs = {f"{g}_attrs": dict(clean) for g in groups}
        return az.from_dict(**groups, dims=dims, coords=coords, attrs=dict(clean), **group_attrs)
    return az.from_dict(
        groups,
        dims=dims,
        coords=coords,
        attrs={"/": dict(clean), **{g: dict(clean) for g in groups}},
    )


def posterior_dataset(data: Any, group: str = "posterior") -> Any:
    """One group (default the posterior) of :func:`to_inference_data`'s result.

    Parameters
    ----------
    data : arviz.InferenceData or xarray.DataTree
    group : str

    Returns
    -------
    xarray.Dataset
    """
    import xarray as xr

    tree = getattr(xr, "DataTree", None)  # xarray >= 2024.10; ArviZ 1.x requires it
    if tree is not None and isinstance(data, tree):
        return data[group].to_dataset()
    return getattr(data, group)


# --------------------------------------------------------------------------- MCMC diagnostics


def _draws(draws: Any) -> np.ndarray:
    x = np.asarray(draws, dtype=float)
    if x.ndim < 2:
        raise ValueError(f"draws must be [chain, draw, *shape], got shape {x.shape}")
    return x


def _per_element(x: np.ndarray, stat: str, **kwargs: Any) -> np.ndarray:
    """ArviZ's ``stat`` ("ess", "rhat" or "mcse") of each element of ``x`` [chain, draw, *shape].

    Elements with a non-finite draw get NaN (ArviZ itself only checks for NaN, and logs it).
    """
    bad = ~np.isfinite(x).all(axis=(0, 1))
    x = np.where(bad, 0.0, x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if _major() == 0:
            az = _arviz()
            out = getattr(az, stat)(az.convert_to_dataset({"x": x}), **kwargs)["x"].values
        else:
            out = getattr(_array_stats(), stat)(x, chain_axis=0, draw_axis=1, **kwargs)
    return np.where(bad, np.nan, np.asarray(out, dtype=float).reshape(x.shape[2:]))


def ess(draws: Any, method: Literal["bulk", "tail"] = "bulk") -> np.ndarray:
    """Effective sample size of each element (Vehtari et al. 2021).

    Parameters
    ----------
    draws : array_like
        ``[chain, draw, *shape]``.
    method : {"bulk", "tail"}
        Bulk ESS (rank-normalised, split chains) or tail ESS (the smaller of
        the 5% and 95% quantile ESS).

    Returns
    -------
    ndarray
        ``[*shape]``; NaN where there are fewer than 4 draws per chain or the
        element has non-finite draws.
    """
    if method not in ("bulk", "tail"):
        raise ValueError(f"method must be 'bulk' or 'tail', got {method!r}")
    x = _draws(draws)
    if x.shape[1] < _MIN_DRAWS or x.size == 0:
        return np.full(x.shape[2:], np.nan)
    kwargs: dict[str, Any] = {"method": method}
    if method == "tail" and _major() > 0:
        kwargs["prob"] = 0.05  # 1.x's array interface has no default; 0.x's default is (0.05, 0.95)
    return _per_element(x, "ess", **kwargs)


def rhat(draws: Any) -> np.ndarray:
    """Rank-normalised split R-hat of each element (the default of both ArviZ versions).

    Parameters
    ----------
    draws : array_like
        ``[chain, draw, *shape]``.

    Returns
    -------
    ndarray
        ``[*shape]``; NaN with a single chain (between-chain agreement is
        undefined), with fewer than 4 draws per chain, or where the element has
        non-finite draws.
    """
    x = _draws(draws)
    if x.shape[0] < 2 or x.shape[1] < _MIN_DRAWS or x.size == 0:
        return np.full(x.shape[2:], np.nan)
    return _per_element(x, "rhat", method="rank")


def mcse(draws: Any, method: Literal["mean", "sd"] = "mean") -> np.ndarray:
    """Monte Carlo standard error of the posterior mean or sd of each element.

    Parameters
    ----------
    draws : array_like
        ``[chain, draw, *shape]``.
    method : {"mean", "sd"}

    Returns
    -------
    ndarray
        ``[*shape]``; NaN with fewer than 4 draws per chain or non-finite draws.
    """
    if method not in ("mean", "sd"):
        raise ValueError(f"method must be 'mean' or 'sd', got {method!r}")
    x = _draws(draws)
    if x.shape[1] < _MIN_DRAWS or x.size == 0:
        return np.full(x.shape[2:], np.nan)
    return _per_element(x, "mcse", method=method)


def _labels(
    name: str, shape: tuple[int, ...], var_dims: Sequence[str], coords: Mapping[str, Sequence[Any]]
) -> list[str]:
    if not shape:
        return [name]
    values = []
    for i, size in enumerate(shape):
        dim = var_dims[i] if i < len(var_dims) else None
        values.append(list(coords[dim]) if dim in coords else list(range(size)))
    return [
        f"{name}[{', '.join(str(values[i][j]) for i, j in enumerate(idx))}]"
        for idx in np.ndindex(*shape)
    ]


def diagnostics(
    posterior: Mapping[str, np.ndarray],
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> Any:
    """R-hat, ESS and MCSE of every scalar element, like ``az.summary(kind="diagnostics")``.

    Parameters
    ----------
    posterior : dict of str to ndarray
        Variables, each ``[chain, draw, *shape]``.
    dims, coords : dict, optional
        As in :func:`to_inference_data`; used for the row labels.

    Returns
    -------
    pandas.DataFrame
        Columns ``mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat`` (unrounded
        floats, NaN as in :func:`mcse`, :func:`ess`, :func:`rhat`). One row per
        element, variables in ``posterior`` order and elements in C order,
        labelled ``name`` for a scalar and ``name[c0, c1, ...]`` otherwise, where
        ``c_i`` is ``str`` of the coordinate value of the element along its
        i-th dimension (the integer index when that dimension has no coords),
        joined by ", ": e.g. ``z[0, 1]`` or ``z[a, 1]``.
    """
    import pandas as pd

    dims, coords = dims or {}, coords or {}
    index: list[str] = []
    columns: dict[str, list[np.ndarray]] = {c: [] for c in DIAGNOSTIC_COLUMNS}
    for name, values in posterior.items():
        x = _draws(values)
        index += _labels(name, x.shape[2:], dims.get(name, ()), coords)
        values = {
            "mcse_mean": mcse(x, "mean"),
            "mcse_sd": mcse(x, "sd"),
            "ess_bulk": ess(x, "bulk"),
            "ess_tail": ess(x, "tail"),
            "r_hat": rhat(x),
        }
        for column in DIAGNOSTIC_COLUMNS:
            columns[column].append(values[column].ravel())
    data = {c: np.concatenate(v) if v else np.zeros(0) for c, v in columns.items()}
    return pd.DataFrame(data, index=pd.Index(index, dtype=object))


# --------------------------------------------------------------------------- importance sampling


def _khat_row(lw: np.ndarray) -> float:
    if lw.size < _MIN_PSIS_DRAWS:
        return float("inf")
    top = lw.max()
    if np.isnan(lw).any() or not np.isfinite(top):
        return float("nan")
    if top - lw.min() <= _CONSTANT_LOG_WEIGHT_RANGE:
        return float("-inf")
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # ArviZ's "k-hat > 0.7" warning (raised by its loo, not by psislw in 0.23 / 1.3) is the
        # very diagnostic returned here
        warnings.filterwarnings("ignore", message=_KHAT_WARNING, category=UserWarning)
        if _major() == 0:
            return float(_arviz().psislw(lw, reff=1.0)[1])
        try:
            # arviz_stats' psislw takes *negative* log-weights (log-likelihoods in PSIS-LOO)
            return float(_array_stats().psislw(-lw, r_eff=1.0, axis=-1)[1])
        except ValueError:  # "All tail values are the same": no tail to fit; 0.x gives inf
            return float("inf")


def pareto_khat(log_weights: Any) -> np.ndarray:
    """PSIS Pareto k-hat of importance log-weights (Vehtari et al. 2024).

    The shape of a generalised Pareto distribution fitted to the largest
    weights ``exp(log_weights)`` by ArviZ's PSIS (``r_eff = 1``: independent
    proposal draws): below 0.5 the weights have finite variance and importance
    sampling is reliable, above 0.7 estimates are unreliable.

    Parameters
    ----------
    log_weights : array_like
        ``[..., S]``: unnormalised log importance weights, draws on the last axis
        (e.g. ``log p(x, z) - log q(z)`` for ``z ~ q``).

    Returns
    -------
    ndarray
        ``[...]`` (a 0-d array for 1-d input). Special rows, in this order:
        ``+inf`` with fewer than 25 draws (fewer than 5 tail draws to fit; ArviZ
        0.x and R's loo report such a failed fit as inf); NaN when the row has a
        NaN or ``+inf``, or is all ``-inf``; ``-inf`` when all log-weights are
        equal to within 1e-9 (exact proposal: constant weights, the k -> -inf
        limit of bounded weights, which PSIS cannot fit: 0.x returns inf and 1.x
        raises). Weights with only a few distinct values make the fit ill-posed
        and the result version-dependent (finite, NaN or ``+inf``).

    Notes
    -----
    ArviZ 0.x's ``az.psislw(lw)`` takes log-weights; ArviZ 1.x's
    ``arviz_stats`` ``psislw(x)`` smooths ``exp(-x)`` (it takes log-likelihoods
    for PSIS-LOO), so it is called with ``-log_weights``. Both return the same
    k-hat convention, which this function keeps.
    """
    lw = np.asarray(log_weights, dtype=float)
    if lw.ndim == 0:
        raise ValueError("log_weights needs a draws axis (the last one)")
    rows = lw.reshape(int(np.prod(lw.shape[:-1])), lw.shape[-1])
    return np.array([_khat_row(row) for row in rows], dtype=float).reshape(lw.shape[:-1])
