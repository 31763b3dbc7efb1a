"""oneDNN's float32 GEMM (``dnnl_sgemm``, what the native LSTM kernel calls) at the kernel's shapes.

Run ``python -m benchmarks.onednn_gemm [--batch 32] [--steps 128] [--features 128] [--hidden 256]
[--repeats 9] [--out PATH.json]`` where ``.[native]`` is installed.

Times each GEMM of one LSTM layer's training call as the kernel runs it (row-major, oneDNN's own
threads = the cores), interleaved, and reports GFLOP/s: the input projection ``x W``, the per-step
``h U`` of one thread's share of the gate columns and ``dz U^T`` of one thread's share of the units
(both run single-threaded inside the kernel's parallel region, so timed on one thread here), ``dx =
dZ W^T``, and the weight gradients both as one ``[x, h]^T dZ`` into ``[dW; dU]`` and as the two
GEMMs ``x^T dZ`` and ``h^T dZ`` the kernel runs on other CPUs (on 2 AVX2 cores the one GEMM ran at
about 47 GFLOP/s, its halves at about 61). Where the kernel is built and the CPU has AVX2 and FMA, the
kernel's own blocked GEMM (what it runs for ``x W``, ``dx`` and ``[x, h]^T dZ`` on AVX2 CPUs without
AVX-512) is timed at the same products in the same run, with its ratio to oneDNN's time. Numbers
depend on the CPU; the point is the comparison in one run.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics

import numpy as np

from benchmarks._common import interleaved, write_json


def _sgemm():
    from recurrent.native import build

    prefix = build.onednn_prefix()
    if prefix is None:
        raise SystemExit(f"benchmarks.onednn_gemm: {build.missing()}")
    lib = ctypes.CDLL(str(sorted((prefix / "lib").glob("libdnnl.so*"))[0]))
    fn = lib.dnnl_sgemm
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    fn.restype = ctypes.c_int

    def gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc):
        status = fn(ta, tb, M, N, K, 1.0, A.ctypes.data, lda, B.ctypes.data, ldb, beta, C.ctypes.data, ldc)
        if status != 0:
            raise RuntimeError(f"dnnl_sgemm failed with status {status}")

    return gemm


def _blocked_gemm():
    """The native kernel's own blocked GEMM (``recurrent_blocked_gemm``: C = op(A) B, or op(A) B + C
    with ``beta=1``, row-major), or None where the kernel is not built or the CPU lacks AVX2 and FMA."""
    from recurrent import native

    if native.reason() is not None:
        return None
    fn = native._load().recurrent_blocked_gemm
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_char, i64, i64, i64, ptr, i64, ptr, i64, ctypes.c_float, ptr, i64]
    fn.restype = i64

    def gemm(ta, M, N, K, A, lda, B, ldb, C, ldc, beta=0.0):
        if fn(ta, M, N, K, A.ctypes.data, lda, B.ctypes.data, ldb, beta, C.ctypes.data, ldc) != 0:
            raise RuntimeError("this CPU has no AVX2 and FMA for the kernel's blocked GEMM")

    probe = np.zeros((1, 1), np.float32)
    try:
        gemm(b"N", 1, 1, 1, probe, 1, probe, 1, probe, 1)
    except RuntimeError:
        return None
    return gemm


def _omp_threads(lib_threads: int):
    """Sets oneDNN's (GNU OpenMP's) thread count for later calls."""
    gomp = ctypes.CDLL("libgomp.so.1")
    gomp.omp_set_num_threads(ctypes.c_int(lib_threads))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="write the medians as JSON to this file")
    args = parser.parse_args(argv)
    B, T, F, H = args.batch, args.steps, args.features, args.hidden
    G, R, cores = 4 * H, B * T, os.cpu_count() or 1
    share = -(-H // cores)  # one thread's units
    gemm = _sgemm()
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    x, W, U, dZ, XH, hs = arr(R, F), arr(F, G), arr(H, 4 * share), arr(R, G), arr(R, F + H), arr(R, H)
    Ut, h, dz, Wt = arr(G, share), arr(B, H), arr(B, G), arr(G, F)
    out = {
        name: np.empty(shape, np.float32)
        for name, shape in dict(
            A=(R, G), zh=(B, 4 * share), dh=(B, share), dx=(R, F), dWU=(F + H, G), dW=(F, G), dU=(H, G)
        ).items()
    }
    cases = {
        # name: (threads, flops, call)
        "x W": (cores, 2 * R * F * G, lambda: gemm(b"N", b"N", R, G, F, x, F, W, G, 0.0, out["A"], G)),
        "h U (one thread's columns)": (
            1,
            2 * B * H * 4 * share,
            lambda: gemm(b"N", b"N", B, 4 * share, H, h, H, U, 4 * share, 0.0, out["zh"], 4 * share),
        ),
        "dz U^T (one thread's units)": (
            1,
            2 * B * G * share,
            lambda: gemm(b"N", b"N", B, share, G, dz, G, Ut, share, 0.0, out["dh"], share),
        ),
        "dx = dZ W^T": (cores, 2 * R * G * F, lambda: gemm(b"N", b"N", R, F, G, dZ, G, Wt, F, 0.0, out["dx"], F)),
        "[x, h]^T dZ (one GEMM)": (
            cores,
            2 * R * (F + H) * G,
            lambda: gemm(b"T", b"N", F + H, G, R, XH, F + H, dZ, G, 0.0, out["dWU"], G),
        ),
        "x^T dZ, h^T dZ (two GEMMs)": (
            cores,
            2 * R * (F + H) * G,
            lambda: (
                gemm(b"T", b"N", F, G, R, x, F, dZ, G, 0.0, out["dW"], G),
                gemm(b"T", b"N", H, G, R, hs, H, dZ, G, 0.0, out["dU"], G),
            ),
        ),
    }

    blocked = _blocked_gemm()
    if blocked is not None:
        # The kernel's own blocked GEMM (common.h's BlockedGemm: what the kernel runs for these products
        # on AVX2 CPUs without AVX-512), at the same products, into its own outputs.
        out.update({f"{k}_blocked": np.empty_like(out[k]) for k in ("A", "dx", "dWU")})
        cases.update(
            {
                "x W (blocked)": (
                    cores,
                    2 * R * F * G,
                    lambda: blocked(b"N", R, G, F, x, F, W, G, out["A_blocked"], G),
                ),
                "dx = dZ W^T (blocked)": (
                    cores,
                    2 * R * G * F,
                    lambda: blocked(b"N", R, F, G, dZ, G, Wt, F, out["dx_blocked"], F),
                ),
                "[x, h]^T dZ (blocked)": (
                    cores,
                    2 * R * (F + H) * G,
                    lambda: blocked(b"T", F + H, G, R, XH, F + H, dZ, G, out["dWU_blocked"], G),
                ),
            }
        )

    def call(threads, fn):
        def run():
            _omp_threads(threads)
            fn()

        return run

    samples = interleaved({(name, "gemm"): call(t, fn) for name, (t, _, fn) in cases.items()}, args.repeats, number=3)
    print(f"oneDNN sgemm at B={B} T={T} F={F} H={H}, {cores} cores; median of {args.repeats} repeats")
    print(f"{'GEMM':32} {'threads':>7} {'ms':>8} {'GFLOP/s':>8}")
    rows = {}
    for name, (threads, flops, _) in cases.items():
        ms = statistics.median(samples[name, "gemm"])
        rows[name] = dict(threads=threads, ms=ms, gflops=flops / ms / 1e6)
        print(f"{name:32} {threads:>7} {ms:8.2f} {flops / ms / 1e6:8.1f}")
    # Each product against NumPy's (float64), relative to its largest entry: the binding is what it says.
    expected = dict(
        A=x @ W.astype(np.float64),
        zh=h @ U.astype(np.float64),
        dh=dz @ Ut.astype(np.float64),
        dx=dZ @ Wt.astype(np.float64),
        dWU=XH.T @ dZ.astype(np.float64),
        dW=x.T @ dZ.astype(np.float64),
        dU=hs.T @ dZ.astype(np.float64),
    )
    if blocked is not None:
        expected.update({f"{k}_blocked": expected[k] for k in ("A", "dx", "dWU")})
        for name, onednn in (("x W", "x W"), ("dx = dZ W^T", "dx = dZ W^T"), ("[x, h]^T dZ", "[x, h]^T dZ (one GEMM)")):
            ratio = rows[f"{name} (blocked)"]["ms"] / rows[onednn]["ms"]
            rows[f"{name} (blocked)"]["over_onednn"] = ratio
            print(f"{name}: the kernel's blocked GEMM took {ratio:.2f}x oneDNN's time")
    agreement = max(float(np.max(np.abs(out[k] - v)) / np.max(np.abs(v))) for k, v in expected.items())
    print(f"largest difference from NumPy's products, relative to each product's largest entry: {agreement:.1e}")
    result = dict(shape=dict(batch=B, steps=T, features=F, hidden=H), cores=cores, gemms=rows, agreement=agreement)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
