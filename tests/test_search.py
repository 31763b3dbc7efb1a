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

import recurrent
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
# The cell as a discrete choice: the table, forget_bias, the refusals (no compilation).

MODERN = ("gru", "slstm", "mlstm", "min_gru", "min_lstm")


def test_variants_take_the_modern_cells_beside_the_greff_codes():
    config = dataclasses.replace(search.quick_config(), variants="v,GRU,slstm,mlstm,Min_GRU,min_lstm", heads=3)
    members = search.sample_members(config)
    frame = pd.DataFrame(members)
    assert list(frame["variant"].unique()) == ["V", *MODERN] and len(frame) == 4 * 6
    assert (frame.groupby("config")["variant"].nunique() == 6).all()
    runs = search.plan_groups(config, members, features=12, n_devices=1)
    names = [r.group.name for r in runs]
    assert names == ["V_h6_l1", "gru_h6_l1", "slstm_h6_l1_k3", "mlstm_h6_l1_k3", "min_gru_h6_l1", "min_lstm_h6_l1"]
    # an LSTM variant's group is the one it was before the modern cells (same static program)
    assert runs[0].group == search.Group("V", 6, 1, 12, "adam", False, ("dropout",))
    assert set(search.CELLS) == {*recurrent.GREFF_VARIANTS, *MODERN}


# The block of the fused bias that forget_bias shifts, written from each paper's gate order:
# (field, block, number of blocks, sign). LSTM variants: the forget block, wherever the preset puts it.
KEEP_GATE = {
    "gru": ("bias", 1, 3, 1.0),  # r, z, n; z keeps h(t-1)
    "min_gru": ("bias", 0, 2, -1.0),  # z, candidate; 1 - z keeps h(t-1)
    "min_lstm": ("bias", 0, 3, 1.0),  # f, i, candidate
    "slstm": ("bias", 1, 4, 1.0),  # i, f, z, o
    "mlstm": ("gate_bias", 1, 2, 1.0),  # i, f (one per head)
}


@pytest.mark.parametrize("variant", [*MODERN, "V", "CIFG", "NFG"])
def test_forget_bias_shifts_the_bias_of_the_gate_that_keeps_the_state(variant):
    H, K = 4, 2
    base, shifted = (search.CELLS[variant].build(H, fb, K).init(jax.random.key(1), (3,)) for fb in (0.0, 0.5))
    fields = set(base._fields) - {"bias", "gate_bias"}
    for f in fields:  # nothing else moves
        jax.tree.map(np.testing.assert_array_equal, getattr(base, f), getattr(shifted, f))
    if variant in KEEP_GATE:
        field, block, blocks, sign = KEEP_GATE[variant]
        diff = np.asarray(getattr(shifted, field) - getattr(base, field))
        width = diff.size // blocks
        expected = np.zeros(diff.size)
        expected[block * width : (block + 1) * width] = 0.5 * sign
        np.testing.assert_allclose(diff, expected, atol=1e-6)
    else:  # the LSTM variants: H entries (the forget block) move by 0.5, none for NFG
        diff = np.asarray(shifted.bias - base.bias)
        assert np.count_nonzero(diff) == (0 if variant == "NFG" else H)
        np.testing.assert_allclose(diff[diff != 0], 0.5)
    assert search.ignores_forget_bias(variant, H, K) == (variant == "NFG")


