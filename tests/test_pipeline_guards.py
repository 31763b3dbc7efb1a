"""Bad input and bad luck in the training pipeline: a changed config in a used work directory, impossible
values, a diverging loss, a read-only or full disk. Each is a clear error (one line on the command
line) or a correct result; nothing on disk is lost, and nothing is reported that was not computed."""

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import runpy
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import errors, music, pipeline, search, workdir
from tests.subprocess_env import FAST_ENV, REPO
from tests.test_pipeline import final_params, small_args, write_mat


def snapshot(path):
    """Every file under ``path`` with its size, modification time and content hash."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            with open(file, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(file, path)] = (os.path.getsize(file), os.stat(file).st_mtime_ns, digest)
    return out


def strict_json(text):
    """``json.loads`` that refuses NaN and Infinity, which are not JSON."""

    def refuse(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def main_exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        music.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def mat(tmp_path_factory):
    return write_mat(tmp_path_factory.mktemp("data") / "tiny.mat")


# --------------------------------------------------------------------------------------
# A changed config in a used work directory.


def test_a_changed_config_is_refused_naming_the_fields_and_touching_nothing(mat, tmp_path, capsys):
    run = tmp_path / "run"
    first = music.main(small_args(mat, run, "--steps=4"))
    before = snapshot(run)
    for change, fields in (
        (["--learning_rate=0.5", "--dropout=0"], ["learning_rate", "dropout"]),
        (["--hidden=16"], ["hidden"]),
        (["--cell=gru"], ["cell"]),
        (["--steps=2"], ["steps"]),  # below the newest checkpoint
    ):
        code, err = main_exit(small_args(mat, run, "--steps=4", *change), capsys)
        assert code == 2
        assert err.startswith("error: the work directory") and "another config" in err
        for name in fields:
            assert f"--{name}:" in err
        assert "--workdir" in err and "--overwrite=true" in err
        assert snapshot(run) == before  # nothing renamed, deleted or rewritten
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith("corrupt")]
    # the same config, and the fields that cannot change the result, resume
    again = music.main(small_args(mat, run, "--steps=4", "--log_every=1", "--checkpoint_every=4"))
    assert again["test"] == first["test"]


def test_steps_may_grow_under_a_constant_rate_but_not_under_a_schedule_that_depends_on_them(mat, tmp_path, capsys):
    constant, cosine = tmp_path / "constant", tmp_path / "cosine"
    music.main(small_args(mat, constant, "--steps=4"))
    longer = music.main(small_args(mat, constant, "--steps=6"))
    assert longer["step"] == 6 and "resumed from" in capsys.readouterr().out
    straight = music.main(small_args(mat, tmp_path / "straight", "--steps=6"))
    for k, v in final_params(tmp_path / "straight").items():
        np.testing.assert_array_equal(final_params(constant)[k], v)
    assert straight["test"] == longer["test"]

    music.main(small_args(mat, cosine, "--steps=4", "--schedule=cosine"))
    code, err = main_exit(small_args(mat, cosine, "--steps=6", "--schedule=cosine"), capsys)
    assert code == 2 and "--steps: 4 in the run there, 6 now" in err and "constant learning rate" in err


def test_overwrite_starts_afresh_in_a_used_workdir(mat, tmp_path):
    run = tmp_path / "run"
    music.main(small_args(mat, run, "--steps=4"))
    (run / "notes.txt").write_text("mine")
    result = music.main(small_args(mat, run, "--steps=4", "--hidden=6", "--overwrite=true"))
    fresh = music.main(small_args(mat, tmp_path / "fresh", "--steps=4", "--hidden=6"))
    assert result["test"] == fresh["test"]
    assert json.loads((run / "config.json").read_text())["hidden"] == 6
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith("corrupt")]
    assert [json.loads(line)["split"] for line in (run / "metrics.jsonl").read_text().splitlines()].count("final") == 1


@pytest.mark.parametrize("name", ["music", "charlm", "classify", "forecast", "long_range", "moving_mnist", "search",
                                  "variants", "odyssey"])  # fmt: skip
def test_quick_writes_to_its_own_default_workdir(name):
    module = __import__(f"experiments.{name}", fromlist=["get_config"])
    config = pipeline.parse_args(["--quick"], module.get_config(), module.quick_config())
    assert config.workdir != module.get_config().workdir
    assert pipeline.parse_args(["--quick", "--workdir=mine"], module.get_config(), module.quick_config()).workdir == (
        "mine"
    )


@pytest.mark.parametrize("name", ["music", "charlm", "classify", "forecast", "long_range", "moving_mnist", "search",
                                  "variants", "state_tracking"])  # fmt: skip
@pytest.mark.filterwarnings("ignore:'experiments.*found in sys.modules:RuntimeWarning")  # imported already: fine
def test_a_script_run_by_a_profiler_has_the_same_config_fields(name, monkeypatch):
    """``python -m cProfile -m experiments.music`` runs the script with the profiler's own module as
    ``sys.modules["__main__"]``. The scripts' annotations are strings (``from __future__ import
    annotations``), which ``dataclasses`` resolves through the class's module there, so a
    ``ClassVar[...]`` written in a script became a field, and the run crashed writing config.json."""
    profiler_main = types.ModuleType("profiler_main")  # a __main__ that is not the script
    monkeypatch.setitem(sys.modules, "profiler_main", profiler_main)
    script = runpy.run_module(f"experiments.{name}", run_name="profiler_main", alter_sys=False)
    imported = __import__(f"experiments.{name}", fromlist=["Config"]).Config
    assert [f.name for f in dataclasses.fields(script["Config"])] == [f.name for f in dataclasses.fields(imported)]
    json.dumps(dataclasses.asdict(script["get_config"]()))


# --------------------------------------------------------------------------------------
# Impossible values and divergence.


@pytest.mark.parametrize(
    "arg, words",
    [
        ("--learning_rate=-1", "must be > 0"),
        ("--learning_rate=0", "must be > 0"),
        ("--learning_rate=nan", "finite"),
        ("--learning_rate=inf", "finite"),
        ("--eval_every=-1", "'eval_every' must be >= 0"),
        ("--clip_norm=-1", "'clip_norm' must be >= 0"),
        ("--momentum=1.5", "'momentum' must be in [0, 1)"),
        ("--ema_decay=nan", "finite"),
        ("--weight_decay=-0.1", "'weight_decay' must be >= 0"),
    ],
)
def test_impossible_values_are_refused_before_anything_runs(arg, words, tmp_path, capsys):
    code, err = main_exit(["--quick", f"--workdir={tmp_path / 'run'}", arg], capsys)
    assert code == 2 and err.startswith("error:") and words in err
    assert not (tmp_path / "run").exists()


def quadratic_task(scale):
    """A real divergence: SGD on ``scale * |w|^2`` with a step too large multiplies ``w`` by
    ``1 - 2 * lr * scale`` each step, until it overflows float32."""

    def init(key):
        return {"w": jax.random.normal(key, (3,))}

    def loss(params, batch, key):
        return scale * jnp.sum(params["w"] ** 2) * jnp.sum(batch.lengths > 0), jnp.sum(batch.lengths > 0) * 1.0

    return pipeline.Task(init, loss)


def test_a_diverging_loss_stops_the_run_naming_the_step_and_keeping_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.random((5, 2)).astype(np.float32) for _ in range(8)]
    data = pipeline.Data(seqs, seqs[:2], seqs[:2])
    config = pipeline.TrainConfig(
        steps=200, batch_size=4, optimizer="sgd", momentum=0.0, learning_rate=10.0, clip_norm=0.0,
        checkpoint_every=5, eval_every=10, log_every=5, progress=False, workdir=str(tmp_path / "run"),
    )  # fmt: skip
    train = pipeline.make_train(config, quadratic_task(1.0), data)
    with pytest.raises(pipeline.Diverged, match=r"training diverged at step (\d+)") as info:
        train(jax.random.key(0))
    step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    assert 10 < step < 200  # |w| grows 19x a step: its square overflows float32 after some 15 steps
    message = str(info.value)
    assert "--learning_rate" in message and "--overwrite=true" in message
    saved = workdir.saved_steps(str(tmp_path / "run" / "checkpoints"))
    assert saved and max(saved) < step and f"checkpoints/{max(saved)}" in message
    # the kept checkpoint is finite, and so is every metric row written (strict JSON)
    ckpt = workdir.Checkpoints(str(tmp_path / "run" / "checkpoints"), 3)
    state = ckpt.restore(max(saved), None)
    ckpt.close()
    assert np.isfinite(state["params"]["w"]).all()
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        row = strict_json(line)
        assert row["step"] < step and all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    assert not (tmp_path / "run" / "result.json").exists()


def test_the_command_line_reports_a_divergence_in_one_line_with_exit_code_1(capsys):
    with pytest.raises(SystemExit) as info, errors.report():
        raise pipeline.Diverged("training diverged at step 7: loss nan")
    assert info.value.code == 1 and capsys.readouterr().err == "error: training diverged at step 7: loss nan\n"


def test_result_files_are_strict_json_when_a_timing_is_undefined(mat, tmp_path):
    result = music.main(small_args(mat, tmp_path / "run", "--steps=1", "--eval_every=0"))
    assert math.isnan(result["ms_per_step"])  # the one step compiled: no step timed alone
    saved = strict_json((tmp_path / "run" / "result.json").read_text())
    assert saved["ms_per_step"] is None and saved["test"] == result["test"]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


# --------------------------------------------------------------------------------------
# Read-only and full disks.


@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A small tmpfs at ``path`` (Linux, root): a real full or read-only file system."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root on Linux: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_music(argv):
    env = {**FAST_ENV, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.music", *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def fault_args(mat, workdir):
    return small_args(mat, workdir, "--pad_multiple=64")


def test_a_read_only_workdir_is_one_clear_line_before_anything_compiles(mat, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        out = run_music(fault_args(mat, ro / "run"))
        assert out.returncode == 1
        assert out.stderr.startswith("error: cannot write the work directory") and "read-only" in out.stderr
        assert out.stderr.count("\n") == 1, out.stderr  # one line, no traceback
        assert "device(s)" not in out.stdout  # refused before the data summary and the first compilation
        config = pipeline.parse_args(fault_args(mat, ro / "run"), music.get_config())
        with pytest.raises(pipeline.StorageError):
            music.make_train(config)


def test_a_full_disk_is_one_clear_line_and_the_run_resumes_once_space_is_freed(mat, tmp_path):
    straight = run_music(fault_args(mat, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    with tmpfs(tmp_path / "small", "300k") as small:
        full = run_music(fault_args(mat, small / "run"))
        assert full.returncode == 1, full.stderr[-3000:]
        assert full.stderr.startswith("error: cannot write") and "no space left" in full.stderr, full.stderr
        assert full.stderr.count("\n") == 1, full.stderr
        assert "it resumes" in full.stderr
        assert not (small / "run" / "final_params.npz").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        resumed = run_music(fault_args(mat, small / "run"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout
        a, b = final_params(tmp_path / "straight"), final_params(small / "run")
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_orbax_logs_of_a_storage_failure_are_dropped_and_other_errors_still_logged(tmp_path, caplog):
    workdir.Checkpoints(str(tmp_path / "ckpt"), keep=1)  # installs the filter on the absl logger
    absl_logger = logging.getLogger("absl")
    with caplog.at_level(logging.ERROR, logger="absl"):
        for error in (OSError(28, "No space left on device"), ValueError("shapes differ")):
            try:
                raise RuntimeError("save thread failed") from error
            except RuntimeError:
                absl_logger.exception("_SignalingThread.run() raised an exception")
    assert len(caplog.records) == 1 and "shapes differ" in caplog.text  # the storage failure is reported once, by us
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for error in (ValueError("RESOURCE_EXHAUSTED: Error writing ..."), ValueError("shapes differ")):
            logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=(ValueError, error, None))
    assert len(caplog.records) == 1 and "shapes differ" in caplog.text


def test_closed_event_loop_and_unawaited_write_echoes_are_held_dropped_after_a_storage_failure_and_printed_otherwise(
    monkeypatch,
):
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: printed.append(str(u.exc_value)))
    monkeypatch.setattr(warnings, "showwarning", lambda message, *_: printed.append(str(message)))

    def raise_unraisable(message):
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=RuntimeError, exc_value=RuntimeError(message), exc_traceback=None, err_msg=None, object=None
        ))  # fmt: skip

    async def write_fragment():  # a write gathered with a failed one, never started
        pass

    def leave_a_write_unawaited():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            write_fragment()  # noqa: RUF006 - garbage-collected unawaited: Python's RuntimeWarning
            gc.collect()

    def guard():
        monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
        g = workdir._ReportedStorageFailures()
        monkeypatch.setattr(g, "filter", lambda record: True)  # the loggers' filters are another test's
        g.install()
        return g

    unreported = guard()
    raise_unraisable("Event loop is closed")
    leave_a_write_unawaited()
    raise_unraisable("something else")
    warnings.warn_explicit("another warning", RuntimeWarning, "x.py", 1)
    assert printed == ["something else", "another warning"]  # other echoes pass at once
    unreported._release()  # no storage failure was reported: printed at exit
    assert printed[2] == "Event loop is closed" and re.fullmatch(
        r"coroutine '.*write_fragment' was never awaited", printed[3]
    )
    leave_a_write_unawaited()  # after exit: passed on, not held and lost
    assert len(printed) == 5 and "never awaited" in printed[-1]
    for name in ("absl", "asyncio"):
        logging.getLogger(name).removeFilter(unreported)

    del printed[:]
    reported = guard()
    raise_unraisable("Event loop is closed")
    leave_a_write_unawaited()
    reported.storage_failure_reported()
    raise_unraisable("Event loop is closed")
    leave_a_write_unawaited()
    reported._release()
    assert printed == []  # echoes of a reported failure, before or after it: dropped
    for name in ("absl", "asyncio"):
        logging.getLogger(name).removeFilter(reported)


def test_storage_failures_are_recognised_through_wrapping_exceptions():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("RESOURCE_EXHAUSTED: tensorstore write failed") from e
    except RuntimeError as e:
        assert workdir.storage_reason(e) == "no space left on device"
    assert workdir.storage_reason(ValueError("shapes differ")) is None
    with pytest.raises(pipeline.StorageError, match="cannot write metrics to m.jsonl: the file system is read-only"):
        with workdir.writing("metrics", "m.jsonl"):
            raise OSError(30, "Read-only file system")


# --------------------------------------------------------------------------------------
# Every listed field does something.


def test_the_search_refuses_and_hides_the_pipeline_fields_it_does_not_read(capsys):
    with pytest.raises(SystemExit) as info:
        search.main(["--quick", "--learning_rate=0.1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "does not use" in err and "--learning_rate_range" in err
    with pytest.raises(SystemExit):
        search.main(["--help"])
    out = capsys.readouterr().out
    assert "--learning_rate_range=" in out
    for name in search.Config.unused:
        assert f"--{name}=" not in out
    assert "learning_rate" in [f.name for f in dataclasses.fields(search.Config)]  # still a field, just not offered
