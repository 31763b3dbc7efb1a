"""Gated recurrent unit (Cho et al. 2014), in its cuDNN/PyTorch form and the original."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from recurrent import _core, _kernels
from recurrent._core import Cell
from recurrent._lstm import (
    DenseTransform,
    Initializer,
    dtypes,
    field_keys,
    fused_blocks,
    init_bias,
    init_recurrent_bias,
    transformed_input,
)

#: Order of the fused gate blocks of a GRU (PyTorch's): reset, update, candidate.
GRU_GATES = ("reset", "update", "candidate")


def gru_gates(zr, zz, x_n, h_n, h_prev):
    """``(r, z, n, h)`` of a GRU step (``reset_after``) from the reset and update pre-activations,
    the candidate's input part ``x_n``, its recurrent part ``h_n`` (bias included) and the previous
    state. Shared by ``gru_pointwise``, its derivative and ``_fastgru``."""
    r = jax.nn.sigmoid(zr)
    z = jax.nn.sigmoid(zz)
    n = jnp.tanh(x_n + r * h_n)
    return r, z, n, (1.0 - z) * n + z * h_prev


def _gru_pointwise_primal(zr, zz, x_n, h_n, h_prev):
    return gru_gates(zr, zz, x_n, h_n, h_prev)[3]


@jax.custom_jvp
def gru_pointwise(zr, zz, x_n, h_n, h_prev):
    """The elementwise half of a GRU step (``reset_after``): from the reset and update
    pre-activations, the candidate's input part ``x_n`` and recurrent part ``h_n`` (its bias
    included) and the previous state to ``h = (1 - z) * n + z * h_prev``.

    Its derivative is written out (a ``custom_jvp``: forward mode and higher orders work) so that
    reverse mode stores five products per step instead of every gate and derivative factor; see
    ``recurrent._lstm.lstm_pointwise``."""
    return _gru_pointwise_primal(zr, zz, x_n, h_n, h_prev)


@gru_pointwise.defjvp
def _gru_pointwise_jvp(primals, tangents):
    zr, zz, x_n, h_n, h_prev = primals
    dzr, dzz, dx_n, dh_n, dh_prev = tangents
    r, z, n, h = gru_gates(zr, zz, x_n, h_n, h_prev)
    a = (1.0 - z) * (1.0 - n * n)  # dh / d(candidate pre-activation)
    dh = a * dx_n + (a * r) * dh_n + (a * h_n * r * (1.0 - r)) * dzr + ((h_prev - n) * z * (1.0 - z)) * dzz
    return h, dh + z * dh_prev


class GRUParams(NamedTuple):
    """Parameters of a GRU, gate blocks fused in ``GRU_GATES`` order (r, z, n).

    Attributes:
      input_kernel: ``(F, 3H)``.
      recurrent_kernel: ``(H, 3H)``.
      bias: ``(3H,)``, added to the input projection of every gate.
      recurrent_bias: ``(H,)``, the candidate's recurrent bias ``b_hn`` inside the reset
        product when ``reset_after=True``; ``None`` otherwise (it would be redundant).
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array
    recurrent_bias: jax.Array | None = None
    layer_norm: GRULayerNormParams | None = None


class GRULayerNormParams(NamedTuple):
    """Layer-normalisation gains of a GRU: ``input_scale (3H,)`` for the input projection and
    ``recurrent_scale (3H,)`` for the recurrent projection."""

    input_scale: jax.Array
    recurrent_scale: jax.Array


class _GRUSettings(NamedTuple):
    """The resolved options of one GRU-family cell, read by the functions that make its parts."""

    where: str
    transform: Any
    params_type: type
    H: int
    reset_after: bool
    layer_norm: bool
    eps: float
    inits: dict[str, Initializer]  # by parameter field
    dtype: Any
    param_dtype: Any


def _gru_init(s: _GRUSettings, key, input_shape):
    _, F = s.transform.split(input_shape)
    H, dt, shape = s.H, s.param_dtype, s.transform.kernel_shape
    keys, init = field_keys(s.params_type, key), s.inits
    return s.params_type(
        input_kernel=fused_blocks(init["input_kernel"], keys["input_kernel"], shape(F, H), 3, dt),
        recurrent_kernel=fused_blocks(init["recurrent_kernel"], keys["recurrent_kernel"], shape(H, H), 3, dt),
        bias=init_bias(init["bias"], keys["bias"], H, GRU_GATES, dt),
        recurrent_bias=init_recurrent_bias(init["bias"], keys["recurrent_bias"], H, dt) if s.reset_after else None,
        layer_norm=GRULayerNormParams(jnp.ones((3 * H,), dt), jnp.ones((3 * H,), dt)) if s.layer_norm else None,
    )


def _gru_initial_carry(s: _GRUSettings, params, x_shape):
    batch = s.transform.check_x_shape(x_shape)[:-1]  # with a convolution's spatial axes
    return jnp.zeros((*batch, s.H), dtypes(s.dtype, params)[1])


def _gru_project(s: _GRUSettings, params, x):
    return transformed_input(s.transform, params, x, layer_norm=s.layer_norm, eps=s.eps, dtype=s.dtype)


def _gru_recurrent(s: _GRUSettings, params, h, part: slice, cdt, sdt):
    """The recurrent transform of ``h`` by the kernel's blocks ``part``, layer-normalised with
    the gains of those blocks when ``layer_norm``."""
    rec = s.transform.apply(h.astype(cdt), params.recurrent_kernel[..., part].astype(cdt), sdt)
    if not s.layer_norm:
        return rec
    return s.transform.norm(rec, params.layer_norm.recurrent_scale[part].astype(sdt), eps=s.eps)


