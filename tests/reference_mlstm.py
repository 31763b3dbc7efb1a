"""An independent float64 NumPy reference of xLSTM's mLSTM, written from the paper's equations.

Nothing here imports ``recurrent``. The recurrence runs on the paper's *unstabilised* memory, in the
paper's layout (Beck et al. 2024, Section 2.3), one head at a time, with a plain Python loop over
time:

    C_t = f_t C_{t-1} + i_t v_t k_t^T           (D x D: rows index v, columns k)
    n_t = f_t n_{t-1} + i_t k_t
    h~_t = C_t q_t / max(|n_t^T q_t|, 1)

with i_t = exp(i~_t) and f_t = sigmoid(f~_t) (or exp(f~_t)), q, k, v, i~, f~ linear in x_t (k scaled
by 1/sqrt(D)), and y_t = o_t * LN(h~_t). The stabiliser m_t = max(log f_t + m_{t-1}, log i_t) of the
paper's appendix is tracked beside it only for two things: the epsilon the official code adds to
the stabilised denominator, which in unstabilised units is ``eps * exp(m_t)``, and the carry the
library returns, which is the stabilised memory ``exp(-m_t) C_t^T`` (the official layout, k by v).

Parameters are taken as plain arrays with the documented layout: ``input_kernel (F, 3H or 4H)``
with blocks (q, k, v, o), ``gate_kernel (F or 3H, 2N)`` with blocks (i, f), one column per head.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def mlstm_reference(
    xs,
    *,
    input_kernel,
    input_bias,
    gate_kernel,
    gate_bias,
    norm_scale=None,
    num_heads,
    forget_gate="sigmoid",
    gates_from="input",
    output_gate=True,
    layer_norm_epsilon=1e-5,
    gate_soft_cap=None,
    eps=1e-6,
    carry=None,
):
    """One sequence ``xs (T, F)`` from ``carry = (C (N, D, D), n (N, D), m (N,))`` in the library's
    stabilised layout (zeros by default). Returns ``(ys (T, H), (C, n, m))``, the carry likewise."""
    xs = _f64(xs)
    W, bW, G, bG, scale = map(_f64, (input_kernel, input_bias, gate_kernel, gate_bias, norm_scale))
    N = num_heads
    H = W.shape[1] // (4 if output_gate else 3)
    D = H // N
    if carry is None:
        carry = (np.zeros((N, D, D)), np.zeros((N, D)), np.zeros(N))
    C_s, n_s, m = (_f64(a).copy() for a in carry)
    # the unstabilised memory of the paper, in its layout (v by k)
    C = np.stack([np.exp(m[j]) * C_s[j].T for j in range(N)])
    n = np.stack([np.exp(m[j]) * n_s[j] for j in range(N)])
    ys = []
    for x in xs:
        z = x @ W + bW
        q, k_raw, v = z[:H], z[H : 2 * H], z[2 * H : 3 * H]
        gate_in = x if gates_from == "input" else np.concatenate([q, k_raw, v])
        pre = gate_in @ G + bG
        if gate_soft_cap is not None:
            pre = gate_soft_cap * np.tanh(pre / gate_soft_cap)
        i_pre, f_pre = pre[:N], pre[N:]
        log_f = -np.logaddexp(0.0, -f_pre) if forget_gate == "sigmoid" else f_pre
        h = np.zeros(H)
        for j in range(N):
            s = slice(j * D, (j + 1) * D)
            qj, kj, vj = q[s], k_raw[s] / np.sqrt(D), v[s]
            i, f = np.exp(i_pre[j]), np.exp(log_f[j])
            C[j] = f * C[j] + i * np.outer(vj, kj)
            n[j] = f * n[j] + i * kj
            m[j] = max(log_f[j] + m[j], i_pre[j])
            h_tilde = C[j] @ qj / (max(abs(n[j] @ qj), 1.0) + eps * np.exp(m[j]))
            if scale is not None:
                h_tilde = (h_tilde - h_tilde.mean()) / np.sqrt(h_tilde.var() + layer_norm_epsilon)
            h[s] = h_tilde
        if scale is not None:
            h = h * scale
        if output_gate:
            h = h / (1.0 + np.exp(-z[3 * H : 4 * H]))
        ys.append(h)
    carry = (
        np.stack([np.exp(-m[j]) * C[j].T for j in range(N)]),
        np.stack([np.exp(-m[j]) * n[j] for j in range(N)]),
        m,
    )
    return np.stack(ys) if ys else np.zeros((0, H)), carry
