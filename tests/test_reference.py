"""The library against independent float64 NumPy references (tests/reference.py).

Every parameter (kernels, biases, peepholes) is drawn at random, so no term of an equation
can hide behind a zero or a one of the default initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import reference

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 3, 6


def randomize(params, seed, scale=0.5):
    """Every leaf of ``params`` (arrays or ``jax.ShapeDtypeStruct``) replaced by
    ``scale * N(0, 1)`` in float32; ``None`` fields stay ``None``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32), params)


class Variant(NamedTuple):
    cell: Any
    input_shape: tuple[int, ...]
    reference: Callable  # reference(xs, params, h0=..., c0=...) -> (ys, carry)


def _lstm_ref(xs, p, **carry):
    return reference.lstm(xs, p.input_kernel, p.recurrent_kernel, p.bias, **carry)


def _peephole_ref(xs, p, **carry):
    return reference.peephole_lstm(
        xs, p.input_kernel, p.recurrent_kernel, p.bias, p.peephole_input, p.peephole_forget, p.peephole_output, **carry
    )


def _cifg_ref(xs, p, **carry):
    return reference.cifg_lstm(
        xs, p.input_kernel, p.recurrent_kernel, p.bias, p.peephole_forget, p.peephole_output, **carry
    )


def _gru_ref(reset_after):
    def ref(xs, p, h0=None, c0=None):
        return reference.gru(
            xs, p.input_kernel, p.recurrent_kernel, p.bias, p.recurrent_bias, reset_after=reset_after, h0=h0
        )

    return ref


def _conv_ref(xs, p, **carry):
    return reference.conv_lstm(
        xs, p.input_kernel, p.recurrent_kernel, p.bias, p.peephole_input, p.peephole_forget, p.peephole_output, **carry
    )


F, H = 5, 7
VARIANTS = {
    "lstm": Variant(recurrent.lstm(H), (F,), _lstm_ref),
    "peephole_lstm": Variant(recurrent.peephole_lstm(H), (F,), _peephole_ref),
    "cifg_lstm": Variant(recurrent.cifg_lstm(H), (F,), _cifg_ref),
    "cifg_lstm_peephole": Variant(recurrent.cifg_lstm(H, peephole=True), (F,), _cifg_ref),
    "gru_reset_after": Variant(recurrent.gru(H, reset_after=True), (F,), _gru_ref(True)),
    "gru_reset_before": Variant(recurrent.gru(H, reset_after=False), (F,), _gru_ref(False)),
}
# ConvLSTM: 1D, 2D and 3D, odd, even and mixed kernels, with and without peepholes.
for _K, _S in [((3,), (9,)), ((4,), (8,)), ((3, 3), (6, 5)), ((2, 4), (5, 6)), ((3, 2, 3), (4, 3, 5))]:
    for _peep in (False, True):
        _name = f"conv_lstm_{'x'.join(map(str, _K))}{'_peephole' if _peep else ''}"
        VARIANTS[_name] = Variant(recurrent.conv_lstm(3, _K, peephole=_peep), (*_S, 2), _conv_ref)


def _setup(name, seed=0):
    variant = VARIANTS[name]
    # Only the shapes of the initial parameters matter: every value is replaced.
    params = randomize(jax.eval_shape(lambda k: variant.cell.init(k, variant.input_shape), jax.random.key(seed)), seed)
    xs = np.random.default_rng(seed + 1).standard_normal((B, T, *variant.input_shape)).astype(np.float32)
    return variant, params, xs


def _final(carry):
    """A library carry as the reference's: ``(h, c)`` for the LSTM family, ``h`` for the GRU."""
    return tuple(carry) if isinstance(carry, recurrent.LSTMState) else carry


