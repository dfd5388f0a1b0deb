"""``ppl-vae cvae-quadrants`` and ``ppl-vae m2``: the model family's MNIST tables.

* :func:`cvae_quadrants` -- the deterministic baseline and the structured-output
  CVAE on binarised MNIST for 1, 2 and 3 visible quadrants; test negative
  conditional log-likelihood by importance sampling.
* :func:`m2_semisupervised` -- M2 on the labelled MNIST test set split into
  train and test, for several label budgets and random label draws.
* :func:`sdae_codes` -- a stacked denoising autoencoder (layer-wise pretraining,
  then fine-tuning) and a plain autoencoder of the same shape trained on the
  binarised-MNIST training images; logistic regression on their codes of the
  10,000 labelled test images, against raw pixels.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ... import io
from ...data import load, match_rows
from ...distributions import get_likelihood
from ...errors import ConfigError, DataError, check_int, check_seed
from ...inference.gaps.bounds import importance_bounds
from ...inference.pretrain import pretrain_layerwise, stacked_guide
from ...inference.random import pick, seeded
from ...inference.svi import fit
from ...models.cvae_so import (
    HIDDEN,
    baseline_model,
    empty_guide,
    mask_quadrants,
    so_cvae,
    so_cvae_guide,
    visible_mask,
)
from ...models.m2 import classify, m2, m2_guide
from ...models.stacked import stacked_autoencoder
from ...nn import MLP, GaussianEncoder
from ..figures.run import image_grid
from ..runs import prepare_run_dir, releasing

__all__ = [
    "TUTORIAL_NLL",
    "M2_REFERENCES",
    "TableResult",
    "cvae_quadrants",
    "m2_semisupervised",
    "quadrant_table",
    "m2_table",
    "sdae_codes",
    "codes_table",
]


#: Pyro's CVAE tutorial, test negative ELBO per image: {visible quadrants: (baseline, CVAE)}.
TUTORIAL_NLL = {1: (100.4, 71.8), 2: (61.9, 51.0), 3: (25.4, 24.2)}
#: Extra unlabelled data ``m2_semisupervised`` can add (dataset names for :func:`ppl_vae.data.load`, train split).
UNLABELLED = (None, "binarized-mnist")
#: published M2 test accuracies on MNIST by number of labels (Kingma et al. 2014, Table 1: 11.97, 4.94, 3.60 and 3.92 % error; Pyro's SS-VAE tutorial at 100)
M2_REFERENCES = {
    100: {"Kingma et al. 2014 M2 (60k MNIST)": 0.8803, "Pyro SS-VAE tutorial (60k MNIST)": 0.9319},
    600: {"Kingma et al. 2014 M2 (60k MNIST)": 0.9506},
    1000: {"Kingma et al. 2014 M2 (60k MNIST)": 0.9640},
    3000: {"Kingma et al. 2014 M2 (60k MNIST)": 0.9608},
}


@dataclass(frozen=True)
class TableResult:
    """Rows of an experiment table (one dict per row) and where they were written."""

    rows: tuple[dict[str, Any], ...]
    out: str

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))


def _positive(**values: int) -> None:
    for name, v in values.items():
        check_int(v, name.replace("_", "-"))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    p = io.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return p


# --- structured-output CVAE ------------------------------------------------------


@releasing
def cvae_quadrants(
    out: str | Path,
    *,
    quadrants: Sequence[int] = (1, 2, 3),
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    hidden: tuple[int, int] = (500, 500),
    latent_dim: int = 200,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    num_samples: int = 100,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> TableResult:
    """Train the baseline and the SO-CVAE per number of visible quadrants; write the table and completions.

    Networks follow Pyro's tutorial (two hidden layers of 500, ``z`` of 200).
    Training uses a seeded random ``train_limit`` rows (all by default) of the
    binarised-MNIST training split; the test score is on a seeded random ``test_limit`` rows
    of the test split (all by default). Writes ``results.csv``,
    ``results.json``, ``table.md`` and ``completions_q{n}.png`` into ``out``.
    """

    for q in quadrants:
        visible_mask(q)
    _positive(epochs=epochs, num_samples=num_samples, batch_size=batch_size, latent_dim=latent_dim)
    check_seed(seed)
    _positive(
        **{
            k: v
            for k, v in (("train_limit", train_limit), ("test_limit", test_limit))
            if v is not None
        }
    )
    train_all = load("binarized-mnist", "train", data_dir=data_dir)
    test_all = load("binarized-mnist", "test", data_dir=data_dir)
    out = prepare_run_dir(
        out, command="cvae-quadrants", force=force, inputs=[data_dir] if data_dir else []
    )
    xtr = train_all.x[pick(len(train_all), train_limit, seed=seed)]
    xte = test_all.x[pick(len(test_all), test_limit, seed=seed + 1)]
    d, h1, h2 = xtr.shape[1], *hidden
    rows: list[dict[str, Any]] = []
    opts = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    for q in quadrants:
        xin, xin_te = mask_quadrants(xtr, q), mask_quadrants(xte, q)
        t0 = time.perf_counter()
        with seeded(seed):  # network initialisation; the caller's RNG is left as it was
            base = MLP(d, [h1, h2], d)
        fit(baseline_model(base), empty_guide, (xin, xtr), **opts)
        base.requires_grad_(False)
        with seeded(seed + 1):
            prior_net = GaussianEncoder(MLP(d, [h1], h2), h2, latent_dim)
            recognition = GaussianEncoder(MLP(d, [h1], h2), h2, latent_dim)
            generation = MLP(latent_dim, [h1, h2], d)
        model, guide = so_cvae(prior_net, generation, baseline=base), so_cvae_guide(recognition)
        fit(model, guide, (xin, xtr), **opts)
        train_s = time.perf_counter() - t0
        b_nll = -importance_bounds(
            baseline_model(base), empty_guide, xin_te, xte, num_samples=1, batch_size=500, seed=seed
        ).iwae
        c = importance_bounds(
            model, guide, xin_te, xte, num_samples=num_samples, batch_size=500, seed=seed
        )
        c_nll, c_nelbo = -c.iwae, -c.elbo
        se = lambda v: (v.std() / math.sqrt(len(v))).item()  # noqa: E731
        rows.append(
            {
                "visible_quadrants": q,
                "baseline_nll": b_nll.mean().item(),
                "baseline_nll_se": se(b_nll),
                "cvae_nll_is": c_nll.mean().item(),
                "cvae_nll_is_se": se(c_nll),
                "cvae_neg_elbo": c_nelbo.mean().item(),
                "tutorial_baseline": TUTORIAL_NLL[q][0],
                "tutorial_cvae": TUTORIAL_NLL[q][1],
                "num_train": len(xtr),
                "num_test": len(xte),
                "epochs": epochs,
                "is_samples": num_samples,
                "train_s": train_s,
            }
        )
        n = 8
        shown = torch.cat(
            [
                xin_te[:n].clamp(min=0) + 0.5 * (xin_te[:n] == -1),
                xte[:n],
                predict(baseline_model(base), xin_te[:n])[0],
                predict(model, xin_te[:n], num_samples=3, seed=seed).reshape(-1, d),
            ]
        )
        fig = image_grid(shown, (1, 28, 28), n, f"{q} visible: input|truth|baseline|3 CVAE")
        _save(fig, out / f"completions_q{q}.png")
    io.write_csv(out / "results.csv", rows)
    io.write_json(out / "results.json", rows)
    io.write_text(out / "table.md", quadrant_table(rows))
    return TableResult(tuple(rows), str(out))


def quadrant_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`cvae_quadrants` rows."""
    lines = [
        "| visible quadrants | baseline NLL (exact) | CVAE NLL (IS) | CVAE neg. ELBO | tutorial baseline | tutorial CVAE |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['visible_quadrants']} | {r['baseline_nll']:.1f} ± {r['baseline_nll_se']:.1f} | "
            f"{r['cvae_nll_is']:.1f} ± {r['cvae_nll_is_se']:.1f} | {r['cvae_neg_elbo']:.1f} | "
            f"{r['tutorial_baseline']} | {r['tutorial_cvae']} |"
        )
    return "\n".join(lines) + "\n"


