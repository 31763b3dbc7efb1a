r"""The optional native LSTM kernel: one plain LSTM layer as XLA FFI custom calls, in float32 or
in bfloat16 compute with float32 parameters and state. In float32 the undifferentiated forward is
oneDNN's LSTM primitive (the kernel PyTorch's CPU LSTM runs); training runs a hand-fused forward
and backward around oneDNN's JIT GEMM (``dnnl_sgemm``), because oneDNN's primitive runs reference
code for training on CPUs. In bfloat16 (``recurrent.lstm(H, dtype=jnp.bfloat16)``) both run the
same fused loops around oneDNN's bfloat16 GEMM (``dnnl_gemm_bf16bf16f32``: bfloat16 operands,
float32 accumulation, AVX512-BF16 where the CPU has it), rounding where the cell rounds: ``x W + b``
and ``h`` to bfloat16, gates and ``c`` float32. On a CPU without AVX-512, where oneDNN has no
bfloat16 GEMM, the same bfloat16 operands are widened to float32 (exactly) for ``dnnl_sgemm``: the
same products and float32 sums, so the same results to float32 rounding, but slower than float32.
Its derivative differs from the scan's in where it rounds (``lstm_onednn.cc`` says where): within
bfloat16's precision, not bit for bit.

Nothing imports this module by default, and importing it loads nothing. Install oneDNN with the
extra, ``pip install "recurrent[native]"`` (its CPU-only wheels, about 40 MB); the kernels then
compile with the system's C++ compiler on their first use, once, into a cache keyed by the sources,
compiler, jaxlib and oneDNN (:mod:`recurrent.native.build`; ``python -m recurrent.native.build``
compiles them ahead of time). They can also be built as a wheel of their own (CMake through
scikit-build-core)::

    pip install ./recurrent/native

``rnn(recurrent.lstm(H), implementation="native")`` then runs a plain LSTM through it (float32,
or ``dtype=jnp.bfloat16`` compute over float32 parameters); anywhere it cannot run, the driver
falls back to its scan with a :class:`~recurrent.FallbackWarning` that says why.

:func:`lstm_layer` computes, for gates in ``LSTM_GATES`` order (i, f, g, o, oneDNN's order too),

.. math::

    z_t = x_t W + h_{t-1} U + b, \quad c_t = f_t c_{t-1} + i_t g_t, \quad h_t = o_t \tanh c_t

over batch-first ``xs (B, T, F)`` and is a ``jax.custom_vjp``. Its training forward makes one GEMM
per step, ``[x_t, h_{t-1}] [W; U]``, and one fused pointwise loop that keeps the gate activations
and ``c_t`` in a workspace; its backward makes, per step backwards, one fused pointwise loop for the
gate gradients and one GEMM ``[dx_t, dh_{t-1}] = dz_t [W; U]^T``, then ``[dW; dU]`` as one GEMM
over all steps. Where ``xs`` is not differentiated (a network's data: its first layer), the backward
skips ``dx`` (the per-step GEMM is then ``dh_{t-1} = dz_t U^T``). With
``lengths`` (:func:`apply`), each sequence is frozen after its last valid step by one extra
input feature whose weights saturate the input gate shut and the forget gate open (so
``c`` is carried exactly and no gradient flows through the padding); ``h`` is read from the
outputs at the last valid step.

Under ``jax.vmap`` (nested too) the kernel runs every layer of the batch in one call: each with
its own parameters, inputs, carry and workspace, in parallel threads (OpenMP, one layer per
thread). ``bidirectional(rnn(lstm(H), implementation="native"))`` vmaps its layer over the two
directions, so both run in one call per pass; so does a ``jax.vmap``-ed population of layers.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from recurrent.native import build as _build
from recurrent.native.build import INSTALL_HINT, onednn_prefix

# The FFI targets by compute dtype: (training forward, backward, inference forward).
_TARGETS = {
    jnp.dtype(jnp.float32): ("recurrent_lstm_forward", "recurrent_lstm_backward", "recurrent_lstm_inference"),
    jnp.dtype(jnp.bfloat16): (
        "recurrent_lstm_forward_bf16",
        "recurrent_lstm_backward_bf16",
        "recurrent_lstm_inference_bf16",
    ),
}
_SYMBOLS = {
    "recurrent_lstm_forward": "RecurrentLstmForward",
    "recurrent_lstm_backward": "RecurrentLstmBackward",
    "recurrent_lstm_inference": "RecurrentLstmInference",
    "recurrent_lstm_forward_bf16": "RecurrentLstmForwardBf16",
    "recurrent_lstm_backward_bf16": "RecurrentLstmBackwardBf16",
    "recurrent_lstm_inference_bf16": "RecurrentLstmInferenceBf16",
    # the GRU's (gru_onednn.cc; Python side in recurrent/native/_gru.py)
    "recurrent_gru_forward": "RecurrentGruForward",
    "recurrent_gru_backward": "RecurrentGruBackward",
    "recurrent_gru_inference": "RecurrentGruInference",
    "recurrent_gru_forward_bf16": "RecurrentGruForwardBf16",
    "recurrent_gru_backward_bf16": "RecurrentGruBackwardBf16",
    "recurrent_gru_inference_bf16": "RecurrentGruInferenceBf16",
}
BUILD_HINT = INSTALL_HINT
# Pre-activation of the gates at padding steps: sigmoid rounds it to exactly 0 and 1 in float32.
_SATURATE = 1e30

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def library_path() -> Path:
    """The compiled kernels to load: ``$RECURRENT_NATIVE_LIBRARY`` if set, else the ones the
    ``recurrent-native`` wheel installed (``pip install ./recurrent/native``), else the cache's build
    of the sources as they are now (:func:`recurrent.native.build.cached_library`; it may not exist
    yet: :func:`reason` builds it)."""
    if "RECURRENT_NATIVE_LIBRARY" in os.environ:
        return Path(os.environ["RECURRENT_NATIVE_LIBRARY"])
    spec = importlib.util.find_spec("recurrent_native")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        installed = Path(folder) / _build.NAME
        if installed.exists():
            return installed
    if onednn_prefix() is None:
        return _build.cache_dir() / _build.NAME
    return _build.cached_library()


@functools.cache
def _built(path: Path) -> str | None:
    """Builds the cache's kernels once per process; why not, if that failed."""
    try:
        _build.ensure()
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or e.stdout or "").strip().splitlines()
        tail = "\n".join([line for line in lines if "error" in line][:8] or lines[-12:])
        return f"the native kernel did not compile ({' '.join(e.cmd[:1])} exited with {e.returncode}):\n{tail}"
    except OSError as e:
        return f"the native kernel could not be built into {path.parent} ({e}); set $RECURRENT_NATIVE_CACHE"
    return None


