"""The optional cuDNN path, ``rnn(lstm(H), implementation="cudnn")``.

On CPU (here and in CI) these tests check the weight packing against JAX's own reference of
the cuDNN LSTM (``jax.experimental.rnn.lstm_ref``, which reads cuDNN's flat layout), our
wrapping of the call (lengths, zero lengths, reverse, carries, time-major, several batch
axes, gradients) with the cuDNN kernel replaced by that reference, and every fallback with
its message. ``test_real_cudnn_matches_scan`` runs the real kernel where an NVIDIA GPU is
the default backend (it passed on an H100 and an H200; see benchmarks/results/LOG.md).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn as jrnn

import recurrent
from recurrent import _cudnn

B, T, F, H = 3, 7, 5, 6


def _xs(shape=(B, T, F), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _reference_lstm(x, h_0, c_0, weights, seq_lengths, input_size, hidden_size, num_layers, dropout, bidirectional):
    """cuDNN's LSTM as JAX's reference computes it from the same flat weights."""
    W_ih, W_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    return jrnn.lstm_ref(
        x, h_0, c_0, W_ih, W_hh, b_ih, b_hh, seq_lengths, input_size, hidden_size, num_layers, dropout, bidirectional
    )


@pytest.fixture
def fake_gpu(monkeypatch):
    """The cuDNN path with the kernel replaced by JAX's reference of it."""
    monkeypatch.setattr(_cudnn, "backend_reason", lambda: None)
    monkeypatch.setattr(jrnn, "lstm", _reference_lstm)


def test_packed_weights_are_cudnn_layout():
    cell = recurrent.lstm(H)
    params = cell.init(jax.random.key(0), (F,))
    # a non-trivial bias, so a misplaced bias block would show
    params = params._replace(bias=jax.random.normal(jax.random.key(2), params.bias.shape))
    xs = _xs()
    carry = recurrent.LSTMState(_xs((B, H), 3), _xs((B, H), 4))
    want_carry, want = recurrent.rnn(cell).apply(params, xs, carry=carry)
    w = _cudnn.pack_weights(params)
    assert w.shape == (jrnn.get_num_params_in_lstm(F, H, 1, False),)
    ys, h, c = _reference_lstm(xs, carry.h[None], carry.c[None], w, jnp.full((B,), T, jnp.int32), F, H, 1, 0.0, False)
    np.testing.assert_allclose(ys, want, atol=1e-5)
    np.testing.assert_allclose(h[0], want_carry.h, atol=1e-5)
    np.testing.assert_allclose(c[0], want_carry.c, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("time_major", [False, True])
def test_cudnn_wrapper_matches_scan(fake_gpu, reverse, time_major):
    scan = recurrent.rnn(recurrent.lstm(H), reverse=reverse)
    fast = recurrent.rnn(recurrent.lstm(H), reverse=reverse, implementation="cudnn")
    params = scan.init(jax.random.key(0), (F,))
    xs = _xs((2, B, T, F))  # two batch axes
    lengths = jnp.array([[7, 3, 0], [1, 5, 7]])
    carry = recurrent.LSTMState(_xs((2, B, H), 3), _xs((2, B, H), 4))
    if time_major:
        xs = jnp.moveaxis(xs, 2, 0)

    def run(layer, params, xs, carry):
        with warnings.catch_warnings():
            warnings.simplefilter("error", recurrent.FallbackWarning)  # the fast path must be taken
            carry, ys = layer.apply(params, xs, lengths=lengths, carry=carry, time_major=time_major)
        return jnp.sum(ys**2) + jnp.sum(carry.h) + jnp.sum(carry.c**2), (carry, ys)

    (_, (c1, y1)), g1 = jax.value_and_grad(lambda *a: run(scan, *a), argnums=(0, 1, 2), has_aux=True)(params, xs, carry)
    (_, (c2, y2)), g2 = jax.value_and_grad(lambda *a: run(fast, *a), argnums=(0, 1, 2), has_aux=True)(params, xs, carry)
    np.testing.assert_allclose(y2, y1, atol=1e-5)
    for a, b in zip(jax.tree.leaves((c2, g2)), jax.tree.leaves((c1, g1))):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # zero-length sequences keep the given carry, and padding outputs zeros
    np.testing.assert_array_equal(c2.h[0, 2], carry.h[0, 2])
    padding = y2[3:, 0, 1] if time_major else y2[0, 1, 3:]  # sequence [0, 1] has length 3
    assert padding.shape[0] == T - 3 and bool((padding == 0).all())


def test_fallback_on_this_backend_says_why():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the cuDNN path is taken; test_real_cudnn_matches_scan checks it")
    layer = recurrent.rnn(recurrent.lstm(H), implementation="cudnn")
    params = layer.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning, match=f"default backend is '{jax.default_backend()}'"):
        _, ys = layer.apply(params, _xs())
    np.testing.assert_array_equal(ys, recurrent.rnn(recurrent.lstm(H)).apply(params, _xs())[1])


