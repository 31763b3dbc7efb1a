"""Faults in the training pipeline: a run killed anywhere, or whose files are damaged, resumes on the
next rerun and ends with exactly the uninterrupted run's parameters and metric rows.

The runs are real ``python -m experiments.music`` processes on a tiny generated data set, killed with
SIGKILL at chosen points by :mod:`tests.faults` (after each kind of checkpoint, inside orbax during a
save, during the final evaluation, at random points), and real orbax checkpoints damaged on disk
(truncated files, unreadable metadata, a half-written temporary folder).
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.subprocess_env import FAST_ENV, REPO
from tests.test_pipeline import final_params, write_mat

# Wall-clock fields differ between any two runs; every other number must be identical.
TIMING = {"steps_per_s", "compile_s", "ms_per_step", "compiled_shapes"}


def args(mat, workdir, *extra):
    return [
        f"--data={mat}", f"--workdir={workdir}", "--steps=8", "--batch_size=4", "--hidden=4", "--pad_multiple=64",
        "--checkpoint_every=2", "--eval_every=4", "--log_every=2", "--progress=false", *extra,
    ]  # fmt: skip


# JAX's persistent compilation cache: every run here compiles the same two programs, so all but the
# first load them (a run takes about 5 s instead of 9).
CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run(argv, fault=None, timeout=300):
    env = {**FAST_ENV, **CACHE, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": os.environ["FAULTS_JAX_CACHE"]}
    if fault:
        env["FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "tests.faults", "experiments.music", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def rows(workdir):
    """The metric rows without their wall-clock fields."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in lines]


def assert_same_run(workdir, reference):
    a, b = final_params(reference), final_params(workdir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert rows(workdir) == rows(reference)  # complete, in order, none duplicated
    with open(os.path.join(workdir, "result.json")) as f, open(os.path.join(reference, "result.json")) as g:
        result, expected = json.load(f), json.load(g)
    assert {k: v for k, v in result.items() if k not in TIMING} == {
        k: v for k, v in expected.items() if k not in TIMING
    }


@pytest.fixture(scope="module")
def mat(tmp_path_factory):
    os.environ["FAULTS_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax_cache"))
    return write_mat(tmp_path_factory.mktemp("data") / "tiny.mat")


@pytest.fixture(scope="module")
def straight(mat, tmp_path_factory):
    """An uninterrupted run: the reference of every test here."""
    workdir = tmp_path_factory.mktemp("runs") / "straight"
    out = run(args(mat, workdir), fault="count")
    assert out.returncode == 0, out.stderr[-3000:]
    splits = [(r["step"], r["split"]) for r in rows(workdir)]
    assert splits == [(2, "train"), (4, "train"), (4, "valid"), (6, "train"), (8, "train"), (8, "valid"),
                      (8, "final")]  # fmt: skip
    return workdir


