"""Sequence classification: MNIST-1D from the package's own generator (deterministic, offline),
sequential MNIST rows, clear errors, a shrunken run."""

import os
import random
import statistics

import numpy as np
import pytest

from experiments import classify


def test_mnist1d_is_generated_deterministically_and_restores_global_seeds():
    np.random.seed(123)
    random.seed(7)
    a = classify.mnist1d_arrays(200, seed=42)
    after_np, after_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(7)
    assert (np.random.rand(), random.random()) == (after_np, after_py)
    b = classify.mnist1d_arrays(200, seed=42)
    c = classify.mnist1d_arrays(200, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (160, 40) and a[2].shape == (40, 40) and set(a[1]) <= set(range(10))


def test_labels_ride_along_as_a_feature_column():
    config = classify.quick_config()
    data = classify.make_data(config)
    again = classify.make_data(config)
    np.testing.assert_array_equal(np.stack(data.train), np.stack(again.train))
    x = data.train[0]
    assert x.shape == (40, 2) and (x[:, 1] == x[0, 1]).all()
    assert len(data.train) + len(data.valid) == 80 and len(data.test) == 20


def test_mnist_rows():
    x, y, x_test, y_test = classify.mnist_rows_arrays()
    assert x.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert np.bincount(y_test).tolist() == [100] * 10


def test_bad_options_fail_before_anything_runs(tmp_path, capsys):
    for args, message in [
        (["--data=cifar"], "unknown data"),
        (["--models=transformer"], "unknown model"),
        (["--valid_fraction=0.7"], "valid_fraction"),
        (["--hiden=3"], "did you mean 'hidden'"),
        (["--seeds=0,x"], "not an integer >= 0: 'x'"),
        (["--seeds=-1"], "not an integer >= 0"),
        (["--seeds=1,2,1"], "a seed given twice"),
        (["--seeds=,"], "no seed given"),
    ]:
        with pytest.raises(SystemExit) as info:
            classify.main(["--quick", f"--workdir={tmp_path}", *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_quick_run(tmp_path):
    results = classify.main(["--quick", f"--workdir={tmp_path}"])
    assert set(results) == {"gru", "bilstm"}
    for row in results.values():
        assert 0 <= row["test_accuracy"] <= 100 and np.isfinite(row["test_nll"])
        # Validated only at the last step: the best checkpoint is the final one.
        assert row["best_step"] == 3 and row["best_test_accuracy"] == row["test_accuracy"]
    # bilstm reads both directions: twice the LSTM's recurrent parameters plus a wider readout.
    assert results["bilstm"]["params"] > results["gru"]["params"]


def test_seeds_repeat_each_model_and_aggregate(tmp_path, capsys):
    results = classify.main(["--quick", f"--workdir={tmp_path}", "--models=gru", "--seeds=0,3"])
    row = results["gru"]
    assert set(row["seeds"]) == {0, 3} and sorted(os.listdir(tmp_path)) == ["seed0", "seed3"]
    nll = [row["seeds"][s]["test_nll"] for s in (0, 3)]
    assert nll[0] != nll[1]  # another seed, another init
    assert row["test_nll"] == pytest.approx(np.mean(nll))
    assert row["test_nll_sd"] == pytest.approx(statistics.stdev(nll))
    accuracies = [row["seeds"][s]["test_accuracy"] for s in (0, 3)]
    assert row["test_accuracy"] == pytest.approx(np.mean(accuracies))
    assert "mean ± sample sd over 2 seeds" in capsys.readouterr().out
