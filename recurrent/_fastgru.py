"""A GRU layer with a hand-written backward pass (``rnn(gru(H), implementation="vjp")``).

The same idea as :mod:`recurrent._fastlstm`: the backward loop computes only what the
recurrence needs, the pre-activation gradients and ``dh_{t-1} = z_t \\odot dh_t + dr_t U^T``
(one matmul per step), and stores them; the weight, bias and input gradients are then large
matmuls and sums over all steps at once. It covers the default GRU (``reset_after=True``:
``n = tanh(x W_n + b_n + r (h U_n + b_{hn}))``, no layer norm) in any compute dtype with the
cell's rounding, with ``lengths`` and an initial carry. A ``jax.custom_vjp``: forward-mode AD
(``jax.jvp``) does not go through it; the default ``"scan"`` does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._fastlstm import _mm, _projection, _valid
from recurrent._gru import gru_gates


def _forward(W, U, b, b_hn, xs_TBF, h0, valid_TB, hoist, cdt, unroll):
    """The cell's arithmetic exactly (``recurrent.gru(H, dtype=cdt)``): matmuls of ``cdt``
    operands accumulated in the state dtype, the projection rounded to ``cdt``, the state ``h``
    in the state dtype and the outputs rounded to ``cdt``."""
    sdt = h0.dtype
    Uc = U.astype(cdt)
    xp, at_step = _projection(W, b, xs_TBF, hoist, cdt, sdt)

    def step(h, inputs):
        x, valid = inputs
        x_r, x_z, x_n = jnp.split(at_step(x).astype(sdt), 3, axis=-1)
        h_r, h_z, h_n = jnp.split(_mm(h, Uc, cdt, sdt), 3, axis=-1)
        hn = h_n + b_hn.astype(sdt)
        r, z, n, h_new = gru_gates(x_r + h_r, x_z + h_z, x_n, hn, h)
        v = valid[:, None]
        y = jnp.where(v, h_new, 0).astype(cdt)
        # stored as separate arrays, not one (T, B, 4H): see _fastlstm._forward
        return jnp.where(v, h_new, h), outputs.pack((y, h, (r, z, n, hn)))

    outputs = _core.ScanOutputs()  # bfloat16 outputs stacked cheaply on CPU
    h, out = lax.scan(step, h0, (xp, valid_TB), unroll=unroll)
    ys, hs, acts = outputs.unpack(out)
    return h, ys, (hs, acts)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def gru_layer(W, U, b, b_hn, xs_TBF, h0, valid_TB, hoist, cdt, unroll):
    """``(h, ys)`` of a GRU over time-major ``xs``; ``valid_TB`` masks padding; ``cdt`` is the
    compute dtype, ``h0``'s dtype the state dtype; ``unroll`` is both loops' ``lax.scan`` unroll."""
    h, ys, _ = _forward(W, U, b, b_hn, xs_TBF, h0, valid_TB, hoist, cdt, unroll)
    return h, ys


def _fwd(W, U, b, b_hn, xs_TBF, h0, valid_TB, hoist, cdt, unroll):
    h, ys, saved = _forward(W, U, b, b_hn, xs_TBF, h0, valid_TB, hoist, cdt, unroll)
    return (h, ys), (W, U, b, b_hn, xs_TBF, valid_TB, saved)


def _bwd(hoist, cdt, unroll, res, cotangents):
    W, U, b, b_hn, xs_TBF, valid_TB, (hs, acts) = res
    dh_T, dys = cotangents
    H = U.shape[0]
    sdt = hs.dtype
    Ut = U.T.astype(cdt)

    def step(dh, inputs):
        dy, h_prev, act, valid = inputs
        r, z, n, hn = act
        v = valid[:, None]
        dh_all = dh + jnp.where(v, dy, 0).astype(sdt)
        da_n = dh_all * (1.0 - z) * (1.0 - n * n)
        da_z = dh_all * (h_prev - n) * z * (1.0 - z)
        da_r = da_n * hn * r * (1.0 - r)
        drec = jnp.where(v, jnp.concatenate([da_r, da_z, da_n * r], -1), 0)  # d(h U), per gate
        dxp = jnp.where(v, jnp.concatenate([da_r, da_z, da_n], -1), 0)  # d(x W + b)
        dh_prev = jnp.where(v, dh_all * z + _mm(drec, Ut, cdt, sdt), dh_all)
        return dh_prev, (drec, dxp)

    dh0, (drec, dxp) = lax.scan(step, dh_T, (dys, hs, acts, valid_TB), reverse=True, unroll=unroll)
    T, B = drec.shape[:2]
    drec2, dxp2 = drec.reshape(T * B, 3 * H), dxp.reshape(T * B, 3 * H)
    dW = _mm(xs_TBF.reshape(T * B, -1).T, dxp2, cdt, sdt).astype(W.dtype)
    dU = _mm(hs.reshape(T * B, H).T, drec2, cdt, sdt).astype(U.dtype)
    db = dxp2.sum(0).astype(b.dtype)
    db_hn = drec2[:, 2 * H :].sum(0).astype(b_hn.dtype)
    dxs = _mm(dxp2, W.T, cdt, sdt).reshape(xs_TBF.shape).astype(xs_TBF.dtype)
    return dW, dU, db, db_hn, dxs, dh0, None


gru_layer.defvjp(_fwd, _bwd)


def apply(params, xs_BTF, lengths_B, carry, hoist: bool, cdt, unroll: int | bool = 1):
    """One GRU layer with this backward pass: ``(carry, ys)``, batch-major, our semantics,
    computing in ``cdt`` as ``recurrent.gru(H, dtype=cdt)`` does."""
    valid = _valid(lengths_B, *xs_BTF.shape[:2])
    h, ys = gru_layer(
        params.input_kernel,
        params.recurrent_kernel,
        params.bias,
        params.recurrent_bias,
        jnp.moveaxis(xs_BTF, 1, 0),
        carry,
        valid,
        hoist,
        jnp.dtype(cdt),
        unroll,
    )
    return h, jnp.moveaxis(ys, 0, 1)
