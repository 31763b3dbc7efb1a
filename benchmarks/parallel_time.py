"""Time against sequence length: the parallel-in-time forms of the mLSTM, minGRU and minLSTM
against their scans, in one process, interleaved.

``python -m benchmarks.parallel_time [--quick] [--lengths 128,256,...] [--cells mlstm,min_gru,min_lstm]
[--repeats N] [--memory-bound-mb MB] [--out PATH.json]``

For every sequence length ``T`` (``LENGTHS``: 128 to 16,384) each form is compiled ahead of time
(``rnn(cell, implementation=form)``: the mLSTM's ``"scan"``, ``"parallel"`` and ``"chunkwise"``
with chunks of 64; minGRU's and minLSTM's ``"scan"`` and ``"parallel"``, the log-space
associative scan), forward (``xs (B, T, F) -> ys``) and forward+backward (the gradient of
``mean(ys)`` with respect to the parameters and ``xs``). Then all of that length's programs are
timed interleaved: each repeat times every form in turn, the order alternating from one repeat
to the next, so that the drifts of a shared machine hit them alike. Reported: the median and the
best of the repeats (each sample at least ~50 ms of back-to-back calls where a call is shorter),
the scan's median over each other form's (``scan_over_this``: above 1, that form is faster), the
compile time, and XLA's memory figure of each program (arguments, outputs and temporaries).

A program whose memory figure exceeds ``--memory-bound-mb`` (4,096 MB by default) is compiled
but never run: the row records the skip and the figure (the quadratic parallel mLSTM at long
``T``). The crossover of a form is the smallest ``T`` from which its median beats the scan's at
every longer length measured for both, forward and forward+backward separately; "none" where it
does not beat the scan at the longest length measured.

Sizes: batch 4, 128 input features, 128 hidden units, the mLSTM with 4 heads of 32 (``SHAPE``);
the cells' defaults otherwise. The JSON goes to ``benchmarks/results/<machine>_parallel_time.json``
(``cpu_<cores>core`` on a CPU, ``<backend>_<device kind>`` elsewhere), the log-log plot of time
against ``T`` beside it (``.png``). ``--quick`` runs tiny sizes at two lengths (the smoke test).

``--newton [--hidden 16,64,...] [--methods deer,quasi,elk]``: the same timing for a nonlinear cell,
an LSTM (its defaults: orthogonal recurrent kernel, forget bias 1) solved in parallel over time by
Newton's method (``rnn(lstm(H), implementation="parallel", method=...)``: DEER, quasi-DEER, quasi-ELK)
against its scan, at every sequence length (``NEWTON_LENGTHS``: 1,024 to 65,536) and hidden size
(``NEWTON_HIDDEN``: 16 to 512), batch 16, 32 input features. Each row adds the iterations the
solver took, whether it converged or the scan took over, and the largest difference from the scan's
outputs; the memory figure is the compiled program's (XLA's ``memory_analysis``), so the Jacobians
of DEER (``T B (2H)^2`` numbers) are reported, and skipped over the bound, before anything runs. The
crossover is per hidden size. JSON: ``benchmarks/results/<machine>_parallel_time_newton.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import recurrent
from benchmarks._common import calls_per_sample, int_list, interleaved, write_json

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SHAPE = {"batch": 4, "features": 128, "hidden": 128, "heads": 4, "chunk": 64}
QUICK_LENGTHS = (4, 8)
QUICK_SHAPE = {"batch": 2, "features": 3, "hidden": 4, "heads": 2, "chunk": 4}
#: cell -> its forms; the first is the scan every other form is measured against
FORMS = {"mlstm": ("scan", "parallel", "chunkwise"), "min_gru": ("scan", "parallel"), "min_lstm": ("scan", "parallel")}
WORKLOADS = ("fwd", "fwdbwd")
MEMORY_BOUND_MB = 4096
#: the Newton sweep (``--newton``): an LSTM solved by each method against its scan
NEWTON_METHODS = ("deer", "quasi", "elk")
NEWTON_LENGTHS = (1024, 4096, 16384, 65536)
NEWTON_HIDDEN = (16, 64, 256, 512)
NEWTON_SHAPE = {"batch": 16, "features": 32}
QUICK_NEWTON = {"lengths": (8,), "hidden": (2,), "shape": {"batch": 2, "features": 3}}


def default_repeats(T: int) -> int:
    """Interleaved repeats at length ``T``: fewer at long lengths, where one call takes seconds."""
    return 7 if T <= 1024 else 5 if T <= 4096 else 3


def make_cell(name: str, shape: dict):
    if name == "mlstm":
        return recurrent.mlstm(shape["hidden"], num_heads=shape["heads"], chunk_size=shape["chunk"])
    return {"min_gru": recurrent.min_gru, "min_lstm": recurrent.min_lstm}[name](shape["hidden"])


def compiled(name: str, form: str, xs, shape: dict) -> dict[str, tuple]:
    """``{workload: (call, memory MB or None, compile seconds)}`` of one form at ``xs``'s shape;
    ``call()`` runs the compiled program once and blocks."""
    layer = recurrent.rnn(make_cell(name, shape), implementation=form)
    params = layer.init(jax.random.key(0), xs.shape[2:])

    def forward(p, x):
        return layer.apply(p, x)[1]

    programs = {"fwd": forward, "fwdbwd": jax.grad(lambda p, x: jnp.mean(forward(p, x)), argnums=(0, 1))}
    out = {}
    for workload, fn in programs.items():
        t0 = time.perf_counter()
        exe = jax.jit(fn).lower(params, xs).compile()
        compile_s = time.perf_counter() - t0
        m = exe.memory_analysis()
        mb = None if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20
        out[workload] = (lambda exe=exe: jax.block_until_ready(exe(params, xs)), mb, compile_s)
    return out


def time_length(T: int, cells, shape: dict, *, repeats: int, bound_mb: float) -> list[dict]:
    """One row per cell, form and workload at length ``T``: timed interleaved, or skipped where
    the program's memory figure exceeds ``bound_mb``."""
    xs = jax.random.normal(jax.random.key(1), (shape["batch"], T, shape["features"]))
    calls, rows = {}, {}
    for name in cells:
        for form in FORMS[name]:
            for workload, (call, mb, compile_s) in compiled(name, form, xs, shape).items():
                row = {
                    "cell": name,
                    "form": form,
                    "T": T,
                    "workload": workload,
                    "memory_mb": mb,
                    "compile_s": compile_s,
                }
                rows[f"{name}/{form}", workload] = row
                if mb is not None and mb > bound_mb:
                    row["skipped"] = f"memory {mb:.0f} MB > bound {bound_mb:.0f} MB"
                else:
                    calls[f"{name}/{form}", workload] = call
    # calls_per_sample runs each program once: the warm-up, and the calls that make one ~50 ms sample
    numbers = {key: calls_per_sample(call) for key, call in calls.items()}
    samples = interleaved(calls, repeats, numbers)
    for key, ms in samples.items():
        rows[key].update(median_ms=statistics.median(ms), best_ms=min(ms), calls_per_sample=numbers[key], samples_ms=ms)
    for row in rows.values():  # the scan's median over this form's: above 1, this form is faster
        scan = rows.get((f"{row['cell']}/{FORMS[row['cell']][0]}", row["workload"]), {})
        if row["form"] != FORMS[row["cell"]][0] and "median_ms" in row and "median_ms" in scan:
            row["scan_over_this"] = scan["median_ms"] / row["median_ms"]
    return list(rows.values())


