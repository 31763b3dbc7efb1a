"""Regularisers of the driver (``recurrent.rnn``) and of ``recurrent.stacked``: input dropout
(per step, or variational), variational recurrent dropout, DropConnect, zoneout and dropout between
stacked layers.

Two kinds of observation, both independent of how the driver draws its masks:

- a *probe cell* that echoes what the driver hands it (the dropped input, the recurrent mask
  applied to its carry, its DropConnect-ed ``recurrent_kernel``);
- on real cells, the zero pattern of a gradient: a dropped input, recurrent unit or kernel entry
  has exactly zero gradient. The pattern gives the mask, and the run with a key must then equal a
  run without regularisers on inputs, recurrent inputs or kernels multiplied by that mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import reference_family as ref
from tests.fast_compiles import optimisations_off
from tests.test_family import random_params

B, T, F, H = 3, 5, 3, 4
TIGHT = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Many small programs, each run once or twice: XLA's optimisation passes would take most of
    their time. (Eager execution, op by op, is the battery's ``test_jit_matches_eager``: here every
    layer runs jitted.)"""
    with optimisations_off():
        yield


def inputs(seed=0, batch=B, steps=T, features=F):
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


LSTM = recurrent.lstm(H)
LSTM_PARAMS = random_params(LSTM, (F,), 11)
GRU = recurrent.gru(H)
GRU_PARAMS = random_params(GRU, (F,), 12)
XS = inputs()


# --------------------------------------------------------------------------------------
# A probe cell: y_t = [x_t as the driver hands it, carry * recurrent mask, recurrent_kernel]


class ProbeParams(NamedTuple):
    recurrent_kernel: jax.Array  # the field DropConnect acts on


K = 6


def probe_cell() -> recurrent.Cell:
    def init(key, input_shape):
        return ProbeParams(2.0 + jax.random.uniform(key, (K,)))

    def initial_carry(params, x_shape):
        return jnp.ones(x_shape, jnp.float32)  # the recurrent "state": all ones, never changes

    def project(params, x):
        return x

    def probe(params, carry, xp, noise=None):
        mask = 1.0 if noise is None or noise.recurrent is None else noise.recurrent
        kernel = jnp.broadcast_to(params.recurrent_kernel, (*xp.shape[:-1], K))
        return carry, jnp.concatenate([xp, carry * mask, kernel], axis=-1), {}

    return recurrent.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=lambda s: (2 * s[-1] + K,),
        input_rank=1,
        name="probe",
        # its whole carry is its recurrent input; DropConnect acts on its recurrent_kernel
        spec=recurrent.cell_spec(recurrent_input=None, recurrent_kernels=("recurrent_kernel",)),
    )


PROBE = probe_cell()
PROBE_PARAMS = PROBE.init(jax.random.key(0), (F,))


def split_probe(ys, width=F):
    """(input as handed over, carry * recurrent mask, recurrent_kernel) of a probe's outputs."""
    return ys[..., :width], ys[..., width : 2 * width], ys[..., 2 * width :]


def probe_outputs(keys, xs, **options):
    """The probe's outputs for each key, ``(len(keys), *batch, T, 2F + K)``."""
    layer = recurrent.rnn(PROBE, **options)
    return jax.jit(jax.vmap(lambda k: layer.apply(PROBE_PARAMS, xs, key=k)[1]))(keys)


# --------------------------------------------------------------------------------------
# Input dropout


def input_grad_zeros(layer, params, xs, key):
    """Where the loss has exactly zero gradient wrt the inputs: the dropped input entries."""
    grad = jax.jit(jax.grad(lambda xs: layer.apply(params, xs, key=key)[1].sum()))(xs)
    return np.asarray(grad) == 0


