"""Peer parity: the library and Flax's own cells (linen and NNX) on the same weights.

Each test initialises the Flax cell, replaces every one of its parameters with random values
(biases included, so the bias mapping is tested), maps them into the library's parameters with
a mapping written here from Flax's source, runs both over a sequence and compares outputs and
final carries. Flax's LSTM carry is ``(c, h)``; the library's is ``LSTMState(h, c)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recurrent

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, F, H = 3, 7, 5, 6


def randomize(tree, seed, scale=0.5):
    """Every leaf (an array or a ``jax.ShapeDtypeStruct``) replaced by ``scale * N(0, 1)``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), tree)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --------------------------------------------------------------------------------------
# Weight mappings, Flax -> recurrent.


def from_linen_lstm(p):
    """``LSTMCell`` / ``OptimizedLSTMCell``: input denses ii, if, ig, io (no bias), hidden denses
    hi, hf, hg, ho (with bias); gate order i, f, g, o as ours."""
    gates = "ifgo"
    return recurrent.LSTMParams(
        input_kernel=jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], axis=-1),
        recurrent_kernel=jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], axis=-1),
        bias=jnp.concatenate([p[f"h{g}"]["bias"] for g in gates], axis=-1),
    )


def from_linen_gru(p):
    """``GRUCell``: ir, iz, in with bias; hr, hz without; hn with bias (inside the reset
    product, i.e. our ``recurrent_bias``)."""
    gates = "rzn"
    return recurrent.GRUParams(
        input_kernel=jnp.concatenate([p[f"i{g}"]["kernel"] for g in gates], axis=-1),
        recurrent_kernel=jnp.concatenate([p[f"h{g}"]["kernel"] for g in gates], axis=-1),
        bias=jnp.concatenate([p[f"i{g}"]["bias"] for g in gates], axis=-1),
        recurrent_bias=p["hn"]["bias"],
    )


def from_linen_conv_lstm(p, hidden):
    """``ConvLSTMCell``: convs 'ih' and 'hh' (HWIO kernels, both with bias), fused gate order
    i, g, f, o, and a hard-coded ``f = sigmoid(f + 1)``. Ours is i, f, g, o with the forget
    offset in the bias."""

    def reorder(a):
        i, g, f, o = jnp.split(a, 4, axis=-1)
        return jnp.concatenate([i, f, g, o], axis=-1)

    bias = reorder(p["ih"]["bias"] + p["hh"]["bias"])
    bias = bias.at[hidden : 2 * hidden].add(1.0)
    return recurrent.ConvLSTMParams(
        input_kernel=reorder(p["ih"]["kernel"]), recurrent_kernel=reorder(p["hh"]["kernel"]), bias=bias
    )


def linen_setup(cell, xs, seed=0):
    flax_rnn = nn.RNN(cell, return_carry=True)
    # Only the shapes of Flax's initial parameters are needed: every value is replaced.
    variables = jax.eval_shape(flax_rnn.init, jax.random.key(seed), xs)
    variables = {"params": randomize(variables["params"], seed)}
    return flax_rnn, variables


# --------------------------------------------------------------------------------------
# linen


@pytest.mark.parametrize("flax_cell", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_linen_lstm(flax_cell):
    xs = inputs((B, T, F))
    flax_rnn, variables = linen_setup(flax_cell(H), xs)
    (c_ref, h_ref), ys_ref = flax_rnn.apply(variables, xs)

    params = from_linen_lstm(variables["params"]["cell"])
    carry, ys = recurrent.rnn(recurrent.lstm(H)).apply(params, xs)
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)


def test_linen_lstm_from_given_carry_and_with_lengths():
    xs = inputs((B, T, F))
    flax_rnn, variables = linen_setup(nn.LSTMCell(H), xs, seed=3)
    params = from_linen_lstm(variables["params"]["cell"])
    layer = recurrent.rnn(recurrent.lstm(H))

    c0, h0 = inputs((B, H), seed=4), inputs((B, H), seed=5)
    (c_ref, h_ref), ys_ref = flax_rnn.apply(variables, xs, initial_carry=(c0, h0))
    carry, ys = layer.apply(params, xs, carry=recurrent.LSTMState(h0, c0))
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)

    # Flax returns the carry at each sequence's last valid step; its padded outputs are not
    # zeroed (and it mishandles length 0), so only valid positions of lengths >= 1 are compared.
    lengths = jnp.array([T, 1, 4])
    (c_ref, h_ref), ys_ref = flax_rnn.apply(variables, xs, seq_lengths=lengths)
    carry, ys = layer.apply(params, xs, lengths=lengths)
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    close(carry.h, h_ref)
    close(carry.c, c_ref)


def test_linen_gru():
    xs = inputs((B, T, F))
    flax_rnn, variables = linen_setup(nn.GRUCell(H), xs, seed=1)
    h_ref, ys_ref = flax_rnn.apply(variables, xs)

    params = from_linen_gru(variables["params"]["cell"])
    h, ys = recurrent.rnn(recurrent.gru(H, reset_after=True)).apply(params, xs)
    close(ys, ys_ref)
    close(h, h_ref)

    lengths = jnp.array([2, T, 5])
    h_ref, ys_ref = flax_rnn.apply(variables, xs, seq_lengths=lengths)
    h, ys = recurrent.rnn(recurrent.gru(H)).apply(params, xs, lengths=lengths)
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    close(h, h_ref)


