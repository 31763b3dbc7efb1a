"""Padded steps influence nothing: with ``lengths``, whatever the inputs hold beyond each
sequence's length (NaN, inf, huge values) leaves the outputs, the carries and every gradient
exactly as with zeros there, for every cell and layer of the registry and every driver option."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests.fast_compiles import optimisations_off
from tests.registry import REGISTRY, _kernel

T = 5
LENGTHS = np.array([T, 2, 0], np.int32)
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e30": 1e30}


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Many small programs, compared exactly: XLA's optimisation passes are not needed."""
    with optimisations_off():
        yield


def _lstm(h, **kw):
    return recurrent.lstm(h, kernel_init=_kernel, recurrent_kernel_init=_kernel, **kw)


def _gru(h, **kw):
    return recurrent.gru(h, kernel_init=_kernel, recurrent_kernel_init=_kernel, **kw)


# Driver options and combinator forms beyond the registry's: (layer, input_shape, time_major).
EXTRA = {
    "vjp_lstm": lambda: (recurrent.rnn(_lstm(4), implementation="vjp"), (3,), False),
    "vjp_lstm_hoisted": lambda: (recurrent.rnn(_lstm(4), implementation="vjp", projection="hoisted"), (3,), False),
    "vjp_peephole_reverse": lambda: (
        recurrent.rnn(
            _lstm(4, peephole=True, peephole_init=jax.nn.initializers.normal(0.5)), implementation="vjp", reverse=True
        ),
        (3,),
        False,
    ),
    "vjp_cifg": lambda: (recurrent.rnn(recurrent.cifg_lstm(4), implementation="vjp"), (3,), False),
    "vjp_gru": lambda: (recurrent.rnn(_gru(4), implementation="vjp"), (3,), False),
    "vjp_gru_hoisted_time_major": lambda: (
        recurrent.rnn(_gru(4), implementation="vjp", projection="hoisted"),
        (3,),
        True,
    ),
    "remat_lstm": lambda: (recurrent.rnn(_lstm(4), remat=True), (3,), False),
    "remat_gru_reverse": lambda: (recurrent.rnn(_gru(4), remat=True, reverse=True), (3,), False),
    "hoisted_lstm": lambda: (recurrent.rnn(_lstm(4), projection="hoisted"), (3,), False),
    "fused_lstm": lambda: (recurrent.rnn(_lstm(4), projection="fused"), (3,), False),
    "hoisted_conv_lstm": lambda: (recurrent.rnn(recurrent.conv_lstm(2, (3,)), projection="hoisted"), (4, 2), False),
    "time_major_lstm": lambda: (recurrent.rnn(_lstm(4)), (3,), True),
    "time_major_bidirectional": lambda: (recurrent.bidirectional(_lstm(3)), (2,), True),
    "bidirectional_two_scans": lambda: (recurrent.bidirectional(_lstm(3), one_scan=False), (2,), False),
    "bidirectional_one_scan_batched": lambda: (recurrent.bidirectional(_lstm(3), one_scan=True), (2,), False),
    "bidirectional_one_scan_two_bodies": lambda: (
        recurrent.bidirectional(_gru(3), recurrent.cifg_lstm(3), one_scan=True),
        (2,),
        False,
    ),
    "bidirectional_vjp": lambda: (recurrent.bidirectional(recurrent.rnn(_lstm(3), implementation="vjp")), (2,), False),
    "stacked_layers": lambda: (recurrent.stacked([recurrent.rnn(_lstm(3)) for _ in range(3)]), (2,), False),
    "stacked_scan_layers": lambda: (
        recurrent.stacked([recurrent.rnn(_lstm(3)) for _ in range(3)], scan_layers=True, residual=True),
        (3,),
        False,
    ),
    "stacked_scan_layers_time_major": lambda: (
        recurrent.stacked([recurrent.bidirectional(_gru(2)) for _ in range(3)], scan_layers=True),
        (4,),
        True,
    ),
    "stacked_cells_remat": lambda: (recurrent.rnn(recurrent.stacked([_lstm(3), _gru(3)]), remat=True), (2,), False),
}


if jax.default_backend() == "gpu":  # cuDNN runs on NVIDIA GPUs only (elsewhere it falls back, with a warning)
    EXTRA |= {
        "cudnn_lstm": lambda: (recurrent.rnn(_lstm(4), implementation="cudnn"), (3,), False),
        "cudnn_lstm_reverse_time_major": lambda: (
            recurrent.rnn(_lstm(4), implementation="cudnn", reverse=True),
            (3,),
            True,
        ),
        "cudnn_bidirectional": lambda: (
            recurrent.bidirectional(recurrent.rnn(_lstm(3), implementation="cudnn"), one_scan=False),
            (2,),
            False,
        ),
    }


def _registry_case(entry):
    return entry.layer(), entry.input_shape, False


CASES = {e.id: functools.partial(_registry_case, e) for e in REGISTRY} | EXTRA


@functools.cache
def _compiled(name):
    """``(params, xs, lengths, weights, value_and_grad)`` of one case, compiled once."""
    layer, input_shape, time_major = CASES[name]()
    params = layer.init(jax.random.key(0), input_shape)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(len(LENGTHS), T, *input_shape)).astype(np.float32)
    weights = rng.normal(size=(len(LENGTHS), T, *layer.output_shape(input_shape))).astype(np.float32)
    to_layout = (lambda a: np.moveaxis(a, 1, 0)) if time_major else (lambda a: a)

    def loss(params, xs):  # every output and every carry leaf contributes
        carry, ys = layer.apply(params, xs, lengths=LENGTHS, time_major=time_major)
        return jnp.sum(ys * to_layout(weights)) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry))

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return params, xs, to_layout, value_and_grad


@pytest.mark.parametrize("name", list(CASES))
def test_padding_never_reaches_values_or_gradients(name):
    params, xs, to_layout, value_and_grad = _compiled(name)
    padded = (np.arange(T) >= LENGTHS[:, None]).reshape(len(LENGTHS), T, *(1,) * (xs.ndim - 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)  # the fast paths must run
        value, (g_params, g_xs) = jax.device_get(value_and_grad(params, to_layout(np.where(padded, 0.0, xs))))
        assert np.isfinite(value)
        for label, bad in BAD.items():
            dirty = to_layout(np.where(padded, np.float32(bad), xs))
            got_value, (got_params, got_xs) = jax.device_get(value_and_grad(params, dirty))
            assert np.isfinite(got_value), label
            np.testing.assert_allclose(got_value, value, rtol=1e-6, atol=1e-6, err_msg=label)
            for (path, got), want in zip(
                jax.tree_util.tree_flatten_with_path(got_params)[0], jax.tree.leaves(g_params)
            ):
                where = f"{label} in the padding: gradient of params{jax.tree_util.keystr(path)}"
                assert np.all(np.isfinite(got)), where
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=where)
            assert np.all(np.isfinite(got_xs)), f"{label} in the padding: gradient of xs"
            np.testing.assert_allclose(got_xs, g_xs, rtol=1e-6, atol=1e-6, err_msg=f"{label}: gradient of xs")
