"""Long-range and timing tasks: deterministic generators that match the papers' recipes, clear
errors, and a shrunken run of every task."""

import os

import numpy as np
import pytest

from experiments import long_range, pipeline


def test_generators_are_deterministic_for_a_seed():
    config = long_range.quick_config()
    every = pipeline.override(config, lengths="30,40", tasks=",".join(long_range.TASKS))
    assert len(long_range.task_specs(every)) == 8
    for spec in long_range.task_specs(every):
        a, b = long_range.make_data(spec, config), long_range.make_data(spec, config)
        np.testing.assert_array_equal(np.asarray(a.train[3]), np.asarray(b.train[3]))
        other = long_range.make_data(spec, pipeline.override(config, data_seed=1))
        assert not np.array_equal(np.asarray(a.train[3]), np.asarray(other.train[3]))
        assert not np.array_equal(np.asarray(a.train[3]), np.asarray(a.test[3]))
        assert np.asarray(a.train[0]).shape == (spec.length, spec.inputs + 1)


def test_adding_problem_follows_hochreiter_and_schmidhuber():
    spec = long_range.adding(100)
    for i in range(20):
        x = long_range.generate(spec, 0, "train", i)
        marked = np.flatnonzero(x[:, 1])
        assert len(marked) == 2 and marked[0] < 10 and 10 <= marked[1] < 50
        assert x[-1, 2] == pytest.approx(0.5 + x[marked, 0].sum() / 4)
        assert np.abs(x[:, 0]).max() <= 1


def test_adding_sum_follows_arjovsky_et_al_and_its_baseline_is_the_variance_of_the_sum():
    spec = long_range.adding_sum(100)
    targets = []
    for i in range(2000):
        x = long_range.generate(spec, 0, "train", i)
        marked = np.flatnonzero(x[:, 1])
        assert len(marked) == 2 and marked[0] < 50 <= marked[1]  # one marker in each half
        assert x[-1, 2] == pytest.approx(x[marked, 0].sum())
        assert 0 <= x[:, 0].min() and x[:, 0].max() <= 1
        targets.append(x[-1, 2])
    # always answering 1 costs Var(X1 + X2) = 1/6 (the 0.167 Arjovsky et al. plot); the data agree
    assert spec.baseline == pytest.approx(1 / 6)
    assert np.mean((np.array(targets) - 1) ** 2) == pytest.approx(1 / 6, rel=0.05)
    hs = long_range.adding(100)
    assert hs.baseline == pytest.approx(1 / 24)
    hs_targets = np.array([long_range.generate(hs, 0, "train", i)[-1, 2] for i in range(2000)])
    assert np.var(hs_targets) == pytest.approx(1 / 24, rel=0.1)


def test_copy_scoring_all_steps_is_arjovskys_loss():
    answers, every = long_range.copy(100), long_range.copy(100, scoring="all")
    assert answers.scored.sum() == 10 and every.scored.all() and every.length == 120
    assert answers.baseline == every.baseline == pytest.approx(10 * np.log(8))
    # the memoryless guess: certain blanks, uniform symbols; its mean per step is 10 ln 8 / (T + 20)
    import jax.numpy as jnp

    logits = np.zeros((120, 9), np.float32)
    logits[:-10, 8] = 50.0  # a blank where the target is one
    logits[-10:, 8] = -50.0  # a uniform guess over the 8 symbols at the answers
    xs = np.stack([long_range.generate(every, 0, "test", i) for i in range(4)])
    step_loss, _ = long_range.per_step(every, jnp.asarray(logits)[None].repeat(4, 0), xs[..., -1])
    per_sequence = np.asarray(step_loss).sum(-1)
    np.testing.assert_allclose(per_sequence / every.length, 10 * np.log(8) / 120, rtol=1e-4)
    with pytest.raises(pipeline.ConfigError, match="copy_scoring"):
        long_range.check_config(pipeline.override(long_range.quick_config(), copy_scoring="blanks"))


def test_temporal_order_copy_and_timing_tasks():
    to = long_range.temporal_order()
    x = long_range.generate(to, 0, "test", 5)
    symbols = x[:, :8].argmax(1)
    assert symbols[0] == 6 and symbols[-1] == 7
    relevant = np.flatnonzero(symbols >= 4)[1:-1]
    assert len(relevant) == 2 and 10 <= relevant[0] <= 20 and 50 <= relevant[1] <= 60
    assert x[-1, 8] == 2 * (symbols[relevant[0]] - 4) + (symbols[relevant[1]] - 4)

    cp = long_range.copy(7)
    x = long_range.generate(cp, 0, "train", 0)
    assert x.shape == (27, 11) and x[16, 9] == 1
    np.testing.assert_array_equal(x[-10:, 10], x[:10, :8].argmax(1))

    iv = long_range.interval(20)
    gaps = set()
    for i in range(30):
        x = long_range.generate(iv, 0, "train", i)
        t = np.flatnonzero(x[:, 0])
        gaps.add(t[1] - t[0])
        assert x[-1, 1] == t[1] - t[0] - 20
    assert gaps == {20, 21}

    sp = long_range.spikes(5, 3)
    x = long_range.generate(sp, 0, "train", 0)
    t0 = np.flatnonzero(x[:, 0])[0]
    np.testing.assert_array_equal(np.flatnonzero(x[:, 1]), t0 + np.array([5, 10, 15]))


