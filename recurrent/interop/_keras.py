"""Keras 3 converters: ``LSTM``, ``GRU`` (both ``reset_after``), ``ConvLSTM1D/2D/3D``
(``padding="same"``), ``Bidirectional`` (every ``merge_mode``) and stacks of them
(``keras.Sequential`` or a list) <-> recurrent.

Mapping (from Keras' source):

- LSTM and ConvLSTM: ``kernel``, ``recurrent_kernel``, ``bias`` with gate order i, f, c, o, the
  same as ours; ConvLSTM kernels are ``(*kernel_size, C, 4H)``, channels last, as ours.
- GRU: gate order z, r, h (ours r, z, n). ``reset_after=True``: ``bias (2, 3H)`` holds the input
  and the recurrent bias; ours is ``bias = b_in + [b_rec_r, b_rec_z, 0]`` and
  ``recurrent_bias = b_rec_h``. ``reset_after=False``: ``bias (3H,)``.
- ``use_bias=False`` -> zero biases. ``unit_forget_bias`` only affects initialisation.
- ``Bidirectional``: ``merge_mode`` concat, sum, ave (our ``"mean"``), mul, or None (our outputs
  then stack the two directions on a new axis ``-2``: ``ys[..., 0, :]`` forward,
  ``ys[..., 1, :]`` backward, where Keras returns a list).

Only the weights and the function are converted: Keras' dropout rates, ``stateful`` and the
``return_*`` flags are not (our layers always return the sequence and the final carry).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._combinators import BidirectionalParams, bidirectional, stacked
from recurrent._conv import ConvLSTMParams, conv_lstm
from recurrent._core import Layer
from recurrent._gru import GRUParams, gru
from recurrent._lstm import LSTMParams, lstm
from recurrent._rnn import rnn
from recurrent.interop._common import array, check_plain_gru, check_plain_lstm, require

_WHERE = "recurrent.interop"
_MERGES = {"concat": "concat", "sum": "sum", "ave": "mean", "mul": "mul"}


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    return require("keras")


def _pair(y_forward, y_backward):
    """Keras' ``merge_mode=None``: both directions, stacked on axis -2."""
    return jnp.stack([y_forward, y_backward], axis=-2)


def _zrh_to_rzn(a):
    z, r, h = jnp.split(a, 3, axis=-1)
    return jnp.concatenate([r, z, h], axis=-1)


def _rzn_to_zrh(a):
    r, z, n = jnp.split(a, 3, axis=-1)
    return jnp.concatenate([z, r, n], axis=-1)


def _check(layer, where, keras, backward=False):
    name = type(layer).__name__
    cell = layer.cell
    for attr, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        fn = getattr(cell, attr)
        got = getattr(fn, "__name__", repr(fn))
        if got != want:
            raise _core.error(
                f"{where}: {name}({attr}={got!r}) has no counterpart.",
                expected=f"{attr}={want!r} (Keras' default)",
                got=f"{attr}={got!r}",
                fix=f"convert layers with {attr}={want!r}.",
            )
    if backward and not layer.go_backwards:
        raise _core.error(
            f"{where}: the backward layer of a Bidirectional must run backwards.",
            expected="backward_layer.go_backwards=True",
            got="go_backwards=False",
            fix="let keras.layers.Bidirectional make its backward layer.",
        )
    if layer.go_backwards and not backward:
        raise _core.error(
            f"{where}: {name}(go_backwards=True) returns its outputs in reversed order.",
            expected="go_backwards=False (a backward direction belongs inside keras.layers.Bidirectional)",
            got="go_backwards=True",
            fix="wrap the layer in keras.layers.Bidirectional, or use go_backwards=False.",
        )


