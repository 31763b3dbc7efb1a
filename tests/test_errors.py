"""Bad input raises ``ValueError`` at trace time, with expected / got / fix lines; nothing is
silently broadcast or truncated."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests.registry import REGISTRY


@contextlib.contextmanager
def clear_error(*words: str):
    """Expects a ``ValueError`` whose message has the library's expected/got/fix lines and
    mentions each of ``words``."""
    with pytest.raises(ValueError) as info:
        yield
    message = str(info.value)
    for part in ("expected:", "got:", "fix:"):
        assert part in message, f"message lacks {part!r}:\n{message}"
    for word in words:
        assert word in message, f"message lacks {word!r}:\n{message}"


KEY = jax.random.key(0)


@functools.cache
def _params(name):
    layer, shape = LAYERS[name]
    return layer.init(KEY, shape)


LAYERS = {
    "lstm": (recurrent.rnn(recurrent.lstm(3)), (2,)),
    "gru": (recurrent.rnn(recurrent.gru(3)), (2,)),
    "conv": (recurrent.rnn(recurrent.conv_lstm(2, (3, 3))), (4, 4, 1)),
    "conv_peephole": (recurrent.rnn(recurrent.conv_lstm(2, (3, 3), peephole=True)), (4, 4, 1)),
    "bidirectional": (recurrent.bidirectional(recurrent.lstm(3)), (2,)),
    "stacked_cells": (recurrent.rnn(recurrent.stacked([recurrent.lstm(3), recurrent.gru(3)])), (2,)),
    "stacked_layers": (recurrent.stacked([recurrent.bidirectional(recurrent.lstm(2)), recurrent.gru(3)]), (2,)),
}
DENSE = ["lstm", "gru", "bidirectional", "stacked_cells", "stacked_layers"]


def layer_and_params(name):
    return LAYERS[name][0], _params(name)


def xs_for(name, batch=(3,), T=4, features=None):
    shape = LAYERS[name][1] if features is None else features
    return jnp.ones((*batch, T, *shape))


# --------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize("name", DENSE)
def test_wrong_feature_size(name):
    layer, params = layer_and_params(name)
    with clear_error("(2,)", "5"):
        layer.apply(params, xs_for(name, features=(5,)))
    with clear_error("(2,)"):  # also at trace time under jit
        jax.jit(layer.apply)(params, xs_for(name, features=(5,)))


def test_wrong_feature_size_to_a_cell_step():
    for factory in (recurrent.lstm, recurrent.peephole_lstm, recurrent.cifg_lstm, recurrent.gru):
        cell = factory(3)
        params = cell.init(KEY, (2,))
        carry = cell.initial_carry(params, (4, 2))
        with clear_error("(2,)"):
            cell.step(params, carry, jnp.ones((4, 5)))
        with clear_error("too few axes"):
            cell.step(params, carry, jnp.ones(()))


def test_wrong_channels_and_spatial_size_for_conv_lstm():
    layer, params = layer_and_params("conv")
    with clear_error():
        layer.apply(params, jnp.ones((2, 3, 4, 4, 3)))  # 3 channels, initialised with 1
    layer, params = layer_and_params("conv_peephole")
    with clear_error("(4, 4, 1)"):  # peepholes fix the spatial size
        layer.apply(params, jnp.ones((2, 3, 5, 5, 1)))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("lstm", (2,)),
        ("lstm", ()),
        ("gru", (4,)),
        ("bidirectional", (4,)),
        ("stacked_layers", (2,)),
        ("conv", (3, 4, 4)),
    ],
)
def test_too_few_axes_for_a_sequence(name, shape):
    layer, params = layer_and_params(name)
    with clear_error("too few axes"):
        layer.apply(params, jnp.ones(shape))


def test_xs_not_an_array():
    layer, params = layer_and_params("lstm")
    with clear_error("array"):
        layer.apply(params, [[1.0, 2.0]] * 4)


# --------------------------------------------------------------------------------------
# Carries


@pytest.mark.parametrize("name", ["lstm", "gru", "conv", "stacked_cells"])
def test_carry_of_wrong_structure(name):
    layer, params = layer_and_params(name)
    xs = xs_for(name)
    carry, _ = layer.apply(params, xs)
    wrong = (carry, carry) if name != "stacked_cells" else carry[:1]
    with clear_error("structure"):
        layer.apply(params, xs, carry=wrong)


def test_carry_of_the_wrong_cell():
    lstm, lstm_params = layer_and_params("lstm")
    gru, gru_params = layer_and_params("gru")
    xs = xs_for("lstm")
    gru_carry, _ = gru.apply(gru_params, xs)
    with clear_error("structure"):
        lstm.apply(lstm_params, xs, carry=gru_carry)


def test_carry_of_wrong_structure_for_combinators():
    layer, params = layer_and_params("bidirectional")
    xs = xs_for("bidirectional")
    carry, _ = layer.apply(params, xs)
    with clear_error("(forward, backward)"):
        layer.apply(params, xs, carry=carry.forward.h)
    with clear_error("structure"):
        layer.apply(params, xs, carry=carry.forward)  # an LSTMState is a pair, but not of carries
    layer, params = layer_and_params("stacked_layers")
    carry, _ = layer.apply(params, xs)
    with clear_error("one entry per layer"):
        layer.apply(params, xs, carry=carry[:1])


def test_carry_of_wrong_shape_is_not_broadcast():
    layer, params = layer_and_params("lstm")
    xs = xs_for("lstm", batch=(3,))
    for batch in [(1,), (2,), (), (3, 1)]:
        carry = layer.initial_carry(params, (*batch, 2))
        with clear_error("shape", str(tuple(xs.shape[:1]) + (3,))):
            layer.apply(params, xs, carry=carry)
    carry = recurrent.LSTMState(h=jnp.zeros((3, 4)), c=jnp.zeros((3, 4)))  # wrong hidden size
    with clear_error("shape"):
        layer.apply(params, xs, carry=carry)


def test_carry_of_wrong_dtype():
    layer, params = layer_and_params("lstm")
    xs = xs_for("lstm")
    carry = layer.initial_carry(params, (3, 2))
    for wrong in (
        carry._replace(c=carry.c.astype(jnp.bfloat16)),  # cell state must stay float32
        carry._replace(h=carry.h.astype(jnp.float16)),
        carry._replace(h=carry.h.astype(jnp.int32)),
    ):
        with clear_error("dtype", "float32"):
            layer.apply(params, xs, carry=wrong)
    gru, gru_params = layer_and_params("gru")
    with clear_error("dtype"):
        gru.apply(gru_params, xs, carry=jnp.zeros((3, 3), jnp.bfloat16))


# --------------------------------------------------------------------------------------
# Lengths


@pytest.mark.parametrize("name", DENSE + ["conv"])
def test_lengths_of_wrong_shape_are_not_broadcast(name):
    layer, params = layer_and_params(name)
    xs = xs_for(name, batch=(3,))
    for lengths in (np.array([4]), np.array(4), np.array([[4], [4], [4]]), np.array([4, 4]), np.ones((3, 3), int)):
        with clear_error("shape", "(3,)"):
            layer.apply(params, xs, lengths=lengths)
    with clear_error("shape"):  # unbatched input takes a scalar length
        layer.apply(params, xs[0], lengths=np.array([4]))
    with clear_error("shape"):  # checked at trace time too
        jax.jit(lambda p, x, n: layer.apply(p, x, lengths=n))(params, xs, jnp.array([4]))


@pytest.mark.parametrize("name", ["lstm", "bidirectional", "stacked_layers"])
def test_lengths_of_wrong_dtype(name):
    layer, params = layer_and_params(name)
    xs = xs_for(name, batch=(3,))
    for lengths in (np.array([4.0, 2.0, 1.0]), jnp.array([4.0, 2.0, 1.0]), np.array([True, True, False])):
        with clear_error("integer"):
            layer.apply(params, xs, lengths=lengths)


@pytest.mark.parametrize("name", ["lstm", "bidirectional", "stacked_layers", "conv"])
def test_lengths_out_of_range(name):
    layer, params = layer_and_params(name)
    xs = xs_for(name, batch=(3,), T=4)
    with clear_error("0 <= lengths <= 4", "-1"):
        layer.apply(params, xs, lengths=np.array([4, -1, 2]))
    with clear_error("0 <= lengths <= 4", "5"):
        layer.apply(params, xs, lengths=np.array([4, 5, 2]))
    with clear_error("0 <= lengths <= 4"):
        layer.reversed().apply(params, xs, lengths=np.array([4, 5, 2]))


def test_lengths_shape_with_time_major():
    layer, params = layer_and_params("lstm")
    xs = jnp.ones((4, 3, 2))  # (T, B, F)
    layer.apply(params, xs, lengths=np.array([4, 2, 0]), time_major=True)  # fine
    with clear_error("(3,)"):
        layer.apply(params, xs, lengths=np.array([4, 2, 0, 1]), time_major=True)


# --------------------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize("merge", ["cat", "Concat", "max", ""])
def test_unknown_merge_name(merge):
    with clear_error(repr(merge), "concat"):
        recurrent.bidirectional(recurrent.lstm(3), merge=merge)


def test_merge_neither_name_nor_function():
    with clear_error("merge"):
        recurrent.bidirectional(recurrent.lstm(3), merge=3)


NOT_CELLS = [
    recurrent.lstm,  # the factory itself, not a cell
    "lstm",
    None,
    3,
    lambda params, carry, x: (carry, x),
]


@pytest.mark.parametrize("item", NOT_CELLS, ids=lambda x: type(x).__name__)
def test_not_a_cell(item):
    with clear_error("cell"):
        recurrent.rnn(item)
    with clear_error("cell"):
        recurrent.stacked([recurrent.lstm(3), item])
    with clear_error("cell"):
        recurrent.bidirectional(item)
    if item is not None:  # None means "same as forward"
        with clear_error("cell"):
            recurrent.bidirectional(recurrent.lstm(3), item)


def test_rnn_of_a_layer():
    with clear_error("cell", "Layer"):
        recurrent.rnn(recurrent.rnn(recurrent.lstm(3)))


@pytest.mark.parametrize("items", [[], ()])
def test_stacked_of_nothing(items):
    with clear_error("non-empty"):
        recurrent.stacked(items)


@pytest.mark.parametrize(
    "items, input_shape",
    [
        ([recurrent.lstm(4), recurrent.conv_lstm(2, (3,))], (3,)),  # conv after dense
        ([recurrent.conv_lstm(2, (3, 3)), recurrent.lstm(4)], (4, 4, 1)),  # dense after conv
        ([recurrent.conv_lstm(2, (3,)), recurrent.conv_lstm(2, (3, 3))], (4, 1)),  # 1D then 2D
        ([recurrent.bidirectional(recurrent.lstm(2)), recurrent.conv_lstm(2, (3,))], (3,)),  # as layers
    ],
)
def test_stacking_incompatible_ranks(items, input_shape):
    with clear_error("rank"):
        recurrent.stacked(items).init(KEY, input_shape)


def test_bidirectional_of_different_ranks():
    with clear_error("rank"):
        recurrent.bidirectional(recurrent.lstm(3), recurrent.conv_lstm(2, (3,)))


@pytest.mark.parametrize(
    "items",
    [
        [recurrent.lstm(4), recurrent.lstm(5)],
        [recurrent.lstm(4), recurrent.gru(4), recurrent.gru(3)],
        [recurrent.bidirectional(recurrent.lstm(2)), recurrent.lstm(2)],  # concat gives 4, then 2
        [recurrent.conv_lstm(2, (3,)), recurrent.conv_lstm(3, (3,))],
    ],
)
def test_residual_with_unequal_widths(items):
    input_shape = (4, 1) if items[0].input_rank == 2 else (3,)
    recurrent.stacked(items).init(KEY, input_shape)  # fine without residual connections
    with clear_error("residual", "equal width"):
        recurrent.stacked(items, residual=True).init(KEY, input_shape)


FACTORIES = {
    "lstm": recurrent.lstm,
    "peephole_lstm": recurrent.peephole_lstm,
    "cifg_lstm": recurrent.cifg_lstm,
    "gru": recurrent.gru,
    "gru_reset_before": functools.partial(recurrent.gru, reset_after=False),
    "conv_lstm": lambda size: recurrent.conv_lstm(size, (3, 3)),
}


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
@pytest.mark.parametrize("size", [0, -1, 2.5, 4.0, True, "4", None, (4,)], ids=repr)
def test_bad_hidden_size(factory, size):
    with clear_error("positive int", repr(size)):
        factory(size)


@pytest.mark.parametrize(
    "kernel_size",
    [(3, 3, 3, 3), (), (0, 3), (3, -1), (2.5,), (3.0, 3), 3, None, "33"],
    ids=repr,
)
def test_conv_lstm_bad_kernel_size(kernel_size):
    with clear_error("kernel_size"):
        recurrent.conv_lstm(4, kernel_size)


@pytest.mark.parametrize(
    "cell, input_shape",
    [
        (recurrent.lstm(3), (3, 4)),
        (recurrent.lstm(3), ()),
        (recurrent.peephole_lstm(3), (2, 3, 4)),
        (recurrent.cifg_lstm(3), (1, 2)),
        (recurrent.gru(3), (3, 4)),
        (recurrent.gru(3), ()),
        (recurrent.conv_lstm(2, (3, 3)), (4, 4)),
        (recurrent.conv_lstm(2, (3, 3)), (4, 4, 4, 1)),
        (recurrent.conv_lstm(2, (3,)), (4,)),
        (recurrent.conv_lstm(2, (3, 3, 3)), (4, 4, 1)),
    ],
    ids=lambda v: v.name if isinstance(v, recurrent.Cell) else repr(v),
)
def test_input_shape_of_wrong_rank_to_init(cell, input_shape):
    with clear_error(repr(input_shape)):
        cell.init(KEY, input_shape)
    with clear_error(repr(input_shape)):  # the same through the layer
        recurrent.rnn(cell).init(KEY, input_shape)


@pytest.mark.parametrize("input_shape", [(-3,), None, (2.5,), ("3",)], ids=repr)
@pytest.mark.parametrize("make", [recurrent.lstm, recurrent.gru, lambda h: recurrent.stacked([recurrent.lstm(h)] * 2)])
def test_input_shape_not_a_shape(make, input_shape):
    with clear_error("input_shape"):
        make(3).init(KEY, input_shape)


def test_initial_carry_of_wrong_rank():
    cell = recurrent.lstm(3)
    params = cell.init(KEY, (2,))
    with clear_error("x_shape"):
        cell.initial_carry(params, ())
    cell = recurrent.conv_lstm(2, (3, 3))
    params = cell.init(KEY, (4, 4, 1))
    with clear_error("x_shape"):
        cell.initial_carry(params, (4, 1))


def test_wrong_feature_size_error_shows_the_callers_shape():
    layer = recurrent.rnn(recurrent.lstm(3))
    params = layer.init(jax.random.key(0), (4,))
    with pytest.raises(ValueError, match=r"got:\s+shape \(2, 7, 5\)"):
        layer.apply(params, jnp.ones((2, 7, 5)))
    with pytest.raises(ValueError, match=r"got:\s+shape \(7, 2, 5\)"):
        layer.apply(params, jnp.ones((7, 2, 5)), time_major=True)


def test_stacked_given_a_single_cell_says_so():
    with pytest.raises(ValueError, match="got a single Cell") as info:
        recurrent.stacked(recurrent.lstm(3))
    assert "pass a list" in str(info.value)
    with pytest.raises(ValueError, match="got a single Layer"):
        recurrent.stacked(recurrent.rnn(recurrent.gru(3)))


def _zero_size_shapes(input_shape):
    """``input_shape`` with its last (features or channels) axis empty, and for convolutional
    inputs also with an empty spatial axis."""
    shapes = [(*input_shape[:-1], 0)]
    if len(input_shape) > 1:
        shapes.append((0, *input_shape[1:]))
    return shapes


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.id)
def test_zero_size_input_shape_to_init(entry):
    for shape in _zero_size_shapes(entry.input_shape):
        with clear_error("positive", repr(shape)):
            entry.layer().init(KEY, shape)
        if entry.is_cell:
            with clear_error("positive", repr(shape)):
                entry.make().init(KEY, shape)


@pytest.mark.parametrize(
    "make",
    [
        lambda: recurrent.rnn(recurrent.lstm(3, kernel_init=jax.nn.initializers.normal())),
        lambda: recurrent.learned_initial_carry(recurrent.gru(3)),
        lambda: recurrent.bidirectional(recurrent.lstm(3), recurrent.rnn(recurrent.gru(2))),
        lambda: recurrent.stacked([recurrent.lstm(3), recurrent.lstm(3)]),
        lambda: recurrent.stacked([recurrent.bidirectional(recurrent.lstm(3)), recurrent.lstm(3)], scan_layers=True),
    ],
    ids=["rnn", "learned_initial_carry", "bidirectional", "stacked_cells", "stacked_layers"],
)
def test_zero_size_input_shape_to_combinators(make):
    with clear_error("positive", "(0,)"):
        make().init(KEY, (0,))
    with clear_error("positive"):  # also when the shape arrives under jax.eval_shape or jit
        jax.eval_shape(lambda key: make().init(key, (0,)), KEY)
