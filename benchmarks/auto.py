"""What ``rnn(..., implementation="auto")`` picks, against the implementations it picks from: the
scan, ``"vjp"`` and ``"native"`` layers of an LSTM and a GRU, from a tiny shape to the suite's,
forward and forward+backward, interleaved in one process.

Run ``python -m benchmarks.auto [--cells=lstm,gru] [--repeats=N] [--quick] [--out=FILE]``. Each row
gives the median milliseconds per call of each implementation at one shape, the fastest, and
what ``"auto"`` picks on this backend (``recurrent._kernels.AUTO``); a row where the pick is more
than 10% slower than the fastest is marked. ``"native"`` is left out where the kernels cannot run
(``python -m recurrent.native.build`` builds them). Before timing, each implementation's outputs
and gradients are compared with the scan's (the largest difference, relative to each
array's largest magnitude).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import warnings

import jax
import jax.numpy as jnp

import recurrent
from benchmarks import suite
from benchmarks._common import calls_per_sample, interleaved, write_json
from recurrent import _kernels

#: (batch, steps, features, hidden): from one short sequence of a tiny layer to the suite's shape.
SHAPES = ((1, 16, 8, 16), (8, 32, 16, 32), (16, 64, 64, 128), (32, 128, 128, 256))
QUICK = ((2, 5, 3, 4),)


def layer_calls(cell_name, implementation, B, T, F, H):
    """``(forward, forward_backward, layer, params, xs)`` of one layer, compiled; a fallback to the
    scan (where ``implementation`` cannot run) raises, so it is never timed as the kernel."""
    cell = suite._our_cell(cell_name, H)
    layer = recurrent.rnn(cell, implementation=implementation)
    params = layer.init(jax.random.key(0), (F,))
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        fwd, fwdbwd, _, _ = suite._jax_contender(lambda p, x: layer.apply(p, x)[1], params, xs)
    return fwd, fwdbwd, layer, params, xs


def _outputs_and_gradients(layer, params, xs):
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)[1]))  # noqa: E731
    return jax.jit(lambda p, x: (layer.apply(p, x)[1], jax.grad(loss, (0, 1))(p, x)))(params, xs)


def largest_difference(a, b) -> float:
    """The largest difference between two pytrees' arrays, each relative to ``b``'s largest
    magnitude in that array (gradients summed over a large batch are large)."""
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm, gru")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    parser.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    cells = args.cells.split(",")
    if not set(cells) <= {"lstm", "gru"}:
        parser.error(f"--cells: expected lstm and/or gru, got {args.cells!r}")
    from recurrent import native

    why_not_native = native.reason()
    names = ("scan", "vjp") + (("native",) if why_not_native is None else ())
    pick = next((n for n in _kernels.auto_order() if n in names), "scan")
    if why_not_native is not None:
        print(f"native: left out, it cannot run here: {why_not_native}")
    rows = []
    for cell_name in cells:
        for B, T, F, H in QUICK if args.quick else SHAPES:
            built = {n: layer_calls(cell_name, n, B, T, F, H) for n in names}
            _, _, scan_layer, params, xs = built["scan"]
            reference = _outputs_and_gradients(scan_layer, params, xs)
            differences = {
                n: largest_difference(reference, _outputs_and_gradients(layer, params, xs))
                for n, (_, _, layer, _, _) in built.items()
                if n != "scan"
            }
            calls = {}
            for n, (fwd, fwdbwd, *_) in built.items():
                fwd(), fwdbwd()
                calls[n, "fwd"], calls[n, "fwdbwd"] = fwd, fwdbwd
            number = {key: calls_per_sample(fn) for key, fn in calls.items()}
            samples = interleaved(calls, 3 if args.quick else args.repeats, number)
            row = dict(cell=cell_name, batch=B, steps=T, features=F, hidden=H, auto_picks=pick,
                       largest_difference_from_scan=differences)  # fmt: skip
            for workload in ("fwd", "fwdbwd"):
                ms = {n: statistics.median(samples[n, workload]) for n in names}
                fastest = min(ms, key=ms.get)
                row[workload] = dict(ms=ms, fastest=fastest, auto_over_fastest=ms[pick] / ms[fastest])
            rows.append(row)
            print(
                f"{cell_name} B={B} T={T} F={F} H={H}  "
                + "  ".join(
                    f"{w}: "
                    + " ".join(f"{n} {row[w]['ms'][n]:.3f}" for n in names)
                    + f" ms, fastest {row[w]['fastest']}, auto ({pick}) {row[w]['auto_over_fastest']:.2f}x"
                    + (" <-- slower than the fastest" if row[w]["auto_over_fastest"] > 1.1 else "")
                    for w in ("fwd", "fwdbwd")
                )
                + "  (largest difference from the scan, relative: "
                + ", ".join(f"{n} {d:.1e}" for n, d in differences.items())
                + ")",
                flush=True,
            )
    result = dict(
        backend=jax.default_backend(),
        machine=platform.processor() or platform.machine(),
        cores=suite.CORES,
        native=why_not_native or "runs",
        auto_order=list(_kernels.auto_order()),
        rows=rows,
        worst_auto_over_fastest=max(r[w]["auto_over_fastest"] for r in rows for w in ("fwd", "fwdbwd")),
    )
    print(f"auto ({pick}) over the fastest, worst row: {result['worst_auto_over_fastest']:.2f}x")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
