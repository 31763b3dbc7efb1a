"""Parameters made for another cell (another kind, hidden size or option) are refused at trace
time, with an error naming the first leaf that differs from what the layer's ``init`` makes;
parameters that legitimately differ from a fresh init (other dtypes, learned initial carries,
stacked layers scanned over, populations) keep working."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent._core import make_cell
from tests.test_errors import clear_error

KEY = jax.random.key(0)
F = 2
XS = jnp.ones((3, 4, F))


def _init(layer_or_cell, input_shape=(F,)):
    return layer_or_cell.init(KEY, input_shape)


def _lstm_params(**options):
    return _init(recurrent.lstm(3, **options))


# (layer, params, words the error names): params of another cell for each layer.
CASES = {
    "peephole_params_in_plain_lstm": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _init(recurrent.peephole_lstm(3)),
        ["params.peephole_input", "None", "(3,)"],
    ),
    "reset_after_params_in_reset_before_gru": lambda: (
        recurrent.rnn(recurrent.gru(3, reset_after=False)),
        _init(recurrent.gru(3)),
        ["params.recurrent_bias", "None", "(3,)"],
    ),
    "reset_before_params_in_reset_after_gru": lambda: (
        recurrent.rnn(recurrent.gru(3)),
        _init(recurrent.gru(3, reset_after=False)),
        ["params.recurrent_bias"],
    ),
    "another_hidden_size": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _init(recurrent.lstm(4)),
        ["params.input_kernel", "(2, 12)", "(2, 16)"],
    ),
    "another_hidden_size_gru": lambda: (
        recurrent.rnn(recurrent.gru(3)),
        _init(recurrent.gru(5)),
        ["params.input_kernel", "(2, 9)", "(2, 15)"],
    ),
    "gru_params_in_lstm": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _init(recurrent.gru(3)),
        ["LSTMParams", "GRUParams"],
    ),
    "lstm_params_in_gru": lambda: (
        recurrent.rnn(recurrent.gru(4)),
        _init(recurrent.lstm(3)),
        ["GRUParams", "LSTMParams"],
    ),
    "cifg_params_in_lstm": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _init(recurrent.cifg_lstm(4)),  # 3 gate blocks of 4: an input kernel of the same shape
        ["params.recurrent_kernel", "(3, 12)", "(4, 12)"],
    ),
    "projection_params_in_lstm": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _lstm_params(proj_size=3),
        ["params.projection"],
    ),
    "layer_norm_params_in_lstm": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _lstm_params(layer_norm=True),
        ["params.layer_norm"],
    ),
    "bias_none": lambda: (
        recurrent.rnn(recurrent.lstm(3)),
        _lstm_params()._replace(bias=None),
        ["params.bias", "None"],
    ),
    "plain_dict": lambda: (recurrent.rnn(recurrent.lstm(3)), _lstm_params()._asdict(), ["LSTMParams", "dict"]),
    "conv_kernel_size": lambda: (
        recurrent.rnn(recurrent.conv_lstm(2, (3,))),
        _init(recurrent.conv_lstm(2, (5,)), (4, F)),
        ["params.input_kernel", "(3, 2, 8)", "(5, 2, 8)"],
    ),
    "vjp_with_peephole_params": lambda: (
        recurrent.rnn(recurrent.lstm(3), implementation="vjp"),
        _init(recurrent.peephole_lstm(3)),
        ["params.peephole_input"],
    ),
    "vjp_gru_with_lstm_params": lambda: (
        recurrent.rnn(recurrent.gru(3), implementation="vjp"),
        _lstm_params(),
        ["GRUParams", "LSTMParams"],
    ),
    "reversed_layer": lambda: (
        recurrent.rnn(recurrent.lstm(3), reverse=True),
        _init(recurrent.peephole_lstm(3)),
        ["params.peephole_input"],
    ),
    "bidirectional_backward": lambda: (
        recurrent.bidirectional(recurrent.lstm(3)),
        recurrent.BidirectionalParams(_lstm_params(), _init(recurrent.lstm(4))),
        ["params.backward.input_kernel", "(2, 12)", "(2, 16)"],
    ),
    "bidirectional_forward_peephole": lambda: (
        recurrent.bidirectional(recurrent.lstm(3), one_scan=False),
        recurrent.BidirectionalParams(_init(recurrent.peephole_lstm(3)), _lstm_params()),
        ["params.forward.peephole_input"],
    ),
    "bidirectional_given_one_direction": lambda: (
        recurrent.bidirectional(recurrent.lstm(3)),
        _lstm_params(),
        ["BidirectionalParams", "LSTMParams"],
    ),
    "stacked_layers": lambda: (
        recurrent.stacked([recurrent.bidirectional(recurrent.lstm(2)), recurrent.gru(3)]),
        (
            _init(recurrent.bidirectional(recurrent.lstm(2))),
            _init(recurrent.gru(3), (4,))._replace(recurrent_bias=None),
        ),
        ["params[1].recurrent_bias"],
    ),
    "stacked_scan_layers": lambda: (
        recurrent.stacked([recurrent.rnn(recurrent.lstm(3)) for _ in range(3)], scan_layers=True),
        (_lstm_params(), _init(recurrent.lstm(3), (3,)), _init(recurrent.lstm(4), (3,))),
        ["params[2].input_kernel", "(3, 12)", "(3, 16)"],
    ),
    "stacked_cells": lambda: (
        recurrent.rnn(recurrent.stacked([recurrent.lstm(3), recurrent.lstm(3)])),
        (_lstm_params(), _init(recurrent.peephole_lstm(3), (3,))),
        ["params[1].peephole_input"],
    ),
    "learned_initial_carry_without_carry": lambda: (
        recurrent.rnn(recurrent.learned_initial_carry(recurrent.lstm(3))),
        _lstm_params(),
        ["LearnedCarryParams", "LSTMParams"],
    ),
}


def _case(name):
    layer, params, words = CASES[name]()
    xs = jnp.ones((3, 4, 4, F)) if layer.input_rank == 2 else XS
    return layer, params, xs, words


@pytest.mark.parametrize("name", list(CASES))
def test_params_of_another_cell_are_refused(name):
    layer, params, xs, words = _case(name)
    with clear_error(*words):
        layer.apply(params, xs)
    with clear_error(*words):
        layer.apply(params, xs, lengths=jnp.array([4, 2, 0]))


@pytest.mark.parametrize(
    "name", ["peephole_params_in_plain_lstm", "another_hidden_size", "plain_dict", "stacked_layers"]
)
def test_params_are_checked_at_trace_time(name):
    layer, params, xs, words = _case(name)
    traced = []

    def apply(params, xs):
        traced.append(True)
        return layer.apply(params, xs)

    with clear_error(*words):
        jax.jit(apply).trace(params, xs)
    assert traced, "the error must come from tracing"
    with clear_error(*words):  # the same through the user's jit
        jax.jit(apply)(params, xs)


@pytest.mark.parametrize(
    "cell, params, words",
    [
        (recurrent.lstm(3), lambda: _init(recurrent.peephole_lstm(3)), ["params.peephole_input"]),
        (recurrent.lstm(3), lambda: _init(recurrent.lstm(4)), ["params.input_kernel", "(2, 12)"]),
        (recurrent.gru(3, reset_after=False), lambda: _init(recurrent.gru(3)), ["params.recurrent_bias"]),
        (recurrent.lstm(3), lambda: _lstm_params()._replace(bias=None), ["params.bias"]),
        (recurrent.gru(3), lambda: _lstm_params(), ["GRUParams", "LSTMParams"]),
    ],
    ids=["peephole", "hidden_size", "reset_after", "bias_none", "kind"],
)
def test_cell_step_refuses_params_of_another_cell(cell, params, words):
    params = params()
    x = jnp.ones((3, F))
    carry = cell.initial_carry(cell.init(KEY, (F,)), x.shape)
    with clear_error(*words):
        cell.step(params, carry, x)
    with clear_error(*words):
        jax.jit(cell.step)(params, carry, x)


def test_wrong_input_size_is_still_reported_as_such():
    """Inputs of another feature size than the parameters were made for: the input's error."""
    for layer in (
        recurrent.rnn(recurrent.lstm(3)),
        recurrent.bidirectional(recurrent.lstm(3)),
        recurrent.stacked([recurrent.bidirectional(recurrent.lstm(2)), recurrent.gru(3)]),
        recurrent.stacked([recurrent.rnn(recurrent.lstm(3)) for _ in range(2)], scan_layers=True),
    ):
        params = layer.init(KEY, (F,))
        with clear_error("input feature shape", "(2,)"):
            layer.apply(params, jnp.ones((3, 4, 5)))


