"""The optional native LSTM kernel (XLA FFI custom calls, oneDNN inside) against PyTorch's
``nn.LSTM`` and our ``lax.scan`` and ``implementation="vjp"`` layers, interleaved in one process.

Run ``python -m benchmarks.native [--quick] [--repeats=N] [--threads=N] [--dtype=float32|bfloat16]
[--out=DIR]`` after building the kernel (``python -m recurrent.native.build``). With
``--dtype=bfloat16`` our layers compute in bfloat16 with float32 parameters and state
(``recurrent.lstm(H, dtype=jnp.bfloat16)``), PyTorch runs twice: in float32 (``torch``, the
reference of every ratio) and under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(``torch_bf16``, its bfloat16 counterpart, to which each row's ``*_over_torch_bf16`` ratios refer).
Figures per contender: ``fwd_ms``
(``xs -> ys``; PyTorch under ``no_grad``) and ``fwdbwd_ms`` (the gradient of ``mean(ys)`` with
respect to the parameters and ``xs``), medians over interleaved repeats, and each one's ratio to
PyTorch's median and the median of its per-repeat ratios (paired: both saw the same load); the same
for the process's CPU time per call (``*_cpu_ms``), which other jobs on the machine disturb less
than the wall-clock time when every contender runs one thread. Before
timing, the native layer's outputs and gradients are compared with the scan's. ``--quick`` shrinks
the shape (a smoke test). On a machine that other jobs load, ``--threads=1`` (one thread for
PyTorch, XLA and oneDNN) is the comparison to trust: threads that wait for each other at every
step (OpenMP, TBB) lose whole time slices to the other jobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import recurrent
from benchmarks import suite
from benchmarks._common import calls_per_sample, interleaved, write_json

SHAPE = dict(batch=32, steps=128, features=128, hidden=256)
QUICK = dict(batch=2, steps=5, features=3, hidden=4)


def _ours(layer_fn, H, params, xs):
    def forward(p, x):
        return layer_fn(p, x)[1]

    fwd, bwd, _, _ = suite._jax_contender(forward, params, xs)
    return fwd, bwd


def torch_autocast(B, T, F, H, xs, threads):
    """PyTorch's float32 ``nn.LSTM`` under ``torch.autocast("cpu", dtype=torch.bfloat16)``: what a
    PyTorch user asking for bfloat16 compute runs. ``(forward, forward_backward)``."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    model = torch.nn.LSTM(F, H, batch_first=True)
    x = torch.from_numpy(np.array(xs)).requires_grad_(True)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731

    def forward():
        torch.set_num_threads(threads)
        with torch.no_grad(), autocast():
            model(x)

    def forward_backward():
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)
        x.grad = None
        with autocast():
            ys = model(x)[0]
        ys.float().mean().backward()

    return forward, forward_backward


def contenders(B, T, F, H, xs, threads, dtype="float32"):
    from recurrent import native

    compute = None if dtype == "float32" else jnp.dtype(dtype)
    cell = recurrent.lstm(H, dtype=compute)
    params = cell.init(jax.random.key(0), (F,))
    scan = recurrent.rnn(cell)
    vjp = recurrent.rnn(cell, implementation="vjp")

    def native_apply(p, x):
        carry = cell.initial_carry(p, x[:, 0].shape)
        return native.apply(p, x, None, carry, compute)

    out = {"torch": suite.torch_rnn("lstm", B, T, F, H, 1, xs, threads=threads)[:2]}
    if dtype == "bfloat16":
        out["torch_bf16"] = torch_autocast(B, T, F, H, xs, threads)
    out.update(
        ours_scan=_ours(scan.apply, H, params, xs),
        ours_vjp=_ours(vjp.apply, H, params, xs),
        native=_ours(native_apply, H, params, xs),
    )
    return out, (scan, native_apply, params)