def _gru_probe(s: _GRUSettings, params, h_prev, xp, noise=None):
    cdt, sdt = dtypes(s.dtype, params)
    x_r, x_z, x_n = jnp.split(xp.astype(sdt), 3, axis=-1)
    h = _core.noisy_input(noise, h_prev)  # the recurrent input; the update uses h_prev
    H = s.H
    if s.reset_after:
        h_r, h_z, h_n = jnp.split(_gru_recurrent(s, params, h, slice(None), cdt, sdt), 3, axis=-1)
        zr, zz, h_n = x_r + h_r, x_z + h_z, h_n + params.recurrent_bias.astype(sdt)
        new = _core.zoneout(noise, h_prev, gru_pointwise(zr, zz, x_n, h_n, h_prev))
        # the gates for `return_trace`: unused they cost nothing; XLA merges them with the same
        # expressions inside `gru_pointwise`
        r, z, n, _ = gru_gates(zr, zz, x_n, h_n, h_prev)
        return new, new.astype(cdt), {"reset": r, "update": z, "candidate": n}
    h_r, h_z = jnp.split(_gru_recurrent(s, params, h, slice(0, 2 * H), cdt, sdt), 2, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + _gru_recurrent(s, params, r * h, slice(2 * H, None), cdt, sdt))
    new = _core.zoneout(noise, h_prev, (1.0 - z) * n + z * h_prev)
    return new, new.astype(cdt), {"reset": r, "update": z, "candidate": n}


def _gru_family(
    hidden_size: int,
    *,
    name: str,
    record: dict[str, Any],
    transform: Any = None,
    params_type: type = GRUParams,
    reset_after: bool = True,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    recurrent_kernel_init: Initializer = jax.nn.initializers.orthogonal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    """The GRU over ``transform`` (a :class:`~recurrent._lstm.DenseTransform` by default; the
    convolution of :func:`recurrent.conv_gru`), with parameters of ``params_type`` and the
    options record ``record``."""
    where = f"recurrent.{name}"
    transform = DenseTransform(where, "recurrent.conv_gru") if transform is None else transform
    s = _GRUSettings(
        where=where,
        transform=transform,
        params_type=params_type,
        H=_core.check_positive_int("hidden_size", hidden_size, where=where),
        reset_after=reset_after,
        layer_norm=layer_norm,
        eps=layer_norm_epsilon,
        inits={"input_kernel": kernel_init, "recurrent_kernel": recurrent_kernel_init, "bias": bias_init},
        dtype=dtype,
        param_dtype=param_dtype,
    )
    kernels = _kernels.gru_kernels(record, params_type) if transform.sequence_kernels else {}
    return _core.make_cell(
        init=functools.partial(_gru_init, s),
        initial_carry=functools.partial(_gru_initial_carry, s),
        project=functools.partial(_gru_project, s),
        probe=functools.partial(_gru_probe, s),
        output_shape=lambda input_shape: transform.output_shape(input_shape, s.H),
        input_rank=transform.input_rank,
        name=name,
        options=record,
        spec=_core.cell_spec(
            recurrent_input=None,  # the carry is h itself
            recurrent_kernels=("recurrent_kernel",),
            kernels=kernels,
            compute_dtype=dtype,
            jacobian_diagonal=_kernels.gru_jacobian_diagonal(record, params_type)
            if transform.sequence_kernels
            else None,
        ),
    )


def gru(
    hidden_size: int,
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
    r"""Gated recurrent unit.

    With ``reset_after=True`` (the default, as in cuDNN, PyTorch, Keras and Flax) the reset
    gate multiplies the recurrent matmul's result:

    .. math::

        r_t &= \sigma(W_r x_t + U_r h_{t-1} + b_r) \\
        z_t &= \sigma(W_z x_t + U_z h_{t-1} + b_z) \\
        n_t &= \tanh(W_n x_t + b_n + r_t \odot (U_n h_{t-1} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}, \qquad y_t = h_t

    With ``reset_after=False`` it is Cho et al. 2014's original, the reset applied before:
    :math:`n_t = \tanh(W_n x_t + U_n (r_t \odot h_{t-1}) + b_n)`.

    Parameters (:class:`GRUParams`): ``input_kernel (F, 3H)``, ``recurrent_kernel (H, 3H)``,
    ``bias (3H,)`` in ``GRU_GATES`` order (r, z, n), and ``recurrent_bias (H,)`` when
    ``reset_after``. Parameter count ``3H(F + H + 1) (+ H)``.

    Carry: the array ``h`` of shape ``(*batch, H)``, kept in float32 (it is the state that
    accumulates); the output ``y`` is ``h`` in the compute dtype.

    Args:
      hidden_size: ``H``.
      reset_after: where the reset gate is applied (see above).
      layer_norm: layer normalisation (Ba et al. 2016) of the input projection ``W x`` and of
        the recurrent projection ``U h`` before the bias, each over its ``3H`` pre-activations
        (with ``reset_after=False`` the recurrent part is computed in two pieces, ``U_{rz} h``
        and ``U_n (r h)``, each normalised on its own).
      layer_norm_epsilon: added to the variance in layer normalisation.
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(H, H)`` block (orthogonal by default).
      bias_init: initialiser of each ``(H,)`` bias block and of ``recurrent_bias``, or
        :func:`chrono_init`, which sets the update-gate bias to :math:`\log U(1, T_{max} - 1)`
        and the rest to zero.
      dtype: compute dtype; ``None`` computes in the parameters' dtype.
      param_dtype: dtype of the parameters made by ``init``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.gru(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> carry, y = cell.step(params, cell.initial_carry(params, (8,)), jnp.ones(8))
    >>> y.shape, recurrent.count_params(params)
    ((16,), 1216)
    """
    options = dict(locals())
    return _gru_family(name="gru", record=options, **options)
