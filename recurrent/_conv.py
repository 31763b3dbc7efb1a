"""Convolutional recurrent cells over 1, 2 or 3 spatial axes, channels last: ConvLSTM (Shi et al.
2015) and ConvGRU (Ballas et al. 2016)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import Cell
from recurrent._gru import GRULayerNormParams, _gru_family
from recurrent._lstm import Initializer, LayerNormParams, _lstm_family, lstm_pointwise


class ConvLSTMParams(NamedTuple):
    """Parameters of a ConvLSTM with ``n = len(kernel_size)`` spatial axes and ``G`` gate blocks
    (4 for the full set, 3 without one).

    Attributes:
      input_kernel: ``(*kernel_size, C, G*H)``, input-to-state convolution, gate blocks in
        ``LSTM_GATES`` order (i, f, g, o) with absent gates dropped (``CIFG_GATES`` for CIFG).
      recurrent_kernel: ``(*kernel_size, H, G*H)``, state-to-state convolution.
      bias: ``(G*H,)``.
      peephole_input, peephole_forget, peephole_output: ``(*S, H)`` Hadamard peepholes
        (one weight per position and channel, as in the paper), or ``None``.
      layer_norm: :class:`LayerNormParams` of per-channel gains, or ``None``.
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


class ConvTransform(NamedTuple):
    """The transform of the convolutional cells: a 'same' convolution (:func:`_conv`) over
    ``len(kernel_size)`` spatial axes, channels last, where the dense cells have a matmul; the
    protocol is :class:`recurrent._lstm.DenseTransform`'s.

    Layer normalisation takes its statistics over a step's spatial and channel axes, with a gain
    (and offset) per channel, so its parameters do not depend on the spatial size. Peepholes are
    ``(*S, H)``, one weight per position and channel: the Hadamard product of Shi et al. 2015."""

    where: str
    kernel_size: tuple[int, ...]

    sequence_kernels = False  # the whole-layer kernels run matmuls

    @property
    def n(self) -> int:
        return len(self.kernel_size)

    @property
    def input_rank(self) -> int:
        return self.n + 1

    def split(self, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{self.where}.init")
        self.check_input_shape(input_shape, "init")
        return tuple(input_shape[:-1]), input_shape[-1]

    def kernel_shape(self, fan_in, fan_out):
        return (*self.kernel_size, fan_in, fan_out)

    def apply(self, x, kernel, out_dtype):
        return _conv(x, kernel, self.n, out_dtype)

    def norm(self, x, scale, offset=None, *, eps):
        return _normalize(x, scale, offset, self.n, eps)

    def output_shape(self, input_shape, size):
        return (*tuple(input_shape)[:-1], size)

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

    @staticmethod
    def lstm_pointwise(*args):
        return lstm_pointwise(*args)  # read from this module when traced


def _transform(where, hidden_channels, kernel_size) -> ConvTransform:
    """Checks ``hidden_channels`` and ``kernel_size``; the transform of ``kernel_size``."""
    _core.check_positive_int("hidden_channels", hidden_channels, where=where)
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
    return ConvTransform(where, kernel_size)


# The options of recurrent.lstm that have no field in ConvLSTMParams, with the values that add nothing.
_DENSE_ONLY = {
    "proj_size": None,
    "proj_clip": None,
    "projection_init": None,
    "gate_recurrence": False,
    "gate_recurrent_kernel_init": None,
}


def _refuse_dense_only(where: str, given: dict[str, Any]) -> None:
    """Raises on options of :func:`recurrent.lstm` that the ConvLSTM does not have (a projection,
    the full gate recurrence), and on unknown options."""
    for name, value in given.items():
        if name in _DENSE_ONLY and value is _DENSE_ONLY[name]:
            continue
        if name not in _DENSE_ONLY:
            raise _core.error(
                f"{where}: unknown option `{name}`.",
                expected="an option of recurrent.conv_lstm (see its docstring)",
                got=f"{name}={value!r}",
                fix="check the spelling; conv_lstm takes every option of recurrent.lstm but the projection "
                "and the full gate recurrence.",
            )
        raise _core.error(
            f"{where}: `{name}` belongs to the projection (LSTMP) or the full gate recurrence (FGR) of "
            "recurrent.lstm, which the ConvLSTM does not have (ConvLSTMParams holds no such weights).",
            expected=f"{name}={_DENSE_ONLY[name]!r} (the default)",
            got=f"{name}={value!r}",
            fix="drop it; to change the number of output channels, apply a 1x1 convolution to the layer's "
            "outputs, or use recurrent.lstm on flattened inputs.",
        )


def conv_lstm(
    hidden_channels: int,
    kernel_size: Sequence[int],
    *,
    peephole: bool = False,
    coupled: bool = False,
    input_gate: bool = True,
    forget_gate: bool = True,
    output_gate: bool = True,
    input_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    output_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    cell_clip: float | jax.Array | None = None,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    peephole_init: Initializer = jax.nn.initializers.zeros,
    forget_bias: float | jax.Array | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    **dense_only: Any,
) -> Cell:
    r"""Convolutional LSTM (Shi et al. 2015), 'same' padding, channels last.

    The LSTM of :func:`recurrent.lstm` with convolutions (:math:`*`) for the input-to-state and
    state-to-state transitions; the optional peepholes are Hadamard products (:math:`\circ`)
    with the cell state:

    .. math::

        i_t &= \sigma(W_{xi} * X_t + W_{hi} * H_{t-1} [+ W_{ci} \circ C_{t-1}] + b_i) \\
        f_t &= \sigma(W_{xf} * X_t + W_{hf} * H_{t-1} [+ W_{cf} \circ C_{t-1}] + b_f) \\
        C_t &= f_t \circ C_{t-1} + i_t \circ \tanh(W_{xc} * X_t + W_{hc} * H_{t-1} + b_c) \\
        o_t &= \sigma(W_{xo} * X_t + W_{ho} * H_{t-1} [+ W_{co} \circ C_t] + b_o) \\
        H_t &= o_t \circ \tanh(C_t)

    The gate arithmetic is the LSTM family's, so its options compose here as there: CIFG
    (``coupled``), Greff et al.'s gate ablations and activations, layer normalisation, cell
    clipping, chrono initialisation. The projection (``proj_size``, ``proj_clip``) and the
    full gate recurrence (``gate_recurrence``) have no weights in :class:`ConvLSTMParams` and
    are refused.

    The spatial rank (1, 2 or 3) is ``len(kernel_size)``; one step's input is
    ``(*batch, *S, C)`` and its output ``(*batch, *S, H)``.

    Parameters (:class:`ConvLSTMParams`), ``G`` gate blocks (4, or 3 with one gate removed or
    coupled) fused in ``LSTM_GATES`` order (i, f, g, o) with absent gates dropped:
    ``input_kernel (*K, C, G*H)``, ``recurrent_kernel (*K, H, G*H)``, ``bias (G*H,)``; with
    ``peephole=True`` a ``(*S, H)`` peephole per sigmoid gate present (one weight per position
    and channel, as in the paper, so they fix the spatial size); with ``layer_norm=True`` a
    :class:`LayerNormParams` of per-channel gains. Parameter count ``G H (k (C + H) + 1)`` with
    ``k = prod(kernel_size)``, plus ``prod(S) H`` per peephole and ``2 G H + 2 H`` for layer
    norm. Carry: :class:`LSTMState` ``(h, c)``, each ``(*batch, *S, H)``, ``c`` in float32.

    Args:
      hidden_channels: ``H``, channels of the hidden and cell states.
      kernel_size: the convolution window, one int per spatial axis.
      peephole: add the Hadamard peepholes of the paper.
      coupled: ``i = 1 - f`` (CIFG); drops the input block.
      input_gate, forget_gate, output_gate: ``False`` removes the gate (fixed to 1) with its
        blocks and peephole.
      input_activation, output_activation: applied to the candidate and to the cell state in
        ``H = o * act(C)`` (``tanh``); ``None`` for the identity.
      layer_norm: layer normalisation (Ba et al. 2016) of ``W * X``, ``U * H`` and ``C`` before
        the output activation, with statistics over each step's spatial and channel axes and a
        gain per channel (and an offset for ``C``), as in :func:`recurrent.lstm`.
      layer_norm_epsilon: added to the variance in layer normalisation.
      cell_clip: clip ``C`` to ``[-cell_clip, cell_clip]`` after each update.
      kernel_init: initialiser of each ``(*K, C, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(*K, H, H)`` block (orthogonal by default,
        over the flattened receptive field).
      bias_init, peephole_init, forget_bias, dtype, param_dtype: as for :func:`recurrent.lstm`
        (``bias_init`` may be :func:`recurrent.chrono_init`).
      **dense_only: ``proj_size``, ``proj_clip``, ``gate_recurrence`` and their initialisers
        are accepted only at their defaults; anything else raises.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.conv_lstm(8, (3, 3))
    >>> params = cell.init(jax.random.key(0), (16, 16, 1))
    >>> x = jnp.ones((4, 16, 16, 1))
    >>> carry, y = cell.step(params, cell.initial_carry(params, x.shape), x)
    >>> y.shape
    (4, 16, 16, 8)
    >>> cell = recurrent.conv_lstm(4, (3,), coupled=True, peephole=True, layer_norm=True, cell_clip=3.0)
    >>> params = cell.init(jax.random.key(0), (10, 2))
    >>> params.input_kernel.shape, params.peephole_input, params.peephole_forget.shape
    ((3, 2, 12), None, (10, 4))
    >>> carry, ys = recurrent.rnn(cell).apply(params, jnp.ones((5, 7, 10, 2)))
    >>> ys.shape, bool(jnp.abs(carry.c).max() <= 3.0)
    ((5, 7, 10, 4), True)
    """
    options = {k: v for k, v in locals().items() if k != "dense_only"}
    transform = _transform("recurrent.conv_lstm", hidden_channels, kernel_size)
    _refuse_dense_only("recurrent.conv_lstm", dense_only)
    family = {k: v for k, v in options.items() if k not in ("hidden_channels", "kernel_size")}
    return _lstm_family(
        hidden_channels, name="conv_lstm", transform=transform, params_type=ConvLSTMParams, record=options, **family
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

    The GRU of :func:`recurrent.gru` with convolutions (:math:`*`) for both transitions, from
    the same code, so every option of :func:`recurrent.gru` is here too:

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
      layer_norm: layer normalisation of the two convolutions' outputs, as for
        :func:`recurrent.gru` but with statistics over each step's spatial and channel axes and
        a gain per channel.
      layer_norm_epsilon, kernel_init, recurrent_kernel_init, bias_init, dtype, param_dtype:
        as for :func:`recurrent.gru` (``bias_init`` may be :func:`recurrent.chrono_init`).

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.conv_gru(4, (3,))
    >>> params = cell.init(jax.random.key(0), (10, 2))
    >>> carry, ys = recurrent.rnn(cell).apply(params, jnp.ones((5, 7, 10, 2)))
    >>> ys.shape, carry.shape
    ((5, 7, 10, 4), (5, 10, 4))
    >>> cell = recurrent.conv_gru(4, (3, 3), reset_after=False, layer_norm=True)
    >>> params = cell.init(jax.random.key(0), (6, 6, 2))
    >>> params.recurrent_bias, params.layer_norm.recurrent_scale.shape
    (None, (12,))
    """
    options = dict(locals())
    transform = _transform("recurrent.conv_gru", hidden_channels, kernel_size)
    family = {k: v for k, v in options.items() if k not in ("hidden_channels", "kernel_size")}
    return _gru_family(
        hidden_channels, name="conv_gru", transform=transform, params_type=ConvGRUParams, record=options, **family
    )