def _one(layer, where, keras, backward=False):
    """(cell, params) of one Keras recurrent layer (the backward one of a Bidirectional, which
    runs with go_backwards=True, if ``backward``)."""
    L = keras.layers
    if type(layer) not in (L.LSTM, L.GRU, L.ConvLSTM1D, L.ConvLSTM2D, L.ConvLSTM3D):
        raise _unsupported(layer, where)
    if not layer.built:
        raise _core.error(
            f"{where}: the Keras layer {layer.name!r} has no weights yet.",
            expected="a built layer (called once, or layer.build(input_shape))",
            got="an unbuilt layer",
            fix="call the layer on an input (or build the model) before converting.",
        )
    kind = type(layer)
    _check(layer, where, keras, backward)
    cell = layer.cell
    kernel, recurrent_kernel = array(cell.kernel.numpy()), array(cell.recurrent_kernel.numpy())
    bias = None if cell.bias is None else array(cell.bias.numpy())
    H = cell.units if hasattr(cell, "units") else cell.filters
    if kind is L.LSTM:
        bias = jnp.zeros((4 * H,), kernel.dtype) if bias is None else bias
        return lstm(H), LSTMParams(kernel, recurrent_kernel, bias)
    if kind is L.GRU:
        reset_after = bool(cell.reset_after)
        if bias is None:
            bias = jnp.zeros((2, 3 * H) if reset_after else (3 * H,), kernel.dtype)
        ik, rk = _zrh_to_rzn(kernel), _zrh_to_rzn(recurrent_kernel)
        if not reset_after:
            return gru(H, reset_after=False), GRUParams(ik, rk, _zrh_to_rzn(bias))
        b_in, b_rec = _zrh_to_rzn(bias[0]), _zrh_to_rzn(bias[1])
        b = b_in + jnp.concatenate([b_rec[: 2 * H], jnp.zeros((H,), b_rec.dtype)])
        return gru(H), GRUParams(ik, rk, b, b_rec[2 * H :])
    if kind in (L.ConvLSTM1D, L.ConvLSTM2D, L.ConvLSTM3D):
        problems = []
        if cell.padding != "same":
            problems.append(f"padding={cell.padding!r}")
        if any(s != 1 for s in cell.strides):
            problems.append(f"strides={cell.strides}")
        if any(d != 1 for d in cell.dilation_rate):
            problems.append(f"dilation_rate={cell.dilation_rate}")
        if cell.data_format != "channels_last":
            problems.append(f"data_format={cell.data_format!r}")
        if problems:
            raise _core.error(
                f"{where}: {kind.__name__}({', '.join(problems)}) has no counterpart.",
                expected="padding='same', strides=1, dilation_rate=1, data_format='channels_last'",
                got=", ".join(problems),
                fix="use padding='same' with unit strides and dilation, channels last.",
            )
        bias = jnp.zeros((4 * H,), kernel.dtype) if bias is None else bias
        return conv_lstm(H, tuple(cell.kernel_size)), ConvLSTMParams(kernel, recurrent_kernel, bias)
    raise _unsupported(layer, where)


def _unsupported(layer, where):
    return _core.error(
        f"{where}: cannot convert the Keras layer {type(layer).__name__}.",
        expected="keras.layers LSTM, GRU, ConvLSTM1D/2D/3D, Bidirectional, or a Sequential / list of them",
        got=type(layer).__name__,
        fix="convert the recurrent layers only (e.g. model.layers[i]), or rebuild the rest in JAX.",
    )


def _layer(layer, where, keras):
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode is not None and layer.merge_mode not in _MERGES:
            raise _core.error(
                f"{where}: unknown merge_mode {layer.merge_mode!r}.",
                expected=f"one of {sorted(_MERGES)} or None",
                got=repr(layer.merge_mode),
                fix="use a Keras merge_mode.",
            )
        forward = layer.forward_layer
        backward = layer.backward_layer
        fc, fp = _one(forward, where, keras)
        bc, bp = _one(backward, where, keras, backward=True)
        merge = _pair if layer.merge_mode is None else _MERGES[layer.merge_mode]
        return bidirectional(fc, bc, merge=merge), BidirectionalParams(fp, bp)
    cell, params = _one(layer, where, keras)
    return rnn(cell), params


