r"""The native GRU kernel (``gru_onednn.cc``): one layer of the library's default GRU
(``recurrent.gru(H)``: ``reset_after=True``, the cuDNN/PyTorch form, no layer norm) as XLA FFI
custom calls, in float32 or in bfloat16 compute with float32 parameters and state
(``recurrent.gru(H, dtype=jnp.bfloat16)``). For gates in ``GRU_GATES`` order (r, z, n):

.. math::

    r_t &= \sigma(x_t W_r + b_r + h_{t-1} U_r), \quad z_t = \sigma(x_t W_z + b_z + h_{t-1} U_z) \\
    n_t &= \tanh(x_t W_n + b_n + r_t (h_{t-1} U_n + b_{hn})), \quad h_t = (1 - z_t) n_t + z_t h_{t-1}

:func:`gru_layer` is a ``jax.custom_vjp`` over batch-first ``xs (B, T, F)``. Its training forward
makes ``x W`` for all steps as one GEMM, then per step one GEMM ``h_{t-1} U`` and one fused
pointwise loop that keeps the gates and ``h U_n + b_hn`` in a workspace; its backward makes, per
step backwards, one fused pointwise loop and one GEMM ``dR_t U^T``, then ``dU``, ``dW`` and ``dx``
as single GEMMs over all steps (``dx`` only where ``xs`` is differentiated: not for a network's
data, its first layer's inputs). The undifferentiated forward is the same loop without a workspace.
In bfloat16 every GEMM takes bfloat16 operands (oneDNN's ``dnnl_gemm_bf16bf16f32``, float32
accumulation), rounding where the cell rounds: ``x W + b`` and the ``h`` the recurrent GEMM reads
to bfloat16 (``ys`` are the rounded states), the state ``h`` and the gates float32. Its derivative
differs from the scan's in where it rounds (``gru_onednn.cc`` says where): within bfloat16's
precision, not bit for bit.

With ``lengths`` (:func:`apply`), each sequence is frozen after its last valid step by one extra
input feature whose weights saturate the update gate (``z = 1`` exactly: ``h`` is carried
unchanged and no gradient flows through the padding); the final ``h`` is then the kernel's own.
The compiled library and its loading are :mod:`recurrent.native`'s.

Under ``jax.vmap`` (nested too) the kernel runs every layer of the batch in one call, as the LSTM
kernel does: each with its own parameters, inputs, carry and workspace, in parallel threads
(OpenMP, one layer per thread). ``bidirectional(rnn(gru(H), implementation="native"))`` vmaps its
layer over the two directions, so both run in one call per pass; so does a ``jax.vmap``-ed
population of layers.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import jax
import jax.numpy as jnp

from recurrent import native

# The FFI targets by compute dtype: (training forward, backward, inference forward).
_TARGETS = {
    jnp.dtype(jnp.float32): ("recurrent_gru_forward", "recurrent_gru_backward", "recurrent_gru_inference"),
    jnp.dtype(jnp.bfloat16): (
        "recurrent_gru_forward_bf16",
        "recurrent_gru_backward_bf16",
        "recurrent_gru_inference_bf16",
    ),
}
# Update-gate pre-activation at padding steps: sigmoid rounds it to exactly 1 (bfloat16 keeps it too).
_SATURATE = 1e30


@functools.cache
def _workspace_function():
    f = native._load().recurrent_gru_workspace_bytes
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_int64] * 5
    return f


@functools.cache
def _workspace_bytes(B: int, T: int, F: int, H: int, bf16: bool) -> int:
    """Bytes of what the training forward keeps for the backward (the gates, and h in bfloat16)."""
    return _workspace_function()(B, T, F, H, int(bf16))


def _outputs(U, xs_TBF, h0):
    """``ys`` in the compute dtype (``xs``'s), the final ``h`` in float32 (the cell's state)."""
    T, B, _ = xs_TBF.shape
    return jax.ShapeDtypeStruct((T, B, U.shape[0]), xs_TBF.dtype), jax.ShapeDtypeStruct(h0.shape, jnp.float32)


@jax.custom_vjp
def _layer(W, U, b, b_hn, xs_TBF, h0):
    """Undifferentiated: the forward without a workspace. Differentiated: the training forward
    (with a workspace) and the backward."""
    native._load()
    target = _TARGETS[xs_TBF.dtype][2]
    return jax.ffi.ffi_call(target, _outputs(U, xs_TBF, h0), vmap_method=native._VMAP)(xs_TBF, W, U, b, b_hn, h0)


def _fwd(*primals):
    """Each argument a ``CustomVJPPrimal`` (``symbolic_zeros=True``); whether ``xs`` is differentiated
    goes into the residuals (a static bool), as in :mod:`recurrent.native`'s LSTM."""
    W, U, b, b_hn, xs_TBF, h0 = (p.value for p in primals)
    native._load()
    T, B, F = xs_TBF.shape
    bf16 = xs_TBF.dtype == jnp.bfloat16
    workspace = jax.ShapeDtypeStruct((_workspace_bytes(B, T, F, U.shape[0], bf16),), jnp.uint8)
    target = _TARGETS[xs_TBF.dtype][0]
    ys, h, ws = jax.ffi.ffi_call(target, (*_outputs(U, xs_TBF, h0), workspace), vmap_method=native._VMAP)(
        xs_TBF, W, U, b, b_hn, h0
    )
    return (ys, h), (W, U, b, b_hn, xs_TBF, h0, ys, ws, bool(primals[4].perturbed))