def crossovers(rows: list[dict]) -> dict[str, dict]:
    """For every non-scan form and workload: the smallest ``T`` from which the form's median is
    below the scan's at every longer ``T`` where both ran (``from``; ``None`` if it is not below
    at the longest), the longest such ``T`` (``measured_up_to``), every ``T`` where it is below
    (``faster_at``) and a sentence saying so."""
    median = {(r["cell"], r["form"], r["workload"], r["T"]): r["median_ms"] for r in rows if "median_ms" in r}
    lengths = sorted({r["T"] for r in rows})
    out = {}
    for name, (scan, *others) in FORMS.items():
        for form in others:
            for workload in WORKLOADS:
                both = [
                    T for T in lengths if (name, form, workload, T) in median and (name, scan, workload, T) in median
                ]
                if not both:
                    continue
                start = None
                for T in reversed(both):
                    if median[name, form, workload, T] >= median[name, scan, workload, T]:
                        break
                    start = T
                longest = both[-1]
                faster = [T for T in both if median[name, form, workload, T] < median[name, scan, workload, T]]
                notes = [f"faster at T = {', '.join(map(str, faster))} only"] if start is None and faster else []
                if longest < lengths[-1]:
                    over = [f for f in (scan, form) if (name, f, workload, lengths[-1]) not in median]
                    notes.append(
                        f"measured up to {longest}; beyond, the {' and the '.join(over)} over the memory bound"
                    )
                text = f"T >= {start}" if start is not None else f"none up to {longest}"
                text += f" ({'; '.join(notes)})" if notes else ""
                out[f"{name}/{form}/{workload}"] = {
                    "from": start,
                    "measured_up_to": longest,
                    "faster_at": faster,
                    "text": text,
                }
    return out


