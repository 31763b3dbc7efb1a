"""State handling: learned initial carries, resets at segment boundaries (packed sequences),
per-step traces of carries and gates, and truncated backpropagation through time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import reference_family as ref
from tests.test_family import random_params

F, H = 3, 4
TIGHT = dict(rtol=1e-6, atol=1e-6)
_normal = jax.nn.initializers.normal(1.0)


def inputs(seed, batch, steps, features=F):
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


def learned(cell):
    """The cell with a learned initial carry drawn at random, so a reset to it (or a missed one)
    shows."""
    return recurrent.learned_initial_carry(cell, init=_normal)


# --------------------------------------------------------------------------------------
# Learned initial carry


def test_learned_initial_carry_is_a_parameter():
    base = recurrent.lstm(H)
    cell = learned(base)
    params = cell.init(jax.random.key(0), (F,))
    assert isinstance(params, recurrent.LearnedCarryParams)
    assert isinstance(params.carry, recurrent.LSTMState)
    assert params.carry.h.shape == params.carry.c.shape == (H,)
    assert np.abs(params.carry.h).max() > 0  # drawn by the given initialiser
    assert recurrent.count_params(params) == recurrent.count_params(base.init(jax.random.key(0), (F,))) + 2 * H
    carry = cell.initial_carry(params, (2, 5, F))  # two batch axes
    np.testing.assert_array_equal(carry.h, np.broadcast_to(params.carry.h, (2, 5, H)))
    np.testing.assert_array_equal(carry.c, np.broadcast_to(params.carry.c, (2, 5, H)))


def test_gradients_flow_into_the_learned_carry():
    """The gradient wrt the learned carry is the batch-sum of the gradient wrt an explicitly
    given initial carry of the plain cell, and not zero."""
    base = recurrent.lstm(H)
    cell = learned(base)
    params = cell.init(jax.random.key(1), (F,))
    xs = inputs(0, 3, 5)

    def loss_learned(p):
        return jnp.sum(recurrent.rnn(cell).apply(p, xs)[1] ** 2)

    def loss_explicit(carry):
        return jnp.sum(recurrent.rnn(base).apply(params.cell, xs, carry=carry)[1] ** 2)

    grads = jax.grad(loss_learned)(params)
    carry = jax.tree.map(lambda a: jnp.broadcast_to(a, (3, H)), params.carry)
    expected = jax.grad(loss_explicit)(carry)
    for g, e in zip(jax.tree.leaves(grads.carry), jax.tree.leaves(expected)):
        assert np.abs(g).min() > 0
        np.testing.assert_allclose(g, e.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: recurrent.lstm(H),
        lambda: recurrent.gru(H),
        lambda: recurrent.stacked([recurrent.lstm(H), recurrent.gru(H)]),
    ],
    ids=["lstm", "gru", "stacked"],
)
def test_length_zero_returns_the_learned_carry(make):
    cell = learned(make())
    params = cell.init(jax.random.key(2), (F,))
    layer = recurrent.rnn(cell)
    xs = inputs(1, 3, 4)
    carry, ys = layer.apply(params, xs, lengths=jnp.array([0, 4, 2]))
    for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(params.carry)):
        np.testing.assert_array_equal(got[0], want)
        assert not np.allclose(got[1], want)
    np.testing.assert_array_equal(ys[0], 0)
    # an empty time axis, and the reversed layer, also return it
    for lay in (layer, layer.reversed()):
        carry, ys = lay.apply(params, xs[:, :0])
        assert ys.shape == (3, 0, H)
        for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(params.carry)):
            np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))


# --------------------------------------------------------------------------------------
# Resets: a packed sequence equals its segments run on their own

T = 7
# per sequence: the segments [start, end) of its valid prefix
SEGMENTS = [[(0, 3), (3, 7)], [(0, 5), (5, 7)], [(0, 7)]]
SEGMENTS_WITH_LENGTHS = [[(0, 3), (3, 7)], [(0, 1), (1, 4)], [(0, 2), (2, 5)], []]
LENGTHS = np.array([7, 4, 5, 0])


def make_resets(segments, lengths=None):
    resets = np.zeros((len(segments), T), bool)
    for b, segs in enumerate(segments):
        for s, _ in segs:
            resets[b, s] = True
        if lengths is not None and lengths[b] < T:
            resets[b, lengths[b]] = True  # a boundary in the padding changes nothing
    return resets


def _forward_carry(carries):
    return carries[-1]


def _backward_carry(carries):
    return carries[0]


def _bidi_carry(carries):
    return recurrent.BidirectionalState(carries[-1].forward, carries[0].backward)


def _flipped_bidi_carry(carries):
    # a reversed bidirectional layer runs its forward direction backwards in time
    return recurrent.BidirectionalState(carries[0].forward, carries[-1].backward)


def _stacked_layers_carry(carries):
    return (_bidi_carry([c[0] for c in carries]), carries[-1][1])


def _layers():
    lstm, gru = learned(recurrent.peephole_lstm(H, peephole_init=_normal)), learned(recurrent.gru(H))
    return {
        "rnn": (recurrent.rnn(lstm), _forward_carry),
        "reversed_rnn": (recurrent.rnn(gru).reversed(), _backward_carry),
        "bidirectional": (recurrent.bidirectional(lstm, gru), _bidi_carry),
        "stacked_cells": (recurrent.rnn(recurrent.stacked([lstm, gru])), _forward_carry),
        "stacked_layers": (recurrent.stacked([recurrent.bidirectional(lstm), gru]), _stacked_layers_carry),
        "reversed_stacked_cells": (recurrent.rnn(recurrent.stacked([gru, lstm])).reversed(), _backward_carry),
        "reversed_bidirectional": (recurrent.bidirectional(gru, lstm).reversed(), _flipped_bidi_carry),
    }


LAYERS = _layers()


@functools.cache
def _setup(name):
    layer, pick = LAYERS[name]
    return layer, pick, layer.init(jax.random.key(len(name)), (F,))


def _apply(layer, params, xs):
    return jax.jit(layer.apply)(params, xs)


def segment_reference(layer, params, xs, segments):
    """Each segment run alone (from the initial carry): outputs in place, padding zero, and
    each sequence's list of segment carries."""
    out = layer.output_shape((F,))
    ys = np.zeros((xs.shape[0], T, *out), np.float32)
    carries = []
    for b, segs in enumerate(segments):
        seq = []
        for s, e in segs:
            c, y = _apply(layer, params, xs[b : b + 1, s:e])
            ys[b, s:e] = y[0]
            seq.append(jax.tree.map(lambda a: a[0], c))
        carries.append(seq)
    return ys, carries