def test_bad_options_fail_before_anything_runs(tmp_path, capsys):
    for args, message in [
        (["--tasks=parity"], "unknown value"),
        (["--cells=rnn"], "unknown value"),
        (["--lengths=100,x"], "comma-separated integers"),
        (["--period=0"], "'period' must be >= 1"),
        (["--chrono=2"], "'chrono' must be 0 (off) or >= 3"),
    ]:
        with pytest.raises(SystemExit) as info:
            long_range.main(["--quick", f"--workdir={tmp_path}", *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_solved_criterion():
    spec = long_range.adding(24)
    config = pipeline.override(long_range.quick_config(), cells="lstm")
    init, _ = long_range.make_model(config, spec, "lstm")
    import jax

    params = init(jax.random.key(0))
    # A readout that answers the exact target cannot be had from an untrained net; a zero
    # readout with bias 0.5 is within 0.04 only where the target is.
    params["readout"]["kernel"] = params["readout"]["kernel"] * 0
    params["readout"]["bias"] = params["readout"]["bias"] + 0.5
    data = long_range.make_data(spec, config)
    m = long_range.evaluate(config, spec, "lstm", params, data.test)
    targets = np.array([np.asarray(x)[-1, 2] for x in data.test])
    assert m["solved_share"] == pytest.approx(np.mean(np.abs(targets - 0.5) < 0.04))


def test_quick_run_of_every_task(tmp_path):
    table = long_range.main(["--quick", f"--workdir={tmp_path}", "--tasks=adding,adding_sum,copy,spikes"])
    assert set(table) == {"adding_24", "adding_sum_24", "copy_5", "spikes_every_3"}
    for rows in table.values():
        assert set(rows) == {"peephole_lstm"}
        assert all(np.isfinite(m["test_loss"]) and 0 <= m["solved_share"] <= 1 for m in rows.values())
        assert all(m["steps"] == 2 and m["wall_s"] > 0 for m in rows.values())
    assert table["adding_sum_24"]["peephole_lstm"]["baseline"] == pytest.approx(1 / 6)
    assert "baseline" not in table["spikes_every_3"]["peephole_lstm"]


def test_forget_bias_and_chrono_init():
    import jax

    spec, H = long_range.adding(24), 4
    config = pipeline.override(long_range.quick_config(), hidden=H)

    def bias(cell="lstm", **values):
        init, _ = long_range.make_model(pipeline.override(config, **values), spec, cell)
        return np.asarray(init(jax.random.key(0))["rnn"].bias).reshape(4, H)  # (input, forget, cell, output)

    np.testing.assert_array_equal(bias()[1], 1.0)
    np.testing.assert_array_equal(bias(forget_bias=3.0)[1], 3.0)
    np.testing.assert_array_equal(bias(forget_bias=3.0)[[0, 2, 3]], 0.0)
    for cell in ("lstm", "peephole_lstm"):
        b = bias(cell, chrono=100)
        assert (b[1] >= 0).all() and (b[1] <= np.log(99) + 1e-6).all() and np.ptp(b[1]) > 0.1
        np.testing.assert_allclose(b[0], -b[1])
        np.testing.assert_array_equal(b[2:], 0.0)
    assert set(long_range.CHRONO_GATES) == set(long_range.CELLS), "--chrono covers every cell"
    for cell, keep in (("cifg_lstm", 0), ("gru", 1)):  # forget (f, g, o) / update (r, z, n) block
        init, _ = long_range.make_model(pipeline.override(config, chrono=100), spec, cell)
        params = init(jax.random.key(0))["rnn"]
        b = np.asarray(params.bias).reshape(3, H)
        assert (b[keep] >= 0).all() and (b[keep] <= np.log(99) + 1e-6).all() and np.ptp(b[keep]) > 0.1
        np.testing.assert_array_equal(np.delete(b, keep, 0), 0.0)
        if cell == "gru":
            np.testing.assert_array_equal(params.recurrent_bias, 0.0)
    # The documented runs' draws: u from fold_in(key, 1), as make_model drew it before recurrent.chrono_init.
    key, jnp = jax.random.key(3), jax.numpy
    init, _ = long_range.make_model(pipeline.override(config, chrono=100), spec, "lstm")
    b_f = jnp.log(jax.random.uniform(jax.random.fold_in(key, 1), (H,), minval=1.0, maxval=99.0))
    np.testing.assert_array_equal(init(key)["rnn"].bias, jnp.concatenate([-b_f, b_f, jnp.zeros(2 * H)]))
