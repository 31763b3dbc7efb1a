"""Geometric length buckets (``--buckets=geometric``): a bounded number of compiled shapes for any length
distribution, padding bounded by the ratio, every row once per epoch in full batches, a deterministic and
resumable order, and evaluation that padding cannot change."""

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest

from experiments import music, pipeline

ADVERSARIAL = {
    "uniform 1..5000": np.arange(1, 5001),
    "one huge outlier": np.concatenate([np.random.default_rng(0).integers(100, 300, 300), [100_000]]),
    "log-normal": np.maximum(2, np.random.default_rng(1).lognormal(6, 1.2, 2000).astype(int)),
    "two clusters far apart": np.concatenate([np.full(50, 7), np.full(50, 20_000)]),
    "all equal": np.full(40, 333),
    "one sequence": np.array([1]),
}


def padded(lengths, pad_multiple, buckets):
    return np.array([pipeline.padded_length(int(n), pad_multiple, buckets) for n in lengths])


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_any_length_distribution_compiles_at_most_max_buckets_shapes(name):
    lengths = ADVERSARIAL[name]
    for pad_multiple, ratio, max_buckets in itertools.product((1, 16, 128), (1.1, 1.25, 2.0), (1, 3, 8)):
        buckets = pipeline.geometric_buckets(lengths, pad_multiple, ratio, max_buckets)
        assert 1 <= len(buckets) <= max_buckets and (np.diff(buckets) > 0).all()
        assert (buckets % pad_multiple == 0).all() and buckets[-1] == math.ceil(lengths.max() / pad_multiple) * (
            pad_multiple
        )
        # every bucket is used, and the batches of an epoch use no other lengths
        assert set(padded(lengths, pad_multiple, buckets)) == set(buckets.tolist())
        for batch_size in (1, 7):
            batches = pipeline.epoch_batches(lengths, batch_size, 0, 0, bucket=8, buckets=buckets)
            shapes = {pipeline.padded_length(int(lengths[b[b >= 0]].max()), pad_multiple, buckets) for b in batches}
            assert shapes <= set(buckets.tolist())
    # the scheme it replaces: one shape per multiple
    assert len(set(padded(ADVERSARIAL["uniform 1..5000"], 16, None))) == 313


@pytest.mark.parametrize("ratio", [1.1, 1.25, 2.0])
@pytest.mark.parametrize("pad_multiple", [1, 8, 64])
def test_padding_is_bounded_by_the_ratio_when_no_rungs_merge(ratio, pad_multiple):
    lengths = np.maximum(1, np.random.default_rng(2).lognormal(5, 1, 500).astype(int))
    buckets = pipeline.geometric_buckets(lengths, pad_multiple, ratio, max_buckets=1000)
    T = padded(lengths, pad_multiple, buckets)
    assert (T >= lengths).all() and (T < ratio * lengths + pad_multiple).all()
    # the old scheme's bound, for comparison: less than one pad_multiple per row
    assert (padded(lengths, pad_multiple, None) < lengths + pad_multiple).all()


def test_merged_rungs_pad_the_fewest_frames_of_any_choice():
    """The dynamic programme against every choice of ``max_buckets`` rungs that keeps the top one."""
    lengths = np.random.default_rng(3).integers(1, 400, 60)
    rungs = pipeline.geometric_buckets(lengths, 8, 1.25, max_buckets=1000)
    assert len(rungs) > 6
    for max_buckets in (1, 2, 3, 4):
        chosen = pipeline.geometric_buckets(lengths, 8, 1.25, max_buckets)
        assert set(chosen.tolist()) <= set(rungs.tolist()) and len(chosen) == max_buckets
        best = min(
            padded(lengths, 8, np.array([*sub, rungs[-1]])).sum()
            for sub in itertools.combinations(rungs[:-1], max_buckets - 1)
        )
        assert padded(lengths, 8, chosen).sum() == best
    # merged or not, the total stays within ratio ** (rungs per bucket) of the real frames on uniform lengths
    uniform = np.arange(1, 5001)
    n_rungs = len(pipeline.geometric_buckets(uniform, 16, 1.25, max_buckets=1000))
    total = padded(uniform, 16, pipeline.geometric_buckets(uniform, 16, 1.25, 8)).sum()
    assert total < 1.25 ** math.ceil(n_rungs / 8) * uniform.sum() + 16 * 2.25 * len(uniform)


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_every_row_once_per_epoch_in_full_batches_grouped_by_bucket(batch_size):
    lengths = ADVERSARIAL["log-normal"][:101]
    buckets = pipeline.geometric_buckets(lengths, 16, 1.25, 5)
    epochs = [pipeline.epoch_batches(lengths, batch_size, 11, e, bucket=8, buckets=buckets) for e in range(3)]
    for batches in epochs:
        assert len(batches) == math.ceil(len(lengths) / batch_size)
        flat = np.concatenate(batches)
        assert sorted(flat[flat >= 0].tolist()) == list(range(len(lengths)))
        assert sum((b < 0).any() for b in batches) <= 1  # one batch holds the fillers, the others are full
        # a batch holds one bucket, but for at most one batch at each boundary between buckets
        rung = np.searchsorted(buckets, lengths)
        straddling = sum(len(set(rung[b[b >= 0]])) > 1 for b in batches)
        assert straddling <= len(buckets) - 1
    again = pipeline.epoch_batches(lengths, batch_size, 11, 0, bucket=8, buckets=buckets)
    assert all((a == b).all() for a, b in zip(epochs[0], again))  # a pure function of (seed, epoch)
    if batch_size > 1:  # rows are reshuffled within their bucket each epoch
        assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}
    other_seed = pipeline.epoch_batches(lengths, batch_size, 12, 0, bucket=8, buckets=buckets)
    assert not all((a == b).all() for a, b in zip(epochs[0], other_seed))


