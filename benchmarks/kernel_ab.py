"""The kernel matmul's derivative against JAX's own, for every cell of the suite, interleaved.

Run ``python -m benchmarks.kernel_ab [--cases lstm,gru,...] [--repeats N] [--quick] [--out PATH.json]``.

Each case of :mod:`benchmarks.suite` (same shapes, same layers) is built twice: as the library
runs it, where on CPU each kernel matmul's derivative multiplies by a transposed kernel
materialised once outside the loop (``recurrent._core._kernel_matmul``), and traced with a plain
``jnp.matmul`` that JAX differentiates itself (the code before; the backward loop then reads the
kernel transposed). Both are timed forward and forward+backward in one interleaved run, with
the ratio of the plain path's median to the library's (above 1: the library is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax

from benchmarks import suite
from benchmarks._common import autodiff_kernel_matmul, calls_per_sample, interleaved, write_json

CASES = "lstm,gru,peephole,cifg,bidirectional,stacked4"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"comma-separated cases of benchmarks.suite (default {CASES})")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, the times mean nothing")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    names = suite.case_names(parser, args.cases)

    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "rows": []}
    for name in names:
        kind, B, T, F, H, layers, xs = suite.case_inputs(name, args.quick)
        built = {"library": suite.ours(kind, B, T, F, H, layers, xs)}
        with autodiff_kernel_matmul():  # compiled inside, so the program keeps the plain matmul
            built["autodiff_kernel"] = suite.ours(kind, B, T, F, H, layers, xs)
        calls = {(key, w): built[key][w] for key in built for w in (0, 1)}
        for fn in calls.values():  # warm up
            fn()
        samples = interleaved(calls, args.repeats, {key: calls_per_sample(fn) for key, fn in calls.items()})
        ms = {key: statistics.median(v) for key, v in samples.items()}
        row = {
            "case": name,
            **{f"{key}_{wl}_ms": ms[key, w] for key in built for w, wl in ((0, "fwd"), (1, "fwdbwd"))},
            "plain_over_library_fwd": ms["autodiff_kernel", 0] / ms["library", 0],
            "plain_over_library_fwdbwd": ms["autodiff_kernel", 1] / ms["library", 1],
            "samples_ms": {f"{key}/{w}": v for (key, w), v in samples.items()},
        }
        result["rows"].append(row)
        fwdbwd, fwd = (ms["library", 1], ms["autodiff_kernel", 1]), (ms["library", 0], ms["autodiff_kernel", 0])
        print(
            f"{name:14s} fwd+bwd {fwdbwd[0]:8.2f} ms, plain matmul derivative {fwdbwd[1]:8.2f} ms "
            f"({row['plain_over_library_fwdbwd']:.2f}x); fwd {fwd[0]:7.2f} / {fwd[1]:7.2f} ms",
            flush=True,
        )
    result["load_average"] = load = os.getloadavg()[0]
    print(f"(x = the plain path's time over the library's: above 1, the library is faster; load {load:.1f})")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