def agreement(scan, native_apply, params, xs) -> dict[str, float]:
    """Largest absolute differences of the native layer's outputs and gradients from the scan's."""

    def loss(apply):
        return lambda p, x: jnp.mean(apply(p, x)[1])

    def diff(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    ys_s, ys_n = jax.jit(scan.apply)(params, xs)[1], jax.jit(native_apply)(params, xs)[1]
    g_s = jax.jit(jax.grad(loss(scan.apply), argnums=(0, 1)))(params, xs)
    g_n = jax.jit(jax.grad(loss(native_apply), argnums=(0, 1)))(params, xs)
    return {"ys": diff(ys_s, ys_n), "grad": max(jax.tree.leaves(jax.tree.map(diff, g_s, g_n)))}


def _cpu_timed(fn, sink: list[float]):
    """``fn`` that also appends the process's CPU seconds of each call to ``sink``."""

    def call():
        t = time.process_time()
        out = fn()
        sink.append(time.process_time() - t)
        return out

    return call


def _ratios(samples, name: str, w: str, suffix: str = "", peer: str = "torch") -> dict[str, float]:
    """Median (ms), ratio of medians to the peer's (PyTorch's) and median of per-repeat ratios to it."""
    mine, torch = samples[name, w], samples[peer, w]
    paired = [a / b for a, b in zip(mine, torch)]
    over = f"{w}{suffix}_over_{peer}"
    return {
        f"{w}{suffix}_ms": round(statistics.median(mine), 3),
        over: round(statistics.median(mine) / statistics.median(torch), 3),
        f"{over}_paired": round(statistics.median(paired), 3),
    }


def single_thread(threads: int) -> None:
    """With one thread, XLA's CPU runtime and oneDNN's SYCL CPU device get one too (before JAX
    starts its backend), and the process is pinned to one core: oneDNN's GEMMs (``dnnl_sgemm``,
    ``dnnl_gemm_bf16bf16f32``) run on TBB, which takes every core the process may use and has no
    setting of its own. A comparison that a loaded machine disturbs less."""
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        os.environ.setdefault("SYCL_CPU_NUM_CUS", "1")
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads; 1 makes XLA and oneDNN use one")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    single_thread(args.threads)
    from recurrent import native

    why = native.reason()
    if why is not None:
        parser.error(why)
    s = QUICK if args.quick else SHAPE
    B, T, F, H = s["batch"], s["steps"], s["features"], s["hidden"]
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    built, (scan, native_apply, params) = contenders(B, T, F, H, xs, args.threads, args.dtype)
    diff = agreement(scan, native_apply, params, xs)
    calls = {}
    for name, (fwd, bwd) in built.items():
        calls[name, "fwd"], calls[name, "fwdbwd"] = fwd, bwd
    for fn in calls.values():  # warm up (and first-call JIT of oneDNN's kernels)
        fn()
    number = {key: calls_per_sample(fn) for key, fn in calls.items()}
    cpu_calls = {key: [] for key in calls}
    samples = interleaved(
        {key: _cpu_timed(fn, cpu_calls[key]) for key, fn in calls.items()}, 3 if args.quick else args.repeats, number
    )
    cpu = {
        key: [1e3 * sum(v[i : i + number[key]]) / number[key] for i in range(0, len(v), number[key])]
        for key, v in cpu_calls.items()
    }
    rows = {}
    for name in built:
        rows[name] = {}
        for w in ("fwd", "fwdbwd"):
            rows[name].update(_ratios(samples, name, w))
            rows[name].update(_ratios(cpu, name, w, "_cpu"))
            if "torch_bf16" in built:
                rows[name].update(_ratios(samples, name, w, peer="torch_bf16"))
                rows[name].update(_ratios(cpu, name, w, "_cpu", peer="torch_bf16"))
    print(f"shape B={B} T={T} F={F} H={H}, compute {args.dtype}, torch threads={args.threads}, cores={suite.CORES}")
    print(f"native vs scan: max |dys| = {diff['ys']:.2e}, max |dgrad| = {diff['grad']:.2e}")
    print("ratios: of the medians, and (paired) the median over repeats of each repeat's ratio")
    peers = ("torch", "torch_bf16") if "torch_bf16" in built else ("torch",)
    head = "".join(f"{'/' + p:>12}{'paired':>8}" for p in peers)
    print(f"{'contender':<12}{'fwd_ms':>9}{head}{'fwdbwd_ms':>11}{head}")
    for suffix, title in (("", "wall-clock"), ("_cpu", "CPU time of the process")):
        print(f"{title}:")
        for name, r in rows.items():
            line = f"{name:<12}"
            for w in (f"fwd{suffix}", f"fwdbwd{suffix}"):
                line += f"{r[w + '_ms']:>{9 if w.startswith('fwd') and 'bwd' not in w else 11}.2f}"
                for p in peers:
                    line += f"{r[f'{w}_over_{p}']:>12.2f}{r[f'{w}_over_{p}_paired']:>8.2f}"
            print(line)
    result = {
        "shape": dict(batch=B, steps=T, features=F, hidden=H),
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": len(next(iter(samples.values()))),
        "machine": platform.processor() or platform.machine(),
        "agreement": diff,
        "rows": rows,
        "samples_ms": {f"{c}/{w}": v for (c, w), v in samples.items()},
        "cpu_samples_ms": {f"{c}/{w}": v for (c, w), v in cpu.items()},
    }
    if args.out:
        write_json(os.path.join(args.out, "native.json"), result)
    return result


if __name__ == "__main__":
    main()
