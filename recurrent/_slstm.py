"""xLSTM's sLSTM (Beck et al. 2024): exponential gating, a normaliser state and a stabiliser, with a
recurrent matrix that is block-diagonal over heads.

The step follows the official implementation (``xlstm`` 2.0.6, ``xlstm/blocks/slstm``: the vanilla
PyTorch backend and the CUDA kernel) in every convention that changes a value: the gate order
(i, f, z, o), the zero initial state, the stabiliser's first step (``m = log i`` where the state is
empty, ``n = 0``) and the clamps ``min(1, ...)`` on the stabilised gates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent import _core
from recurrent._core import Cell
from recurrent._lstm import fused_blocks

Initializer = jax.nn.initializers.Initializer

#: Order of the fused gate blocks along the last axis of an sLSTM's ``input_kernel``, ``bias`` and
#: each head's ``recurrent_kernel`` (the official ``xlstm`` order i, f, z, o): input gate, forget
#: gate, cell input ``z``, output gate.
SLSTM_GATES = ("input", "forget", "cell", "output")
FORGET_GATES = ("sigmoid", "exp")

# "Small init" (Nguyen & Salazar 2019), the official sLSTM layer's input projections: N(0, 2 / (5 F)).
_KERNEL_INIT = jax.nn.initializers.variance_scaling(0.4, "fan_in", "normal")


class SLSTMParams(NamedTuple):
    """Parameters of an sLSTM with ``K`` heads of size ``D = H / K``.

    Attributes:
      input_kernel: ``(F, 4H)``, input to fused gates, blocks of ``H`` in ``SLSTM_GATES`` order
        (i, f, z, o); unit ``j`` of a block belongs to head ``j // D``.
      recurrent_kernel: ``(K, D, 4D)``, head ``k``'s recurrent weights from its ``D`` units of
        ``h(t-1)`` to its ``D`` units of each gate, blocks of ``D`` in ``SLSTM_GATES`` order (the
        block-diagonal ``R`` of the paper, stored without its zero blocks).
      bias: ``(4H,)``, blocks as ``input_kernel``.
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array


class SLSTMState(NamedTuple):
    """Carry of an sLSTM, each ``(*batch, H)``: the output ``h`` (compute dtype) and the
    stabilised memory: cell ``c``, normaliser ``n`` and stabiliser ``m`` (float32, or float64 when
    computing in float64). The fields are in the order of the official ``xlstm`` state tensor
    ``(4, B, H)`` (``y, c, n, m``), so ``SLSTMState(*state)`` converts one."""

    h: jax.Array
    c: jax.Array
    n: jax.Array
    m: jax.Array


def powerlaw_forget_bias(head_dim: int) -> np.ndarray:
    """The official ``"powerlaw_blockdependent"`` forget-gate bias of one head (for one block):
    ``5 - 12 (j / (D - 1)) ** 0.3`` for ``j = 0 .. D-1``, from 5 (slow forgetting) down to -7.
    ``D = 1`` gives 5 (the official code divides by zero there)."""
    j = np.arange(head_dim, dtype=np.float64)
    return 5.0 - 12.0 * (j / max(head_dim - 1, 1)) ** 0.3


def _default_forget_bias(forget_gate: str) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        del key
        b = np.broadcast_to(powerlaw_forget_bias(shape[-1]), shape)
        if forget_gate == "exp":  # the same initial forget values: exp(b') = sigmoid(b)
            b = -np.logaddexp(0.0, -b)
        return jnp.asarray(b, dtype)

    return init


