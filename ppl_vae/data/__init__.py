"""Datasets as flat float tensors: embedded digits, binarised MNIST, (Fashion-)MNIST.

Nothing is downloaded on import, nor unless ``download=True`` is asked for.
Where files are missing, one :class:`~ppl_vae.errors.DataError` line says which
files to put where. The data directory is ``data_dir``, else the environment
variable ``PPL_VAE_DATA``, else ``~/.cache/ppl-vae``.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError

__all__ = [
    "Dataset",
    "load",
    "resolve_data_dir",
    "match_rows",
    "DATASETS",
    "SPLITS",
    "check_split",
    "BINARIZED_MNIST_URL",
]

DATASETS = ("digits", "binarized-mnist", "mnist", "fashion-mnist")
SPLITS = ("train", "valid", "test")
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
_SPLIT_FRACTIONS = (0.8, 0.1)  # digits: train / valid; the rest is test


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset: ``x`` is ``[N, C*H*W]`` float in [0, 1]; ``y`` labels or None."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor | None
    image_shape: tuple[int, int, int]
    num_classes: int | None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def tensors(self, with_labels: bool = False) -> tuple[torch.Tensor, ...]:
        """``(x,)`` or ``(x, y)``: what ``fit`` takes."""
        if with_labels:
            if self.y is None:
                raise DataError(f"{self.name} has no labels")
            return (self.x, self.y)
        return (self.x,)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir``, else ``$PPL_VAE_DATA``, else ``~/.cache/ppl-vae``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("PPL_VAE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppl-vae"


def _split_indices(n: int, split: str) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    a, b = int(n * _SPLIT_FRACTIONS[0]), int(n * (_SPLIT_FRACTIONS[0] + _SPLIT_FRACTIONS[1]))
    return {"train": perm[:a], "valid": perm[a:b], "test": perm[b:]}[split]


def _digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _split_indices(len(d.target), split).numpy()
    return d.data[idx] / 16.0, d.target[idx], (1, 8, 8)


def _check_binary_matrix(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != 784 or x.shape[0] == 0:
        raise DataError(f"{path}: expected an (N, 784) array of 0/1 pixels, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: expected numeric pixels, got dtype {x.dtype}")
    if not np.isin(x, (0, 1)).all():
        raise DataError(f"{path}: binarised MNIST must hold only 0 and 1")
    return x


def _read_amat(path: Path) -> np.ndarray:
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return np.asarray(rows, dtype=np.float32)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a binarised-MNIST .amat file ({exc})") from None
    except OSError as exc:  # permission denied, a directory, an I/O error
        raise DataError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None


def _read_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # scipy raises several types for a bad file
        raise DataError(f"{path}: not a readable MATLAB file ({type(exc).__name__})") from None
    if "X" not in mat:
        raise DataError(f"{path}: expected a variable 'X' in the MAT-file")
    return np.asarray(mat["X"])


def _binarized_mnist(
    root: Path, split: str, download: bool
) -> tuple[np.ndarray, None, tuple[int, int, int]]:
    stem = f"binarized_mnist_{split}"
    for folder in (root / "binarized_mnist", root):
        for ext, reader in ((".amat", _read_amat), (".mat", _read_mat)):
            path = folder / (stem + ext)
            if path.is_file():
                return _check_binary_matrix(reader(path), path), None, (1, 28, 28)
    if download:
        from torchvision.datasets.utils import download_url

        target = root / "binarized_mnist"
        try:
            download_url(BINARIZED_MNIST_URL.format(split=split), str(target), stem + ".amat")
        except Exception as exc:  # network errors come in many types
            raise DataError(
                f"could not download binarised MNIST ({type(exc).__name__}); put {stem}.amat or {stem}.mat in {target}"
            ) from None
        path = target / (stem + ".amat")
        return _check_binary_matrix(_read_amat(path), path), None, (1, 28, 28)
    raise DataError(
        f"binarised MNIST split {split!r} not found: put {stem}.amat or {stem}.mat in {root / 'binarized_mnist'} (or pass --download)"
    )


_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(root: Path, folder: str, stem: str) -> Path | None:
    for d in (root / folder / "raw", root / folder.lower() / "raw", root / "raw", root):
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _read_idx(path: Path, reader: object) -> torch.Tensor:
    if path.suffix != ".gz":
        return reader(str(path))  # type: ignore[operator]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / path.stem
        with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return reader(str(raw))  # type: ignore[operator]


def _torchvision_mnist(
    name: str, root: Path, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    from torchvision import datasets
    from torchvision.datasets.mnist import read_image_file, read_label_file

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    part = "test" if split == "test" else "train"
    images, labels = (_find_idx(root, cls.__name__, stem) for stem in _IDX[part])
    if (images is None or labels is None) and download:
        try:
            cls(str(root), train=part == "train", download=True)
        except Exception as exc:
            raise DataError(
                f"could not download {name} ({type(exc).__name__}); put its IDX files in {root / cls.__name__ / 'raw'}"
            ) from None
        images, labels = (_find_idx(root, cls.__name__, stem) for stem in _IDX[part])
    if images is None or labels is None:
        raise DataError(
            f"{name} {part} split not found: put {_IDX[part][0]}.gz and {_IDX[part][1]}.gz in {root / cls.__name__ / 'raw'} (or pass --download)"
        )
    try:
        x = _read_idx(images, read_image_file).reshape(-1, 784).numpy() / 255.0
        y = _read_idx(labels, read_label_file).numpy()
    except OSError as exc:
        raise DataError(
            f"cannot read the IDX files in {images.parent} ({exc.strerror or type(exc).__name__})"
        ) from None
    except Exception as exc:
        raise DataError(f"{images.parent}: unreadable IDX files ({type(exc).__name__})") from None
    if len(x) != len(y):
        raise DataError(f"{images.parent}: {len(x)} images but {len(y)} labels")
    if part == "train":  # the last 5000 of a fixed permutation are the validation split
        perm = np.random.default_rng(0).permutation(len(x))
        idx = perm[:-5000] if split == "train" else perm[-5000:]
        x, y = x[idx], y[idx]
    return x, y, (1, 28, 28)


def check_split(split: str) -> None:
    """Refuse (``ConfigError``, naming it) a ``split`` that is not one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def load(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    binarize: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load one split of a dataset.

    Parameters
    ----------
    name : {"digits", "binarized-mnist", "mnist", "fashion-mnist"}
        ``digits`` is scikit-learn's 8x8 digits (1797 images, shipped with
        scikit-learn: no download), split 80/10/10 by a fixed permutation.
        ``binarized-mnist`` is the static binarisation of Larochelle & Murray
        (2011), read from ``.amat`` or ``.mat`` files. ``mnist`` and
        ``fashion-mnist`` come through torchvision (the last 5000 training
        images form the validation split); a folder with only the test IDX
        files serves the test split.
    split : {"train", "valid", "test"}
    data_dir : path, optional
        See :func:`resolve_data_dir`.
    download : bool
        Download missing files (needs a network).
    binarize : {None, "threshold", "sample"}
        Threshold intensities at 0.5, or draw one fixed Bernoulli sample per
        pixel (seeded): a static binarisation.
    limit : int, optional
        Keep the first ``limit`` rows.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    split = {"val": "valid", "validation": "valid"}.get(split, split)
    check_split(split)
    root = resolve_data_dir(data_dir)
    if name == "digits":
        x, y, shape = _digits(split)
    elif name == "binarized-mnist":
        x, y, shape = _binarized_mnist(root, split, download)
    else:
        x, y, shape = _torchvision_mnist(name, root, split, download)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be positive, got {limit}")
        x, y = x[:limit], (y[:limit] if y is not None else None)
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.get_default_dtype())
    if binarize == "threshold":
        xt = (xt >= 0.5).to(xt.dtype)
    elif binarize == "sample":
        xt = torch.bernoulli(xt, generator=torch.Generator().manual_seed(seed))
    elif binarize is not None:
        raise ConfigError(f"unknown binarize {binarize!r}; choose threshold or sample")
    yt = torch.as_tensor(y, dtype=torch.long) if y is not None else None
    return Dataset(name, split, xt, yt, shape, 10 if yt is not None else None)


def match_rows(
    binary: torch.Tensor, grey: torch.Tensor, *, batch_size: int = 1000, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``binary``, the row of ``grey`` under which it is most probable, and the margin of that match.

    A stochastically binarised image is a draw of Bernoulli pixels with the grey image's
    intensities as probabilities (clamped to ``[eps, 1 - eps]``); each binary row gets the grey
    row of highest log-likelihood, and the margin is its log-likelihood minus the runner-up's
    (nats; large for a true match). This recovers, e.g., the labels of the binarised-MNIST test
    set (its rows are MNIST's test images, sorted by class) from MNIST's labelled test set.
    """
    g = grey.double().clamp(eps, 1 - eps)
    on, off = g.log(), (1 - g).log()
    index, margin = [], []
    for i in range(0, binary.shape[0], batch_size):
        b = binary[i : i + batch_size].double()
        top = (b @ on.T + (1 - b) @ off.T).topk(min(2, g.shape[0]), dim=1)
        index.append(top.indices[:, 0])
        margin.append(
            top.values[:, 0] - top.values[:, 1]
            if top.values.shape[1] > 1
            else torch.full_like(top.values[:, 0], math.inf)
        )
    return torch.cat(index), torch.cat(margin)