def assert_tree_close(got, want, **tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **tol)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_resets_equal_separate_segments(name, with_lengths):
    layer, pick, params = _setup(name)
    segments = SEGMENTS_WITH_LENGTHS if with_lengths else SEGMENTS
    lengths = LENGTHS if with_lengths else None
    xs = inputs(3, len(segments), T)
    resets = make_resets(segments, lengths)
    carry, ys = jax.jit(layer.apply)(params, xs, resets=jnp.asarray(resets), lengths=lengths)
    ys_ref, carries = segment_reference(layer, params, xs, segments)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-5)
    # without resets the packed sequence is not its segments (the test can fail)
    if not with_lengths:
        assert not np.allclose(jax.jit(layer.apply)(params, xs)[1], ys_ref, atol=1e-3)
    initial = jax.tree.map(lambda a: a[0], layer.initial_carry(params, (1, F)))
    for b, segs in enumerate(segments):
        got = jax.tree.map(lambda a: a[b], carry)
        if not segs:  # length 0: the initial carry
            assert_tree_close(got, initial, rtol=0, atol=0)
        else:
            assert_tree_close(got, pick(carries[b]), rtol=1e-5, atol=1e-5)


def test_resets_time_major_and_two_batch_axes():
    layer, pick, params = _setup("bidirectional")
    xs = inputs(4, 3, T)
    resets = make_resets(SEGMENTS)
    _, ys = jax.jit(layer.apply)(params, xs, resets=jnp.asarray(resets))
    _, ys_tm = jax.jit(functools.partial(layer.apply, time_major=True))(
        params, np.swapaxes(xs, 0, 1), resets=jnp.asarray(resets.T)
    )
    np.testing.assert_allclose(np.swapaxes(ys_tm, 0, 1), ys, **TIGHT)
    _, ys_2 = jax.jit(layer.apply)(params, np.stack([xs, xs]), resets=jnp.asarray(np.stack([resets, resets])))
    np.testing.assert_allclose(ys_2[1], ys, **TIGHT)


def test_bad_resets():
    layer, _, params = _setup("rnn")
    xs = inputs(0, 2, T)
    for bad in (np.zeros((2, T), np.int32), np.zeros((2, T + 1), bool), np.zeros((T,), bool)):
        with pytest.raises(ValueError, match="resets") as excinfo:
            layer.apply(params, xs, resets=bad)
        assert "expected:" in str(excinfo.value) and "fix:" in str(excinfo.value)


# --------------------------------------------------------------------------------------
# Traces