def format_tables(result: dict) -> str:
    rows = result["rows"]
    columns = [(name, form) for name, forms in FORMS.items() for form in forms if name in result["cells"]]
    by_key = {(r["cell"], r["form"], r["workload"], r["T"]): r for r in rows}
    shape = result["shape"]
    lines = [
        f"machine: {result['machine']}; batch {shape['batch']}, {shape['features']} features -> {shape['hidden']} "
        f"units, mLSTM {shape['heads']} heads, chunks of {shape['chunk']}; "
        f"memory bound {result['memory_bound_mb']} MB; load average {result['load_average']}",
    ]
    for workload, title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        lines += [
            "",
            f"{title}, ms: median (best)",
            "",
            "| T | " + " | ".join(f"{n} {f}" for n, f in columns) + " |",
            "|--:|" + "--:|" * len(columns),
        ]
        for T in result["lengths"]:
            cells = []
            for name, form in columns:
                r = by_key.get((name, form, workload, T))
                if r is None:
                    cells.append("")
                elif "skipped" in r:
                    cells.append(f"skipped ({r['memory_mb']:.0f} MB)")
                else:
                    cells.append(f"{r['median_ms']:.2f} ({r['best_ms']:.2f})")
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
    lines += ["", "crossover (the form's median below the scan's from this T on):", ""]
    lines += [f"- {key}: {c['text']}" for key, c in result["crossover"].items()]
    return "\n".join(lines)


def _plot_against_length(result: dict, path: str, key: str, panels, forms, title, suptitle: str, height: float):
    """ms against T, log-log: a row of panels (forward, forward+backward) per value of the rows'
    ``key`` in ``panels``, a line per form in ``forms(value)``; ``title(value)`` names the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(11, height * len(panels)), squeeze=False)
    for i, value in enumerate(panels):
        for j, (workload, what) in enumerate((("fwd", "forward"), ("fwdbwd", "forward+backward"))):
            ax = axes[i][j]
            for form in forms(value):
                points = [
                    (r["T"], r["median_ms"])
                    for r in result["rows"]
                    if (r[key], r["form"], r["workload"]) == (value, form, workload) and "median_ms" in r
                ]
                if points:
                    ax.plot(*zip(*points), marker="o", label=form)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{title(value)}, {what}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(result: dict, path: str) -> None:
    shape = result["shape"]
    suptitle = (
        f"{result['machine']}; batch {shape['batch']}, {shape['features']} -> {shape['hidden']}, "
        f"mLSTM {shape['heads']} heads, chunks of {shape['chunk']}; medians"
    )
    _plot_against_length(result, path, "cell", result["cells"], FORMS.__getitem__, str, suptitle, 3.4)


def newton_compiled(form: str, H: int, xs) -> tuple[dict[str, tuple], dict]:
    """``({workload: (call, memory MB or None, compile seconds)}, check)`` of the LSTM layer of ``H``
    units in ``form`` (``"scan"`` or a method); ``check`` runs the forward program once and returns
    its outputs and, for a method, the solver's report."""
    cell = recurrent.lstm(H)
    layer = recurrent.rnn(cell) if form == "scan" else recurrent.rnn(cell, implementation="parallel", method=form)
    params = layer.init(jax.random.key(0), xs.shape[2:])

    def forward(p, x):
        if form == "scan":
            return layer.apply(p, x)[1], None
        _, ys, trace = layer.apply(p, x, return_trace=True)  # the trace's carries and gates are dropped
        return ys, trace.solver

    def loss(p, x):
        return jnp.mean(forward(p, x)[0])

    programs = {"fwd": forward, "fwdbwd": jax.grad(loss, argnums=(0, 1))}
    out = {}
    for workload, fn in programs.items():
        t0 = time.perf_counter()
        exe = jax.jit(fn).lower(params, xs).compile()
        compile_s = time.perf_counter() - t0
        m = exe.memory_analysis()
        mb = None if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20
        out[workload] = (lambda exe=exe: jax.block_until_ready(exe(params, xs)), mb, compile_s)
    return out, out["fwd"][0]