def from_keras(layer: Any) -> tuple[Layer, Any]:
    """A built Keras 3 recurrent layer, ``Bidirectional`` or stack as ``(layer, params)``.

    A ``keras.Sequential`` (or a list) of them becomes :func:`recurrent.stacked`.

    >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")
    'jax'
    >>> import keras, numpy as np
    >>> from recurrent.interop import from_keras
    >>> model = keras.Sequential([keras.Input((None, 3)), keras.layers.Bidirectional(
    ...     keras.layers.GRU(4, return_sequences=True), merge_mode="sum"), keras.layers.LSTM(5, return_sequences=True)])
    >>> layer, params = from_keras(model)
    >>> xs = np.random.default_rng(0).standard_normal((2, 6, 3)).astype("float32")
    >>> bool(np.allclose(layer.apply(params, xs)[1], model(xs), atol=1e-5))
    True
    """
    where = f"{_WHERE}.from_keras"
    keras = _keras()
    if isinstance(layer, keras.Sequential):
        items = list(layer.layers)
    elif isinstance(layer, (list, tuple)):
        items = list(layer)
    else:
        return _layer(layer, where, keras)
    converted = [_layer(item, where, keras) for item in items]
    if not converted:
        raise _unsupported(layer, where)
    if len(converted) == 1:
        return converted[0]
    return stacked([c for c, _ in converted]), tuple(p for _, p in converted)


def _keras_one(params, where, keras, return_sequences, go_backwards=False):
    """An unbuilt Keras layer for one cell's parameters, and its weights."""
    kw = dict(return_sequences=return_sequences, return_state=False, go_backwards=go_backwards)
    if isinstance(params, LSTMParams):
        check_plain_lstm(params, where=where, peer="Keras", allow_projection=False)
        H = params.recurrent_kernel.shape[0]
        return keras.layers.LSTM(H, **kw), [params.input_kernel, params.recurrent_kernel, params.bias]
    if isinstance(params, GRUParams):
        check_plain_gru(params, where=where, peer="Keras", reset_after=None)
        H = params.recurrent_kernel.shape[0]
        ik, rk = _rzn_to_zrh(params.input_kernel), _rzn_to_zrh(params.recurrent_kernel)
        if params.recurrent_bias is None:
            return keras.layers.GRU(H, reset_after=False, **kw), [ik, rk, _rzn_to_zrh(params.bias)]
        b_rec = jnp.concatenate([jnp.zeros((2 * H,), params.bias.dtype), params.recurrent_bias])
        bias = jnp.stack([_rzn_to_zrh(params.bias), _rzn_to_zrh(b_rec)])
        return keras.layers.GRU(H, reset_after=True, **kw), [ik, rk, bias]
    if isinstance(params, ConvLSTMParams):
        extras = [
            f
            for f in ("peephole_input", "peephole_forget", "peephole_output", "layer_norm")
            if getattr(params, f) is not None
        ]
        if extras:
            raise _core.error(
                f"{where}: Keras' ConvLSTM has no {', '.join(extras)}.",
                expected="recurrent.conv_lstm(H, kernel_size) without peepholes or layer norm",
                got="parameters with " + ", ".join(extras),
                fix="convert a plain conv_lstm.",
            )
        ks = tuple(params.input_kernel.shape[:-2])
        cls = {1: keras.layers.ConvLSTM1D, 2: keras.layers.ConvLSTM2D, 3: keras.layers.ConvLSTM3D}[len(ks)]
        H = params.recurrent_kernel.shape[-2]
        return cls(H, ks, padding="same", **kw), [params.input_kernel, params.recurrent_kernel, params.bias]
    raise _core.error(
        f"{where}: these parameters have no Keras counterpart.",
        expected="LSTMParams, GRUParams, ConvLSTMParams, BidirectionalParams or a tuple of them (a stack)",
        got=type(params).__name__,
        fix="convert a plain lstm, gru or conv_lstm layer, bidirectional or stacked.",
    )


