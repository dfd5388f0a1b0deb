"""Data loaders and atomic I/O, on small files made in ``tmp_path`` (nothing is downloaded)."""

from __future__ import annotations

import gzip
import os
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae import io
from ppl_vae.data import Dataset, load, resolve_data_dir
from ppl_vae.errors import CheckpointError, ConfigError, DataError

DIGITS_N = 1797


# --------------------------------------------------------------------------- helpers


def _binary_rows(n: int, d: int = 784, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(n, d), dtype=np.uint8)


def _write_amat(path: Path, rows: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(str(int(v)) for v in row) for row in rows) + "\n")
    return path


def _idx_images(images: np.ndarray) -> bytes:
    assert images.dtype == np.uint8 and images.ndim == 3
    return struct.pack(">iiii", 0x00000803, *images.shape) + images.tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    assert labels.dtype == np.uint8 and labels.ndim == 1
    return struct.pack(">ii", 0x00000801, len(labels)) + labels.tobytes()


def _no_temp_files(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.iterdir())


@pytest.fixture
def no_network(monkeypatch):
    """Make every download attempt and every socket connection fail loudly."""
    import torchvision.datasets.utils as tv_utils

    class NetworkTouched(RuntimeError):
        pass

    def refuse(*args, **kwargs):
        raise NetworkTouched("the network was touched")

    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return NetworkTouched


# --------------------------------------------------------------------------- binarised MNIST


def test_amat_reader_exact(tmp_path):
    rows = _binary_rows(5)
    _write_amat(tmp_path / "binarized_mnist" / "binarized_mnist_train.amat", rows)
    ds = load("binarized-mnist", "train", data_dir=tmp_path)
    assert isinstance(ds, Dataset)
    assert ds.x.shape == (5, 784)
    assert ds.x.dtype == torch.get_default_dtype()
    assert torch.equal(ds.x, torch.as_tensor(rows, dtype=ds.x.dtype))
    assert ds.y is None and ds.num_classes is None
    assert ds.image_shape == (1, 28, 28)
    assert len(ds) == 5
    with pytest.raises(DataError):
        ds.tensors(with_labels=True)


def test_amat_reader_limit(tmp_path):
    rows = _binary_rows(5, seed=1)
    _write_amat(tmp_path / "binarized_mnist" / "binarized_mnist_test.amat", rows)
    ds = load("binarized-mnist", "test", data_dir=tmp_path, limit=2)
    assert torch.equal(ds.x, torch.as_tensor(rows[:2], dtype=ds.x.dtype))


def test_mat_reader_exact_and_val_alias(tmp_path):
    from scipy.io import savemat

    rows = _binary_rows(4, seed=2)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    savemat(folder / "binarized_mnist_valid.mat", {"X": rows})
    expected = torch.as_tensor(rows, dtype=torch.get_default_dtype())
    for split in ("valid", "val"):
        ds = load("binarized-mnist", split, data_dir=tmp_path)
        assert ds.split == "valid"
        assert torch.equal(ds.x, expected)


def test_mat_without_x_variable(tmp_path):
    from scipy.io import savemat

    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    savemat(folder / "binarized_mnist_valid.mat", {"images": _binary_rows(2)})
    with pytest.raises(DataError, match="'X'"):
        load("binarized-mnist", "valid", data_dir=tmp_path)


def test_amat_wrong_shape(tmp_path):
    path = _write_amat(
        tmp_path / "binarized_mnist" / "binarized_mnist_train.amat", _binary_rows(3, d=783)
    )
    with pytest.raises(DataError, match="784") as info:
        load("binarized-mnist", "train", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_amat_ragged_rows(tmp_path):
    path = tmp_path / "binarized_mnist" / "binarized_mnist_train.amat"
    path.parent.mkdir()
    path.write_text(" ".join(["0"] * 784) + "\n" + " ".join(["1"] * 783) + "\n")
    with pytest.raises(DataError):
        load("binarized-mnist", "train", data_dir=tmp_path)


def test_amat_non_binary(tmp_path):
    rows = _binary_rows(3, seed=3)
    rows[1, 100] = 2
    _write_amat(tmp_path / "binarized_mnist" / "binarized_mnist_train.amat", rows)
    with pytest.raises(DataError, match="0 and 1"):
        load("binarized-mnist", "train", data_dir=tmp_path)


def test_amat_garbage(tmp_path):
    path = tmp_path / "binarized_mnist" / "binarized_mnist_train.amat"
    path.parent.mkdir()
    path.write_text("this is not\na binarised mnist file\n")
    with pytest.raises(DataError, match="amat"):
        load("binarized-mnist", "train", data_dir=tmp_path)


def test_amat_binary_garbage(tmp_path):
    path = tmp_path / "binarized_mnist" / "binarized_mnist_train.amat"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xfe\x00\x81" * 50)
    with pytest.raises(DataError):
        load("binarized-mnist", "train", data_dir=tmp_path)


def test_mat_garbage(tmp_path):
    path = tmp_path / "binarized_mnist" / "binarized_mnist_test.mat"
    path.parent.mkdir()
    path.write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(DataError, match="MATLAB"):
        load("binarized-mnist", "test", data_dir=tmp_path)


def test_binarized_mnist_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load("binarized-mnist", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert "binarized_mnist_train.amat" in msg
    assert str(tmp_path / "binarized_mnist") in msg
    assert "\n" not in msg


def test_binarized_mnist_file_in_root_is_found(tmp_path):
    rows = _binary_rows(2, seed=4)
    _write_amat(tmp_path / "binarized_mnist_test.amat", rows)
    ds = load("binarized-mnist", "test", data_dir=tmp_path)
    assert torch.equal(ds.x, torch.as_tensor(rows, dtype=ds.x.dtype))


# --------------------------------------------------------------------------- MNIST IDX


def _write_mnist_test_split(root: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=3, dtype=np.uint8)
    raw = root / "mnist" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images)))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels)))
    return images, labels