def test_what_a_cell_does_not_take_is_refused_before_compiling(tmp_path, capsys):
    base = search.quick_config()
    cases = [
        (dict(variants="V,mlstm", zoneout_range="0:0.3"), "'mlstm' refuses zoneout.*zoneout has no meaning"),
        (dict(variants="NP,mlstm", zoneout_range="0.1", layers="2"), "'mlstm' refuses zoneout"),  # in a stack too
        (dict(variants="V,NFG", forget_bias_range="0:2"), "'NFG' has no gate that keeps the state"),
        (dict(variants="slstm", heads=4), "'slstm' refuses hidden size 6 with heads=4.*multiple of `num_heads`"),
        (dict(variants="mlstm", heads=2, hidden="log:20:200", hidden_buckets=3), "'mlstm' refuses hidden size 29"),
        (dict(variants="V,gru", heads=2), "no selected cell takes heads"),
        (dict(variants="V,lstm"), "unknown variant.*'lstm'"),
        (dict(heads=0), "'heads' must be >= 1"),
    ]
    for changes, message in cases:
        with pytest.raises(pipeline.ConfigError, match=f"(?s){message}"):
            search.check_config(dataclasses.replace(base, **changes))
    # what the cells do take passes: zoneout on every cell but mlstm, dropout and noise on mlstm,
    # a fixed forget_bias with NFG (recorded, no effect)
    search.check_config(dataclasses.replace(base, variants="V,gru,slstm,min_gru,min_lstm", zoneout_range="0:0.3"))
    search.check_config(dataclasses.replace(base, variants="mlstm", input_noise_range="0:1", layers="1,2"))
    search.check_config(dataclasses.replace(base, variants="NFG,slstm", forget_bias_range="2", heads=2))
    with pytest.raises(SystemExit) as info:
        search.main(["--quick", f"--workdir={tmp_path}", "--variants=V,mlstm", "--zoneout_range=0:0.5"])
    assert info.value.code == 2 and not os.listdir(tmp_path)
    assert "--zoneout_range=0, or drop 'mlstm'" in capsys.readouterr().err


def test_help_says_which_hyperparameters_reach_which_cell(capsys):
    with pytest.raises(SystemExit):
        search.main(["--help"])
    out = capsys.readouterr().out
    assert "--heads=1" in out and all(name in out for name in MODERN) and "mlstm refuses zoneout" in out
    for text in ("gate that keeps the state", "Which hyperparameters reach which cell", "NFG"):
        assert text in search.__doc__ + out


# --------------------------------------------------------------------------------------
# The population program (one compile, shared by the tests below through the quick config's group).


def make_population(config):
    data = search.synthetic_data(config.seed)
    members = search.sample_members(config)
    (run,) = search.plan_groups(config, members, features=12, n_devices=1)
    xs, lengths = search.crop_batches(data, config, 3, 0, config.eval_every)
    return run, xs, lengths


@pytest.fixture(scope="module")
def population():
    return make_population(search.quick_config())


def check_members_equal_their_configurations_trained_alone(run, xs, lengths):
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


def test_member_equals_its_configuration_trained_alone(population):
    check_members_equal_their_configurations_trained_alone(*population)


def test_modern_member_equals_its_configuration_trained_alone():
    """The same property for an sLSTM with two heads, forget_bias ranged (shifted at init) and dropout.

    With SGD: the loss of an sLSTM does not depend on its input-gate bias (``h = o c / n`` is
    invariant to scaling every ``i_t`` of a unit), so that gradient is rounding noise, which Adam
    would normalise to steps of the learning rate's size, different in the vmapped and the lone run."""
    config = dataclasses.replace(
        search.quick_config(), variants="slstm", heads=2, forget_bias_range="0:3", optimizer="sgd"
    )
    run, xs, lengths = make_population(config)
    assert run.group.name == "slstm_h6_l1_k2" and len(set(run.hypers.forget_bias.tolist())) == 4
    check_members_equal_their_configurations_trained_alone(run, xs, lengths)


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


def test_a_search_crossing_an_lstm_variant_with_modern_cells_runs(tmp_path):
    config = quick(tmp_path, variants="V,slstm,min_gru", heads=2, forget_bias_range="0:2", halving="")
    config = dataclasses.replace(config, plots=True)
    lines = []
    out = search.run_search(config, log=lines.append)
    assert "3 group(s) (V_h6_l1, slstm_h6_l1_k2, min_gru_h6_l1)" in lines[0]
    frame = out["members"]
    assert list(frame["variant"]) == ["V", "slstm", "min_gru"] * 4
    assert np.isfinite(frame["test"]).all() and np.isfinite(frame["valid"]).all()
    # every cell got the same draws of every hyperparameter, forget_bias included
    for name in ("learning_rate", "forget_bias", "dropout"):
        assert (frame.groupby("config")[name].nunique() == 1).all()
    assert frame.groupby("variant")["test"].nunique().min() > 1
    assert set(out["importance"]) >= {"variant", "forget_bias"}
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
