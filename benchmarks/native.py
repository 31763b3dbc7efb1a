"""The optional native LSTM and GRU kernels (XLA FFI custom calls, oneDNN inside) against PyTorch's
``nn.LSTM`` / ``nn.GRU`` and our ``lax.scan`` and ``implementation="vjp"`` layers, interleaved in one
process.

Run ``python -m benchmarks.native [--cell=lstm|gru] [--layout=single|bidirectional|population]
[--members=M] [--quick] [--repeats=N] [--threads=N] [--dtype=float32|bfloat16]
[--inputs=differentiated|data] [--out=DIR]`` after building the kernel (``python -m
recurrent.native.build``). ``--cell=gru`` times ``recurrent.gru(H)`` (``reset_after=True``, PyTorch's
form) against ``nn.GRU``. ``--layout=bidirectional`` times ``bidirectional(rnn(lstm(H)))``, whose
two directions the native kernel runs in one call (one thread each), against
``nn.LSTM(bidirectional=True)``; ``--layout=population`` a ``jax.vmap``-ed population of
``--members`` LSTMs (own parameters, the same input; one native call) against as many ``nn.LSTM``
run one after another. ``--threads`` defaults to the cores. With
``--dtype=bfloat16`` our layers compute in bfloat16 with float32 parameters and state
(``recurrent.lstm(H, dtype=jnp.bfloat16)``, or the GRU's), PyTorch runs twice: in float32 (``torch``, the
reference of every ratio) and under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(``torch_bf16``, its bfloat16 counterpart, to which each row's ``*_over_torch_bf16`` ratios refer).
Figures per contender: ``fwd_ms`` (``xs -> ys``; PyTorch under ``no_grad``) and ``fwdbwd_ms`` (the
gradient of ``mean(ys)`` with respect to the parameters and ``xs``; with ``--inputs=data``, a
network's first layer, with respect to the parameters only, PyTorch's input requiring no gradient),
medians over interleaved repeats, and each one's ratio to PyTorch's median and the median of its
per-repeat ratios (paired: both saw the same load); the same for the process's CPU time per call
(``*_cpu_ms``), which other jobs on the machine disturb less than the wall-clock time when every
contender runs one thread. Before timing, the native layer's outputs and gradients are compared with
the scan's. ``--quick`` shrinks the shape (a smoke test). On a machine that other jobs load,
``--threads=1`` (one thread for PyTorch, XLA and oneDNN) is the comparison to trust: threads that wait
for each other at every step (OpenMP, TBB) lose whole time slices to the other jobs.
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


def _ours(layer_fn, H, params, xs, input_grad=True):
    def forward(p, x):
        return layer_fn(p, x)[1]

    fwd, bwd, _, _ = suite._jax_contender(forward, params, xs, (0, 1) if input_grad else 0)
    return fwd, bwd


def torch_autocast(B, T, F, H, xs, threads, cell="lstm", input_grad=True):
    """PyTorch's float32 ``nn.LSTM`` (``nn.GRU``) under ``torch.autocast("cpu", dtype=torch.bfloat16)``: what a
    PyTorch user asking for bfloat16 compute runs. ``(forward, forward_backward)``."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    model = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](F, H, batch_first=True)
    x = torch.from_numpy(np.array(xs)).requires_grad_(input_grad)
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


def contenders(B, T, F, H, xs, threads, dtype="float32", cell_name="lstm", input_grad=True):
    from recurrent import native
    from recurrent.native import _gru as native_gru

    compute = None if dtype == "float32" else jnp.dtype(dtype)
    cell = {"lstm": recurrent.lstm, "gru": recurrent.gru}[cell_name](H, dtype=compute)
    params = cell.init(jax.random.key(0), (F,))
    scan = recurrent.rnn(cell)
    vjp = recurrent.rnn(cell, implementation="vjp")
    native_layer = {"lstm": native.apply, "gru": native_gru.apply}[cell_name]

    def native_apply(p, x):
        carry = cell.initial_carry(p, x[:, 0].shape)
        return native_layer(p, x, None, carry, compute)

    out = {"torch": suite.torch_rnn(cell_name, B, T, F, H, 1, xs, threads=threads, input_grad=input_grad)[:2]}
    if dtype == "bfloat16":
        out["torch_bf16"] = torch_autocast(B, T, F, H, xs, threads, cell_name, input_grad)
    out.update(
        ours_scan=_ours(scan.apply, H, params, xs, input_grad),
        ours_vjp=_ours(vjp.apply, H, params, xs, input_grad),
        native=_ours(native_apply, H, params, xs, input_grad),
    )
    return out, (scan, native_apply, params)


def torch_layout(layout, B, T, F, H, xs, threads, members, autocast=False, input_grad=True):
    """PyTorch's peer of a ``--layout``: ``nn.LSTM(bidirectional=True)``, or ``members`` separate
    ``nn.LSTM`` run one after another on the same input (a population); float32, or under
    ``torch.autocast("cpu", dtype=torch.bfloat16)``. ``(forward, forward_backward)``."""
    import contextlib

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    if layout == "bidirectional":
        models = [torch.nn.LSTM(F, H, batch_first=True, bidirectional=True)]
    else:
        models = [torch.nn.LSTM(F, H, batch_first=True) for _ in range(members)]
    x = torch.from_numpy(np.array(xs)).requires_grad_(input_grad)
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def forward():
        torch.set_num_threads(threads)
        with torch.no_grad(), context():
            for m in models:
                m(x)

    def forward_backward():
        torch.set_num_threads(threads)
        for m in models:
            m.zero_grad(set_to_none=True)
        x.grad = None
        with context():
            ys = [m(x)[0] for m in models]
        (sum(y.float().mean() for y in ys) / len(ys)).backward()

    return forward, forward_backward


