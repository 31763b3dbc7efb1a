"""Flax interop: converted weights against Flax's own forward passes (linen and NNX), and round trips."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recurrent
from recurrent.interop import from_flax, to_flax

TOL = dict(rtol=1e-5, atol=1e-5)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def exact(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def randomize(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), tree)


def inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def flax_carry(carry):
    """Flax's LSTM carry is (c, h); ours LSTMState(h, c)."""
    return (carry.c, carry.h) if isinstance(carry, recurrent.LSTMState) else carry


RNG = np.random.default_rng(7)
CASES = [
    (cell, int(RNG.integers(1, 5)), int(RNG.integers(1, 6)), int(RNG.integers(1, 6)), seed)
    for seed, cell in enumerate([nn.LSTMCell, nn.OptimizedLSTMCell, nn.GRUCell, nn.GRUCell, nn.LSTMCell])
]


@pytest.mark.parametrize("flax_cell,F,H,T,seed", CASES)
def test_linen_rnn_and_bidirectional(flax_cell, F, H, T, seed):
    B = 3
    xs = inputs((B, T, F), seed)
    lengths = jnp.asarray(np.random.default_rng(seed).integers(1, T + 1, size=B))
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]

    module = nn.RNN(flax_cell(H), return_carry=True)
    variables = {"params": randomize(jax.eval_shape(module.init, jax.random.key(0), xs)["params"], seed)}
    layer, params = from_flax(module, variables)
    carry_ref, ys_ref = module.apply(variables, xs, seq_lengths=lengths)
    carry, ys = layer.apply(params, xs, lengths=lengths)
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    jax.tree.map(close, flax_carry(carry), carry_ref)
    back, back_vars = to_flax(layer, params)
    exact(from_flax(back, back_vars)[1], params)

    # the cell alone, and NNX's counterpart of it
    cell, cparams = from_flax(module.cell, {"params": variables["params"]["cell"]})
    exact(cparams, params)
    assert isinstance(cell, recurrent.Cell)

    bi = nn.Bidirectional(nn.RNN(flax_cell(H)), nn.RNN(flax_cell(H)), return_carry=True)
    bvars = jax.eval_shape(lambda: bi.init(jax.random.key(0), xs, seq_lengths=lengths))
    bvars = {"params": randomize(bvars["params"], seed + 100)}
    (cf_ref, cb_ref), ys_ref = bi.apply(bvars, xs, seq_lengths=lengths)
    layer, params = from_flax(bi, bvars)
    carry, ys = layer.apply(params, xs, lengths=lengths)
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    jax.tree.map(close, flax_carry(carry.forward), cf_ref)
    jax.tree.map(close, flax_carry(carry.backward), cb_ref)
    exact(from_flax(*to_flax(layer, params))[1], params)


@pytest.mark.parametrize("shared", ["cell", "rnn"])
@pytest.mark.parametrize("flax_cell", [nn.LSTMCell, nn.GRUCell])
def test_linen_bidirectional_sharing_one_cell(flax_cell, shared):
    """Both nn.RNN of an nn.Bidirectional built on one cell instance (or one nn.RNN): Flax
    keeps one set of weights, under ``forward_rnn``, and runs both directions with it."""
    B, T, F, H = 3, 5, 2, 4
    xs = inputs((B, T, F), 5)
    lengths = jnp.array([5, 2, 3])
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    cell = flax_cell(H)
    one = nn.RNN(cell)
    bi = nn.Bidirectional(*((one, one) if shared == "rnn" else (nn.RNN(cell), nn.RNN(cell))), return_carry=True)
    bvars = jax.eval_shape(lambda: bi.init(jax.random.key(0), xs, seq_lengths=lengths))
    assert set(bvars["params"]) == {"forward_rnn"}
    bvars = {"params": randomize(bvars["params"], 21)}
    (cf_ref, cb_ref), ys_ref = bi.apply(bvars, xs, seq_lengths=lengths)

    layer, params = from_flax(bi, bvars)
    exact(params.backward, params.forward)  # the one set, in each direction
    assert all(b is not f for b, f in zip(jax.tree.leaves(params.backward), jax.tree.leaves(params.forward)))
    carry, ys = layer.apply(params, xs, lengths=lengths)
    close(np.asarray(ys)[valid], np.asarray(ys_ref)[valid])
    jax.tree.map(close, flax_carry(carry.forward), cf_ref)
    jax.tree.map(close, flax_carry(carry.backward), cb_ref)
    assert not np.allclose(ys[..., :H], ys[..., H:])  # the directions differ: the test sees both

    separate = nn.Bidirectional(nn.RNN(flax_cell(H)), nn.RNN(flax_cell(H)))
    with pytest.raises(ValueError, match="backward_rnn"):
        from_flax(separate, bvars)


