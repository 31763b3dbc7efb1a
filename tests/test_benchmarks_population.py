"""Smoke test of ``benchmarks/population.py`` in its quick mode: it runs all three contenders in one
process, writes finite numbers, and the vmapped population trains each member as the sequential
loop does. No timing is asserted."""

import json
import math
import subprocess
import sys

from tests.subprocess_env import FAST_ENV, REPO


def test_quick_run_writes_finite_numbers(tmp_path):
    path = tmp_path / "sub" / "population.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.population", "--quick", "--out", str(path)],
        cwd=REPO, env=FAST_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(path.read_text())
    assert saved["sizes"]["members"] == 4 and saved["sizes"]["steps"] == 3
    for key in ("vmapped_s", "sequential_s", "torch_s", "vmapped_compile_s", "sequential_compile_s"):
        assert math.isfinite(saved[key]) and saved[key] > 0, key
    assert saved["ratio_sequential_over_vmapped"] == saved["sequential_s"] / saved["vmapped_s"]
    assert saved["ratio_torch_over_vmapped"] == saved["torch_s"] / saved["vmapped_s"]
    # the same members, trained in one program or one after another, end at the same loss
    assert saved["max_final_loss_diff_vmapped_vs_sequential"] < 1e-4
    for key in ("vmapped_final_loss_mean", "torch_final_loss_mean"):
        assert math.isfinite(saved[key])
    assert "vmapped (one program)" in out.stdout and "sequential, torch" in out.stdout


def test_quick_grid_times_every_cell_and_trains_the_same_members(tmp_path):
    path = tmp_path / "grid.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.population", "--quick", "--grid_members=2,3", "--grid_hidden=4",
         "--out", str(path)],
        cwd=REPO, env=FAST_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads(path.read_text())
    assert [(c["members"], c["hidden"]) for c in saved["cells"]] == [(2, 4), (3, 4)]
    for cell in saved["cells"]:
        assert cell["ratio_sequential_over_vmapped"] == cell["sequential_s"] / cell["vmapped_s"] > 0
        assert cell["max_final_loss_diff_vmapped_vs_sequential"] < 1e-4
    assert "| 3 | 4 |" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.population", "--quick", "--grid_members=2,x"],
        cwd=REPO, env=FAST_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode != 0 and "--grid_members must be comma-separated positive integers" in bad.stderr
