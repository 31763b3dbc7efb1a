"""The optional cuDNN path of :func:`recurrent.rnn` (``implementation="cudnn"``).

``jax.experimental.rnn.lstm`` runs a whole LSTM layer as one cuDNN call on NVIDIA GPUs.
It covers the plain LSTM only (no peepholes, coupled gates, projections, layer norm or
clipping, float32) and has no batching rule, so it cannot be vmapped. Everywhere else the
driver falls back to its ``lax.scan`` with a :class:`FallbackWarning` that says why; the
parameters are the same either way, so switching costs nothing.

cuDNN's weight layout is PyTorch's: per layer ``W_ih (4H, F)``, ``W_hh (4H, H)``, ``b_ih``,
``b_hh``, gates in the order input, forget, cell, output (ours too), packed into one flat
vector with all weights first and all biases after. Our one bias goes to ``b_ih`` and
``b_hh`` is zero.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from recurrent._core import Cell, LSTMState

IMPLEMENTATIONS = ("scan", "cudnn", "vjp")


class FallbackWarning(UserWarning):
    """A requested fast path (``rnn(..., implementation="cudnn")``) does not apply, and the
    portable ``lax.scan`` implementation runs instead; the message says why."""


# The options of a plain LSTM: any other value changes the step's maths.
_PLAIN = {
    "peephole": False,
    "coupled": False,
    "input_gate": True,
    "forget_gate": True,
    "output_gate": True,
    "gate_recurrence": False,
    "proj_size": None,
    "layer_norm": False,
    "cell_clip": None,
    "proj_clip": None,
}

# The LSTM options implementation="vjp" computes too (the peephole and CIFG LSTMs).
_VJP_EXTRA = ("peephole", "coupled")

# The options of the GRU that implementation="vjp" computes.
_DEFAULT_GRU = {"reset_after": True, "layer_norm": False}


def cell_reason(cell: Cell, implementation: str = "cudnn") -> str | None:
    """Why ``cell`` cannot run with ``implementation`` (``None`` if it can), from its recorded
    options: both fast paths compute the plain LSTM (cuDNN in float32; ``"vjp"`` in any
    compute dtype), and ``"vjp"`` also its peephole and CIFG variants and the default GRU
    (``reset_after=True``, no layer norm)."""
    what = "cuDNN runs" if implementation == "cudnn" else f'implementation="{implementation}" covers'
    options = cell.options
    if implementation == "vjp" and cell.name == "gru" and options is not None:
        odd = {k: options[k] for k, v in _DEFAULT_GRU.items() if options[k] != v}
        return f"{what} the GRU with reset_after=True and no layer norm only; this cell has {odd}" if odd else None
    if options is None or not all(k in options for k in _PLAIN):  # not the LSTM family (e.g. conv_lstm)
        plain = "LSTM (plain, peephole, CIFG) and the GRU" if implementation == "vjp" else "plain LSTM"
        return f"{what} the {plain} only, and {cell.name!r} is not one"
    covered = _PLAIN if implementation == "cudnn" else {k: v for k, v in _PLAIN.items() if k not in _VJP_EXTRA}
    odd = {k: options[k] for k, v in covered.items() if options[k] is not v and options[k] != v}
    if options["input_activation"] is not jnp.tanh or options["output_activation"] is not jnp.tanh:
        odd["activations"] = "not tanh"
    if implementation == "cudnn":
        if options["dtype"] not in (None, jnp.float32) or options["param_dtype"] not in (jnp.float32, "float32"):
            odd["dtype"] = f"{options['dtype']}/{options['param_dtype']}"
    if odd:
        if implementation == "vjp":
            return f"{what} the plain, peephole and CIFG LSTMs only; this cell has {odd}"
        return f"{what} the plain float32 LSTM only; this cell has {odd}"
    return None


def backend_reason() -> str | None:
    """Why this process cannot call cuDNN (``None`` if it can)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"cuDNN needs an NVIDIA GPU, and JAX's default backend is {backend!r}"
    try:
        from jax.experimental import rnn as jrnn
    except ImportError as e:  # pragma: no cover - depends on the jaxlib build
        return f"jax.experimental.rnn is not importable ({e})"
    if getattr(jrnn, "gpu_rnn", None) is None:  # pragma: no cover - a ROCm or CPU-only jaxlib
        return "this jaxlib has no cuDNN RNN kernels (jax.experimental.rnn.gpu_rnn is missing)"
    return None


def warn(reason: str, implementation: str = "cudnn") -> None:
    warnings.warn(
        f'rnn(..., implementation="{implementation}") fell back to the lax.scan implementation: {reason}. '
        "The results are the same; only the speed differs.",
        FallbackWarning,
        stacklevel=4,
    )


def pack_weights(params: Any) -> jax.Array:
    """Our :class:`~recurrent.LSTMParams` as cuDNN's flat weight vector (one layer, one direction)."""
    bias = params.bias
    return jnp.concatenate(
        [params.input_kernel.T.ravel(), params.recurrent_kernel.T.ravel(), bias, jnp.zeros_like(bias)]
    )


def apply(params: Any, xs_BTF: jax.Array, lengths_B: jax.Array | None, carry: LSTMState):
    """One plain LSTM layer through ``jax.experimental.rnn.lstm``: ``(carry, ys)`` with our
    semantics (outputs zero after each length; a zero-length sequence keeps its carry).

    Raises ``NotImplementedError`` where JAX cannot bind the cuDNN primitive (under ``vmap``);
    the driver catches it and falls back."""
    from jax.experimental import rnn as jrnn

    B, T, F = xs_BTF.shape
    H = params.recurrent_kernel.shape[0]
    lengths = jnp.full((B,), T, jnp.int32) if lengths_B is None else lengths_B.astype(jnp.int32)
    ys, h, c = jrnn.lstm(
        xs_BTF,
        carry.h[None],
        carry.c[None],
        pack_weights(params),
        jnp.maximum(lengths, 1),  # cuDNN needs lengths >= 1; zero-length rows are restored below
        input_size=F,
        hidden_size=H,
        num_layers=1,
        dropout=0.0,
        bidirectional=False,
    )
    if lengths_B is not None:
        empty = (lengths == 0)[:, None]
        h, c = jnp.where(empty, carry.h, h[0]), jnp.where(empty, carry.c, c[0])
        ys = jnp.where((jnp.arange(T)[None, :] < lengths[:, None])[..., None], ys, 0)
    else:
        h, c = h[0], c[0]
    return LSTMState(h.astype(carry.h.dtype), c.astype(carry.c.dtype)), ys
