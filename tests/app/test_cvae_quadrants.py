"""The ``cvae-quadrants`` command: its completions of the hidden quadrants (``predict``); bad input is one line and creates nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line

from ppl_vae.app.commands.tables import predict
from ppl_vae.cli import main
from ppl_vae.data import load
from ppl_vae.models.cvae_so import (
    mask_quadrants,
    so_cvae,
)
from ppl_vae.nn import MLP, GaussianEncoder


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--quadrants", "4"], "1, 2 or 3"),
        (["--epochs", "0"], "epochs must be"),
        ([], "binarised MNIST split"),
    ],
)
def test_cli_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, args, fragment):
    out = tmp_path / "q"
    assert (
        main(["cvae-quadrants", "--data-dir", str(tmp_path / "empty"), "--out", str(out), *args])
        == 2
    )
    one_line(capsys, fragment)
    assert not out.exists()


def test_predict_keeps_the_visible_pixels_and_draws_the_hidden_ones_as_probabilities():
    """A CVAE on one visible quadrant of the 8x8 digits, with a baseline network: two completions of five images."""
    torch.manual_seed(0)
    xt_in = mask_quadrants(load("digits", "test", binarize="threshold").x[:5], 1)
    model = so_cvae(
        GaussianEncoder(MLP(64, [], 32), 32, 4), MLP(4, [32], 64), baseline=MLP(64, [32], 64)
    )
    completed = predict(model, xt_in, num_samples=2)
    visible = xt_in != -1
    assert completed.shape == (2, 5, 64)
    assert torch.equal(completed[0][visible], xt_in[visible])
    assert torch.equal(completed[1][visible], xt_in[visible])
    assert bool(((completed >= 0) & (completed <= 1)).all())
    assert not torch.equal(
        completed[0][~visible], completed[1][~visible]
    )  # two draws of z, two completions
