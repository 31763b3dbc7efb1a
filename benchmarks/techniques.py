"""Driver techniques measured one at a time, interleaved in one process.

Run ``python -m benchmarks.techniques [--quick] [--out=PATH.json]``.

Every contender computes the same LSTM layer (``recurrent.lstm(H)``, batch-major input
``(B, T, F)`` -> ``(B, T, H)``), and differs in one technique only:

- ``hoisted``: the input projection of all steps as one matmul before the scan
  (``rnn(..., projection="hoisted")``);
- ``fused``: the projection inside the loop, one small matmul per step
  (``rnn(..., projection="fused")``);
- ``hoisted_bm``: projection in batch-major order, then transposed to time-major;
- ``concat``: one matmul per step, ``[x, h] @ [W; U]`` (the classic single-GEMM cell);
- ``fused_unroll{2,4,8}``: ``fused`` with ``lax.scan(unroll=k)``;
- ``vjp``: ``fused`` with the hand-written backward pass (``rnn(..., implementation="vjp")``:
  weight and input gradients as three large matmuls after the backward loop);
- ``bf16_product``: bfloat16 compute the naive way, a bfloat16 x bfloat16 -> bfloat16 product
  then cast to float32 (what the cells did before ``recurrent._core.matmul``);
- ``bf16``: ``recurrent.lstm(H, dtype=jnp.bfloat16)``, bfloat16 operands accumulated in float32
  (``preferred_element_type``), float32 state; ``bf16_vjp``: the same with ``"vjp"``;
- ``autodiff_pointwise``: ``fused`` with the elementwise half of the step differentiated by JAX
  (the cell built with ``input_activation=lambda x: jnp.tanh(x)``, which takes the general code)
  instead of through its written-out derivative (``recurrent._lstm.lstm_pointwise``);
- ``autodiff_kernel``: ``fused`` with each kernel matmul differentiated by JAX (``g @ b.T`` in the
  backward loop reads ``b`` transposed) instead of through ``recurrent._core._kernel_matmul``'s
  derivative (``g`` times a materialised ``b.T``);
- ``flax``: ``nn.RNN(nn.OptimizedLSTMCell)`` for reference.

The table gives medians over interleaved repeats, each contender's ratio to ``hoisted`` and each
compiled program's temporary memory (XLA's figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import recurrent
from benchmarks._common import autodiff_kernel_matmul, interleaved, write_json

FULL = {"batch": 32, "steps": 128, "features": 128, "hidden": 256}
QUICK = {"batch": 2, "steps": 5, "features": 3, "hidden": 4}


def _lstm_math(z, c):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jnp.tanh(c) * jax.nn.sigmoid(o), c


def contenders(hidden: int) -> dict:
    cell = recurrent.lstm(hidden)
    fns = {
        "hoisted": lambda p, xs: recurrent.rnn(cell, projection="hoisted").apply(p, xs)[1],
        "fused": lambda p, xs: recurrent.rnn(cell, projection="fused").apply(p, xs)[1],
    }
    for k in (2, 4, 8):
        fns[f"fused_unroll{k}"] = lambda p, xs, k=k: recurrent.rnn(cell, projection="fused", unroll=k).apply(p, xs)[1]
    fns["hoisted_unroll4"] = lambda p, xs: recurrent.rnn(cell, projection="hoisted", unroll=4).apply(p, xs)[1]

    def hoisted_bm(p, xs):
        xp = jnp.moveaxis(xs @ p.input_kernel + p.bias, 1, 0)
        B = xs.shape[0]
        carry = (jnp.zeros((B, hidden)), jnp.zeros((B, hidden)))

        def body(carry, xp_t):
            h, c = carry
            h, c = _lstm_math(xp_t + h @ p.recurrent_kernel, c)
            return (h, c), h

        return jnp.moveaxis(lax.scan(body, carry, xp)[1], 0, 1)

    def concat(p, xs):
        W = jnp.concatenate([p.input_kernel, p.recurrent_kernel], axis=0)
        B = xs.shape[0]
        carry = (jnp.zeros((B, hidden)), jnp.zeros((B, hidden)))

        def body(carry, x_t):
            h, c = carry
            h, c = _lstm_math(jnp.concatenate([x_t, h], -1) @ W + p.bias, c)
            return (h, c), h

        return jnp.moveaxis(lax.scan(body, carry, jnp.moveaxis(xs, 1, 0))[1], 0, 1)

    def bf16_product(p, xs):  # bfloat16 operands and a bfloat16 product (before `_core.matmul`)
        bf = jnp.bfloat16
        W, U = p.input_kernel.astype(bf), p.recurrent_kernel.astype(bf)
        B = xs.shape[0]
        carry = (jnp.zeros((B, hidden), bf), jnp.zeros((B, hidden)))

        def body(carry, x_t):
            h, c = carry
            z = (x_t.astype(bf) @ W).astype(jnp.float32) + p.bias + (h @ U).astype(jnp.float32)
            h, c = _lstm_math(z, c)
            return (h.astype(bf), c), h.astype(bf)

        return jnp.moveaxis(lax.scan(body, carry, jnp.moveaxis(xs, 1, 0))[1], 0, 1)

    fns["hoisted_bm"] = hoisted_bm
    fns["concat"] = concat
    fns["vjp"] = lambda p, xs: recurrent.rnn(cell, implementation="vjp").apply(p, xs)[1]
    bf16_cell = recurrent.lstm(hidden, dtype=jnp.bfloat16)
    fns["bf16_product"] = bf16_product
    fns["bf16"] = lambda p, xs: recurrent.rnn(bf16_cell).apply(p, xs)[1]
    fns["bf16_vjp"] = lambda p, xs: recurrent.rnn(bf16_cell, implementation="vjp").apply(p, xs)[1]
    general = recurrent.lstm(hidden, input_activation=lambda x: jnp.tanh(x))
    fns["autodiff_pointwise"] = lambda p, xs: recurrent.rnn(general, projection="fused").apply(p, xs)[1]

    def autodiff_kernel(p, xs):  # traced (and so differentiated) with the plain matmul
        with autodiff_kernel_matmul():
            return recurrent.rnn(cell, projection="fused").apply(p, xs)[1]

    fns["autodiff_kernel"] = autodiff_kernel
    return fns


def _flax(hidden):
    import flax.linen as nn

    from benchmarks.rnn_vs_flax import to_flax

    rnn = nn.RNN(nn.OptimizedLSTMCell(hidden))
    return lambda p, xs: rnn.apply(to_flax(p), xs)


def run(batch, steps, features, hidden, *, repeats=7, number=3):
    params = recurrent.lstm(hidden).init(jax.random.key(0), (features,))
    xs = jax.random.normal(jax.random.key(1), (batch, steps, features))
    forwards = contenders(hidden)
    forwards["flax"] = _flax(hidden)
    compiled, compile_s, temp_mb = {}, {}, {}
    for name, fwd in forwards.items():
        for wl, fn in (("forward", fwd), ("forward+backward", jax.grad(lambda p, x, f=fwd: jnp.mean(f(p, x)), (0, 1)))):
            t0 = time.perf_counter()
            compiled[name, wl] = jax.jit(fn).lower(params, xs).compile()
            compile_s[name, wl] = time.perf_counter() - t0
            memory = compiled[name, wl].memory_analysis()
            temp_mb[name, wl] = None if memory is None else memory.temp_size_in_bytes / 2**20
    ref = compiled["hoisted", "forward"](params, xs)
    for name in forwards:
        diff = float(jnp.max(jnp.abs(compiled[name, "forward"](params, xs) - ref)))
        assert diff < (3e-2 if name.startswith("bf16") else 1e-4), (name, diff)
        jax.block_until_ready(compiled[name, "forward+backward"](params, xs))
    names = list(forwards)
    calls = {key: lambda f=f: jax.block_until_ready(f(params, xs)) for key, f in compiled.items()}
    samples = interleaved(calls, repeats, number)
    rows = []
    for wl in ("forward", "forward+backward"):
        base = statistics.median(samples["hoisted", wl])
        for name in names:
            ms = statistics.median(samples[name, wl])
            rows.append(
                {
                    "workload": wl,
                    "technique": name,
                    "ms": ms,
                    "ratio_to_hoisted": ms / base,
                    "compile_s": compile_s[name, wl],
                    "temp_mb": temp_mb[name, wl],
                    "samples_ms": samples[name, wl],
                }
            )
    return {
        "shape": dict(batch=batch, steps=steps, features=features, hidden=hidden),
        "device": str(jax.devices()[0]),
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    result = run(**shape, repeats=args.repeats or (2 if args.quick else 7), number=1 if args.quick else 3)
    print(f"{shape}, {result['device']}, load {result['load_average'][0]:.1f}")
    print("| workload | technique | ms | /hoisted | compile s | temp MB |\n|---|---|--:|--:|--:|--:|")
    for r in result["rows"]:
        temp = "–" if r["temp_mb"] is None else f"{r['temp_mb']:.1f}"
        numbers = (f"{r['ms']:.2f}", f"{r['ratio_to_hoisted']:.2f}", f"{r['compile_s']:.2f}", temp)
        cells = (r["workload"], r["technique"], *numbers)
        print("| " + " | ".join(cells) + " |")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