@pytest.mark.parametrize(
    "kernel_size,spatial",
    [((3,), (8,)), ((2,), (7,)), ((3, 3), (5, 6)), ((2, 4), (6, 5)), ((2, 3, 2), (3, 4, 3))],
    ids=lambda v: "x".join(map(str, v)),
)
def test_linen_conv_lstm(kernel_size, spatial):
    C, Hc = 2, 3
    xs = inputs((2, 4, *spatial, C))
    flax_rnn, variables = linen_setup(nn.ConvLSTMCell(Hc, kernel_size), xs, seed=2)
    (c_ref, h_ref), ys_ref = flax_rnn.apply(variables, xs)

    params = from_linen_conv_lstm(variables["params"]["cell"], Hc)
    carry, ys = recurrent.rnn(recurrent.conv_lstm(Hc, kernel_size)).apply(params, xs)
    assert ys.shape == ys_ref.shape == (2, 4, *spatial, Hc)
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)


def test_linen_bidirectional_with_lengths():
    """``nn.Bidirectional`` reverses each sequence's valid prefix, as ours does."""
    xs = inputs((B, T, F))
    lengths = jnp.array([T, 3, 1])
    flax_bi = nn.Bidirectional(nn.RNN(nn.LSTMCell(H)), nn.RNN(nn.LSTMCell(H)), return_carry=True)
    variables = jax.eval_shape(lambda: flax_bi.init(jax.random.key(0), xs, seq_lengths=lengths))
    variables = {"params": randomize(variables["params"], 6)}
    ((cf, hf), (cb, hb)), ys_ref = flax_bi.apply(variables, xs, seq_lengths=lengths)

    p = variables["params"]
    params = recurrent.BidirectionalParams(
        from_linen_lstm(p["forward_rnn"]["cell"]), from_linen_lstm(p["backward_rnn"]["cell"])
    )
    carry, ys = recurrent.bidirectional(recurrent.lstm(H)).apply(params, xs, lengths=lengths)
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    close(carry.forward.h, hf)
    close(carry.forward.c, cf)
    close(carry.backward.h, hb)
    close(carry.backward.c, cb)


# --------------------------------------------------------------------------------------
# NNX


def nnx_randomized(make_cell, seed):
    graphdef, params, rest = nnx.split(nnx.eval_shape(make_cell), nnx.Param, ...)
    return nnx.merge(graphdef, randomize(params, seed), rest)


def nnx_loop(cell, carry, xs):
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell(carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


def test_nnx_lstm():
    cell = nnx_randomized(lambda: nnx.LSTMCell(F, H, rngs=nnx.Rngs(0)), seed=7)
    xs = inputs((B, T, F))
    (c_ref, h_ref), ys_ref = nnx_loop(cell, cell.initialize_carry((B, F), rngs=nnx.Rngs(1)), xs)

    gates = [("i", "ii", "hi"), ("f", "if_", "hf"), ("g", "ig", "hg"), ("o", "io", "ho")]
    params = recurrent.LSTMParams(
        input_kernel=jnp.concatenate([getattr(cell, i).kernel[...] for _, i, _ in gates], axis=-1),
        recurrent_kernel=jnp.concatenate([getattr(cell, h).kernel[...] for _, _, h in gates], axis=-1),
        bias=jnp.concatenate([getattr(cell, h).bias[...] for _, _, h in gates], axis=-1),
    )
    carry, ys = recurrent.rnn(recurrent.lstm(H)).apply(params, xs)
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)


def test_nnx_optimized_lstm():
    cell = nnx_randomized(lambda: nnx.OptimizedLSTMCell(F, H, rngs=nnx.Rngs(0)), seed=8)
    xs = inputs((B, T, F))
    (c_ref, h_ref), ys_ref = nnx_loop(cell, cell.initialize_carry((B, F), rngs=nnx.Rngs(1)), xs)

    # Fused (F, 4H) and (H, 4H) kernels already in i, f, g, o order; the bias is on dense_h.
    params = recurrent.LSTMParams(cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...])
    carry, ys = recurrent.rnn(recurrent.lstm(H)).apply(params, xs)
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)


def test_nnx_gru():
    cell = nnx_randomized(lambda: nnx.GRUCell(F, H, rngs=nnx.Rngs(0)), seed=9)
    assert cell.dense_h.bias is None  # NNX's GRU has no b_hn: our recurrent_bias is zero
    xs = inputs((B, T, F))
    h_ref, ys_ref = nnx_loop(cell, cell.initialize_carry((B, F), rngs=nnx.Rngs(1)), xs)

    params = recurrent.GRUParams(
        input_kernel=cell.dense_i.kernel[...],
        recurrent_kernel=cell.dense_h.kernel[...],
        bias=cell.dense_i.bias[...],
        recurrent_bias=jnp.zeros((H,), jnp.float32),
    )
    h, ys = recurrent.rnn(recurrent.gru(H)).apply(params, xs)
    close(ys, ys_ref)
    close(h, h_ref)