def test_bad_bucket_settings_are_clear_errors():
    with pytest.raises(pipeline.ConfigError, match="one of multiple, geometric"):
        pipeline.override(music.get_config(), buckets="log")
    with pytest.raises(
        pipeline.ConfigError, match=r"(?s)'bucket_ratio' must be > 1.*fix:      e.g. --bucket_ratio=1.1"
    ):
        pipeline.override(music.get_config(), bucket_ratio="1.0")
    with pytest.raises(pipeline.ConfigError, match="'max_buckets' must be >= 1"):
        pipeline.override(music.get_config(), max_buckets="0")
    with pytest.raises(pipeline.DataError, match=r"(?s)expected: at most 32 steps.*fix:"):
        pipeline.padded_length(33, 16, np.array([16, 32]))


# --------------------------------------------------------------------------------------
# Runs of the music experiment on a small long-tailed data set.


def long_tailed_data(seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        lengths = np.minimum(24, 2 + rng.geometric(0.12, n))
        return [(rng.random((int(t), music.KEYS)) < 0.05).astype(np.float32) for t in lengths]

    return pipeline.Data(split(14), split(6), split(6))


def small_config(workdir, **extra):
    values = dict(
        workdir=str(workdir), steps=4, batch_size=3, hidden=4, pad_multiple=2, buckets="geometric", max_buckets=2,
        checkpoint_every=2, eval_every=2, log_every=2, dropout=0.0, recurrent_dropout=0.0, progress=False,
    )  # fmt: skip
    return pipeline.override(music.get_config(), **{**values, **extra})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted geometric run: ``(data, config, result)``."""
    data = long_tailed_data()
    config = small_config(tmp_path_factory.mktemp("runs") / "straight")
    return data, config, music.make_train(config, data)(jax.random.key(0))


def test_a_resumed_geometric_run_is_bit_identical_and_compiles_few_shapes(straight, tmp_path):
    data, config, result = straight
    assert len(pipeline.padding_buckets(config, data)) == 2 and result["compiled_shapes"] <= 2
    assert result["padded_per_frame"] >= 1.0
    half = dataclasses.replace(config, workdir=str(tmp_path / "resumed"), steps=2)
    music.make_train(half, data)(jax.random.key(0))
    resumed = music.make_train(dataclasses.replace(half, steps=4), data)(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], result["params"])
    for key in ("valid", "test", "padded_per_frame"):
        assert resumed[key] == result[key], key


def test_evaluation_does_not_depend_on_the_padding_scheme(straight):
    """A geometric run's reported NLL equals the NLL of its parameters on the old padded batches and on one
    batch of every sequence with no padding beyond the longest: padded steps are inert."""
    data, config, result = straight
    _, eval_step = pipeline.make_steps(music.make_task(config), pipeline.make_optimizer(config))
    devices = pipeline.make_devices(config)
    buckets = pipeline.padding_buckets(config, data)
    for split in ("valid", "test"):
        sequences = getattr(data, split)
        geometric = pipeline.eval_batches(sequences, 3, 2, buckets)
        assert {b.xs.shape[1] for b in geometric} <= set(buckets.tolist())
        for batches in (geometric, pipeline.eval_batches(sequences, 3, 16), pipeline.eval_batches(sequences, 6, 1)):
            nll = pipeline.evaluate(eval_step, result["params"], batches, devices)
            np.testing.assert_allclose(nll, result[split], rtol=1e-5, err_msg=split)
