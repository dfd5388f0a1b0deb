"""Are the binarised MNIST training rows the first 50,000 MNIST training images, in order? (issue 15's M2 question)

A logistic regression is trained on the 10,000 binarised test images, labelled through
:func:`ppl_vae.data.match_rows` (each binarised test image gets the label of the grey MNIST test image it is
most probable under), and predicts the 50,000 binarised training rows. Its predictions are compared with
MNIST's training labels under each alignment a user might assume. Run from the repository root:

    python docs/measure_training_rows.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from ppl_vae.data import load, match_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    args = p.parse_args()
    train = load("binarized-mnist", "train", data_dir=args.data_dir)
    test = load("binarized-mnist", "test", data_dir=args.data_dir)
    grey = load("mnist", "test", data_dir=args.data_dir)
    match, _ = match_rows(test.x, grey.x)
    y_test = grey.y[match].numpy()
    with gzip.open(Path(args.data_dir) / "mnist" / "raw" / "train-labels-idx1-ubyte.gz") as f:
        y_all = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(int)
    clf = LogisticRegression(max_iter=300, C=0.05).fit(test.x.numpy(), y_test)
    pred = clf.predict(train.x.numpy())
    n = len(pred)
    chance = float(
        np.sum(np.bincount(pred, minlength=10) / n * np.bincount(y_all[:n], minlength=10) / n)
    )
    print(
        f"classifier accuracy on its own (test) rows: {(clf.predict(test.x.numpy()) == y_test).mean():.4f}"
    )
    print(f"agreement expected by chance (class frequencies): {chance:.4f}")
    for name, ref in (
        ("first 50,000 in order", y_all[:n]),
        ("last 50,000 in order", y_all[-n:]),
        ("first 50,000 sorted by class", np.sort(y_all[:n])),
        ("all 60,000 sorted by class, first 50,000", np.sort(y_all)[:n]),
    ):
        a = float((pred == ref).mean())
        print(f"{name}: agreement {a:.4f} ± {np.sqrt(a * (1 - a) / n):.4f}")
    print(
        "predicted class shares per block of 5,000 rows (a sorted file would show one class per block):"
    )
    for i in range(0, n, 5000):
        print(
            f"  rows {i}-{i + 4999}: most common {np.bincount(pred[i : i + 5000]).argmax()} "
            f"({np.bincount(pred[i : i + 5000]).max() / 5000:.2f})"
        )


if __name__ == "__main__":
    main()
