"""Independent float64 NumPy references for xLSTM's cells (Beck et al. 2024, "xLSTM: Extended Long
Short-Term Memory", NeurIPS), written from the paper's equations.

Nothing here imports ``recurrent``. Every function runs a whole sequence with a plain Python loop
over time, takes plain arrays and slices the fused gate blocks itself, following the documented
layout: row vectors, pre-activations ``x @ W + (R h) + b``, gate blocks along the last axis.
Shapes: ``xs (B, T, F)``; every function returns ``(ys (B, T, H), final_state)``.
"""

from __future__ import annotations

import numpy as np

# ======================================================================================
# sLSTM (paper, section 2.2 and the appendix on the stabilised sLSTM)
#
#   z~, i~, f~, o~ = W x_t + R h_{t-1} + b      R block-diagonal: head k's units of h(t-1) feed
#                                               only head k's units of each gate
#   z_t = tanh(z~), i_t = exp(i~), f_t = sigmoid(f~) or exp(f~), o_t = sigmoid(o~)
#   m_t = max(log f_t + m_{t-1}, log i_t)
#   i'_t = exp(log i_t - m_t), f'_t = exp(log f_t + m_{t-1} - m_t)
#   c_t = f'_t c_{t-1} + i'_t z_t,  n_t = f'_t n_{t-1} + i'_t,  h_t = o_t c_t / n_t
#
# Gate blocks in the order (i, f, z, o), each of H units; unit j belongs to head j // D
# (D = H / K). The recurrent weights of head k are R[k] (D, 4D), its columns the same four
# gate blocks of D units. The stabiliser starts where the state is empty (n(t-1) = 0) at
# m_t = log i_t, and i', f' are clamped to 1 (the official xlstm code's conventions).
# ======================================================================================

SLSTM_GATE_ORDER = ("i", "f", "z", "o")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def slstm_recurrent(h, R):
    """``R h`` of a block-diagonal ``R`` given per head ``R (K, D, 4D)``: the ``(B, 4H)``
    pre-activations, gate-major ``[gate][head][unit]``."""
    K, D, _ = R.shape
    out = np.zeros((h.shape[0], 4, K, D), h.dtype)
    for k in range(K):
        head = h[:, k * D : (k + 1) * D] @ R[k]  # (B, 4D): [gate][unit]
        for g in range(4):
            out[:, g, k] = head[:, g * D : (g + 1) * D]
    return out.reshape(h.shape[0], 4 * K * D)


def slstm_dense_recurrent_kernel(R):
    """The block-diagonal ``(H, 4H)`` matrix of per-head ``R (K, D, 4D)`` (zeros off the heads)."""
    K, D, _ = R.shape
    H = K * D
    dense = np.zeros((H, 4 * H))
    for k in range(K):
        for g in range(4):
            dense[k * D : (k + 1) * D, g * H + k * D : g * H + (k + 1) * D] = R[k][:, g * D : (g + 1) * D]
    return dense


