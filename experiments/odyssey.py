r"""Greff et al. 2017, "LSTM: A Search Space Odyssey", on the JSB chorales, as one vmapped search.

Run ``python -m experiments.odyssey`` (``--help`` lists the fields; every field of
:mod:`experiments.search` applies). The protocol of the paper's music experiment:

- the nine variants of :data:`recurrent.GREFF_VARIANTS` (V, NIG, NFG, NOG, NIAF, NOAF, NP, CIFG,
  FGR), one hidden layer, sigmoid outputs, next-step NLL of the piano rolls;
- random search, the same draws for every variant, over a log-uniform learning rate in
  ``[1e-6, 1e-2]``, momentum ``1 - u`` with ``u`` log-uniform in ``[0.01, 1]``, hidden size
  log-uniform in ``[20, 200]`` (snapped to ``--hidden_buckets`` sizes, see :mod:`experiments.search`),
  and input-noise std uniform in ``[0, 1]``; SGD with Nesterov momentum, no clipping;
- per variant: box plots of the test NLL, a Welch t-test (``scipy.stats.ttest_ind(equal_var=False)``)
  against V over all trials and over the best quarter by validation NLL; the hyperparameters'
  importance by functional ANOVA (optuna), pooled over the variants.

It writes, besides the search's tables and plots, ``odyssey.json`` (per-variant statistics, tests,
importance, the verdicts on the paper's conclusions), ``odyssey.md`` (the same as tables) and
``odyssey.png`` (box plots of the test NLL, significant differences from V marked).

Data: ``--data`` as :mod:`experiments.music` (``jsb`` with ``--data_dir``, a ``.mat`` path, or the
music21 chorales by default when ``JSB_Chorales.mat`` is not at hand).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

import recurrent
from experiments import errors, pipeline, search

VARIANTS = tuple(recurrent.GREFF_VARIANTS)
ALPHA = 0.05


def get_config() -> search.Config:
    """The budget protocol we ran on a shared 2-core CPU (see experiments/README.md): 12 draws x 9
    variants, 200 steps of batch 8, crops of 32 steps. Raise ``--configs`` and ``--steps`` for the
    paper's scale (200 trials per variant, trained to convergence)."""
    return search.Config(
        steps=200,
        batch_size=8,
        window=32,
        eval_every=50,
        eval_batch=40,
        optimizer="sgd",
        nesterov=True,
        sampler="random",
        configs=12,
        variants=",".join(VARIANTS),
        hidden="log:20:200",
        hidden_buckets=2,
        learning_rate_range="log:1e-6:1e-2",
        momentum_range="1-log:0.01:1",
        input_noise_range="0:1",
        clip_norm_range="0",
        weight_decay_range="0",
        dropout_range="0",
        zoneout_range="0",
        init_scale_range="1",
        forget_bias_range="1",
        halving="",
        workdir="runs/odyssey",
        progress=False,
    )


def quick_config() -> search.Config:
    """A shrunken config for smoke tests: three variants on synthetic data."""
    return dataclasses.replace(
        get_config(),
        data="synthetic",
        steps=2,
        batch_size=4,
        window=8,
        eval_every=2,
        eval_batch=4,
        configs=4,
        variants="V,NP,NFG",
        hidden="6",
        hidden_buckets=1,
    )


def welch(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Welch's t-test of ``a`` against ``b`` (finite values only); ``t < 0``: ``a`` has the lower NLL."""
    from scipy import stats

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"t": math.nan, "p": math.nan, "n": int(len(a))}
    result = stats.ttest_ind(a, b, equal_var=False)
    return {"t": float(result.statistic), "p": float(result.pvalue), "n": int(len(a))}


def analyse(frame, seed: int = 0) -> dict[str, Any]:
    """Per-variant statistics of the test NLL, Welch t-tests against V, fANOVA importance, verdicts."""
    variants = [v for v in VARIANTS if v in set(frame["variant"])]
    top = {}  # the best quarter of each variant's trials by validation NLL
    for v in variants:
        rows = frame[frame["variant"] == v].sort_values("valid", na_position="last")
        top[v] = rows.head(max(2, math.ceil(len(rows) / 4)))
    base_all = frame.loc[frame["variant"] == "V", "test"].to_numpy(float)
    base_top = top["V"]["test"].to_numpy(float) if "V" in top else np.array([])
    table = {}
    for v in variants:
        test = frame.loc[frame["variant"] == v, "test"].to_numpy(float)
        finite = test[np.isfinite(test)]
        table[v] = {
            "trials": int(len(test)),
            "diverged": int((~np.isfinite(test)).sum()),
            "median": float(np.median(finite)) if len(finite) else math.nan,
            "mean": float(np.mean(finite)) if len(finite) else math.nan,
            "best": float(np.min(finite)) if len(finite) else math.nan,
            "top_quarter_mean": float(np.nanmean(top[v]["test"])),
            "vs_V_all": welch(test, base_all) if v != "V" else None,
            "vs_V_top_quarter": welch(top[v]["test"].to_numpy(float), base_top) if v != "V" else None,
        }
    varied = {"learning_rate": "log", "momentum": "1-log", "hidden": "log", "input_noise": "uniform"}
    varied = {k: s for k, s in varied.items() if frame[k].nunique() > 1}
    importance = search.fanova_importance(frame, varied, "test", seed=seed)
    per_variant = {
        v: search.fanova_importance(frame[frame["variant"] == v].reset_index(drop=True), varied, "test", seed=seed)
        for v in variants
    }
    return {
        "variants": table,
        "importance": importance,
        "importance_per_variant": per_variant,
        "verdicts": verdicts(table, importance),
    }