def newton_length(T: int, hidden, methods, shape: dict, *, repeats: int, bound_mb: float) -> list[dict]:
    """Rows of the Newton sweep at length ``T``: for every hidden size, the scan and each method,
    forward and forward+backward, timed interleaved (or skipped over ``bound_mb``)."""
    rows = []
    for H in hidden:
        xs = jax.random.normal(jax.random.key(1), (shape["batch"], T, shape["features"]))
        calls, by_key, reference = {}, {}, None
        for form in ("scan", *methods):
            programs, check = newton_compiled(form, H, xs)
            runs = "skipped" not in programs and all(mb is None or mb <= bound_mb for _, mb, _ in programs.values())
            solved = check() if runs else None
            for workload, (call, mb, compile_s) in programs.items():
                row = {"sweep": "newton", "cell": "lstm", "form": form, "T": T, "hidden": H, "workload": workload}
                row.update(memory_mb=mb, compile_s=compile_s)
                if mb is not None and mb > bound_mb:
                    row["skipped"] = f"memory {mb:.0f} MB > bound {bound_mb:.0f} MB"
                elif runs:
                    calls[form, workload] = call
                by_key[form, workload] = row
            if solved is None:
                continue
            ys, info = solved
            if form == "scan":
                reference = ys
            else:
                by_key[form, "fwd"].update(
                    iterations=int(info.iterations),
                    converged=bool(info.converged),
                    fell_back=bool(info.fell_back),
                    max_abs_diff=None if reference is None else float(jnp.max(jnp.abs(ys - reference))),
                )
        numbers = {key: calls_per_sample(call) for key, call in calls.items()}
        for key, ms in interleaved(calls, repeats, numbers).items():
            by_key[key].update(
                median_ms=statistics.median(ms), best_ms=min(ms), calls_per_sample=numbers[key], samples_ms=ms
            )
        for (form, workload), row in by_key.items():
            scan = by_key.get(("scan", workload), {})
            if form != "scan" and "median_ms" in row and "median_ms" in scan:
                row["scan_over_this"] = scan["median_ms"] / row["median_ms"]
        rows += list(by_key.values())
    return rows


def newton_crossovers(rows: list[dict]) -> dict[str, dict]:
    """For every hidden size, method and workload: the smallest ``T`` from which the method's median
    stays below the scan's at every longer ``T`` where both ran, as :func:`crossovers`."""
    median = {(r["hidden"], r["form"], r["workload"], r["T"]): r["median_ms"] for r in rows if "median_ms" in r}
    out = {}
    for H in sorted({r["hidden"] for r in rows}):
        for form in dict.fromkeys(r["form"] for r in rows if r["form"] != "scan"):
            for workload in WORKLOADS:
                both = sorted(
                    T
                    for (h, f, w, T) in median
                    if (h, f, w) == (H, form, workload) and (H, "scan", workload, T) in median
                )
                if not both:
                    continue
                start = None
                for T in reversed(both):
                    if median[H, form, workload, T] >= median[H, "scan", workload, T]:
                        break
                    start = T
                faster = [T for T in both if median[H, form, workload, T] < median[H, "scan", workload, T]]
                text = f"T >= {start}" if start is not None else f"none up to {both[-1]}"
                out[f"lstm{H}/{form}/{workload}"] = {
                    "from": start,
                    "measured_up_to": both[-1],
                    "faster_at": faster,
                    "text": text,
                }
    return out


