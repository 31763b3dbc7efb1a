"""Independent float64 NumPy references for every cell, written from the papers' equations.

Nothing here imports ``recurrent``: each function runs a whole sequence with a plain Python
loop over time, takes the parameters as plain arrays and slices the fused gate blocks itself,
following the documented layout (row vectors, ``pre-activation = x @ W + h @ U + b``, gate
blocks along the last axis).

Shapes: ``xs (B, T, F)`` (``(B, T, *S, C)`` for ConvLSTM); every function returns
``(ys, final_carry)`` with ``ys (B, T, H)`` (``(B, T, *S, H)``) and the final carry as a tuple
``(h, c)`` for the LSTM family or ``h`` for the GRU. ``h0``/``c0`` default to zeros.
"""

from __future__ import annotations

import itertools

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _f64(*arrays):
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def _split(a, n):
    """The ``n`` gate blocks of a fused array, along its last axis."""
    size = a.shape[-1] // n
    return [a[..., k * size : (k + 1) * size] for k in range(n)]


def _zeros_state(xs, H, spatial=()):
    return np.zeros((xs.shape[0], *spatial, H), np.float64)


# --------------------------------------------------------------------------------------
# LSTM family


def lstm(xs, input_kernel, recurrent_kernel, bias, *, h0=None, c0=None):
    """Hochreiter & Schmidhuber (1997) with the forget gate of Gers, Schmidhuber & Cummins (2000).

    i = σ(W_i x + U_i h + b_i), f = σ(W_f x + U_f h + b_f), g = tanh(W_g x + U_g h + b_g),
    o = σ(W_o x + U_o h + b_o); c' = f c + i g; h' = o tanh(c'). Blocks in order (i, f, g, o).
    """
    return peephole_lstm(xs, input_kernel, recurrent_kernel, bias, None, None, None, h0=h0, c0=c0)


def peephole_lstm(
    xs, input_kernel, recurrent_kernel, bias, peephole_input, peephole_forget, peephole_output, *, h0=None, c0=None
):
    """Gers & Schmidhuber (2000): diagonal peepholes; i and f see c(t-1), o sees c(t).

    Peephole vectors may be ``None`` (no connection), which gives the plain LSTM.
    """
    xs, W, U, b, p_i, p_f, p_o, h, c = _f64(
        xs, input_kernel, recurrent_kernel, bias, peephole_input, peephole_forget, peephole_output, h0, c0
    )
    H = U.shape[0]
    W_i, W_f, W_g, W_o = _split(W, 4)
    U_i, U_f, U_g, U_o = _split(U, 4)
    b_i, b_f, b_g, b_o = _split(b, 4)
    h = _zeros_state(xs, H) if h is None else h
    c = _zeros_state(xs, H) if c is None else c
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        a_i = x @ W_i + h @ U_i + b_i
        a_f = x @ W_f + h @ U_f + b_f
        if p_i is not None:
            a_i = a_i + p_i * c
        if p_f is not None:
            a_f = a_f + p_f * c
        i, f = sigmoid(a_i), sigmoid(a_f)
        g = np.tanh(x @ W_g + h @ U_g + b_g)
        c = f * c + i * g
        a_o = x @ W_o + h @ U_o + b_o
        if p_o is not None:
            a_o = a_o + p_o * c
        o = sigmoid(a_o)
        h = o * np.tanh(c)
        ys.append(h)
    return _stack(ys, xs, H), (h, c)


def cifg_lstm(
    xs, input_kernel, recurrent_kernel, bias, peephole_forget=None, peephole_output=None, *, h0=None, c0=None
):
    """Coupled input and forget gate LSTM (Greff et al. 2017, "LSTM: A Search Space Odyssey").

    Three blocks in order (f, g, o); the input gate is i = 1 - f. Optional peepholes
    p_f (sees c(t-1)) and p_o (sees c(t)).
    """
    xs, W, U, b, p_f, p_o, h, c = _f64(
        xs, input_kernel, recurrent_kernel, bias, peephole_forget, peephole_output, h0, c0
    )
    H = U.shape[0]
    W_f, W_g, W_o = _split(W, 3)
    U_f, U_g, U_o = _split(U, 3)
    b_f, b_g, b_o = _split(b, 3)
    h = _zeros_state(xs, H) if h is None else h
    c = _zeros_state(xs, H) if c is None else c
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        a_f = x @ W_f + h @ U_f + b_f
        if p_f is not None:
            a_f = a_f + p_f * c
        f = sigmoid(a_f)
        i = 1.0 - f
        g = np.tanh(x @ W_g + h @ U_g + b_g)
        c = f * c + i * g
        a_o = x @ W_o + h @ U_o + b_o
        if p_o is not None:
            a_o = a_o + p_o * c
        h = sigmoid(a_o) * np.tanh(c)
        ys.append(h)
    return _stack(ys, xs, H), (h, c)


# --------------------------------------------------------------------------------------
# GRU