@pytest.mark.parametrize("variational", [True, False])
def test_input_dropout_masks_on_a_real_cell(variational):
    """Constant inputs over time: with variational dropout the same input units are dropped at
    every step, else the dropped units change from step to step. Either way the run with a key
    equals the run without regularisers on the inputs times the inverted-dropout mask."""
    rate = 0.5
    xs = np.repeat(inputs(1, steps=1), T, axis=1)  # x_t = x_0 for every t
    layer = recurrent.rnn(LSTM, input_dropout=rate, variational=variational)
    key = jax.random.key(3)
    dropped = input_grad_zeros(layer, LSTM_PARAMS, xs, key)  # (B, T, F)
    assert dropped.any() and not dropped.all()
    constant_over_time = (dropped == dropped[:, :1]).all()
    assert constant_over_time == variational
    if not variational:
        assert (dropped.any(axis=1) & ~dropped.all(axis=1)).any()  # a unit dropped at some steps only
    mask = (~dropped) / (1 - rate)
    _, ys = jax.jit(layer.apply)(LSTM_PARAMS, xs, key=key)
    _, ys_masked = jax.jit(recurrent.rnn(LSTM).apply)(LSTM_PARAMS, xs * mask.astype(np.float32))
    np.testing.assert_allclose(ys, ys_masked, **TIGHT)


@pytest.mark.parametrize("variational", [True, False])
def test_input_dropout_preserves_the_expectation(variational):
    rate, n = 0.3, 4000
    xs = inputs(2, batch=2)
    keys = jax.random.split(jax.random.key(0), n)
    seen, _, _ = split_probe(probe_outputs(keys, xs, input_dropout=rate, variational=variational))
    seen = np.asarray(seen)  # (n, batch, T, F)
    kept = seen != 0
    # every entry is either dropped or scaled by 1 / (1 - rate)
    np.testing.assert_allclose(seen[kept], np.broadcast_to(xs / (1 - rate), seen.shape)[kept], rtol=1e-6)
    assert abs(1 - kept.mean() - rate) < 0.01
    # mean over keys ~ the input: per entry within 5 standard errors of the mean
    stderr = np.abs(xs) * np.sqrt(rate / (1 - rate) / n)
    assert (np.abs(seen.mean(0) - xs) < 5 * stderr + 1e-6).all()
    # per-step masks differ between steps, variational ones never do
    assert (kept == kept[:, :, :1]).all() == variational


# --------------------------------------------------------------------------------------
# Recurrent dropout


def recurrent_row_zeros(layer, params, xs, key):
    """``(B, H_in)``: True where the loss of sequence b has exactly zero gradient wrt row j of
    the recurrent kernel, i.e. where recurrent unit j of sequence b is dropped at every step."""

    def grad_b(b):
        loss = lambda p: layer.apply(p, xs, key=key)[1][b].sum()  # noqa: E731
        return jax.grad(loss)(params).recurrent_kernel

    grads = jax.jit(jax.vmap(grad_b))(jnp.arange(xs.shape[0]))
    return np.asarray((grads == 0).all(axis=-1))


def test_recurrent_dropout_lstm_is_one_mask_per_sequence():
    rate = 0.5
    layer = recurrent.rnn(LSTM, recurrent_dropout=rate)
    key = jax.random.key(4)
    dropped = recurrent_row_zeros(layer, LSTM_PARAMS, XS, key)  # (B, H)
    assert dropped.any() and not dropped.all()
    assert len({tuple(row) for row in dropped}) > 1  # each sequence has its own mask
    mask = jnp.asarray((~dropped) / (1 - rate), jnp.float32)
    # Python loop: the same mask on the recurrent input h at every step, c and the outputs unmasked
    carry = LSTM.initial_carry(LSTM_PARAMS, (B, F))
    outs = []
    for t in range(T):
        carry, y = LSTM.step(LSTM_PARAMS, carry._replace(h=carry.h * mask), XS[:, t])
        outs.append(y)
    final, ys = jax.jit(layer.apply)(LSTM_PARAMS, XS, key=key)
    np.testing.assert_allclose(ys, np.stack(outs, 1), **TIGHT)
    np.testing.assert_allclose(final.h, carry.h, **TIGHT)
    np.testing.assert_allclose(final.c, carry.c, **TIGHT)


