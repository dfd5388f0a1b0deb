"""ppl_vae.inference.azcompat under whichever ArviZ is installed (0.2x, or 1.x in CI's second pass).

Every test runs under pytest's ``filterwarnings = error`` (pyproject.toml), so
any warning from ArviZ, xarray or NumPy fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from ppl_vae.inference import azcompat

pytestmark = pytest.mark.arviz


def major() -> int:
    """The installed ArviZ's major version (imports ArviZ: called inside tests, not at collection)."""
    return int(azcompat.arviz_version().split(".")[0])


def _log_weights(
    rng: np.random.Generator, proposal: stats.rv_continuous, shape: tuple[int, ...]
) -> np.ndarray:
    """``log N(z; 0, 1) - log q(z)`` for ``z ~ q``: importance log-weights for a standard normal target."""
    z = proposal.rvs(size=shape, random_state=rng)
    return stats.norm.logpdf(z) - proposal.logpdf(z)


# --------------------------------------------------------------------------- import


def test_import_notice_is_silenced_with_fresh_daily_stamp(tmp_path):
    """ArviZ 0.23 warns about its refactor once a day (stamp file in the user cache dir).

    A fresh cache dir makes the notice due again; importing ArviZ through azcompat
    must still pass ``-W error``, while a plain ``import arviz`` fails under 0.x
    (showing the notice really fires) and passes under 1.x (which has none).
    """
    import matplotlib

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "MPLCONFIGDIR": matplotlib.get_cachedir()}
    ours = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('azcompat', {azcompat.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "print(m.arviz_version())\n"
    )

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-W", "error", "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    plain = run("import arviz")  # first: it would write today's stamp if it got that far
    result = run(ours)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == azcompat.arviz_version()
    if major() == 0:
        assert plain.returncode != 0 and "major refactor" in plain.stderr, plain.stderr
    else:
        assert plain.returncode == 0, plain.stderr


# --------------------------------------------------------------------------- k-hat


def test_khat_exact_proposal_is_good():
    """Proposal == target: every log-weight is equal (the weights are constant, bounded)."""
    rng = np.random.default_rng(0)
    lw = _log_weights(rng, stats.norm(0.0, 1.0), (6, 4000))
    assert np.ptp(lw, axis=-1).max() < 1e-9  # equal up to rounding
    khat = azcompat.pareto_khat(
        lw + rng.normal(size=(6, 1))
    )  # an arbitrary constant per row changes nothing
    assert khat.shape == (6,)
    assert np.all(khat < 0.5)
    assert np.all(khat == -np.inf)  # documented: constant weights are the k -> -inf limit


def test_khat_wider_proposal_is_good():
    """Proposal t_5, wider than the N(0, 1) target: w = phi(z) / t_5(z) is bounded, so theory gives k <= 0."""
    rng = np.random.default_rng(1)
    khat = azcompat.pareto_khat(_log_weights(rng, stats.t(df=5), (8, 4000)))
    assert khat.shape == (8,)
    assert np.all(np.isfinite(khat)) and np.all(khat < 0.5)


def test_khat_narrow_proposal_is_unreliable():
    """Proposal N(0, s^2), s = 0.2, for target N(0, 1).

    Under q, z = s u with u ~ N(0, 1), so w = p(z) / q(z) = s exp(u^2 (1 - s^2) / 2) and
    P(w > t) = P(chi2_1 > 2 log(t / s) / (1 - s^2)) ~ t^(-1 / (1 - s^2)) up to a log factor:
    a Pareto tail with k = 1 - s^2 = 0.96 (infinite variance since k > 1/2). The log factor
    biases finite-sample k-hat down: in 400 simulated rows of 4000 draws, about 14% fell
    below 0.7 (median 0.84), so the test asks the median of 16 rows to exceed 0.7 (fails
    with probability ~5e-4 for a random seed) and every row to exceed 0.5.
    """
    rng = np.random.default_rng(2)
    lw = _log_weights(rng, stats.norm(0.0, 0.2), (16, 4000))
    khat = azcompat.pareto_khat(lw)
    assert np.median(khat) > 0.7
    assert np.all(khat > 0.5)
    # the sign convention: 1 / w = q / p is bounded by 1 / s, so the negated log-weights
    # are well behaved; a sign slip (ArviZ 1.x's psislw takes -log w) would swap the two
    assert np.all(azcompat.pareto_khat(-lw) < 0.5)


def test_khat_shapes_and_degenerate_rows():
    rng = np.random.default_rng(3)
    lw = _log_weights(rng, stats.t(df=5), (2, 3, 1000))
    assert azcompat.pareto_khat(lw).shape == (2, 3)
    single = azcompat.pareto_khat(lw[0, 0])
    assert single.shape == () and single == azcompat.pareto_khat(lw[:1, :1])[0, 0]
    few = np.stack([rng.normal(size=24), np.zeros(24)])
    assert azcompat.pareto_khat(few).tolist() == [
        np.inf,
        np.inf,
    ]  # too few draws to fit, even if constant
    assert azcompat.pareto_khat(np.zeros((2, 0))).tolist() == [np.inf, np.inf]
    bad = np.stack([np.full(100, np.nan), np.full(100, -np.inf), np.r_[np.inf, np.zeros(99)]])
    assert np.isnan(azcompat.pareto_khat(bad)).all()
    with pytest.raises(ValueError):
        azcompat.pareto_khat(1.0)


# --------------------------------------------------------------------------- ESS, R-hat, MCSE


def test_iid_chains_converge():
    """Independent N(0, 1) draws: 4 chains x 1000 draws x 8 elements.

    Tolerances from 300 simulated elements: bulk ESS / 4000 had mean 0.99 and sd 0.05
    (min 0.77), R-hat - 1 had sd 5.5e-4, MCSE(mean) * sqrt(4000) had sd 0.03. Bounds:
    each bulk ESS within 30% of 4000 and their mean within 10% (both about 6 sd);
    |R-hat - 1| < 0.01 (the usual convergence threshold, about 18 sd); MCSE(mean)
    within 20% of 1 / sqrt(4000).
    """
    chains, draws = 4, 1000
    x = np.random.default_rng(4).normal(size=(chains, draws, 8))
    bulk, tail, r, se = azcompat.ess(x), azcompat.ess(x, "tail"), azcompat.rhat(x), azcompat.mcse(x)
    assert bulk.shape == tail.shape == r.shape == se.shape == (8,)
    n = chains * draws
    assert np.all(np.abs(bulk / n - 1) < 0.3) and abs(bulk.mean() / n - 1) < 0.1
    assert np.all(np.abs(tail / n - 1) < 0.3)
    assert np.all(np.abs(r - 1) < 0.01)
    assert np.all(np.abs(se * np.sqrt(n) - 1) < 0.2)
    assert np.all(np.isfinite(azcompat.mcse(x, "sd")))


def test_chains_with_different_means_have_large_rhat():
    rng = np.random.default_rng(5)
    x = (
        rng.normal(size=(4, 1000, 3)) + np.array([0.0, 0.0, 0.0, 3.0])[:, None, None]
    )  # one chain stuck elsewhere
    assert np.all(azcompat.rhat(x) > 1.1)
    assert np.all(azcompat.ess(x) < 0.25 * 4000)


def test_rhat_nan_for_one_chain_or_few_draws():
    rng = np.random.default_rng(6)
    assert np.isnan(azcompat.rhat(rng.normal(size=(1, 500, 2)))).all()
    assert np.all(azcompat.ess(rng.normal(size=(1, 500, 2))) > 0)  # ESS is defined for one chain
    for draws in (1, 2, 3):
        x = rng.normal(size=(4, draws, 2))
        for value in (
            azcompat.rhat(x),
            azcompat.ess(x),
            azcompat.ess(x, "tail"),
            azcompat.mcse(x),
            azcompat.mcse(x, "sd"),
        ):
            assert value.shape == (2,) and np.isnan(value).all()
    scalar = azcompat.rhat(rng.normal(size=(4, 2)))
    assert scalar.shape == () and np.isnan(scalar)


def test_non_finite_elements_are_nan_and_leave_others_alone():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 200, 3))
    y = x.copy()
    y[1, 5, 0], y[2, 7, 1] = np.nan, np.inf
    for fn in (azcompat.rhat, azcompat.ess, azcompat.mcse):
        out = fn(y)
        assert np.isnan(out[:2]).all()
        assert out[2] == fn(x[..., 2:])[0]


