"""Training with several processes (``--distributed=true``), tested with two processes on this machine.

Each of the two processes has one virtual CPU device; they meet at a coordinator on 127.0.0.1 and
run their collectives over gloo. Their run is compared with ONE process holding two virtual devices,
the same config: the mesh, the shards and the arithmetic are the same, so the losses and the final
parameters agree to float32 rounding (we assert ``rtol=1e-6``; on CPU they are bit-identical).
Every subprocess has a time-out, so a hung collective fails the test instead of hanging it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pandas as pd
import pytest

from experiments import music, pipeline
from tests.subprocess_env import FAST_ENV, FAST_FLAGS, REPO
from tests.test_pipeline import write_mat

TIMEOUT = 300  # seconds for one run of the processes; a hung collective fails instead of hanging
RTOL = 1e-6  # float32 rounding; the runs compared here are bit-identical on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(logs, name: str, module: str, args: list[str], processes: int) -> list[subprocess.Popen]:
    """Starts ``python -m module args`` in two processes of one CPU device each (``processes=2``,
    with ``--distributed=true``) or in one process of two devices; output goes to ``logs/name.<i>.log``."""
    port = free_port()
    procs = []
    for i in range(processes):
        env = {k: v for k, v in FAST_ENV.items() if k not in pipeline.DISTRIBUTED_VARIABLES}
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 // processes} {FAST_FLAGS}"
        extra = []
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
            env["JAX_PROCESS_ID"] = str(i)
            extra = ["--distributed=true"]
        with open(logs / f"{name}.{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args, *extra],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def output(logs, name: str, i: int) -> str:
    return (logs / f"{name}.{i}.log").read_text()


def finish(logs, runs: dict[str, list[subprocess.Popen]]) -> None:
    """Waits for every process of ``runs`` (started together); kills them all when one hangs or fails."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for procs in runs.values():
            for p in procs:
                p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    hung = [p for procs in runs.values() for p in procs if p.poll() is None]
    for p in hung:
        p.kill()
        p.wait()
    failed = {f"{name}.{i}": p.returncode for name, procs in runs.items() for i, p in enumerate(procs)}
    failed = {k: rc for k, rc in failed.items() if rc != 0}
    if failed:
        tails = "\n".join(f"--- {k}.log\n{(logs / f'{k}.log').read_text()[-2500:]}" for k in failed)
        pytest.fail(f"{'hung past the time-out; ' if hung else ''}exit codes {failed}\n{tails}")


def metric_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir) -> dict[str, np.ndarray]:
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