def _bwd(res, cotangents):
    W, U, b, b_hn, xs_TBF, h0, ys, workspace, need_dx = res
    dys, dh = map(native._materialise, cotangents)
    params = (W, U, b, b_hn, h0)
    out = (native._dx_result(xs_TBF, need_dx), *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in params))
    dxs, dW, dU, db, db_hn, dh0 = jax.ffi.ffi_call(_TARGETS[xs_TBF.dtype][1], out, vmap_method=native._VMAP)(
        xs_TBF, W, U, b, b_hn, h0, ys, workspace, dys.astype(ys.dtype), dh.astype(jnp.float32), need_dx=need_dx
    )
    return dW, dU, db, db_hn, dxs if need_dx else None, dh0


_layer.defvjp(_fwd, _bwd, symbolic_zeros=True)


def gru_layer(W, U, b, b_hn, xs_BTF, h0):
    """``(ys, h_T)`` of a GRU (``reset_after=True``) over batch-first ``xs_BTF (B, T, F)`` with
    float32 ``W (F, 3H)``, ``U (H, 3H)``, ``b (3H,)``, ``b_hn (H,)`` and ``h0 (B, H)`` through the
    native kernel (time-major inside). ``xs`` in float32 computes in float32; in bfloat16 it
    computes as ``recurrent.gru(H, dtype=jnp.bfloat16)`` does (``ys`` bfloat16, ``h_T`` float32)."""
    ys, h = _layer(W, U, b, b_hn, jnp.moveaxis(xs_BTF, 1, 0), h0)
    return jnp.moveaxis(ys, 0, 1), h


def check(params: Any, xs_BTF: jax.Array, carry: Any, dtype: Any = None) -> jnp.dtype:
    """Raises a clear error (at trace time) unless the arguments are those of a GRU layer the kernel
    runs (``reset_after=True``, no layer norm): float32 parameters and carry, compute ``dtype``
    float32 or bfloat16 (``None``: the parameters' dtype), ``xs`` in float32 or the compute dtype.
    Returns the compute dtype."""
    from recurrent import _core

    where = "recurrent.native.gru_apply"
    if getattr(params, "recurrent_bias", None) is None or getattr(params, "layer_norm", None) is not None:
        raise _core.error(
            f"{where}: the native kernel runs the GRU with reset_after=True and no layer norm only.",
            expected="GRUParams with a recurrent_bias and no layer_norm",
            got=f"{type(params).__name__} with recurrent_bias "
            f"{'None' if getattr(params, 'recurrent_bias', None) is None else 'set'}, layer_norm "
            f"{'None' if getattr(params, 'layer_norm', None) is None else 'set'}",
            fix="use rnn(...)'s default implementation for other GRUs.",
        )
    cdt = _core.compute_dtype(dtype, params.input_kernel)
    wanted = {
        "xs": (jnp.float32, cdt),
        "input_kernel": (jnp.float32,),
        "recurrent_kernel": (jnp.float32,),
        "bias": (jnp.float32,),
        "recurrent_bias": (jnp.float32,),
        "carry": (jnp.float32,),
    }
    arrays = dict(zip(wanted, (xs_BTF, *params[:4], carry)))
    odd = {k: str(jnp.result_type(v)) for k, v in arrays.items() if jnp.result_type(v) not in wanted[k]}
    if cdt not in native.COMPUTE_DTYPES or odd:
        raise _core.error(
            f"{where}: the native kernel runs float32 only, or bfloat16 compute with float32 parameters and state.",
            expected="float32 parameters and carry; compute dtype float32 (xs float32) or bfloat16 "
            "(xs float32 or bfloat16)",
            got=f"compute dtype {cdt}" + "".join(f", {k} {v}" for k, v in odd.items()),
            fix="cast them with .astype(jnp.float32), or use rnn(...)'s default implementation.",
        )
    B = xs_BTF.shape[0] if xs_BTF.ndim == 3 else None
    H = params.recurrent_kernel.shape[0]
    if xs_BTF.ndim != 3 or jnp.shape(carry) != (B, H):
        raise _core.error(
            f"{where}: one batch axis, batch first.",
            expected=f"xs (B, T, F) and carry h (B, H) with H = {H}",
            got=f"xs {tuple(xs_BTF.shape)}, h {tuple(jnp.shape(carry))}",
            fix="reshape several batch axes into one (or jax.vmap over them) and move time to axis 1.",
        )
    return cdt