def test_bad_arguments():
    x = np.zeros((4, 10))
    with pytest.raises(ValueError):
        azcompat.ess(x, "mean")
    with pytest.raises(ValueError):
        azcompat.mcse(x, "median")
    with pytest.raises(ValueError):
        azcompat.rhat(np.zeros(10))


# --------------------------------------------------------------------------- containers


def _draws(seed: int = 8) -> tuple[dict, dict, dict, dict]:
    rng = np.random.default_rng(seed)
    posterior = {"z": rng.normal(size=(2, 50, 3, 2)), "sigma": rng.gamma(2.0, size=(2, 50))}
    sample_stats = {"diverging": rng.random((2, 50)) < 0.05, "energy": rng.normal(size=(2, 50))}
    dims = {"z": ["point", "latent"]}
    coords = {"point": ["a", "b", "c"]}
    return posterior, sample_stats, dims, coords


def test_to_inference_data_round_trip(tmp_path):
    posterior, sample_stats, dims, coords = _draws()
    attrs = {
        "method": "nuts",
        "wall_time_s": float("nan"),
        "warm": True,
        "n": np.int64(3),
        "none": None,
        "opts": {"a": 1},
    }
    data = azcompat.to_inference_data(
        posterior, sample_stats=sample_stats, dims=dims, coords=coords, attrs=attrs
    )
    assert isinstance(data, xr.DataTree) == (
        major() >= 1
    )  # the installed version's native container

    ds = azcompat.posterior_dataset(data)
    assert isinstance(ds, xr.Dataset) and set(ds.data_vars) == {"z", "sigma"}
    assert ds["z"].dims == ("chain", "draw", "point", "latent")
    assert ds["sigma"].dims == ("chain", "draw")
    assert ds["point"].values.tolist() == coords["point"]
    assert ds["latent"].values.tolist() == [0, 1]
    for name, values in posterior.items():
        np.testing.assert_array_equal(ds[name].values, values)
    np.testing.assert_array_equal(ds["z"].sel(point="b").values, posterior["z"][:, :, 1])

    ss = azcompat.posterior_dataset(data, "sample_stats")
    np.testing.assert_array_equal(ss["diverging"].values, sample_stats["diverging"])
    np.testing.assert_array_equal(ss["energy"].values, sample_stats["energy"])

    expected = {"method": "nuts", "warm": 1, "n": 3, "opts": "{'a': 1}"}
    for group in (ds, ss):
        assert {k: group.attrs[k] for k in expected} == expected
        assert np.isnan(group.attrs["wall_time_s"]) and "none" not in group.attrs

    path = tmp_path / "draws.nc"  # the attributes are netCDF-safe
    data.to_netcdf(path)
    with xr.open_datatree(path) as back:
        np.testing.assert_array_equal(back["posterior"]["z"].values, posterior["z"])
        assert back["posterior"].attrs["method"] == "nuts"


