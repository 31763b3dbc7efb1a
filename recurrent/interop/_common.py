"""Helpers shared by the converters: lazy imports and structural checks on our parameters."""

from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._gru import GRUParams
from recurrent._lstm import LSTMParams


def require(module: str, extra: str = "interop"):
    """Imports an optional peer library, or raises an ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"recurrent.interop needs `{module.split('.')[0]}` for this converter, and it is not installed.\n"
            f"  fix: pip install 'recurrent[{extra}]'  (PyTorch's CPU build is enough: torch==2.13.0)"
        ) from e


def array(value: Any) -> jnp.ndarray:
    return jnp.asarray(np.asarray(value))


def check_plain_lstm(params: Any, *, where: str, peer: str, allow_projection: bool = True) -> None:
    """Raises unless ``params`` are a plain LSTM's (i, f, g, o; no peepholes, layer norm, FGR)."""
    if not isinstance(params, LSTMParams):
        raise _core.error(
            f"{where}: expected the parameters of an LSTM cell.",
            expected="recurrent.LSTMParams",
            got=type(params).__name__,
            fix="pass the params made by the layer's init.",
        )
    H = lstm_hidden(params)
    extras = [
        name
        for name in ("peephole_input", "peephole_forget", "peephole_output", "gate_recurrent_kernel", "layer_norm")
        if getattr(params, name) is not None
    ]
    if not allow_projection and params.projection is not None:
        extras.append("projection")
    if params.bias.shape[-1] != 4 * H:
        extras.append(f"{params.bias.shape[-1] // H} gate blocks instead of 4 (CIFG or a gate removed)")
    if extras:
        raise _core.error(
            f"{where}: {peer} has no counterpart for this LSTM.",
            expected="a plain LSTM: recurrent.lstm(H"
            + (", proj_size=P)" if allow_projection else ")")
            + " with the four gates i, f, g, o",
            got="parameters with " + ", ".join(extras),
            fix="convert a plain lstm(...) layer; peepholes, CIFG, layer norm and gate recurrence stay in recurrent.",
        )


def lstm_hidden(params: LSTMParams) -> int:
    """The hidden size H of LSTM parameters (the projection's rows, else the recurrent rows)."""
    return int(params.projection.shape[0] if params.projection is not None else params.recurrent_kernel.shape[0])


def check_plain_gru(params: Any, *, where: str, peer: str, reset_after: bool | None = True) -> None:
    if not isinstance(params, GRUParams):
        raise _core.error(
            f"{where}: expected the parameters of a GRU cell.",
            expected="recurrent.GRUParams",
            got=type(params).__name__,
            fix="pass the params made by the layer's init.",
        )
    if params.layer_norm is not None:
        raise _core.error(
            f"{where}: {peer} has no layer-normalised GRU.",
            expected="recurrent.gru(H) without layer_norm",
            got="layer_norm parameters",
            fix="convert a GRU built without layer_norm=True.",
        )
    if reset_after is not None and (params.recurrent_bias is not None) != reset_after:
        raise _core.error(
            f"{where}: {peer}'s GRU applies the reset gate "
            + ("after" if reset_after else "before")
            + " the recurrent matmul.",
            expected=f"recurrent.gru(H, reset_after={reset_after})",
            got=f"a GRU with reset_after={not reset_after}",
            fix=f"build the GRU with reset_after={reset_after}.",
        )
