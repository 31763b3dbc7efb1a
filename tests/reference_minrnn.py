"""Independent float64 NumPy references of minGRU and minLSTM, written from the equations of
Feng et al. 2024, "Were RNNs All We Needed?" (Sections 3.1-3.2, and the appendix's ``g``).

Nothing here imports ``recurrent``: each function runs a whole sequence with a plain Python loop
over time (the sequential mode), takes the parameters as plain arrays and slices the fused
blocks itself, following the documented layout (row vectors, ``pre-activation = x @ W + b``,
blocks along the last axis: minGRU ``(z, candidate)``, minLSTM ``(f, i, candidate)``).

Shapes: ``xs (B, T, F)``; every function returns ``(ys, h)`` with ``ys (B, T, H)`` and the final
state ``h (B, H)``. ``h0`` defaults to zeros; ``lengths`` (optional, ``(B,)``) stops each
sequence after its first ``lengths[b]`` steps (its later outputs zero, its state kept).
"""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def g(x):
    """The appendix's candidate activation: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below."""
    return np.where(x >= 0, x + 0.5, sigmoid(np.minimum(x, 0.0)))


CANDIDATES = {"g": g, "linear": lambda x: x}


def _run(step, xs, W, b, blocks, h0, lengths):
    xs, W, b = (np.asarray(a, np.float64) for a in (xs, W, b))
    B, T, _ = xs.shape
    H = W.shape[1] // blocks
    h = np.zeros((B, H)) if h0 is None else np.array(h0, np.float64)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    ys = np.zeros((B, T, H))
    for t in range(T):
        k = xs[:, t] @ W + b
        new = step(*(k[:, j * H : (j + 1) * H] for j in range(blocks)), h)
        valid = (t < lengths)[:, None]
        h = np.where(valid, new, h)
        ys[:, t] = np.where(valid, new, 0.0)
    return ys, h


def min_gru(xs, input_kernel, bias, *, h0=None, lengths=None, candidate="g"):
    """z = σ(W_z x + b_z), h~ = g(W_h x + b_h) (or no activation), h' = (1 - z) h + z h~."""
    act = CANDIDATES[candidate]

    def step(k_z, k_h, h):
        z = sigmoid(k_z)
        return (1.0 - z) * h + z * act(k_h)

    return _run(step, xs, input_kernel, bias, 2, h0, lengths)


def min_lstm(xs, input_kernel, bias, *, h0=None, lengths=None, candidate="g"):
    """f = σ(W_f x + b_f), i = σ(W_i x + b_i), h~ = g(W_h x + b_h) (or no activation);
    f' = f / (f + i), i' = i / (f + i), h' = f' h + i' h~."""
    act = CANDIDATES[candidate]

    def step(k_f, k_i, k_h, h):
        f, i = sigmoid(k_f), sigmoid(k_i)
        return f / (f + i) * h + i / (f + i) * act(k_h)

    return _run(step, xs, input_kernel, bias, 3, h0, lengths)
