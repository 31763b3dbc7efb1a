"""Bidirectional LSTM(256) at batch 32 x 128 steps x 128 inputs: both directions in one scan
(``bidirectional(..., one_scan=True)``) against two scans, interleaved in one process.

Run ``python -m benchmarks.bidirectional_ab [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

import recurrent
from benchmarks._common import interleaved


def main(argv=None, shape=(32, 128, 128, 256)):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    B, T, F, H = shape
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    fns = {}
    for name, one_scan in (("one", True), ("two", False)):
        layer = recurrent.bidirectional(recurrent.lstm(H), one_scan=one_scan)
        params = layer.init(jax.random.key(0), (F,))
        forward = lambda p, x, layer=layer: layer.apply(p, x)[1]  # noqa: E731
        grad = jax.grad(lambda p, x, f=forward: jnp.mean(f(p, x)))
        fns[name] = [jax.jit(f).lower(params, xs).compile() for f in (forward, grad)], params
    calls = {(n, w): lambda f=fns[n][0][w], p=fns[n][1]: jax.block_until_ready(f(p, xs)) for n in fns for w in (0, 1)}
    for fn in calls.values():  # warm up
        fn()
    samples = interleaved(calls, args.repeats)
    result = {}
    for w, workload in enumerate(("forward", "forward+backward")):
        one, two = statistics.median(samples["one", w]), statistics.median(samples["two", w])
        result[workload] = {"one_scan_ms": one, "two_scans_ms": two, "two_over_one": two / one}
        print(f"{workload}: one scan {one:.1f} ms, two scans {two:.1f} ms, two/one {two / one:.2f}")
    return result


if __name__ == "__main__":
    main()
