"""Convolutional recurrent cells over 1, 2 or 3 spatial axes, channels last: ConvLSTM (Shi et al.
2015) and ConvGRU (Ballas et al. 2016)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import Cell, LSTMState
from recurrent._gru import GRU_GATES, GRULayerNormParams
from recurrent._lstm import (
    LSTM_GATES,
    Initializer,
    LayerNormParams,
    fused_blocks,
    init_bias,
    init_recurrent_bias,
    lstm_gates,
    lstm_pointwise,
    project_input,
    resolve_forget_bias,
)


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
    layer_norm: LayerNormParams | None = None


class ConvGRUParams(NamedTuple):
    """Parameters of a ConvGRU with ``n = len(kernel_size)`` spatial axes, gate blocks in
    ``GRU_GATES`` order (r, z, n).

    Attributes:
      input_kernel: ``(*kernel_size, C, 3H)``.
      recurrent_kernel: ``(*kernel_size, H, 3H)``.
      bias: ``(3H,)``.
      recurrent_bias: ``(H,)`` candidate's recurrent bias (``reset_after=True``) or ``None``.
      layer_norm: :class:`GRULayerNormParams` or ``None``.
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array
    recurrent_bias: jax.Array | None = None
    layer_norm: GRULayerNormParams | None = None


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _conv(x, kernel, n, out_dtype=None):
    """'Same' convolution of ``x (*lead, *S, C)`` with ``kernel (*K, C, O)``; any leading axes;
    accumulated and returned in ``out_dtype`` (see ``_core.matmul``). On CPU its derivatives
    are matmuls over patches (:func:`_conv_matmul_derivatives`)."""
    lead, rest = x.shape[: x.ndim - n - 1], x.shape[x.ndim - n - 1 :]
    conv = _conv_matmul_derivatives if jax.default_backend() == "cpu" else _conv_same
    y = conv(x.reshape((math.prod(lead), *rest)), kernel, n, out_dtype)
    return y.reshape((*lead, *y.shape[1:]))


def _conv_same(x, kernel, n, out_dtype):
    s = _SPATIAL[n]
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * n,
        padding="SAME",
        dimension_numbers=(f"N{s}C", f"{s}IO", f"N{s}C"),
        preferred_element_type=out_dtype,
    )


def _conv_as_matmul(x, kernel, n, out_dtype):
    """:func:`_conv_same` as one matmul: ``x``'s ``(N, *S, C * prod(K))`` patches (an exact
    copy of its windows) times the kernel flattened in the patches' ``(C, *K)`` order."""
    s = _SPATIAL[n]
    patches = lax.conv_general_dilated_patches(
        x,
        kernel.shape[:n],
        (1,) * n,
        "SAME",
        dimension_numbers=(f"N{s}C", f"{s}IO", f"N{s}C"),
        precision=lax.Precision.HIGHEST,  # a copy: no reduced-precision passes on TPU
    )
    flat = jnp.moveaxis(kernel, -2, 0).reshape((-1, kernel.shape[-1]))
    return _core.matmul(patches, flat, out_dtype)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_matmul_derivatives(x, kernel, n, out_dtype):
    """:func:`_conv_same`, whose tangent (and so, transposed, its gradients) is computed by
    :func:`_conv_as_matmul` instead of by convolutions.

    Inside a ``lax.scan``, XLA's CPU backend runs the convolutions that autodiff makes for a
    convolution's gradients (its kernel gradient especially, a convolution with batch and
    feature axes swapped) on a slow generic path: a ConvLSTM's forward+backward over 10 steps
    took 15 s against 0.1 s forward (batch 16, 16x16x16 inputs, 64 channels; Flax's
    ``ConvLSTMCell`` the same). As matmuls over patches the gradients take 0.4 s there
    (``python -m benchmarks.unroll_ab --cases convlstm`` times it), and forward mode
    (``jax.jvp``) still works. The patches of the primal input are recomputed in the backward
    pass rather than stored (``jax.checkpoint``), so memory stays that of a convolution."""
    return _conv_same(x, kernel, n, out_dtype)