def reason() -> str | None:
    """Why the native kernel cannot run in this process (``None`` if it can). Compiles it first
    (once, into the cache) where oneDNN and a C++ compiler are installed and it is not built yet."""
    if jax.default_backend() != "cpu":
        return f"the native kernel runs on CPU, and JAX's default backend is {jax.default_backend()!r}"
    path = library_path()
    if not path.exists():
        if "RECURRENT_NATIVE_LIBRARY" in os.environ:
            return (
                f"the native kernel is not built ({path} is missing); "
                f"fix: unset RECURRENT_NATIVE_LIBRARY, or python -m recurrent.native.build {path}"
            )
        why = _build.missing()
        if why is not None:
            return f"the native kernel is not built and cannot be here: {why}"
        why = _built(path)
        if why is not None:
            return why
    try:
        _load()
    except OSError as e:
        return f"the native kernel did not load ({e}); rebuild it with: python -m recurrent.native.build"
    return None


def _load() -> ctypes.CDLL:
    """Loads the kernel once and registers its FFI targets with XLA."""
    global _library
    with _lock:
        if _library is None:
            _sycl_cpu_device()
            path = library_path()
            if not path.exists() and "RECURRENT_NATIVE_LIBRARY" not in os.environ and not _build.missing():
                why = _built(path)
                if why is not None:
                    raise OSError(why)
            lib = ctypes.CDLL(str(library_path()))
            lib.recurrent_lstm_workspace_bytes.restype = ctypes.c_int64
            lib.recurrent_lstm_workspace_bytes.argtypes = [ctypes.c_int64] * 4
            absent = [symbol for symbol in _SYMBOLS.values() if not hasattr(lib, symbol)]
            if absent:  # a library built from older sources (an old wheel, or $RECURRENT_NATIVE_LIBRARY)
                raise OSError(f"{library_path()} lacks {', '.join(absent)}: it was built from older sources")
            for target, symbol in _SYMBOLS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
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


