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

from typing import Any

import jax
import jax.numpy as jnp

from recurrent import _kernels
from recurrent._core import Cell, LSTMState

IMPLEMENTATIONS = _kernels.IMPLEMENTATIONS
FallbackWarning = _kernels.FallbackWarning


def cell_reason(cell: Cell, implementation: str = "cudnn") -> str | None:
    """Why ``cell`` cannot run with ``implementation`` (``None`` if it can), as its spec declares."""
    kernel = _kernels.declared(cell.spec, cell.name, implementation)
    return kernel if isinstance(kernel, str) else None


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
