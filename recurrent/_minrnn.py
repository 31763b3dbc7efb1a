"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that read the input
only, so a whole sequence is one linear recurrence ``h_t = a_t * h_{t-1} + b_t`` that a parallel
(associative) scan evaluates in ``O(log T)`` depth.

Each cell declares the scan as its ``"parallel"`` kernel: ``rnn(min_gru(H), implementation="parallel")``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core
from recurrent._core import Cell, SequenceKernel
from recurrent._lstm import ChronoInit, Initializer, fused_blocks, init_bias, project_input

#: Order of the fused blocks of a minGRU: update gate, candidate.
MIN_GRU_GATES = ("update", "candidate")
#: Order of the fused blocks of a minLSTM: forget gate, input gate, candidate.
MIN_LSTM_GATES = ("forget", "input", "candidate")
#: The candidate activations: the paper's ``g`` (positive, for its log-space scan) or none.
CANDIDATES = ("g", "linear")


class MinGRUParams(NamedTuple):
    """Parameters of a minGRU, blocks fused in ``MIN_GRU_GATES`` order (z, candidate).

    Attributes:
      input_kernel: ``(F, 2H)``.
      bias: ``(2H,)``.
    """

    input_kernel: jax.Array
    bias: jax.Array


class MinLSTMParams(NamedTuple):
    """Parameters of a minLSTM, blocks fused in ``MIN_LSTM_GATES`` order (f, i, candidate).

    Attributes:
      input_kernel: ``(F, 3H)``.
      bias: ``(3H,)``.
    """

    input_kernel: jax.Array
    bias: jax.Array