def _mix_memory(keep, old: SLSTMState, new: SLSTMState):
    """Zoneout of the memory ``(c, n, m)`` as one: each unit keeps its previous memory with weight
    ``keep`` (a Bernoulli mask in training, the rate at evaluation), mixed in unstabilised terms
    ``C = c e^m``, ``N = n e^m``: ``C = keep C_old + (1 - keep) C_new``, ``N`` likewise, so the
    readout ``C / N`` is always that of a real memory (the old or the new one in training).

    ``keep`` of 0 or 1 selects one memory exactly; in between, the mix is stored renormalised
    (``n = 1``, ``m = log N``), which keeps ``n`` away from underflow however long it runs. An
    empty previous memory (``n = 0``, the initial state) contributes nothing."""
    empty = old.n == 0
    m_ref = jnp.where(empty, new.m, jnp.maximum(old.m, new.m))
    w_old = jnp.where(empty, 0.0, keep * jnp.exp(jnp.minimum(old.m - m_ref, 0.0)))
    w_new = (1.0 - keep) * jnp.exp(jnp.minimum(new.m - m_ref, 0.0))
    s = w_old * old.n + w_new * new.n
    s_safe = jnp.where(s > 0, s, 1.0)  # s = 0 only where `keep` selects an empty memory below
    c_mix = (w_old * old.c + w_new * new.c) / s_safe
    m_mix = m_ref + jnp.log(s_safe)

    def pick(o, n, mixed):
        return jnp.where(keep == 1, o, jnp.where(keep == 0, n, mixed)).astype(n.dtype)

    return pick(old.c, new.c, c_mix), pick(old.n, new.n, jnp.ones_like(s)), pick(old.m, new.m, m_mix)


def _zoneout(noise: _core.StepNoise | None, old: SLSTMState, new: SLSTMState) -> SLSTMState:
    """``h`` at ``zoneout``'s rate (``noise.zoneout.h``), as any hidden state; the memory at
    ``zoneout_cell``'s rate (``noise.zoneout.c``), as one (:func:`_mix_memory`)."""
    if noise is None or noise.zoneout is None:
        return new
    d = noise.zoneout
    h = (d.h * old.h + (1 - d.h) * new.h).astype(new.h.dtype)
    return SLSTMState(h, *_mix_memory(d.c, old, new))