# --- M2 ------------------------------------------------------------------------


def _balanced_labels(
    y: torch.Tensor, num_labels: int, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    per_class = num_labels // num_classes
    picks = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < per_class:
            raise DataError(
                f"class {c} has only {len(idx)} rows; cannot draw {per_class} labels per class"
            )
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(picks)


@releasing
def m2_semisupervised(
    out: str | Path,
    *,
    labels: Sequence[int] = (100, 1000),
    draws: int = 3,
    data_dir: str | Path | None = None,
    num_test: int = 2000,
    latent_dim: int = 50,
    hidden: int = 500,
    alpha: float = 50.0,
    labelled_share: float = 0.1,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    unlabelled: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> TableResult:
    """M2 on MNIST's labelled 10,000-image test set: split into train and ``num_test`` test rows.

    For every label budget and draw, ``budget / 10`` labels per class are
    drawn at random from the training part; the other training rows are
    unlabelled. ``unlabelled="binarized-mnist"`` adds the 50,000 statically
    binarised training images (Larochelle & Murray's, themselves one Bernoulli
    draw of MNIST training images, so of the same kind as the test images
    binarised here) as further unlabelled rows: their labels are not known by
    position (docs/models.md), and M2 does not need them. Labelled rows are
    repeated so that they make up about ``labelled_share`` of each epoch (the
    paper's auxiliary-loss schedule needs them seen often). Pixels are
    binarised by one seeded Bernoulli draw. Also reported: the same classifier
    trained on the labelled rows alone. Writes ``results.csv``,
    ``results.json``, ``table.md``.
    """

    _check_m2(labels, draws, epochs, batch_size, latent_dim, seed, alpha, unlabelled)
    ds = load("mnist", "test", data_dir=data_dir, binarize="sample", seed=seed)
    assert ds.y is not None
    if not 0 < num_test < len(ds) - max(labels):
        raise ConfigError(f"num_test must leave room for the labels (have {len(ds)} rows)")
    extra = (
        load(unlabelled, "train", data_dir=data_dir).x.to(ds.x.dtype) if unlabelled else ds.x[:0]
    )
    if extra.shape[1:] != ds.x.shape[1:]:
        raise DataError(
            f"the {unlabelled} images have shape {tuple(extra.shape[1:])}, the MNIST test images {tuple(ds.x.shape[1:])}"
        )
    out = prepare_run_dir(out, command="m2", force=force, inputs=[data_dir] if data_dir else [])
    perm = pick(len(ds), None, seed=seed)
    test_idx, train_idx = perm[:num_test], perm[num_test:]
    runs = _M2Draws(
        ds.x[train_idx],
        ds.y[train_idx],
        ds.x[test_idx],
        ds.y[test_idx],
        extra,
        unlabelled=unlabelled,
        latent_dim=latent_dim,
        hidden=hidden,
        alpha=alpha,
        labelled_share=labelled_share,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
    )
    rows = [runs.row(n_lab, draw) for n_lab in labels for draw in range(draws)]
    io.write_csv(out / "results.csv", rows)
    io.write_json(out / "results.json", rows)
    io.write_text(out / "table.md", m2_table(rows))
    return TableResult(tuple(rows), str(out))


def _check_m2(
    labels: Sequence[int],
    draws: int,
    epochs: int,
    batch_size: int,
    latent_dim: int,
    seed: int,
    alpha: float,
    unlabelled: str | None,
) -> None:
    if any(n < 10 or n % 10 for n in labels):
        raise ConfigError(
            f"label budgets must be positive multiples of 10 (equal labels per class), got {list(labels)}"
        )
    _positive(draws=draws, epochs=epochs, batch_size=batch_size, latent_dim=latent_dim)
    check_seed(seed)
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    if unlabelled not in UNLABELLED:
        raise ConfigError(
            f"unknown unlabelled data {unlabelled!r}; choose {' or '.join(k for k in UNLABELLED if k)} (or none)"
        )


@dataclass(frozen=True)
class _M2Draws:
    """M2 and its classifier alone, trained on ``(xtr, ytr)`` with a few labels kept, tested on ``(xte, yte)``."""

    xtr: torch.Tensor
    ytr: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor
    extra: torch.Tensor
    unlabelled: str | None
    latent_dim: int
    hidden: int
    alpha: float
    labelled_share: float
    epochs: int
    batch_size: int
    lr: float
    seed: int
    progress: bool

    def row(self, n_lab: int, draw: int) -> dict[str, Any]:
        """The results of label budget ``n_lab``, draw ``draw``."""
        xtr, ytr, extra = self.xtr, self.ytr, self.extra
        gen = torch.Generator().manual_seed(1000 * self.seed + 17 * n_lab + draw)
        lab = _balanced_labels(ytr, n_lab, 10, gen)
        y_semi = torch.full_like(ytr, -1)
        y_semi[lab] = ytr[lab]
        pool = len(xtr) + len(extra)
        repeats = max(1, round(self.labelled_share * pool / n_lab))
        x_fit = torch.cat([xtr[y_semi < 0], extra, xtr[lab].repeat(repeats, 1)])
        y_fit = torch.cat(
            [y_semi[y_semi < 0], y_semi.new_full((len(extra),), -1), ytr[lab].repeat(repeats)]
        )
        acc, m2_s = self._m2(x_fit, y_fit, draw)
        sup_acc = self._supervised(xtr[lab].repeat(repeats, 1), ytr[lab].repeat(repeats), draw)
        return {
            "labels": n_lab,
            "draw": draw,
            "m2_accuracy": acc,
            "m2_error_pct": 100 * (1 - acc),
            "supervised_only_accuracy": sup_acc,
            "num_train": len(xtr),
            "num_test": len(self.xte),
            "num_unlabelled": pool - n_lab,
            "unlabelled_extra": self.unlabelled or "none",
            "epochs": self.epochs,
            "alpha": self.alpha,
            "labelled_repeats": repeats,
            "m2_train_s": m2_s,
        }

    def _m2(self, x: torch.Tensor, y: torch.Tensor, draw: int) -> tuple[float, float]:
        """M2's test accuracy after training on ``(x, y)`` (label -1: unlabelled), and the seconds it trained."""
        d, c, seed = x.shape[1], 10, self.seed + draw
        with seeded(seed):  # network initialisation; the caller's RNG is left as it was
            clf = MLP(d, [self.hidden], c)
            enc = GaussianEncoder(MLP(d + c, [], self.hidden), self.hidden, self.latent_dim)
            dec = MLP(self.latent_dim + c, [self.hidden], d)
        model = m2(dec, get_likelihood("bernoulli"), clf, self.latent_dim, c, alpha=self.alpha)
        guide = m2_guide(enc, clf, c)
        t0 = time.perf_counter()
        fit(
            model,
            guide,
            (x, y),
            estimator="enum",
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            progress=self.progress,
        )
        took = time.perf_counter() - t0
        return (classify(clf, self.xte) == self.yte).double().mean().item(), took

    def _supervised(self, x: torch.Tensor, y: torch.Tensor, draw: int) -> float:
        """The test accuracy of M2's classifier trained on the labelled rows alone."""
        with seeded(self.seed + draw):  # the classifier alone starts where M2's classifier started
            sup = MLP(x.shape[1], [self.hidden], 10)
        fit(
            _supervised(sup),
            empty_guide,
            (x, y),
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed + draw,
            progress=False,
        )
        return (classify(sup, self.xte) == self.yte).double().mean().item()


def _cv_accuracy(
    features: torch.Tensor, y: torch.Tensor, folds: int, seed: int
) -> tuple[float, float]:
    """Logistic regression (standardised features) by stratified ``folds``-fold cross-validation: mean accuracy and its SE over folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(
        clf,
        features.double().numpy(),
        y.numpy(),
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
    )
    return float(scores.mean()), float(scores.std(ddof=1) / math.sqrt(folds))


def sdae_codes(
    out: str | Path,
    *,
    layers: Sequence[int] = (500, 250, 50),
    data_dir: str | Path | None = None,
    train_limit: int | None = None,
    pretrain_epochs: int = 5,
    epochs: int = 10,
    noise: float = 0.25,
    batch_size: int = 100,
    lr: float = 1e-3,
    folds: int = 5,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> TableResult:
    """Codes of a stacked denoising autoencoder, a plain autoencoder and raw pixels, each classified by logistic regression.

    Both autoencoders have the encoder ``784 -> layers`` (sigmoid layers, linear code) and the
    mirrored decoder and are trained on the binarised-MNIST training images (a seeded random
    ``train_limit`` of them). The SDAE is pretrained layer by layer (``pretrain_epochs`` each,
    masking ``noise``) and fine-tuned ``epochs`` as one denoising autoencoder; the plain one
    starts from random weights and trains ``epochs + len(layers) * pretrain_epochs`` epochs
    without noise (the same number of passes). Their codes of the 10,000 binarised test
    images (MNIST's test images sorted by class; each gets the label of the MNIST test image it
    is most probable under, :func:`~ppl_vae.data.match_rows`) are classified with ``folds``-fold
    cross-validation.
    Writes ``results.json`` and ``table.md``.
    """
    widths = tuple(layers)
    _positive(
        epochs=epochs,
        batch_size=batch_size,
        folds=folds,
        **{f"layer_{i}": w for i, w in enumerate(widths)},
    )
    check_seed(seed)
    x, test, labels, (match, margin) = _sdae_data(data_dir, train_limit, seed)
    out = prepare_run_dir(
        out, command="sdae-codes", force=force, inputs=[data_dir] if data_dir else []
    )
    acc, se = _cv_accuracy(test.x, labels, folds, seed)
    rows: list[dict[str, Any]] = [
        {
            "features": "raw pixels",
            "dim": test.x.shape[1],
            "accuracy": acc,
            "accuracy_se": se,
            "train_s": 0.0,
            "reconstruction": None,
        }
    ]
    for name, pretrain in (("stacked denoising AE", True), ("plain AE (same shape)", False)):
        with seeded(seed):
            stack = stacked_autoencoder(x.shape[1], widths, get_likelihood("bernoulli"))
        t0 = time.perf_counter()
        if pretrain:
            pretrain_layerwise(
                stack,
                x,
                epochs=pretrain_epochs,
                noise=noise,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                progress=progress,
            )
        total = epochs if pretrain else epochs + len(widths) * pretrain_epochs
        result = fit(
            stack.model,
            stacked_guide(stack, noise if pretrain else 0.0),
            x,
            epochs=total,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=progress,
        )
        took = time.perf_counter() - t0
        acc, se = _cv_accuracy(_codes(stack, test.x), labels, folds, seed)
        rows.append(
            {
                "features": f"{name} codes",
                "dim": widths[-1],
                "accuracy": acc,
                "accuracy_se": se,
                "train_s": took,
                "reconstruction": result.train_elbo,
            }
        )
    meta = {
        "layers": list(widths),
        "num_train": len(x),
        "pretrain_epochs": pretrain_epochs,
        "epochs": epochs,
        "noise": noise,
        "folds": folds,
        "seed": seed,
        "distinct_matches": int(match.unique().numel()),
        "median_match_margin_nats": float(margin.median()),
        "min_match_margin_nats": float(margin.min()),
    }
    io.write_json(out / "results.json", {"rows": rows, **meta})
    io.write_text(out / "table.md", codes_table(rows, meta))
    return TableResult(tuple(rows), str(out))


def _sdae_data(
    data_dir: str | Path | None, train_limit: int | None, seed: int
) -> tuple[torch.Tensor, Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(training images, binarised test set, its labels, (match, margin))``: the labels by :func:`~ppl_vae.data.match_rows`."""
    train = load("binarized-mnist", "train", data_dir=data_dir, limit=None)
    test = load("binarized-mnist", "test", data_dir=data_dir)
    labelled = load("mnist", "test", data_dir=data_dir)
    assert labelled.y is not None
    if len(test) != len(labelled):
        raise DataError(
            f"binarised test set has {len(test)} rows, the MNIST test set {len(labelled)}"
        )
    # the binarised test rows are MNIST's test images sorted by class: each is matched to the grey image it is most probable under
    match, margin = match_rows(test.x, labelled.x)
    x = (
        train.x
        if train_limit is None
        else train.x[pick(len(train), check_int(train_limit, "--train-limit"), seed=seed)]
    )
    return x, test, labelled.y[match], (match, margin)


@torch.no_grad()
def _codes(stack: Any, x: torch.Tensor) -> torch.Tensor:
    """The stack's encoder's codes of ``x`` (in evaluation mode), 1000 rows at a time."""
    stack.encoder.train(False)
    return torch.cat([stack.encoder(x[i : i + 1000]) for i in range(0, len(x), 1000)])


def codes_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "| features | dim | test accuracy (logistic regression, CV) | training (s) | train reconstruction (nats/image) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rec = f"{r['reconstruction']:.2f}" if r["reconstruction"] is not None else ""
        lines.append(
            f"| {r['features']} | {r['dim']} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_se']:.2f} % | {r['train_s']:.0f} | {rec} |"
        )
    lines += [
        "",
        f"Encoders 784-{'-'.join(map(str, meta['layers']))} trained on {meta['num_train']} binarised-MNIST training images; "
        f"{meta['folds']}-fold cross-validated logistic regression on the codes of the 10,000 test images (± SE over folds). "
        f"Labels: each binarised test image matched to the MNIST test image it is most probable under ({meta['distinct_matches']} distinct "
        f"matches of 10,000; median log-likelihood margin to the runner-up {meta['median_match_margin_nats']:.0f} nats).",
    ]
    return "\n".join(lines) + "\n"


def _supervised(classifier: nn.Module) -> Any:
    """The classifier alone as a Pyro model ``(x, y)``: the supervised-only reference."""

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=classifier(x)), obs=y)

    return model


