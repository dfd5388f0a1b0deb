"""Simulation-based calibration of an amortised guide, on PPCA where the exact posterior is known.

The exact guide must pass: every coordinate's ranks uniform (the Bonferroni-corrected chi-square test at alpha = 0.01
fails by chance with probability below 0.01). A guide with the right means and half the posterior sds must fail, as
under-dispersed, with the tail share (expected 0.2) far above its binomial SE; one with doubled sds as over-dispersed.
(The figure of the ranks, ``rank_histograms``: tests/app/test_calibrate.py.)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import frozen_ppca, inflated_guide

from ppl_vae.errors import ConfigError
from ppl_vae.inference.calibration import calibrate


def test_the_exact_guide_is_calibrated_and_a_narrow_one_is_under_dispersed():
    m = frozen_ppca()
    template = torch.zeros(1, 6, dtype=torch.float64)
    exact = calibrate(m, m.exact_guide, template, num_datasets=1000, num_draws=99, seed=0)
    assert exact.ranks.shape == (1000, 2) and exact.labels == ("z[0]", "z[1]")
    table = exact.table()
    assert (table["verdict"] == "calibrated").all(), table
    assert "calibrated." in exact.verdict()
    narrow = calibrate(
        m, inflated_guide(m, 0.5), template, num_datasets=1000, num_draws=99, seed=0
    ).table()
    assert narrow["verdict"].str.startswith("under-dispersed").all(), narrow
    assert (narrow["tail_share"] > 0.2 + 4 * narrow["tail_share_se"]).all()
    wide = calibrate(
        m, inflated_guide(m, 2.0), template, num_datasets=1000, num_draws=99, seed=0
    ).table()
    assert wide["verdict"].str.startswith("over-dispersed").all(), wide


def test_a_shifted_guide_is_biased_in_the_right_direction():
    m = frozen_ppca()

    def low(x):  # the exact posterior moved down by one posterior sd
        post = m.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z",
                dist.MultivariateNormal(
                    post.mean - post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt(),
                    post.covariance_matrix,
                ),
            )

    t = calibrate(
        m, low, torch.zeros(1, 6, dtype=torch.float64), num_datasets=500, num_draws=49, seed=1
    ).table()
    assert t["verdict"].str.contains("biased: q too low").all(), t
    assert (t["bias"] > 4 * t["bias_se"]).all()


def test_calibration_refuses_what_it_cannot_simulate_or_rank():
    m = frozen_ppca()
    x = torch.zeros(1, 6, dtype=torch.float64)
    with pytest.raises(ConfigError, match="multiple of bins"):
        calibrate(m, m.exact_guide, x, num_draws=100)

    def with_factor(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.factor("penalty", -z.pow(2).sum(-1))
            pyro.sample(
                "x", dist.Normal(z.sum(-1, keepdim=True).expand(-1, 6), 1.0).to_event(1), obs=x
            )

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    with pytest.raises(ConfigError, match="site 'penalty' is a pyro.factor"):
        calibrate(with_factor, guide, x, num_datasets=10, num_draws=9)
