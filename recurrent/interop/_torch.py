"""PyTorch converters: ``torch.nn.LSTM``, ``GRU``, ``LSTMCell``, ``GRUCell`` <-> recurrent.

Mapping (PyTorch computes ``x W_ih^T + b_ih + h W_hh^T + b_hh``, gate order i, f, g, o and r, z, n,
the same orders as ours):

- ``weight_ih (G*H, F)`` -> ``input_kernel (F, G*H)`` (transposed), ``weight_hh`` likewise.
- LSTM: ``bias = b_ih + b_hh``. GRU: ``bias = b_ih + [b_hr, b_hz, 0]`` and
  ``recurrent_bias = b_hn`` (PyTorch's candidate keeps its recurrent bias inside ``r * (...)``).
- ``weight_hr (P, H)`` -> ``projection (H, P)``; ``bias=False`` -> zero biases.
- ``num_layers`` > 1 -> :func:`recurrent.stacked`, ``bidirectional`` -> :func:`recurrent.bidirectional`
  (``merge="concat"``: the next layer reads both directions, as in PyTorch), ``dropout`` -> the
  stack's dropout between layers.
- ``batch_first=False`` modules read ``(T, B, F)``: call ``layer.apply(..., time_major=True)``.
- ``PackedSequence`` inputs correspond to ``lengths``; the final states agree.

PyTorch's final states ``(h_n, c_n)`` have shape ``(num_layers * num_directions, B, ·)``;
:func:`carry_from_torch` and :func:`carry_to_torch` convert them to and from our carries.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._combinators import BidirectionalParams, BidirectionalState, bidirectional, stacked
from recurrent._core import Cell, Layer, LSTMState
from recurrent._gru import GRUParams, gru
from recurrent._lstm import LSTMParams, lstm
from recurrent._rnn import rnn
from recurrent.interop._common import array, check_plain_gru, check_plain_lstm, lstm_hidden, require

_WHERE = "recurrent.interop"


# --------------------------------------------------------------------------------------
# Pure mappings on arrays (jax-traceable, so gradients flow through them in tests).


def lstm_params_from_torch(w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None) -> LSTMParams:
    """LSTM parameters from PyTorch's tensors (as arrays); missing biases are zero."""
    G = w_ih.shape[0]
    bias = jnp.zeros((G,), w_ih.dtype)
    for b in (b_ih, b_hh):
        if b is not None:
            bias = bias + b
    return LSTMParams(
        input_kernel=w_ih.T, recurrent_kernel=w_hh.T, bias=bias, projection=None if w_hr is None else w_hr.T
    )


def gru_params_from_torch(w_ih, w_hh, b_ih=None, b_hh=None) -> GRUParams:
    """GRU parameters (``reset_after=True``) from PyTorch's tensors; missing biases are zero."""
    H = w_hh.shape[1]
    b_ih = jnp.zeros((3 * H,), w_ih.dtype) if b_ih is None else b_ih
    b_hh = jnp.zeros((3 * H,), w_ih.dtype) if b_hh is None else b_hh
    bias = b_ih + jnp.concatenate([b_hh[: 2 * H], jnp.zeros((H,), b_hh.dtype)])
    return GRUParams(input_kernel=w_ih.T, recurrent_kernel=w_hh.T, bias=bias, recurrent_bias=b_hh[2 * H :])


def _tensors_to_torch(params, kind: str) -> dict[str, np.ndarray]:
    """PyTorch's tensors (suffix-free names) for one cell's parameters."""
    if kind == "lstm":
        out = {
            "weight_ih": params.input_kernel.T,
            "weight_hh": params.recurrent_kernel.T,
            "bias_ih": params.bias,
            "bias_hh": np.zeros_like(params.bias),
        }
        if params.projection is not None:
            out["weight_hr"] = params.projection.T
    else:
        H = params.recurrent_kernel.shape[0]
        out = {
            "weight_ih": params.input_kernel.T,
            "weight_hh": params.recurrent_kernel.T,
            "bias_ih": params.bias,
            "bias_hh": np.concatenate([np.zeros((2 * H,), params.bias.dtype), np.asarray(params.recurrent_bias)]),
        }
    return {k: np.asarray(v) for k, v in out.items()}


