"""The LSTM family: standard, peephole and coupled input-forget gate (CIFG) cells."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from recurrent import _core
from recurrent._core import Cell, LSTMState

Initializer = jax.nn.initializers.Initializer

#: Order of the fused gate blocks along the last axis of an LSTM's kernels and bias
#: (the order PyTorch uses): input gate, forget gate, cell candidate, output gate.
LSTM_GATES = ("input", "forget", "cell", "output")
#: Order of the fused gate blocks of a CIFG LSTM, which has no input gate (i = 1 - f).
CIFG_GATES = ("forget", "cell", "output")


class LSTMParams(NamedTuple):
    """Parameters of the LSTM family (``G`` gate blocks: 4, or 3 for CIFG).

    Attributes:
      input_kernel: ``(F, G*H)``, input to fused gates, blocks in ``LSTM_GATES`` order
        (``CIFG_GATES`` for CIFG).
      recurrent_kernel: ``(H, G*H)``, previous output to fused gates.
      bias: ``(G*H,)``.
      peephole_input: ``(H,)`` diagonal peephole c(t-1) -> input gate, or ``None``.
      peephole_forget: ``(H,)`` diagonal peephole c(t-1) -> forget gate, or ``None``.
      peephole_output: ``(H,)`` diagonal peephole c(t) -> output gate, or ``None``.
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array
    peephole_input: jax.Array | None = None
    peephole_forget: jax.Array | None = None
    peephole_output: jax.Array | None = None


def fused_blocks(init: Initializer, key: jax.Array, shape: tuple[int, ...], blocks: int, dtype: Any):
    """Initialises ``blocks`` gate blocks of ``shape`` separately and concatenates them
    along the last axis, so e.g. an orthogonal initialiser is orthogonal per gate. Blocks are
    drawn in at least float32 and cast, since e.g. the QR of ``orthogonal`` has no bfloat16
    kernel on CPU."""
    keys = jax.random.split(key, blocks)
    draw_dtype = jnp.promote_types(dtype, jnp.float32)
    return jnp.concatenate([init(k, shape, draw_dtype) for k in keys], axis=-1).astype(dtype)


def _lstm_family(
    hidden_size: int,
    *,
    peephole: bool,
    coupled: bool,
    name: str,
    kernel_init: Initializer,
    recurrent_kernel_init: Initializer,
    bias_init: Initializer,
    peephole_init: Initializer,
    forget_bias: float | jax.Array,
    dtype: Any,
    param_dtype: Any,
) -> Cell:
    where = f"recurrent.{name}"
    H = _core.check_positive_int("hidden_size", hidden_size, where=where)
    gates = CIFG_GATES if coupled else LSTM_GATES
    G = len(gates)
    forget = gates.index("forget")

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        if len(input_shape) != 1:
            raise _core.error(
                f"{where}.init: `input_shape` must be one step's input without batch or time axes.",
                expected="(features,)",
                got=repr(input_shape),
                fix="pass input_shape=(xs.shape[-1],); for images use recurrent.conv_lstm.",
            )
        (F,) = input_shape
        k_in, k_rec, k_b, k_pi, k_pf, k_po = jax.random.split(key, 6)
        bias = fused_blocks(bias_init, k_b, (H,), G, param_dtype)
        bias = bias.at[forget * H : (forget + 1) * H].add(jnp.asarray(forget_bias, param_dtype))
        peep = lambda k: peephole_init(k, (H,), param_dtype) if peephole else None  # noqa: E731
        return LSTMParams(
            input_kernel=fused_blocks(kernel_init, k_in, (F, H), G, param_dtype),
            recurrent_kernel=fused_blocks(recurrent_kernel_init, k_rec, (H, H), G, param_dtype),
            bias=bias,
            peephole_input=None if coupled else peep(k_pi),
            peephole_forget=peep(k_pf),
            peephole_output=peep(k_po),
        )

    def _dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
        if len(x_shape) < 1:
            raise _core.error(
                f"{where}.initial_carry: `x_shape` must be one step's input shape with its batch axes.",
                expected="(*batch, features)",
                got=repr(x_shape),
                fix="pass x.shape of one time step, e.g. (batch, features) or (features,).",
            )
        cdt, sdt = _dtypes(params)
        shape = (*x_shape[:-1], H)
        return LSTMState(h=jnp.zeros(shape, cdt), c=jnp.zeros(shape, sdt))

    def project(params, x):
        F = params.input_kernel.shape[0]
        _core.check_input(
            x, (F,), where=where, fix=f"give inputs of shape (*batch, {F}) or re-init with input_shape=(x.shape[-1],)."
        )
        cdt, _ = _dtypes(params)
        return x.astype(cdt) @ params.input_kernel.astype(cdt) + params.bias.astype(cdt)

    def recur(params, carry, xp):
        cdt, sdt = _dtypes(params)
        h, c = carry
        z = (xp + h.astype(cdt) @ params.recurrent_kernel.astype(cdt)).astype(sdt)
        blocks = dict(zip(gates, jnp.split(z, G, axis=-1)))
        f = blocks["forget"]
        if peephole:
            f = f + params.peephole_forget.astype(sdt) * c
        f = jax.nn.sigmoid(f)
        if coupled:
            i = 1.0 - f
        else:
            i = blocks["input"]
            if peephole:
                i = i + params.peephole_input.astype(sdt) * c
            i = jax.nn.sigmoid(i)
        c = f * c + i * jnp.tanh(blocks["cell"])
        o = blocks["output"]
        if peephole:
            o = o + params.peephole_output.astype(sdt) * c
        h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(cdt)
        return LSTMState(h, c), h

    def step(params, carry, x):
        return recur(params, carry, project(params, x))

    def output_shape(input_shape):
        return (H,)

    return Cell(init, initial_carry, step, project, recur, output_shape, 1, name)