def _loop_carries(cell, params, xs, reverse=False):
    carry = cell.initial_carry(params, (xs.shape[0], F))
    out = [None] * xs.shape[1]
    order = range(xs.shape[1])
    for t in reversed(order) if reverse else order:
        carry, _ = cell.step(params, carry, xs[:, t])
        out[t] = carry
    return out


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: recurrent.lstm_variant("FGR", H, proj_size=3),
        lambda: recurrent.gru(H),
        lambda: recurrent.stacked([recurrent.lstm(H), recurrent.cifg_lstm(H)]),
    ],
    ids=["lstm_fgr_proj", "gru", "stacked"],
)
def test_trace_carries_equal_a_python_loop(make, reverse):
    cell = make()
    params = random_params(cell, (F,), 3)
    xs = inputs(5, 2, 6)
    layer = recurrent.rnn(cell, reverse=reverse)
    carry, ys, trace = jax.jit(functools.partial(layer.apply, return_trace=True))(params, xs)
    expected = _loop_carries(cell, params, xs, reverse)
    for t, want in enumerate(expected):
        assert_tree_close(jax.tree.map(lambda a: a[:, t], trace.carries), want, **TIGHT)
    assert_tree_close(carry, expected[0 if reverse else -1], **TIGHT)
    # return_trace changes nothing else (two compiled programs: equal to float32 rounding, not
    # always bit for bit, as XLA fuses them differently)
    carry2, ys2 = jax.jit(layer.apply)(params, xs)
    assert_tree_close((carry2, ys2), (carry, ys), **TIGHT)


def test_trace_with_lengths_holds_the_carry_and_zeros_the_gates():
    cell = recurrent.lstm(H)
    params = random_params(cell, (F,), 4)
    xs = inputs(6, 2, 5)
    carry, ys, trace = recurrent.rnn(cell).apply(params, xs, lengths=jnp.array([5, 2]), return_trace=True)
    np.testing.assert_array_equal(trace.carries.h[1, 2:], np.broadcast_to(trace.carries.h[1, 1], (3, H)))
    np.testing.assert_array_equal(carry.h[1], trace.carries.h[1, 1])
    for g in trace.gates.values():
        np.testing.assert_array_equal(g[1, 2:], 0)


def test_trace_gates():
    """Sigmoid gates lie in [0, 1], candidates in [-1, 1]; the forget gate of step 1 is
    sigma(x_1 W_f + h_0 U_f + b_f) computed by hand from the trace's h after step 0."""
    cell = recurrent.lstm(H)
    params = random_params(cell, (F,), 5)
    xs = inputs(7, 3, 4)
    _, ys, trace = jax.jit(functools.partial(recurrent.rnn(cell).apply, return_trace=True))(params, xs)
    gates = trace.gates
    assert set(gates) == {"input", "forget", "cell", "output"}
    for name in ("input", "forget", "output"):
        assert gates[name].shape == (3, 4, H)
        assert (gates[name] >= 0).all() and (gates[name] <= 1).all()
    assert (np.abs(gates["cell"]) <= 1).all()
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h0 = np.asarray(trace.carries.h[:, 0], np.float64)
    f = ref.sigmoid(xs[:, 1] @ p.input_kernel[:, H : 2 * H] + h0 @ p.recurrent_kernel[:, H : 2 * H] + p.bias[H : 2 * H])
    np.testing.assert_allclose(gates["forget"][:, 1], f, rtol=1e-5, atol=1e-6)
    # and the first step's from a zero h
    f0 = ref.sigmoid(xs[:, 0] @ p.input_kernel[:, H : 2 * H] + p.bias[H : 2 * H])
    np.testing.assert_allclose(gates["forget"][:, 0], f0, rtol=1e-5, atol=1e-6)

    gru = recurrent.gru(H)
    _, _, trace = recurrent.rnn(gru).apply(random_params(gru, (F,), 6), xs, return_trace=True)
    for name in ("reset", "update"):
        assert (trace.gates[name] >= 0).all() and (trace.gates[name] <= 1).all()


# --------------------------------------------------------------------------------------
# Truncated backpropagation through time

TB_LAYER = recurrent.rnn(recurrent.lstm(H))
TB_PARAMS = random_params(recurrent.lstm(H), (F,), 8)
TB_B, TB_T = 2, 6


def _mse(params, carry, chunk):
    xs, targets = chunk
    carry, ys = TB_LAYER.apply(params, xs, carry=carry)
    return jnp.mean((ys[..., 0] - targets) ** 2), carry


def _sgd_step(state, carry, chunk, lr=0.1):
    (loss, carry), grads = jax.value_and_grad(_mse, has_aux=True)(state, carry, chunk)
    return jax.tree.map(lambda p, g: p - lr * g, state, grads), carry, loss


def _data():
    xs = inputs(9, TB_B, TB_T)
    targets = np.random.default_rng(10).standard_normal((TB_B, TB_T)).astype(np.float32)
    return xs, targets