@pytest.mark.parametrize("kernel_size,spatial", [((3,), (6,)), ((2, 3), (4, 5)), ((2, 2, 3), (3, 3, 4))])
def test_linen_conv_lstm(kernel_size, spatial):
    C, H = 2, 3
    xs = inputs((2, 3, *spatial, C))
    module = nn.RNN(nn.ConvLSTMCell(H, kernel_size), return_carry=True)
    variables = {"params": randomize(jax.eval_shape(module.init, jax.random.key(0), xs)["params"], 3)}
    carry_ref, ys_ref = module.apply(variables, xs)
    layer, params = from_flax(module, variables)
    carry, ys = layer.apply(params, xs)
    close(ys, ys_ref)
    jax.tree.map(close, flax_carry(carry), carry_ref)
    exact(from_flax(*to_flax(layer, params))[1], params)


def nnx_loop(cell, carry, xs):
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell(carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


@pytest.mark.parametrize("make", [nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell])
def test_nnx_cells(make):
    F, H, B, T = 3, 4, 2, 5
    graphdef, state, rest = nnx.split(nnx.eval_shape(lambda: make(F, H, rngs=nnx.Rngs(0))), nnx.Param, ...)
    module = nnx.merge(graphdef, randomize(state, 11), rest)
    xs = inputs((B, T, F))
    carry_ref, ys_ref = nnx_loop(module, module.initialize_carry((B, F), rngs=nnx.Rngs(1)), xs)
    cell, params = from_flax(module)
    carry, ys = recurrent.rnn(cell).apply(params, xs)
    close(ys, ys_ref)
    jax.tree.map(close, flax_carry(carry), carry_ref)
    back = to_flax(cell, params, api="nnx")
    exact(from_flax(back)[1], params)


def test_clear_errors():
    module = nn.RNN(nn.ConvLSTMCell(3, (3,), padding="VALID"))
    with pytest.raises(ValueError, match="padding='SAME'"):
        from_flax(module, {"params": {"cell": {}}})
    cell = nn.LSTMCell(3, activation_fn=jax.nn.relu)
    with pytest.raises(ValueError, match="activation_fn"):
        from_flax(cell, {"params": {}})
    params = recurrent.peephole_lstm(3).init(jax.random.key(0), (2,))
    with pytest.raises(ValueError, match="peephole"):
        to_flax(recurrent.peephole_lstm(3), params)
    g = recurrent.gru(3)
    p = g.init(jax.random.key(0), (2,))._replace(recurrent_bias=jnp.ones(3))
    with pytest.raises(ValueError, match="b_hn"):
        to_flax(g, p, api="nnx")


def test_missing_peer_gives_clear_import_error(monkeypatch):
    """The core package and recurrent.interop import without PyTorch and Keras; a converter
    that needs one says which extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.setitem(sys.modules, "keras", None)
    from recurrent.interop import from_keras, from_torch

    with pytest.raises(ImportError, match=r"recurrent\[interop\]"):
        from_torch(object())
    with pytest.raises(ImportError, match="keras"):
        from_keras(object())