# Under ``jax.vmap`` every operand and result gets the vmapped axes in front (unbatched operands
# broadcast): the kernel folds all leading axes into independent layers, each with its own
# parameters, inputs, carry and workspace, and runs them in parallel threads in one call (a
# population of layers, both directions of ``bidirectional``; nested vmaps too).
_VMAP = "broadcast_all"


def _outputs(U, xs_TBF, h0, c0):
    """``ys``, ``h`` in the compute dtype (``xs``'s), ``c`` in float32."""
    T, B, _ = xs_TBF.shape
    return (
        jax.ShapeDtypeStruct((T, B, U.shape[0]), xs_TBF.dtype),
        jax.ShapeDtypeStruct(h0.shape, xs_TBF.dtype),
        jax.ShapeDtypeStruct(c0.shape, jnp.float32),
    )


def _forward_call(W, U, b, xs_TBF, h0, c0):
    T, B, F = xs_TBF.shape
    workspace = jax.ShapeDtypeStruct((_workspace_bytes(B, T, F, U.shape[0]),), jnp.uint8)
    out = (*_outputs(U, xs_TBF, h0, c0), workspace)
    target = _TARGETS[xs_TBF.dtype][0]
    return jax.ffi.ffi_call(target, out, vmap_method=_VMAP)(xs_TBF, W, U, b, h0, c0)


def _materialise(cotangent):
    """A cotangent as an array: a ``SymbolicZero`` (an output the loss does not use; the rules are
    defined with ``symbolic_zeros=True``) as zeros, since the backward kernel reads every one."""
    if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(cotangent.shape, cotangent.dtype)
    return cotangent


def _dx_result(xs_TBF, need_dx: bool):
    """The backward call's ``dx`` result: ``xs``'s shape, or where ``xs`` is not differentiated (the
    call's ``need_dx=False``) an empty ``(0,)``, which the kernel leaves alone and XLA allocates
    nothing for (under vmap ``(..., 0)``: broadcast_all puts the vmapped axes in front)."""
    return jax.ShapeDtypeStruct(xs_TBF.shape if need_dx else (0,), xs_TBF.dtype)


@jax.custom_vjp
def _layer(W, U, b, xs_TBF, h0, c0):
    """Undifferentiated: oneDNN's inference forward (float32), which keeps no workspace, or the
    fused forward with a workspace of its own (bfloat16). Differentiated: the fused training
    forward and backward."""
    _load()
    target = _TARGETS[xs_TBF.dtype][2]
    return jax.ffi.ffi_call(target, _outputs(U, xs_TBF, h0, c0), vmap_method=_VMAP)(xs_TBF, W, U, b, h0, c0)


def _fwd(*primals):
    """Each argument a ``CustomVJPPrimal`` (``symbolic_zeros=True``): its value and whether it is
    differentiated. Whether ``xs`` is goes into the residuals, a static bool: a network's data
    (its first layer's inputs) is not, and the backward then skips ``dx = dZ W^T``."""
    W, U, b, xs_TBF, h0, c0 = (p.value for p in primals)
    ys, h, c, workspace = _forward_call(W, U, b, xs_TBF, h0, c0)
    return (ys, h, c), (W, U, b, xs_TBF, h0, c0, ys, h, c, workspace, bool(primals[3].perturbed))