def _ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def format_newton(result: dict) -> str:
    rows, forms = result["rows"], ("scan", *result["methods"])
    by_key = {(r["hidden"], r["form"], r["workload"], r["T"]): r for r in rows}
    shape = result["shape"]
    lines = [
        f"machine: {result['machine']}; LSTM, batch {shape['batch']}, {shape['features']} features; "
        f"memory bound {result['memory_bound_mb']} MB; load average {result['load_average']}",
    ]
    for workload, title in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        lines += [
            "",
            f"{title}, ms: median [iterations]",
            "",
            "| T | H | " + " | ".join(forms) + " |",
            "|--:|--:|" + "--:|" * len(forms),
        ]
        for T in result["lengths"]:
            for H in result["hidden"]:
                cells = []
                for form in forms:
                    r, fwd = by_key.get((H, form, workload, T)), by_key.get((H, form, "fwd", T), {})
                    if r is None:
                        cells.append("")
                    elif "skipped" in r:
                        cells.append(f"skipped ({r['memory_mb']:.0f} MB)")
                    elif "median_ms" not in r:
                        cells.append("not run")
                    else:
                        its = (
                            ""
                            if "iterations" not in fwd
                            else f" [{fwd['iterations']}{'*' if fwd['fell_back'] else ''}]"
                        )
                        cells.append(f"{_ms(r['median_ms'])}{its}")
                lines.append(f"| {T} | {H} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "[n*]: fell back to the scan after n iterations",
        "",
        "crossover (faster than the scan from T on):",
        "",
    ]
    lines += [f"- {key}: {c['text']}" for key, c in result["crossover"].items()]
    return "\n".join(lines)


def plot_newton(result: dict, path: str) -> None:
    _plot_against_length(
        result, path, "hidden", result["hidden"], lambda H: ("scan", *result["methods"]),
        lambda H: f"LSTM {H} units", f"{result['machine']}; batch {result['shape']['batch']}; medians", 3.2,
    )  # fmt: skip


