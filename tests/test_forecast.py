"""Forecasting: the shipped series, deterministic windows, baselines, clear errors, a shrunken run."""

import os

import jax
import numpy as np
import pytest

from experiments import forecast, pipeline
from experiments.results import best_params


def test_series_ship_inside_statsmodels():
    sun, co2 = forecast.load_series("sunspots"), forecast.load_series("co2")
    assert len(sun) == 309 and sun[0] == 5.0
    assert len(co2) == 526 and np.isfinite(co2).all() and 310 < co2[0] < 320 < co2[-1]


def test_windows_are_deterministic_and_never_see_the_test_tail():
    config = forecast.quick_config()
    p = forecast.prepare("sunspots", config)
    a, b = forecast.make_data(p, config), forecast.make_data(p, config)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        np.testing.assert_array_equal(np.stack(x), np.stack(y))
    need = config.window + config.horizon
    assert all(w.shape == (need, 1) for w in a.train)
    # The last training/validation window ends before the held-out tail; test windows end inside it.
    s = p.scaled()
    np.testing.assert_array_equal(a.valid[-1][:, 0], s[p.split - need : p.split])
    origins = forecast.held_out_origins(p, config)
    assert origins[0] == p.split and origins[-1] + config.horizon == len(p.values)
    np.testing.assert_array_equal(a.test[0][config.window :, 0], s[p.split : p.split + config.horizon])


def test_seasonal_naive_uses_only_the_past():
    config = pipeline.override(forecast.quick_config(), horizon=6)
    p = forecast.prepare("co2", config)
    naive = forecast.seasonal_naive(p, config)
    o = forecast.held_out_origins(p, config)[3]
    np.testing.assert_array_equal(naive[3], p.values[o - 12 : o - 6])
    assert naive.shape == forecast.truth(p, config).shape


def test_bad_options_fail_before_anything_runs(tmp_path, capsys):
    for args, message in [
        (["--series=airline"], "unknown value"),
        (["--cells=rnn"], "unknown value"),
        (["--window=500", "--pad_multiple=512"], "too short"),
        (["--horizon=6"], "--pad_multiple=42"),
    ]:
        with pytest.raises(SystemExit) as info:
            forecast.main(["--quick", f"--workdir={tmp_path}", *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_quick_run_scores_every_method_and_plots(tmp_path):
    table = forecast.main(["--quick", f"--workdir={tmp_path}"])
    co2 = table["co2"]
    assert set(co2) == {"seasonal_naive", "sarimax", "holt_winters", "gru"}
    assert all(np.isfinite(v["mae"]) and v["rmse"] >= v["mae"] for v in co2.values())
    # On CO2 the classical models (fitted on the past, applied at each origin) beat the seasonal naive forecast.
    assert max(co2["sarimax"]["mae"], co2["holt_winters"]["mae"]) < co2["seasonal_naive"]["mae"]
    assert os.path.getsize(tmp_path / "co2.png") > 1000
    # The best-validation checkpoint restores into the parameters' structure (validated once: the final step).
    config = pipeline.override(forecast.quick_config(), workdir=str(tmp_path / "co2_gru"))
    params = forecast.make_model(config, "gru")[0](jax.random.key(0))
    restored, step = best_params(config, params)
    assert step == config.steps and jax.tree.structure(restored) == jax.tree.structure(params)
    with np.load(tmp_path / "co2_gru" / "final_params.npz") as f:
        np.testing.assert_allclose(
            sorted(float(np.sum(f[k])) for k in f.files),
            sorted(float(np.sum(np.asarray(x))) for x in jax.tree.leaves(restored)),  # both summed by NumPy
            rtol=0,
        )