def _bwd(res, cotangents):
    """The parameters', ``h0``'s and ``c0``'s gradients always; ``xs``'s (``None`` otherwise) where it
    is differentiated."""
    W, U, b, xs_TBF, h0, c0, ys, h, c, workspace, need_dx = res
    dys, dh, dc = map(_materialise, cotangents)
    out = (_dx_result(xs_TBF, need_dx), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (W, U, b, h0, c0)))
    dxs, dW, dU, db, dh0, dc0 = jax.ffi.ffi_call(_TARGETS[xs_TBF.dtype][1], out, vmap_method=_VMAP)(
        xs_TBF, W, U, b, h0, c0, ys, h, c, workspace, dys, dh, dc, need_dx=need_dx
    )
    return dW, dU, db, dxs if need_dx else None, dh0, dc0


_layer.defvjp(_fwd, _bwd, symbolic_zeros=True)


def lstm_layer(W, U, b, xs_BTF, h0, c0):
    """``(ys, h_T, c_T)`` of a plain LSTM over batch-first ``xs_BTF (B, T, F)`` with float32
    ``W (F, 4H)``, ``U (H, 4H)``, ``b (4H,)`` and ``c0 (B, H)`` and ``h0 (B, H)`` in ``xs``'s dtype
    through the native kernel (time-major inside: oneDNN's fast implementation reads ``(T, B, F)``).
    ``xs`` in float32 computes in float32; in bfloat16 it computes as ``recurrent.lstm(H,
    dtype=jnp.bfloat16)`` does (``ys`` and ``h_T`` bfloat16, ``c_T`` float32)."""
    ys, h, c = _layer(W, U, b, jnp.moveaxis(xs_BTF, 1, 0), h0, c0)
    return jnp.moveaxis(ys, 0, 1), h, c


COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check(params: Any, xs_BTF: jax.Array, carry: Any, dtype: Any = None) -> jnp.dtype:
    """Raises a clear error (at trace time) unless the arguments are those of a plain LSTM layer the
    kernel runs: float32 parameters and ``c``, compute ``dtype`` float32 or bfloat16 (``None``: the
    parameters' dtype), ``xs`` in float32 or the compute dtype, ``h`` in the compute dtype. Returns
    the compute dtype."""
    from recurrent import _core

    where = "recurrent.native.apply"
    cdt = _core.compute_dtype(dtype, params.input_kernel)
    wanted = {
        "xs": (jnp.float32, cdt),
        "input_kernel": (jnp.float32,),
        "recurrent_kernel": (jnp.float32,),
        "bias": (jnp.float32,),
        "carry.h": (cdt,),
        "carry.c": (jnp.float32,),
    }
    arrays = dict(zip(wanted, (xs_BTF, *params[:3], carry.h, carry.c)))
    odd = {k: str(jnp.result_type(v)) for k, v in arrays.items() if jnp.result_type(v) not in wanted[k]}
    if cdt not in COMPUTE_DTYPES or odd:
        raise _core.error(
            f"{where}: the native kernel runs float32 only, or bfloat16 compute with float32 parameters and state.",
            expected="float32 parameters and carry.c; compute dtype float32 (xs, carry.h float32) or bfloat16 "
            "(xs float32 or bfloat16, carry.h bfloat16)",
            got=f"compute dtype {cdt}" + "".join(f", {k} {v}" for k, v in odd.items()),
            fix="cast them with .astype(jnp.float32) (carry.h to the compute dtype: cell.initial_carry gives it), "
            "or use rnn(...)'s default implementation.",
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
    return cdt


def apply(params: Any, xs_BTF: jax.Array, lengths_B: jax.Array | None, carry: Any, dtype: Any = None):
    """One plain LSTM layer (:class:`~recurrent.LSTMParams`, float32) with our semantics, computing
    as ``recurrent.lstm(H, dtype=dtype)`` does (float32, or bfloat16 with float32 state):
    ``(carry, ys)``, outputs zero after each sequence's length, the final carry the one after its
    last valid step (the initial carry for length 0)."""
    from recurrent._core import LSTMState

    cdt = check(params, xs_BTF, carry, dtype)
    xs_BTF = xs_BTF.astype(cdt)
    W, U, b = params.input_kernel, params.recurrent_kernel, params.bias
    h0, c0 = carry.h, carry.c
    if 0 in xs_BTF.shape:  # nothing to run (oneDNN takes no empty dimension)
        return LSTMState(h0, c0), jnp.zeros((*xs_BTF.shape[:2], U.shape[0]), cdt)
    if lengths_B is None:
        ys, h, c = lstm_layer(W, U, b, xs_BTF, h0, c0)
        return LSTMState(h, c), ys
    B, T, _ = xs_BTF.shape
    H = U.shape[0]
    lengths = jnp.clip(lengths_B.astype(jnp.int32), 0, T)
    padding = (jnp.arange(T)[None, :] >= lengths[:, None]).astype(cdt)  # (B, T)
    # One more input feature, 1 at padding: it shuts the input gate, opens the forget gate and adds
    # nothing to the cell and output gates (i, f, g, o), so c is carried unchanged. (+-1e30 stays
    # that large in bfloat16, whose exponent is float32's.)
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


def kernel(dtype: Any = None) -> Any:
    """The native kernel as a :class:`~recurrent.SequenceKernel` for a plain LSTM with float32
    parameters and compute ``dtype`` (``None``: float32; or ``jnp.bfloat16``): its ``reason`` says
    why it cannot run (not built, not on CPU, other parameters or dtypes), and the driver then
    falls back to its scan with a :class:`~recurrent.FallbackWarning`. It stores a workspace for
    the backward pass, so ``remat=True`` falls back too."""
    from recurrent._core import SequenceKernel
    from recurrent._lstm import LSTMParams

    def run(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        return apply(params, xs_BTF, lengths_B, carry_B, dtype)

    def why(params, xs):
        if not isinstance(params, LSTMParams):
            return f"the parameters are a {type(params).__name__}"
        cdt = jnp.dtype(dtype if dtype is not None else params.input_kernel.dtype)
        if params.input_kernel.dtype != jnp.float32 or xs.dtype not in (jnp.float32, cdt):
            return (
                f"the native kernel runs float32 parameters and inputs in float32 or the compute dtype, "
                f"got inputs {xs.dtype}, parameters {params.input_kernel.dtype}"
            )
        return reason()

    return SequenceKernel(run, why, batchable=True, remat=False)


def attach(cell: Any) -> Any:
    """``cell`` with the native kernel, or the reason why not, declared under ``"native"`` in its
    spec. The library's LSTM declares it itself (a plain LSTM with float32 parameters and float32 or
    bfloat16 compute gets the kernel; other options the reason), so ``attach`` returns such a cell
    unchanged; any other cell gets the reason why not, which the driver's
    :class:`~recurrent.FallbackWarning` repeats.

    >>> import jax.numpy as jnp
    >>> import recurrent
    >>> from recurrent import native
    >>> cell = native.attach(recurrent.lstm(4))
    >>> type(cell.spec.kernels["native"]).__name__
    'SequenceKernel'
    >>> type(native.attach(recurrent.lstm(4, dtype=jnp.bfloat16)).spec.kernels["native"]).__name__
    'SequenceKernel'
    """
    from recurrent._core import Options

    if "native" in cell.spec.kernels:
        return cell
    entry = f"the native kernel runs the plain LSTM and the GRU only, and {cell.name!r} is not one"
    return cell._replace(spec=cell.spec._replace(kernels=Options({**cell.spec.kernels, "native": entry})))
