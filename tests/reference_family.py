"""Independent float64 NumPy references for the options of the LSTM family, the GRU with layer
normalisation and the convolutional cells, written from the papers' equations.

Nothing here imports ``recurrent``. Every function runs a whole sequence with a plain Python loop
over time, takes its parameters as plain arrays (keyword arguments) and slices the fused gate
blocks itself, following the documented layout: row vectors, ``pre-activation = x @ W + h @ U + b``,
gate blocks along the last axis in the order (i, f, g, o) for the LSTM family with absent gates
dropped, (r, z, n) for the GRU.

Sources of the equations:

- LSTM with forget gate and peepholes, the "vanilla" LSTM of Greff et al. 2017 ("LSTM: A Search
  Space Odyssey", eqs. 1-6): i and f see c(t-1) through diagonal peepholes, o sees c(t).
  Greff's variants: NIG (i = 1), NFG (f = 1), NOG (o = 1), NIAF (g without its activation), NOAF
  (h = o * c), NP (no peepholes), CIFG (i = 1 - f), FGR (the sigmoid gates at t-1 feed every
  sigmoid gate at t: a_gate(t) += [i, f, o](t-1) @ R_gate).
- Projection (LSTMP, Sak et al. 2014): m = o * act(c); h = m @ P, and h is the recurrent input.
- Layer normalisation (Ba et al. 2016, section 3.1): pre-activations
  LN(x W; g_x) + LN(h U; g_h) + b, each LN over all gate pre-activations of a step; the output
  h = o * act(LN(c; g_c, b_c)); the carried cell state is the un-normalised c.
- Clipping (TensorFlow's LSTMCell, also TFLite): c is clipped right after its update (the output
  gate's peephole reads the clipped value), the projected output is clipped.
- GRU (Cho et al. 2014; the cuDNN/PyTorch ``reset_after`` form) with layer norm on W x (all 3H)
  and on the recurrent pre-activations: with reset_after the 3H of h U together; without it
  U_{rz} h and U_n (r h) separately.
- ConvLSTM (Shi et al. 2015) and ConvGRU (Ballas et al. 2016): the same equations with 'same'
  convolutions; layer normalisation over each step's spatial and channel axes with a gain (and
  for c an offset) per channel.

Shapes: ``xs (B, T, F)`` (``(B, T, *S, C)`` for the convolutional cells). Every function
returns ``(ys, final_carry)`` with ``ys (B, T, out)`` and the final carry a tuple ``(h, c)``
(``(h, c, gates)`` with full gate recurrence) for the LSTMs or ``h`` for the GRUs.
"""

from __future__ import annotations

import numpy as np

from tests.reference import same_conv


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def identity(x):
    return x


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _blocks(a, names):
    """The gate blocks of a fused array (last axis), as a dict from gate name."""
    size = a.shape[-1] // len(names)
    return {n: a[..., k * size : (k + 1) * size] for k, n in enumerate(names)}