# The events of the run above, in order: train rows and checkpoints/2; a validation (evaluate),
# best/4, checkpoints/4; ...; best/8, checkpoints/8; then the final evaluation (evaluate 3-6:
# the last parameters' valid and test NLL, the best checkpoint's valid and test NLL) and the
# final metric row. orbax finalizes each save (checkpoints/2 is finalize:1, best/4 finalize:2).
KILL_POINTS = {
    "after a best checkpoint, before the latest": "save_best:1",
    "after a latest checkpoint": "save_latest:2",
    "during a latest save": "finalize:1",
    "during a best save": "finalize:2",
    "after the last checkpoint": "save_latest:4",
    "during the final evaluation": "evaluate:4",
    "before the final metric row": "write:7",
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_then_a_rerun_gives_the_uninterrupted_run(point, mat, straight, tmp_path):
    workdir = tmp_path / "run"
    killed = run(args(mat, workdir), fault=KILL_POINTS[point])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (workdir / "final_params.npz").exists()
    rerun = run(args(mat, workdir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_run(workdir, straight)


def test_five_kills_at_random_points_then_the_run_finishes_as_if_never_killed(mat, straight, tmp_path):
    rng = np.random.default_rng(7)
    workdir = tmp_path / "run"
    kills, attempts = [], 0
    while True:
        attempts += 1
        assert attempts <= 12, f"the run did not finish after {kills}"
        fault = f"any:{rng.integers(1, 8)}" if len(kills) < 5 else None
        out = run(args(mat, workdir), fault=fault)
        if out.returncode == -9:
            kills.append(fault)
            continue
        assert out.returncode == 0, out.stderr[-3000:]
        if len(kills) == 5:
            break
    assert_same_run(workdir, straight)


def damage(path):
    """Truncates every non-empty file under ``path`` to half its size."""
    for root, _, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if os.path.getsize(file) > 0:
                with open(file, "r+b") as f:
                    f.truncate(os.path.getsize(file) // 2)


def copy_of(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    return workdir


def best_step(workdir):
    (step,) = [int(n) for n in os.listdir(workdir / "best")]
    return step


@pytest.mark.parametrize("damaged", [(8, 6), (8, 6, 4)])
def test_damaged_latest_checkpoints_fall_back_and_every_rerun_resumes(damaged, mat, straight, tmp_path):
    workdir = copy_of(straight, tmp_path)
    for step in damaged:  # with 4 damaged too, the rerun starts afresh and replays best/'s step 4
        damage(workdir / "checkpoints" / str(step))
    for attempt in range(2):  # the second rerun finds a finished run and reports it again, unchanged
        out = run(args(mat, workdir))
        assert out.returncode == 0, out.stderr[-3000:]
        if attempt == 0:
            assert out.stderr.count("could not be restored") == len(damaged)
            assert ("resumed from" in out.stdout) == (4 not in damaged)
        assert_same_run(workdir, straight)
    assert {f"corrupt-{step}" for step in damaged} <= set(os.listdir(workdir / "checkpoints"))


def test_unreadable_checkpoint_metadata_is_set_aside(mat, straight, tmp_path):
    workdir = copy_of(straight, tmp_path)
    (workdir / "checkpoints" / "8" / "_CHECKPOINT_METADATA").write_text('{"item_handlers": {"def')
    best = best_step(workdir)
    (workdir / "best" / str(best) / "metrics" / "metrics").write_text('{"valid": 1')
    out = run(args(mat, workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and out.stderr.count("could not be restored") == 2
    assert f"corrupt-{best}" in os.listdir(workdir / "best")


def test_a_damaged_best_checkpoint_is_set_aside_with_a_warning(mat, straight, tmp_path):
    workdir = copy_of(straight, tmp_path)
    best = best_step(workdir)
    damage(workdir / "best" / str(best))
    for attempt in range(2):
        out = run(args(mat, workdir))
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        assert ("could not be restored" in out.stderr) == (attempt == 0)
    assert os.listdir(workdir / "best") == [f"corrupt-{best}"]
    np.testing.assert_equal(final_params(workdir), final_params(straight))


def test_half_written_temporary_folders_are_removed(mat, straight, tmp_path):
    workdir = copy_of(straight, tmp_path)
    # A kill during the save of step 8 leaves its temporary folder beside the earlier checkpoints.
    shutil.move(workdir / "checkpoints" / "8", workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234")
    shutil.copytree(workdir / "best" / str(best_step(workdir)), workdir / "best" / "8.orbax-checkpoint-tmp-1234")
    for kind in ("checkpoints", "best"):
        (workdir / kind / "8.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink(missing_ok=True)
    out = run(args(mat, workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert not [n for kind in ("checkpoints", "best") for n in os.listdir(workdir / kind) if "tmp" in n]
    assert_same_run(workdir, straight)


def test_cut_short_metric_rows_are_dropped_and_written_again(mat, straight, tmp_path):
    workdir = copy_of(straight, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "8")  # as a kill between the row of step 8 and its checkpoint
    with open(workdir / "metrics.jsonl") as f:
        lines = f.readlines()
    with open(workdir / "metrics.jsonl", "w") as f:  # as a kill in the middle of a write leaves it
        f.writelines(lines[:4] + [lines[4][:17]])
    csv_lines = (workdir / "metrics.csv").read_text().splitlines(keepends=True)
    (workdir / "metrics.csv").write_text("".join(csv_lines[:11]) + "8,tra")  # through step 6, then cut
    out = run(args(mat, workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_run(workdir, straight)
    assert csv_rows(workdir) == csv_rows(straight)


def csv_rows(workdir):
    with open(workdir / "metrics.csv", newline="") as f:
        return [r for r in csv.reader(f) if r[2] not in TIMING]
