"""Three effects of XLA's CPU runtime that bound a recurrent layer's speed there, and the floor they leave.

Run ``python -m benchmarks.xla_cpu_effects [--batch 32 --hidden 256 --steps 128] [--repeats N]
[--quick] [--out PATH.json]``.

Each figure is a ``lax.scan`` over ``steps`` steps of an LSTM-sized step (batch ``B``, hidden
``H``, four gates), timed in one interleaved run and reported per step:

1. **Gate slices.** The LSTM's gate arithmetic (three sigmoids, two tanh, the cell update) on
   the four ``(B, H)`` column blocks of one per-step ``(B, 4H)`` slice of a ``(T, B, 4H)``
   array, against the same arithmetic on four ``(T, B, H)`` arrays. XLA fuses either into one
   kernel; the first kind runs several times slower. This is why the hand-written backward
   passes (``implementation="vjp"``) store each gate separately, and why a projection hoisted
   out of the loop (whose per-step slice is split into gates) loses on CPU.
2. **A matmul after other work.** One per-step ``(B, H) @ (H, 4H)`` matmul followed by ``k``
   small elementwise kernels: the matmul's own cost (the step with it minus the step
   without) grows with ``k``. The matmul runs on the intra-op thread pool, whose idle threads
   sleep within microseconds; once the work between two matmuls outlasts that, each matmul
   first waits for its helper thread to wake. A recurrent step always has such work between
   its matmuls, so the second core helps them little. oneDNN's LSTM (PyTorch) keeps its
   OpenMP threads spinning for the whole sequence.
3. **Matmul throughput by shape**, in GFLOP/s: the per-step matmul back to back in a loop,
   the hoisted projection ``(T*B, F) @ (F, 4H)`` and a large square matmul (the peak).
4. **The floor of a forward pass**, for the LSTM and the GRU: a loop holding only the
   recurrence, each step's ``h @ U`` and the gate arithmetic, and its stacked outputs (no input
   projection), against the library's whole layer and, when PyTorch is installed, PyTorch's whole
   ``nn.LSTM``/``nn.GRU`` forward (oneDNN, threads = cores) on ``(B, T, F)`` inputs. Where the
   floor alone takes longer than PyTorch's layer, a layer built on XLA's loop cannot match
   PyTorch's forward on this machine, whatever it does with the input.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks._common import calls_per_sample, int_list, interleaved, write_json

QUICK = dict(batch=2, hidden=8, steps=4, features=4, square=64)


def _lstm_update(i, f, g, o, c):
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def gate_slices(B, H, T):
    """``{name: (function, args)}``: the gate arithmetic on column slices of one array, and on
    four separate arrays (the same numbers)."""
    zs = jax.random.normal(jax.random.key(0), (T, B, 4 * H))
    h0 = jnp.zeros((B, H))

    def sliced(zs):
        def body(carry, z):
            return _lstm_update(*jnp.split(z, 4, axis=-1), carry[1]), None

        return lax.scan(body, (h0, h0), zs)[0]

    def separate(parts):
        def body(carry, z):
            return _lstm_update(*z, carry[1]), None

        return lax.scan(body, (h0, h0), parts)[0]

    return {
        "gates: column slices of one (T, B, 4H) array": (sliced, (zs,)),
        "gates: four (T, B, H) arrays": (separate, (tuple(jnp.split(zs, 4, axis=-1)),)),
    }


def matmul_after_work(B, H, T, ks):
    """``{(k, with_matmul): (function, args)}``: a step of one ``(B, H) @ (H, 4H)`` matmul
    (or none) followed by ``k`` elementwise kernels, kept apart by optimisation barriers."""
    U = jax.random.normal(jax.random.key(1), (H, 4 * H)) / H**0.5
    h0 = jnp.zeros((B, H))
    out = {}
    for k in ks:
        for with_matmul in (True, False):

            def run(U, k=k, with_matmul=with_matmul):
                def body(h, _):
                    g = (h @ U)[:, :H] if with_matmul else h * 1.0001
                    for _ in range(k):
                        g = lax.optimization_barrier(jnp.tanh(g))
                    return g, None

                return lax.scan(body, h0, None, length=T)[0]

            out[k, with_matmul] = (run, (U,))
    return out


def throughput(B, H, T, F, n):
    """``{name: (function, args, flops)}`` of three matmul shapes."""
    k = jax.random.split(jax.random.key(2), 4)
    U = jax.random.normal(k[0], (H, 4 * H))
    h0 = jax.random.normal(k[1], (B, H))
    W = jax.random.normal(k[2], (F, 4 * H))
    xs = jax.random.normal(k[3], (T * B, F))
    a = jax.random.normal(k[0], (n, n))

    def per_step(U):  # the per-step matmul back to back, as little else as possible in the loop
        return lax.scan(lambda h, _: ((h @ U)[:, :H], None), h0, None, length=T)[0]

    return {
        f"per-step ({B}, {H}) @ ({H}, {4 * H}), in a loop": (per_step, (U,), 2 * B * H * 4 * H * T),
        f"projection ({T * B}, {F}) @ ({F}, {4 * H})": (jnp.dot, (xs, W), 2 * T * B * F * 4 * H),
        f"square ({n}, {n}) @ ({n}, {n})": (jnp.dot, (a, a), 2 * n**3),
    }


def _lstm_floor_step(z, c):
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _gru_floor_step(z, h):
    r, u, n = jnp.split(z, 3, axis=-1)
    r, u = jax.nn.sigmoid(r), jax.nn.sigmoid(u)
    n = jnp.tanh(r * n)
    return u * h + (1.0 - u) * n


def forward_floor(kind, B, H, T):
    """``(function, args)``: ``T`` steps of ``kind``'s recurrence alone, ``h @ U`` and the gate
    arithmetic with no input, returning the ``(T, B, H)`` outputs as a layer does."""
    G = 4 if kind == "lstm" else 3
    U = jax.random.normal(jax.random.key(3), (H, G * H)) / H**0.5
    h0 = jax.random.normal(jax.random.key(4), (B, H))

    def run(U):
        if kind == "lstm":

            def body(hc, _):
                hc = _lstm_floor_step(hc[0] @ U, hc[1])
                return hc, hc[0]

            return lax.scan(body, (h0, h0), None, length=T)[1]

        def body(h, _):
            h = _gru_floor_step(h @ U, h)
            return h, h

        return lax.scan(body, h0, None, length=T)[1]

    return run, (U,)


def _layer_forwards(kind, B, H, T, F):
    """``{name: blocking call}``: the library's layer and, if installed, PyTorch's, forward."""
    from benchmarks import suite

    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    out = {"library": suite.ours(kind, B, T, F, H, 1, xs)[0]}
    try:
        out["torch"] = suite.torch_rnn(kind, B, T, F, H, 1, xs)[0]
    except ImportError:
        pass
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--features", type=int, default=128, help="inputs of the hoisted projection")
    parser.add_argument("--work", default="0,1,2,4,8", help="numbers of elementwise kernels after the matmul")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke test")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    ks = int_list(parser, "--work", args.work, least=0, example="0,2,8")
    B, H, T, F, n = args.batch, args.hidden, args.steps, args.features, 2048
    repeats = args.repeats
    if args.quick:
        B, H, T, F, n = (QUICK[k] for k in ("batch", "hidden", "steps", "features", "square"))
        repeats = 2

    slices = gate_slices(B, H, T)
    after = matmul_after_work(B, H, T, ks)
    mm = throughput(B, H, T, F, n)
    jobs = {("slices", name): fa for name, fa in slices.items()}
    jobs.update({("after", key): fa for key, fa in after.items()})
    jobs.update({("mm", name): fa[:2] for name, fa in mm.items()})
    floors = ("lstm", "gru")
    jobs.update({("floor", kind): forward_floor(kind, B, H, T) for kind in floors})
    calls = {}
    for key, (fn, fargs) in jobs.items():
        compiled = jax.jit(fn).lower(*fargs).compile()
        calls[key, 0] = lambda compiled=compiled, fargs=fargs: jax.block_until_ready(compiled(*fargs))
    for kind in floors:
        for name, fn in _layer_forwards(kind, B, H, T, F).items():
            calls[("layer", (kind, name)), 0] = fn
    for fn in calls.values():  # warm up
        fn()
    samples = interleaved(calls, repeats, {key: calls_per_sample(fn) for key, fn in calls.items()})
    ms = {key: statistics.median(samples[key, 0]) for key, _ in samples}

    result = {
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "shape": dict(batch=B, hidden=H, steps=T, features=F),
        "repeats": repeats,
    }
    per_step = lambda t_ms: t_ms * 1e3 / T  # noqa: E731  (microseconds per step)
    names = list(slices)
    result["gate_slices_us_per_step"] = {name: per_step(ms["slices", name]) for name in names}
    result["gate_slices_ratio"] = ms["slices", names[0]] / ms["slices", names[1]]
    result["matmul_after_work"] = [
        {
            "kernels_between": k,
            "step_us": per_step(ms["after", (k, True)]),
            "work_us": per_step(ms["after", (k, False)]),
            "matmul_us": per_step(ms["after", (k, True)] - ms["after", (k, False)]),
        }
        for k in ks
    ]
    result["gflops"] = {name: flops / (ms["mm", name] / 1e3) / 1e9 for name, (_, _, flops) in mm.items()}
    result["forward_floor_ms"] = {
        kind: {
            "recurrence_alone": ms["floor", kind],
            **{key[1][1]: t for key, t in ms.items() if key[0] == "layer" and key[1][0] == kind},
        }
        for kind in floors
    }
    result["load_average"] = os.getloadavg()[0]

    print(f"batch {B}, hidden {H}, {T} steps; medians of {repeats} interleaved repeats (us per step)")
    print("1. gate arithmetic in a loop")
    for name, us in result["gate_slices_us_per_step"].items():
        print(f"   {name:48s} {us:8.1f} us")
    print(f"   slices / separate: {result['gate_slices_ratio']:.2f}x")
    print("2. a per-step matmul followed by k elementwise kernels")
    for row in result["matmul_after_work"]:
        print(
            f"   k = {row['kernels_between']:2d}: step {row['step_us']:7.1f} us, the k kernels alone "
            f"{row['work_us']:7.1f} us, so the matmul {row['matmul_us']:7.1f} us"
        )
    print("3. matmul throughput")
    for name, g in result["gflops"].items():
        print(f"   {name:48s} {g:8.1f} GFLOP/s")
    print(f"4. forward floor: the recurrence alone ({T} steps of h @ U, the gates, the outputs), whole layers (ms)")
    for kind, row in result["forward_floor_ms"].items():
        others = ", ".join(f"{name} layer {t:.2f}" for name, t in row.items() if name != "recurrence_alone")
        vs = f" ({row['recurrence_alone'] / row['torch']:.2f}x PyTorch's layer)" if "torch" in row else ""
        print(f"   {kind}: recurrence alone {row['recurrence_alone']:.2f}{vs}; {others}")
    print(f"(load average {result['load_average']:.1f})")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
