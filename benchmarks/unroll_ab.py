"""``rnn(..., unroll=k)`` for every cell of the suite, interleaved in one process.

Run ``python -m benchmarks.unroll_ab [--cases lstm,gru,...] [--unrolls 1,2,4] [--repeats N]
[--quick] [--out PATH.json]``.

Each case of :mod:`benchmarks.suite` (same shapes, same layers) is built once per ``unroll``,
and for the LSTM, peephole, CIFG and GRU cells also with ``implementation="vjp"``; every build is timed
forward and forward+backward in one interleaved run, so that the ratio of each ``unroll`` to
``unroll=1`` is measured under the same load. This is the measurement behind the default of
``rnn(..., unroll=...)``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax

from benchmarks import suite
from benchmarks._common import calls_per_sample, int_list, interleaved, write_json

CASES = "lstm,gru,peephole,cifg,convlstm,bidirectional,stacked4"
VJP = ("lstm", "gru", "peephole", "cifg")  # the cells with a hand-written backward pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"comma-separated cases of benchmarks.suite (default {CASES})")
    parser.add_argument("--unrolls", default="1,2,4", help="the unroll values to compare; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, the times mean nothing")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    names = suite.case_names(parser, args.cases)
    unrolls = int_list(parser, "--unrolls", args.unrolls, least=1, example="1,2,4")

    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "unrolls": unrolls, "rows": []}
    for name in names:
        kind, B, T, F, H, layers, xs = suite.case_inputs(name, args.quick)
        implementations = ("scan", "vjp") if kind in VJP and layers == 1 else ("scan",)
        built = {
            (impl, u): suite.ours(kind, B, T, F, H, layers, xs, unroll=u, implementation=impl)
            for impl in implementations
            for u in unrolls
        }
        calls = {(key, w): built[key][w] for key in built for w in (0, 1)}
        for fn in calls.values():  # warm up
            fn()
        samples = interleaved(calls, args.repeats, {key: calls_per_sample(fn) for key, fn in calls.items()})
        for impl, u in built:
            fwd, fwdbwd = (statistics.median(samples[(impl, u), w]) for w in (0, 1))
            base = [statistics.median(samples[(impl, unrolls[0]), w]) for w in (0, 1)]
            row = {
                "case": name,
                "implementation": impl,
                "unroll": u,
                "fwd_ms": fwd,
                "fwdbwd_ms": fwdbwd,
                "base_over_this_fwd": base[0] / fwd,
                "base_over_this_fwdbwd": base[1] / fwdbwd,
                "compile_s": built[impl, u][2],
            }
            result["rows"].append(row)
            print(
                f"{name:14s} {impl:5s} unroll {u}: fwd {fwd:8.2f} ms ({row['base_over_this_fwd']:.2f}x)  "
                f"fwd+bwd {fwdbwd:8.2f} ms ({row['base_over_this_fwdbwd']:.2f}x)  compile {row['compile_s']:.2f} s",
                flush=True,
            )
    result["load_average"] = os.getloadavg()[0]
    load = result["load_average"]
    print(f"(x = unroll {unrolls[0]}'s time over this one's: above 1 is faster; load average {load:.1f})")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