def layout_contenders(layout, B, T, F, H, xs, threads, dtype="float32", members=4, input_grad=True):
    """The contenders of ``--layout=bidirectional`` (``bidirectional(rnn(lstm(H)))``: the native
    kernel runs both directions in one call) or ``--layout=population`` (``members`` LSTMs of their
    own parameters over the same input, ``jax.vmap``-ed: the native kernel runs them all in one
    call, one thread per layer), with our scan and PyTorch's peer (:func:`torch_layout`)."""
    from types import SimpleNamespace

    compute = None if dtype == "float32" else jnp.dtype(dtype)
    cell = recurrent.lstm(H, dtype=compute)
    if layout == "bidirectional":
        scan = recurrent.bidirectional(recurrent.rnn(cell))
        native_layer = recurrent.bidirectional(recurrent.rnn(cell, implementation="native"))
        params = scan.init(jax.random.key(0), (F,))
    else:
        params = jax.vmap(lambda k: cell.init(k, (F,)))(jax.random.split(jax.random.key(0), members))

        def population(layer):
            return SimpleNamespace(apply=jax.vmap(layer.apply, (0, None)))

        scan = population(recurrent.rnn(cell))
        native_layer = population(recurrent.rnn(cell, implementation="native"))
    out = {"torch": torch_layout(layout, B, T, F, H, xs, threads, members, input_grad=input_grad)}
    if dtype == "bfloat16":
        out["torch_bf16"] = torch_layout(layout, B, T, F, H, xs, threads, members, autocast=True, input_grad=input_grad)
    out.update(
        ours_scan=_ours(scan.apply, H, params, xs, input_grad),
        native=_ours(native_layer.apply, H, params, xs, input_grad),
    )
    return out, (scan, native_layer.apply, params)


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
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm", help="the layer to time")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="PyTorch's threads (default: the cores); 1 makes XLA and oneDNN use one",
    )
    parser.add_argument(
        "--layout",
        choices=("single", "bidirectional", "population"),
        default="single",
        help="one layer; bidirectional (both directions in one native call) against nn.LSTM(bidirectional=True); "
        "a vmapped population of --members layers (one native call) against PyTorch's LSTMs in a loop (LSTM only)",
    )
    parser.add_argument("--members", type=int, default=4, help="the population's size (--layout=population)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="our compute dtype")
    parser.add_argument(
        "--inputs",
        choices=("differentiated", "data"),
        default="differentiated",
        help="training's gradient w.r.t. the parameters and the inputs, or (data: a network's first layer) "
        "the parameters only, the inputs not requiring a gradient in PyTorch either",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = suite.CORES
    if args.layout != "single" and args.cell != "lstm":
        parser.error("--layout=bidirectional and population run the LSTM only")
    single_thread(args.threads)
    from recurrent import native

    why = native.reason()
    if why is not None:
        parser.error(why)
    s = QUICK if args.quick else SHAPE
    B, T, F, H = s["batch"], s["steps"], s["features"], s["hidden"]
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    input_grad = args.inputs == "differentiated"
    if args.layout == "single":
        built, (scan, native_apply, params) = contenders(
            B, T, F, H, xs, args.threads, args.dtype, args.cell, input_grad
        )
    else:
        built, (scan, native_apply, params) = layout_contenders(
            args.layout, B, T, F, H, xs, args.threads, args.dtype, args.members, input_grad
        )
    diff = agreement(scan, native_apply, params, xs)
    skipped = {}
    for name, pair in list(built.items()):  # warm up (and first-call JIT of oneDNN's kernels)
        try:
            for fn in pair:
                fn()
        except RuntimeError as e:  # PyTorch's bfloat16 LSTM needs AVX-512: a peer that cannot run is reported
            if name != "torch_bf16":
                raise
            skipped[name] = f"{type(e).__name__}: {e}"[:200]
            del built[name]
            print(f"{name}: skipped, it does not run here: {skipped[name]}")
    calls = {}
    for name, (fwd, bwd) in built.items():
        calls[name, "fwd"], calls[name, "fwdbwd"] = fwd, bwd
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
    layout = {"single": "", "bidirectional": ", bidirectional", "population": f", population of {args.members}"}
    print(
        f"{args.cell}{layout[args.layout]}: shape B={B} T={T} F={F} H={H}, compute {args.dtype}, "
        f"torch threads={args.threads}, cores={suite.CORES}, inputs {args.inputs}"
    )
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
        "cell": args.cell,
        "layout": args.layout,
        "members": args.members if args.layout == "population" else None,
        "shape": dict(batch=B, steps=T, features=F, hidden=H),
        "dtype": args.dtype,
        "inputs": args.inputs,
        "threads": args.threads,
        "repeats": len(next(iter(samples.values()))),
        "machine": platform.processor() or platform.machine(),
        "agreement": diff,
        "rows": rows,
        "skipped": skipped,
        "samples_ms": {f"{c}/{w}": v for (c, w), v in samples.items()},
        "cpu_samples_ms": {f"{c}/{w}": v for (c, w), v in cpu.items()},
    }
    if args.out:
        name = "native" if args.cell == "lstm" else f"native_{args.cell}"
        name += "" if args.layout == "single" else f"_{args.layout}"
        write_json(os.path.join(args.out, f"{name}.json"), result)
    return result


if __name__ == "__main__":
    main()
