"""Keras 3 interop: converted weights against Keras' own forward passes (JAX backend), and round trips.

Configurations (layer kind, sizes, GRU ``reset_after``, ``Bidirectional`` merge modes, stacks,
ragged lengths as a Keras mask) are drawn from a seeded generator; all weights are random,
biases included.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import recurrent  # noqa: E402
from recurrent.interop import from_keras, to_keras  # noqa: E402

keras = pytest.importorskip("keras")
L = keras.layers
TOL = dict(rtol=1e-5, atol=1e-5)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def exact(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def randomize(layer, seed):
    rng = np.random.default_rng(seed)
    layer.set_weights([0.5 * rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer


def make_rnn(kind, H, rng, **kw):
    if kind == "lstm":
        return L.LSTM(H, return_sequences=True, **kw)
    return L.GRU(H, return_sequences=True, reset_after=bool(rng.integers(2)), use_bias=bool(rng.integers(4)), **kw)


def carry_states(carry):
    """Our carry flattened in Keras' return_state order ([h, c] for LSTM, [h] for GRU)."""
    if isinstance(carry, recurrent.BidirectionalState):
        return carry_states(carry.forward) + carry_states(carry.backward)
    return [carry.h, carry.c] if isinstance(carry, recurrent.LSTMState) else [carry]


CONFIGS = []
_rng = np.random.default_rng(11)
for i, (kind, merge) in enumerate(
    [
        ("lstm", None),
        ("gru", None),
        ("gru", "concat"),
        ("lstm", "sum"),
        ("gru", "ave"),
        ("lstm", "mul"),
        ("gru", "none"),
    ]
):
    CONFIGS.append(
        dict(
            kind=kind,
            merge=merge,
            F=int(_rng.integers(1, 5)),
            H=int(_rng.integers(1, 6)),
            T=int(_rng.integers(2, 6)),
            seed=i,
        )
    )


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: f"{c['kind']}-{c['merge']}-F{c['F']}H{c['H']}T{c['T']}")
def test_recurrent_and_bidirectional(c):
    rng = np.random.default_rng(c["seed"])
    B, T, F, H = 3, c["T"], c["F"], c["H"]
    xs = rng.standard_normal((B, T, F)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None, :] < lengths[:, None]

    base = make_rnn(c["kind"], H, rng, return_state=True)
    k_layer = (
        base if c["merge"] is None else L.Bidirectional(base, merge_mode=None if c["merge"] == "none" else c["merge"])
    )
    k_layer.build((None, None, F))
    randomize(k_layer, c["seed"])
    out = k_layer(xs, mask=mask)
    n_out = 2 if c["merge"] == "none" else 1
    ys_ref, states_ref = out[:n_out], out[n_out:]

    layer, params = from_keras(k_layer)
    carry, ys = layer.apply(params, jnp.asarray(xs), lengths=jnp.asarray(lengths))
    if c["merge"] == "none":
        ys_ref = [np.stack([np.asarray(ys_ref[0]), np.asarray(ys_ref[1])], axis=-2)]
    close(np.asarray(ys)[mask], np.asarray(ys_ref[0])[mask])
    for got, want in zip(carry_states(carry), states_ref, strict=True):
        close(got, want)

    # round trip: to, then from, is exact
    merge_mode = c["merge"] if c["merge"] in ("sum", "ave", "mul") else None
    back = to_keras(layer, params, merge_mode=merge_mode)
    layer2, params2 = from_keras(back)
    exact(params2, params)
    ys_back = back(xs)
    ys = layer2.apply(params2, jnp.asarray(xs))[1]
    close(ys, np.stack(ys_back, axis=-2) if c["merge"] == "none" else ys_back)


def test_stack():
    rng = np.random.default_rng(3)
    B, T, F = 2, 5, 3
    model = keras.Sequential(
        [
            keras.Input((None, F)),
            L.Bidirectional(L.LSTM(4, return_sequences=True)),
            L.Bidirectional(L.GRU(3, return_sequences=True, reset_after=False), merge_mode="ave"),
            L.GRU(5, return_sequences=True),
        ]
    )
    for layer in model.layers:
        randomize(layer, int(rng.integers(100)))
    xs = rng.standard_normal((B, T, F)).astype(np.float32)
    layer, params = from_keras(model)
    _, ys = layer.apply(params, jnp.asarray(xs))
    close(ys, model(xs))
    back = to_keras(layer, params, merge_mode="ave")
    exact(from_keras(back)[1], params)
    assert [type(a).__name__ for a in back.layers] == [type(a).__name__ for a in model.layers]


@pytest.mark.parametrize(
    "cls,kernel_size,spatial",
    [(L.ConvLSTM1D, (3,), (5,)), (L.ConvLSTM2D, (2, 3), (4, 5)), (L.ConvLSTM3D, (2, 2, 3), (3, 3, 4))],
)
def test_conv_lstm(cls, kernel_size, spatial):
    B, T, C, H = 2, 3, 2, 3
    k_layer = cls(H, kernel_size, padding="same", return_sequences=True, return_state=True)
    k_layer.build((None, None, *spatial, C))
    randomize(k_layer, 5)
    xs = np.random.default_rng(0).standard_normal((B, T, *spatial, C)).astype(np.float32)
    ys_ref, h_ref, c_ref = k_layer(xs)
    layer, params = from_keras(k_layer)
    carry, ys = layer.apply(params, jnp.asarray(xs))
    close(ys, ys_ref)
    close(carry.h, h_ref)
    close(carry.c, c_ref)
    back = to_keras(layer, params)
    assert type(back) is cls
    exact(from_keras(back)[1], params)


def test_clear_errors():
    conv = L.ConvLSTM1D(2, (3,), padding="valid")
    conv.build((None, None, 6, 1))
    with pytest.raises(ValueError, match="padding='valid'"):
        from_keras(conv)
    relu = L.LSTM(2, activation="relu")
    relu.build((None, None, 3))
    with pytest.raises(ValueError, match="activation='relu'"):
        from_keras(relu)
    with pytest.raises(ValueError, match="cannot convert the Keras layer Dense"):
        from_keras(L.Dense(3))
    bi = recurrent.bidirectional(recurrent.lstm(3), merge="sum")
    with pytest.raises(ValueError, match="merge_mode"):
        to_keras(bi, bi.init(jax.random.key(0), (2,)))
    with pytest.raises(ValueError, match="peephole"):
        to_keras(recurrent.rnn(recurrent.peephole_lstm(3)), recurrent.peephole_lstm(3).init(jax.random.key(0), (2,)))
