"""The main job, ``experiments.variants``: a shrunken run of all seven classic variants and of one
modern row on a small generated ``.mat`` file, parameter counts from the papers' equations, the
bidirectional infilling task, config and data errors."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from experiments import pipeline, variants
from tests.test_pipeline import FAST_ENV, REPO, write_mat

F = 88


def expected_rnn_params(name: str, H: int, C: int, k: int, K: int = 1) -> int:
    """Parameter counts from the papers' equations, independent of the library (``K``: heads)."""
    lstm = lambda f: 4 * H * (f + H + 1)  # noqa: E731
    return {
        "lstm": lstm(F),
        "peephole_lstm": lstm(F) + 3 * H,
        "cifg_lstm": 3 * H * (F + H + 1),
        "gru": 3 * H * (F + H + 1) + H,
        "conv_lstm": 4 * C * (k * 1 + k * C + 1),
        "bidirectional_lstm": 2 * lstm(F),
        "stacked_lstm": lstm(F) + lstm(H),
        "slstm": 4 * H * (F + H // K + 1),  # W (4 blocks), block-diagonal R (K heads of H/K), b
        "mlstm": (F + 1) * (4 * H + 2 * K),  # q, k, v, o from x; i, f per head from x
        "min_gru": 2 * H * (F + 1),  # z and the candidate from x only
        "min_lstm": 3 * H * (F + 1),  # f, i and the candidate from x only
    }[name]


def readout_features(name: str, H: int, C: int) -> int:
    return {"conv_lstm": F * C, "bidirectional_lstm": 2 * H}.get(name, H)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """All seven variants from the command line with the shrunken config (compiled at XLA level 0)."""
    tmp = tmp_path_factory.mktemp("variants")
    mat = write_mat(tmp / "tiny.mat")
    workdir = tmp / "out"
    args = ["--quick", f"--data={mat}", f"--workdir={workdir}"]
    done = subprocess.run(
        [sys.executable, "-m", "experiments.variants", *args], cwd=REPO, env=FAST_ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = dataclasses.replace(variants.quick_config(), data=str(mat), workdir=str(workdir))
    return done.stdout, config


def test_quick_run_trains_all_seven_variants_and_writes_the_summaries(quick_run):
    stdout, config = quick_run
    with open(os.path.join(config.workdir, "summary.json")) as f:
        summary = json.load(f)
    rows = summary["rows"]
    assert summary["config"] == dataclasses.asdict(config)
    assert [r["variant"] for r in rows] == variants.FAMILIES["classic"] and len(rows) == 7
    for row in rows:
        name = row["variant"]
        assert set(row) == set(variants.COLUMNS)
        H, C, k = config.hidden, config.conv_channels, config.conv_kernel
        assert row["rnn_params"] == expected_rnn_params(name, H, C, k), name
        assert row["params"] == row["rnn_params"] + readout_features(name, H, C) * F + F, name
        params = variants.make_task(config, name).init(jax.random.key(0))
        assert row["params"] == recurrent.count_params(params)
        assert row["compile_s"] > 0 and row["ms_per_step"] > 0
        for key in ("train_loss", "valid_nll", "test_nll"):
            assert np.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["best_step"] in (2, 4)
        assert row["cell_state"] == ("no" if name == "gru" else "yes")
        assert row["task"] == ("infilling*" if name == "bidirectional_lstm" else "next step")
        # The table's numbers are the pipeline's own: the best checkpoint's.
        with open(os.path.join(config.workdir, name, "result.json")) as f:
            result = json.load(f)
        assert row["valid_nll"] == pytest.approx(result["best_valid"])
        assert row["test_nll"] == pytest.approx(result["best_test"])
        curves = summary["curves"][name]
        assert [s for s, _ in curves["train"]] == [2, 4] and [s for s, _ in curves["valid"]] == [2, 4]

    with open(os.path.join(config.workdir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(config.workdir, "summary.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == variants.FAMILIES["classic"]
    assert tuple(csv_rows[0]) == variants.COLUMNS
    with open(os.path.join(config.workdir, "summary.md")) as f:
        table = f.read().strip()
    assert table == variants.format_table(rows)
    assert len(table.splitlines()) == 2 + 7 and "ms/step" in table and "valid NLL" in table
    assert table in stdout


def test_quick_modern_row_trains_and_fills_its_columns(tmp_path):
    """``--family=modern``: one row (the mLSTM, two heads) trained in process; the columns of every modern row."""
    config = variants.override(
        variants.quick_config(), data=write_mat(tmp_path / "tiny.mat"), workdir=str(tmp_path / "out"), family="modern"
    )
    H, K = config.hidden, config.heads
    assert variants.selected_variants(config) == ["slstm", "mlstm", "min_gru", "min_lstm"]
    for name in variants.selected_variants(config):
        params = variants.make_task(config, name).init(jax.random.key(0))
        assert recurrent.count_params(params["rnn"]) == expected_rnn_params(name, H, 0, 0, K), name
        assert recurrent.count_params(params) == expected_rnn_params(name, H, 0, 0, K) + H * F + F, name
    cell_state = {name: variants.VARIANTS[name].cell_state for name in variants.FAMILIES["modern"]}
    assert cell_state == {"slstm": True, "mlstm": True, "min_gru": False, "min_lstm": False}

    result = variants.run(variants.override(config, variants="mlstm"))
    (row,) = result["rows"]
    assert set(row) == set(variants.COLUMNS) and row["variant"] == "mlstm" and row["task"] == "next step"
    assert row["cell_state"] == "yes" and "exp i" in row["gates"]
    assert row["rnn_params"] == expected_rnn_params("mlstm", H, 0, 0, K) and row["best_step"] in (2, 4)
    for key in ("train_loss", "valid_nll", "test_nll"):
        assert np.isfinite(row[key]) and row[key] > 0, key
    with open(os.path.join(config.workdir, "summary.md")) as f:
        assert f.read().strip() == variants.format_table([row])


def test_bidirectional_infilling_never_sees_the_frame_it_predicts():
    H = 3
    layer = recurrent.bidirectional(recurrent.lstm(H))
    params = layer.init(jax.random.key(0), (F,))
    xs = (jax.random.uniform(jax.random.key(1), (1, 6, F)) < 0.2).astype(jnp.float32)
    lengths = jnp.array([6])

    def features(xs):
        return variants.infill_features(layer, H, params, xs, lengths)

    jac = jax.jacobian(features)(xs)[0, :, :, 0]  # (T-2, 2H, T, 88): d features[t-1] / d xs[s]
    assert jac.shape == (4, 2 * H, 6, F)
    for t in range(1, 5):  # frame t is predicted from features[t - 1]
        sensitivity = np.abs(np.asarray(jac[t - 1])).sum(axis=(0, 2))  # per input frame s
        assert sensitivity[t] == 0.0, t
        assert sensitivity[t - 1] > 0 and sensitivity[t + 1] > 0, t


def test_config_typo_and_bad_values_are_clear_errors(tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(SystemExit) as info:
        variants.main(["--quick", "--hiden=8", f"--workdir={tmp_path}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'hiden'" in err and "did you mean 'hidden'" in err
    for f in dataclasses.fields(variants.Config):
        assert f.name in err
    assert os.listdir(tmp_path) == ["notes.txt"]
    config = pipeline.parse_args(["--steps=7", "--variants=lstm,gru"], variants.get_config(), variants.quick_config())
    assert (config.steps, variants.selected_variants(config)) == (7, ["lstm", "gru"])
    with pytest.raises(variants.ConfigError, match="unknown variant"):
        variants.check_config(variants.override(variants.get_config(), variants="lstm,transformer"))
    with pytest.raises(variants.ConfigError, match="must be >= 1"):
        variants.check_config(variants.override(variants.get_config(), hidden=0))
    # the families: default classic; a modern row needs --family=modern or all; heads must divide hidden
    config = pipeline.parse_args(["--family=modern", "--variants=slstm,min_lstm"], variants.get_config())
    assert variants.selected_variants(config) == ["slstm", "min_lstm"]
    assert variants.selected_variants(variants.override(config, family="all", variants="all")) == list(
        variants.VARIANTS
    )
    with pytest.raises(variants.ConfigError, match="'slstm' not in --family=classic"):
        variants.check_config(variants.override(variants.get_config(), variants="lstm,slstm"))
    with pytest.raises(variants.ConfigError, match="(?s)'slstm' refuses this config.*multiple of `num_heads`"):
        variants.check_config(variants.override(variants.get_config(), family="modern", heads=3))
    with pytest.raises(variants.ConfigError, match="unknown family"):
        variants.check_config(variants.override(variants.get_config(), family="new"))
    # a modern run with the default work directory writes beside the classic table, never over it
    assert variants.family_workdir(variants.override(variants.get_config(), family="modern")).workdir == (
        "runs/variants_modern"
    )
    assert variants.family_workdir(variants.get_config()).workdir == "runs/variants"


def test_missing_data_file_fails_before_compiling(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        variants.main([f"--data={tmp_path / 'nope.mat'}", f"--workdir={tmp_path / 'out'}"])
    assert info.value.code == 2
    assert "music data file not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        variants.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(variants.Config):
        assert f"--{f.name}=" in out
    assert "--quick" in out and "bidirectional_lstm" in out
