"""The Odyssey (Greff et al. 2017) on top of the search: the analysis (Welch t-tests against V, the
verdicts on the paper's conclusions, fANOVA importance) on a constructed table, and a quick run."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd

from experiments import odyssey
from tests.subprocess_env import FAST_ENV, REPO


def constructed_frame(seed=0, n=24):
    """The test NLL is driven by the learning rate; NFG and NOAF are worse by 4, the others equal V."""
    rng = np.random.default_rng(seed)
    draws = pd.DataFrame({
        "config": range(n), "learning_rate": np.exp(rng.uniform(np.log(1e-6), np.log(1e-2), n)),
        "momentum": 1 - np.exp(rng.uniform(np.log(0.01), 0, n)), "hidden": rng.choice([36, 112], n),
        "input_noise": rng.uniform(0, 1, n),
    })  # fmt: skip
    rows = []
    for v in odyssey.VARIANTS:
        part = draws.copy()
        part["variant"] = v
        part["valid"] = 12 + 1.5 * np.log10(part["learning_rate"]) + rng.normal(0, 0.3, n) + 4 * (v in ("NFG", "NOAF"))
        part["test"] = part["valid"] + rng.normal(0, 0.05, n)
        rows.append(part)
    frame = pd.concat(rows, ignore_index=True)
    frame["member"] = range(len(frame))
    return frame


def test_analysis_recovers_the_planted_conclusions():
    analysis = odyssey.analyse(constructed_frame())
    table = analysis["variants"]
    assert list(table) == list(odyssey.VARIANTS) and table["V"]["vs_V_all"] is None
    assert table["NFG"]["vs_V_all"]["t"] > 0 and table["NFG"]["vs_V_all"]["p"] < 0.05
    assert table["CIFG"]["vs_V_all"]["p"] > 0.05
    verdicts = analysis["verdicts"]
    assert all(v["holds"] for v in verdicts.values()), verdicts
    assert next(iter(analysis["importance"])) == "learning_rate" and analysis["importance"]["learning_rate"] > 0.5
    # a variant made better than V is caught
    frame = constructed_frame()
    frame.loc[frame["variant"] == "NP", "test"] -= 2
    verdicts = odyssey.analyse(frame)["verdicts"]
    assert verdicts["no variant significantly beats V"] == {"holds": False, "significantly_better": ["NP"]}
    assert "| NFG | 24 | 0 |" in odyssey.markdown(analysis, odyssey.get_config())


def test_welch_matches_scipy_and_skips_diverged_trials():
    from scipy import stats

    a, b = np.array([1.0, 2.0, 3.0, np.nan, np.inf]), np.array([2.0, 4.0, 6.0, 8.0])
    result = odyssey.welch(a, b)
    expected = stats.ttest_ind([1.0, 2.0, 3.0], b, equal_var=False)
    assert result["n"] == 3 and np.isclose(result["t"], expected.statistic) and np.isclose(result["p"], expected.pvalue)


def test_quick_run_writes_the_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.odyssey", "--quick", f"--workdir={tmp_path}"],
        cwd=REPO, env=FAST_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "odyssey.json").read_text())
    assert list(report["variants"]) == ["V", "NFG", "NP"]
    assert set(report["verdicts"]) == {
        "no variant significantly beats V", "CIFG and NP are not significantly worse",
        "NFG and NOAF are significantly worse", "learning rate is by far the most important",
    }  # fmt: skip
    assert set(report["importance"]) == {"learning_rate", "momentum", "input_noise"}
    frame = pd.read_json(tmp_path / "members.jsonl", lines=True)
    assert len(frame) == 12 and frame["learning_rate"].between(1e-6, 1e-2).all()
    for name in ("odyssey.png", "variants.png", "odyssey.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| the paper's conclusion | here |" in out.stdout