def _assert_close(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), w, **TOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_matches_reference(name):
    variant, params, xs = _setup(name)
    carry, ys = jax.jit(recurrent.rnn(variant.cell).apply)(params, xs)
    ys_ref, carry_ref = variant.reference(xs, params)
    assert ys.shape == ys_ref.shape
    _assert_close(ys, ys_ref)
    _assert_close(_final(carry), carry_ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_layer_with_lengths_matches_reference(name):
    variant, params, xs = _setup(name, seed=1)
    lengths = np.array([T, 0, 4], np.int32)
    carry, ys = jax.jit(recurrent.rnn(variant.cell).apply)(params, xs, lengths=jnp.asarray(lengths))
    ys_ref, carry_ref = reference.with_lengths(lambda x: variant.reference(x, params), xs, lengths)
    _assert_close(ys, ys_ref)
    _assert_close(_final(carry), carry_ref)
    assert not np.any(np.asarray(ys)[1]) and not np.any(np.asarray(ys)[2, 4:])


@pytest.mark.parametrize(
    "name", ["lstm", "peephole_lstm", "cifg_lstm_peephole", "gru_reset_before", "conv_lstm_2x4_peephole"]
)
def test_step_loop_from_given_carry_matches_reference(name):
    """``cell.step`` in a Python loop, starting from a random (non-zero) carry."""
    variant, params, xs = _setup(name, seed=2)
    cell = variant.cell
    rng = np.random.default_rng(3)
    zero = cell.initial_carry(params, xs[:, 0].shape)
    carry0 = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), zero)
    if isinstance(carry0, recurrent.LSTMState):
        ref_carry = dict(h0=np.asarray(carry0.h), c0=np.asarray(carry0.c))
    else:
        ref_carry = dict(h0=np.asarray(carry0))
    ys_ref, carry_ref = variant.reference(xs, params, **ref_carry)

    step = jax.jit(cell.step)
    carry, ys = carry0, []
    for t in range(T):
        carry, y = step(params, carry, xs[:, t])
        ys.append(y)
    _assert_close(jnp.stack(ys, axis=1), ys_ref)
    _assert_close(_final(carry), carry_ref)

    # The layer's `carry=` argument continues from the same state.
    carry_l, ys_l = jax.jit(recurrent.rnn(cell).apply)(params, xs, carry=carry0)
    _assert_close(ys_l, ys_ref)
    _assert_close(_final(carry_l), carry_ref)


# --------------------------------------------------------------------------------------
# The reference's convolution itself, checked by hand (so the 'SAME' rule is pinned down
# independently of XLA).


def test_reference_same_conv_by_hand():
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    a, b, c = 10.0, 100.0, 1000.0
    # Even kernel (k=2): pad 0 low, 1 high, so y[j] = a x[j] + b x[j+1].
    y = reference.same_conv(x, np.array([a, b]).reshape(2, 1, 1))
    np.testing.assert_allclose(y.ravel(), [a + 2 * b, 2 * a + 3 * b, 3 * a])
    # Odd kernel (k=3): pad 1 both sides, cross-correlation y[j] = a x[j-1] + b x[j] + c x[j+1].
    y = reference.same_conv(x, np.array([a, b, c]).reshape(3, 1, 1))
    np.testing.assert_allclose(y.ravel(), [b + 2 * c, a + 2 * b + 3 * c, 2 * a + 3 * b])
    # k=4: pad 1 low, 2 high: y[j] = sum_d k[d] x[j - 1 + d].
    k4 = np.array([1.0, 10.0, 100.0, 1000.0])
    y = reference.same_conv(x, k4.reshape(4, 1, 1))
    np.testing.assert_allclose(y.ravel(), [10 + 200 + 3000, 1 + 20 + 300, 2 + 30])
    # 2D with channels: a 1x1 kernel is a matmul over channels at every position.
    x2 = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    k2 = np.random.default_rng(1).standard_normal((1, 1, 5, 6))
    np.testing.assert_allclose(reference.same_conv(x2, k2), x2 @ k2[0, 0])