def _input_shape(params):
    p = params.forward if isinstance(params, BidirectionalParams) else params
    return (
        tuple(p.input_kernel.shape[:-2]) + (p.input_kernel.shape[-2],)
        if isinstance(p, ConvLSTMParams)
        else (p.input_kernel.shape[0],)
    )


def to_keras(layer: Layer, params: Any, *, merge_mode: str | None = None, return_sequences: bool = True) -> Any:
    """A built Keras 3 layer (or ``keras.Sequential`` for a stack) with the weights of
    ``(layer, params)``: the inverse of :func:`from_keras`.

    ``merge_mode`` of a bidirectional layer is read from the shapes when it is ``"concat"`` or
    None; for ``"sum"``, ``"ave"`` or ``"mul"`` (which give the same shape) pass it (it then
    applies to every such bidirectional layer of a stack; our name ``"mean"`` is accepted too).
    A stack's layers all return sequences; ``return_sequences`` applies to its last layer.

    >>> import os; os.environ.setdefault("KERAS_BACKEND", "jax")
    'jax'
    >>> import jax, recurrent
    >>> from recurrent.interop import to_keras
    >>> layer = recurrent.bidirectional(recurrent.gru(4))
    >>> keras_layer = to_keras(layer, layer.init(jax.random.key(0), (3,)))
    >>> keras_layer.merge_mode, keras_layer.forward_layer.units
    ('concat', 4)
    """
    where = f"{_WHERE}.to_keras"
    keras = _keras()
    is_stack = isinstance(params, tuple) and not hasattr(params, "_fields")
    items = params if is_stack else (params,)
    built, shape = [], _input_shape(items[0])
    for i, p in enumerate(items):
        last = i == len(items) - 1
        rs = return_sequences or not last
        if isinstance(p, BidirectionalParams):
            R = p.forward.recurrent_kernel.shape[-2]
            # The merge is read from the shape that follows: the next layer's input, or the
            # whole layer's output for the last one; sum, ave and mul look alike: merge_mode.
            if last:
                out = tuple(layer.output_shape(_input_shape(items[0])))
            else:
                out = (*shape[:-1], _input_shape(items[i + 1])[-1])
            given = {"mean": "ave"}.get(merge_mode, merge_mode)  # our name for Keras' "ave"
            mode = {(*shape[:-1], 2 * R): "concat", (*shape[:-1], 2, R): None}.get(out, given if given else "?")
            if mode not in ("concat", None, "sum", "ave", "mul"):
                raise _core.error(
                    f"{where}: the merge of bidirectional layer {i} cannot be read from its shape.",
                    expected='merge_mode="sum", "ave" or "mul" passed to to_keras',
                    got=f"output shape {out}, merge_mode={merge_mode!r}",
                    fix='pass merge_mode="sum" (or "ave", "mul") to to_keras.',
                )
            fwd, wf = _keras_one(p.forward, where, keras, rs)
            bwd, wb = _keras_one(p.backward, where, keras, rs, go_backwards=True)
            k_layer = keras.layers.Bidirectional(fwd, backward_layer=bwd, merge_mode=mode)
            k_layer.build((None, None, *shape))
            k_layer.forward_layer.set_weights([np.asarray(w) for w in wf])
            k_layer.backward_layer.set_weights([np.asarray(w) for w in wb])
            R = p.forward.recurrent_kernel.shape[-2]
            shape = (*shape[:-1], 2 * R) if mode == "concat" else (*shape[:-1], R)
        else:
            k_layer, weights = _keras_one(p, where, keras, rs)
            k_layer.build((None, None, *shape))
            k_layer.set_weights([np.asarray(w) for w in weights])
            shape = (*shape[:-1], p.recurrent_kernel.shape[-2])
        built.append(k_layer)
    if not is_stack:
        return built[0]
    return keras.Sequential([keras.Input((None, *_input_shape(items[0]))), *built])
