"""Gated recurrent unit (Cho et al. 2014), in its cuDNN/PyTorch form and the original."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from recurrent import _core, _kernels
from recurrent._core import Cell
from recurrent._lstm import (
    Initializer,
    fused_blocks,
    init_bias,
    init_recurrent_bias,
    normalize,
    project_input,
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
    where = "recurrent.gru"
    H = _core.check_positive_int("hidden_size", hidden_size, where=where)

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
        k_in, k_rec, k_b, k_rb = jax.random.split(key, 4)
        return GRUParams(
            input_kernel=fused_blocks(kernel_init, k_in, (F, H), 3, param_dtype),
            recurrent_kernel=fused_blocks(recurrent_kernel_init, k_rec, (H, H), 3, param_dtype),
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
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
        if len(x_shape) < 1:
            raise _core.error(
                f"{where}.initial_carry: `x_shape` must be one step's input shape with its batch axes.",
                expected="(*batch, features)",
                got=repr(x_shape),
                fix="pass x.shape of one time step, e.g. (batch, features) or (features,).",
            )
        _, sdt = _dtypes(params)
        return jnp.zeros((*x_shape[:-1], H), sdt)

    def project(params, x):
        F = params.input_kernel.shape[0]
        _core.check_input(
            x, (F,), where=where, fix=f"give inputs of shape (*batch, {F}) or re-init with input_shape=(x.shape[-1],)."
        )
        norm = (lambda v, scale: normalize(v, scale, eps=layer_norm_epsilon)) if layer_norm else None
        return project_input(_core.matmul, x, params, norm, *_dtypes(params))

    def probe(params, h_prev, xp, noise=None):
        cdt, sdt = _dtypes(params)
        U = params.recurrent_kernel.astype(cdt)
        x_r, x_z, x_n = jnp.split(xp.astype(sdt), 3, axis=-1)
        h = _core.noisy_input(noise, h_prev)  # the recurrent input; the update uses h_prev
        h_c = h.astype(cdt)
        ln = params.layer_norm
        norm = lambda v, scale: normalize(v, scale.astype(sdt), eps=layer_norm_epsilon) if layer_norm else v  # noqa: E731
        if reset_after:
            rec = norm(_core.matmul(h_c, U, sdt), ln.recurrent_scale if layer_norm else None)
            h_r, h_z, h_n = jnp.split(rec, 3, axis=-1)
            zr, zz, h_n = x_r + h_r, x_z + h_z, h_n + params.recurrent_bias.astype(sdt)
            h = _core.zoneout(noise, h_prev, gru_pointwise(zr, zz, x_n, h_n, h_prev))
            # the gates for `return_trace`: unused they cost nothing; XLA merges them with the same
            # expressions inside `gru_pointwise`
            r, z, n, _ = gru_gates(zr, zz, x_n, h_n, h_prev)
            return h, h.astype(cdt), {"reset": r, "update": z, "candidate": n}
        else:
            rec = norm(_core.matmul(h_c, U[:, : 2 * H], sdt), ln.recurrent_scale[: 2 * H] if layer_norm else None)
            h_r, h_z = jnp.split(rec, 2, axis=-1)
            r = jax.nn.sigmoid(x_r + h_r)
            z = jax.nn.sigmoid(x_z + h_z)
            rec_n = _core.matmul((r * h).astype(cdt), U[:, 2 * H :], sdt)
            n = jnp.tanh(x_n + norm(rec_n, ln.recurrent_scale[2 * H :] if layer_norm else None))
        h = _core.zoneout(noise, h_prev, (1.0 - z) * n + z * h_prev)
        return h, h.astype(cdt), {"reset": r, "update": z, "candidate": n}

    def output_shape(input_shape):
        return (H,)

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=output_shape,
        input_rank=1,
        name="gru",
        options=options,
        spec=_core.cell_spec(
            recurrent_input=None,  # the carry is h itself
            recurrent_kernels=("recurrent_kernel",),
            kernels=_kernels.gru_kernels(options, GRUParams),
            compute_dtype=dtype,
        ),
    )