def test_reference_zero_length_keeps_initial_carry():
    xs = np.zeros((1, 0, 2))
    ys, (h, c) = reference.lstm(xs, np.ones((2, 8)), np.ones((2, 8)), np.ones(8))
    assert ys.shape == (1, 0, 2) and not h.any() and not c.any()


# --------------------------------------------------------------------------------------
# Parameter counts and default initialisation.


@pytest.mark.parametrize("F,H", [(1, 1), (5, 7), (16, 8)])
def test_parameter_counts_dense(F, H):
    def count(cell):
        params = jax.eval_shape(lambda k: cell.init(k, (F,)), jax.random.key(0))
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

    assert count(recurrent.lstm(H)) == 4 * H * (F + H + 1)
    assert count(recurrent.peephole_lstm(H)) == 4 * H * (F + H + 1) + 3 * H
    assert count(recurrent.cifg_lstm(H)) == 3 * H * (F + H + 1)
    assert count(recurrent.cifg_lstm(H, peephole=True)) == 3 * H * (F + H + 1) + 2 * H
    assert count(recurrent.gru(H)) == 3 * H * (F + H + 1) + H
    assert count(recurrent.gru(H, reset_after=False)) == 3 * H * (F + H + 1)


@pytest.mark.parametrize("K,S", [((3,), (10,)), ((3, 2), (5, 4)), ((1, 3, 2), (2, 3, 4))])
@pytest.mark.parametrize("peephole", [False, True])
def test_parameter_counts_conv(K, S, peephole):
    C, H = 3, 4
    cell = recurrent.conv_lstm(H, K, peephole=peephole)
    params = jax.eval_shape(lambda k: cell.init(k, (*S, C)), jax.random.key(0))
    expected = 4 * H * (math.prod(K) * (C + H) + 1) + (3 * math.prod(S) * H if peephole else 0)
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)) == expected


def test_count_params_counts_every_leaf():
    params = recurrent.peephole_lstm(3).init(jax.random.key(0), (2,))
    assert recurrent.count_params(params) == 4 * 3 * (2 + 3 + 1) + 3 * 3


DEFAULTS = {
    "lstm": (recurrent.lstm(6), (5,), 4, 1),
    "peephole_lstm": (recurrent.peephole_lstm(6), (5,), 4, 1),
    "cifg_lstm": (recurrent.cifg_lstm(6, peephole=True), (5,), 3, 0),
    "gru": (recurrent.gru(6), (5,), 3, None),
    "gru_reset_before": (recurrent.gru(6, reset_after=False), (5,), 3, None),
    "conv_lstm": (recurrent.conv_lstm(6, (3, 2), peephole=True), (4, 5, 2), 4, 1),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_default_initialisation(name):
    cell, input_shape, G, forget = DEFAULTS[name]
    H = 6
    params = cell.init(jax.random.key(0), input_shape)
    bias = np.asarray(params.bias)
    expected_bias = np.zeros(G * H)
    if forget is not None:
        expected_bias[forget * H : (forget + 1) * H] = 1.0
    np.testing.assert_array_equal(bias, expected_bias)
    if getattr(params, "recurrent_bias", None) is not None:
        np.testing.assert_array_equal(params.recurrent_bias, 0.0)
    for p in ("peephole_input", "peephole_forget", "peephole_output"):
        if getattr(params, p, None) is not None:
            np.testing.assert_array_equal(getattr(params, p), 0.0)

    U = np.asarray(params.recurrent_kernel, np.float64)
    assert U.shape[-2:] == (H, G * H)
    U = U.reshape(-1, G * H)  # ConvLSTM: the flattened receptive field, (prod(K) * H, G*H)
    for g in range(G):
        block = U[:, g * H : (g + 1) * H]
        np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)
    # Blocks are initialised separately, not as one orthogonal (H, G*H) matrix cut in pieces.
    assert not np.allclose(U[:, :H], U[:, H : 2 * H])
    W = np.asarray(params.input_kernel)
    assert np.all(np.isfinite(W)) and np.std(W) > 0