def test_mnist_idx_test_split(tmp_path):
    images, labels = _write_mnist_test_split(tmp_path)
    ds = load("mnist", "test", data_dir=tmp_path)
    expected = torch.as_tensor(images.reshape(3, 784) / 255.0, dtype=ds.x.dtype)
    assert ds.x.shape == (3, 784)
    assert torch.equal(ds.x, expected)
    assert ds.y is not None and ds.y.dtype == torch.long
    assert torch.equal(ds.y, torch.as_tensor(labels, dtype=torch.long))
    assert ds.num_classes == 10
    assert ds.image_shape == (1, 28, 28)
    x, y = ds.tensors(with_labels=True)
    assert x is ds.x and y is ds.y


def test_mnist_train_split_missing_names_files(tmp_path):
    _write_mnist_test_split(tmp_path)
    for split in ("train", "valid"):
        with pytest.raises(DataError) as info:
            load("mnist", split, data_dir=tmp_path)
        msg = str(info.value)
        assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg


def test_mnist_label_count_mismatch(tmp_path):
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images)))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_labels(np.zeros(2, dtype=np.uint8)))
    )
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load("mnist", "test", data_dir=tmp_path)


def test_mnist_corrupted_idx(tmp_path):
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"garbage" * 20))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_labels(np.zeros(3, dtype=np.uint8)))
    )
    with pytest.raises(DataError, match="unreadable"):
        load("mnist", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- digits


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    full = load_digits()
    splits = [load("digits", s) for s in ("train", "valid", "test")]
    assert sum(len(s) for s in splits) == DIGITS_N
    for s in splits:
        assert s.image_shape == (1, 8, 8)
        assert s.x.shape[1] == 64
        assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0
        assert s.y is not None and s.y.shape == (len(s),) and s.num_classes == 10
    # As multisets of (pixels, label) rows, the three splits together are exactly the dataset:
    # every row is used once, so the splits are disjoint and cover all 1797 rows.
    got = np.concatenate(
        [np.concatenate([s.x.double().numpy() * 16, s.y.numpy()[:, None]], 1) for s in splits]
    )
    want = np.concatenate([full.data, full.target[:, None]], 1).astype(np.float64)
    got_sorted = got[np.lexsort(got.T[::-1])]
    want_sorted = want[np.lexsort(want.T[::-1])]
    np.testing.assert_allclose(got_sorted, want_sorted, rtol=0, atol=1e-5)
    # and the split is fixed: loading twice gives the same rows
    assert torch.equal(load("digits", "valid").x, splits[1].x)


def test_digits_binarize_threshold_and_sample():
    cont = load("digits", "train")
    thr = load("digits", "train", binarize="threshold")
    assert set(thr.x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(thr.x, (cont.x >= 0.5).to(cont.x.dtype))
    assert set(cont.x.unique().tolist()) != {0.0, 1.0}  # the raw data are not binary
    s0 = load("digits", "train", binarize="sample", seed=0)
    s0b = load("digits", "train", binarize="sample", seed=0)
    s1 = load("digits", "train", binarize="sample", seed=1)
    assert set(s0.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(s0.x, s0b.x)
    assert not torch.equal(s0.x, s1.x)
    assert bool((s0.x[cont.x == 0] == 0).all()) and bool((s0.x[cont.x == 1] == 1).all())


def test_digits_limit():
    full = load("digits", "test")
    few = load("digits", "test", limit=7)
    assert len(few) == 7 and few.y is not None and len(few.y) == 7
    assert torch.equal(few.x, full.x[:7])
    assert torch.equal(few.y, full.y[:7])
    with pytest.raises(ConfigError):
        load("digits", "test", limit=0)


def test_load_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load("cifar", "train")
    with pytest.raises(ConfigError, match="unknown split"):
        load("digits", "holdout")
    with pytest.raises(ConfigError, match="binarize"):
        load("digits", "train", binarize="round")


# --------------------------------------------------------------------------- data dir, network


def test_resolve_data_dir_env_and_explicit(tmp_path, monkeypatch):
    env_dir, explicit = tmp_path / "from_env", tmp_path / "explicit"
    monkeypatch.setenv("PPL_VAE_DATA", str(env_dir))
    assert resolve_data_dir() == env_dir
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit)) == explicit
    monkeypatch.delenv("PPL_VAE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "ppl-vae"


def test_load_uses_env_data_dir(tmp_path, monkeypatch):
    rows = _binary_rows(3, seed=5)
    _write_amat(tmp_path / "env" / "binarized_mnist" / "binarized_mnist_test.amat", rows)
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "env"))
    ds = load("binarized-mnist", "test")
    assert torch.equal(ds.x, torch.as_tensor(rows, dtype=ds.x.dtype))
    # an explicit folder wins over the environment
    with pytest.raises(DataError, match="other"):
        load("binarized-mnist", "test", data_dir=tmp_path / "other")