def test_to_inference_data_without_sample_stats():
    posterior, _, dims, coords = _draws()
    data = azcompat.to_inference_data(posterior, sample_stats={}, dims=dims, coords=coords)
    np.testing.assert_array_equal(
        azcompat.posterior_dataset(data)["sigma"].values, posterior["sigma"]
    )
    groups = data.children if major() >= 1 else data.groups()
    assert "sample_stats" not in groups


# --------------------------------------------------------------------------- diagnostics table


def test_diagnostics_labels_and_columns():
    posterior, _, dims, coords = _draws()
    table = azcompat.diagnostics(posterior, dims, coords)
    assert list(table.columns) == ["mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"]
    assert list(table.index) == [
        "z[a, 0]",
        "z[a, 1]",
        "z[b, 0]",
        "z[b, 1]",
        "z[c, 0]",
        "z[c, 1]",
        "sigma",
    ]
    assert list(azcompat.diagnostics({"w": posterior["z"]}).index)[:3] == [
        "w[0, 0]",
        "w[0, 1]",
        "w[1, 0]",
    ]
    z = posterior["z"]
    np.testing.assert_array_equal(table["r_hat"].to_numpy()[:6], azcompat.rhat(z).ravel())
    np.testing.assert_array_equal(table["ess_bulk"].to_numpy()[:6], azcompat.ess(z).ravel())
    np.testing.assert_array_equal(table["ess_tail"].to_numpy()[:6], azcompat.ess(z, "tail").ravel())
    np.testing.assert_array_equal(table["mcse_mean"].to_numpy()[:6], azcompat.mcse(z).ravel())
    np.testing.assert_array_equal(table["mcse_sd"].to_numpy()[:6], azcompat.mcse(z, "sd").ravel())
    assert table.loc["sigma", "ess_bulk"] == azcompat.ess(posterior["sigma"])


def test_diagnostics_match_native_summary():
    """Same labels and numbers as the installed ArviZ's ``summary(kind="diagnostics")``.

    Except ESS-tail under 1.x: its summary takes the tail quantiles from
    ``rcParams["stats.ci_prob"]`` (0.11 and 0.89), whereas ours keep 0.x's 0.05 and 0.95.
    """
    posterior, _, dims, coords = _draws()
    ours = azcompat.diagnostics(posterior, dims, coords)
    az = azcompat._arviz()
    native = az.summary(
        azcompat.to_inference_data(posterior, dims=dims, coords=coords),
        kind="diagnostics",
        round_to="none",
    )
    assert list(native.index) == list(ours.index)
    same = [c for c in ours.columns if major() == 0 or c != "ess_tail"]
    np.testing.assert_allclose(
        ours[same].to_numpy(), native[same].to_numpy(dtype=float), rtol=1e-12
    )
    if major() >= 1:
        from arviz_stats.base import array_stats

        tail = array_stats.ess(posterior["z"], chain_axis=0, draw_axis=1, method="tail", prob=0.05)
        np.testing.assert_allclose(ours["ess_tail"].to_numpy()[:6], tail.ravel(), rtol=1e-12)
