"""xLSTM's mLSTM (Beck et al. 2024): a matrix memory with exponential gating, in three equal forms.

The recurrent step is the cell (:func:`mlstm`); the two whole-sequence forms are
:class:`~recurrent.SequenceKernel` s it declares in its spec, chosen with
``rnn(cell, implementation="parallel" | "chunkwise")``. The chunkwise form cuts the sequence into
chunks of ``L`` steps, carries the state from chunk to chunk with a scan, and computes every
chunk's outputs at once in the attention-like parallel form; the parallel form is the chunkwise
form with one chunk of the whole sequence. All three compute the same stabilised quantities
(the same ``m_t`` at every step), so they agree to rounding, values and gradients.

Shape legend beyond :mod:`recurrent._core`'s: ``N`` heads, ``D = H / N`` the head size, ``L``
steps of a chunk, ``K`` chunks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import Cell, SequenceKernel
from recurrent._lstm import Initializer, fused_blocks

#: Order of the fused blocks of an mLSTM's ``input_kernel`` and ``input_bias`` (each ``H`` wide;
#: the output gate's only with ``output_gate=True``).
MLSTM_PROJECTIONS = ("query", "key", "value", "output")
#: Order of the fused blocks of an mLSTM's ``gate_kernel`` and ``gate_bias`` (each ``num_heads`` wide).
MLSTM_GATES = ("input", "forget")

_FORGET_GATES = ("sigmoid", "exp")
_GATES_FROM = ("input", "qkv")


class MLSTMParams(NamedTuple):
    """Parameters of an mLSTM.

    Attributes:
      input_kernel: ``(F, 4H)`` (``(F, 3H)`` without the output gate), blocks in
        ``MLSTM_PROJECTIONS`` order: query, key, value, output gate; head ``j`` owns columns
        ``j*D ... (j+1)*D - 1`` of each block.
      input_bias: ``(4H,)`` (``(3H,)``), the same blocks.
      gate_kernel: ``(F, 2N)``, or ``(3H, 2N)`` with ``gates_from="qkv"`` (reading ``[q, k, v]``),
        blocks in ``MLSTM_GATES`` order: input gate, forget gate; one scalar per head.
      gate_bias: ``(2N,)``, the same blocks.
      norm_scale: ``(H,)`` gain of the multi-head layer norm, or ``None`` without it.
    """

    input_kernel: jax.Array
    input_bias: jax.Array
    gate_kernel: jax.Array
    gate_bias: jax.Array
    norm_scale: jax.Array | None = None


class MLSTMState(NamedTuple):
    """Carry of an mLSTM, stabilised as in the official code, all in float32 (float64 when
    computing in float64). With ``Ĉ``, ``n̂`` the unstabilised memory of the paper:
    ``C = exp(-m) Ĉ^T`` and ``n = exp(-m) n̂``.

    Attributes:
      C: ``(*batch, N, D, D)``, the matrix memory laid out as the official code lays it out:
        ``C[..., j, a, b]`` accumulates ``k_a v_b`` of head ``j`` (the transpose of the paper's
        ``v k^T``).
      n: ``(*batch, N, D)``, the normaliser state.
      m: ``(*batch, N)``, the stabiliser (the log of the scale of ``C`` and ``n``).
    """

    C: jax.Array
    n: jax.Array
    m: jax.Array


def linspace_init(start: float, stop: float) -> Initializer:
    """An initialiser of evenly spaced values from ``start`` to ``stop`` along the last axis (the
    official mLSTM's forget-gate bias, one value per head: 3.0 ... 6.0)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.linspace(start, stop, shape[-1], dtype=dtype), shape)

    return init


def mlstm(
    hidden_size: int,
    *,
    num_heads: int = 4,
    forget_gate: str = "sigmoid",
    gates_from: str = "input",
    output_gate: bool = True,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    gate_soft_cap: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    kernel_init: Initializer = jax.nn.initializers.variance_scaling(0.4, "fan_in", "normal"),
    bias_init: Initializer = jax.nn.initializers.zeros,
    gate_kernel_init: Initializer = jax.nn.initializers.zeros,
    input_bias_init: Initializer = jax.nn.initializers.normal(0.1),
    forget_bias_init: Initializer = linspace_init(3.0, 6.0),
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""xLSTM's mLSTM cell (Beck et al. 2024): a matrix memory per head with exponential gating
    and no hidden-to-hidden recurrence.

    Per head (size :math:`D = H / N`):

    .. math::

        q_t &= W_q x_t + b_q, \quad k_t = \tfrac{1}{\sqrt{D}} (W_k x_t + b_k), \quad
        v_t = W_v x_t + b_v \\
        \tilde\imath_t &= w_i^\top x_t + b_i, \quad \tilde f_t = w_f^\top x_t + b_f, \quad
        o_t = \sigma(W_o x_t + b_o) \\
        \log i_t &= \tilde\imath_t, \quad \log f_t = \log\sigma(\tilde f_t)
            \ (\text{or } \tilde f_t \text{ with } \texttt{forget\_gate="exp"}) \\
        m_t &= \max(\log f_t + m_{t-1}, \log i_t) \\
        C_t &= e^{\log f_t + m_{t-1} - m_t} C_{t-1} + e^{\log i_t - m_t} k_t v_t^\top, \quad
        n_t = e^{\log f_t + m_{t-1} - m_t} n_{t-1} + e^{\log i_t - m_t} k_t \\
        \tilde h_t &= \frac{C_t^\top q_t}{\max(|n_t^\top q_t|, e^{-m_t}) + \epsilon}, \quad
        y_t = o_t \odot \mathrm{LN}(\tilde h_t)

    This is the paper's :math:`C_t = f_t C_{t-1} + i_t v_t k_t^\top`,
    :math:`\tilde h_t = C_t q_t / \max(|n_t^\top q_t|, 1)` with the memory scaled by
    :math:`e^{-m_t}` so that no exponential overflows, exactly as the official code computes it
    (``recurrent_step_stabilized_simple`` of ``xlstm``: the bound :math:`e^{-m_t}`, then
    :math:`\epsilon = 10^{-6}` added). ``LN`` (``layer_norm=True``) normalises each head's
    :math:`\tilde h` on its own (a group norm with one group per head, gain only); without
    ``output_gate`` :math:`o_t = 1`.

    Three equal forms, chosen with :func:`~recurrent.rnn`'s ``implementation``: ``"scan"`` (this
    step, :math:`O(T N D^2)`), ``"parallel"`` (the attention-like form, :math:`O(T^2 N D)` time
    and :math:`O(T^2 N)` memory; the official ``parallel_stabilized_simple``) and ``"chunkwise"``
    (chunks of ``chunk_size`` steps in parallel form, the state carried between chunks; the
    official native chunkwise kernel). All three take a starting carry and return the carry after
    each sequence's last valid step; they compute the same stabiliser :math:`m_t` at every step,
    so they agree to rounding.

    Which official unit this equals:

    - given the same :math:`q, k, v, \tilde\imath, \tilde f` (a cell without output gate and
      layer norm whose kernels select them from an input :math:`[q, k, v, \tilde\imath, \tilde f]`),
      the recurrence is the official ``recurrent_step_stabilized_simple`` step for step, carry
      included, the chunkwise form is ``mlstm_kernels``' native chunkwise kernel from any starting
      state (it scales :math:`q` where we scale :math:`k`: its :math:`C, n` are ours times
      :math:`\sqrt{D}`), and the parallel form is ``parallel_stabilized_simple`` but for
      :math:`\epsilon`'s scale (that
      function stabilises each row without the initial state's term, so its
      :math:`\epsilon` is :math:`10^{-6} e^{m'_t}` with :math:`m'_t \le m_t`: a relative
      difference below :math:`10^{-6} e^{m_t}`);
    - ``mlstm(H, num_heads=N, gates_from="qkv", output_gate=False, layer_norm=True)`` on inputs
      ``[q, k, v]`` (``3H`` features) with the identity as ``W_q, W_k, W_v`` is the official
      ``xlstm.mLSTMCell`` (gates from the concatenated ``q, k, v``; its layer-norm weight ``w``
      is our gain ``1 + w``): :func:`recurrent.interop.from_xlstm` builds it;
    - the default form with ``layer_norm=True, layer_norm_epsilon=1e-6`` is the ``mLSTMLayer``
      of ``xlstm.xlstm_large`` without its output projection (with ``gate_soft_cap=15.0`` and
      equal query and value sizes, ``qk_dim_factor=1``).

    Parameters (:class:`MLSTMParams`): ``input_kernel (F, 4H)``, ``input_bias (4H,)`` in
    ``MLSTM_PROJECTIONS`` order (q, k, v, o), ``gate_kernel (F, 2N)``, ``gate_bias (2N,)`` in
    ``MLSTM_GATES`` order (i, f), ``norm_scale (H,)`` with ``layer_norm``. Parameter count
    ``(F + 1)(3 + o) H + (G + 1) 2N + l H`` with ``o = 1`` with the output gate, ``G = F``
    (``3H`` with ``gates_from="qkv"``) and ``l = 1`` with the layer norm: ``(F + 1)(4H + 2N)``
    by default.

    Carry: :class:`MLSTMState` ``(C, n, m)``, all float32; the output ``y`` is ``(*batch, H)``
    in the compute dtype. ``return_trace`` gates (``(*batch, N)``): ``"input"``
    :math:`e^{\log i_t - m_t}` and ``"forget"`` :math:`e^{\log f_t + m_{t-1} - m_t}`, the factors
    the step applies to the stabilised memory, and ``"output"`` :math:`o_t` ``(*batch, H)``.

    Regularisers: ``input_dropout`` applies. There is no recurrent input or recurrent kernel, so
    ``rnn`` refuses ``recurrent_dropout`` and ``dropconnect``; zoneout is refused too (at trace
    time): mixing a previous and a new memory that are stabilised by different :math:`m` has no
    meaning, and zoning out :math:`m` alone would rescale the memory.

    Args:
      hidden_size: ``H``, the width of :math:`q, k, v` and of the output.
      num_heads: ``N``, which must divide ``H``.
      forget_gate: ``"sigmoid"`` (:math:`f = \sigma(\tilde f)`, the official choice) or ``"exp"``
        (:math:`f = e^{\tilde f}`).
      gates_from: what the input and forget gates read: ``"input"`` (:math:`x_t`, the paper and
        ``xlstm_large``) or ``"qkv"`` (:math:`[q_t, W_k x_t + b_k, v_t]`, the official
        ``mLSTMCell``).
      output_gate: the output gate :math:`o_t` (the paper's; the official ``mLSTMCell`` has none,
        its block gates outside the cell).
      layer_norm: the multi-head layer norm of :math:`\tilde h_t` (the official cell's).
      layer_norm_epsilon: added to the variance in the layer norm (``1e-5`` in the official
        ``mLSTMCell``, ``1e-6`` in ``xlstm_large``).
      gate_soft_cap: ``c`` caps the gate pre-activations to :math:`c \tanh(\cdot / c)`
        (``xlstm_large`` uses 15); ``None``: no cap.
      eps: :math:`\epsilon` added to the normaliser (the official ``1e-6``).
      chunk_size: steps per chunk of ``implementation="chunkwise"``; any ``T`` works (the last
        chunk is padded with steps that change nothing).
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel`` (the official small
        init, normal with variance ``2 / (5F)``, Nguyen & Salazar 2019).
      bias_init: initialiser of each ``(H,)`` block of ``input_bias``.
      gate_kernel_init: initialiser of each ``(G, N)`` block of ``gate_kernel`` (zeros, as the
        official cell).
      input_bias_init: initialiser of the ``(N,)`` input-gate bias (normal, std 0.1).
      forget_bias_init: initialiser of the ``(N,)`` forget-gate bias (evenly spaced from 3.0 to 6.0
        across heads, as the official cell).
      dtype: compute dtype of the projections and of the parallel forms' matrix products;
        ``None`` computes in the parameters' dtype. The state and the gates' log-space
        arithmetic stay in float32.
      param_dtype: dtype of the parameters made by ``init``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.mlstm(16, num_heads=2)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> recurrent.count_params(params) == (8 + 1) * (4 * 16 + 2 * 2)
    True
    >>> xs = jnp.ones((3, 10, 8))
    >>> carry, ys = recurrent.rnn(cell).apply(params, xs, lengths=jnp.array([10, 4, 0]))
    >>> _, same = recurrent.rnn(cell, implementation="chunkwise").apply(params, xs, lengths=jnp.array([10, 4, 0]))
    >>> ys.shape, carry.C.shape, bool(jnp.allclose(ys, same, atol=1e-5))
    ((3, 10, 16), (3, 2, 8, 8), True)

    References: M. Beck et al. *xLSTM: Extended Long Short-Term Memory.* NeurIPS 2024
    (Section 2.3, and the appendix on the stabilised and parallel mLSTM); the official code:
    ``pip install xlstm`` (the tests compare with xlstm 2.0.6 and mlstm_kernels 2.0.6).
    """
    options = dict(locals())
    where = "recurrent.mlstm"
    H = _core.check_positive_int("hidden_size", hidden_size, where=where)
    N = _core.check_positive_int("num_heads", num_heads, where=where)
    if H % N:
        raise _core.error(
            f"{where}: `hidden_size` must be a multiple of `num_heads` (every head gets H / num_heads units).",
            expected=f"num_heads dividing hidden_size={H}: one of {[d for d in range(1, H + 1) if H % d == 0]}",
            got=f"num_heads={N}",
            fix=f"pass e.g. num_heads={max(d for d in range(1, min(N, H) + 1) if H % d == 0)}, or a hidden_size "
            f"that is a multiple of {N}.",
        )
    D = H // N
    _check_choice("forget_gate", forget_gate, _FORGET_GATES, where)
    _check_choice("gates_from", gates_from, _GATES_FROM, where)
    chunk = _core.check_positive_int("chunk_size", chunk_size, where=where)
    for name, value in (("eps", eps), ("layer_norm_epsilon", layer_norm_epsilon)):
        _core.check_number(name, value, where=where, example=1e-6, allow_zero=True)
    if gate_soft_cap is not None:
        _core.check_number("gate_soft_cap", gate_soft_cap, where=where, example=15.0)
    blocks = 4 if output_gate else 3
    width = blocks * H + 2 * N  # of the projected input: q | k | v | (o) | i | f

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        if len(input_shape) != 1:
            raise _core.error(
                f"{where}.init: `input_shape` must be one step's input without batch or time axes.",
                expected="(features,)",
                got=repr(input_shape),
                fix="pass input_shape=(xs.shape[-1],).",
            )
        (F,) = input_shape
        G = F if gates_from == "input" else 3 * H
        k_in, k_b, k_gate, k_i, k_f = jax.random.split(key, 5)
        draw_dtype = jnp.promote_types(param_dtype, jnp.float32)
        return MLSTMParams(
            input_kernel=fused_blocks(kernel_init, k_in, (F, H), blocks, param_dtype),
            input_bias=fused_blocks(bias_init, k_b, (H,), blocks, param_dtype),
            gate_kernel=fused_blocks(gate_kernel_init, k_gate, (G, N), 2, param_dtype),
            gate_bias=jnp.concatenate(
                [input_bias_init(k_i, (N,), draw_dtype), forget_bias_init(k_f, (N,), draw_dtype)]
            ).astype(param_dtype),
            norm_scale=jnp.ones((H,), param_dtype) if layer_norm else None,
        )

    def dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = _core.check_dense_x_shape(x_shape, where=where)
        _, sdt = dtypes(params)
        batch = tuple(x_shape[:-1])
        return MLSTMState(
            jnp.zeros((*batch, N, D, D), sdt), jnp.zeros((*batch, N, D), sdt), jnp.zeros((*batch, N), sdt)
        )

    def project(params, x):
        """``[q, k / sqrt(D), v, (o~), i~, f~]`` in the state dtype: ``(*lead, width)``."""
        F = params.input_kernel.shape[0]
        _core.check_input(
            x, (F,), where=where, fix=f"give inputs of shape (*batch, {F}) or re-init with input_shape=(x.shape[-1],)."
        )
        cdt, sdt = dtypes(params)
        z = _core.matmul(x.astype(cdt), params.input_kernel.astype(cdt), sdt) + params.input_bias.astype(sdt)
        qkv = z[..., : 3 * H]
        gate_in = x if gates_from == "input" else qkv
        gates = _core.matmul(gate_in.astype(cdt), params.gate_kernel.astype(cdt), sdt) + params.gate_bias.astype(sdt)
        if gate_soft_cap is not None:
            gates = gate_soft_cap * jnp.tanh(gates / gate_soft_cap)
        scale = jnp.asarray(1.0 / math.sqrt(D), sdt)
        return jnp.concatenate([z[..., :H], z[..., H : 2 * H] * scale, z[..., 2 * H :], gates], axis=-1)

    def split(xp):
        """``(q, k, v, o~ or None, i~, log f)`` of a projected input: q, k, v ``(*lead, N, D)``."""
        heads = lambda a: a.reshape((*a.shape[:-1], N, D))  # noqa: E731
        q, k, v = (heads(xp[..., j * H : (j + 1) * H]) for j in range(3))
        o = xp[..., 3 * H : 4 * H] if output_gate else None
        i, f = xp[..., blocks * H : blocks * H + N], xp[..., blocks * H + N :]
        return q, k, v, o, i, (jax.nn.log_sigmoid(f) if forget_gate == "sigmoid" else f)

    def output(params, h, o, cdt):
        """``y = o * LN(h~)`` of ``h~ (*lead, N, D)``: ``(*lead, H)`` in the compute dtype."""
        if layer_norm:
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * lax.rsqrt(var + layer_norm_epsilon)
        y = h.reshape((*h.shape[:-2], H))
        if layer_norm:
            y = y * params.norm_scale.astype(y.dtype)
        if output_gate:
            y = jax.nn.sigmoid(o) * y
        return y.astype(cdt)

    def probe(params, carry, xp, noise=None):
        if noise is not None and noise.zoneout is not None:
            raise _core.error(
                f"{where}: zoneout has no meaning for the mLSTM's stabilised matrix memory.",
                expected="rnn(mlstm(...)) without zoneout (and no zoneout in a stack that holds an mLSTM)",
                got="zoneout values for the carry MLSTMState(C, n, m)",
                fix="drop `zoneout`/`zoneout_cell`; regularise with input_dropout, or dropout between stacked layers.",
            )
        cdt, sdt = dtypes(params)
        q, k, v, o, i, log_f = split(xp.astype(sdt))
        C, n, m = carry
        m_new = jnp.maximum(log_f + m, i)
        forget = jnp.exp(log_f + m - m_new)
        input_ = jnp.exp(i - m_new)
        C = forget[..., None, None] * C + input_[..., None, None] * (k[..., :, None] * v[..., None, :])
        n = forget[..., None] * n + input_[..., None] * k
        num = jnp.einsum("...a,...ab->...b", q, C)
        den = jnp.einsum("...a,...a->...", q, n)
        h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_new)) + eps)[..., None]
        gates = {"input": input_, "forget": forget}
        if output_gate:
            gates["output"] = jax.nn.sigmoid(o)
        new = MLSTMState(C, n, m_new)
        return new, output(params, h, o, cdt), gates

    def sequence_kernel(chunked: bool) -> SequenceKernel:
        def apply(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
            del hoist, unroll  # the projection runs on every step at once; there is no step loop
            cdt, sdt = dtypes(params)
            B, T = xs_BTF.shape[:2]
            if T == 0:
                return carry_B, jnp.zeros((B, 0, H), cdt)
            q, k, v, o, i, log_f = split(project(params, xs_BTF))
            valid = jnp.ones((B, T), bool) if lengths_B is None else jnp.arange(T) < lengths_B[:, None]
            # padded steps change nothing: f = 1 (log 0) and i = 0 (log -inf)
            log_f = jnp.where(valid[..., None], log_f, 0.0)
            log_i = jnp.where(valid[..., None], i, -jnp.inf)
            heads_first = lambda a: jnp.moveaxis(a, 2, 1)  # (B, T, N, ...) -> (B, N, T, ...)  # noqa: E731
            h, carry = chunkwise_form(
                *map(heads_first, (q, k, v, log_i, log_f)), carry_B, chunk if chunked else T, eps, cdt
            )
            y = output(params, jnp.moveaxis(h, 1, 2), o, cdt)
            return carry, jnp.where(valid[..., None], y, jnp.zeros_like(y))

        def reason(params, xs):
            if not isinstance(params, MLSTMParams):
                return f"the parameters are a {type(params).__name__}"
            return None

        return SequenceKernel(apply, reason, batchable=True, remat=False)

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=lambda input_shape: (H,),
        input_rank=1,
        name="mlstm",
        options=options,
        spec=_core.cell_spec(
            recurrent_input=False,  # no hidden-to-hidden recurrence: recurrent dropout is refused
            fixed=MLSTMState._fields,
            recurrent_kernels=None,  # nor DropConnect
            kernels={"parallel": sequence_kernel(False), "chunkwise": sequence_kernel(True)},
            compute_dtype=dtype,
        ),
    )


def chunkwise_form(q, k, v, log_i, log_f, state: MLSTMState, chunk: int, eps: float, cdt: Any):
    """Every step's :math:`\\tilde h` and the state after the last step, chunk by chunk.

    ``q, k, v``: ``(B, N, T, D)`` (``k`` scaled by ``1/sqrt(D)``); ``log_i, log_f``: ``(B, N, T)``
    (a step that must change nothing has ``log_i = -inf``, ``log_f = 0``); ``state``: the
    starting :class:`MLSTMState` with ``(B, N, ...)`` leaves. Returns ``(h (B, N, T, D), state)``.

    With ``b`` the cumulative ``log f`` inside a chunk and ``(C, n, m)`` the state before it, a
    step ``t`` of the chunk sees ``C`` with weight ``exp(b_t + m)`` and step ``s <= t`` of the chunk
    with weight ``exp(b_t - b_s + log i_s)``; its stabiliser is the largest of these logs, which
    is the recurrent step's :math:`m_t`. The state after the chunk is the same sum at its end.
    """
    B, N, T, D = q.shape
    sdt = q.dtype
    L = max(1, min(chunk, T))
    K = -(-T // L)
    pad = K * L - T
    if pad:
        widen = lambda a, value: jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3), constant_values=value)  # noqa: E731
        q, k, v, log_f = (widen(a, 0.0) for a in (q, k, v, log_f))
        log_i = widen(log_i, -jnp.inf)
    chunks = lambda a: a.reshape((B, N, K, L, *a.shape[3:]))  # noqa: E731
    q, k, v, log_i, log_f = map(chunks, (q, k, v, log_i, log_f))
    b = jnp.cumsum(log_f, axis=-1)  # (B, N, K, L)
    g = b[..., -1]  # (B, N, K): log of the whole chunk's forgetting
    a = g[..., None] - b + log_i  # (B, N, K, L): log weight of step s in the state after its chunk
    mm = lambda spec, x, y: jnp.einsum(spec, x.astype(cdt), y.astype(cdt), preferred_element_type=sdt)  # noqa: E731
    # v with a column of ones: one product gives the memory's (C) and the normaliser's (n) terms
    # (on CPU much faster than a separate sum over the L x L scores, which XLA recomputes)
    v1 = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # (B, N, K, L, D + 1)

    def across(state, inputs):
        C, n, m = state
        g_c, a_c, k_c, v1_c = inputs
        m_new = jnp.maximum(g_c + m, a_c.max(-1))
        decay = jnp.exp(g_c + m - m_new)
        k_w = k_c * jnp.exp(a_c - m_new[..., None])[..., None]  # (B, N, L, D)
        kv1 = mm("bnld,bnle->bnde", k_w, v1_c)  # (B, N, D, D + 1): sum of k v^T | sum of k
        C = decay[..., None, None] * C + kv1[..., :D]
        n = decay[..., None] * n + kv1[..., D]
        return MLSTMState(C, n, m_new), state  # emits the state before the chunk

    by_chunk = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731
    final, before = lax.scan(across, state, tuple(map(by_chunk, (g, a, k, v1))))
    C0, n0, m0 = (jnp.moveaxis(x, 0, 2) for x in before)  # (B, N, K, ...)
    Cn0 = jnp.concatenate([C0, n0[..., None]], axis=-1)  # (B, N, K, D, D + 1)

    # every chunk's outputs at once, over one flattened batch axis Z = B * N * K (XLA's CPU matmuls
    # run several times faster over one batch axis than over three)
    flat = lambda a: a.reshape((B * N * K, *a.shape[3:]))  # noqa: E731
    q, k, v1, b, log_i, m0, Cn0 = map(flat, (q, k, v1, b, log_i, m0, Cn0))
    causal = jnp.tril(jnp.ones((L, L), bool))
    log_d = jnp.where(causal, b[:, :, None] - b[:, None, :] + log_i[:, None, :], -jnp.inf)  # (Z, L, L)
    log_inter = b + m0[:, None]  # (Z, L)
    m_t = jnp.maximum(log_inter, log_d.max(-1))
    scores = mm("zld,zsd->zls", q, k) * jnp.exp(log_d - m_t[..., None])
    inter = jnp.exp(log_inter - m_t)
    nd = inter[..., None] * mm("zld,zde->zle", q, Cn0) + mm("zls,zse->zle", scores, v1)
    num, den = nd[..., :D], nd[..., D]
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_t)) + eps)[..., None]
    return h.reshape((B, N, K * L, D))[:, :, :T], final


def _check_choice(name: str, value: Any, choices: tuple[str, ...], where: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _core.error(
            f"{where}: unknown `{name}`.",
            expected=" or ".join(repr(c) for c in choices),
            got=repr(value),
            fix=f"pass {name}={choices[0]!r} (the default).",
        )