def params_from_tensors(kind: str, tensors: dict[str, Any], num_layers: int = 1, bidirectional: bool = False):
    """Our parameters from a dict of PyTorch's names to arrays (``module.named_parameters()``
    converted to arrays). ``kind`` is ``"lstm"``, ``"gru"``, ``"lstm_cell"`` or ``"gru_cell"``.
    Pure and traceable, so ``jax.grad`` through it gives the gradient for each PyTorch tensor."""
    make = lstm_params_from_torch if kind.startswith("lstm") else gru_params_from_torch

    def one(suffix):
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if kind.startswith("lstm") else ())
        return make(*(tensors.get(n + suffix) for n in names))

    if kind.endswith("_cell"):
        return one("")
    layers = []
    for k in range(num_layers):
        p = one(f"_l{k}")
        layers.append(BidirectionalParams(p, one(f"_l{k}_reverse")) if bidirectional else p)
    return layers[0] if num_layers == 1 else tuple(layers)


# --------------------------------------------------------------------------------------
# Modules.


def _kind(module, torch) -> str:
    nn = torch.nn
    for cls, kind in ((nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.LSTMCell, "lstm_cell"), (nn.GRUCell, "gru_cell")):
        if type(module) is cls:
            return kind
    what = type(module).__name__
    detail = ""
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        detail = f" (nonlinearity={module.nonlinearity!r}: recurrent has no Elman RNN)"
    raise _core.error(
        f"{_WHERE}.from_torch: cannot convert torch.nn.{what}{detail}.",
        expected="torch.nn.LSTM, torch.nn.GRU, torch.nn.LSTMCell or torch.nn.GRUCell",
        got=f"torch.nn.{what}",
        fix="convert one of the supported modules; subclasses and other recurrences are not mapped.",
    )


def from_torch(module: Any) -> tuple[Cell | Layer, Any]:
    """A PyTorch recurrent module as ``(layer, params)`` (``(cell, params)`` for cells).

    ``torch.nn.LSTM`` (any ``num_layers``, ``bidirectional``, ``proj_size``, ``bias``,
    ``dropout``) and ``torch.nn.GRU`` become ``rnn`` / ``bidirectional`` layers, stacked when
    ``num_layers > 1``; ``LSTMCell`` and ``GRUCell`` become cells. The layer reads
    ``(B, T, F)``: for a module with ``batch_first=False`` pass ``time_major=True``.

    >>> import torch, jax.numpy as jnp, numpy as np
    >>> from recurrent.interop import from_torch
    >>> module = torch.nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
    >>> layer, params = from_torch(module)
    >>> xs = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    >>> carry, ys = layer.apply(params, jnp.asarray(xs))
    >>> ys_torch, _ = module(torch.from_numpy(xs))
    >>> bool(np.allclose(ys, ys_torch.detach().numpy(), atol=1e-5))
    True
    """
    torch = require("torch")
    kind = _kind(module, torch)
    tensors = {name: array(p.detach().cpu().numpy()) for name, p in module.named_parameters()}
    if kind.endswith("_cell"):
        H = module.hidden_size
        params = params_from_tensors(kind, tensors)
        return (lstm(H) if kind == "lstm_cell" else gru(H)), params
    if module.mode not in ("LSTM", "GRU"):
        raise _core.error(
            f"{_WHERE}.from_torch: unsupported mode {module.mode!r}.",
            expected="'LSTM' or 'GRU'",
            got=repr(module.mode),
            fix="convert an nn.LSTM or nn.GRU.",
        )
    H, L, D = module.hidden_size, module.num_layers, module.bidirectional
    P = getattr(module, "proj_size", 0) or None
    cell = lstm(H, proj_size=P) if kind == "lstm" else gru(H)
    one = bidirectional(cell) if D else rnn(cell)
    layer = one if L == 1 else stacked([one] * L, dropout=float(module.dropout))
    return layer, params_from_tensors(kind, tensors, L, D)


