"""``ppl-vae sdae-codes`` on small fake MNIST files: the table is written, and labels reach the binarised test images by matching."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from ppl_vae.cli import main


def _write(root, n_classes=10, per_class=6, seed=0):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    prototypes = rng.random((n_classes, 784)) ** 3
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.uint8)
    rng.shuffle(labels)  # MNIST's order: not sorted by class
    grey = np.clip(prototypes[labels] + 0.05 * rng.standard_normal((len(labels), 784)), 0, 1)
    raw = root / "mnist" / "raw"
    raw.mkdir(parents=True)
    images = np.round(grey * 255).astype(np.uint8).reshape(-1, 28, 28)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(struct.pack(">iiii", 0x803, *images.shape) + images.tobytes()))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">ii", 0x801, len(labels)) + labels.tobytes()))
    binarised = (rng.random(grey.shape) < images.reshape(len(labels), 784) / 255).astype(np.uint8)[np.argsort(labels, kind="stable")]
    folder = root / "binarized_mnist"
    folder.mkdir()
    savemat(folder / "binarized_mnist_test.mat", {"X": binarised})  # sorted by class, as the real file
    train = (rng.random((200, 784)) < prototypes[rng.integers(0, n_classes, 200)]).astype(np.uint8)
    savemat(folder / "binarized_mnist_train.mat", {"X": train})
    return len(labels)


@pytest.mark.slow
def test_sdae_codes_writes_its_table_from_fake_files(tmp_path, capsys):
    n = _write(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["sdae-codes", "--data-dir", str(tmp_path / "data"), "--layers", "16,4", "--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["distinct_matches"] == n and results["min_match_margin_nats"] > 0
    rows = {r["features"]: r for r in results["rows"]}
    assert set(rows) == {"raw pixels", "stacked denoising AE codes", "plain AE (same shape) codes"}
    chance = 0.1
    assert rows["raw pixels"]["accuracy"] > chance + 4 * rows["raw pixels"]["accuracy_se"]  # the matched labels are the right ones
    assert "| raw pixels | 784 |" in (out / "table.md").read_text()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # nothing overwritten without --force