def test_recurrent_dropout_gru_interpolates_with_the_unmasked_state():
    """h' = (1 - z) n + z h with r, z, n computed from the masked h (Gal & Ghahramani) but the
    interpolation using the state itself, written out in NumPy."""
    rate = 0.5
    layer = recurrent.rnn(GRU, recurrent_dropout=rate)
    key = jax.random.key(5)
    dropped = recurrent_row_zeros(layer, GRU_PARAMS, XS, key)
    assert dropped.any() and not dropped.all()
    m = (~dropped) / (1 - rate)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), GRU_PARAMS)
    W, U, b, b_hn = p.input_kernel, p.recurrent_kernel, p.bias, p.recurrent_bias
    h = np.zeros((B, H))
    outs = []
    for t in range(T):
        x, h_in = XS[:, t].astype(np.float64), h * m
        r = ref.sigmoid(x @ W[:, :H] + h_in @ U[:, :H] + b[:H])
        z = ref.sigmoid(x @ W[:, H : 2 * H] + h_in @ U[:, H : 2 * H] + b[H : 2 * H])
        n = np.tanh(x @ W[:, 2 * H :] + b[2 * H :] + r * (h_in @ U[:, 2 * H :] + b_hn))
        h = (1 - z) * n + z * h
        outs.append(h)
    final, ys = jax.jit(layer.apply)(GRU_PARAMS, XS, key=key)
    np.testing.assert_allclose(ys, np.stack(outs, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, h, rtol=1e-5, atol=1e-5)


def test_recurrent_dropout_mask_is_constant_within_a_sequence():
    rate, n = 0.4, 3000
    keys = jax.random.split(jax.random.key(1), n)
    _, seen, _ = split_probe(probe_outputs(keys, XS, recurrent_dropout=rate))
    seen = np.asarray(seen)  # (n, B, T, F): the mask itself, since the carry is all ones
    assert (seen == seen[:, :, :1]).all()  # one mask per sequence, over all steps
    assert (seen[:, :1] != seen).any()  # but not shared by the batch
    np.testing.assert_allclose(np.unique(seen), [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert abs(seen.mean() - 1) < 0.03  # expectation preserved


# --------------------------------------------------------------------------------------
# DropConnect


def test_dropconnect_one_mask_for_all_steps_and_the_batch():
    rate = 0.5
    layer = recurrent.rnn(LSTM, dropconnect=rate)
    key = jax.random.key(6)
    loss = lambda p: layer.apply(p, XS, key=key)[1].sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss))(LSTM_PARAMS)
    dropped = np.asarray(grads.recurrent_kernel) == 0
    assert dropped.any() and not dropped.all()
    assert not (np.asarray(grads.input_kernel) == 0).any()  # only the recurrent kernel is dropped
    kernel = LSTM_PARAMS.recurrent_kernel * jnp.asarray((~dropped) / (1 - rate), jnp.float32)
    final, ys = jax.jit(layer.apply)(LSTM_PARAMS, XS, key=key)
    final_m, ys_m = jax.jit(recurrent.rnn(LSTM).apply)(LSTM_PARAMS._replace(recurrent_kernel=kernel), XS)
    np.testing.assert_allclose(ys, ys_m, **TIGHT)
    np.testing.assert_allclose(final.c, final_m.c, **TIGHT)


def test_dropconnect_on_the_probe_kernel():
    rate, n = 0.3, 3000
    keys = jax.random.split(jax.random.key(2), n)
    _, _, kernel = split_probe(probe_outputs(keys, XS, dropconnect=rate))
    kernel = np.asarray(kernel)  # (n, B, T, K)
    assert (kernel == kernel[:, :1, :1]).all()  # shared by every sequence and step
    assert (kernel[:1] != kernel).any()  # a new mask per call (key)
    w = np.asarray(PROBE_PARAMS.recurrent_kernel)
    kept = kernel[:, 0, 0] != 0
    np.testing.assert_allclose(kernel[:, 0, 0][kept], np.broadcast_to(w / (1 - rate), kept.shape)[kept], rtol=1e-6)
    stderr = w * np.sqrt(rate / (1 - rate) / n)
    assert (np.abs(kernel[:, 0, 0].mean(0) - w) < 5 * stderr).all()


def test_dropconnect_reaches_kernels_inside_stacks_and_bidirectional_layers():
    stack = recurrent.stacked([recurrent.lstm(H), recurrent.gru(H)])
    for layer_of, make in [
        (lambda **kw: recurrent.rnn(stack, **kw), lambda: stack),
        (lambda **kw: recurrent.bidirectional(recurrent.rnn(LSTM, **kw)), lambda: recurrent.bidirectional(LSTM)),
    ]:
        params = random_params(make(), (F,), 13)
        loss = lambda p, layer: layer.apply(p, XS, key=jax.random.key(0))[1].sum()  # noqa: E731
        grads = jax.jit(jax.grad(loss), static_argnums=1)(params, layer_of(dropconnect=0.5))
        leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
        for path, g in leaves:
            name = getattr(path[-1], "name", "")
            assert (np.asarray(g) == 0).any() == (name == "recurrent_kernel"), jax.tree_util.keystr(path)


# --------------------------------------------------------------------------------------
# Keys: deterministic, and off at evaluation

ALL_ON = dict(input_dropout=0.3, recurrent_dropout=0.3, dropconnect=0.3, zoneout=0.2, zoneout_cell=0.1)


@pytest.mark.parametrize("cell, params", [(LSTM, LSTM_PARAMS), (GRU, GRU_PARAMS)], ids=["lstm", "gru"])
def test_deterministic_for_a_key(cell, params):
    apply = jax.jit(recurrent.rnn(cell, **ALL_ON).apply)
    a = apply(params, XS, key=jax.random.key(7))
    b = apply(params, XS, key=jax.random.key(7))
    c = apply(params, XS, key=jax.random.key(8))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[1], c[1])