def _describe(layer: Any, params: Any):
    """(kind, num_layers, bidirectional, H, P) of our layer's parameters, or a clear error."""
    where = f"{_WHERE}.to_torch"
    layers = params if isinstance(params, tuple) and not hasattr(params, "_fields") else (params,)
    bidis = [isinstance(p, BidirectionalParams) for p in layers]
    if any(bidis) and not all(bidis):
        raise _core.error(
            f"{where}: PyTorch stacks are bidirectional in every layer or in none.",
            expected="all layers bidirectional, or none",
            got=f"bidirectional layers at {[i for i, b in enumerate(bidis) if b]} of {len(layers)}",
            fix="make every layer of the stack bidirectional (or none).",
        )
    cells = [c for p in layers for c in ((p.forward, p.backward) if isinstance(p, BidirectionalParams) else (p,))]
    if all(isinstance(c, LSTMParams) for c in cells):
        kind = "lstm"
        for c in cells:
            check_plain_lstm(c, where=where, peer="PyTorch")
        H = lstm_hidden(cells[0])
        P = None if cells[0].projection is None else cells[0].projection.shape[1]
        shapes = {(lstm_hidden(c), None if c.projection is None else c.projection.shape[1]) for c in cells}
    elif all(isinstance(c, GRUParams) for c in cells):
        kind = "gru"
        for c in cells:
            check_plain_gru(c, where=where, peer="PyTorch")
        H, P = cells[0].recurrent_kernel.shape[0], None
        shapes = {(c.recurrent_kernel.shape[0], None) for c in cells}
    else:
        raise _core.error(
            f"{where}: PyTorch's recurrent modules are all-LSTM or all-GRU.",
            expected="parameters of LSTM cells only, or GRU cells only",
            got=", ".join(sorted({type(c).__name__ for c in cells})),
            fix="convert each part separately, or use one kind of cell.",
        )
    if len(shapes) != 1:
        raise _core.error(
            f"{where}: every layer and direction of a PyTorch module has the same sizes.",
            expected="one (hidden_size, proj_size) throughout",
            got=str(sorted(shapes, key=str)),
            fix="use the same hidden size (and projection) in every layer.",
        )
    if P is not None and P >= H:
        raise _core.error(
            f"{where}: PyTorch's LSTM projects to fewer units than it has.",
            expected=f"proj_size < hidden_size ({H})",
            got=f"proj_size={P}",
            fix="use a smaller proj_size, or keep this model in recurrent.",
        )
    if isinstance(layer, Layer) and any(bidis):
        F = cells[0].input_kernel.shape[0]
        R = H if P is None else P
        if tuple(layer.output_shape((F,))) != (2 * R,):
            raise _core.error(
                f"{where}: PyTorch concatenates the two directions.",
                expected='bidirectional(..., merge="concat")',
                got=f"a layer whose output has shape {tuple(layer.output_shape((F,)))}",
                fix='build the bidirectional layer with merge="concat".',
            )
    return kind, len(layers), bool(bidis[0]), H, P