def apply(params: Any, xs_BTF: jax.Array, lengths_B: jax.Array | None, carry: Any, dtype: Any = None):
    """One GRU layer (:class:`~recurrent.GRUParams`, ``reset_after=True``, float32) with our
    semantics, computing as ``recurrent.gru(H, dtype=dtype)`` does (float32, or bfloat16 with
    float32 state): ``(h, ys)``, outputs zero after each sequence's length, the final ``h`` the one
    after its last valid step (the initial one for length 0)."""
    cdt = check(params, xs_BTF, carry, dtype)
    xs_BTF = xs_BTF.astype(cdt)
    W, U, b, b_hn = params.input_kernel, params.recurrent_kernel, params.bias, params.recurrent_bias
    if 0 in xs_BTF.shape:  # nothing to run
        return carry, jnp.zeros((*xs_BTF.shape[:2], U.shape[0]), cdt)
    if lengths_B is None:
        ys, h = gru_layer(W, U, b, b_hn, xs_BTF, carry)
        return h, ys
    _, T, _ = xs_BTF.shape
    H = U.shape[0]
    lengths = jnp.clip(lengths_B.astype(jnp.int32), 0, T)
    padding = (jnp.arange(T)[None, :] >= lengths[:, None]).astype(cdt)  # (B, T)
    # One more input feature, 1 at padding: it saturates the update gate (z = 1, so h is carried
    # exactly, and every gate gradient there is 0) and adds nothing to the reset gate and candidate.
    hold = jnp.concatenate([jnp.zeros((H,)), jnp.full((H,), _SATURATE), jnp.zeros((H,))])
    W_hold = jnp.concatenate([W, jax.lax.stop_gradient(hold.astype(W.dtype))[None]], axis=0)
    xs_hold = jnp.concatenate([xs_BTF, padding[..., None]], axis=-1)
    ys, h = gru_layer(W_hold, U, b, b_hn, xs_hold, carry)
    return h, jnp.where(padding[..., None] > 0, 0, ys)


def kernel(dtype: Any = None) -> Any:
    """The native GRU kernel as a :class:`~recurrent.SequenceKernel` for ``recurrent.gru(H)``
    (``reset_after=True``, no layer norm) with float32 parameters and compute ``dtype`` (``None``:
    float32; or ``jnp.bfloat16``): its ``reason`` says why it cannot run (not built, not on CPU,
    other parameters or dtypes), and the driver then falls back to its scan with a
    :class:`~recurrent.FallbackWarning`. It stores a workspace for the backward pass, so
    ``remat=True`` falls back too."""
    from recurrent._core import SequenceKernel
    from recurrent._gru import GRUParams

    def run(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        return apply(params, xs_BTF, lengths_B, carry_B, dtype)

    def why(params, xs):
        if not isinstance(params, GRUParams):
            return f"the parameters are a {type(params).__name__}"
        if params.recurrent_bias is None or params.layer_norm is not None:
            return "the native kernel runs the GRU with reset_after=True and no layer norm only"
        cdt = jnp.dtype(dtype if dtype is not None else params.input_kernel.dtype)
        if params.input_kernel.dtype != jnp.float32 or xs.dtype not in (jnp.float32, cdt):
            return (
                f"the native kernel runs float32 parameters and inputs in float32 or the compute dtype, "
                f"got inputs {xs.dtype}, parameters {params.input_kernel.dtype}"
            )
        return native.reason()

    return SequenceKernel(run, why, batchable=True, remat=False)
