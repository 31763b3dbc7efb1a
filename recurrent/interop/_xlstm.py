"""Converters from the official xLSTM code (the ``xlstm`` package, PyTorch) to recurrent.

The unit converted is the one that computes exactly what one of our cells computes:

- ``xlstm.blocks.slstm.cell.sLSTMCell`` (either backend, ``sLSTMCell_vanilla`` or
  ``sLSTMCell_cuda``; ``function="slstm"``) -> :func:`recurrent.slstm` with
  ``forget_gate="sigmoid"``. The official cell takes its gates' input projections already made:
  its input is ``(B, T, 4H)``, the pre-activations ``W x`` of the gates i, f, z, o (gate-major,
  then head, then unit: its ``input_shape="BSGNH"``). The converted cell has ``F = 4H`` and an
  identity ``input_kernel``, so it reads the same input; ``recurrent_kernel`` and ``bias`` are the
  cell's (its backend-independent views ``recurrent_kernel (K, D, 4, D)`` and ``bias (K, 4, D)``,
  reordered to ours). Its output is ours, ``(B, T, H)``, where the official cell returns
  ``(B, K, T, D)`` (``output_shape="BNSH"``) and its state ``(4, B, H)`` holds ``h, c, n, m``: ours
  is ``recurrent.SLSTMState(*state)``.

- ``xlstm.blocks.mlstm.cell.mLSTMCell`` -> :func:`recurrent.mlstm` with ``gates_from="qkv"``, no
  output gate and the multi-head layer norm, reading ``[q, k, v]`` (``F = 3H``) through an identity
  ``input_kernel`` (see ``_from_mlstm_cell``).

The official ``sLSTMLayer`` does more than a cell: a causal convolution (``conv1d_kernel_size``),
per-head input projections (``fgate``, ``igate``, ``zgate``, ``ogate``; note that the module named
``fgate`` makes the *input* gate's pre-activation and ``igate`` the forget gate's) and a per-head
group norm after the cell, which recurrent has no counterpart for; it is refused with a pointer to
its ``slstm_cell``. Gradient-only options of the official cell (``gradient_recurrent_cut``,
``gradient_recurrent_clipval``) change its CUDA backward pass, not its values; ours is the exact
derivative.

New modules are added to ``_CONVERTERS``: the class (matched with ``isinstance``) and a function
``module -> (cell_or_layer, params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._core import Cell, Layer
from recurrent._mlstm import MLSTMParams, mlstm
from recurrent._slstm import SLSTMParams, slstm
from recurrent.interop._common import require

_WHERE = "recurrent.interop.from_xlstm"


def _numpy(tensor) -> np.ndarray:
    """A float32 (float64 stays float64) NumPy copy of a tensor or a parameter proxy's view."""
    t = tensor.detach().cpu()
    return t.numpy() if str(t.dtype) == "torch.float64" else t.float().numpy()


def slstm_params_from_xlstm(recurrent_kernel: Any, bias: Any) -> SLSTMParams:
    """Our sLSTM parameters (with an identity ``input_kernel``) from the official cell's
    backend-independent views: ``recurrent_kernel (K, D, 4, D)`` (head, input unit, gate, output
    unit) and ``bias (K, 4, D)`` (head, gate, unit), gates in the order i, f, z, o."""
    R = jnp.asarray(recurrent_kernel)
    K, D, G, _ = R.shape
    H = K * D
    return SLSTMParams(
        input_kernel=jnp.eye(G * H, dtype=R.dtype),
        recurrent_kernel=R.reshape(K, D, G * D),
        bias=jnp.swapaxes(jnp.asarray(bias), 0, 1).reshape(G * H),
    )


def _from_slstm_cell(module) -> tuple[Cell, SLSTMParams]:
    config = module.config
    if config.function != "slstm":
        raise _core.error(
            f"{_WHERE}: the official cell computes function={config.function!r}, not the sLSTM.",
            expected='an sLSTMCell with function="slstm" (the default)',
            got=f"function={config.function!r}",
            fix="convert an sLSTM cell; its 'lstm' function is a plain LSTM: use recurrent.lstm.",
        )
    if config.input_shape != "BSGNH":
        raise _core.error(
            f"{_WHERE}: the converted cell reads the official cell's input as (B, T, 4H), gate-major.",
            expected='input_shape="BSGNH" (the default)',
            got=f"input_shape={config.input_shape!r}",
            fix='build the official cell with input_shape="BSGNH", or transpose its input to (B, T, 4H).',
        )
    params = slstm_params_from_xlstm(_numpy(module.recurrent_kernel[:]), _numpy(module.bias[:]))
    return slstm(config.hidden_size, num_heads=config.num_heads, forget_gate="sigmoid"), params


def _refuse_slstm_layer(module):
    raise _core.error(
        f"{_WHERE}: the official sLSTMLayer adds a causal convolution, per-head input projections and a "
        "per-head group norm to the sLSTM cell; recurrent has no counterpart for the group norm.",
        expected="the official sLSTMCell (the layer's `slstm_cell`)",
        got=f"{type(module).__name__}(embedding_dim={module.config.embedding_dim}, "
        f"num_heads={module.config.num_heads}, conv1d_kernel_size={module.config.conv1d_kernel_size})",
        fix="convert `module.slstm_cell` and feed it the four projections concatenated in the order "
        "i, f, z, o: torch.cat([module.fgate(x), module.igate(x), module.zgate(x), module.ogate(x)], -1) "
        "(the module named fgate makes the input gate's pre-activation).",
    )


