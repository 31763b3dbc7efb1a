"""Smoke tests of ``experiments.variants`` with a shrunken config, and of its config handling."""

import csv
import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import recurrent
from experiments import variants


def expected_rnn_params(name: str, F: int, H: int, k: int) -> int:
    """Parameter counts from the papers' equations, independent of the library."""
    lstm = lambda f: 4 * H * (f + H + 1)  # noqa: E731
    Hc = H // 2
    return {
        "lstm": lstm(F),
        "peephole_lstm": lstm(F) + 3 * H,
        "cifg_lstm": 3 * H * (F + H + 1),
        "gru": 3 * H * (F + H + 1) + H,
        "conv_lstm": 4 * Hc * (k * 1 + k * Hc + 1),
        "bidirectional_lstm": 2 * lstm(F),
        "stacked_lstm": lstm(F) + lstm(H),
    }[name]


def readout_features(name: str, F: int, H: int) -> int:
    return {"conv_lstm": F * (H // 2), "bidirectional_lstm": 2 * H}.get(name, H)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One run of all seven variants from the command line with the shrunken config."""
    out = tmp_path_factory.mktemp("variants")
    return variants.main(["--quick", f"--out={out}"]), variants.override(variants.quick_config(), out=str(out))


def test_quick_run_trains_all_seven_variants(quick_run):
    result, config = quick_run
    rows = result["rows"]

    assert [r["variant"] for r in rows] == list(variants.VARIANTS)
    assert len(rows) == 7
    for row in rows:
        assert set(row) == set(variants.COLUMNS)
        name = row["variant"]
        params = variants.make_model(config, name).init(jax.random.key(0))
        assert row["rnn_params"] == recurrent.count_params(params["rnn"])
        assert row["params"] == recurrent.count_params(params)
        assert row["rnn_params"] == expected_rnn_params(name, 2, config.hidden, config.conv_kernel)
        assert row["params"] == row["rnn_params"] + readout_features(name, 2, config.hidden) + 1
        for key in ("compile_s", "ms_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0
        for key in ("final_loss", "eval_mse"):
            assert math.isfinite(row[key]) and row[key] >= 0
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert row["cell_state"] == ("no" if name == "gru" else "yes")
    assert {r["variant"]: r["gates"] for r in rows}["cifg_lstm"] == "f o (i=1-f)"

    for name, losses in result["losses"].items():
        assert losses.shape == (config.steps,), name
        assert np.isfinite(losses).all(), name

    paths = result["paths"]
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == list(variants.VARIANTS)
    assert tuple(csv_rows[0]) == variants.COLUMNS
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved["config"] == dataclasses.asdict(config)
    assert [r["params"] for r in saved["rows"]] == [r["params"] for r in rows]
    assert all(np.isfinite(v).all() and len(v) == config.steps for v in saved["losses"].values())
    with open(paths["markdown"]) as f:
        table = f.read()
    assert len(table.strip().splitlines()) == 2 + 7
    assert "| variant" in table and "ms/step" in table and "compile (s)" in table
    assert table.strip() == variants.format_table(rows)


def test_config_typo_is_a_clear_error_listing_valid_fields(capsys):
    with pytest.raises(variants.ConfigError) as info:
        variants.override(variants.get_config(), stepz=3)
    message = str(info.value)
    assert "'stepz'" in message and "did you mean 'steps'" in message
    for f in dataclasses.fields(variants.Config):
        assert f.name in message

    with pytest.raises(SystemExit) as exit_info:
        variants.main(["--quick", "--hiden=8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'hiden'" in err and "valid fields" in err and "hidden" in err


def test_command_line_overrides_and_bad_values():
    config = variants.parse_args(["--steps=7", "--learning_rate", "0.5", "--variants=lstm,gru"])
    assert (config.steps, config.learning_rate, config.variants) == (7, 0.5, "lstm,gru")
    assert variants.selected_variants(config) == ["lstm", "gru"]
    assert variants.parse_args(["--quick", "--steps=9"]) == dataclasses.replace(variants.quick_config(), steps=9)
    with pytest.raises(variants.ConfigError, match="expects a value of type int"):
        variants.parse_args(["--steps=many"])
    with pytest.raises(variants.ConfigError, match="must be >= 1"):
        variants.parse_args(["--hidden=0"])
    with pytest.raises(variants.ConfigError, match="unknown variant"):
        variants.parse_args(["--variants=lstm,transformer"])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        variants.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(variants.Config):
        assert f"--{f.name}=" in out
    assert "--quick" in out


def test_adding_batch_is_the_adding_problem():
    xs, y = variants.adding_batch(jax.random.key(3), 256, 11)
    xs, y = np.asarray(xs), np.asarray(y)
    values, marks = xs[..., 0], xs[..., 1]
    assert set(np.unique(marks)) == {0.0, 1.0}
    assert (marks[:, :5].sum(axis=1) == 1).all() and (marks[:, 5:].sum(axis=1) == 1).all()
    assert ((values >= 0) & (values < 1)).all()
    np.testing.assert_allclose(y, (values * marks).sum(axis=1), rtol=1e-6)
    again, _ = variants.adding_batch(jax.random.key(3), 256, 11)
    np.testing.assert_array_equal(xs, np.asarray(again))


def test_train_is_pure_in_its_key_and_vmaps_over_a_population(quick_run):
    result, config = quick_run
    train = variants.make_train(config, "gru")
    keys = jax.random.split(jax.random.key(1), 3).at[0].set(jax.random.key(config.seed))
    population = jax.jit(jax.vmap(train)).lower(keys).compile(variants.compile_options(config))
    params, losses = population(keys)
    assert losses.shape == (3, config.steps)
    assert jax.tree.leaves(params)[0].shape[0] == 3
    # Member 0 has the run's seed: the same losses as the single run in `quick_run`.
    np.testing.assert_allclose(losses[0], result["losses"]["gru"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(losses[1], losses[2])


def test_an_lstm_learns_a_short_adding_problem():
    # Real learning, not just running: well below the predict-the-mean baseline of 1/6.
    config = variants.override(
        variants.get_config(), steps=150, batch_size=32, seq_len=8, hidden=16, eval_size=256, learning_rate=2e-2
    )
    key = jax.random.key(0)
    train = jax.jit(variants.make_train(config, "lstm")).lower(key).compile({"xla_backend_optimization_level": 0})
    params, losses = train(key)
    metrics = variants.make_eval(config, "lstm")(params)
    assert float(metrics["eval_mse"]) < variants.BASELINE_MSE / 5