def assert_same_training(a, b, exact: bool = False) -> None:
    """Same metric rows (losses, gradient norms, validation NLL; not the timings) and final parameters."""
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [(r["step"], r["split"]) for r in rows_a] == [(r["step"], r["split"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "grad_norm", "nll", "valid", "test", "best_valid", "best_test"):
            if key in ra:
                np.testing.assert_allclose(ra[key], rb[key], rtol=0 if exact else RTOL, err_msg=f"{ra}")
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        if exact:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
        else:
            np.testing.assert_allclose(pa[k], pb[k], rtol=RTOL, atol=1e-7, err_msg=k)


def assert_written_once(workdir, checkpoints: list[str], runs: int = 1) -> None:
    """One set of checkpoints and files: no row twice, one TensorBoard file per run (of process 0), no
    temporary leftovers."""
    rows = [(r["step"], r["split"]) for r in metric_rows(workdir)]
    assert len(rows) == len(set(rows)), rows
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == checkpoints
    assert len([n for n in os.listdir(workdir / "best") if n.isdigit()]) == 1
    assert len(os.listdir(workdir / "tb")) == runs  # process 1 opened no event file of its own
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(workdir) for n in dirs + files if "tmp" in n]
    assert not leftovers


# --------------------------------------------------------------------------------------
# The music pipeline.


@pytest.fixture(scope="module")
def music_runs(tmp_path_factory):
    """The same short music run in two processes (one device each) and in one process (two devices)."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    mat = write_mat(tmp / "tiny.mat")
    args = lambda workdir: [  # noqa: E731
        "--quick", f"--data={mat}", f"--workdir={workdir}", "--steps=4", "--batch_size=4", "--hidden=4",
        "--pad_multiple=16", "--checkpoint_every=2", "--eval_every=2", "--log_every=1",
        "--progress=false",
    ]  # fmt: skip
    runs = {
        "two": launch(tmp, "two", "experiments.music", args(tmp / "two"), processes=2),
        "one": launch(tmp, "one", "experiments.music", args(tmp / "one"), processes=1),
    }
    finish(tmp, runs)
    return tmp, args


def test_two_processes_train_as_one_process_with_two_devices(music_runs):
    tmp, _ = music_runs
    assert "process 0 of 2: 1 local device(s), 2 in all" in output(tmp, "two", 0)
    assert "process 1 of 2: 1 local device(s), 2 in all" in output(tmp, "two", 1)
    assert_same_training(tmp / "two", tmp / "one")
    assert len(metric_rows(tmp / "two")) == 4 + 2 + 1  # a train row per step, two validations, the final row
    assert_written_once(tmp / "two", ["2", "4"])
    assert json.loads((tmp / "two" / "config.json").read_text())["distributed"] is True
    # every process returns the same result; process 0 alone logs
    final = [line for line in output(tmp, "two", 0).splitlines() if line.startswith("final:")]
    assert final and final == [line for line in output(tmp, "two", 1).splitlines() if line.startswith("final:")]


def test_a_process_killed_mid_run_then_both_rerun_resume_to_the_same_parameters(music_runs):
    tmp, args = music_runs
    workdir = tmp / "killed"
    procs = launch(tmp, "killed", "experiments.music", [*args(workdir), "--sleep_per_step=0.5"], processes=2)
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "checkpoints" / "2").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"no checkpoint of step 2 before the kill:\n{output(tmp, 'killed', 0)[-2500:]}")
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    # The survivor fails in its next collective, then waits for the dead one at jax's shutdown barrier
    # (until the coordinator's heartbeat time-out, 100 s): stop it as one stops such a run.
    try:
        procs[0].wait(1)
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
    assert not (workdir / "final_params.npz").exists()
    assert "4" not in os.listdir(workdir / "checkpoints")

    finish(tmp, {"rerun": launch(tmp, "rerun", "experiments.music", args(workdir), processes=2)})
    assert "resumed from" in output(tmp, "rerun", 0) and "resumed from" not in output(tmp, "rerun", 1)
    assert_same_training(workdir, tmp / "two", exact=True)
    assert_written_once(workdir, ["2", "4"], runs=2)


# --------------------------------------------------------------------------------------
# The search pipeline.


def test_search_in_two_processes_equals_one_process_with_two_devices(tmp_path):
    args = lambda name: ["--quick", "--configs=3", "--plots=false", f"--workdir={tmp_path / name}"]  # noqa: E731
    runs = {
        "two": launch(tmp_path, "two", "experiments.search", args("two"), processes=2),
        "one": launch(tmp_path, "one", "experiments.search", args("one"), processes=1),
    }
    finish(tmp_path, runs)
    for table in ("members.csv", "curves.csv"):
        a, b = pd.read_csv(tmp_path / "two" / table), pd.read_csv(tmp_path / "one" / table)
        pd.testing.assert_frame_equal(a, b, rtol=RTOL)
    assert len(pd.read_csv(tmp_path / "two" / "members.csv")) == 3
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints"), key=int) == ["2", "4"]
    assert "2 device(s)" in output(tmp_path, "two", 0) and "search:" not in output(tmp_path, "two", 1)


# --------------------------------------------------------------------------------------
# Bad variables: one clear error, before anything starts.


@pytest.mark.parametrize(
    "env, words",
    [
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID unset"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "HOST:PORT"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2"),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
                "JAX_LOCAL_DEVICE_IDS": "0,x",
            },
            "comma-separated",
        ),  # fmt: skip
        # none set and no cluster; in this process the runtime also starts too late (a device is in use)
        ({}, "did not start"),
    ],
)
def test_bad_distributed_variables_are_one_clear_error(env, words, monkeypatch, capsys, tmp_path):
    jax.devices()  # the runtime can no longer start here: jax refuses before it looks for a cluster
    for name in (*pipeline.DISTRIBUTED_VARIABLES, "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        music.main(["--quick", f"--workdir={tmp_path / 'run'}", "--distributed=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --distributed=true") and "Traceback" not in err, err
    assert words in err and all(w in err for w in ("expected:", "got:", "fix:")), err
    assert not (tmp_path / "run").exists()


def test_distributed_arguments_pass_the_variables_to_jax():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert pipeline.distributed_arguments(env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3
    }  # fmt: skip
    assert pipeline.distributed_arguments({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
    assert pipeline.distributed_arguments({}) == {}  # a cluster jax detects (SLURM, Cloud TPU)
