"""Convolutional LSTM (Shi et al. 2015) over 1, 2 or 3 spatial axes, channels last."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import Cell, LSTMState
from recurrent._lstm import LSTM_GATES, Initializer, fused_blocks


class ConvLSTMParams(NamedTuple):
    """Parameters of a ConvLSTM with ``n = len(kernel_size)`` spatial axes.

    Attributes:
      input_kernel: ``(*kernel_size, C, 4H)``, input-to-state convolution, gate blocks in
        ``LSTM_GATES`` order (i, f, g, o).
      recurrent_kernel: ``(*kernel_size, H, 4H)``, state-to-state convolution.
      bias: ``(4H,)``.
      peephole_input, peephole_forget, peephole_output: ``(*S, H)`` Hadamard peepholes
        (one weight per position and channel, as in the paper), or ``None``.
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array
    peephole_input: jax.Array | None = None
    peephole_forget: jax.Array | None = None
    peephole_output: jax.Array | None = None


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _conv(x, kernel, n):
    """'Same' convolution of ``x (*lead, *S, C)`` with ``kernel (*K, C, O)``; any leading axes."""
    lead, rest = x.shape[: x.ndim - n - 1], x.shape[x.ndim - n - 1 :]
    s = _SPATIAL[n]
    y = lax.conv_general_dilated(
        x.reshape((math.prod(lead), *rest)),
        kernel,
        window_strides=(1,) * n,
        padding="SAME",
        dimension_numbers=(f"N{s}C", f"{s}IO", f"N{s}C"),
    )
    return y.reshape((*lead, *y.shape[1:]))