def m2_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown summary (mean ± sd over draws) of :func:`m2_semisupervised` rows."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    lines = [
        "| labels | draws | M2 test accuracy | M2 error % | classifier on labels only | unlabelled rows | test rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, g in df.groupby("labels"):
        sd = lambda s: s.std(ddof=1) if len(s) > 1 else float("nan")  # noqa: E731
        lines.append(
            f"| {n} | {len(g)} | {g.m2_accuracy.mean():.4f} ± {sd(g.m2_accuracy):.4f} | {g.m2_error_pct.mean():.2f} | "
            f"{g.supervised_only_accuracy.mean():.4f} ± {sd(g.supervised_only_accuracy):.4f} | "
            f"{g.num_unlabelled.iloc[0]} | {g.num_test.iloc[0]} |"
        )
    lines.append("")
    lines += [
        f"Reference at {n} labels, {k}: accuracy {v:.4f}"
        for n in sorted(set(df["labels"]))
        for k, v in M2_REFERENCES.get(int(n), {}).items()
    ]
    return "\n".join(lines) + "\n"


# --- the command line: ``ppl-vae cvae-quadrants``, ``m2`` and ``sdae-codes`` -----------


def command(args: argparse.Namespace) -> int:

    common = dict(
        data_dir=args.data_dir,
        epochs=args.epochs,
        seed=args.seed,
        force=args.force,
        progress=not args.no_progress,
    )
    if args.command == "m2":
        result = m2_semisupervised(
            args.out,
            labels=args.labels,
            draws=args.draws,
            alpha=args.alpha,
            unlabelled=args.unlabelled,
            lr=args.lr,
            **common,
        )
    elif args.command == "sdae-codes":
        result = sdae_codes(
            args.out,
            layers=args.layers,
            train_limit=args.train_limit,
            pretrain_epochs=args.pretrain_epochs,
            noise=args.noise,
            **common,
        )
    else:
        result = cvae_quadrants(
            args.out,
            quadrants=args.quadrants,
            train_limit=args.train_limit,
            test_limit=args.test_limit,
            num_samples=args.samples,
            **common,
        )
    print((Path(result.out) / "table.md").read_text(), end="")
    print(f"wrote {result.out}/")
    return 0


@torch.no_grad()
def predict(
    model: Callable[..., None], x_in: torch.Tensor, *, num_samples: int = 1, seed: int = 0
) -> torch.Tensor:
    """Completed images ``[num_samples, N, D]``: visible pixels kept, hidden ones drawn from the model (prior for ``z``)."""
    hidden = x_in == HIDDEN
    out = []
    with seeded(seed):
        for _ in range(num_samples):
            tr = pyro.poutine.trace(model).get_trace(x_in)
            out.append(torch.where(hidden, tr.nodes["y"]["fn"].mean, x_in))
    return torch.stack(out)
