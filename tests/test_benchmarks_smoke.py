"""Smoke tests of the benchmarks in their quick modes: they run, agree with their peers and
write finite numbers, whose ratios are those of the raw samples. No timing is asserted."""

import json
import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from benchmarks import rnn_vs_flax


def test_quick_run_writes_finite_numbers(tmp_path, capsys):
    path = tmp_path / "sub" / "rnn_vs_flax.json"
    # three repeats: their median is none of their mean, first or last sample
    result = rnn_vs_flax.main(["--quick", "--repeats", "3", "--out", str(path)])
    saved = json.loads(path.read_text())

    assert saved["shape"] == rnn_vs_flax.QUICK
    assert saved["params"]["ours"] == saved["params"]["flax"] == 4 * 4 * (3 + 4 + 1)
    assert saved["max_abs_diff"] < 1e-5
    assert [r["workload"] for r in saved["rows"]] == ["forward", "forward+backward"]
    for row in saved["rows"]:
        for impl in rnn_vs_flax.IMPLS:
            for key in (f"{impl}_ms", f"{impl}_compile_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (row["workload"], key)
            samples = row[f"{impl}_samples_ms"]
            assert len(samples) == saved["repeats"] and all(math.isfinite(t) and t > 0 for t in samples)
        # The times and ratios are the medians of the raw samples, recomputed here from them.
        median = {impl: statistics.median(row[f"{impl}_samples_ms"]) for impl in rnn_vs_flax.IMPLS}
        for impl in ("ours", "flax", "ours_step"):
            assert row[f"{impl}_ms"] == pytest.approx(median[impl], rel=1e-9), (row["workload"], impl)
        assert row["ratio_ours_over_flax"] == pytest.approx(median["ours"] / median["flax"], rel=1e-9)
        assert row["ratio_ours_step_over_flax"] == pytest.approx(median["ours_step"] / median["flax"], rel=1e-9)
    assert result["rows"] == saved["rows"]

    out = capsys.readouterr().out
    assert "ours/flax" in out and "forward+backward" in out


def test_converted_parameters_give_flax_the_same_function():
    # The benchmark is only fair if both sides compute the same thing; check it directly too.
    fns = rnn_vs_flax.make_functions(6)
    params = recurrent.lstm(6).init(jax.random.key(1), (5,))
    xs = jax.random.normal(jax.random.key(2), (3, 7, 5))
    ours = fns["ours", "forward"](params, xs)
    theirs = fns["flax", "forward"](rnn_vs_flax.to_flax(params), xs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    stepwise = fns["ours_step", "forward"](params, xs)
    np.testing.assert_allclose(ours, stepwise, rtol=1e-5, atol=1e-6)
    variables = rnn_vs_flax.to_flax(params)
    back = rnn_vs_flax.from_flax(variables)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_suite_quick_run_writes_json_and_plot(tmp_path):
    # The suite's smoke test (CI): tiny shapes, one case with every peer, the remat memory
    # figure; it must run and write finite numbers. No timing is asserted.
    from benchmarks import suite

    result = suite.main(["--quick", "--cases", "lstm", "--extras", "remat", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert (tmp_path / "suite.png").stat().st_size > 0
    (case,) = saved["cases"]
    contenders = {row["contender"] for row in case["rows"]}
    assert {"ours", "ours_hoisted"} <= contenders
    assert contenders | set(case["skipped"]) >= {"ours", "torch", "flax", "keras", "ours_native", "ours_native_bf16"}
    from recurrent import native

    if native.reason() is None:  # built here: timed, never a fallback to the scan
        assert {"ours_native", "ours_native_bf16"} <= contenders
    else:  # skipped, saying why
        assert case["skipped"]["ours_native"] == f"RuntimeError: {native.reason()}"[:200]
    if "torch" in contenders:
        torch_row = next(row for row in case["rows"] if row["contender"] == "torch")
        assert torch_row["it_over_torch_fwd"] == torch_row["it_over_torch_fwdbwd"] == 1.0
    for row in case["rows"]:
        assert math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0
        assert math.isfinite(row["fwdbwd_ms"]) and row["fwdbwd_ms"] > 0
    assert set(saved["remat_memory_mb"]) == {"remat=False", "remat=True"}
    assert result["cases"][0]["rows"] == case["rows"]
    with pytest.raises(SystemExit):  # an unknown case ends the run before any timing
        suite.main(["--cases", "lstm,nope", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_suite_runs_only_the_contenders_asked_for(tmp_path, capsys):
    from benchmarks import suite

    args = ["--quick", "--cases", "lstm,cifg", "--contenders", "ours,torch", "--extras", "none"]
    result = suite.main([*args, "--out", str(tmp_path)])
    lstm, cifg = result["cases"]
    assert {row["contender"] for row in lstm["rows"]} | set(lstm["skipped"]) == {"ours", "torch"}
    assert {row["contender"] for row in cifg["rows"]} == {"ours"}
    assert cifg["skipped"] == {"torch": "not a contender of this case"}  # PyTorch has no CIFG LSTM
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a contender no chosen case has ends the run before any timing
        suite.main(["--cases", "cifg", "--contenders", "ours,flax", "--out", str(tmp_path / "never")])
    assert "--contenders: flax not among the contenders of cifg" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_interleaved_timer_alternates_the_order_and_keeps_every_sample():
    from benchmarks._common import interleaved

    order = []
    calls = {(c, w): (lambda c=c, w=w: order.append((c, w))) for c in ("a", "b", "c") for w in ("fwd", "bwd")}
    del calls["b", "bwd"]  # a contender may lack a workload
    samples = interleaved(calls, repeats=2, number={k: 2 if k[0] == "a" else 1 for k in calls})
    assert {k: len(v) for k, v in samples.items()} == {k: 2 for k in calls}
    assert all(ms >= 0 for v in samples.values() for ms in v)
    first = [("a", "fwd")] * 2 + [("b", "fwd"), ("c", "fwd")] + [("a", "bwd")] * 2 + [("c", "bwd")]
    second = [("c", "fwd"), ("b", "fwd")] + [("a", "fwd")] * 2 + [("c", "bwd")] + [("a", "bwd")] * 2
    assert order == first + second


def test_techniques_and_bidirectional_ab_quick_runs():
    from benchmarks import bidirectional_ab, techniques

    result = techniques.main(["--quick"])
    names = {r["technique"] for r in result["rows"]}
    assert {"hoisted", "fused", "vjp", "bf16", "bf16_vjp", "bf16_product", "autodiff_pointwise", "flax"} <= names
    assert "autodiff_kernel" in names
    assert all(r["ms"] > 0 and math.isfinite(r["ratio_to_hoisted"]) for r in result["rows"])
    assert all(r["temp_mb"] is None or r["temp_mb"] >= 0 for r in result["rows"])
    ab = bidirectional_ab.main(["--repeats", "2"], shape=(2, 5, 3, 4))
    assert all(v["one_scan_ms"] > 0 and v["two_scans_ms"] > 0 for v in ab.values())


def test_kernel_ab_quick_runs_and_restores_the_library():
    from benchmarks import kernel_ab
    from benchmarks._common import autodiff_kernel_matmul
    from recurrent import _core

    library = _core._kernel_matmul
    with autodiff_kernel_matmul():
        assert _core._kernel_matmul is not library
    assert _core._kernel_matmul is library
    result = kernel_ab.main(["--quick", "--repeats", "1", "--cases", "gru,bidirectional"])
    assert [r["case"] for r in result["rows"]] == ["gru", "bidirectional"]
    times = [r[k] for r in result["rows"] for k in r if k.endswith(("_fwd_ms", "_fwdbwd_ms"))]
    assert len(times) == 8 and all(t > 0 and math.isfinite(t) for t in times)
    assert _core._kernel_matmul is library
    with pytest.raises(SystemExit):
        kernel_ab.main(["--cases", "gru,nope"])


def test_unroll_ab_quick_runs():
    from benchmarks import unroll_ab

    result = unroll_ab.main(["--quick", "--repeats", "1", "--cases", "lstm,convlstm", "--unrolls", "1,2"])
    keys = {(r["case"], r["implementation"], r["unroll"]) for r in result["rows"]}
    assert keys == {(c, i, u) for c, i in (("lstm", "scan"), ("lstm", "vjp"), ("convlstm", "scan")) for u in (1, 2)}
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["compile_s"] > 0 for r in result["rows"])
    # each ratio is the baseline row's time (same case and implementation, unroll 1) over this row's
    base = {(r["case"], r["implementation"]): r for r in result["rows"] if r["unroll"] == 1}
    for r in result["rows"]:
        b = base[r["case"], r["implementation"]]
        assert r["base_over_this_fwd"] == pytest.approx(b["fwd_ms"] / r["fwd_ms"], rel=1e-9), r
        assert r["base_over_this_fwdbwd"] == pytest.approx(b["fwdbwd_ms"] / r["fwdbwd_ms"], rel=1e-9), r
    with pytest.raises(SystemExit):
        unroll_ab.main(["--cases", "lstm,nope"])


def test_xla_cpu_effects_quick_run_writes_finite_numbers(tmp_path):
    from benchmarks import xla_cpu_effects

    path = tmp_path / "effects.json"
    result = xla_cpu_effects.main(["--quick", "--work", "0,2", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert saved["shape"] == result["shape"]
    assert len(saved["gate_slices_us_per_step"]) == 2
    assert [r["kernels_between"] for r in saved["matmul_after_work"]] == [0, 2]
    numbers = [*saved["gate_slices_us_per_step"].values(), *saved["gflops"].values(), saved["gate_slices_ratio"]]
    numbers += [r[k] for r in saved["matmul_after_work"] for k in ("step_us", "work_us")]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert set(saved["forward_floor_ms"]) == {"lstm", "gru"}
    for row in saved["forward_floor_ms"].values():
        assert {"recurrence_alone", "library"} <= set(row)
        assert all(math.isfinite(t) and t > 0 for t in row.values())
    with pytest.raises(SystemExit):
        xla_cpu_effects.main(["--quick", "--work", "1,x"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_floor_is_the_cells_recurrence_without_its_input(kind):
    # The floor times the layer's own work minus the input projection: with a zero input kernel
    # and bias, the library's cell must give the floor's outputs step for step.
    from benchmarks import xla_cpu_effects

    B, H, T = 3, 5, 4
    run, (U,) = xla_cpu_effects.forward_floor(kind, B, H, T)
    cell = {"lstm": recurrent.lstm, "gru": recurrent.gru}[kind](H)
    params = cell.init(jax.random.key(0), (2,))
    params = jax.tree_util.tree_map(jnp.zeros_like, params)._replace(recurrent_kernel=U)
    h0 = jax.random.normal(jax.random.key(4), (B, H))  # the floor's initial state
    carry = type(cell.initial_carry(params, (B, 2)))(h0, h0) if kind == "lstm" else h0
    ys = []
    for _ in range(T):
        carry, y = cell.step(params, carry, jnp.zeros((B, 2)))
        ys.append(y)
    np.testing.assert_allclose(jax.jit(run)(U), jnp.stack(ys), rtol=1e-5, atol=1e-6)


def test_allocator_ab_quick_run_compares_both_settings_in_children(tmp_path):
    from benchmarks import allocator_ab

    path = tmp_path / "alloc.json"
    result = allocator_ab.main(["--quick", "--cases", "gru", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert saved["cases"].keys() == {"gru"} and saved["tuned_environment"] == allocator_ab.TUNED
    ms = saved["cases"]["gru"]["ms"]
    assert set(ms) == set(allocator_ab.SETTINGS)
    assert {"ours/fwdbwd", "ours_vjp/fwdbwd", "ours/fwdbwd_page_faults"} <= set(ms["tuned"])
    assert all(math.isfinite(t) and t >= 0 for setting in ms.values() for t in setting.values())
    assert all(ms[s]["ours/fwdbwd"] > 0 for s in ms)
    assert result["cases"]["gru"]["ms"] == ms
    with pytest.raises(SystemExit):  # an unknown case ends the run before any child starts
        allocator_ab.main(["--cases", "gru,nope"])


def test_xla_cpu_effects_compares_equal_computations():
    # The gate-slice figure is only a layout effect if both layouts compute the same numbers.
    from benchmarks import xla_cpu_effects

    (sliced, a), (separate, b) = xla_cpu_effects.gate_slices(3, 5, 4).values()
    for x, y in zip(jax.jit(sliced)(*a), jax.jit(separate)(*b)):
        np.testing.assert_array_equal(x, y)
    runs = xla_cpu_effects.matmul_after_work(3, 5, 4, [0, 2])
    assert set(runs) == {(0, True), (0, False), (2, True), (2, False)}
    for fn, args in runs.values():
        assert jax.jit(fn)(*args).shape == (3, 5)


def test_suite_modern_cases_quick_run_against_the_official_code(tmp_path):
    # sLSTM, mLSTM, minGRU and minLSTM against their official PyTorch code in one quick run: every
    # official contender runs (the test dependencies install them), computes our outputs on the same
    # weights, and every ratio is that of the medians of the run's own samples.
    from benchmarks import suite

    names = ",".join(suite.MODERN)
    result = suite.main(["--quick", "--cases", names, "--extras", "none", "--repeats", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert [c["case"] for c in saved["cases"]] == list(suite.MODERN)
    assert {"xlstm", "mlstm_kernels", "minGRU-pytorch"} <= set(saved["versions"])
    for case in saved["cases"]:
        kind = case["kind"]
        assert case["skipped"] == {}, case["skipped"]
        assert set(case["absent"]) == {"flax", "keras"}
        rows = {r["contender"]: r for r in case["rows"]}
        official = {label: ours for (k, label), ours in suite.PAIRS.items() if k == kind and label in rows}
        at_all_cores = {label for (k, label) in suite.PAIRS if k == kind and not label.endswith("_1thread")}
        assert at_all_cores and at_all_cores | set(official.values()) <= set(rows)
        median = {
            (label, w): statistics.median(r[f"samples_{w}_ms"]) for label, r in rows.items() for w in ("fwd", "fwdbwd")
        }
        for label, r in rows.items():
            # the same unit of work on the same weights: the outputs agree before anything is timed
            assert r["max_abs_diff_to_ours"] < 1e-4, (kind, label, r["max_abs_diff_to_ours"])
            for w in ("fwd", "fwdbwd"):
                samples = r[f"samples_{w}_ms"]
                assert len(samples) == 3 and all(math.isfinite(t) and t > 0 for t in samples)
                assert r[f"{w}_ms"] == pytest.approx(median[label, w], rel=1e-9)
                assert r[f"ours_over_it_{w}"] == pytest.approx(median["ours", w] / median[label, w], rel=1e-9)
            if label in official:  # the official form against ours that computes it the same way
                assert r["pair"] == official[label]
                for w in ("fwd", "fwdbwd"):
                    expected = median[official[label], w] / median[label, w]
                    assert r[f"pair_over_it_{w}"] == pytest.approx(expected, rel=1e-9)
            else:
                assert "pair" not in r
    assert [c["rows"] for c in result["cases"]] == [c["rows"] for c in saved["cases"]]


def test_parallel_time_quick_run_writes_medians_ratios_and_crossovers(tmp_path, capsys):
    from benchmarks import parallel_time

    path = tmp_path / "pt.json"
    result = parallel_time.main(
        ["--quick", "--cells", "min_gru", "--lengths", "2,4", "--repeats", "3", "--out", str(path)]
    )
    saved = json.loads(path.read_text())
    assert (tmp_path / "pt.png").stat().st_size > 0
    assert saved["lengths"] == [2, 4] and saved["cells"] == ["min_gru"] and saved["shape"] == parallel_time.QUICK_SHAPE
    keys = {(r["form"], r["workload"], r["T"]) for r in saved["rows"]}
    assert keys == {(f, w, T) for f in ("scan", "parallel") for w in ("fwd", "fwdbwd") for T in saved["lengths"]}
    rows = {(r["form"], r["workload"], r["T"]): r for r in saved["rows"]}
    for (form, workload, T), r in rows.items():
        assert "skipped" not in r and r["memory_mb"] > 0 and r["compile_s"] > 0
        assert len(r["samples_ms"]) == 3 and all(math.isfinite(t) and t > 0 for t in r["samples_ms"])
        assert r["median_ms"] == pytest.approx(statistics.median(r["samples_ms"]), rel=1e-9)
        assert r["best_ms"] == min(r["samples_ms"])
        if form == "parallel":
            scan = rows["scan", workload, T]
            assert r["scan_over_this"] == pytest.approx(scan["median_ms"] / r["median_ms"], rel=1e-9)
        else:
            assert "scan_over_this" not in r
    # the crossover, recomputed from the medians: the first T from which parallel stays faster
    for workload in ("fwd", "fwdbwd"):
        faster = [
            rows["parallel", workload, T]["median_ms"] < rows["scan", workload, T]["median_ms"]
            for T in saved["lengths"]
        ]
        first = next((T for i, T in enumerate(saved["lengths"]) if all(faster[i:])), None)
        assert saved["crossover"][f"min_gru/parallel/{workload}"]["from"] == first
    assert result["crossover"] == saved["crossover"]
    out = capsys.readouterr().out
    assert "min_gru parallel" in out and "crossover" in out
    with pytest.raises(SystemExit):
        parallel_time.main(["--cells", "min_gru,nope"])
    with pytest.raises(SystemExit):
        parallel_time.main(["--lengths", "128,x"])


def _rows(medians):
    """Rows of parallel_time for min_gru from ``{(form, T): median ms or None (skipped)}``."""
    rows = []
    for (form, T), ms in medians.items():
        row = {"cell": "min_gru", "form": form, "T": T, "workload": "fwd", "memory_mb": 1.0, "compile_s": 0.1}
        rows.append({**row, "skipped": "memory"} if ms is None else {**row, "median_ms": ms, "best_ms": ms})
    return rows


@pytest.mark.parametrize(
    "parallel, expected, longest",
    [
        ({8: 2.0, 16: 0.5, 32: 0.5}, 16, 32),  # faster from 16 on
        ({8: 0.5, 16: 2.0, 32: 0.5}, 32, 32),  # faster at 8, slower at 16: the crossover is 32
        ({8: 2.0, 16: 2.0, 32: 2.0}, None, 32),  # never faster
        ({8: 2.0, 16: 0.5, 32: 2.0}, None, 32),  # faster at 16 only: not from there on
        ({8: 2.0, 16: 0.5, 32: None}, 16, 16),  # skipped at 32: measured up to 16
    ],
)
def test_parallel_time_crossover_is_the_first_length_from_which_the_form_stays_faster(parallel, expected, longest):
    from benchmarks import parallel_time

    medians = {("scan", T): 1.0 for T in (8, 16, 32)} | {("parallel", T): ms for T, ms in parallel.items()}
    (key, crossover), *_ = parallel_time.crossovers(_rows(medians)).items()
    assert key == "min_gru/parallel/fwd"
    assert crossover["from"] == expected and crossover["measured_up_to"] == longest
    assert crossover["faster_at"] == [T for T, ms in parallel.items() if ms is not None and ms < 1.0]
    assert crossover["text"].startswith(
        f"T >= {expected}" if expected else "none up to 32" if longest == 32 else "none"
    )
    assert ("beyond, the parallel over the memory bound" in crossover["text"]) == (longest < 32)
    assert ("only)" in crossover["text"]) == (expected is None and bool(crossover["faster_at"]))


def test_parallel_time_skips_a_program_above_the_memory_bound(monkeypatch):
    # The bound is applied to each compiled program's memory figure: a program above it is never
    # called, and the row says why; the others are timed. (Compiled programs replaced by stubs.)
    from benchmarks import parallel_time

    called = []

    def stub(name, form, xs, shape):
        T = xs.shape[1]
        mb = {"scan": 1.0, "parallel": float(T * T)}[form]  # quadratic in T
        return {w: ((lambda f=form, w=w: called.append((f, w, T))), mb, 0.01) for w in ("fwd", "fwdbwd")}

    monkeypatch.setattr(parallel_time, "compiled", stub)
    rows = parallel_time.time_length(8, ["min_gru"], parallel_time.QUICK_SHAPE, repeats=2, bound_mb=32.0)
    by_key = {(r["form"], r["workload"]): r for r in rows}
    for w in ("fwd", "fwdbwd"):
        assert by_key["parallel", w]["skipped"] == "memory 64 MB > bound 32 MB"
        assert "median_ms" not in by_key["parallel", w] and "scan_over_this" not in by_key["parallel", w]
        assert len(by_key["scan", w]["samples_ms"]) == 2
    assert {f for f, _, _ in called} == {"scan"}


def test_parallel_time_newton_quick_run_reports_iterations_memory_and_agreement(tmp_path, capsys):
    from benchmarks import parallel_time

    path = tmp_path / "newton.json"
    result = parallel_time.main(
        ["--newton", "--quick", "--methods", "deer,quasi", "--repeats", "2", "--out", str(path)]
    )
    saved = json.loads(path.read_text())
    assert (tmp_path / "newton.png").stat().st_size > 0
    assert saved["methods"] == ["deer", "quasi"] and saved["shape"] == parallel_time.QUICK_NEWTON["shape"]
    rows = {(r["form"], r["workload"]): r for r in saved["rows"]}
    assert set(rows) == {(f, w) for f in ("scan", "deer", "quasi") for w in ("fwd", "fwdbwd")}
    for (form, workload), r in rows.items():
        assert "skipped" not in r and r["memory_mb"] > 0 and r["compile_s"] > 0
        assert r["median_ms"] == pytest.approx(statistics.median(r["samples_ms"]), rel=1e-9)
        if form != "scan":
            scan = rows["scan", workload]
            assert r["scan_over_this"] == pytest.approx(scan["median_ms"] / r["median_ms"], rel=1e-9)
    for method in ("deer", "quasi"):  # the solver's report, and its answer against the scan's
        fwd = rows[method, "fwd"]
        assert fwd["converged"] and not fwd["fell_back"] and 1 <= fwd["iterations"] <= max(saved["lengths"])
        assert fwd["max_abs_diff"] < 1e-5
    assert set(saved["crossover"]) == {f"lstm2/{m}/{w}" for m in ("deer", "quasi") for w in ("fwd", "fwdbwd")}
    assert result["crossover"] == saved["crossover"]
    assert "forward+backward" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parallel_time.main(["--newton", "--methods", "deer,newton"])
