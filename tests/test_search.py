"""The vmapped hyperparameter search: a member equals its configuration trained alone, continuous
hyperparameters never recompile, sharded and unsharded populations agree, samplers, successive
halving, resume after a stop, the result tables, plots and importance."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pandas as pd
import pytest

from experiments import pipeline, search
from tests.subprocess_env import REPO, VIRTUAL_CPUS_ENV


def quick(tmp_path, **changes):
    return dataclasses.replace(search.quick_config(), workdir=str(tmp_path), plots=False, **changes)


# --------------------------------------------------------------------------------------
# Samplers and configs (no compilation).


@pytest.mark.parametrize("sampler", ["random", "sobol", "halton"])
def test_samplers_stay_in_range_and_are_deterministic(sampler):
    config = dataclasses.replace(
        search.quick_config(), sampler=sampler, configs=16, learning_rate_range="log:1e-6:1e-2",
        momentum_range="1-log:0.01:1", input_noise_range="0:1", hidden="log:20:200", hidden_buckets=3,
        variants="V,CIFG", seeds=2,
    )  # fmt: skip
    members = search.sample_members(config)
    assert members == search.sample_members(config)  # a pure function of the config
    assert members != search.sample_members(dataclasses.replace(config, seed=1))
    frame = pd.DataFrame(members)
    assert len(frame) == 16 * 2 * 2 and list(frame["member"]) == list(range(64))
    assert frame["learning_rate"].between(1e-6, 1e-2).all() and frame["momentum"].between(0, 0.99).all()
    assert frame["input_noise"].between(0, 1).all() and frame["hidden_sampled"].between(20, 200).all()
    assert set(frame["hidden"]) <= {29, 63, 136}  # centres of three equal log-width bins of [20, 200]
    assert (frame["clip_norm"] == 1.0).all()  # a fixed value
    # log-uniform: log(lr) spread over the whole range (and more evenly for the low-discrepancy samplers)
    lr = np.log10(frame.drop_duplicates("config")["learning_rate"])
    assert lr.min() < -5 and lr.max() > -3
    # every configuration is crossed with every variant and seed
    assert (frame.groupby("config")["variant"].nunique() == 2).all()


def test_grid_sampler_enumerates_the_product():
    config = dataclasses.replace(
        search.quick_config(), sampler="grid", grid_points=3, learning_rate_range="log:1e-4:1e-2",
        dropout_range="0:0.5", weight_decay_range="0", init_scale_range="1", hidden="8,16", layers="1,2",
    )  # fmt: skip
    frame = pd.DataFrame(search.sample_members(config))
    assert len(frame) == 3 * 3 * 2 * 2
    np.testing.assert_allclose(sorted(set(frame["learning_rate"])), [1e-4, 1e-3, 1e-2])
    np.testing.assert_allclose(sorted(set(frame["dropout"])), [0, 0.25, 0.5])
    assert set(frame["hidden"]) == {8, 16} and set(frame["layers"]) == {1, 2}


def test_bad_configs_fail_before_compiling(tmp_path):
    base = search.quick_config()
    cases = [
        (dict(sampler="lhs"), "unknown sampler"),
        (dict(steps=5), "multiple of eval_every"),
        (dict(learning_rate_range="log:0:1"), "log range needs lo > 0"),
        (dict(momentum_range="abc"), "cannot read the range"),
        (dict(variants="V,XYZ"), "unknown variant"),
        (dict(halving="3"), "halving step 3"),
        (dict(optimizer="rmsprop"), "sgd or adam"),
    ]
    for changes, message in cases:
        with pytest.raises(pipeline.ConfigError, match=message):
            search.check_config(dataclasses.replace(base, **changes))
    with pytest.raises(SystemExit) as info:
        search.main(["--quick", f"--workdir={tmp_path}", "--sampler=lhs"])
    assert info.value.code == 2 and not os.listdir(tmp_path)


def test_crops_are_a_pure_function_of_seed_and_step():
    data = search.synthetic_data(0)
    config = search.quick_config()
    xs, lengths = search.crop_batches(data, config, 7, 0, 5)
    xs2, lengths2 = search.crop_batches(data, config, 7, 3, 5)  # rebuilt from step 3 on (a resume)
    np.testing.assert_array_equal(xs[3:], xs2)
    np.testing.assert_array_equal(lengths[3:], lengths2)
    assert xs.shape == (5, config.batch_size, config.window + 1, 12) and lengths.max() == config.window + 1
    assert not np.array_equal(xs, search.crop_batches(data, config, 8, 0, 5)[0])
    assert [len(s) for s in search.synthetic_data(0).train] == [len(s) for s in data.train]


def test_halving_freezes_the_worst_active_members():
    curve = np.full((3, 6), np.nan, np.float32)
    curve[0] = [5.0, 1.0, np.nan, 3.0, 2.0, 4.0]  # member 2 diverged: counts as worst
    state = {"valid_curve": curve, "active": np.ones(6, bool), "stopped_at": np.full(6, 30, np.int32)}
    search.halve(state, 10, 0.5)
    assert state["active"].tolist() == [False, True, False, True, True, False]
    assert state["stopped_at"].tolist() == [10, 30, 10, 30, 30, 10]
    curve[1] = [0.0, 9.0, 0.0, 1.0, 2.0, 0.0]  # frozen members' scores no longer count
    search.halve(state, 20, 0.5)
    assert state["active"].tolist() == [False, False, False, True, True, False]


# --------------------------------------------------------------------------------------
# The population program (one compile, shared by the tests below through the quick config's group).


@pytest.fixture(scope="module")
def population():
    config = search.quick_config()
    data = search.synthetic_data(config.seed)
    members = search.sample_members(config)
    (run,) = search.plan_groups(config, members, features=12, n_devices=1)
    xs, lengths = search.crop_batches(data, config, 3, 0, config.eval_every)
    return run, xs, lengths


def test_member_equals_its_configuration_trained_alone(population):
    run, xs, lengths = population
    state = search.population_init(run.group, run.hypers, run.keys)
    active = np.array([True, False, True, True])
    trained, losses = search.population_train(run.group, state, run.hypers, active, xs, lengths)
    alone_train = jax.jit(search.train_steps, static_argnums=0)
    alone_init = jax.jit(search.init_member, static_argnums=0)
    for m in (0, 3):
        hypers_m = jax.tree.map(lambda a: a[m], run.hypers)
        state_m = alone_init(run.group, hypers_m, run.keys[m])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-6), state, state_m)
        alone, alone_losses = alone_train(run.group, state_m, hypers_m, True, xs, lengths)
        np.testing.assert_allclose(losses[m], alone_losses, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b, rtol=1e-4, atol=1e-6), trained, alone)
    # a frozen member (active False) is left exactly as it was
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]), trained, state)
    assert not np.allclose(trained["params"]["readout"]["kernel"][0], state["params"]["readout"]["kernel"][0])


def test_changing_continuous_hyperparameters_does_not_recompile(population):
    run, xs, lengths = population
    state = search.population_init(run.group, run.hypers, run.keys)
    active = np.ones(4, bool)
    search.population_train(run.group, state, run.hypers, active, xs, lengths)
    search.population_evaluate(run.group, state["params"], run.hypers, xs, lengths)
    traces = dict(search.TRACES)
    rng = np.random.default_rng(0)
    for _ in range(3):  # new values of every continuous hyperparameter, and new keys
        hypers = search.Hypers(*[(h * rng.uniform(0.5, 1.5, h.shape)).astype(np.float32) for h in run.hypers])
        keys = search.member_keys(int(rng.integers(100)), range(4))
        state = search.population_init(run.group, hypers, keys)
        out, losses = search.population_train(run.group, state, hypers, active, xs, lengths)
        search.population_evaluate(run.group, out["params"], hypers, xs, lengths)
        assert np.isfinite(np.asarray(losses)).all()
    assert dict(search.TRACES) == traces  # no new trace, so no new compile


def test_stop_then_rerun_resumes_to_identical_results_and_writes_the_tables(tmp_path):
    straight = search.run_search(quick(tmp_path / "straight"), log=lambda *_: None)
    stopped = quick(tmp_path / "stopped", stop_after=2)
    with pytest.raises(SystemExit) as info:
        search.run_search(stopped, log=lambda *_: None)
    assert info.value.code == 3
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["2"]
    lines = []
    resumed = search.run_search(dataclasses.replace(stopped, stop_after=0), log=lines.append)
    assert any("resumed from" in line for line in lines)
    pd.testing.assert_frame_equal(straight["members"], resumed["members"])
    pd.testing.assert_frame_equal(straight["curves"], resumed["curves"])

    frame = straight["members"]
    work = tmp_path / "straight"
    pd.testing.assert_frame_equal(pd.read_csv(work / "members.csv"), frame, check_dtype=False, rtol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(work / "curves.csv"), straight["curves"], check_dtype=False, rtol=1e-6)
    read = pd.read_json(work / "members.jsonl", lines=True)
    assert len(read) == len(frame) == 4 and list(read["member"]) == [0, 1, 2, 3]
    assert {"learning_rate", "dropout", "hidden", "variant", "valid", "test", "stopped_at"} <= set(read.columns)
    assert np.isfinite(read["test"]).all()
    # halving at step 2 froze the worst half; their curves end there
    assert sorted(read["stopped_at"]) == [2, 2, 4, 4]
    curves = pd.read_csv(work / "curves.csv")
    assert curves.groupby("member")["step"].max().tolist() == read["stopped_at"].tolist()
    importance = json.loads((work / "importance.json").read_text())
    assert set(importance) == {"learning_rate", "weight_decay", "dropout", "init_scale"}
    assert abs(sum(importance.values()) - 1) < 1e-6


def test_plots_are_written(tmp_path):
    frame = pd.DataFrame(search.sample_members(dataclasses.replace(search.quick_config(), variants="V,NP")))
    frame["valid"] = np.linspace(1, 2, len(frame))
    frame.loc[0, "valid"] = np.nan
    curves = pd.DataFrame([{"member": m, "step": s, "valid_nll": 1.0 + m / s} for m in frame["member"] for s in (2, 4)])
    varied = search.varied_columns(search.quick_config(), frame)
    search.plot_results(str(tmp_path), frame, curves, varied, "valid")
    for name in ("curves.png", "hyperparameters.png", "variants.png"):
        assert (tmp_path / name).stat().st_size > 1000


SHARDED = textwrap.dedent(
    """
    import dataclasses, sys, jax, numpy as np, pandas as pd
    from experiments import search
    assert jax.device_count() == 4, jax.devices()
    out = {}
    for n in (1, 4):
        config = dataclasses.replace(search.quick_config(), workdir=f"{sys.argv[1]}/{n}", num_devices=n,
                                     plots=False, configs=3)
        out[n] = search.run_search(config, log=lambda *_: None)
    config = dataclasses.replace(config, num_devices=4)
    mesh = search.make_mesh(4)
    run = search.plan_groups(config, search.sample_members(config), 12, 4)[0]
    pop = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pop"))
    state = search.population_init(run.group, jax.device_put(run.hypers, pop), jax.device_put(run.keys, pop))
    assert len(state["params"]["readout"]["kernel"].sharding.device_set) == 4
    a, b = out[1]["members"], out[4]["members"]
    assert len(a) == len(b) == 3  # the population of 3 is padded to 4 on four devices, the copy dropped
    pd.testing.assert_frame_equal(a, b, rtol=1e-4)
    pd.testing.assert_frame_equal(out[1]["curves"], out[4]["curves"], rtol=1e-4)
    print("OK")
    """
)


def test_sharded_population_on_four_virtual_devices_matches_one_device(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path)],
        cwd=REPO,
        env=VIRTUAL_CPUS_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
