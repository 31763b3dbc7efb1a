"""Traced ``lengths`` outside ``[0, T]`` cannot be checked at trace time: every layer clamps them
(negative to 0, above ``T`` to ``T``) and gives exactly what it gives for the clamped lengths.
Concrete out-of-range lengths raise (tests/test_errors.py)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent

T = 4
LENGTHS = np.array([-1, T + 1, T + 5, 2, 0, T], np.int32)
CLAMPED = np.clip(LENGTHS, 0, T)


def _lstm(h):
    return recurrent.lstm(h, bias_init=jax.nn.initializers.normal(0.3))


LAYERS = {
    "rnn": lambda: recurrent.rnn(_lstm(3)),
    "rnn_reverse": lambda: recurrent.rnn(recurrent.gru(3), reverse=True),
    "rnn_stacked_cells": lambda: recurrent.rnn(recurrent.stacked([_lstm(3), recurrent.gru(3)])),
    "bidirectional": lambda: recurrent.bidirectional(_lstm(3)),  # one scan, batched over directions
    "bidirectional_one_scan_two_bodies": lambda: recurrent.bidirectional(recurrent.gru(3), _lstm(3), one_scan=True),
    "bidirectional_two_scans": lambda: recurrent.bidirectional(_lstm(3), one_scan=False),
    "bidirectional_mean": lambda: recurrent.bidirectional(_lstm(3), merge="mean"),
    "bidirectional_reversed": lambda: recurrent.bidirectional(_lstm(3)).reversed(),
    "stacked": lambda: recurrent.stacked([recurrent.bidirectional(_lstm(2)), recurrent.gru(3)]),
    "stacked_scan_layers": lambda: recurrent.stacked([recurrent.rnn(_lstm(3)) for _ in range(3)], scan_layers=True),
    "vjp_lstm": lambda: recurrent.rnn(_lstm(3), implementation="vjp"),
    "vjp_gru_reverse": lambda: recurrent.rnn(recurrent.gru(3), implementation="vjp", reverse=True),
    "bidirectional_vjp": lambda: recurrent.bidirectional(recurrent.rnn(_lstm(3), implementation="vjp")),
}
if jax.default_backend() == "gpu":  # cuDNN runs on NVIDIA GPUs only (elsewhere it falls back, with a warning)
    LAYERS["cudnn_lstm"] = lambda: recurrent.rnn(_lstm(3), implementation="cudnn")
    LAYERS["cudnn_lstm_reverse"] = lambda: recurrent.rnn(_lstm(3), implementation="cudnn", reverse=True)


@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_traced_lengths_are_clamped(name, time_major):
    layer = LAYERS[name]()
    features = 3
    params = layer.init(jax.random.key(0), (features,))
    xs = jax.random.normal(jax.random.key(1), (len(LENGTHS), T, features))
    if time_major:
        xs = jnp.moveaxis(xs, 1, 0)
    apply = jax.jit(lambda p, x, n: layer.apply(p, x, lengths=n, time_major=time_major))
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)  # the fast paths must run
        got = jax.device_get(apply(params, xs, jnp.asarray(LENGTHS)))
        want = jax.device_get(apply(params, xs, jnp.asarray(CLAMPED)))
    for leaf in jax.tree.leaves(got):
        assert np.all(np.isfinite(leaf)), "out-of-range lengths must never give NaN"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    # and the clamped lengths mean what they say: padded outputs are zero
    ys = np.moveaxis(got[1], 0, 1) if time_major else got[1]
    assert np.all(ys[np.arange(T) >= CLAMPED[:, None]] == 0)