def layer_norm(v, scale, offset=None, *, axes=(-1,), eps=1e-5):
    """(v - mean) / sqrt(var + eps) * scale (+ offset), statistics over ``axes``."""
    mean = v.mean(axis=axes, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (v - mean) / np.sqrt(var + eps) * scale
    return out if offset is None else out + offset


def _stack(ys, B, out_shape):
    if ys:
        return np.stack(ys, axis=1)
    return np.zeros((B, 0, *out_shape), np.float64)


# --------------------------------------------------------------------------------------
# The LSTM family


def lstm(
    xs,
    *,
    W,
    U,
    b,
    p_i=None,
    p_f=None,
    p_o=None,
    R=None,
    P=None,
    ln=None,
    input_gate=True,
    forget_gate=True,
    output_gate=True,
    coupled=False,
    input_activation=np.tanh,
    output_activation=np.tanh,
    cell_clip=None,
    proj_clip=None,
    eps=1e-5,
    h0=None,
    c0=None,
    gates0=None,
    conv=False,
):
    """The LSTM family, every option at once.

    Args:
      xs: ``(B, T, F)``, or ``(B, T, *S, C)`` with ``conv``.
      W, U, b: ``(F, G*H)``, ``(Rin, G*H)``, ``(G*H,)``; the blocks present in order (i, f, g, o):
        i only when ``input_gate and not coupled``, f only with ``forget_gate``, o only with
        ``output_gate``. With ``conv``: ``(*K, C, G*H)``, ``(*K, H, G*H)``, ``(G*H,)``.
      p_i, p_f, p_o: diagonal peepholes ``(H,)`` or ``None`` (``(*S, H)`` Hadamard peepholes
        with ``conv``).
      R: full gate recurrence ``(S*H, S*H)`` from the sigmoid gates at t-1, concatenated in the
        order (i, f, o) of those computed by a sigmoid, to the same gates at t; or ``None``.
      P: projection ``(H, P)`` or ``None``.
      ln: ``(g_x (G*H,), g_h (G*H,), g_c (H,), b_c (H,))`` for layer normalisation, or ``None``.
      input_gate, forget_gate, output_gate, coupled: which gates exist (coupled: i = 1 - f).
      input_activation, output_activation: act of g and of the cell output (``identity`` for
        Greff's NIAF / NOAF).
      cell_clip, proj_clip: clipping bounds or ``None``.
      h0, c0, gates0: initial carry (zeros by default).
      conv: ConvLSTM (Shi et al. 2015): every ``x @ W`` and ``h @ U`` becomes the 'same'
        convolution ``same_conv``, and layer norm takes its statistics over each step's spatial
        and channel axes (the gains are per channel). ``R`` and ``P`` have no convolutional form.
    """
    xs, W, U, b = _f64(xs), _f64(W), _f64(U), _f64(b)
    p_i, p_f, p_o, R, P = _f64(p_i), _f64(p_f), _f64(p_o), _f64(R), _f64(P)
    has_i = input_gate and not coupled
    names = [n for n, present in (("i", has_i), ("f", forget_gate), ("g", True), ("o", output_gate)) if present]
    sig = [n for n in ("i", "f", "o") if n in names]
    H = W.shape[-1] // len(names)
    B = xs.shape[0]
    S = xs.shape[2:-1] if conv else ()  # spatial axes
    assert not (conv and (R is not None or P is not None)), "no convolutional gate recurrence or projection"
    transform = same_conv if conv else np.matmul
    step_axes = tuple(range(1, 2 + len(S)))  # a step's (spatial and) feature axes
    Wb, Ub, bb = _blocks(W, names), _blocks(U, names), _blocks(b, names)
    if ln is not None:
        g_x, g_h, g_c, b_c = (_f64(a) for a in ln)
    out_size = H if P is None else P.shape[1]
    h = np.zeros((B, *S, out_size)) if h0 is None else _f64(h0)
    c = np.zeros((B, *S, H)) if c0 is None else _f64(c0)
    gates = np.zeros((B, *S, len(sig) * H)) if gates0 is None else _f64(gates0)
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        if ln is None:
            a = {n: transform(x, Wb[n]) + transform(h, Ub[n]) + bb[n] for n in names}
        else:
            ax = _blocks(layer_norm(transform(x, W), g_x, axes=step_axes, eps=eps), names)
            ah = _blocks(layer_norm(transform(h, U), g_h, axes=step_axes, eps=eps), names)
            a = {n: ax[n] + ah[n] + bb[n] for n in names}
        if R is not None:
            extra = _blocks(gates @ R, sig)
            for n in sig:
                a[n] = a[n] + extra[n]
        f = sigmoid(a["f"] + (0.0 if p_f is None else p_f * c)) if forget_gate else np.ones_like(c)
        if coupled:
            i = 1.0 - f
        elif input_gate:
            i = sigmoid(a["i"] + (0.0 if p_i is None else p_i * c))
        else:
            i = np.ones_like(c)
        g = input_activation(a["g"])
        c = f * c + i * g
        if cell_clip is not None:
            c = np.clip(c, -cell_clip, cell_clip)
        o = sigmoid(a["o"] + (0.0 if p_o is None else p_o * c)) if output_gate else np.ones_like(c)
        c_hat = c if ln is None else layer_norm(c, g_c, b_c, axes=step_axes, eps=eps)
        m = o * output_activation(c_hat)
        if P is not None:
            m = m @ P
            if proj_clip is not None:
                m = np.clip(m, -proj_clip, proj_clip)
        h = m
        values = {"i": i, "f": f, "o": o}
        gates = np.concatenate([values[n] for n in sig], axis=-1) if sig else gates
        ys.append(h)
    carry = (h, c, gates) if R is not None else (h, c)
    return _stack(ys, B, (*S, out_size)), carry


# --------------------------------------------------------------------------------------
# GRU


def gru(xs, *, W, U, b, b_hn=None, reset_after=True, ln=None, eps=1e-5, h0=None, conv=False):
    """GRU with optional layer normalisation ``ln = (g_x (3H,), g_h (3H,))``; with ``conv`` the
    ConvGRU (Ballas et al. 2016): 'same' convolutions (``same_conv``) for both transitions, layer
    norm over each step's spatial and channel axes, ``xs (B, T, *S, C)``.

    r = σ(a_r), z = σ(a_z), h' = (1 - z) n + z h, with, writing LN_x(v) = LN(v; g_x) and
    LN_h(v; s) = LN(v; g_h[s]) (identity maps without ``ln``):
      [a_r, a_z, x_n] = LN_x(x W) + b                                  (3H together)
      reset_after:  [h_r, h_z, h_n] = LN_h(h U);  a_r = x_r + h_r, ...;  n = tanh(x_n + r (h_n + b_hn))
      otherwise:    [h_r, h_z] = LN_h(h U_rz; :2H); n = tanh(x_n + LN_h((r h) U_n; 2H:))
    """
    xs, W, U, b, b_hn = _f64(xs), _f64(W), _f64(U), _f64(b), _f64(b_hn)
    H = U.shape[-2]
    B = xs.shape[0]
    S = xs.shape[2:-1] if conv else ()  # spatial axes
    transform = same_conv if conv else np.matmul
    step_axes = tuple(range(1, 2 + len(S)))  # a step's (spatial and) feature axes
    h = np.zeros((B, *S, H)) if h0 is None else _f64(h0)
    g_x, g_h = (None, None) if ln is None else (_f64(ln[0]), _f64(ln[1]))
    norm_x = (lambda v: v) if ln is None else (lambda v: layer_norm(v, g_x, axes=step_axes, eps=eps))
    norm_h = (lambda v, s: v) if ln is None else (lambda v, s: layer_norm(v, g_h[s], axes=step_axes, eps=eps))
    ys = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        ax = norm_x(transform(x, W)) + b
        x_r, x_z, x_n = ax[..., :H], ax[..., H : 2 * H], ax[..., 2 * H :]
        if reset_after:
            ah = norm_h(transform(h, U), slice(None))
            r = sigmoid(x_r + ah[..., :H])
            z = sigmoid(x_z + ah[..., H : 2 * H])
            n = np.tanh(x_n + r * (ah[..., 2 * H :] + b_hn))
        else:
            ah = norm_h(transform(h, U[..., : 2 * H]), slice(0, 2 * H))
            r = sigmoid(x_r + ah[..., :H])
            z = sigmoid(x_z + ah[..., H:])
            n = np.tanh(x_n + norm_h(transform(r * h, U[..., 2 * H :]), slice(2 * H, None)))
        h = (1.0 - z) * n + z * h
        ys.append(h)
    return _stack(ys, B, (*S, H)), h


# --------------------------------------------------------------------------------------
# Convolutional cells (channels last; ``same_conv`` is the explicit sliding-window reference of
# ``tests/reference.py``)


def conv_lstm(xs, *, W, U, b, **options):
    """ConvLSTM (Shi et al. 2015): :func:`lstm` with ``conv=True``, every option of the family
    but the gate recurrence and the projection. With the paper's Hadamard peepholes ``(*S, H)``
    and layer norm ``ln = (g_x (G*H,), g_h (G*H,), g_c (H,), b_c (H,))``:

      a = LN(W * X; g_x) + LN(U * H; g_h) + b;  i = σ(a_i + p_i ∘ C), f = σ(a_f + p_f ∘ C),
      C' = f ∘ C + i ∘ tanh(a_g), o = σ(a_o + p_o ∘ C'), H' = o ∘ tanh(LN(C'; g_c, b_c)).
    """
    return lstm(xs, W=W, U=U, b=b, conv=True, **options)


def conv_gru(xs, *, W, U, b, **options):
    """ConvGRU (Ballas et al. 2016): :func:`gru` with ``conv=True``."""
    return gru(xs, W=W, U=U, b=b, conv=True, **options)


# --------------------------------------------------------------------------------------
# Sequence-level helpers (independent of the library's driver)


def run_lengths(reference, xs, lengths, **kwargs):
    """Runs ``reference(xs, **kwargs)`` on each sequence's first ``lengths[b]`` steps alone.

    Outputs past a length are zero; the final carry is the one after the last valid step (the
    initial carry for length 0). Returns ``(ys, carries)``, ``carries`` a list per sequence."""
    xs = np.asarray(xs, np.float64)
    ys_all, carries = None, []
    for bi, L in enumerate(np.asarray(lengths)):
        ys, carry = reference(xs[bi : bi + 1, : int(L)], **kwargs)
        if ys_all is None:
            ys_all = np.zeros((xs.shape[0], xs.shape[1], *ys.shape[2:]))
        ys_all[bi, : int(L)] = ys[0]
        carries.append(carry)
    return ys_all, carries


def run_reversed(reference, xs, lengths, **kwargs):
    """``reference`` run over each sequence's valid prefix from its last step to its first;
    outputs aligned with input positions, padding zero."""
    xs = np.asarray(xs, np.float64)
    ys_all, carries = None, []
    for bi, L in enumerate(np.asarray(lengths)):
        L = int(L)
        ys, carry = reference(xs[bi : bi + 1, :L][:, ::-1], **kwargs)
        if ys_all is None:
            ys_all = np.zeros((xs.shape[0], xs.shape[1], *ys.shape[2:]))
        ys_all[bi, :L] = ys[0, ::-1]
        carries.append(carry)
    return ys_all, carries