def slstm(
    hidden_size: int,
    *,
    num_heads: int = 1,
    forget_gate: str = "sigmoid",
    kernel_init: Initializer = _KERNEL_INIT,
    recurrent_kernel_init: Initializer = jax.nn.initializers.zeros,
    bias_init: Initializer = jax.nn.initializers.zeros,
    forget_bias_init: Initializer | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""The sLSTM of xLSTM (Beck et al. 2024): exponential gating with a normaliser and a
    stabiliser, and a recurrent matrix that is block-diagonal over ``num_heads`` heads.

    .. math::

        \tilde z_t, \tilde\imath_t, \tilde f_t, \tilde o_t &= W x_t + R h_{t-1} + b
            \qquad (R \text{ block-diagonal: one } D \times 4D \text{ block per head}) \\
        m_t &= \max(\log f_t + m_{t-1}, \log i_t), \qquad \log i_t = \tilde\imath_t, \qquad
            \log f_t = \log\sigma(\tilde f_t) \text{ or } \tilde f_t \\
        i'_t &= \exp(\log i_t - m_t), \qquad f'_t = \exp(\log f_t + m_{t-1} - m_t) \\
        c_t &= f'_t \odot c_{t-1} + i'_t \odot \tanh(\tilde z_t), \qquad
            n_t = f'_t \odot n_{t-1} + i'_t \\
        h_t &= \sigma(\tilde o_t) \odot c_t / n_t, \qquad y_t = h_t

    The stabiliser ``m`` keeps every exponential at most 1; ``c / n``, hence ``h``, is the one of
    the unstabilised recurrence (``c e^m``, ``n e^m`` with ``i = exp(i~)``), which overflows. As in
    the official ``xlstm`` code (vanilla and CUDA backends): the initial state is zeros; where the
    state is empty (``n(t-1) = 0``) the stabiliser starts at ``m_t = log i_t`` (the official
    vanilla backend checks this for the whole batch at once, its CUDA kernel and this cell per
    unit: the same on any state the official code starts from); and ``i'``, ``f'`` are clamped to 1
    (which changes nothing but ``f'`` on an empty state). There is no epsilon: ``n >= 1`` after
    the first step, since ``i'`` or ``f'`` is 1 at every step.

    Parameters (:class:`SLSTMParams`), gate blocks fused in ``SLSTM_GATES`` order (i, f, z, o):
    ``input_kernel (F, 4H)``, ``recurrent_kernel (K, D, 4D)`` with ``K = num_heads`` and
    ``D = H / K``, ``bias (4H,)``. Parameter count ``4H(F + H/K + 1)``.

    Carry: :class:`SLSTMState` ``(h, c, n, m)``, each ``(*batch, H)``; ``h`` in the compute dtype,
    ``c``, ``n``, ``m`` in float32 (float64 if computing in float64). Gates of ``probe``: the
    stabilised ``input`` and ``forget`` gates ``i'``, ``f'``, the cell input ``tanh(z~)`` and the
    ``output`` gate.

    Regularisers of :func:`recurrent.rnn`: recurrent dropout masks ``h`` before ``R``;
    DropConnect drops entries of ``recurrent_kernel``; zoneout keeps ``h`` at ``zoneout``'s rate
    (computed from the new memory, as in Krueger et al.'s LSTM) and the memory ``(c, n, m)`` as one
    at ``zoneout_cell``'s rate, mixed in unstabilised terms (``C = c e^m``, ``N = n e^m``), so the
    readout ``c / n`` is always that of a real memory: the kept or the new one in training, their
    weighted mix ``(d C_old + (1 - d) C_new) / (d N_old + (1 - d) N_new)`` at evaluation. Zoning out
    ``c`` alone would divide a cell state by the normaliser of another step, with another ``m``.

    Args:
      hidden_size: ``H``.
      num_heads: ``K``, the number of heads: ``R`` has ``K`` diagonal blocks of ``D = H / K`` units,
        so each head's units see only their own head's ``h(t-1)``. ``H`` must be a multiple.
      forget_gate: ``"sigmoid"`` (``f = sigma(f~)``, the official code's only form) or ``"exp"``
        (``f = exp(f~)``, the paper's other form).
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``; by default the
        official layer's "small init", ``N(0, 2 / (5F))``.
      recurrent_kernel_init: initialiser of each head's ``(D, D)`` block per gate; zeros by
        default, as the official ``recurrent_weight_init="zeros"``.
      bias_init: initialiser of the ``(H,)`` bias blocks of the input, cell and output gates
        (zeros, as officially).
      forget_bias_init: initialiser of the forget-gate bias, called with shape ``(K, D)``. ``None``:
        the official ``"powerlaw_blockdependent"`` init of one block, per head
        ``5 - 12 (j / (D - 1)) ** 0.3`` (from 5 down to -7); with ``forget_gate="exp"`` its
        log-sigmoid, so both forms start with the same forget-gate values.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the parameters' dtype.
      param_dtype: dtype of the parameters made by ``init``.

    Returns:
      A :class:`Cell`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.slstm(8, num_heads=2)
    >>> params = cell.init(jax.random.key(0), (3,))
    >>> params.recurrent_kernel.shape, recurrent.count_params(params) == 4 * 8 * (3 + 8 // 2 + 1)
    ((2, 4, 16), True)
    >>> x = jnp.full((5, 3), 100.0)               # one step, batch of 5: exp(100) overflows float32
    >>> carry, y = cell.step(params, cell.initial_carry(params, x.shape), x)
    >>> y.shape, carry.m.dtype, bool(jnp.isfinite(y).all())
    ((5, 8), dtype('float32'), True)

    References:
      M. Beck, K. Pöppel, M. Spanring, A. Auer, O. Prudnikova, M. Kopp, G. Klambauer,
      J. Brandstetter, S. Hochreiter. *xLSTM: Extended Long Short-Term Memory.* NeurIPS 2024.
    """
    options = dict(locals())
    where = "recurrent.slstm"
    H = _core.check_positive_int("hidden_size", hidden_size, where=where)
    K = _core.check_positive_int("num_heads", num_heads, where=where)
    if H % K:
        divisors = [k for k in range(1, H + 1) if H % k == 0]
        raise _core.error(
            f"{where}: `hidden_size` must be a multiple of `num_heads` (each head has H / num_heads units).",
            expected=f"num_heads dividing hidden_size={H}: one of {divisors}",
            got=f"hidden_size={H}, num_heads={K}",
            fix=f"pass e.g. num_heads={max(k for k in divisors if k <= K)}, "
            f"or a hidden_size that is a multiple of {K}.",
        )
    if not isinstance(forget_gate, str) or forget_gate not in FORGET_GATES:
        raise _core.error(
            f"{where}: unknown `forget_gate`.",
            expected='"sigmoid" (f = sigmoid(f~), the official xlstm form) or "exp" (f = exp(f~))',
            got=repr(forget_gate),
            fix='pass forget_gate="sigmoid" or forget_gate="exp".',
        )
    D = H // K
    exp_forget = forget_gate == "exp"
    forget_init = _default_forget_bias(forget_gate) if forget_bias_init is None else forget_bias_init

    def init(key, input_shape):
        if len(input_shape) != 1:
            raise _core.error(
                f"{where}.init: `input_shape` must be one step's input without batch or time axes.",
                expected="(features,)",
                got=repr(input_shape),
                fix="pass input_shape=(xs.shape[-1],).",
            )
        (F,) = input_shape
        k_in, k_rec, k_b, k_f = jax.random.split(key, 4)
        heads = [fused_blocks(recurrent_kernel_init, k, (D, D), 4, param_dtype) for k in jax.random.split(k_rec, K)]
        i_b, z_b, o_b = (bias_init(k, (H,), param_dtype) for k in jax.random.split(k_b, 3))
        f_b = jnp.asarray(forget_init(k_f, (K, D), param_dtype), param_dtype).reshape(H)
        return SLSTMParams(
            input_kernel=fused_blocks(kernel_init, k_in, (F, H), 4, param_dtype),
            recurrent_kernel=jnp.stack(heads),
            bias=jnp.concatenate([i_b, f_b, z_b, o_b]),
        )

    def dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = _core.check_dense_x_shape(x_shape, where=where)
        cdt, sdt = dtypes(params)
        zeros = jnp.zeros((*x_shape[:-1], H), sdt)
        return SLSTMState(zeros.astype(cdt), zeros, zeros, zeros)

    def project(params, x):
        F = params.input_kernel.shape[0]
        _core.check_input(
            x, (F,), where=where, fix=f"give inputs of shape (*batch, {F}) or re-init with input_shape=(x.shape[-1],)."
        )
        cdt, sdt = dtypes(params)
        xp = _core.matmul(x.astype(cdt), params.input_kernel.astype(cdt), sdt)
        return (xp + params.bias.astype(sdt)).astype(cdt)

    def recurrent_term(params, h, cdt, sdt):
        """``R h`` in the fused gate-major layout ``(*batch, 4H)``, one matmul per head."""
        R = params.recurrent_kernel.astype(cdt)
        if K == 1:
            return _core.matmul(h.astype(cdt), R[0], sdt)
        h_heads = h.astype(cdt).reshape(*h.shape[:-1], K, D)
        rec = jnp.einsum("...kd,kdg->...kg", h_heads, R, preferred_element_type=sdt)  # (..., K, 4D)
        return jnp.swapaxes(rec.reshape(*h.shape[:-1], K, 4, D), -3, -2).reshape(*h.shape[:-1], 4 * H)

    def probe(params, carry, xp, noise=None):
        cdt, sdt = dtypes(params)
        h = _core.noisy_input(noise, carry.h)
        pre = xp.astype(sdt) + recurrent_term(params, h, cdt, sdt)
        zi, zf, zz, zo = jnp.split(pre, 4, axis=-1)
        log_f = zf if exp_forget else jax.nn.log_sigmoid(zf)
        log_f_m = log_f + carry.m
        m = jnp.where(carry.n == 0, zi, jnp.maximum(zi, log_f_m))
        i = jnp.exp(jnp.minimum(zi - m, 0.0))  # min(1, exp(...)) of the official code, without overflow
        f = jnp.exp(jnp.minimum(log_f_m - m, 0.0))
        z = jnp.tanh(zz)
        c = f * carry.c + i * z
        n = f * carry.n + i
        o = jax.nn.sigmoid(zo)
        new = SLSTMState((o * c / n).astype(cdt), c, n, m)
        new = _zoneout(noise, carry, new)
        return new, new.h, {"input": i, "forget": f, "cell": z, "output": o}

    spec = _core.cell_spec(
        recurrent_input="h",
        cell_state=("c",),
        fixed=("n", "m"),  # zoned out with c, as one memory (see `_zoneout`)
        recurrent_kernels=("recurrent_kernel",),
        compute_dtype=dtype,
    )
    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=lambda input_shape: (H,),
        input_rank=1,
        name="slstm",
        options=options,
        spec=spec,
    )
