"""The ``m2`` command and its table: label budgets, unlabelled extras, the published references, seeding; bad input is one line."""

from __future__ import annotations

import torch
from conftest import one_line, write_fake_mnist

from ppl_vae.app.commands.tables import m2_semisupervised, m2_table
from ppl_vae.cli import main


def test_cli_bad_label_budget_is_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "m2"
    assert main(["m2", "--labels", "15", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    one_line(capsys, "multiples of 10")
    assert not out.exists()


def test_m2_table_adds_the_binarised_training_images_as_unlabelled_rows(tmp_path, capsys):
    data = tmp_path / "data"
    n = write_fake_mnist(data, per_class=8)  # 80 labelled test images, 200 binarised training rows
    kw = dict(
        labels=[10],
        draws=1,
        data_dir=data,
        num_test=20,
        latent_dim=4,
        hidden=16,
        epochs=1,
        batch_size=50,
    )
    plain = m2_semisupervised(tmp_path / "plain", **kw).rows[0]
    more = m2_semisupervised(tmp_path / "more", unlabelled="binarized-mnist", **kw).rows[0]
    assert plain["num_unlabelled"] == n - 20 - 10 and more["num_unlabelled"] == n - 20 - 10 + 200
    assert more["unlabelled_extra"] == "binarized-mnist" and plain["unlabelled_extra"] == "none"
    # the labelled rows keep their share of an epoch: repeated in proportion to the larger pool
    assert more["labelled_repeats"] == round(0.1 * (n - 20 + 200) / 10) and plain[
        "labelled_repeats"
    ] == max(1, round(0.1 * (n - 20) / 10))
    assert "| 10 | 1 |" in (tmp_path / "more" / "table.md").read_text()
    assert (
        main(
            [
                "m2",
                "--labels",
                "10",
                "--unlabelled",
                "omniglot",
                "--data-dir",
                str(data),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    one_line(capsys, "unknown unlabelled data 'omniglot'")
    assert not (tmp_path / "bad").exists()


def test_m2_table_quotes_the_published_accuracy_of_each_label_budget_it_shows():
    row = dict(
        m2_accuracy=0.9,
        m2_error_pct=10.0,
        supervised_only_accuracy=0.85,
        num_unlabelled=100,
        num_test=20,
    )
    table = m2_table([{**row, "labels": n, "draw": d} for n in (100, 1000) for d in (0, 1)])
    refs = [line for line in table.splitlines() if line.startswith("Reference")]
    assert [line.split(",")[0] for line in refs] == ["Reference at 100 labels"] * 2 + [
        "Reference at 1000 labels"
    ]
    assert "0.9640" in refs[-1] and "0.8803" in refs[0]
    assert not [
        line
        for line in m2_table([{**row, "labels": 10, "draw": 0}]).splitlines()
        if line.startswith("Reference")
    ]


def test_the_m2_table_depends_on_its_seed_alone(tmp_path):
    """The same seed twice, the global random state moved in between: the same accuracies (the supervised baseline's included)."""
    data = tmp_path / "data"
    write_fake_mnist(data, per_class=8)
    kw = dict(
        labels=[10],
        draws=1,
        data_dir=data,
        num_test=20,
        latent_dim=4,
        hidden=16,
        epochs=1,
        batch_size=50,
        seed=3,
    )
    torch.manual_seed(1)
    first = m2_semisupervised(tmp_path / "a", **kw).rows[0]
    torch.manual_seed(2)
    second = m2_semisupervised(tmp_path / "b", **kw).rows[0]
    assert (first["m2_accuracy"], first["supervised_only_accuracy"]) == (
        second["m2_accuracy"],
        second["supervised_only_accuracy"],
    )
