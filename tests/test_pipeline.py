"""The experiment pipeline: configs, batches, kill-and-resume, corrupt checkpoints, several devices,
and the polyphonic music experiment on a small generated ``.mat`` file."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from experiments import music, pipeline
from tests.subprocess_env import FAST_ENV, REPO, VIRTUAL_CPUS_ENV


def write_mat(path, seed=0, sizes=(12, 5, 5)):
    """A tiny random data set in the Boulanger-Lewandowski format."""
    import scipy.io

    rng = np.random.default_rng(seed)

    def split(n):
        out = np.empty((1, n), dtype=object)
        for i in range(n):
            out[0, i] = (rng.random((int(rng.integers(3, 14)), 88)) < 0.05).astype(np.uint8)
        return out

    scipy.io.savemat(path, {"traindata": split(sizes[0]), "validdata": split(sizes[1]), "testdata": split(sizes[2])})
    return str(path)


def small_args(mat, workdir, *extra):
    return [
        f"--data={mat}", f"--workdir={workdir}", "--steps=8", "--batch_size=4", "--hidden=4", "--pad_multiple=16",
        "--checkpoint_every=2", "--eval_every=4", "--log_every=2", "--progress=false", *extra,
    ]  # fmt: skip


def run_music(args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "experiments.music", *args], cwd=REPO, env=FAST_ENV, capture_output=True, text=True,
        **kwargs,
    )  # fmt: skip


def final_params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------------------
# Configs and bad input: clear errors before any compilation, nothing in the workdir lost.


def test_config_typo_lists_valid_fields_and_keeps_workdir(tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(SystemExit) as info:
        music.main(["--quick", f"--workdir={tmp_path}", "--hiden=8"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'hiden'" in err and "did you mean 'hidden'" in err
    for f in dataclasses.fields(music.Config):
        assert f.name in err
    assert os.listdir(tmp_path) == ["notes.txt"] and keep.read_text() == "mine"
    with pytest.raises(pipeline.ConfigError, match="one of adam, sgd, rmsprop"):
        pipeline.override(music.get_config(), optimizer="lamb")
    with pytest.raises(pipeline.ConfigError, match="unknown cell"):
        music.check_config(pipeline.override(music.get_config(), cell="transformer"))


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        music.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(music.Config):
        assert f"--{f.name}=" in out


def test_missing_and_malformed_data_files_are_clear_errors(tmp_path, capsys):
    import scipy.io

    with pytest.raises(pipeline.DataError, match="not found"):
        music.load_mat(str(tmp_path / "nope.mat"))
    (tmp_path / "garbage.mat").write_bytes(b"this is not matlab")
    with pytest.raises(pipeline.DataError, match="not a readable MATLAB"):
        music.load_mat(str(tmp_path / "garbage.mat"))
    scipy.io.savemat(tmp_path / "nokeys.mat", {"x": np.zeros(3)})
    with pytest.raises(pipeline.DataError, match="has no 'traindata'"):
        music.load_mat(str(tmp_path / "nokeys.mat"))
    bad = np.empty((1, 1), dtype=object)
    bad[0, 0] = np.zeros((5, 12), np.uint8)
    scipy.io.savemat(tmp_path / "shape.mat", {"traindata": bad, "validdata": bad, "testdata": bad})
    with pytest.raises(pipeline.DataError, match=r"expected: a \(T >= 2, 88\)"):
        music.load_mat(str(tmp_path / "shape.mat"))

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as info:
        music.main(["--quick", f"--workdir={workdir}", f"--data={tmp_path / 'garbage.mat'}"])
    assert info.value.code == 2
    assert "not a readable MATLAB" in capsys.readouterr().err
    assert os.listdir(workdir) == ["metrics.jsonl"] and (workdir / "metrics.jsonl").read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------------------------
# Batches and optimisers.


def test_epoch_batches_cover_the_data_deterministically_and_bucket():
    lengths = np.random.default_rng(0).integers(1, 100, size=37)
    for bucket in (1, 4):
        batches = pipeline.epoch_batches(lengths, 8, data_seed=3, epoch=2, bucket=bucket)
        again = pipeline.epoch_batches(lengths, 8, data_seed=3, epoch=2, bucket=bucket)
        assert all((a == b).all() for a, b in zip(batches, again))
        flat = np.concatenate(batches)
        assert sorted(flat[flat >= 0].tolist()) == list(range(37)) and (flat < 0).sum() == 3
        other = pipeline.epoch_batches(lengths, 8, data_seed=3, epoch=3, bucket=bucket)
        assert not all((a == b).all() for a, b in zip(batches, other))
    # Bucketing: batches of one window hold similar lengths (less padding than random batches).
    spread = lambda bs: np.mean([np.ptp(lengths[b[b >= 0]]) for b in bs])  # noqa: E731
    assert spread(pipeline.epoch_batches(lengths, 8, 3, 0, bucket=5)) < spread(
        pipeline.epoch_batches(lengths, 8, 3, 0, 1)
    )

    seqs = [np.ones((n, 2), np.float32) for n in (3, 17)]
    batch = pipeline.pad_batch(seqs, np.array([1, -1, 0]), pad_multiple=16)
    assert batch.xs.shape == (3, 32, 2) and batch.lengths.tolist() == [17, 0, 3]
    assert batch.xs[0, :17].all() and not batch.xs[0, 17:].any() and not batch.xs[1].any()


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine"])
def test_optimizers_reduce_a_quadratic(name, schedule):
    config = pipeline.override(
        pipeline.TrainConfig(), optimizer=name, schedule=schedule, learning_rate=0.05, steps=100, warmup_steps=5,
        weight_decay=1e-4,
    )  # fmt: skip
    opt = pipeline.make_optimizer(config)
    params = {"w": np.full(3, 2.0, np.float32)}
    state = opt.init(params)
    grad = jax.grad(lambda p: (p["w"] ** 2).sum())
    for _ in range(100):
        updates, state = opt.update(grad(params), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert float((params["w"] ** 2).sum()) < 0.5


# --------------------------------------------------------------------------------------
# Runs: smoke, SIGKILL and resume, a corrupt checkpoint, several devices.


def test_music_smoke_in_process_writes_everything(tmp_path):
    mat = write_mat(tmp_path / "tiny.mat")
    config = pipeline.parse_args(
        small_args(mat, tmp_path / "run", "--cell=gru", "--ema_decay=0.9", "--optimizer=rmsprop"), music.get_config()
    )
    result = music.make_train(config)(jax.random.key(0))
    assert np.isfinite(result["test"]) and np.isfinite(result["valid"]) and result["best_step"] in (4, 8)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == dataclasses.asdict(config)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8]
    assert (run / "metrics.csv").read_text().startswith("step,split,name,value")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tb"))
    assert sorted(os.listdir(run / "checkpoints")) == ["4", "6", "8"]  # keep_checkpoints=3
    assert len(os.listdir(run / "best")) == 1


@pytest.mark.parametrize("cell", sorted(music.CELLS))
def test_music_builds_every_cell(cell):
    """Each ``--cell`` gives a task whose training loss traces, with dropout and two layers."""
    config = pipeline.override(music.get_config(), cell=cell, hidden=4, heads=2, layers=2, dropout=0.1)
    if music.CELLS[cell](config).spec.recurrent_input is None:  # no hidden-to-hidden weights
        with pytest.raises(ValueError, match="pass recurrent_dropout=0"):
            music.make_task(config)
        config = pipeline.override(config, recurrent_dropout=0.0)
    task = music.make_task(config)
    params = jax.eval_shape(task.init, jax.random.key(0))
    batch = (jax.ShapeDtypeStruct((2, 6, music.KEYS), np.float32), jax.ShapeDtypeStruct((2,), np.int32))
    nll, count = jax.eval_shape(task.loss, params, batch, jax.random.key(1))
    assert nll.shape == count.shape == ()


def test_sigkill_then_rerun_gives_bit_identical_params(tmp_path):
    mat = write_mat(tmp_path / "tiny.mat")
    straight = run_music(small_args(mat, tmp_path / "straight"), timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    args = small_args(mat, tmp_path / "killed", "--sleep_per_step=0.25")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.music", *args], cwd=REPO, env=FAST_ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts.exists() and "4" in os.listdir(ckpts)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "8" not in os.listdir(ckpts) and not (tmp_path / "killed" / "final_params.npz").exists()
    resumed = run_music(args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8]  # no duplicates after resume


def test_truncated_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    mat = write_mat(tmp_path / "tiny.mat")
    data = music.load_mat(mat)
    config = pipeline.parse_args(small_args(mat, tmp_path / "run", "--steps=4", "--eval_every=0"), music.get_config())
    music.make_train(config, data)(jax.random.key(0))
    step_dir = tmp_path / "run" / "checkpoints" / "4"
    for root, _, files in os.walk(step_dir):  # truncate every data file of the latest checkpoint
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
    longer = dataclasses.replace(config, steps=6)
    with pytest.warns(UserWarning, match="could not be restored"):
        result = music.make_train(longer, data)(jax.random.key(0))
    assert np.isfinite(result["test"])
    assert "corrupt-4" in os.listdir(tmp_path / "run" / "checkpoints")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]


MULTI_DEVICE = textwrap.dedent(
    """
    import jax, numpy as np
    from experiments import music, pipeline
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    seqs = [(rng.random((int(n), 88)) < 0.1).astype(np.float32) for n in rng.integers(3, 20, 8)]
    config = pipeline.override(music.quick_config(), batch_size=8, hidden=6, dropout=0.0)
    task = music.make_task(config)
    batch = pipeline.pad_batch(seqs, np.arange(8), 16)
    losses = []
    for n in (1, 4):
        config_n = pipeline.override(config, num_devices=n)
        devices = pipeline.make_devices(config_n)
        opt = pipeline.make_optimizer(config_n)
        train_step, eval_step = pipeline.make_steps(task, opt)
        params = task.init(jax.random.key(0))
        state = {"step": jax.numpy.zeros((), "int32"), "params": params, "opt_state": opt.init(params),
                 "key": jax.random.key_data(jax.random.key(1))}
        state = jax.device_put(state, devices.replicated)
        sharded = pipeline.shard_batch(batch, devices)
        assert len(sharded.xs.sharding.device_set) == n
        state, metrics = train_step(state, sharded)
        state, metrics = train_step(state, sharded)
        losses.append((float(metrics["loss"]), pipeline.evaluate(eval_step, state["params"], [batch], devices),
                       jax.device_get(state["params"])))
    (l1, e1, p1), (l4, e4, p4) = losses
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    np.testing.assert_allclose(e1, e4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p4)
    print("OK", l1, l4)
    """
)


def test_data_parallel_on_four_virtual_cpu_devices_matches_one_device(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE],
        cwd=REPO,
        env=VIRTUAL_CPUS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


def test_music21_chorales_are_built_to_the_jsb_recipe_and_cached(tmp_path):
    pytest.importorskip("music21")
    data = music.build_music21_chorales(str(tmp_path), limit=6)
    rolls = [r for split in data for r in split]
    assert sum(map(len, data)) >= 4 and all(len(split) for split in data)
    for roll in rolls:
        assert roll.ndim == 2 and roll.shape[1] == 88 and set(np.unique(roll)) <= {0.0, 1.0}
        assert 2 <= roll.sum(1).max() <= 4  # four voices on a quarter-note grid
    cached = music.build_music21_chorales(str(tmp_path), limit=6)  # from the cache: same split
    for a, b in zip(data, cached):
        assert all((x == y).all() for x, y in zip(a, b))
    assert os.listdir(tmp_path) == ["music21_chorales_6.npz"]