_defaults = dict(
    kernel_init=jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init=jax.nn.initializers.orthogonal(),
    bias_init=jax.nn.initializers.zeros,
    peephole_init=jax.nn.initializers.zeros,
)


def lstm(
    hidden_size: int,
    *,
    kernel_init: Initializer = _defaults["kernel_init"],
    recurrent_kernel_init: Initializer = _defaults["recurrent_kernel_init"],
    bias_init: Initializer = _defaults["bias_init"],
    forget_bias: float | jax.Array = 1.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""Long short-term memory (Hochreiter & Schmidhuber 1997) with a forget gate (Gers et al. 2000).

    .. math::

        i_t &= \sigma(W_i x_t + U_i h_{t-1} + b_i) \\
        f_t &= \sigma(W_f x_t + U_f h_{t-1} + b_f) \\
        g_t &= \tanh(W_g x_t + U_g h_{t-1} + b_g) \\
        o_t &= \sigma(W_o x_t + U_o h_{t-1} + b_o) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \tanh(c_t), \qquad y_t = h_t

    Parameters (:class:`LSTMParams`), gate blocks fused in ``LSTM_GATES`` order (i, f, g, o):
    ``input_kernel (F, 4H)``, ``recurrent_kernel (H, 4H)``, ``bias (4H,)``; peephole fields are
    ``None``. Parameter count ``4H(F + H + 1)``.

    Carry: :class:`LSTMState` ``(h, c)``, each ``(*batch, H)``; ``h`` in the compute dtype,
    ``c`` in float32 (float64 if computing in float64).

    Args:
      hidden_size: ``H``, the size of ``h`` and ``c``.
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(H, H)`` block of ``recurrent_kernel``
        (orthogonal by default).
      bias_init: initialiser of each ``(H,)`` block of ``bias``.
      forget_bias: added to the forget-gate bias at init (1.0, Jozefowicz et al. 2015).
        May be a traced array, so a population can be initialised under ``vmap``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the parameters' dtype.
      param_dtype: dtype of the parameters made by ``init``.

    Returns:
      A :class:`Cell`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.lstm(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> x = jnp.ones((2, 8))                      # one step, batch of 2
    >>> carry = cell.initial_carry(params, x.shape)
    >>> carry, y = cell.step(params, carry, x)
    >>> y.shape, carry.c.shape
    ((2, 16), (2, 16))
    """
    return _lstm_family(
        hidden_size,
        peephole=False,
        coupled=False,
        name="lstm",
        kernel_init=kernel_init,
        recurrent_kernel_init=recurrent_kernel_init,
        bias_init=bias_init,
        peephole_init=_defaults["peephole_init"],
        forget_bias=forget_bias,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def peephole_lstm(
    hidden_size: int,
    *,
    kernel_init: Initializer = _defaults["kernel_init"],
    recurrent_kernel_init: Initializer = _defaults["recurrent_kernel_init"],
    bias_init: Initializer = _defaults["bias_init"],
    peephole_init: Initializer = _defaults["peephole_init"],
    forget_bias: float | jax.Array = 1.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""LSTM with diagonal peephole connections (Gers & Schmidhuber 2000).

    The gates also see the cell state: the input and forget gates see :math:`c_{t-1}`,
    the output gate sees the new :math:`c_t`:

    .. math::

        i_t &= \sigma(W_i x_t + U_i h_{t-1} + p_i \odot c_{t-1} + b_i) \\
        f_t &= \sigma(W_f x_t + U_f h_{t-1} + p_f \odot c_{t-1} + b_f) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot \tanh(W_g x_t + U_g h_{t-1} + b_g) \\
        o_t &= \sigma(W_o x_t + U_o h_{t-1} + p_o \odot c_t + b_o) \\
        h_t &= o_t \odot \tanh(c_t)

    Parameters (:class:`LSTMParams`): as :func:`lstm` plus ``peephole_input``,
    ``peephole_forget`` and ``peephole_output``, each ``(H,)``. Parameter count
    ``4H(F + H + 1) + 3H``. Carry: :class:`LSTMState` as for :func:`lstm`.

    Args:
      hidden_size: ``H``.
      peephole_init: initialiser of each ``(H,)`` peephole vector (zeros by default, so the
        cell starts as a standard LSTM and learns to use the cell state).
      kernel_init, recurrent_kernel_init, bias_init, forget_bias, dtype, param_dtype:
        as for :func:`lstm`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.peephole_lstm(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> recurrent.count_params(params) - recurrent.count_params(recurrent.lstm(16).init(jax.random.key(0), (8,)))
    48
    """
    return _lstm_family(
        hidden_size,
        peephole=True,
        coupled=False,
        name="peephole_lstm",
        kernel_init=kernel_init,
        recurrent_kernel_init=recurrent_kernel_init,
        bias_init=bias_init,
        peephole_init=peephole_init,
        forget_bias=forget_bias,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def cifg_lstm(
    hidden_size: int,
    *,
    peephole: bool = False,
    kernel_init: Initializer = _defaults["kernel_init"],
    recurrent_kernel_init: Initializer = _defaults["recurrent_kernel_init"],
    bias_init: Initializer = _defaults["bias_init"],
    peephole_init: Initializer = _defaults["peephole_init"],
    forget_bias: float | jax.Array = 1.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""LSTM with coupled input and forget gates (CIFG, Greff et al. 2017): :math:`i_t = 1 - f_t`.

    .. math::

        f_t &= \sigma(W_f x_t + U_f h_{t-1} [+ p_f \odot c_{t-1}] + b_f) \\
        c_t &= f_t \odot c_{t-1} + (1 - f_t) \odot \tanh(W_g x_t + U_g h_{t-1} + b_g) \\
        o_t &= \sigma(W_o x_t + U_o h_{t-1} [+ p_o \odot c_t] + b_o) \\
        h_t &= o_t \odot \tanh(c_t)

    Three gate blocks instead of four, fused in ``CIFG_GATES`` order (f, g, o):
    ``input_kernel (F, 3H)``, ``recurrent_kernel (H, 3H)``, ``bias (3H,)``; with
    ``peephole=True`` also ``peephole_forget`` and ``peephole_output`` ``(H,)`` (Greff's CIFG
    keeps peepholes). Parameter count ``3H(F + H + 1)`` (``+ 2H`` with peepholes).
    Carry: :class:`LSTMState` as for :func:`lstm`.

    Args:
      hidden_size: ``H``.
      peephole: add the forget and output peepholes.
      kernel_init, recurrent_kernel_init, bias_init, peephole_init, forget_bias, dtype,
        param_dtype: as for :func:`peephole_lstm`.

    Example:

    >>> import jax, recurrent
    >>> params = recurrent.cifg_lstm(16).init(jax.random.key(0), (8,))
    >>> params.input_kernel.shape, params.recurrent_kernel.shape
    ((8, 48), (16, 48))
    """
    return _lstm_family(
        hidden_size,
        peephole=peephole,
        coupled=True,
        name="cifg_lstm",
        kernel_init=kernel_init,
        recurrent_kernel_init=recurrent_kernel_init,
        bias_init=bias_init,
        peephole_init=peephole_init,
        forget_bias=forget_bias,
        dtype=dtype,
        param_dtype=param_dtype,
    )