def _from_mlstm_cell(module) -> tuple[Cell, MLSTMParams]:
    """The official ``xlstm.blocks.mlstm.cell.mLSTMCell`` as :func:`recurrent.mlstm` with
    ``gates_from="qkv"``, no output gate and the multi-head layer norm. The official cell takes
    ``q, k, v`` already projected; the converted cell reads them concatenated, ``[q, k, v]``
    (``F = 3H``), through an identity ``input_kernel``, so ``rnn(cell).apply(params, xs)`` on
    ``torch.cat([q, k, v], -1)`` gives the official ``forward(q, k, v)``. Its gates read the same
    ``[q, k, v]``; the layer norm's gain is the official ``1 + weight``. Its step state
    ``(c (B, N, D, D), n (B, N, D, 1), m (B, N, 1, 1))`` is ours as
    ``MLSTMState(c, n[..., 0], m[..., 0, 0])``."""
    config, norm = module.config, module.outnorm
    H, N = config.embedding_dim, config.num_heads
    if norm.bias is not None:
        raise _core.error(
            f"{_WHERE}: recurrent's mLSTM layer norm has a gain only, and this cell's has an offset too.",
            expected="an mLSTMCell whose outnorm has bias=False (the official default)",
            got="outnorm.bias of shape " + str(tuple(norm.bias.shape)),
            fix="convert a cell built with the official defaults.",
        )
    gain = np.ones(H, np.float32) if norm.weight_proxy is None else _numpy(norm.weight_proxy)
    gate_kernel = np.concatenate([_numpy(module.igate.weight).T, _numpy(module.fgate.weight).T], axis=1)
    gate_bias = np.concatenate([_numpy(module.igate.bias), _numpy(module.fgate.bias)])
    dtype = gate_kernel.dtype
    params = MLSTMParams(
        input_kernel=jnp.eye(3 * H, dtype=dtype),
        input_bias=jnp.zeros((3 * H,), dtype),
        gate_kernel=jnp.asarray(gate_kernel),
        gate_bias=jnp.asarray(gate_bias),
        norm_scale=jnp.asarray(gain),
    )
    cell = mlstm(
        H,
        num_heads=N,
        gates_from="qkv",
        output_gate=False,
        layer_norm=True,
        layer_norm_epsilon=float(norm.eps),
        param_dtype=dtype,
    )
    return cell, params


def _converters() -> list[tuple[type, Callable[[Any], tuple[Cell | Layer, Any]], str | None]]:
    """``(official class, converter, name in messages)``, matched in order with ``isinstance``; a
    name of ``None`` marks a module that is refused with its own explanation."""
    require("torch")
    cell = require("xlstm.blocks.slstm.cell")
    layer = require("xlstm.blocks.slstm.layer")
    return [
        (cell.sLSTMCellBase, _from_slstm_cell, "xlstm.blocks.slstm.cell.sLSTMCell"),
        (layer.sLSTMLayer, _refuse_slstm_layer, None),
        (require("xlstm.blocks.mlstm.cell").mLSTMCell, _from_mlstm_cell, "xlstm.blocks.mlstm.cell.mLSTMCell"),
    ]


def from_xlstm(module: Any) -> tuple[Cell | Layer, Any]:
    """An official xLSTM module (the ``xlstm`` package) as ``(cell, params)``.

    Supported: the official ``sLSTMCell`` (vanilla or CUDA backend), as :func:`recurrent.slstm`
    with the official cell's ``hidden_size``, ``num_heads`` and sigmoid forget gate. The official
    cell's input is already projected, ``(B, T, 4H)`` pre-activations of the gates i, f, z, o, so
    the converted cell has ``F = 4H`` and an identity ``input_kernel``: ``rnn(cell).apply(params,
    xs)`` on the official cell's input gives its output (ours ``(B, T, H)``, the official
    ``(B, K, T, D)``) and its final state (``(4, B, H)``, ``h, c, n, m``: ours is
    ``SLSTMState(*state)``). Replace ``input_kernel`` by your own ``(F, 4H)`` projection to use it as
    an ordinary cell. Also the official ``mLSTMCell``, as :func:`recurrent.mlstm` reading
    ``[q, k, v]`` (``F = 3H``) through an identity ``input_kernel``, its gates from ``[q, k, v]``, no
    output gate and its multi-head layer norm (``_from_mlstm_cell``). The ``sLSTMLayer``
    (convolution, input projections, group norm) is refused
    with an error saying how to convert its cell.

    >>> import torch, jax.numpy as jnp, numpy as np, recurrent
    >>> from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig
    >>> from recurrent.interop import from_xlstm
    >>> official = sLSTMCell(sLSTMCellConfig(hidden_size=8, num_heads=2, backend="vanilla", dtype="float32"))
    >>> cell, params = from_xlstm(official)
    >>> xs = np.random.default_rng(0).standard_normal((3, 5, 32)).astype(np.float32)   # (B, T, 4H)
    >>> carry, ys = recurrent.rnn(cell).apply(params, jnp.asarray(xs))
    >>> out, state = official(torch.from_numpy(xs))           # (B, K, T, D), (4, B, H)
    >>> bool(np.allclose(ys, out.detach().permute(0, 2, 1, 3).reshape(3, 5, 8).numpy(), atol=1e-5))
    True
    >>> bool(np.allclose(carry.m, state[3].detach().numpy(), atol=1e-5))
    True
    """
    converters = _converters()
    for cls, convert, _ in converters:
        if isinstance(module, cls):
            return convert(module)
    raise _core.error(
        f"{_WHERE}: cannot convert {type(module).__module__}.{type(module).__name__}.",
        expected="one of: " + ", ".join(name for _, _, name in converters if name),
        got=type(module).__name__,
        fix="convert a supported module; other xLSTM modules have no counterpart in recurrent yet.",
    )