@pytest.mark.parametrize(
    "options",
    [
        dict(input_dropout=0.4),
        dict(input_dropout=0.4, variational=True),
        dict(recurrent_dropout=0.4),
        dict(dropconnect=0.4),
        dict(input_dropout=0.2, recurrent_dropout=0.3, dropconnect=0.4),
    ],
    ids=["input", "variational_input", "recurrent", "dropconnect", "all_dropout"],
)
@pytest.mark.parametrize("cell, params", [(LSTM, LSTM_PARAMS), (GRU, GRU_PARAMS)], ids=["lstm", "gru"])
def test_dropout_is_the_identity_at_evaluation(cell, params, options):
    plain = jax.jit(recurrent.rnn(cell).apply)(params, XS)
    apply = jax.jit(recurrent.rnn(cell, **options).apply)
    evaluated = apply(params, XS)  # no key
    trained = apply(params, XS, key=jax.random.key(0))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(evaluated)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(plain[1], trained[1])


def _lstm_ref_step(p, x, h, c):
    ys, (h, c) = ref.lstm(x[:, None], W=p.input_kernel, U=p.recurrent_kernel, b=p.bias, h0=h, c0=c)
    return h, c


def _gru_ref_step(p, x, h):
    _, h = ref.gru(x[:, None], W=p.input_kernel, U=p.recurrent_kernel, b=p.bias, b_hn=p.recurrent_bias, h0=h)
    return h