def _conv_matmul_derivatives_jvp(n, out_dtype, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv_same(x, kernel, n, out_dtype)
    zero = jax.custom_derivatives.SymbolicZero
    terms = []
    if not isinstance(dx, zero):
        terms.append(_conv_as_matmul(dx, kernel, n, out_dtype))
    if not isinstance(dkernel, zero):
        terms.append(jax.checkpoint(lambda x, dk: _conv_as_matmul(x, dk, n, out_dtype))(x, dkernel))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_conv_matmul_derivatives.defjvp(_conv_matmul_derivatives_jvp, symbolic_zeros=True)


def _normalize(x, scale, offset, n, eps):
    """Layer normalisation over a step's spatial and channel axes (the last ``n + 1``), with
    a gain (and offset) per channel, so the parameters do not depend on the spatial size."""
    axes = tuple(range(x.ndim - n - 1, x.ndim))
    mean = x.mean(axes, keepdims=True)
    var = jnp.square(x - mean).mean(axes, keepdims=True)
    y = (x - mean) * lax.rsqrt(var + eps) * scale
    return y if offset is None else y + offset


class _Spatial(NamedTuple):
    """Validated spatial settings shared by the convolutional cells."""

    where: str
    H: int
    kernel_size: tuple[int, ...]
    n: int

    def check_input_shape(self, input_shape, what):
        if len(input_shape) != self.n + 1:
            raise _core.error(
                f"{self.where}.{what}: input shape must be ({'spatial, ' * self.n}channels) "
                f"for kernel_size={self.kernel_size}.",
                expected=f"{self.n} spatial axes and a channel axis (channels last)",
                got=repr(tuple(input_shape)),
                fix="put channels last and give one kernel size per spatial axis.",
            )

    def check_x_shape(self, x_shape):
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{self.where}.initial_carry")
        if len(x_shape) < self.n + 1:
            raise _core.error(
                f"{self.where}.initial_carry: `x_shape` must be one step's input shape with its batch axes.",
                expected=f"(*batch, {'spatial, ' * self.n}channels)",
                got=repr(x_shape),
                fix="pass x.shape of one time step.",
            )
        return x_shape

    def check_x(self, x, C, spatial=None):
        if not hasattr(x, "ndim") or x.ndim < self.n + 1:
            self.check_input_shape(tuple(getattr(x, "shape", ())), "step")
        if spatial is not None:
            _core.check_input(x, (*spatial, C), where=self.where, fix="peephole weights fix the spatial size: re-init.")
        elif x.shape[-1] != C:
            _core.check_input(
                x, (*x.shape[x.ndim - self.n - 1 : -1], C), where=self.where, fix="give inputs with C channels last."
            )


def _spatial(where, hidden_channels, kernel_size) -> _Spatial:
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
    if len(kernel_size) not in _SPATIAL:
        raise _core.error(
            f"{where}: spatial rank must be 1, 2 or 3.",
            expected="len(kernel_size) in (1, 2, 3)",
            got=f"kernel_size={kernel_size}",
            fix="give one kernel size per spatial axis.",
        )
    return _Spatial(where, H, kernel_size, len(kernel_size))


def conv_lstm(
    hidden_channels: int,
    kernel_size: Sequence[int],
    *,
    peephole: bool = False,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    peephole_init: Initializer = jax.nn.initializers.zeros,
    forget_bias: float | jax.Array | None = None,
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
    ``recurrent_kernel (*K, H, 4H)``, ``bias (4H,)`` in ``LSTM_GATES`` order (i, f, g, o), with
    ``peephole=True`` three ``(*S, H)`` peephole arrays, and with ``layer_norm=True`` a
    :class:`LayerNormParams` of per-channel gains. Carry: :class:`LSTMState` ``(h, c)``, each
    ``(*batch, *S, H)``, ``c`` in float32.

    Args:
      hidden_channels: ``H``, channels of the hidden and cell states.
      kernel_size: the convolution window, one int per spatial axis.
      peephole: add the Hadamard peepholes of the paper.
      layer_norm: layer normalisation (Ba et al. 2016) of ``W * X``, ``U * H`` and ``C`` before
        the output activation, with statistics over each step's spatial and channel axes and a
        gain per channel (and an offset for ``C``), as in :func:`recurrent.lstm`.
      layer_norm_epsilon: added to the variance in layer normalisation.
      kernel_init: initialiser of each ``(*K, C, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(*K, H, H)`` block (orthogonal by default,
        over the flattened receptive field).
      bias_init, peephole_init, forget_bias, dtype, param_dtype: as for :func:`recurrent.lstm`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.conv_lstm(8, (3, 3))
    >>> params = cell.init(jax.random.key(0), (16, 16, 1))
    >>> x = jnp.ones((4, 16, 16, 1))
    >>> carry, y = cell.step(params, cell.initial_carry(params, x.shape), x)
    >>> y.shape
    (4, 16, 16, 8)
    """
    options = dict(locals())
    sp = _spatial("recurrent.conv_lstm", hidden_channels, kernel_size)
    where, H, kernel_size, n = sp
    forget = LSTM_GATES.index("forget")
    forget_bias = resolve_forget_bias(forget_bias, bias_init, LSTM_GATES, where=where)
    eps = layer_norm_epsilon

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        sp.check_input_shape(input_shape, "init")
        *S, C = input_shape
        k_in, k_rec, k_b, k_pi, k_pf, k_po = jax.random.split(key, 6)
        bias = init_bias(bias_init, k_b, H, LSTM_GATES, param_dtype)
        bias = bias.at[forget * H : (forget + 1) * H].add(jnp.asarray(forget_bias, param_dtype))
        peep = lambda k: peephole_init(k, (*S, H), param_dtype) if peephole else None  # noqa: E731
        ones = lambda m: jnp.ones((m,), param_dtype)  # noqa: E731
        return ConvLSTMParams(
            input_kernel=fused_blocks(kernel_init, k_in, (*kernel_size, C, H), 4, param_dtype),
            recurrent_kernel=fused_blocks(recurrent_kernel_init, k_rec, (*kernel_size, H, H), 4, param_dtype),
            bias=bias,
            peephole_input=peep(k_pi),
            peephole_forget=peep(k_pf),
            peephole_output=peep(k_po),
            layer_norm=(
                LayerNormParams(ones(4 * H), ones(4 * H), ones(H), jnp.zeros((H,), param_dtype)) if layer_norm else None
            ),
        )

    def _dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = sp.check_x_shape(x_shape)
        cdt, sdt = _dtypes(params)
        shape = (*x_shape[:-1], H)
        return LSTMState(h=jnp.zeros(shape, cdt), c=jnp.zeros(shape, sdt))

    def project(params, x):
        spatial = None if params.peephole_forget is None else tuple(params.peephole_forget.shape[:-1])
        sp.check_x(x, params.input_kernel.shape[-2], spatial)
        norm = (lambda v, scale: _normalize(v, scale, None, n, eps)) if layer_norm else None
        return project_input(lambda v, k, out: _conv(v, k, n, out), x, params, norm, *_dtypes(params))

    def probe(params, carry, xp, noise=None):
        cdt, sdt = _dtypes(params)
        h, c = _core.noisy_input(noise, carry.h), carry.c
        rec = _conv(h.astype(cdt), params.recurrent_kernel.astype(cdt), n, sdt)
        if layer_norm:
            rec = _normalize(rec, params.layer_norm.recurrent_scale.astype(sdt), None, n, eps)
        i, f, g, o = jnp.split(xp.astype(sdt) + rec, 4, axis=-1)
        if peephole:
            i = i + params.peephole_input.astype(sdt) * c
            f = f + params.peephole_forget.astype(sdt) * c
        if not layer_norm:  # the elementwise half with a written-out derivative, as for lstm()
            p_o = params.peephole_output.astype(sdt) if peephole else None
            m, c_new = lstm_pointwise(False, f, i, g, o, c, p_o)
            new = _core.zoneout(noise, carry, LSTMState(m.astype(cdt), c_new))
            # the gates for `return_trace`: unused they cost nothing; XLA merges them with the same
            # expressions inside `lstm_pointwise`
            gates = lstm_gates(False, f, i, g, o, c, p_o)[:4]
            return new, new.h, dict(zip(("input", "forget", "cell", "output"), gates))
        i, f, g = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g)
        c = f * c + i * g
        if peephole:
            o = o + params.peephole_output.astype(sdt) * c
        o = jax.nn.sigmoid(o)
        c_out = c
        if layer_norm:
            ln = params.layer_norm
            c_out = _normalize(c, ln.cell_scale.astype(sdt), ln.cell_offset.astype(sdt), n, eps)
        new = _core.zoneout(noise, carry, LSTMState((o * jnp.tanh(c_out)).astype(cdt), c))
        return new, new.h, {"input": i, "forget": f, "cell": g, "output": o}

    def output_shape(input_shape):
        return (*tuple(input_shape)[:-1], H)

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=output_shape,
        input_rank=n + 1,
        name="conv_lstm",
        options=options,
        spec=_core.cell_spec(
            recurrent_input="h", cell_state=("c",), recurrent_kernels=("recurrent_kernel",), compute_dtype=dtype
        ),
    )


def conv_gru(
    hidden_channels: int,
    kernel_size: Sequence[int],
    *,
    reset_after: bool = True,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""Convolutional GRU (Ballas et al. 2016), 'same' padding, channels last.

    The GRU of :func:`recurrent.gru` with convolutions (:math:`*`) for both transitions:

    .. math::

        r_t &= \sigma(W_r * X_t + U_r * H_{t-1} + b_r) \\
        z_t &= \sigma(W_z * X_t + U_z * H_{t-1} + b_z) \\
        n_t &= \tanh(W_n * X_t + b_n + r_t \circ (U_n * H_{t-1} + b_{hn})) \\
        H_t &= (1 - z_t) \circ n_t + z_t \circ H_{t-1}

    (with ``reset_after=False``: :math:`n_t = \tanh(W_n * X_t + U_n * (r_t \circ H_{t-1}) + b_n)`).

    Parameters (:class:`ConvGRUParams`): ``input_kernel (*K, C, 3H)``,
    ``recurrent_kernel (*K, H, 3H)``, ``bias (3H,)`` in ``GRU_GATES`` order, ``recurrent_bias
    (H,)`` when ``reset_after``, and with ``layer_norm=True`` per-channel gains. Carry: the
    array ``H`` of shape ``(*batch, *S, H)`` in float32.

    Args:
      hidden_channels: ``H``.
      kernel_size: one int per spatial axis.
      reset_after: where the reset gate is applied, as for :func:`recurrent.gru`.
      layer_norm: layer normalisation of the two convolutions' outputs, with statistics over
        each step's spatial and channel axes and a gain per channel.
      layer_norm_epsilon, kernel_init, recurrent_kernel_init, bias_init, dtype, param_dtype:
        as for :func:`conv_lstm`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.conv_gru(4, (3,))
    >>> params = cell.init(jax.random.key(0), (10, 2))
    >>> carry, ys = recurrent.rnn(cell).apply(params, jnp.ones((5, 7, 10, 2)))
    >>> ys.shape, carry.shape
    ((5, 7, 10, 4), (5, 10, 4))
    """
    options = dict(locals())
    sp = _spatial("recurrent.conv_gru", hidden_channels, kernel_size)
    where, H, kernel_size, n = sp
    eps = layer_norm_epsilon

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        sp.check_input_shape(input_shape, "init")
        C = input_shape[-1]
        k_in, k_rec, k_b, k_rb = jax.random.split(key, 4)
        return ConvGRUParams(
            input_kernel=fused_blocks(kernel_init, k_in, (*kernel_size, C, H), 3, param_dtype),
            recurrent_kernel=fused_blocks(recurrent_kernel_init, k_rec, (*kernel_size, H, H), 3, param_dtype),
            bias=init_bias(bias_init, k_b, H, GRU_GATES, param_dtype),
            recurrent_bias=init_recurrent_bias(bias_init, k_rb, H, param_dtype) if reset_after else None,
            layer_norm=(
                GRULayerNormParams(jnp.ones((3 * H,), param_dtype), jnp.ones((3 * H,), param_dtype))
                if layer_norm
                else None
            ),
        )

    def _dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = sp.check_x_shape(x_shape)
        _, sdt = _dtypes(params)
        return jnp.zeros((*x_shape[:-1], H), sdt)

    def project(params, x):
        sp.check_x(x, params.input_kernel.shape[-2])
        norm = (lambda v, scale: _normalize(v, scale, None, n, eps)) if layer_norm else None
        return project_input(lambda v, k, out: _conv(v, k, n, out), x, params, norm, *_dtypes(params))

    def probe(params, h_prev, xp, noise=None):
        cdt, sdt = _dtypes(params)
        h = _core.noisy_input(noise, h_prev)  # the recurrent input; the update uses h_prev
        U = params.recurrent_kernel.astype(cdt)
        norm = lambda v, sl: _normalize(v, params.layer_norm.recurrent_scale[sl].astype(sdt), None, n, eps)  # noqa: E731
        x_r, x_z, x_n = jnp.split(xp.astype(sdt), 3, axis=-1)
        if reset_after:
            rec = _conv(h.astype(cdt), U, n, sdt)
            rec = norm(rec, slice(None)) if layer_norm else rec
            h_r, h_z, h_n = jnp.split(rec, 3, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            cand = jnp.tanh(x_n + r * (h_n + params.recurrent_bias.astype(sdt)))
        else:
            rec = _conv(h.astype(cdt), U[..., : 2 * H], n, sdt)
            rec = norm(rec, slice(0, 2 * H)) if layer_norm else rec
            h_r, h_z = jnp.split(rec, 2, axis=-1)
            r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
            rec_n = _conv((r * h).astype(cdt), U[..., 2 * H :], n, sdt)
            cand = jnp.tanh(x_n + (norm(rec_n, slice(2 * H, None)) if layer_norm else rec_n))
        h = _core.zoneout(noise, h_prev, (1.0 - z) * cand + z * h_prev)
        return h, h.astype(cdt), {"reset": r, "update": z, "candidate": cand}

    def output_shape(input_shape):
        return (*tuple(input_shape)[:-1], H)

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=output_shape,
        input_rank=n + 1,
        name="conv_gru",
        options=options,
        spec=_core.cell_spec(recurrent_input=None, recurrent_kernels=("recurrent_kernel",), compute_dtype=dtype),
    )