def newton_main(args, parser, argv) -> dict:
    """The ``--newton`` sweep."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in NEWTON_METHODS for m in methods):
        parser.error(
            f"--methods: expected a comma-separated subset of {', '.join(NEWTON_METHODS)}, got {args.methods!r}"
        )
    quick = QUICK_NEWTON if args.quick else None
    if args.lengths is None:
        lengths = list(quick["lengths"] if quick else NEWTON_LENGTHS)
    else:
        lengths = sorted(set(int_list(parser, "--lengths", args.lengths, least=1, example="1024,4096")))
    if args.hidden is None:
        hidden = list(quick["hidden"] if quick else NEWTON_HIDDEN)
    else:
        hidden = sorted(set(int_list(parser, "--hidden", args.hidden, least=1, example="16,64")))
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    shape = quick["shape"] if quick else NEWTON_SHAPE
    if args.out is None:
        name = "parallel_time_newton_quick.json" if args.quick else f"{machine_prefix()}_parallel_time_newton.json"
        args.out = os.path.join("runs/benchmarks" if args.quick else "benchmarks/results", name)
    result = {
        "machine": f"{platform.machine()}, {CORES} CPU cores, {jax.devices()[0]}",
        "backend": jax.default_backend(),
        "command": "python -m benchmarks.parallel_time " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"jax": jax.__version__},
        "shape": shape,
        "methods": methods,
        "lengths": lengths,
        "hidden": hidden,
        "memory_bound_mb": args.memory_bound_mb,
        "repeats": [args.repeats or (2 if args.quick else default_repeats(T)) for T in lengths],
        "rows": [],
    }
    t0 = time.perf_counter()
    for T, repeats in zip(lengths, result["repeats"]):
        rows = newton_length(T, hidden, methods, shape, repeats=repeats, bound_mb=args.memory_bound_mb)
        result["rows"] += rows
        done = ", ".join(
            f"H={r['hidden']} {r['form']}/{r['workload']} {r['median_ms']:.1f}" for r in rows if "median_ms" in r
        )
        print(f"T={T} ({time.perf_counter() - t0:.0f} s): {done}", flush=True)
    result["load_average"] = os.getloadavg()[0]
    result["crossover"] = newton_crossovers(result["rows"])
    result["total_s"] = time.perf_counter() - t0
    print("\n" + format_newton(result))
    write_json(args.out, result)
    plot_newton(result, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out} and its .png")
    return result


def machine_prefix() -> str:
    """``cpu_<cores>core`` on a CPU, else the backend and the device kind (``gpu_h200``)."""
    backend = jax.default_backend()
    if backend == "cpu":
        return f"cpu_{CORES}core"
    kind = jax.devices()[0].device_kind.lower().replace("nvidia", "").strip()
    return f"{backend}_{re.sub(r'[^a-z0-9]+', '_', kind).strip('_')}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes at two lengths: a smoke test")
    parser.add_argument("--lengths", default=None, help=f"comma-separated sequence lengths (default {LENGTHS})")
    parser.add_argument("--cells", default=",".join(FORMS), help=f"comma-separated subset of {list(FORMS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats at every length")
    parser.add_argument("--memory-bound-mb", type=float, default=MEMORY_BOUND_MB)
    parser.add_argument("--out", default=None, help="JSON path (the plot goes beside it, .png)")
    parser.add_argument("--newton", action="store_true", help="the LSTM solved by Newton's method against its scan")
    parser.add_argument("--hidden", default=None, help=f"--newton: hidden sizes (default {NEWTON_HIDDEN})")
    parser.add_argument("--methods", default=",".join(NEWTON_METHODS), help="--newton: methods to time")
    args = parser.parse_args(argv)
    if args.newton:
        return newton_main(args, parser, argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or any(c not in FORMS for c in cells):
        parser.error(f"--cells: expected a comma-separated subset of {', '.join(FORMS)}, got {args.cells!r}")
    if args.lengths is None:
        lengths = list(QUICK_LENGTHS if args.quick else LENGTHS)
    else:
        lengths = sorted(set(int_list(parser, "--lengths", args.lengths, least=1, example="128,256,512")))
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.out is None:
        name = "parallel_time_quick.json" if args.quick else f"{machine_prefix()}_parallel_time.json"
        args.out = os.path.join("runs/benchmarks" if args.quick else "benchmarks/results", name)

    result = {
        "machine": f"{platform.machine()}, {CORES} CPU cores, {jax.devices()[0]}",
        "backend": jax.default_backend(),
        "command": "python -m benchmarks.parallel_time " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"jax": jax.__version__},
        "shape": shape,
        "cells": cells,
        "lengths": lengths,
        "memory_bound_mb": args.memory_bound_mb,
        "repeats": [args.repeats or (2 if args.quick else default_repeats(T)) for T in lengths],  # per length
        "rows": [],
    }
    t0 = time.perf_counter()
    for T, repeats in zip(lengths, result["repeats"]):
        rows = time_length(T, cells, shape, repeats=repeats, bound_mb=args.memory_bound_mb)
        result["rows"] += rows
        done = ", ".join(
            f"{r['cell']}/{r['form']}/{r['workload']} {r['median_ms']:.1f}" if "median_ms" in r else "skipped"
            for r in rows
        )
        print(f"T={T} ({time.perf_counter() - t0:.0f} s): {done}", flush=True)
    result["load_average"] = os.getloadavg()[0]
    result["crossover"] = crossovers(result["rows"])
    result["total_s"] = time.perf_counter() - t0
    print("\n" + format_tables(result))
    write_json(args.out, result)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"\nwrote {args.out} and its .png")
    return result


if __name__ == "__main__":
    main()