def to_torch(layer: Cell | Layer, params: Any, *, batch_first: bool = True) -> Any:
    """A PyTorch module with the weights of ``(layer, params)``: the inverse of :func:`from_torch`.

    A cell (``lstm(H)`` or ``gru(H)``) becomes ``LSTMCell`` / ``GRUCell`` (a stacked or
    projected cell, which PyTorch has no cell for, becomes the module that scans it); an ``rnn``,
    ``bidirectional`` (``merge="concat"``) or ``stacked`` layer of plain LSTMs (optionally
    projected) or GRUs (``reset_after=True``) becomes ``nn.LSTM`` / ``nn.GRU`` with ``bias=True``:
    our bias goes into ``bias_ih`` and PyTorch's ``bias_hh`` holds zeros (the GRU's
    ``recurrent_bias`` goes into ``b_hn``). Options invisible in the parameters (``cell_clip``,
    custom activations, a residual stack) are not representable in PyTorch; do not convert
    layers built with them.

    >>> import jax, recurrent
    >>> from recurrent.interop import to_torch
    >>> layer = recurrent.stacked([recurrent.lstm(8, proj_size=4)] * 2)
    >>> module = to_torch(layer, layer.init(jax.random.key(0), (3,)))
    >>> module
    LSTM(3, 8, proj_size=4, num_layers=2, batch_first=True)
    """
    torch = require("torch")
    kind, L, D, H, P = _describe(layer, params)
    if isinstance(layer, Cell) and L == 1 and P is None:
        F = params.input_kernel.shape[0]
        module = (torch.nn.LSTMCell if kind == "lstm" else torch.nn.GRUCell)(F, H)
        suffixes = {"": params}
    else:
        first = params[0] if L > 1 else params
        F = (first.forward if D else first).input_kernel.shape[0]
        kw = dict(num_layers=L, bidirectional=D, batch_first=batch_first)
        if kind == "lstm":
            module = torch.nn.LSTM(F, H, proj_size=P or 0, **kw)
        else:
            module = torch.nn.GRU(F, H, **kw)
        suffixes = {}
        for k, p in enumerate(params if L > 1 else (params,)):
            if D:
                suffixes[f"_l{k}"], suffixes[f"_l{k}_reverse"] = p.forward, p.backward
            else:
                suffixes[f"_l{k}"] = p
    tensors = {name + sfx: t for sfx, p in suffixes.items() for name, t in _tensors_to_torch(p, kind).items()}
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = tensors[name]
            if tuple(value.shape) != tuple(p.shape):
                raise _core.error(
                    f"{_WHERE}.to_torch: {name} does not fit PyTorch's layout.",
                    expected=str(tuple(p.shape)),
                    got=str(tuple(value.shape)),
                    fix="each layer's input must be the previous layer's output (both directions concatenated).",
                )
            p.copy_(torch.from_numpy(np.array(value, dtype=np.float32 if value.dtype == jnp.bfloat16 else value.dtype)))
    return module


# --------------------------------------------------------------------------------------
# Carries.


def carry_from_torch(module: Any, state: Any):
    """Our carry from PyTorch's final state: ``(h_n, c_n)`` (LSTM) or ``h_n`` (GRU) of shape
    ``(num_layers * num_directions, B, ·)``, or ``(h, c)`` / ``h`` of a cell."""
    torch = require("torch")
    kind = _kind(module, torch)
    as_array = lambda t: array(t.detach().cpu().numpy())  # noqa: E731
    if kind == "lstm_cell":
        return LSTMState(as_array(state[0]), as_array(state[1]))
    if kind == "gru_cell":
        return as_array(state)
    hs = as_array(state[0] if kind == "lstm" else state)
    cs = as_array(state[1]) if kind == "lstm" else None
    one = lambda i: LSTMState(hs[i], cs[i]) if kind == "lstm" else hs[i]  # noqa: E731
    D = 2 if module.bidirectional else 1
    layers = [BidirectionalState(one(D * k), one(D * k + 1)) if D == 2 else one(k) for k in range(module.num_layers)]
    return layers[0] if module.num_layers == 1 else tuple(layers)


def carry_to_torch(module: Any, carry: Any):
    """PyTorch's state (``(h_0, c_0)`` or ``h_0``) from our carry: the inverse of
    :func:`carry_from_torch`, e.g. to continue a sequence in PyTorch."""
    torch = require("torch")
    kind = _kind(module, torch)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    if kind == "lstm_cell":
        return t(carry.h), t(carry.c)
    if kind == "gru_cell":
        return t(carry)
    layers = carry if module.num_layers > 1 else (carry,)
    parts = [c for layer in layers for c in ((layer.forward, layer.backward) if module.bidirectional else (layer,))]
    if kind == "lstm":
        return torch.stack([t(c.h) for c in parts]), torch.stack([t(c.c) for c in parts])
    return torch.stack([t(c) for c in parts])