def _significant(test: dict | None, worse: bool) -> bool:
    if not test or not np.isfinite(test["p"]):
        return False
    return test["p"] < ALPHA and (test["t"] > 0 if worse else test["t"] < 0)


def verdicts(table: dict[str, dict], importance: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The paper's four conclusions, each checked on all trials (Welch, p < 0.05)."""
    tests = {v: row["vs_V_all"] for v, row in table.items() if v != "V"}
    better = [v for v, t in tests.items() if _significant(t, worse=False)]
    out = {
        "no variant significantly beats V": {"holds": not better, "significantly_better": better},
        "CIFG and NP are not significantly worse": {
            "holds": all(not _significant(tests.get(v), worse=True) for v in ("CIFG", "NP") if v in tests),
            "p": {v: tests[v]["p"] for v in ("CIFG", "NP") if v in tests},
        },
        "NFG and NOAF are significantly worse": {
            "holds": all(_significant(tests.get(v), worse=True) for v in ("NFG", "NOAF") if v in tests),
            "p": {v: tests[v]["p"] for v in ("NFG", "NOAF") if v in tests},
        },
    }
    ranked = sorted(importance.items(), key=lambda kv: -kv[1])
    out["learning rate is by far the most important"] = {
        "holds": bool(ranked)
        and ranked[0][0] == "learning_rate"
        and (len(ranked) < 2 or ranked[0][1] > 2 * ranked[1][1]),
        "ranking": ranked,
    }
    return out


def markdown(analysis: dict[str, Any], config: search.Config, seconds: float | None = None) -> str:
    lines = ["| variant | trials | diverged | median test NLL | mean | best | mean of best quarter | "
             "Welch t vs V (all) | p | t (best quarter) | p |", "| --- " * 11 + "|"]  # fmt: skip
    for v, row in analysis["variants"].items():
        a, q = row["vs_V_all"] or {}, row["vs_V_top_quarter"] or {}
        cells = [v, row["trials"], row["diverged"]] + [f"{row[k]:.3f}" for k in ("median", "mean", "best")]
        cells += [f"{row['top_quarter_mean']:.3f}"]
        cells += [f"{a.get('t', math.nan):+.2f}", f"{a.get('p', math.nan):.3g}"] if a else ["", ""]
        cells += [f"{q.get('t', math.nan):+.2f}", f"{q.get('p', math.nan):.3g}"] if q else ["", ""]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "fANOVA importance of the test NLL (all variants pooled): "
              + ", ".join(f"{k} {v:.2f}" for k, v in analysis["importance"].items())]  # fmt: skip
    lines += ["", "| the paper's conclusion | here |", "| --- | --- |"]
    for claim, verdict in analysis["verdicts"].items():
        detail = {k: v for k, v in verdict.items() if k != "holds"}
        lines.append(f"| {claim} | {'holds' if verdict['holds'] else 'does not hold'} ({json.dumps(detail)}) |")
    if seconds is not None:
        lines += ["", f"wall time {seconds / 60:.1f} min"]
    return "\n".join(lines)


def plot(workdir: str, frame, analysis: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(analysis["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (title, subset) in zip(axes, (("all trials", None), ("best quarter by validation", "top"))):
        data = []
        for v in variants:
            rows = frame[frame["variant"] == v]
            if subset:
                rows = rows.sort_values("valid", na_position="last").head(max(2, math.ceil(len(rows) / 4)))
            data.append(rows["test"].to_numpy(float)[np.isfinite(rows["test"].to_numpy(float))])
        box = ax.boxplot(data, tick_labels=variants, patch_artist=True)
        key = "vs_V_top_quarter" if subset else "vs_V_all"
        for patch, v in zip(box["boxes"], variants):
            test = analysis["variants"][v][key]
            colour = "white"
            if _significant(test, worse=True):
                colour = "tab:red"
            elif _significant(test, worse=False):
                colour = "tab:green"
            patch.set_facecolor(colour)
        limits = search._clip_limits(np.concatenate(data)) if any(len(d) for d in data) else None
        if limits:
            ax.set_ylim(*limits)
        ax.set(title=f"test NLL, {title} (red/green: significantly worse/better than V)", ylabel="test NLL")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "odyssey.png"), dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import time

    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.odyssey", "Greff et al. 2017's variant study as one search."
    )
    log = functools.partial(print, flush=True)
    with errors.report():
        search.check_config(config)
        pipeline.prepare_workdir(config)
        data = search.load_data(config)
        t0 = time.perf_counter()
        result = search.run_search(config, data, log=log)
    seconds = time.perf_counter() - t0
    frame = result["members"]
    analysis = analyse(frame, seed=config.seed)
    with open(os.path.join(config.workdir, "odyssey.json"), "w") as f:
        json.dump({**analysis, "seconds": seconds}, f, indent=1)
    text = markdown(analysis, config, seconds)
    with open(os.path.join(config.workdir, "odyssey.md"), "w") as f:
        f.write(text + "\n")
    if config.plots:
        plot(config.workdir, frame, analysis)
    log(text)
    return {**result, "analysis": analysis}


if __name__ == "__main__":
    main()