def slstm(xs, *, W, R, b, forget_gate="sigmoid", h0=None, c0=None, n0=None, m0=None, zoneout=None, every_step=False):
    """The stabilised sLSTM over ``xs (B, T, F)``. ``W (F, 4H)``, ``R (K, D, 4D)``, ``b (4H,)``.
    The initial state is zeros unless given. Returns ``(ys, (h, c, n, m))``, with every step's
    state ``(B, T, H)`` instead of the last one when ``every_step``.

    ``zoneout``: optional ``(d_h, d_c)`` sequences of ``(B, H)`` arrays (one pair per step): ``h``
    becomes ``d_h h_old + (1 - d_h) h_new``; the memory is mixed in unstabilised terms,
    ``C = d_c C_old + (1 - d_c) C_new`` with ``C = c e^m``, ``N`` likewise (an empty old state,
    ``n = 0``, holds ``C = N = 0``), and stored with ``m = log N``, ``n = 1``, ``c = C / N``
    unless ``d_c`` is 0 or 1, which keep one memory as it is."""
    xs, W, R, b = (np.asarray(a, np.float64) for a in (xs, W, R, b))
    B, T, _ = xs.shape
    H = R.shape[0] * R.shape[1]
    zeros = np.zeros((B, H))
    h, c, n, m = (zeros.copy() if v is None else np.array(v, np.float64) for v in (h0, c0, n0, m0))
    ys, states = [], []
    for t in range(T):
        pre = xs[:, t] @ W + slstm_recurrent(h, R) + b
        zi, zf, zz, zo = (pre[:, g * H : (g + 1) * H] for g in range(4))
        log_i = zi
        log_f = _log_sigmoid(zf) if forget_gate == "sigmoid" else zf
        m_new = np.where(n == 0, log_i, np.maximum(log_f + m, log_i))
        i_s = np.minimum(np.exp(log_i - m_new), 1.0)
        with np.errstate(over="ignore"):  # the clamp: exp may overflow on an empty state
            f_s = np.minimum(np.exp(log_f + m - m_new), 1.0)
        c_new = f_s * c + i_s * np.tanh(zz)
        n_new = f_s * n + i_s
        h_new = _sigmoid(zo) * c_new / n_new
        if zoneout is not None:
            d_h, d_c = (np.asarray(a, np.float64) for a in zoneout[t])
            h_new = d_h * h + (1 - d_h) * h_new
            c_new, n_new, m_new = _slstm_zoneout_memory(d_c, (c, n, m), (c_new, n_new, m_new))
        h, c, n, m = h_new, c_new, n_new, m_new
        ys.append(h)
        states.append((h, c, n, m))
    if every_step:
        return np.stack(ys, 1), tuple(np.stack(s, 1) for s in zip(*states))
    return np.stack(ys, 1), (h, c, n, m)


def _slstm_zoneout_memory(d, old, new):
    """The zoneout of the memory, in unstabilised terms (see :func:`slstm`), float64."""
    (c_o, n_o, m_o), (c_n, n_n, m_n) = old, new
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # in branches not taken
        C = np.where(n_o == 0, 0.0, d * c_o * np.exp(m_o)) + (1 - d) * c_n * np.exp(m_n)
        N = np.where(n_o == 0, 0.0, d * n_o * np.exp(m_o)) + (1 - d) * n_n * np.exp(m_n)
        mixed = (C / N, np.ones_like(N), np.log(N))
    return tuple(np.where(d == 1, o, np.where(d == 0, nw, x)) for o, nw, x in zip(old, new, mixed))


def slstm_unstabilised(xs, *, W, R, b, forget_gate="sigmoid", dtype=np.float64):
    """The sLSTM without the stabiliser, straight from the paper's first equations:
    ``c_t = f_t c_{t-1} + i_t z_t``, ``n_t = f_t n_{t-1} + i_t``, ``h_t = o_t c_t / n_t`` with
    ``i = exp(i~)``, computed in ``dtype``. In float64 it overflows only for pre-activations above
    about 709 (in float32 above about 88); returns ``(ys, (h, c, n))``."""
    xs, W, R, b = (np.asarray(a, dtype) for a in (xs, W, R, b))
    B, T, _ = xs.shape
    H = R.shape[0] * R.shape[1]
    h, c, n = np.zeros((B, H), dtype), np.zeros((B, H), dtype), np.zeros((B, H), dtype)
    ys = []
    for t in range(T):
        pre = xs[:, t] @ W + slstm_recurrent(h, R) + b
        zi, zf, zz, zo = (pre[:, g * H : (g + 1) * H] for g in range(4))
        i = np.exp(zi)
        f = _sigmoid(zf) if forget_gate == "sigmoid" else np.exp(zf)
        c = f * c + i * np.tanh(zz)
        n = f * n + i
        h = _sigmoid(zo) * c / n
        ys.append(h)
    return np.stack(ys, 1), (h, c, n)