@pytest.mark.parametrize(
    "make, options, apply_kwargs, match",
    [
        (lambda: recurrent.peephole_lstm(H), {}, {}, "peephole"),
        (lambda: recurrent.cifg_lstm(H), {}, {}, "coupled"),
        (lambda: recurrent.lstm(H, proj_size=3), {}, {}, "proj_size"),
        (lambda: recurrent.lstm(H, cell_clip=3.0), {}, {}, "cell_clip"),
        (lambda: recurrent.lstm(H, input_activation=jax.nn.relu), {}, {}, "activations"),
        (lambda: recurrent.lstm(H, dtype=jnp.bfloat16), {}, {}, "dtype"),
        (lambda: recurrent.gru(H), {}, {}, "plain LSTM only, and 'gru'"),
        (lambda: recurrent.lstm(H), {"zoneout": 0.1}, {}, "zoneout"),
        (lambda: recurrent.lstm(H), {"recurrent_dropout": 0.1}, {"key": jax.random.key(0)}, "dropout"),
        (lambda: recurrent.lstm(H), {}, {"resets": jnp.zeros((B, T), bool)}, "resets"),
        (lambda: recurrent.lstm(H), {}, {"return_trace": True}, "return_trace"),
    ],
)
def test_fallbacks_say_why_and_agree(fake_gpu, make, options, apply_kwargs, match):
    fast = recurrent.rnn(make(), implementation="cudnn", **options)
    params = fast.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning, match=match):
        got = fast.apply(params, _xs(), **apply_kwargs)
    want = recurrent.rnn(make(), **options).apply(params, _xs(), **apply_kwargs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_dropout_off_at_evaluation_takes_the_fast_path(fake_gpu):
    fast = recurrent.rnn(recurrent.lstm(H), implementation="cudnn", recurrent_dropout=0.3, input_dropout=0.2)
    params = fast.init(jax.random.key(0), (F,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        _, ys = fast.apply(params, _xs())  # no key: evaluation, dropout is the identity
    np.testing.assert_allclose(ys, recurrent.rnn(recurrent.lstm(H)).apply(params, _xs())[1], atol=1e-5)


def test_vmap_falls_back(monkeypatch):
    """The real cuDNN primitive has no batching rule: under vmap the scan runs instead."""

    def no_batching(*args, **kwargs):
        raise NotImplementedError("Batching rule for 'rnn_fwd' not implemented")

    monkeypatch.setattr(_cudnn, "backend_reason", lambda: None)
    monkeypatch.setattr(jrnn, "lstm", no_batching)
    layer = recurrent.rnn(recurrent.lstm(H), implementation="cudnn")
    params = layer.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning, match="batching rule"):
        ys = jax.vmap(lambda x: layer.apply(params, x)[1])(_xs((2, B, T, F)))
    np.testing.assert_allclose(
        ys[1], recurrent.rnn(recurrent.lstm(H)).apply(params, _xs((2, B, T, F))[1])[1], atol=1e-6
    )


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="implementation"):
        recurrent.rnn(recurrent.lstm(H), implementation="cudnn2")


def test_cell_records_its_options():
    cell = recurrent.peephole_lstm(H, cell_clip=2.0)
    assert cell.options["hidden_size"] == H and cell.options["peephole"] is True and cell.options["cell_clip"] == 2.0
    with pytest.raises(TypeError):
        cell.options["peephole"] = False  # read-only
    assert _cudnn.cell_reason(recurrent.lstm(H)) is None
    # cells and layers stay hashable (static arguments of jax.jit, lru_cache keys)
    layer = recurrent.rnn(cell)
    assert hash(cell) == hash(cell) and hash(layer) == hash(layer)
    assert layer.options["cell_options"] is cell.options and layer.options["reverse"] is False


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_real_cudnn_matches_scan():
    scan = recurrent.rnn(recurrent.lstm(64))
    fast = recurrent.rnn(recurrent.lstm(64), implementation="cudnn")
    params = scan.init(jax.random.key(0), (32,))
    xs = _xs((8, 50, 32))
    lengths = jnp.array([50, 49, 30, 1, 0, 50, 7, 12])
    # full float32 matmuls, not the GPU's TF32 default: conftest.py
    loss = lambda layer, p, x: jnp.sum(layer.apply(p, x, lengths=lengths)[1] ** 2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        f = jax.jit(jax.value_and_grad(lambda p, x: loss(fast, p, x), argnums=(0, 1)))(params, xs)
    s = jax.jit(jax.value_and_grad(lambda p, x: loss(scan, p, x), argnums=(0, 1)))(params, xs)
    for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(s)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