def gru(xs, input_kernel, recurrent_kernel, bias, recurrent_bias=None, *, reset_after=True, h0=None):
    """Gated recurrent unit (Cho et al. 2014). Blocks in order (r, z, n).

    r = σ(W_r x + U_r h + b_r), z = σ(W_z x + U_z h + b_z),
    reset_after=True  (cuDNN form): n = tanh(W_n x + b_n + r ⊙ (U_n h + b_hn)),
    reset_after=False (Cho 2014):   n = tanh(W_n x + b_n + U_n (r ⊙ h));
    h' = (1 - z) ⊙ n + z ⊙ h. ``recurrent_bias`` (b_hn) only exists with reset_after.
    """
    xs, W, U, b, b_hn, h = _f64(xs, input_kernel, recurrent_kernel, bias, recurrent_bias, h0)
    H = U.shape[0]
    W_r, W_z, W_n = _split(W, 3)
    U_r, U_z, U_n = _split(U, 3)
    b_r, b_z, b_n = _split(b, 3)
    if b_hn is None:
        b_hn = np.zeros(H)
    h = _zeros_state(xs, H) if h is None else h
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        r = sigmoid(x @ W_r + h @ U_r + b_r)
        z = sigmoid(x @ W_z + h @ U_z + b_z)
        if reset_after:
            n = np.tanh(x @ W_n + b_n + r * (h @ U_n + b_hn))
        else:
            n = np.tanh(x @ W_n + b_n + (r * h) @ U_n)
        h = (1.0 - z) * n + z * h
        ys.append(h)
    return _stack(ys, xs, H), h


# --------------------------------------------------------------------------------------
# ConvLSTM


def same_conv(x, kernel):
    """'SAME' cross-correlation, stride 1, channels last, by explicit sliding windows.

    ``x (B, *S, C)``, ``kernel (*K, C, O)`` -> ``(B, *S, O)``. Each spatial axis of size k is
    zero-padded with ``(k - 1) // 2`` on the low side and ``k // 2`` on the high side (XLA's
    'SAME' rule, which matters for even k), then
    ``y[b, s, o] = sum_{d, c} xpad[b, s + d, c] * kernel[d, c, o]`` over kernel offsets ``d``.
    """
    x, kernel = _f64(x, kernel)
    K = kernel.shape[:-2]
    n = len(K)
    S = x.shape[1 : 1 + n]
    pad = [(0, 0)] + [((k - 1) // 2, k // 2) for k in K] + [(0, 0)]
    xpad = np.pad(x, pad)
    y = np.zeros((x.shape[0], *S, kernel.shape[-1]), np.float64)
    for offset in itertools.product(*(range(k) for k in K)):
        window = xpad[(slice(None), *(slice(d, d + s) for d, s in zip(offset, S)), slice(None))]
        y += window @ kernel[offset]
    return y


def conv_lstm(
    xs,
    input_kernel,
    recurrent_kernel,
    bias,
    peephole_input=None,
    peephole_forget=None,
    peephole_output=None,
    *,
    h0=None,
    c0=None,
):
    """Convolutional LSTM (Shi et al. 2015), 1, 2 or 3 spatial axes (``len(K)``).

    i = σ(W_xi * X + W_hi * H + W_ci ∘ C(t-1) + b_i), f = σ(W_xf * X + W_hf * H + W_cf ∘ C(t-1) + b_f),
    C(t) = f ∘ C(t-1) + i ∘ tanh(W_xc * X + W_hc * H + b_c), o = σ(W_xo * X + W_ho * H + W_co ∘ C(t) + b_o),
    H(t) = o ∘ tanh(C(t)); ``*`` is :func:`same_conv`, blocks in order (i, f, g, o), peepholes
    ``(*S, H)`` or ``None``.
    """
    xs, W, U, b, p_i, p_f, p_o, h, c = _f64(
        xs, input_kernel, recurrent_kernel, bias, peephole_input, peephole_forget, peephole_output, h0, c0
    )
    n = W.ndim - 2
    H = U.shape[-2]
    S = xs.shape[2 : 2 + n]
    W_i, W_f, W_g, W_o = _split(W, 4)
    U_i, U_f, U_g, U_o = _split(U, 4)
    b_i, b_f, b_g, b_o = _split(b, 4)
    h = _zeros_state(xs, H, S) if h is None else h
    c = _zeros_state(xs, H, S) if c is None else c
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        a_i = same_conv(x, W_i) + same_conv(h, U_i) + b_i
        a_f = same_conv(x, W_f) + same_conv(h, U_f) + b_f
        if p_i is not None:
            a_i = a_i + p_i * c
        if p_f is not None:
            a_f = a_f + p_f * c
        g = np.tanh(same_conv(x, W_g) + same_conv(h, U_g) + b_g)
        c = sigmoid(a_f) * c + sigmoid(a_i) * g
        a_o = same_conv(x, W_o) + same_conv(h, U_o) + b_o
        if p_o is not None:
            a_o = a_o + p_o * c
        h = sigmoid(a_o) * np.tanh(c)
        ys.append(h)
    return _stack(ys, xs, H, S), (h, c)


# --------------------------------------------------------------------------------------
# Variable lengths


def with_lengths(reference, xs, lengths, *args, **kwargs):
    """Runs ``reference`` on each sequence's first ``lengths[b]`` steps separately.

    Outputs past a sequence's length are zero; its final carry is the carry after its last
    valid step (the initial carry, zeros, for length 0). Returns ``(ys, final_carry)`` like the
    references, with the carries of the sequences stacked along the batch axis.
    """
    xs = np.asarray(xs, np.float64)
    ys_all, carries = None, []
    for b, length in enumerate(np.asarray(lengths)):
        ys, carry = reference(xs[b : b + 1, : int(length)], *args, **kwargs)
        if ys_all is None:
            ys_all = np.zeros((xs.shape[0], xs.shape[1], *ys.shape[2:]), np.float64)
        ys_all[b, : int(length)] = ys[0]
        carries.append(carry)
    stack = lambda *parts: np.concatenate(parts, axis=0)  # noqa: E731
    if isinstance(carries[0], tuple):
        final = tuple(stack(*parts) for parts in zip(*carries))
    else:
        final = stack(*carries)
    return ys_all, final


def _stack(ys, xs, H, spatial=()):
    if ys:
        return np.stack(ys, axis=1)
    return np.zeros((xs.shape[0], 0, *spatial, H), np.float64)