def conv_lstm(
    hidden_channels: int,
    kernel_size: Sequence[int],
    *,
    peephole: bool = False,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    peephole_init: Initializer = jax.nn.initializers.zeros,
    forget_bias: float | jax.Array = 1.0,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""Convolutional LSTM (Shi et al. 2015), 'same' padding, channels last.

    Input-to-state and state-to-state transitions are convolutions (:math:`*`); the optional
    peepholes are Hadamard products (:math:`\circ`) with the cell state:

    .. math::

        i_t &= \sigma(W_{xi} * X_t + W_{hi} * H_{t-1} [+ W_{ci} \circ C_{t-1}] + b_i) \\
        f_t &= \sigma(W_{xf} * X_t + W_{hf} * H_{t-1} [+ W_{cf} \circ C_{t-1}] + b_f) \\
        C_t &= f_t \circ C_{t-1} + i_t \circ \tanh(W_{xc} * X_t + W_{hc} * H_{t-1} + b_c) \\
        o_t &= \sigma(W_{xo} * X_t + W_{ho} * H_{t-1} [+ W_{co} \circ C_t] + b_o) \\
        H_t &= o_t \circ \tanh(C_t)

    The spatial rank (1, 2 or 3) is ``len(kernel_size)``; one step's input is
    ``(*batch, *S, C)`` and its output ``(*batch, *S, H)``.

    Parameters (:class:`ConvLSTMParams`): ``input_kernel (*K, C, 4H)``,
    ``recurrent_kernel (*K, H, 4H)``, ``bias (4H,)`` in ``LSTM_GATES`` order (i, f, g, o), and
    with ``peephole=True`` three ``(*S, H)`` peephole arrays. Carry: :class:`LSTMState`
    ``(h, c)``, each ``(*batch, *S, H)``, ``c`` in float32.

    Args:
      hidden_channels: ``H``, channels of the hidden and cell states.
      kernel_size: the convolution window, one odd or even int per spatial axis.
      peephole: add the Hadamard peepholes of the paper.
      kernel_init: initialiser of each ``(*K, C, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(*K, H, H)`` block (orthogonal by default,
        over the flattened receptive field).
      bias_init, peephole_init, forget_bias, dtype, param_dtype: as for
        :func:`recurrent.peephole_lstm`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.conv_lstm(8, (3, 3))
    >>> params = cell.init(jax.random.key(0), (16, 16, 1))
    >>> x = jnp.ones((4, 16, 16, 1))
    >>> carry, y = cell.step(params, cell.initial_carry(params, x.shape), x)
    >>> y.shape
    (4, 16, 16, 8)
    """
    where = "recurrent.conv_lstm"
    H = _core.check_positive_int("hidden_channels", hidden_channels, where=where)
    try:
        kernel_size = tuple(_core.check_positive_int("kernel_size[i]", k, where=where) for k in kernel_size)
    except TypeError:
        raise _core.error(
            f"{where}: `kernel_size` must be a tuple of ints, one per spatial axis.",
            expected="e.g. (5,), (3, 3) or (3, 3, 3)",
            got=repr(kernel_size),
            fix="pass kernel_size=(3, 3) for images.",
        ) from None
    n = len(kernel_size)
    if n not in _SPATIAL:
        raise _core.error(
            f"{where}: spatial rank must be 1, 2 or 3.",
            expected="len(kernel_size) in (1, 2, 3)",
            got=f"kernel_size={kernel_size}",
            fix="give one kernel size per spatial axis.",
        )
    forget = LSTM_GATES.index("forget")

    def _check_input_shape(input_shape, what):
        if len(input_shape) != n + 1:
            raise _core.error(
                f"{where}.{what}: input shape must be ({'spatial, ' * n}channels) for kernel_size={kernel_size}.",
                expected=f"{n} spatial axes and a channel axis (channels last)",
                got=repr(input_shape),
                fix="put channels last and give one kernel size per spatial axis.",
            )

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        _check_input_shape(input_shape, "init")
        *S, C = input_shape
        k_in, k_rec, k_b, k_pi, k_pf, k_po = jax.random.split(key, 6)
        bias = fused_blocks(bias_init, k_b, (H,), 4, param_dtype)
        bias = bias.at[forget * H : (forget + 1) * H].add(jnp.asarray(forget_bias, param_dtype))
        peep = lambda k: peephole_init(k, (*S, H), param_dtype) if peephole else None  # noqa: E731
        return ConvLSTMParams(
            input_kernel=fused_blocks(kernel_init, k_in, (*kernel_size, C, H), 4, param_dtype),
            recurrent_kernel=fused_blocks(recurrent_kernel_init, k_rec, (*kernel_size, H, H), 4, param_dtype),
            bias=bias,
            peephole_input=peep(k_pi),
            peephole_forget=peep(k_pf),
            peephole_output=peep(k_po),
        )

    def _dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
        if len(x_shape) < n + 1:
            raise _core.error(
                f"{where}.initial_carry: `x_shape` must be one step's input shape with its batch axes.",
                expected=f"(*batch, {'spatial, ' * n}channels)",
                got=repr(x_shape),
                fix="pass x.shape of one time step.",
            )
        cdt, sdt = _dtypes(params)
        shape = (*x_shape[:-1], H)
        return LSTMState(h=jnp.zeros(shape, cdt), c=jnp.zeros(shape, sdt))

    def project(params, x):
        C = params.input_kernel.shape[-2]
        if x.ndim < n + 1:
            _check_input_shape(tuple(x.shape), "step")
        if params.peephole_forget is not None:
            S = tuple(params.peephole_forget.shape[:-1])
            _core.check_input(x, (*S, C), where=where, fix="peephole weights fix the spatial size at init: re-init.")
        elif x.shape[-1] != C:
            _core.check_input(x, (*x.shape[x.ndim - n - 1 : -1], C), where=where, fix="give inputs with C channels last.")
        cdt, _ = _dtypes(params)
        return _conv(x.astype(cdt), params.input_kernel.astype(cdt), n) + params.bias.astype(cdt)

    def recur(params, carry, xp):
        cdt, sdt = _dtypes(params)
        h, c = carry
        z = (xp + _conv(h.astype(cdt), params.recurrent_kernel.astype(cdt), n)).astype(sdt)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        if peephole:
            i = i + params.peephole_input.astype(sdt) * c
            f = f + params.peephole_forget.astype(sdt) * c
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        if peephole:
            o = o + params.peephole_output.astype(sdt) * c
        h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(cdt)
        return LSTMState(h, c), h

    def step(params, carry, x):
        return recur(params, carry, project(params, x))

    def output_shape(input_shape):
        return (*tuple(input_shape)[:-1], H)

    return Cell(init, initial_carry, step, project, recur, output_shape, n + 1, "conv_lstm")
