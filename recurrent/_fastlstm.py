"""An LSTM layer with a hand-written backward pass (``rnn(..., implementation="vjp")``).

Reverse-mode AD of a ``lax.scan`` accumulates the weight gradients inside the backward loop:
every step adds ``h_{t-1}^T dz_t`` and ``x_t^T dz_t`` into ``(H, 4H)`` and ``(F, 4H)``
accumulators and computes ``dz_t W_x^T``, four matmuls per step. Here the backward loop
computes only what the recurrence needs, ``dz_t`` and ``dh_{t-1} = dz_t U^T`` (one matmul
per step), and stores ``dz``; the weight and input gradients are then three large matmuls
over all steps at once (as cuDNN does):

.. math::

    \\partial W = \\sum_t x_t^\\top dz_t, \\quad \\partial U = \\sum_t h_{t-1}^\\top dz_t,
    \\quad \\partial b = \\sum_t dz_t, \\quad \\partial x_t = dz_t W^\\top

It covers the plain LSTM (gates i, f, g, o; tanh), the peephole LSTM (diagonal peepholes
``c_{t-1}`` -> i, f and ``c_t`` -> o, whose gradients are sums over all steps after the loop too)
and the CIFG LSTM (``i = 1 - f``), without projection, layer norm or clipping, with
``lengths`` and an initial carry, in any compute dtype with the cell's rounding
(with ``dtype=jnp.bfloat16`` every matmul, the three large ones included, takes bfloat16
operands and accumulates in float32). It is a ``jax.custom_vjp``, so forward-mode
AD (``jax.jvp``, ``jax.jacfwd``) does not go through it; the default ``"scan"`` does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import LSTMState
from recurrent._lstm import lstm_gates


def _mm(a, b, cdt, sdt):
    """``a @ b`` with operands cast to the compute dtype, accumulated in the state dtype (as the cells)."""
    return _core.matmul(a.astype(cdt), b.astype(cdt), sdt)


def _projection(W, b, xs_TBF, hoist, cdt, sdt):
    """``(xp, at_step)``: the inputs projected before the loop (``hoist``) or as they are, and
    the function that gives a step's projection from its ``xp`` slice, rounded as the cells'."""
    Wc = W.astype(cdt)

    def project(x):
        return (_mm(x, Wc, cdt, sdt) + b.astype(sdt)).astype(cdt)

    return (project(xs_TBF), lambda x: x) if hoist else (xs_TBF, project)


def _valid(lengths_B, B, T):
    """``(T, B)``: which steps of each sequence are real (all of them without ``lengths``)."""
    return jnp.ones((T, B), bool) if lengths_B is None else jnp.arange(T)[:, None] < lengths_B[None, :]


def _forward(W, U, b, peep, xs_TBF, h0, c0, valid_TB, hoist, cdt, unroll, coupled):
    """The cell's arithmetic exactly (``recurrent.lstm(H, dtype=cdt, peephole=..., coupled=...)``):
    matmuls of ``cdt`` operands accumulated in the state dtype, the projection rounded to
    ``cdt``, gates and ``c`` in the state dtype, ``h`` rounded to ``cdt``. ``peep`` is the
    peepholes ``(input, forget, output)``, each ``(H,)`` or ``None``."""
    sdt = c0.dtype
    Uc = U.astype(cdt)
    p_i, p_f, p_o = (None if p is None else p.astype(sdt) for p in peep)
    xp, at_step = _projection(W, b, xs_TBF, hoist, cdt, sdt)
    plus = lambda z, p, c: z if p is None else z + p * c  # noqa: E731  (a peephole term)

    def step(carry, inputs):
        h, c = carry
        x, valid = inputs
        z = at_step(x).astype(sdt) + _mm(h, Uc, cdt, sdt)
        if coupled:  # CIFG: no input block, i = 1 - f
            z_i, (z_f, z_g, z_o) = None, jnp.split(z, 3, axis=-1)
        else:
            z_i, z_f, z_g, z_o = jnp.split(z, 4, axis=-1)
            z_i = plus(z_i, p_i, c)
        i, f, g, o, c_new, tc = lstm_gates(coupled, plus(z_f, p_f, c), z_i, z_g, z_o, c, p_o)
        h_new = (o * tc).astype(h.dtype)
        v = valid[:, None]
        h_out, c_out = jnp.where(v, h_new, h), jnp.where(v, c_new, c)
        y = jnp.where(v, h_new, 0)
        # The gates are stored as four arrays, not one (T, B, 4H): on XLA's CPU backend a
        # fusion that takes several column slices of one array sliced per step runs several
        # times slower than the same arithmetic on separate arrays (benchmarks/README.md).
        return (h_out, c_out), outputs.pack((y, h, c, (i, f, g, o), tc))

    outputs = _core.ScanOutputs()  # bfloat16 y and h stacked cheaply on CPU (as float32)
    (h, c), out = lax.scan(step, (h0, c0), (xp, valid_TB), unroll=unroll)
    ys, hs, cs, gates, tcs = outputs.unpack(out)
    return (h, c), ys, (hs, cs, gates, tcs)


@partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def lstm_layer(W, U, b, peep, xs_TBF, h0, c0, valid_TB, hoist, cdt, unroll, coupled):
    """``((h, c), ys)`` of an LSTM (plain, peephole ``peep`` and/or CIFG ``coupled``) over
    time-major ``xs``; ``valid_TB`` masks padding; ``cdt`` is the compute dtype (``h0``'s),
    ``c0``'s dtype the state dtype; ``unroll`` is both loops' ``lax.scan`` unroll."""
    carry, ys, _ = _forward(W, U, b, peep, xs_TBF, h0, c0, valid_TB, hoist, cdt, unroll, coupled)
    return carry, ys


def _fwd(W, U, b, peep, xs_TBF, h0, c0, valid_TB, hoist, cdt, unroll, coupled):
    carry, ys, saved = _forward(W, U, b, peep, xs_TBF, h0, c0, valid_TB, hoist, cdt, unroll, coupled)
    return (carry, ys), (W, U, b, peep, xs_TBF, h0, valid_TB, saved)


def _bwd(hoist, cdt, unroll, coupled, res, cotangents):
    W, U, b, peep, xs_TBF, h0, valid_TB, (hs, cs, gates, tcs) = res
    (dh_T, dc_T), dys = cotangents
    H = U.shape[0]
    sdt = cs.dtype
    Ut = U.T.astype(cdt)
    p_i, p_f, p_o = (None if p is None else p.astype(sdt) for p in peep)

    def step(carry, inputs):
        dh, dc = carry
        dy, h_prev, c_prev, gate, tc, valid = inputs
        i, f, g, o = gate
        v = valid[:, None]
        dh_all = dh + jnp.where(v, dy, 0).astype(sdt)
        dz_o = dh_all * tc * o * (1 - o)
        dc_new = dc + dh_all * o * (1 - tc * tc)
        if p_o is not None:  # o saw c_new through its peephole
            dc_new = dc_new + p_o * dz_o
        dz_g = dc_new * i * (1 - g * g)
        di = dc_new * g
        if coupled:  # i = 1 - f
            dz_f = (dc_new * c_prev - di) * f * (1 - f)
            blocks = [dz_f, dz_g, dz_o]
        else:
            dz_f = dc_new * c_prev * f * (1 - f)
            dz_i = di * i * (1 - i)
            blocks = [dz_i, dz_f, dz_g, dz_o]
        dz = jnp.where(v, jnp.concatenate(blocks, -1), 0)
        dh_prev = jnp.where(v, _mm(dz, Ut, cdt, sdt), dh_all)
        dc_prev = dc_new * f
        if p_f is not None:
            dc_prev = dc_prev + p_f * dz_f
        if p_i is not None:
            dc_prev = dc_prev + p_i * dz_i
        return (dh_prev, jnp.where(v, dc_prev, dc)), dz

    carry = (dh_T.astype(sdt), dc_T)
    (dh0, dc0), dz = lax.scan(step, carry, (dys, hs, cs, gates, tcs, valid_TB), reverse=True, unroll=unroll)
    T, B = dz.shape[:2]
    dz2 = dz.reshape(T * B, dz.shape[-1])  # (T * B, G * H), G = 3 gates (CIFG) or 4
    dW = _mm(xs_TBF.reshape(T * B, -1).T, dz2, cdt, sdt).astype(W.dtype)
    dU = _mm(hs.reshape(T * B, H).T, dz2, cdt, sdt).astype(U.dtype)
    db = dz2.sum(0).astype(b.dtype)
    dxs = _mm(dz2, W.T, cdt, sdt).reshape(xs_TBF.shape).astype(xs_TBF.dtype)
    return dW, dU, db, _peephole_grads(peep, dz, cs, gates, coupled), dxs, dh0.astype(h0.dtype), dc0, None


def _peephole_grads(peep, dz, cs, gates, coupled):
    """The peepholes' gradients (``None`` where there is none): sums over all steps of each
    gate's pre-activation gradient times the state it saw (masked steps have ``dz = 0``);
    ``c_t`` is recomputed from the stored gates."""
    if all(p is None for p in peep):
        return peep
    i, f, g, _ = gates
    names = ("f", "g", "o") if coupled else ("i", "f", "g", "o")
    blocks = dict(zip(names, jnp.split(dz, len(names), axis=-1)))
    seen = {"i": cs, "f": cs, "o": f * cs + i * g}
    return tuple(
        None if p is None else jnp.sum(blocks[k] * seen[k], axis=(0, 1)).astype(p.dtype)
        for k, p in zip(("i", "f", "o"), peep)
    )


lstm_layer.defvjp(_fwd, _bwd)


def apply(params, xs_BTF, lengths_B, carry, hoist: bool, cdt, unroll: int | bool = 1, coupled: bool = False):
    """One LSTM layer (plain, peephole, CIFG) with this backward pass: ``(carry, ys)``,
    batch-major, our semantics, computing in ``cdt`` as ``recurrent.lstm(H, dtype=cdt)`` does."""
    valid = _valid(lengths_B, *xs_BTF.shape[:2])
    (h, c), ys = lstm_layer(
        params.input_kernel,
        params.recurrent_kernel,
        params.bias,
        (params.peephole_input, params.peephole_forget, params.peephole_output),
        jnp.moveaxis(xs_BTF, 1, 0),
        carry.h,
        carry.c,
        valid,
        hoist,
        jnp.dtype(cdt),
        unroll,
        bool(coupled),
    )
    return LSTMState(h, c), jnp.moveaxis(ys, 0, 1)