def g(x: jax.Array) -> jax.Array:
    """The paper's candidate activation: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below;
    continuous, positive and increasing."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_g(x: jax.Array) -> jax.Array:
    """``log(g(x))``, computed without forming ``g`` (the paper's appendix code). Its derivative at
    0 is that of ``g`` over ``g``, 2 (the appendix's ``relu(x)`` would make it 0 there, and the
    gradients of the log-space and the sequential forms differ at every zero pre-activation)."""
    return jnp.where(x >= 0, jnp.log(jnp.where(x >= 0, x, 0.0) + 0.5), -jax.nn.softplus(-x))


def _identity(x):
    return x


# --------------------------------------------------------------------------------------
# The recurrence h_t = a_t * h_{t-1} + b_t of each cell, from its projected input k.


def _gru_coefficients(k, candidate):
    """``(a, b, gates)`` of a minGRU step: ``a = 1 - z``, ``b = z * candidate``."""
    k_z, k_h = jnp.split(k, 2, axis=-1)
    z = jax.nn.sigmoid(k_z)
    c = candidate(k_h)
    return jax.nn.sigmoid(-k_z), z * c, {"update": z, "candidate": c}


def _gru_log_coefficients(k):
    """``(log a, log b)`` of a minGRU step with the ``g`` candidate, as the paper's appendix:
    ``log(1 - z) = -softplus(k_z)``, ``log z = -softplus(-k_z)``."""
    k_z, k_h = jnp.split(k, 2, axis=-1)
    return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + log_g(k_h)


def _lstm_diff(k_f, k_i):
    """``log(f) - log(i)`` of the raw gates: ``f' = sigmoid(-diff)``, ``i' = sigmoid(diff)``."""
    return jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)


def _lstm_coefficients(k, candidate):
    """``(a, b, gates)`` of a minLSTM step: ``a = f' = f / (f + i)``, ``b = i' * candidate``,
    computed as ``sigmoid(-+diff)`` (the same numbers; ``f + i`` of two tiny gates would be 0/0)."""
    k_f, k_i, k_h = jnp.split(k, 3, axis=-1)
    diff = _lstm_diff(k_f, k_i)
    f, i = jax.nn.sigmoid(-diff), jax.nn.sigmoid(diff)
    c = candidate(k_h)
    return f, i * c, {"forget": f, "input": i, "candidate": c}


def _lstm_log_coefficients(k):
    """``(log f', log i' + log g(k_h))``, as the paper's appendix: ``log f' = -softplus(diff)``,
    ``log i' = -softplus(-diff)``."""
    k_f, k_i, k_h = jnp.split(k, 3, axis=-1)
    diff = _lstm_diff(k_f, k_i)
    return -jax.nn.softplus(diff), -jax.nn.softplus(-diff) + log_g(k_h)


# --------------------------------------------------------------------------------------
# Parallel scans of h_t = a_t * h_{t-1} + b_t over axis 1, from h_0 = 0: (A_t, B_t) with
# h_t = A_t * h_0 + B_t for any starting carry h_0.


def _linear_combine(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


@jax.custom_jvp
def _logaddexp(x, y):
    """``log(exp(x) + exp(y))``, ``-inf`` where both are (the identity elements of padded steps
    meet there). Its derivative is written out, ``sigmoid(x - y)`` and its complement: cheaper in
    reverse mode than differentiating the formula (the combine runs ``T`` times per sequence), and
    zero rather than NaN where both are ``-inf``."""
    hi = jnp.maximum(x, y)
    return jnp.where(jnp.isneginf(hi), hi, hi + jnp.log1p(jnp.exp(-jnp.abs(x - y))))


@_logaddexp.defjvp
def _logaddexp_jvp(primals, tangents):
    x, y = primals
    dx, dy = tangents
    w = jax.nn.sigmoid(x - y)
    w = jnp.where(jnp.isnan(w), 0.0, w)  # both -inf: nothing flows
    return _logaddexp(x, y), w * dx + (1.0 - w) * dy


def _log_combine(first, second):
    la1, lb1 = first
    la2, lb2 = second
    return la1 + la2, _logaddexp(la2 + lb1, lb2)


def linear_scan(a, b, valid):
    """``(A, B)`` by an associative scan of ``(a, b)`` pairs in linear space; padded steps
    (``valid`` False) are the identity ``(1, 0)``."""
    if valid is not None:
        a, b = jnp.where(valid, a, 1.0), jnp.where(valid, b, 0.0)
    return lax.associative_scan(_linear_combine, (a, b), axis=1)


def log_scan(log_a, log_b, valid):
    """``(A, B)`` by an associative scan of ``(log a, log b)`` pairs in log space (``b > 0``);
    padded steps are the identity ``(0, -inf)``."""
    if valid is not None:
        log_a, log_b = jnp.where(valid, log_a, 0.0), jnp.where(valid, log_b, -jnp.inf)
    log_A, log_B = lax.associative_scan(_log_combine, (log_a, log_b), axis=1)
    return jnp.exp(log_A), jnp.exp(log_B)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _parallel(coefficients, log_coefficients, activation, k, lengths_B, h0):
    """``(carry, ys)`` of the recurrence over the projected inputs ``k (B, T, G*H)`` from ``h0``:
    in log space when ``log_coefficients`` is given, else in linear space. Jitted as one program,
    so that an eager call compiles once rather than every level of the scan."""
    valid = None if lengths_B is None else (jnp.arange(k.shape[1]) < lengths_B[:, None])[..., None]
    if log_coefficients is not None:
        A, B = log_scan(*log_coefficients(k), valid)
    else:
        a, b, _ = coefficients(k, activation)
        A, B = linear_scan(a, b, valid)
    hs = A * h0[:, None] + B
    ys = hs if valid is None else jnp.where(valid, hs, 0.0)
    return hs[:, -1], ys


# --------------------------------------------------------------------------------------
# The two cells: one builder.


def _min_cell(
    hidden_size: int,
    *,
    name: str,
    gates: tuple[str, ...],
    keep_is_complement: bool,
    params_type: type,
    coefficients,
    log_coefficients,
    candidate: str,
    kernel_init: Initializer,
    bias_init: Initializer,
    dtype: Any,
    param_dtype: Any,
    options: dict[str, Any],
) -> Cell:
    where = f"recurrent.{name}"
    H = _core.check_positive_int("hidden_size", hidden_size, where=where)
    if candidate not in CANDIDATES:
        raise _core.error(
            f"{where}: unknown `candidate`.",
            expected=" or ".join(repr(c) for c in CANDIDATES),
            got=repr(candidate),
            fix='pass candidate="g" (the paper\'s positive activation, the default) or "linear" (no activation).',
        )
    activation = g if candidate == "g" else _identity
    G = len(gates)

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
        k_in, k_b = jax.random.split(key)
        return params_type(
            input_kernel=fused_blocks(kernel_init, k_in, (F, H), G, param_dtype),
            bias=_init_bias(bias_init, k_b, H, gates, keep_is_complement, param_dtype),
        )

    def _dtypes(params):
        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return cdt, _core.state_dtype(cdt)

    def initial_carry(params, x_shape):
        x_shape = _core.check_dense_x_shape(x_shape, where=where)
        _, sdt = _dtypes(params)
        return jnp.zeros((*x_shape[:-1], H), sdt)

    def project(params, x):
        F = params.input_kernel.shape[0]
        _core.check_input(
            x, (F,), where=where, fix=f"give inputs of shape (*batch, {F}) or re-init with input_shape=(x.shape[-1],)."
        )
        return project_input(_core.matmul, x, params, None, *_dtypes(params))

    def probe(params, h_prev, xp, noise=None):
        cdt, sdt = _dtypes(params)
        a, b, values = coefficients(xp.astype(sdt), activation)
        h = _core.zoneout(noise, h_prev, a * h_prev + b)
        return h, h.astype(cdt), values

    def parallel(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        cdt, sdt = _dtypes(params)
        B, T = xs_BTF.shape[:2]
        if T == 0:
            return carry_B, jnp.zeros((B, 0, H), cdt)
        k = project(params, xs_BTF).astype(sdt)
        log_form = log_coefficients if candidate == "g" else None
        carry, ys = _parallel(coefficients, log_form, activation, k, lengths_B, carry_B)
        return carry, ys.astype(cdt)

    def reason(params, xs):
        if not isinstance(params, params_type):
            return f"the parameters are a {type(params).__name__}"
        return None

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=lambda input_shape: (H,),
        input_rank=1,
        name=name,
        options=options,
        spec=_core.cell_spec(
            recurrent_input=False,  # the gates read the input only: no recurrent dropout
            recurrent_kernels=None,  # no recurrent kernel: no DropConnect
            kernels={"parallel": SequenceKernel(parallel, reason, remat=False)},
            compute_dtype=dtype,
        ),
    )


def _init_bias(bias_init, key, H, gates, keep_is_complement, dtype):
    """The fused bias. :func:`~recurrent.chrono_init` sets a minLSTM's forget and input biases as
    an LSTM's (so ``f' = f``); a minGRU keeps ``h_{t-1}`` with ``1 - z``, so its update bias is
    the negated draw."""
    bias = init_bias(bias_init, key, H, gates, dtype)
    if isinstance(bias_init, ChronoInit) and keep_is_complement:
        bias = bias.at[:H].multiply(-1)
    return bias


def min_gru(
    hidden_size: int,
    *,
    candidate: str = "g",
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""minGRU (Feng et al. 2024): a GRU whose gates read the input only, so that a whole
    sequence can be evaluated by a parallel scan.

    .. math::

        z_t &= \sigma(W_z x_t + b_z) \\
        \tilde h_t &= g(W_h x_t + b_h) \\
        h_t &= (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t, \qquad y_t = h_t

    with the paper's positive candidate activation :math:`g(v) = v + \tfrac12` for
    :math:`v \ge 0` and :math:`\sigma(v)` below (``candidate="g"``), or none,
    :math:`\tilde h_t = W_h x_t + b_h` (``candidate="linear"``, the paper's Section 3 form).

    Parameters (:class:`MinGRUParams`): ``input_kernel (F, 2H)`` and ``bias (2H,)`` in
    ``MIN_GRU_GATES`` order (z, candidate); no recurrent kernel. Parameter count ``2H(F + 1)``.

    Carry: the array ``h`` of shape ``(*batch, H)``, kept in float32 (the state that
    accumulates); the output ``y`` is ``h`` in the compute dtype. The carry is
    :math:`h_{t-1}` itself, zero by default, of any sign.

    **Parallel form.** ``rnn(min_gru(H), implementation="parallel")`` computes the same
    layer with ``jax.lax.associative_scan`` over time (depth :math:`O(\log T)`): the step is
    :math:`h_t = a_t h_{t-1} + b_t` with :math:`a_t = 1 - z_t`, :math:`b_t = z_t \tilde h_t`,
    and the scan combines :math:`(a_1, b_1) \circ (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)` into
    :math:`(A_t, B_t)` with :math:`h_t = A_t h_0 + B_t`. With ``candidate="g"`` it runs in log
    space as the paper's appendix (:math:`\log(1 - z) = -\mathrm{softplus}(k_z)`,
    :math:`\log z = -\mathrm{softplus}(-k_z)`, :math:`\log b_t = \log z_t + \log g(k_h)`),
    combining with ``logaddexp``; with ``candidate="linear"`` (:math:`b_t` of any sign) in linear
    space. The starting carry stays outside the logarithms, so a zero carry never meets
    :math:`\log 0` (no NaN gradients) and a carry with negative entries is exact too. Padded
    steps are the scan's identity (:math:`\log a = 0`, :math:`\log b = -\infty`), so ``lengths``,
    ``reverse``, ``carry=`` continuation, :func:`bidirectional` and :func:`stacked` of such
    layers, ``jax.vmap`` and every derivative work as with the scan.

    Log space or linear space: measured in float32 at ``T = 8192`` with gates kept near 1 (long
    memory), the log-space scan is the most accurate form, max abs error against float64 2.5e-7
    where a linear-space scan of the same pairs gives 2.2e-6 and the sequential scan 2.8e-6 (the
    log form sums ``log a`` where the others multiply factors near 1). On 2 CPU cores both parallel
    forms are slower than the sequential scan (forward, ``B = 8``, ``H = 128``, ``T = 1024``: scan
    9 ms, log space 112 ms, linear space 16 ms; forward and backward 59, 157 and 108 ms), so the
    parallel form is for accelerators, where the scan's ``T`` sequential steps are the bottleneck.

    Regularisers: zoneout (on ``h``) and input dropout; recurrent dropout and DropConnect are
    refused (there is no recurrent input or kernel). Zoneout, dropout in training, ``resets``,
    ``return_trace`` and ``remat=True`` run the sequential scan instead of the parallel form, with
    a :class:`FallbackWarning`.

    Args:
      hidden_size: ``H``.
      candidate: ``"g"`` (the paper's positive activation, the default) or ``"linear"`` (none).
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``.
      bias_init: initialiser of each ``(H,)`` bias block, or :func:`chrono_init`, which sets the
        update bias to :math:`-\log U(1, T_{max} - 1)` (so that :math:`1 - z` keeps
        :math:`h_{t-1}` as a chrono-initialised forget gate would) and the candidate's to zero.
      dtype: compute dtype; ``None`` computes in the parameters' dtype.
      param_dtype: dtype of the parameters made by ``init``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.min_gru(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> recurrent.count_params(params)  # 2H(F + 1)
    288
    >>> layer = recurrent.rnn(cell, implementation="parallel")
    >>> carry, ys = layer.apply(params, jnp.ones((4, 100, 8)), lengths=jnp.array([100, 50, 3, 0]))
    >>> ys.shape, carry.shape
    ((4, 100, 16), (4, 16))
    >>> scanned = recurrent.rnn(cell).apply(params, jnp.ones((4, 100, 8)), lengths=jnp.array([100, 50, 3, 0]))
    >>> bool(jnp.allclose(ys, scanned[1], atol=1e-5))
    True

    References:
      L. Feng, F. Tung, M. O. Ahmed, Y. Bengio, H. Hajimirsadeghi. *Were RNNs All We Needed?*
      arXiv:2410.01201, 2024.
    """
    options = dict(locals())
    return _min_cell(
        hidden_size,
        name="min_gru",
        gates=MIN_GRU_GATES,
        keep_is_complement=True,
        params_type=MinGRUParams,
        coefficients=_gru_coefficients,
        log_coefficients=_gru_log_coefficients,
        candidate=candidate,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        options=options,
    )


def min_lstm(
    hidden_size: int,
    *,
    candidate: str = "g",
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(),
    bias_init: Initializer = jax.nn.initializers.zeros,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    r"""minLSTM (Feng et al. 2024): an LSTM without output gate or cell state whose gates read
    the input only, normalised so the state stays on the scale of the candidates.

    .. math::

        f_t &= \sigma(W_f x_t + b_f), \qquad i_t = \sigma(W_i x_t + b_i) \\
        \tilde h_t &= g(W_h x_t + b_h) \\
        f'_t &= \frac{f_t}{f_t + i_t}, \qquad i'_t = \frac{i_t}{f_t + i_t} \\
        h_t &= f'_t \odot h_{t-1} + i'_t \odot \tilde h_t, \qquad y_t = h_t

    with ``g`` and ``candidate`` as in :func:`min_gru`. The normalised gates are computed as
    :math:`f'_t = \sigma(-d_t)`, :math:`i'_t = \sigma(d_t)` with
    :math:`d_t = \mathrm{softplus}(-k_f) - \mathrm{softplus}(-k_i) = \log f_t - \log i_t` (the same
    numbers, and no :math:`0/0` when both gates underflow).

    Parameters (:class:`MinLSTMParams`): ``input_kernel (F, 3H)`` and ``bias (3H,)`` in
    ``MIN_LSTM_GATES`` order (f, i, candidate); no recurrent kernel. Parameter count
    ``3H(F + 1)``.

    Carry: the array ``h`` of shape ``(*batch, H)`` in float32, of any sign; the output ``y`` is
    ``h`` in the compute dtype. ``return_trace=True`` records the normalised gates
    :math:`f'`, :math:`i'` (``"forget"``, ``"input"``) and the candidate.

    **Parallel form.** ``rnn(min_lstm(H), implementation="parallel")``: the scan of
    :func:`min_gru` with :math:`a_t = f'_t`, :math:`b_t = i'_t \tilde h_t`, in log space with
    ``candidate="g"`` (:math:`\log f'_t = -\mathrm{softplus}(d_t)`,
    :math:`\log i'_t = -\mathrm{softplus}(-d_t)`, the paper's appendix) and in linear space with
    ``candidate="linear"``; everything said there holds here (measured in float32 at ``T = 8192``,
    gates near 1, max abs error against float64: log space 2.2e-7, linear space 7.0e-7, the
    sequential scan 1.0e-6; 2 CPU cores, forward, ``T = 1024``: scan 34 ms, log space 231 ms,
    linear space 35 ms).

    Args:
      hidden_size: ``H``.
      candidate: ``"g"`` (the default) or ``"linear"``.
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``.
      bias_init: initialiser of each ``(H,)`` bias block, or :func:`chrono_init`, which sets
        :math:`b_f = \log u`, :math:`b_i = -\log u` as for an LSTM (so :math:`f'_t = f_t` at init).
      dtype: compute dtype; ``None`` computes in the parameters' dtype.
      param_dtype: dtype of the parameters made by ``init``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.min_lstm(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> recurrent.count_params(params)  # 3H(F + 1)
    432
    >>> layer = recurrent.rnn(cell, implementation="parallel")
    >>> first, _ = layer.apply(params, jnp.ones((2, 60, 8)))
    >>> carry, ys = layer.apply(params, jnp.ones((2, 40, 8)), carry=first)  # fed in chunks
    >>> whole, _ = layer.apply(params, jnp.ones((2, 100, 8)))
    >>> bool(jnp.allclose(carry, whole, atol=1e-5))
    True

    References:
      L. Feng, F. Tung, M. O. Ahmed, Y. Bengio, H. Hajimirsadeghi. *Were RNNs All We Needed?*
      arXiv:2410.01201, 2024.
    """
    options = dict(locals())
    return _min_cell(
        hidden_size,
        name="min_lstm",
        gates=MIN_LSTM_GATES,
        keep_is_complement=False,
        params_type=MinLSTMParams,
        coefficients=_lstm_coefficients,
        log_coefficients=_lstm_log_coefficients,
        candidate=candidate,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        options=options,
    )
