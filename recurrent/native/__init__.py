r"""The optional native LSTM kernel: one plain float32 LSTM layer as XLA FFI custom calls. The
undifferentiated forward is oneDNN's LSTM primitive (the kernel PyTorch's CPU LSTM runs); training
runs a hand-fused forward and backward around oneDNN's JIT GEMM (``dnnl_sgemm``), because oneDNN's
primitive runs reference code for training on CPUs.

Nothing imports this module by default, and importing it loads nothing: the compiled kernel is
loaded on the first call. Build it as a wheel (CMake through scikit-build-core)::

    pip install ./recurrent/native

or in place, into ``recurrent/native/_build/`` (git-ignored)::

    pip install onednn onednn-devel
    python -m recurrent.native.build

``rnn(native.attach(cell), implementation="native")`` then runs a plain float32 LSTM through it
(:func:`attach`); anywhere it cannot run, the driver falls back to its scan with a
:class:`~recurrent.FallbackWarning` that says why.

:func:`lstm_layer` computes, for gates in ``LSTM_GATES`` order (i, f, g, o, oneDNN's order too),

.. math::

    z_t = x_t W + h_{t-1} U + b, \quad c_t = f_t c_{t-1} + i_t g_t, \quad h_t = o_t \tanh c_t

over batch-first ``xs (B, T, F)`` and is a ``jax.custom_vjp``. Its training forward makes one GEMM
per step, ``[x_t, h_{t-1}] [W; U]``, and one fused pointwise loop that keeps the gate activations
and ``c_t`` in a workspace; its backward makes, per step backwards, one fused pointwise loop for the
gate gradients and one GEMM ``[dx_t, dh_{t-1}] = dz_t [W; U]^T``, then ``[dW; dU]`` as one GEMM
over all steps. With
``lengths`` (:func:`apply`), each sequence is frozen after its last valid step by one extra
input feature whose weights saturate the input gate shut and the forget gate open (so
``c`` is carried exactly and no gradient flows through the padding); ``h`` is read from the
outputs at the last valid step.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from recurrent.native.build import LIBRARY, onednn_prefix

_FORWARD = "recurrent_lstm_forward"
_BACKWARD = "recurrent_lstm_backward"
_INFERENCE = "recurrent_lstm_inference"
BUILD_HINT = (
    "pip install ./recurrent/native (from a clone of the repository), or in place: "
    "pip install onednn onednn-devel && python -m recurrent.native.build"
)
# Pre-activation of the gates at padding steps: sigmoid rounds it to exactly 0 and 1 in float32.
_SATURATE = 1e30

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def library_path() -> Path:
    """The compiled kernel to load: ``$RECURRENT_NATIVE_LIBRARY`` if set, else the one built in
    place (``python -m recurrent.native.build``), else the one the ``recurrent-native`` wheel
    installed (``pip install ./recurrent/native``); the in-place path where none exists."""
    if "RECURRENT_NATIVE_LIBRARY" in os.environ:
        return Path(os.environ["RECURRENT_NATIVE_LIBRARY"])
    if LIBRARY.exists():
        return LIBRARY
    spec = importlib.util.find_spec("recurrent_native")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        installed = Path(folder) / LIBRARY.name
        if installed.exists():
            return installed
    return LIBRARY


def reason() -> str | None:
    """Why the native kernel cannot run in this process (``None`` if it can)."""
    if jax.default_backend() != "cpu":
        return f"the native kernel runs on CPU, and JAX's default backend is {jax.default_backend()!r}"
    if not library_path().exists():
        return f"the native kernel is not built ({library_path()} is missing); build it with: {BUILD_HINT}"
    try:
        _load()
    except OSError as e:
        return f"the native kernel did not load ({e}); rebuild it with: {BUILD_HINT}"
    return None


def _load() -> ctypes.CDLL:
    """Loads the kernel once and registers its three FFI targets with XLA."""
    global _library
    with _lock:
        if _library is None:
            _sycl_cpu_device()
            lib = ctypes.CDLL(str(library_path()))
            lib.recurrent_lstm_workspace_bytes.restype = ctypes.c_int64
            lib.recurrent_lstm_workspace_bytes.argtypes = [ctypes.c_int64] * 4
            jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.RecurrentLstmForward), platform="cpu")
            jax.ffi.register_ffi_target(_INFERENCE, jax.ffi.pycapsule(lib.RecurrentLstmInference), platform="cpu")
            jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.RecurrentLstmBackward), platform="cpu")
            _library = lib
    return _library


def _sycl_cpu_device() -> None:
    """The ``onednn`` wheel is built with the SYCL runtime, whose CPU device is the OpenCL CPU
    runtime the wheel brings (``libintelocl.so``); the OpenCL loader finds it only through
    ``OCL_ICD_FILENAMES`` (it has no system-wide registration here). Set unless already set."""
    prefix = onednn_prefix()
    icd = None if prefix is None else prefix / "lib" / "libintelocl.so"
    if icd is not None and icd.exists() and "OCL_ICD_FILENAMES" not in os.environ:
        os.environ["OCL_ICD_FILENAMES"] = str(icd)


@functools.cache
def _workspace_bytes(B: int, T: int, F: int, H: int) -> int:
    """Bytes of what the training forward keeps for the backward (the gate activations and c)."""
    return _load().recurrent_lstm_workspace_bytes(B, T, F, H)


def _forward_call(W, U, b, xs_TBF, h0, c0):
    T, B, F = xs_TBF.shape
    H = U.shape[0]
    f32 = jnp.float32
    out = (
        jax.ShapeDtypeStruct((T, B, H), f32),
        jax.ShapeDtypeStruct((B, H), f32),
        jax.ShapeDtypeStruct((B, H), f32),
        jax.ShapeDtypeStruct((_workspace_bytes(B, T, F, H),), jnp.uint8),
    )
    return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(xs_TBF, W, U, b, h0, c0)


@jax.custom_vjp
def _layer(W, U, b, xs_TBF, h0, c0):
    """Undifferentiated: oneDNN's inference forward, which keeps no workspace. Differentiated: the
    fused training forward and backward."""
    _load()
    T, B, _ = xs_TBF.shape
    out = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in ((T, B, U.shape[0]), h0.shape, c0.shape))
    return jax.ffi.ffi_call(_INFERENCE, out, vmap_method="sequential")(xs_TBF, W, U, b, h0, c0)


def _fwd(W, U, b, xs_TBF, h0, c0):
    ys, h, c, workspace = _forward_call(W, U, b, xs_TBF, h0, c0)
    return (ys, h, c), (W, U, b, xs_TBF, h0, c0, ys, h, c, workspace)


def _bwd(res, cotangents):
    W, U, b, xs_TBF, h0, c0, ys, h, c, workspace = res
    dys, dh, dc = cotangents
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (xs_TBF, W, U, b, h0, c0))
    dxs, dW, dU, db, dh0, dc0 = jax.ffi.ffi_call(_BACKWARD, out, vmap_method="sequential")(
        xs_TBF, W, U, b, h0, c0, ys, h, c, workspace, dys, dh, dc
    )
    return dW, dU, db, dxs, dh0, dc0


_layer.defvjp(_fwd, _bwd)


def lstm_layer(W, U, b, xs_BTF, h0, c0):
    """``(ys, h_T, c_T)`` of a plain LSTM over batch-first float32 ``xs_BTF (B, T, F)`` with
    ``W (F, 4H)``, ``U (H, 4H)``, ``b (4H,)`` and initial ``h0, c0 (B, H)`` through the native
    kernel (time-major inside: oneDNN's fast implementation reads ``(T, B, F)``)."""
    ys, h, c = _layer(W, U, b, jnp.moveaxis(xs_BTF, 1, 0), h0, c0)
    return jnp.moveaxis(ys, 0, 1), h, c


def check(params: Any, xs_BTF: jax.Array, carry: Any) -> None:
    """Raises a clear error (at trace time) unless the arguments are a plain float32 LSTM layer's."""
    from recurrent import _core

    where = "recurrent.native.apply"
    arrays = {
        "xs": xs_BTF,
        "input_kernel": params.input_kernel,
        "recurrent_kernel": params.recurrent_kernel,
        "bias": params.bias,
        "carry.h": carry.h,
        "carry.c": carry.c,
    }
    odd = {k: str(jnp.result_type(v)) for k, v in arrays.items() if jnp.result_type(v) != jnp.float32}
    if odd:
        raise _core.error(
            f"{where}: the native kernel runs float32 only.",
            expected="float32 inputs, parameters and carry",
            got=", ".join(f"{k} {v}" for k, v in odd.items()),
            fix="cast them with .astype(jnp.float32), or use rnn(...)'s default implementation.",
        )
    B = xs_BTF.shape[0] if xs_BTF.ndim == 3 else None
    H = params.recurrent_kernel.shape[0]
    if xs_BTF.ndim != 3 or jnp.shape(carry.h) != (B, H) or jnp.shape(carry.c) != (B, H):
        raise _core.error(
            f"{where}: one batch axis, batch first.",
            expected=f"xs (B, T, F) and carry h, c (B, H) with H = {H}",
            got=f"xs {tuple(xs_BTF.shape)}, h {tuple(jnp.shape(carry.h))}, c {tuple(jnp.shape(carry.c))}",
            fix="reshape several batch axes into one (or jax.vmap over them) and move time to axis 1.",
        )


def apply(params: Any, xs_BTF: jax.Array, lengths_B: jax.Array | None, carry: Any):
    """One plain float32 LSTM layer (:class:`~recurrent.LSTMParams`) with our semantics:
    ``(carry, ys)``, outputs zero after each sequence's length, the final carry the one after its
    last valid step (the initial carry for length 0)."""
    from recurrent._core import LSTMState

    check(params, xs_BTF, carry)
    W, U, b = params.input_kernel, params.recurrent_kernel, params.bias
    h0, c0 = carry.h, carry.c
    if 0 in xs_BTF.shape:  # nothing to run (oneDNN takes no empty dimension)
        return LSTMState(h0, c0), jnp.zeros((*xs_BTF.shape[:2], U.shape[0]), xs_BTF.dtype)
    if lengths_B is None:
        ys, h, c = lstm_layer(W, U, b, xs_BTF, h0, c0)
        return LSTMState(h, c), ys
    B, T, _ = xs_BTF.shape
    H = U.shape[0]
    lengths = jnp.clip(lengths_B.astype(jnp.int32), 0, T)
    padding = (jnp.arange(T)[None, :] >= lengths[:, None]).astype(xs_BTF.dtype)  # (B, T)
    # One more input feature, 1 at padding: it shuts the input gate, opens the forget gate and adds
    # nothing to the cell and output gates (i, f, g, o), so c is carried unchanged.
    hold = jnp.concatenate([jnp.full((H,), -_SATURATE), jnp.full((H,), _SATURATE), jnp.zeros((2 * H,))])
    W_hold = jnp.concatenate([W, jax.lax.stop_gradient(hold.astype(W.dtype))[None]], axis=0)
    xs_hold = jnp.concatenate([xs_BTF, padding[..., None]], axis=-1)
    ys, _, c = lstm_layer(W_hold, U, b, xs_hold, h0, c0)
    last = jnp.take_along_axis(ys, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    empty = (lengths == 0)[:, None]
    h = jnp.where(empty, h0, last)
    c = jnp.where(empty, c0, c)
    ys = jnp.where(padding[..., None] > 0, 0, ys)
    return LSTMState(h, c), ys


def kernel() -> Any:
    """The native kernel as a :class:`~recurrent.SequenceKernel` for a plain float32 LSTM's spec:
    its ``reason`` says why it cannot run (not built, not on CPU, other parameters or dtypes), and
    the driver then falls back to its scan with a :class:`~recurrent.FallbackWarning`. It stores
    a workspace for the backward pass, so ``remat=True`` falls back too."""
    from recurrent._core import SequenceKernel
    from recurrent._lstm import LSTMParams

    def run(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        return apply(params, xs_BTF, lengths_B, carry_B)

    def why(params, xs):
        if not isinstance(params, LSTMParams):
            return f"the parameters are a {type(params).__name__}"
        if xs.dtype != jnp.float32 or params.input_kernel.dtype != jnp.float32:
            return f"the native kernel runs float32, got inputs {xs.dtype}, parameters {params.input_kernel.dtype}"
        return reason()

    return SequenceKernel(run, why, batchable=True, remat=False)


def attach(cell: Any) -> Any:
    """``cell`` with the native kernel declared under ``"native"`` in its spec, so that
    ``rnn(cell, implementation="native")`` runs it. Only a plain float32 LSTM (the cells whose
    spec declares a cuDNN kernel) gets the kernel; any other cell gets the reason why not, which
    the driver's :class:`~recurrent.FallbackWarning` repeats.

    >>> import recurrent
    >>> from recurrent import native
    >>> cell = native.attach(recurrent.lstm(4))
    >>> "native" in cell.spec.kernels
    True
    """
    from recurrent._core import Options, SequenceKernel

    cudnn = cell.spec.kernels.get("cudnn")
    if isinstance(cudnn, SequenceKernel):
        entry: Any = kernel()
    elif isinstance(cudnn, str):
        entry = "the native kernel runs " + cudnn.split(" runs ", 1)[-1]
    else:
        entry = f"the native kernel runs the plain float32 LSTM only, and {cell.name!r} is not one"
    return cell._replace(spec=cell.spec._replace(kernels=Options({**cell.spec.kernels, "native": entry})))
