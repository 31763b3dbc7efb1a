"""Flax converters: linen and NNX ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``, linen
``ConvLSTMCell``, ``nn.RNN`` and ``nn.Bidirectional`` <-> recurrent.

Mapping (from Flax's source):

- ``LSTMCell`` / ``OptimizedLSTMCell`` (linen): denses ``ii, if, ig, io`` (no bias) and
  ``hi, hf, hg, ho`` (with bias), gate order i, f, g, o as ours. NNX ``LSTMCell`` names the
  forget dense ``if_``; NNX ``OptimizedLSTMCell`` has fused ``dense_i`` and ``dense_h``.
- ``GRUCell``: ``ir, iz, in`` with bias, ``hr, hz`` without, ``hn`` with bias inside the reset
  product (our ``recurrent_bias``); NNX fuses them in ``dense_i`` / ``dense_h`` and has no
  ``b_hn`` (zero).
- ``ConvLSTMCell``: convolutions ``ih`` and ``hh`` with gate order i, g, f, o and a fixed
  ``sigmoid(f + 1)``; ours is i, f, g, o with the 1 folded into the bias.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._combinators import BidirectionalParams, bidirectional
from recurrent._conv import ConvLSTMParams, conv_lstm
from recurrent._core import Cell, Layer
from recurrent._gru import GRUParams, gru
from recurrent._lstm import LSTMParams, lstm
from recurrent._rnn import rnn
from recurrent.interop._common import check_plain_gru, check_plain_lstm, require

_WHERE = "recurrent.interop"
_LSTM = "ifgo"
_GRU = "rzn"


def _check_activations(module, where):
    for attr, want in (("gate_fn", jax.nn.sigmoid), ("activation_fn", jnp.tanh)):
        fn = getattr(module, attr, want)
        if fn is not want and getattr(fn, "__name__", "") != want.__name__:
            raise _core.error(
                f"{where}: {type(module).__name__}.{attr} has no counterpart.",
                expected=f"{attr}={want.__name__} (Flax's default)",
                got=f"{attr}={getattr(fn, '__name__', fn)!r}",
                fix="convert cells with the default activations.",
            )


def _conv_offset(H, dtype):
    return jnp.zeros((4 * H,), dtype).at[H : 2 * H].set(1)


def _ifgo_from_igfo(a):
    i, g, f, o = jnp.split(a, 4, axis=-1)
    return jnp.concatenate([i, f, g, o], axis=-1)


def _igfo_from_ifgo(a):
    i, f, g, o = jnp.split(a, 4, axis=-1)
    return jnp.concatenate([i, g, f, o], axis=-1)


def _linen_cell(cell, p, where):
    nn = require("flax.linen")
    _check_activations(cell, where)
    if type(cell) in (nn.LSTMCell, nn.OptimizedLSTMCell):
        cat = lambda prefix, leaf: jnp.concatenate([jnp.asarray(p[prefix + g][leaf]) for g in _LSTM], -1)  # noqa: E731
        return lstm(cell.features), LSTMParams(cat("i", "kernel"), cat("h", "kernel"), cat("h", "bias"))
    if type(cell) is nn.GRUCell:
        cat = lambda prefix, leaf: jnp.concatenate([jnp.asarray(p[prefix + g][leaf]) for g in _GRU], -1)  # noqa: E731
        return gru(cell.features), GRUParams(
            cat("i", "kernel"), cat("h", "kernel"), cat("i", "bias"), jnp.asarray(p["hn"]["bias"])
        )
    if type(cell) is nn.ConvLSTMCell:
        n = len(cell.kernel_size)
        if cell.padding not in ("SAME", "same") or any(s != 1 for s in (cell.strides or (1,) * n)):
            raise _core.error(
                f"{where}: ConvLSTMCell(padding={cell.padding!r}, strides={cell.strides!r}) has no counterpart.",
                expected="padding='SAME' and unit strides (the state keeps the input's spatial size)",
                got=f"padding={cell.padding!r}, strides={cell.strides!r}",
                fix="use padding='SAME' and strides=None.",
            )
        H = cell.features
        ih, hh = p["ih"], p["hh"]
        dtype = jnp.asarray(ih["kernel"]).dtype
        zero = jnp.zeros((4 * H,), dtype)
        # (hh + offset) first: to_flax stores -offset there, so the round trip is exact.
        offset = _igfo_from_ifgo(_conv_offset(H, dtype))  # the fixed +1 on f, in Flax's i, g, f, o order
        bias = _ifgo_from_igfo(jnp.asarray(ih.get("bias", zero)) + (jnp.asarray(hh.get("bias", zero)) + offset))
        return conv_lstm(H, tuple(cell.kernel_size)), ConvLSTMParams(
            _ifgo_from_igfo(jnp.asarray(ih["kernel"])), _ifgo_from_igfo(jnp.asarray(hh["kernel"])), bias
        )
    raise _unsupported(cell, where)


def _unsupported(module, where):
    return _core.error(
        f"{where}: cannot convert {type(module).__module__}.{type(module).__name__}.",
        expected="linen LSTMCell, OptimizedLSTMCell, GRUCell, ConvLSTMCell, RNN or Bidirectional; "
        "NNX LSTMCell, OptimizedLSTMCell or GRUCell",
        got=type(module).__name__,
        fix="convert one of the supported modules (custom cells are not mapped).",
    )


def _linen_rnn(module, p, where):
    if module.reverse and not module.keep_order:
        raise _core.error(
            f"{where}: nn.RNN(reverse=True, keep_order=False) returns outputs in reversed order.",
            expected="reverse=False, or reverse=True with keep_order=True",
            got="reverse=True, keep_order=False",
            fix="use keep_order=True (our reversed layers keep outputs aligned with inputs).",
        )
    cell, params = _linen_cell(module.cell, p["cell"], where)
    return rnn(cell, reverse=bool(module.reverse)), params


def _backward_cell_params(module, p, where):
    """The backward direction's cell variables of a linen ``nn.Bidirectional``. When both
    ``nn.RNN`` share one cell instance (or are one ``nn.RNN``), Flax binds that cell once,
    under ``forward_rnn``, and runs both directions with its one set of weights: the backward
    direction reads them from there."""
    if "backward_rnn" in p:
        return p["backward_rnn"]["cell"]
    if module.backward_rnn.cell is module.forward_rnn.cell:
        return p["forward_rnn"]["cell"]
    raise _core.error(
        f"{where}: the variables of nn.Bidirectional have no 'backward_rnn'.",
        expected="variables with 'forward_rnn' and 'backward_rnn' (or one cell instance shared by both nn.RNN)",
        got=f"params with keys {sorted(p)}",
        fix="pass the variables returned by this module's init.",
    )


def _nnx_cell(module, where):
    nnx = require("flax.nnx")
    _check_activations(module, where)
    v = lambda var: jnp.asarray(var[...])  # noqa: E731
    if type(module) is nnx.LSTMCell:
        names = [("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho")]
        cat = lambda j, leaf: jnp.concatenate([v(getattr(getattr(module, n[j]), leaf)) for n in names], -1)  # noqa: E731
        return lstm(module.hidden_features), LSTMParams(cat(0, "kernel"), cat(1, "kernel"), cat(1, "bias"))
    if type(module) is nnx.OptimizedLSTMCell:
        bias = v(module.dense_h.bias)
        if module.dense_i.bias is not None:
            bias = bias + v(module.dense_i.bias)
        return lstm(module.hidden_features), LSTMParams(v(module.dense_i.kernel), v(module.dense_h.kernel), bias)
    if type(module) is nnx.GRUCell:
        H = module.hidden_features
        return gru(H), GRUParams(
            v(module.dense_i.kernel),
            v(module.dense_h.kernel),
            v(module.dense_i.bias),
            jnp.zeros((H,), v(module.dense_i.bias).dtype),
        )
    raise _unsupported(module, where)


def from_flax(module: Any, variables: Any = None) -> tuple[Cell | Layer, Any]:
    """A Flax cell or layer as ``(cell_or_layer, params)``.

    linen: pass the module and its variables (``{"params": ...}``); cells come back as cells,
    ``nn.RNN`` as :func:`recurrent.rnn`, ``nn.Bidirectional`` as :func:`recurrent.bidirectional`
    (its ``merge_fn`` is kept; where both directions share one cell, and so one set of weights,
    each direction gets its own copy of them, trained apart from then on). NNX: pass the module
    alone (it holds its weights).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from recurrent.interop import from_flax
    >>> flax_rnn = nn.RNN(nn.GRUCell(8))
    >>> xs = jnp.ones((2, 5, 3))
    >>> variables = flax_rnn.init(jax.random.key(0), xs)
    >>> layer, params = from_flax(flax_rnn, variables)
    >>> bool(jnp.allclose(layer.apply(params, xs)[1], flax_rnn.apply(variables, xs), atol=1e-5))
    True
    """
    where = f"{_WHERE}.from_flax"
    nn = require("flax.linen")
    nnx = require("flax.nnx")
    if isinstance(module, nnx.Module):
        return _nnx_cell(module, where)
    if not isinstance(module, nn.Module):
        raise _unsupported(module, where)
    if variables is None:
        raise _core.error(
            f"{where}: a linen module needs its variables.",
            expected="from_flax(module, variables) with variables = module.init(...)",
            got="variables=None",
            fix="pass the variables dict ({'params': ...}).",
        )
    p = variables.get("params", variables)
    if isinstance(module, nn.Bidirectional):
        fwd, pf = _linen_rnn(module.forward_rnn, p["forward_rnn"], where)
        # Flax calls the backward RNN with reverse=True, keep_order=True whatever its settings,
        # as our bidirectional does with its backward layer.
        bwd_cell, pb = _linen_cell(module.backward_rnn.cell, _backward_cell_params(module, p, where), where)
        if "backward_rnn" not in p:  # one set of weights: each direction gets its own copy
            pb = jax.tree.map(jnp.array, pb)
        merge = "concat" if module.merge_fn.__name__ == "_concatenate" else module.merge_fn
        backward = rnn(bwd_cell)
        return bidirectional(fwd, backward, merge=merge), BidirectionalParams(pf, pb)
    if isinstance(module, nn.RNN):
        return _linen_rnn(module, p, where)
    return _linen_cell(module, p, where)


def _kind_of(params):
    if isinstance(params, LSTMParams):
        return "lstm"
    if isinstance(params, GRUParams):
        return "gru"
    if isinstance(params, ConvLSTMParams):
        return "conv_lstm"
    return None


def _to_linen_cell(params, where):
    nn = require("flax.linen")
    kind = _kind_of(params)
    if kind == "lstm":
        check_plain_lstm(params, where=where, peer="Flax", allow_projection=False)
        H = params.recurrent_kernel.shape[0]
        split = lambda a: jnp.split(a, 4, axis=-1)  # noqa: E731
        ik, hk, b = split(params.input_kernel), split(params.recurrent_kernel), split(params.bias)
        p = {f"i{g}": {"kernel": ik[j]} for j, g in enumerate(_LSTM)}
        p |= {f"h{g}": {"kernel": hk[j], "bias": b[j]} for j, g in enumerate(_LSTM)}
        return nn.LSTMCell(H), p
    if kind == "gru":
        check_plain_gru(params, where=where, peer="Flax")
        H = params.recurrent_kernel.shape[0]
        split = lambda a: jnp.split(a, 3, axis=-1)  # noqa: E731
        ik, hk, b = split(params.input_kernel), split(params.recurrent_kernel), split(params.bias)
        p = {f"i{g}": {"kernel": ik[j], "bias": b[j]} for j, g in enumerate(_GRU)}
        p |= {f"h{g}": {"kernel": hk[j]} for j, g in enumerate(_GRU)}
        p["hn"]["bias"] = params.recurrent_bias
        return nn.GRUCell(H), p
    if kind == "conv_lstm":
        extras = [
            f
            for f in ("peephole_input", "peephole_forget", "peephole_output", "layer_norm")
            if getattr(params, f) is not None
        ]
        if extras:
            raise _core.error(
                f"{where}: Flax's ConvLSTMCell has no {', '.join(extras)}.",
                expected="recurrent.conv_lstm(H, kernel_size) without peepholes or layer norm",
                got="parameters with " + ", ".join(extras),
                fix="convert a plain conv_lstm.",
            )
        H = params.recurrent_kernel.shape[-2]
        ks = tuple(params.input_kernel.shape[:-2])
        offset = _igfo_from_ifgo(_conv_offset(H, params.bias.dtype))
        p = {
            "ih": {"kernel": _igfo_from_ifgo(params.input_kernel), "bias": _igfo_from_ifgo(params.bias)},
            "hh": {"kernel": _igfo_from_ifgo(params.recurrent_kernel), "bias": -offset},
        }
        return nn.ConvLSTMCell(H, ks), p
    raise _core.error(
        f"{where}: these parameters have no Flax counterpart.",
        expected="LSTMParams, GRUParams or ConvLSTMParams (or an rnn / bidirectional layer of them)",
        got=type(params).__name__,
        fix="convert a plain lstm, gru or conv_lstm.",
    )


def to_flax(layer: Cell | Layer, params: Any, *, api: str = "linen") -> Any:
    """A Flax module with the weights of ``(layer, params)``: the inverse of :func:`from_flax`.

    ``api="linen"`` returns ``(module, variables)``: a cell gives ``nn.LSTMCell`` /
    ``nn.GRUCell`` / ``nn.ConvLSTMCell``, an ``rnn`` layer ``nn.RNN(cell)``, a bidirectional
    layer (``merge="concat"``) ``nn.Bidirectional``. A layer does not record ``reverse=True``:
    the ``nn.RNN`` made runs forward. ``api="nnx"`` returns an NNX cell
    (``nnx.LSTMCell`` or ``nnx.GRUCell``) holding the weights.

    >>> import jax, recurrent
    >>> from recurrent.interop import to_flax
    >>> cell = recurrent.lstm(8)
    >>> module, variables = to_flax(cell, cell.init(jax.random.key(0), (3,)))
    >>> type(module).__name__, sorted(variables["params"])[:2]
    ('LSTMCell', ['hf', 'hg'])
    """
    where = f"{_WHERE}.to_flax"
    if api == "nnx":
        return _to_nnx(layer, params, where)
    if api != "linen":
        raise _core.error(f"{where}: unknown api.", expected="'linen' or 'nnx'", got=repr(api), fix='pass api="nnx".')
    nn = require("flax.linen")
    if isinstance(params, BidirectionalParams):
        in_shape = (params.forward.input_kernel.shape[0],)
        out = layer.output_shape(in_shape) if isinstance(layer, Layer) else None
        if (
            _kind_of(params.forward) != "lstm"
            and _kind_of(params.forward) != "gru"
            or out is None
            or tuple(out) != (2 * _width(params.forward),)
        ):
            raise _core.error(
                f"{where}: nn.Bidirectional here is built with its default concatenation.",
                expected='a bidirectional(lstm or gru, merge="concat") layer',
                got=f"{getattr(layer, 'name', type(layer).__name__)} with output shape {out}",
                fix='use merge="concat", or convert each direction with to_flax(rnn(cell), params.forward).',
            )
        (cf, pf), (cb, pb) = _to_linen_cell(params.forward, where), _to_linen_cell(params.backward, where)
        module = nn.Bidirectional(nn.RNN(cf), nn.RNN(cb))
        return module, {"params": {"forward_rnn": {"cell": pf}, "backward_rnn": {"cell": pb}}}
    cell, p = _to_linen_cell(params, where)
    if isinstance(layer, Cell):
        return cell, {"params": p}
    # A layer does not reveal whether it runs in reverse: the module runs forward.
    return nn.RNN(cell), {"params": {"cell": p}}


def _width(params):
    return params.recurrent_kernel.shape[0]


def _to_nnx(layer, params, where):
    nnx = require("flax.nnx")
    kind = _kind_of(params)
    if not isinstance(layer, Cell) or kind not in ("lstm", "gru"):
        raise _core.error(
            f"{where}: api='nnx' converts cells.",
            expected="the cell recurrent.lstm(H) or recurrent.gru(H) with its params",
            got=getattr(layer, "name", type(layer).__name__),
            fix="convert the cell; use api='linen' for nn.RNN and nn.Bidirectional.",
        )
    F, H = params.input_kernel.shape[0], params.recurrent_kernel.shape[0]
    if kind == "lstm":
        check_plain_lstm(params, where=where, peer="Flax NNX", allow_projection=False)
        module = nnx.OptimizedLSTMCell(F, H, rngs=nnx.Rngs(0))
        module.dense_i.kernel[...] = params.input_kernel
        module.dense_h.kernel[...] = params.recurrent_kernel
        module.dense_h.bias[...] = params.bias
        if module.dense_i.bias is not None:
            module.dense_i.bias[...] = jnp.zeros_like(params.bias)
        return module
    check_plain_gru(params, where=where, peer="Flax NNX")
    if np.any(np.asarray(params.recurrent_bias) != 0):
        raise _core.error(
            f"{where}: NNX's GRUCell has no candidate recurrent bias (b_hn).",
            expected="recurrent_bias all zero",
            got="a nonzero recurrent_bias",
            fix="use api='linen' (nn.GRUCell has b_hn), or zero the recurrent_bias.",
        )
    module = nnx.GRUCell(F, H, rngs=nnx.Rngs(0))
    module.dense_i.kernel[...] = params.input_kernel
    module.dense_i.bias[...] = params.bias
    module.dense_h.kernel[...] = params.recurrent_kernel
    return module
