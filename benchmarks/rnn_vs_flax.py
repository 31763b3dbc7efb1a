"""``recurrent.rnn(recurrent.lstm(H))`` against Flax's ``nn.RNN(nn.OptimizedLSTMCell(H))``.

Run ``python -m benchmarks.rnn_vs_flax [--out=PATH.json] [--repeats=N] [--quick]``.

Both layers are jitted and compiled ahead of time (compile time is reported apart), then timed
in one process, *interleaved*: each repeat times every contender in turn, alternating the order,
so slow drifts of the machine (other processes, thermal) hit all alike. A repeat times
``number`` back-to-back calls, each ended with ``block_until_ready``; the table gives the
median over repeats of the time per call. Two workloads:

- *forward*: ``xs (B, T, F) -> ys (B, T, H)``;
- *forward+backward*: ``jax.grad`` of ``mean(ys)`` with respect to the parameters and ``xs``.

A third, diagnostic contender, ``scan(cell.step)``, is ``lax.scan`` over our cell's public
``step``: the same cell math as ``rnn`` but with the input projection inside the loop, as Flax
does, instead of ``rnn``'s one large projection of all time steps before the loop. The gap
between it and ``rnn`` is the price (or gain) of that hoisting on the machine at hand.

Flax's parameters are converted from ours, so all compute the same function; the script checks
that outputs and gradients agree before timing anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

import recurrent
from benchmarks._common import interleaved, write_json

FULL = {"batch": 32, "steps": 128, "features": 128, "hidden": 256}
QUICK = {"batch": 2, "steps": 5, "features": 3, "hidden": 4}
IMPLS = ("ours", "flax", "ours_step")  # ours_step: lax.scan over cell.step (diagnostic)
WORKLOADS = ("forward", "forward+backward")
LABELS = {"ours": "recurrent.rnn", "flax": "flax nn.RNN", "ours_step": "scan(cell.step)"}


def to_flax(params: recurrent.LSTMParams) -> dict:
    """Our fused LSTM parameters (gate blocks in ``LSTM_GATES`` order) as Flax's
    ``OptimizedLSTMCell`` variables (one dense per gate: ``i*`` input kernels without bias,
    ``h*`` recurrent kernels with the bias)."""
    letter = {"input": "i", "forget": "f", "cell": "g", "output": "o"}
    blocks = zip(
        recurrent.LSTM_GATES,
        jnp.split(params.input_kernel, 4, axis=-1),
        jnp.split(params.recurrent_kernel, 4, axis=-1),
        jnp.split(params.bias, 4),
    )
    cell = {}
    for gate, kernel, recurrent_kernel, bias in blocks:
        cell[f"i{letter[gate]}"] = {"kernel": kernel}
        cell[f"h{letter[gate]}"] = {"kernel": recurrent_kernel, "bias": bias}
    return {"params": {"cell": cell}}


def from_flax(variables: dict) -> recurrent.LSTMParams:
    """The inverse of :func:`to_flax` (used to compare parameter gradients)."""
    cell = variables["params"]["cell"]
    order = "ifgo"
    return recurrent.LSTMParams(
        input_kernel=jnp.concatenate([cell[f"i{g}"]["kernel"] for g in order], axis=-1),
        recurrent_kernel=jnp.concatenate([cell[f"h{g}"]["kernel"] for g in order], axis=-1),
        bias=jnp.concatenate([cell[f"h{g}"]["bias"] for g in order]),
    )


def make_functions(hidden: int) -> dict[tuple[str, str], Callable]:
    """The timed functions ``(params, xs) -> outputs``, keyed by ``(impl, workload)``."""
    cell = recurrent.lstm(hidden)
    layer = recurrent.rnn(cell)
    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(hidden))

    def ours(params, xs):
        return layer.apply(params, xs)[1]

    def flax_forward(variables, xs):
        return flax_rnn.apply(variables, xs)

    def ours_step(params, xs):
        xs_TBF = jnp.moveaxis(xs, 1, 0)
        carry = cell.initial_carry(params, xs_TBF.shape[1:])
        _, ys_TBH = lax.scan(lambda c, x: cell.step(params, c, x), carry, xs_TBF)
        return jnp.moveaxis(ys_TBH, 0, 1)

    def grad_of(forward):
        return jax.grad(lambda p, xs: jnp.mean(forward(p, xs)), argnums=(0, 1))

    forwards = {"ours": ours, "flax": flax_forward, "ours_step": ours_step}
    functions = {}
    for impl, forward in forwards.items():
        functions[impl, "forward"] = forward
        functions[impl, "forward+backward"] = grad_of(forward)
    return functions


def check_agreement(compiled: dict, args: dict) -> float:
    """Largest absolute difference between each contender's and ours' outputs and gradients."""
    worst = 0.0
    for workload in WORKLOADS:
        reference = compiled["ours", workload](*args["ours"])
        for impl in IMPLS[1:]:
            out = compiled[impl, workload](*args[impl])
            if workload == "forward+backward" and impl == "flax":
                out = (from_flax(out[0]), out[1])  # d/dparams in our layout, d/dxs
            diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), reference, out)
            worst = max(worst, *jax.tree.leaves(diffs))
    return worst


def benchmark(
    batch: int, steps: int, features: int, hidden: int, *, repeats: int = 7, number: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Compiles and times every contender; returns the results as a JSON-ready dict."""
    k_params, k_xs = jax.random.split(jax.random.key(seed))
    params = recurrent.lstm(hidden).init(k_params, (features,))
    xs = jax.random.normal(k_xs, (batch, steps, features), jnp.float32)
    args = {"ours": (params, xs), "flax": (to_flax(params), xs), "ours_step": (params, xs)}

    compiled, compile_s = {}, {}
    for key, fn in make_functions(hidden).items():
        t0 = time.perf_counter()
        compiled[key] = jax.jit(fn).lower(*args[key[0]]).compile()
        compile_s[key] = time.perf_counter() - t0

    max_abs_diff = check_agreement(compiled, args)  # also warms up every function
    tolerance = 1e-4 * max(1.0, hidden**0.5)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(f"contenders disagree by {max_abs_diff:.3g} (> {tolerance:.3g}); timings would be moot")

    calls = {
        (impl, workload): lambda f=compiled[impl, workload], a=args[impl]: jax.block_until_ready(f(*a))
        for impl in IMPLS
        for workload in WORKLOADS
    }
    samples = {key: [ms / 1e3 for ms in v] for key, v in interleaved(calls, repeats, number).items()}

    rows = []
    for workload in WORKLOADS:
        ms = {impl: statistics.median(samples[impl, workload]) * 1e3 for impl in IMPLS}
        rows.append(
            {
                "workload": workload,
                "ours_ms": ms["ours"],
                "flax_ms": ms["flax"],
                "ratio_ours_over_flax": ms["ours"] / ms["flax"],
                "ours_step_ms": ms["ours_step"],
                "ratio_ours_step_over_flax": ms["ours_step"] / ms["flax"],
                **{f"{impl}_compile_s": compile_s[impl, workload] for impl in IMPLS},
                **{f"{impl}_samples_ms": [s * 1e3 for s in samples[impl, workload]] for impl in IMPLS},
            }
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "shape": {"batch": batch, "steps": steps, "features": features, "hidden": hidden},
        "repeats": repeats,
        "number": number,
        "params": {"ours": recurrent.count_params(params), "flax": recurrent.count_params(args["flax"][0])},
        "max_abs_diff": max_abs_diff,
        "device": str(jax.devices()[0]),
        "machine": f"{platform.machine()}, {cpus} CPU cores",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "recurrent": recurrent.__version__},
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    s, load = result["shape"], result["load_average"]
    lines = [
        f"recurrent.rnn(lstm({s['hidden']})) vs flax nn.RNN(OptimizedLSTMCell({s['hidden']})): batch {s['batch']}, "
        f"{s['steps']} steps, {s['features']} inputs; median of {result['repeats']} interleaved repeats "
        f"x {result['number']} calls; {result['device']} ({result['machine']}"
        + (f", load average {load[0]:.1f} at the end)" if load else ")"),
        f"params: ours {result['params']['ours']}, flax {result['params']['flax']}; "
        f"max |difference| over outputs and gradients: {result['max_abs_diff']:.2e}",
        "",
        "| workload         | ours (ms) | flax (ms) | ours/flax | scan(cell.step) (ms) | its /flax "
        "| compile ours / flax / step (s) |",
        "|------------------|----------:|----------:|----------:|---------------------:|----------:"
        "|-------------------------------:|",
    ]
    for r in result["rows"]:
        compile_s = " / ".join(f"{r[f'{impl}_compile_s']:.2f}" for impl in IMPLS)
        lines.append(
            f"| {r['workload']:<16} | {r['ours_ms']:9.2f} | {r['flax_ms']:9.2f} | {r['ratio_ours_over_flax']:9.2f} "
            f"| {r['ours_step_ms']:20.2f} | {r['ratio_ours_step_over_flax']:9.2f} | {compile_s:>30} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny shape smoke run {QUICK}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7, quick 2)")
    parser.add_argument("--number", type=int, default=None, help="calls per repeat (default 3, quick 1)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    for name, value in FULL.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    shape.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    number = args.number if args.number is not None else (1 if args.quick else 3)

    result = benchmark(**shape, repeats=repeats, number=number)
    print(format_table(result))
    if args.out:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
