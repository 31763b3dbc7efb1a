"""Smoke and data tests of experiments.state_tracking (parity and modular addition)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from experiments import state_tracking as st
from experiments.pipeline import ConfigError


@pytest.mark.parametrize("task", list(st.TASKS))
def test_targets_are_the_running_sum(task):
    k = st.TASKS[task]
    x = st.sequence(k, 50, np.random.default_rng(0))
    digits = np.argmax(x[:, :k], -1)
    assert x[:, :k].sum(-1).tolist() == [1.0] * 50  # one-hot
    assert x[:, k].tolist() == [float(sum(digits[: t + 1]) % k) for t in range(50)]
    assert len(set(digits.tolist())) == k  # every digit occurs


def test_training_lengths_and_determinism():
    config = dataclasses.replace(st.quick_config(), train_min_length=3, train_max_length=9, train_sequences=200)
    data = st.make_data(config, "mod3")
    lengths = [len(x) for x in data.train]
    assert min(lengths) == 3 and max(lengths) == 9
    assert all(np.asarray(data.train[i]).shape == (lengths[i], 4) for i in range(20))
    again = st.make_data(config, "mod3")
    np.testing.assert_array_equal(np.asarray(data.train[7]), np.asarray(again.train[7]))
    assert {len(x) for x in data.test} == {9}
    a, b = st.eval_set(config, "parity", 16), st.eval_set(config, "parity", 16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (config.test_sequences, 16, 3)


def test_bad_config_is_refused():
    for bad in (
        dict(tasks="parity,mod7"),
        dict(cells="lstm,transformer"),
        dict(test_lengths="40,x"),
        dict(train_min_length=10, train_max_length=5),
        dict(seeds=""),
    ):
        with pytest.raises(ConfigError):
            st.check_config(dataclasses.replace(st.quick_config(), **bad))


def test_summarize_reports_mean_and_range():
    runs = {"parity": {"lstm": {0: {40: 1.0, 256: 0.5}, 1: {40: 0.5, 256: 0.25}}}}
    table = st.summarize(runs, [40, 256])
    assert "| parity | lstm | 2 | 0.750 (0.50-1.00) | 0.375 (0.25-0.50) |" in table


def test_quick_run_writes_table_and_plot(tmp_path, capsys):
    workdir = str(tmp_path / "st")
    argv = ["--quick", f"--workdir={workdir}"]
    out = st.main(argv)
    acc = out["accuracy"]["parity"]["lstm"][0]
    assert set(acc) == {8, 16} and all(0.0 <= a <= 1.0 for a in acc.values())
    summary = json.loads((tmp_path / "st" / "summary.json").read_text())
    assert summary["accuracy"]["parity"]["lstm"]["0"] == {str(k): v for k, v in acc.items()}
    assert (tmp_path / "st" / "state_tracking.png").stat().st_size > 1000
    assert "| parity | lstm | 1 |" in capsys.readouterr().out