# --------------------------------------------------------------------------------------
# What must keep working


def test_params_in_other_dtypes_are_accepted():
    layer = recurrent.rnn(recurrent.lstm(3))
    params = _lstm_params()
    for dtype in (jnp.bfloat16, jnp.float16):
        cast = jax.tree.map(lambda a: a.astype(dtype), params)
        _, ys = layer.apply(cast, XS)
        assert np.all(np.isfinite(np.asarray(ys, np.float32)))
    cell = recurrent.lstm(3)
    cell.step(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), cell.initial_carry(params, (3, F)), XS[:, 0])


def test_legitimate_params_are_accepted():
    cases = [
        recurrent.rnn(recurrent.learned_initial_carry(recurrent.lstm(3))),
        recurrent.rnn(recurrent.learned_initial_carry(recurrent.stacked([recurrent.lstm(3), recurrent.gru(3)]))),
        recurrent.stacked([recurrent.rnn(recurrent.lstm(3)) for _ in range(3)], scan_layers=True),
        recurrent.stacked([recurrent.bidirectional(recurrent.gru(3)) for _ in range(3)], scan_layers=True),
        recurrent.bidirectional(recurrent.lstm(3), recurrent.gru(2)),
        recurrent.rnn(recurrent.lstm(3), implementation="vjp"),
    ]
    # The check runs as ``apply`` is traced: under jit and vmap, ``jax.eval_shape`` traces as they
    # do (abstract parameters, batched ones under vmap) without compiling what is accepted.
    for layer in cases:
        params = layer.init(KEY, (F,))
        layer.apply(params, XS, lengths=jnp.array([4, 2, 0]))  # eagerly, on concrete parameters
        jax.eval_shape(jax.jit(layer.apply), params, XS)
        # a population: vmapped over stacked parameters
        population = jax.eval_shape(jax.vmap(lambda k: layer.init(k, (F,))), jax.random.split(KEY, 2))  # noqa: B023
        jax.eval_shape(jax.vmap(lambda p: layer.apply(p, XS)), population)  # noqa: B023


def test_a_cell_written_outside_the_library_is_checked_too():
    """The check lives in the shared parts: a cell made with ``make_cell`` outside the library's
    modules gets it in ``step`` and through ``rnn``."""

    def init(key, input_shape):
        return {"w": jax.random.normal(key, (input_shape[0], 2))}

    def probe(params, carry, xp, noise=None):
        h = jnp.tanh(xp + carry)
        return h, h, {}

    cell = make_cell(
        init=init,
        initial_carry=lambda params, x_shape: jnp.zeros((*x_shape[:-1], 2)),
        project=lambda params, x: x @ params["w"],
        probe=probe,
        output_shape=lambda input_shape: (2,),
        input_rank=1,
        name="minimal",
    )
    params = cell.init(KEY, (F,))
    recurrent.rnn(cell).apply(params, XS)
    with clear_error("params['w']", "(2, 2)", "(2, 3)"):
        cell.step({"w": jnp.ones((F, 3))}, jnp.zeros((3, 2)), XS[:, 0])
    with clear_error("params", "dict"):
        recurrent.rnn(cell).apply({"w": jnp.ones((F, 2)), "v": jnp.ones(())}, XS)