def test_nothing_downloaded_without_download(tmp_path, no_network):
    for name in ("binarized-mnist", "mnist", "fashion-mnist"):
        with pytest.raises(DataError) as info:
            load(name, "test", data_dir=tmp_path)
        assert not isinstance(info.value, no_network)
        assert "--download" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # not even an empty folder was made


def test_failed_download_is_one_data_error(tmp_path, no_network):
    with pytest.raises(DataError, match="could not download binarised MNIST") as info:
        load("binarized-mnist", "train", data_dir=tmp_path, download=True)
    assert "NetworkTouched" in str(info.value)  # the (patched) downloader was really called
    assert str(tmp_path / "binarized_mnist") in str(info.value)


def test_import_does_not_touch_network(no_network, monkeypatch):
    import importlib
    import sys

    import ppl_vae
    import ppl_vae.data

    # import a fresh copy of the module with the network cut off; restore the original afterwards
    original = ppl_vae.data
    monkeypatch.setattr(ppl_vae, "data", original)
    monkeypatch.delitem(sys.modules, "ppl_vae.data")
    fresh = importlib.import_module("ppl_vae.data")
    assert fresh is not original
    assert "digits" in fresh.DATASETS
    assert fresh.load("digits", "test", limit=3).x.shape == (
        3,
        64,
    )  # embedded data: no network either


# --------------------------------------------------------------------------- ppl_vae.io


def test_atomic_writes_roundtrip_without_temp_files(tmp_path):
    io.write_text(tmp_path / "t.txt", "héllo")
    io.write_json(tmp_path / "j.json", {"b": 1, "a": [1.5, None]})
    io.write_csv(tmp_path / "c.csv", [{"x": 1, "y": 2}, {"x": 3, "z": 4}])
    io.save_torch(tmp_path / "w.pt", {"w": torch.arange(3.0)})
    io.write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    import json

    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1.5, None], "b": 1}
    assert (tmp_path / "c.csv").read_text().splitlines() == ["x,y,z", "1,2,", "3,,4"]
    assert torch.equal(io.load_torch(tmp_path / "w.pt")["w"], torch.arange(3.0))
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "sub")


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    io.write_text(target, "old content")

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        io.write_json(target, {"new": True})
    monkeypatch.undo()
    assert target.read_text() == "old content"
    assert _no_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_save_torch_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "checkpoint.pt"
    io.save_torch(target, {"params": [torch.ones(2)]})
    before = target.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle me")

    with pytest.raises(RuntimeError, match="cannot pickle me"):
        io.save_torch(target, {"params": [torch.zeros(1000)], "bad": Unpicklable()})
    assert target.read_bytes() == before
    assert _no_temp_files(tmp_path)
    assert torch.equal(io.load_torch(target)["params"][0], torch.ones(2))


def test_load_torch_missing_and_corrupted(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        io.load_torch(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(CheckpointError, match="corrupted"):
        io.load_torch(bad)


def test_match_rows_recovers_which_grey_image_each_binarised_one_was_drawn_from():
    from ppl_vae.data import match_rows

    g = torch.Generator().manual_seed(0)
    grey = torch.rand(200, 784, generator=g) ** 3  # mostly dark pixels, like digits
    order = torch.randperm(200, generator=g)
    binary = torch.bernoulli(
        grey[order], generator=g
    )  # shuffled Bernoulli draws, as binarised MNIST's test set
    index, margin = match_rows(binary, grey, batch_size=64)
    assert torch.equal(index, order)
    assert (
        margin > 0
    ).all() and margin.median() > 20  # a true match is far more probable than the next best