def test_truncated_bptt_with_one_chunk_is_a_full_gradient_step():
    xs, targets = _data()
    carry0 = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))
    state, carry, losses = recurrent.truncated_bptt(_sgd_step, TB_PARAMS, carry0, (xs, targets), chunk_size=TB_T)
    expected_state, expected_carry, loss = _sgd_step(TB_PARAMS, carry0, (xs, targets))
    assert losses.shape == (1,)
    np.testing.assert_allclose(losses[0], loss, rtol=1e-6)
    assert_tree_close(state, expected_state, **TIGHT)
    assert_tree_close(carry, expected_carry, **TIGHT)
    assert not np.allclose(state.recurrent_kernel, TB_PARAMS.recurrent_kernel)


def test_truncated_bptt_updates_after_every_chunk():
    """Chunk k's step sees the parameters updated by chunks 0..k-1 and the carry they left."""
    xs, targets = _data()
    carry = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))
    state, carry_tb, losses = recurrent.truncated_bptt(_sgd_step, TB_PARAMS, carry, (xs, targets), chunk_size=2)
    params = TB_PARAMS
    expected = []
    for k in range(3):
        params, carry, loss = _sgd_step(params, carry, (xs[:, 2 * k : 2 * k + 2], targets[:, 2 * k : 2 * k + 2]))
        expected.append(loss)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert_tree_close(state, params, rtol=1e-5, atol=1e-6)
    assert_tree_close(carry_tb, carry, rtol=1e-5, atol=1e-6)


def test_truncated_bptt_carries_the_state_across_chunks():
    xs, _ = _data()
    carry0 = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))

    def forward(state, carry, chunk):
        carry, ys = TB_LAYER.apply(state, chunk, carry=carry)
        return state, carry, ys

    _, carry, outs = recurrent.truncated_bptt(forward, TB_PARAMS, carry0, xs, chunk_size=2)
    full_carry, full_ys = TB_LAYER.apply(TB_PARAMS, xs)
    assert outs.shape == (3, TB_B, 2, H)
    np.testing.assert_allclose(np.concatenate(list(outs), axis=1), full_ys, **TIGHT)
    assert_tree_close(carry, full_carry, **TIGHT)
    # time-major leaves with time_axis=0
    _, carry_tm, outs_tm = recurrent.truncated_bptt(
        lambda s, c, chunk: forward(s, c, jnp.swapaxes(chunk, 0, 1)),
        TB_PARAMS,
        carry0,
        np.swapaxes(xs, 0, 1),
        chunk_size=3,
        time_axis=0,
    )
    assert_tree_close(carry_tm, full_carry, **TIGHT)
    np.testing.assert_allclose(np.concatenate(list(outs_tm), axis=1), full_ys, **TIGHT)


def test_no_gradient_across_chunk_boundaries():
    """A loss on chunk 2's outputs only: zero gradient wrt chunk 1's inputs under truncation,
    non-zero without it (the carry does depend on chunk 1)."""
    xs, _ = _data()
    carry0 = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))

    def step(state, carry, chunk):
        carry, ys = TB_LAYER.apply(TB_PARAMS, chunk, carry=carry)
        return state, carry, jnp.sum(ys**2)

    def truncated_loss(xs):
        _, _, losses = recurrent.truncated_bptt(step, 0.0, carry0, xs, chunk_size=3)
        return losses[1]

    def full_loss(xs):
        return jnp.sum(TB_LAYER.apply(TB_PARAMS, xs)[1][:, 3:] ** 2)

    g = np.asarray(jax.grad(truncated_loss)(xs))
    np.testing.assert_array_equal(g[:, :3], 0)
    assert (np.abs(g[:, 3:]) > 0).all()
    g_full = np.asarray(jax.grad(full_loss)(xs))
    assert (np.abs(g_full[:, :3]) > 0).any()
    np.testing.assert_allclose(truncated_loss(xs), full_loss(xs), rtol=1e-5)  # same forward value


@pytest.mark.parametrize("chunk_size", [0, -2, 4, 2.5, True, None])
def test_truncated_bptt_bad_chunk_size(chunk_size):
    xs, _ = _data()
    carry0 = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))
    with pytest.raises(ValueError, match="chunk_size") as excinfo:
        recurrent.truncated_bptt(lambda s, c, x: (s, c, 0.0), None, carry0, xs, chunk_size=chunk_size)
    message = str(excinfo.value)
    assert "expected:" in message and "got:" in message and "fix:" in message


def test_truncated_bptt_mismatched_time_lengths():
    xs, targets = _data()
    carry0 = TB_LAYER.initial_carry(TB_PARAMS, (TB_B, F))
    with pytest.raises(ValueError, match="same time length"):
        recurrent.truncated_bptt(_sgd_step, TB_PARAMS, carry0, (xs, targets[:, :4]), chunk_size=2)