def test_zoneout_at_evaluation_is_the_expectation_lstm():
    """Two steps by hand: h_t = z_h h_{t-1} + (1 - z_h) h~_t, c_t = z_c c_{t-1} + (1 - z_c) c~_t,
    with h~, c~ the LSTM's update from the mixed previous carry; from a non-zero carry."""
    z_h, z_c = 0.3, 0.6
    xs = XS[:, :2]
    rng = np.random.default_rng(3)
    h0, c0 = rng.standard_normal((2, B, H)).astype(np.float32)
    carry0 = recurrent.LSTMState(jnp.asarray(h0), jnp.asarray(c0))
    final, ys = jax.jit(recurrent.rnn(LSTM, zoneout=z_h, zoneout_cell=z_c).apply)(LSTM_PARAMS, xs, carry=carry0)
    p = LSTM_PARAMS
    h, c = h0.astype(np.float64), c0.astype(np.float64)
    expected = []
    for t in range(2):
        h_new, c_new = _lstm_ref_step(p, xs[:, t], h, c)
        h, c = z_h * h + (1 - z_h) * h_new, z_c * c + (1 - z_c) * c_new
        expected.append(h)
    np.testing.assert_allclose(ys, np.stack(expected, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.h, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.c, c, rtol=1e-5, atol=1e-5)
    # zoneout_cell defaults to zoneout
    _, ys_default = jax.jit(recurrent.rnn(LSTM, zoneout=z_h).apply)(p, xs, carry=carry0)
    _, ys_same = jax.jit(recurrent.rnn(LSTM, zoneout=z_h, zoneout_cell=z_h).apply)(p, xs, carry=carry0)
    np.testing.assert_array_equal(ys_default, ys_same)


def test_zoneout_at_evaluation_is_the_expectation_gru():
    z = 0.25
    xs = XS[:, :2]
    h0 = np.random.default_rng(4).standard_normal((B, H)).astype(np.float32)
    final, ys = jax.jit(recurrent.rnn(GRU, zoneout=z).apply)(GRU_PARAMS, xs, carry=jnp.asarray(h0))
    h = h0.astype(np.float64)
    expected = []
    for t in range(2):
        h = z * h + (1 - z) * _gru_ref_step(GRU_PARAMS, xs[:, t], h)
        expected.append(h)
    np.testing.assert_allclose(ys, np.stack(expected, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, h, rtol=1e-5, atol=1e-5)


def test_zoneout_in_training_keeps_or_updates_each_unit():
    """Every unit of h (and of c) either keeps its previous value exactly or takes the cell's
    update; both happen, the choice changes from step to step, and h and c choose apart."""
    layer = recurrent.rnn(LSTM, zoneout=0.5, zoneout_cell=0.5)
    xs = inputs(5, steps=7)
    carry, ys, trace = jax.jit(lambda p, x, k: layer.apply(p, x, key=k, return_trace=True))(
        LSTM_PARAMS, xs, jax.random.key(9)
    )
    prev = LSTM.initial_carry(LSTM_PARAMS, (B, F))
    step = jax.jit(LSTM.step)
    kept = {"h": [], "c": []}
    for t in range(xs.shape[1]):
        new, _ = step(LSTM_PARAMS, prev, xs[:, t])
        cur = jax.tree.map(lambda a: a[:, t], trace.carries)
        for name in ("h", "c"):
            old_v, new_v, cur_v = (np.asarray(getattr(s, name)) for s in (prev, new, cur))
            is_old = np.isclose(cur_v, old_v, rtol=0, atol=1e-6)
            is_new = np.isclose(cur_v, new_v, rtol=0, atol=1e-6)
            assert (is_old | is_new).all(), (t, name)
            distinct = np.abs(old_v - new_v) > 1e-4
            kept[name].append(np.where(distinct, is_old, np.nan))
        np.testing.assert_array_equal(ys[:, t], cur.h)
        prev = cur
    for name in ("h", "c"):
        k = np.array(kept[name])  # (T, B, H): 1 kept, 0 updated, nan undecidable
        assert np.nanmax(k) == 1 and np.nanmin(k) == 0
        assert ((np.nanmax(k, 0) == 1) & (np.nanmin(k, 0) == 0)).any()  # a unit kept, later updated
    h_kept, c_kept = np.array(kept["h"]), np.array(kept["c"])
    both = ~np.isnan(h_kept) & ~np.isnan(c_kept)
    assert (h_kept[both] != c_kept[both]).any()


# --------------------------------------------------------------------------------------
# A population of rates


def test_vmapped_rates_compile_once():
    traces = []
    xs = XS

    def member(rate, key):
        traces.append(rate)  # runs only while tracing
        layer = recurrent.rnn(
            LSTM, input_dropout=rate, recurrent_dropout=rate, dropconnect=rate, zoneout=rate, zoneout_cell=rate
        )
        return layer.apply(LSTM_PARAMS, xs, key=key)[1]

    population = jax.jit(jax.vmap(member))
    keys = jax.random.split(jax.random.key(0), 3)
    ys = population(jnp.array([0.0, 0.2, 0.5]), keys)
    ys2 = population(jnp.array([0.1, 0.3, 0.0]), keys)
    assert len(traces) == 1
    assert population._cache_size() == 1
    # a traced rate of 0 is no regulariser at all
    _, plain = jax.jit(recurrent.rnn(LSTM).apply)(LSTM_PARAMS, xs)
    np.testing.assert_allclose(ys[0], plain, **TIGHT)
    np.testing.assert_allclose(ys2[2], plain, **TIGHT)
    assert not np.allclose(ys[1], plain) and not np.allclose(ys[2], plain)
    # the same rate and key give the same member whatever the rest of the population
    single = jax.jit(member)(jnp.float32(0.2), keys[1])
    np.testing.assert_allclose(ys[1], single, **TIGHT)


def test_vmapped_stacked_dropout_rates_compile_once():
    traces = []

    def member(rate, key):
        traces.append(rate)
        layer = recurrent.rnn(recurrent.stacked([LSTM, recurrent.lstm(H)], dropout=rate))
        return layer.apply(STACK_PARAMS, XS, key=key)[1]

    population = jax.jit(jax.vmap(member))
    ys = population(jnp.array([0.0, 0.5]), jax.random.split(jax.random.key(0), 2))
    population(jnp.array([0.3, 0.6]), jax.random.split(jax.random.key(1), 2))
    assert len(traces) == 1 and population._cache_size() == 1
    _, plain = jax.jit(recurrent.rnn(recurrent.stacked([LSTM, recurrent.lstm(H)])).apply)(STACK_PARAMS, XS)
    np.testing.assert_allclose(ys[0], plain, **TIGHT)
    assert not np.allclose(ys[1], plain)


# --------------------------------------------------------------------------------------
# Dropout between stacked layers

STACK_PARAMS = random_params(recurrent.stacked([LSTM, recurrent.lstm(H)]), (F,), 14)


def _stack_with_probe(dropout, as_layers):
    items = [recurrent.rnn(LSTM) if as_layers else LSTM, PROBE]
    return recurrent.stacked(items, dropout=dropout)


@pytest.mark.parametrize("as_layers", [False, True], ids=["stacked_cells", "stacked_layers"])
def test_stacked_dropout_only_with_a_key(as_layers):
    """A probe as the second layer shows what it receives: the first layer's outputs, unchanged
    without a key, with a fresh inverted-dropout mask at every step with one."""
    rate = 0.5
    plain_stack, drop_stack = _stack_with_probe(0.0, as_layers), _stack_with_probe(rate, as_layers)
    if not as_layers:
        plain_stack, drop_stack = recurrent.rnn(plain_stack), recurrent.rnn(drop_stack)
    params = (LSTM_PARAMS, PROBE_PARAMS)
    drop_apply = jax.jit(drop_stack.apply)
    c_plain, y_plain = jax.jit(plain_stack.apply)(params, XS)
    c_eval, y_eval = drop_apply(params, XS)
    np.testing.assert_array_equal(y_eval, y_plain)
    c_train, y_train = drop_apply(params, XS, key=jax.random.key(0))
    # the first layer itself is untouched
    np.testing.assert_allclose(c_train[0].h, c_plain[0].h, **TIGHT)
    seen, first = np.asarray(split_probe(y_train, H)[0]), np.asarray(split_probe(y_plain, H)[0])
    np.testing.assert_allclose(first, jax.jit(recurrent.rnn(LSTM).apply)(LSTM_PARAMS, XS)[1], **TIGHT)
    kept = seen != 0
    assert kept.any() and not kept.all()
    np.testing.assert_allclose(seen[kept], first[kept] / (1 - rate), rtol=1e-6, atol=1e-6)
    assert not (kept == kept[:, :1]).all()  # a new mask at every step


def test_stacked_dropout_between_real_layers():
    stack = recurrent.stacked([LSTM, recurrent.lstm(H)], dropout=0.5)
    apply = jax.jit(recurrent.rnn(stack).apply)
    _, plain = jax.jit(recurrent.rnn(recurrent.stacked([LSTM, recurrent.lstm(H)])).apply)(STACK_PARAMS, XS)
    np.testing.assert_array_equal(apply(STACK_PARAMS, XS)[1], plain)
    assert not np.allclose(apply(STACK_PARAMS, XS, key=jax.random.key(0))[1], plain)


# --------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "make, input_shape",
    [
        (lambda: recurrent.lstm_variant("FGR", H, proj_size=3, layer_norm=True, cell_clip=1.0), (F,)),
        (lambda: recurrent.gru(H, layer_norm=True), (F,)),
        (lambda: recurrent.conv_lstm(2, (3,), peephole=True), (4, 2)),
        (lambda: recurrent.stacked([recurrent.cifg_lstm(H), recurrent.gru(H)], dropout=0.3), (F,)),
    ],
    ids=["lstm_fgr_proj_ln", "gru_ln", "conv_lstm", "stacked"],
)
def test_gradients_finite_with_every_regulariser(make, input_shape):
    cell = make()
    layer = recurrent.rnn(cell, variational=True, **ALL_ON)
    params = random_params(cell, input_shape, 15)
    xs = np.random.default_rng(6).standard_normal((2, T, *input_shape)).astype(np.float32)

    def loss(p, key):
        return jnp.mean(layer.apply(p, xs, key=key, lengths=jnp.array([T, 2]))[1] ** 2)

    grads = jax.jit(jax.grad(loss))(params, jax.random.key(1))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert any(np.abs(g).max() > 0 for g in leaves)
