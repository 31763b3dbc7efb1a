"""The LSTM family: one cell with composable options, and its named presets.

Standard, peephole and CIFG LSTMs, Greff et al.'s nine variants, projection (LSTMP), layer
normalisation and clipping are all options of one implementation, so every option composes
with every other and the step semantics live in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent import _core, _kernels
from recurrent._core import Cell, LSTMState

Initializer = jax.nn.initializers.Initializer
_KERNEL_INIT = jax.nn.initializers.lecun_normal()
_RECURRENT_INIT = jax.nn.initializers.orthogonal()

#: Order of the fused gate blocks along the last axis of an LSTM's kernels and bias
#: (the order PyTorch uses): input gate, forget gate, cell candidate, output gate.
#: Variants without a gate (CIFG, NIG, NFG, NOG) drop its block and keep this order.
LSTM_GATES = ("input", "forget", "cell", "output")
#: Order of the fused gate blocks of a CIFG LSTM, which has no input gate (i = 1 - f).
CIFG_GATES = ("forget", "cell", "output")


class LayerNormParams(NamedTuple):
    """Layer-normalisation gains of an LSTM (Ba et al. 2016).

    Attributes:
      input_scale: ``(G*H,)`` gain of the normalised input projection.
      recurrent_scale: ``(G*H,)`` gain of the normalised recurrent projection.
      cell_scale: ``(H,)`` gain of the normalised cell state.
      cell_offset: ``(H,)`` offset of the normalised cell state.

    The paper's offsets on the two projections add up with the gate bias, so ``bias``
    plays their part.
    """

    input_scale: jax.Array
    recurrent_scale: jax.Array
    cell_scale: jax.Array
    cell_offset: jax.Array


class LSTMParams(NamedTuple):
    """Parameters of the LSTM family (``G`` gate blocks: 4 for the full set, 3 without one).

    Attributes:
      input_kernel: ``(F, G*H)``, input to fused gates, blocks in ``LSTM_GATES`` order
        with absent gates dropped (``CIFG_GATES`` for CIFG).
      recurrent_kernel: ``(R, G*H)``, previous output to fused gates; ``R`` is ``H``, or the
        projection size ``P`` with ``proj_size``.
      bias: ``(G*H,)``.
      peephole_input: ``(H,)`` diagonal peephole c(t-1) -> input gate, or ``None``.
      peephole_forget: ``(H,)`` diagonal peephole c(t-1) -> forget gate, or ``None``.
      peephole_output: ``(H,)`` diagonal peephole c(t) -> output gate, or ``None``.
      gate_recurrent_kernel: ``(S*H, S*H)`` from the ``S`` sigmoid gates at t-1 to the same
        gates at t (full gate recurrence, FGR), or ``None``.
      projection: ``(H, P)`` output projection (LSTMP), or ``None``.
      layer_norm: :class:`LayerNormParams`, or ``None``.
    """

    input_kernel: jax.Array
    recurrent_kernel: jax.Array
    bias: jax.Array
    peephole_input: jax.Array | None = None
    peephole_forget: jax.Array | None = None
    peephole_output: jax.Array | None = None
    gate_recurrent_kernel: jax.Array | None = None
    projection: jax.Array | None = None
    layer_norm: LayerNormParams | None = None


class LSTMGateState(NamedTuple):
    """Carry of an LSTM with full gate recurrence: ``h``, ``c`` and the previous step's
    sigmoid gate activations ``gates`` ``(*batch, S*H)`` (float32)."""

    h: jax.Array
    c: jax.Array
    gates: jax.Array


def fused_blocks(init: Initializer, key: jax.Array, shape: tuple[int, ...], blocks: int, dtype: Any):
    """Initialises ``blocks`` gate blocks of ``shape`` separately and concatenates them
    along the last axis, so e.g. an orthogonal initialiser is orthogonal per gate. Blocks are
    drawn in at least float32 and cast, since e.g. the QR of ``orthogonal`` has no bfloat16
    kernel on CPU."""
    keys = jax.random.split(key, blocks)
    draw_dtype = jnp.promote_types(dtype, jnp.float32)
    drawn = []
    for k in keys:
        if drawn:
            k = _after(k, drawn[-1])
        drawn.append(init(k, shape, draw_dtype))
    return jnp.concatenate(drawn, axis=-1).astype(dtype)


def _after(key: jax.Array, previous: jax.Array) -> jax.Array:
    """``key`` unchanged, but computed from ``previous``, so that XLA runs what ``key`` draws after it.

    jaxlib's batched QR (an orthogonal initialiser under ``vmap``) holds an XLA CPU pool thread
    until its parts, queued on the same pool, are done; as many such QRs at once as the pool has
    threads (two on a 2-core machine) deadlocked a population's init. The CPU runtime runs
    operations as soon as their inputs are ready (an optimisation barrier does not order them), so
    the order is a data dependency: ``isnan`` of a finite value, zero, added to the key's bits.
    """
    nan = jnp.isnan(previous.ravel()[0])  # one key, one block: vmap batches both
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
        return jax.random.wrap_key_data(data + nan.astype(data.dtype), impl=jax.random.key_impl(key))
    return key + nan.astype(key.dtype)


# The gate whose bias sets a unit's memory time (the forget gate; the GRU's update gate keeps
# h(t-1) with weight z), and the gate that chrono init sets to its complement.
_KEEP_GATES = ("forget", "update")


class ChronoInit(NamedTuple):
    """The bias initialiser made by :func:`chrono_init`; cells call it with the whole fused bias
    shape and their gate names, ``init(key, (G*H,), dtype, gates=...)``.

    Only the library's cells know to call it so; code that draws a bias block by block with
    ``init(key, (H,), dtype)`` would get a wrong layout (an error unless ``H`` is a multiple of
    the number of gates)."""

    max_steps: float | jax.Array

    def __call__(
        self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, *, gates: tuple[str, ...] = LSTM_GATES
    ) -> jax.Array:
        where = "recurrent.chrono_init"
        gates = tuple(gates)
        keep = check_chrono_gates(gates, where=where)
        G = len(gates)
        if len(shape) != 1 or shape[0] % G:
            raise _core.error(
                f"{where}: draws the whole fused bias of a cell, one block of H per gate.",
                expected=f"shape (G*H,) with G = {G} blocks for gates {gates}",
                got=f"shape={tuple(shape)!r}",
                fix="pass it as bias_init= to a recurrent cell, which calls it with the fused shape; "
                "to call it yourself pass shape=(len(gates) * H,) and gates=... in the cell's order.",
            )
        H = shape[0] // G
        draw_dtype = jnp.promote_types(dtype, jnp.float32)
        u = jax.random.uniform(key, (H,), draw_dtype, minval=1.0, maxval=self.max_steps - 1.0)
        b_keep = jnp.log(u)
        blocks = {keep: b_keep, "input": -b_keep}
        zeros = jnp.zeros((H,), draw_dtype)
        return jnp.concatenate([blocks.get(g, zeros) for g in gates]).astype(dtype)


def chrono_init(max_steps: float | jax.Array) -> ChronoInit:
    r"""Chrono initialisation of the gate biases (Tallec & Ollivier 2018), for ``bias_init=``.

    Draws, per hidden unit, :math:`u \sim U(1, T_{max} - 1)` and sets

    .. math::

        b_f = \log u, \qquad b_i = -\log u, \qquad b_g = b_o = 0,

    so at init (before the input and recurrent terms) :math:`f = u / (1 + u)` and
    :math:`i = 1 - f`: each unit is a leaky integrator
    :math:`c_t = f c_{t-1} + (1 - f) g_t` whose characteristic forgetting time
    :math:`1 / (1 - f) = 1 + u` is spread uniformly over :math:`[2, T_{max}]`, instead of
    every unit starting at :math:`1 / (1 - \sigma(1)) \approx 3.7` steps with the default
    ``forget_bias=1.0``. Use it when dependencies span up to about ``max_steps`` steps.

    Cells and gate layouts:

    - :func:`lstm`, :func:`peephole_lstm`, :func:`conv_lstm` and :func:`lstm_variant` ``"V"``,
      ``"NOG"``, ``"NIAF"``, ``"NOAF"``, ``"NP"``, ``"FGR"``: as above (a missing output gate
      has no bias to set).
    - :func:`cifg_lstm` (and ``"CIFG"``): only :math:`b_f = \log u`; the coupled input gate
      :math:`1 - f` already equals :math:`\sigma(-\log u)`, so the gates start as the LSTM's.
    - ``"NIG"`` (input gate fixed to 1): only :math:`b_f = \log u`; the forgetting times are as
      above, but the input is not scaled by :math:`1 - f`.
    - :func:`gru` and :func:`conv_gru`: the update gate, which keeps :math:`h_{t-1}` in
      :math:`h_t = (1 - z_t) n_t + z_t h_{t-1}`, gets :math:`b_z = \log u` (the same
      derivation, Tallec & Ollivier's section on gated units); the reset, candidate and
      recurrent biases are zero.
    - ``"NFG"`` (no forget gate) has no time constant to set: its factory raises.

    ``forget_bias`` of the LSTM cells defaults to ``None``, which adds nothing to these biases
    (and 1.0 with any other ``bias_init``); passing a non-zero ``forget_bias`` together with
    ``chrono_init`` raises, so the two never add up silently.

    The draw uses the key the cell gives to its bias, so it is reproducible from the
    ``init`` key; called directly, ``chrono_init(T)(key, (G*H,), dtype, gates=...)`` returns
    the fused bias for gates in the cell's order (default ``LSTM_GATES``).

    Args:
      max_steps: :math:`T_{max}`, the longest dependency expected, in time steps: a real
        number greater than 2, so that :math:`[1, T_{max} - 1]` is an interval and the
        forgetting times span :math:`[2, T_{max}]` (at 2 every bias would be 0, the plain
        zero init). It may be a traced array (a population over ``max_steps``), which is not
        checked.

    Returns:
      A :class:`ChronoInit`, to pass as ``bias_init=``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.lstm(4, bias_init=recurrent.chrono_init(100))
    >>> b_i, b_f, b_g, b_o = cell.init(jax.random.key(0), (3,)).bias.reshape(4, 4)
    >>> bool(jnp.all((b_f >= 0) & (b_f <= jnp.log(99.0)))), bool(jnp.all(b_i == -b_f)), float(jnp.abs(b_g).max())
    (True, True, 0.0)
    >>> time = 1 / (1 - jax.nn.sigmoid(b_f))   # forgetting times 1 + u, in [2, 100]
    >>> bool(jnp.all((time >= 2) & (time <= 100)))
    True

    References:
      C. Tallec, Y. Ollivier. *Can recurrent neural networks warp time?* ICLR 2018.
    """
    if not isinstance(max_steps, jax.core.Tracer):
        try:
            value = float(max_steps) if not isinstance(max_steps, (bool, str)) and np.ndim(max_steps) == 0 else None
        except (TypeError, ValueError):
            value = None
        if value is None or not value > 2 or value == float("inf"):
            raise _core.error(
                "recurrent.chrono_init: `max_steps` must be a finite real number greater than 2, "
                "the longest dependency in time steps (u ~ U(1, max_steps - 1) needs max_steps - 1 > 1).",
                expected="a number > 2, e.g. the sequence length",
                got=repr(max_steps),
                fix="pass e.g. chrono_init(1000) for dependencies up to 1000 steps.",
            )
    return ChronoInit(max_steps)


def check_chrono_gates(gates: tuple[str, ...], *, where: str) -> str:
    """The gate that :func:`chrono_init` sets (``forget`` or ``update``); raises if there is none."""
    keep = [g for g in _KEEP_GATES if g in gates]
    if not keep:
        raise _core.error(
            f"{where}: chrono init sets the time constants through the forget gate "
            "(the update gate of a GRU), and this cell has none.",
            expected="a cell with a forget gate (every LSTM but NFG) or a GRU",
            got=f"gates {gates}",
            fix="use the default bias_init (zeros) for this cell, or a cell with a forget gate.",
        )
    return keep[0]


def init_recurrent_bias(bias_init: Initializer, key: jax.Array, hidden_size: int, dtype: Any) -> jax.Array:
    """A GRU's candidate recurrent bias ``b_hn``: zero under :func:`chrono_init`."""
    if isinstance(bias_init, ChronoInit):
        return jnp.zeros((hidden_size,), dtype)
    return bias_init(key, (hidden_size,), dtype)


def init_bias(bias_init: Initializer, key: jax.Array, hidden_size: int, gates: tuple[str, ...], dtype: Any):
    """The fused ``(G*H,)`` bias of a cell with ``gates``: :func:`chrono_init` draws it whole,
    knowing the layout; any other initialiser draws each ``(H,)`` block (:func:`fused_blocks`)."""
    if isinstance(bias_init, ChronoInit):
        return bias_init(key, (len(gates) * hidden_size,), dtype, gates=gates)
    return fused_blocks(bias_init, key, (hidden_size,), len(gates), dtype)


def resolve_forget_bias(forget_bias: Any, bias_init: Initializer, gates: tuple[str, ...], *, where: str) -> Any:
    """The value added to the forget-gate bias at init: ``None`` means 1.0 (Jozefowicz et al.
    2015), or 0.0 with :func:`chrono_init`, which sets the forget biases itself and refuses any
    other value (that they never add up silently). Also checks the gates suit chrono init."""
    if not isinstance(bias_init, ChronoInit):
        return 1.0 if forget_bias is None else forget_bias
    check_chrono_gates(gates, where=where)
    if forget_bias is None:
        return 0.0
    if not isinstance(forget_bias, jax.core.Tracer) and np.ndim(forget_bias) == 0 and forget_bias == 0:
        return 0.0
    raise _core.error(
        f"{where}: chrono_init sets the forget-gate biases itself; `forget_bias` would be added on top.",
        expected="forget_bias=None (the default) or 0 with bias_init=chrono_init(...)",
        got=f"forget_bias={forget_bias!r}",
        fix="drop forget_bias, or drop chrono_init to use a constant forget bias.",
    )


def normalize(x: jax.Array, scale: jax.Array, offset: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """Normalises the last axis to zero mean and unit variance, then scales and shifts."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale
    return y if offset is None else y + offset


def project_input(transform, x, params, norm, cdt, sdt):
    """The carry-independent part of a step, shared by every cell: ``transform(x, input_kernel,
    sdt)`` (a matmul or a convolution of compute-dtype operands, accumulated in the state dtype
    ``sdt``), layer-normalised by ``norm(xp, scale)`` when given, plus the bias; returned in the
    compute dtype."""
    xp = transform(x.astype(cdt), params.input_kernel.astype(cdt), sdt)
    if norm is not None:
        xp = norm(xp, params.layer_norm.input_scale.astype(sdt))
    return (xp + params.bias.astype(sdt)).astype(cdt)


def _identity(x):
    return x


def lstm_gates(coupled, zf, zi, zg, zo, c_prev, p_o):
    """``(i, f, g, o, c, tanh(c))`` of an LSTM step with sigmoid gates and tanh activations, from
    the gate pre-activations (input and forget peepholes already added) and the previous cell
    state: ``i = 1 - f`` when ``coupled`` (``zi`` unused), ``p_o * c`` added to the output gate
    when ``p_o`` is not None. Shared by ``lstm_pointwise``, its derivative and ``_fastlstm``."""
    f = jax.nn.sigmoid(zf)
    i = 1.0 - f if coupled else jax.nn.sigmoid(zi)
    g = jnp.tanh(zg)
    c = f * c_prev + i * g
    o = jax.nn.sigmoid(zo if p_o is None else zo + p_o * c)
    return i, f, g, o, c, jnp.tanh(c)


def _lstm_pointwise_primal(coupled, zf, zi, zg, zo, c_prev, p_o):
    _, _, _, o, c, tc = lstm_gates(coupled, zf, zi, zg, zo, c_prev, p_o)
    return o * tc, c


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def lstm_pointwise(coupled, zf, zi, zg, zo, c_prev, p_o):
    """The elementwise half of an LSTM step with sigmoid gates and tanh activations: from the gate
    pre-activations (input and forget peepholes already added) and the previous cell state to
    ``(o * tanh(c), c)``, with ``c = f * c_prev + i * tanh(zg)``, ``i = 1 - f`` when ``coupled``, and
    ``p_o * c`` added to the output gate when ``p_o`` is not None.

    Its derivative is written out (a ``custom_jvp``, so forward mode, reverse mode and higher orders
    all work) so that reverse mode stores six arrays per step, the products that multiply the
    tangents, where differentiating the plain expression stores eleven (every gate, its derivative
    factors, ``tanh(c)`` and ``c_prev``). On 2 CPU cores, at batch 32 x 256 units, an LSTM layer's
    forward+backward used 25-39 % less temporary memory and ran 4-16 % faster (benchmarks/README.md,
    fifth CPU run)."""
    return _lstm_pointwise_primal(coupled, zf, zi, zg, zo, c_prev, p_o)


@lstm_pointwise.defjvp
def _lstm_pointwise_jvp(coupled, primals, tangents):
    zf, zi, zg, zo, c_prev, p_o = primals
    dzf, dzi, dzg, dzo, dc_prev, dp_o = tangents
    i, f, g, o, c, tc = lstm_gates(coupled, zf, zi, zg, zo, c_prev, p_o)
    m = o * tc
    df = f * (1.0 - f)
    dc = f * dc_prev + (i * (1.0 - g * g)) * dzg
    if coupled:  # i = 1 - f: c moves with f by c_prev - g
        dc = dc + ((c_prev - g) * df) * dzf
    else:
        dc = dc + (c_prev * df) * dzf + (g * i * (1.0 - i)) * dzi
    if p_o is not None:
        dzo = dzo + p_o * dc + c * dp_o
    dm = (o * (1.0 - tc * tc)) * dc + (tc * o * (1.0 - o)) * dzo
    return (m, c), (dm, dc)


class DenseTransform(NamedTuple):
    """The transform of the dense cells: one step's input is ``(*batch, F)`` and a kernel
    ``(F, O)`` multiplies it (a matmul).

    A transform is what the gate arithmetic of a family (:func:`_lstm_family`,
    ``recurrent._gru._gru_family``) leaves open, so that one implementation serves a dense cell
    and its convolutional twin (``recurrent._conv.ConvTransform``):

    - ``input_rank``: axes of one step's input without batch axes;
    - ``split(input_shape) -> (spatial, features)``: ``init``'s input shape, checked;
    - ``kernel_shape(fan_in, fan_out)``: the shape of one gate block of a kernel;
    - ``apply(x, kernel, out_dtype)``: the input and the recurrent transform;
    - ``norm(x, scale, offset, eps=...)``: layer normalisation of one step's values, with
      a gain (and offset) per feature or channel;
    - ``output_shape(input_shape, size)``;
    - ``check_x_shape(x_shape)`` and ``check_x(x, features, spatial)``: the checks of
      ``initial_carry`` and ``project`` (``spatial`` is what peepholes fix, or ``None``);
    - ``sequence_kernels``: whether the exact whole-layer kernels of ``recurrent._kernels``,
      which run matmuls, may be declared;
    - ``lstm_pointwise``: :func:`lstm_pointwise`, read when traced (tests swap in the plain
      expression to compare derivatives).

    Peepholes are ``(*spatial, H)``: ``(H,)`` here, one weight per position and channel for a
    convolution.
    """

    where: str
    image_cell: str  # the convolutional twin, named in the error on image-shaped inputs

    input_rank = 1
    sequence_kernels = True

    def split(self, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{self.where}.init")
        if len(input_shape) != 1:
            raise _core.error(
                f"{self.where}.init: `input_shape` must be one step's input without batch or time axes.",
                expected="(features,)",
                got=repr(input_shape),
                fix=f"pass input_shape=(xs.shape[-1],); for images use {self.image_cell}.",
            )
        return (), input_shape[0]

    def kernel_shape(self, fan_in, fan_out):
        return (fan_in, fan_out)

    def apply(self, x, kernel, out_dtype):
        return _core.matmul(x, kernel, out_dtype)

    def norm(self, x, scale, offset=None, *, eps):
        return normalize(x, scale, offset, eps=eps)

    def output_shape(self, input_shape, size):
        return (size,)

    def check_x_shape(self, x_shape):
        x_shape = _core.check_dense_x_shape(x_shape, where=self.where)
        return x_shape

    def check_x(self, x, features, spatial=None):
        fix = f"give inputs of shape (*batch, {features}) or re-init with input_shape=(x.shape[-1],)."
        _core.check_input(x, (features,), where=self.where, fix=fix)

    @staticmethod
    def lstm_pointwise(*args):
        return lstm_pointwise(*args)


def dtypes(dtype: Any, params: Any) -> tuple[Any, Any]:
    """``(compute dtype, state dtype)`` of a cell with the ``dtype`` option and ``params``."""
    cdt = _core.compute_dtype(dtype, params.input_kernel)
    return cdt, _core.state_dtype(cdt)


def transformed_input(transform, params, x, *, layer_norm: bool, eps: float, dtype: Any, spatial=None):
    """The ``project`` of a family member: ``x`` checked, transformed, normalised (with
    ``layer_norm``) and biased (:func:`project_input`)."""
    transform.check_x(x, params.input_kernel.shape[-2], spatial)
    norm = (lambda v, scale: transform.norm(v, scale, eps=eps)) if layer_norm else None
    return project_input(transform.apply, x, params, norm, *dtypes(dtype, params))


# --------------------------------------------------------------------------------------
# The LSTM family: its options resolved once, then one small function per part of the cell.


class _LSTMSettings(NamedTuple):
    """The resolved options of one LSTM-family cell, read by the functions that make its parts."""

    where: str
    transform: Any
    params_type: type
    H: int
    P: int | None
    gates: tuple[str, ...]  # the fused blocks present, in LSTM_GATES order
    coupled: bool
    peephole: bool
    gate_recurrence: bool
    layer_norm: bool
    eps: float
    cell_clip: Any
    proj_clip: Any
    act_in: Callable[[jax.Array], jax.Array]
    act_out: Callable[[jax.Array], jax.Array]
    inits: dict[str, Initializer]  # by parameter field
    forget_bias: Any
    dtype: Any
    param_dtype: Any

    @property
    def R(self) -> int:
        """Size of ``h``, the recurrent input."""
        return self.H if self.P is None else self.P

    @property
    def sigmoid_gates(self) -> tuple[str, ...]:
        return tuple(g for g in self.gates if g != "cell")

    @property
    def fast(self) -> bool:
        """Whether the elementwise half is the usual LSTM's, with its written-out derivative
        (:func:`lstm_pointwise`); other activations, missing gates, clipping or a normalised cell
        take the general code."""
        return (
            self.act_in is jnp.tanh
            and self.act_out is jnp.tanh
            and {"forget", "output"} <= set(self.gates)
            and ("input" in self.gates or self.coupled)
            and self.cell_clip is None
            and not self.layer_norm
        )


def _check_gates(where: str, coupled: bool, input_gate: bool, forget_gate: bool) -> None:
    if coupled and not forget_gate:
        raise _core.error(
            f"{where}: a coupled input-forget gate (i = 1 - f) needs the forget gate.",
            expected="coupled=False or forget_gate=True",
            got="coupled=True, forget_gate=False",
            fix="drop one of the two options.",
        )
    if coupled and not input_gate:
        raise _core.error(
            f"{where}: `coupled=True` already replaces the input gate by 1 - f.",
            expected="input_gate=True (the default) with coupled=True",
            got="coupled=True, input_gate=False",
            fix="pass only coupled=True for CIFG, or only input_gate=False for NIG.",
        )


def _check_clips(where: str, cell_clip: Any, proj_clip: Any, P: int | None) -> None:
    for clip_name, clip in (("cell_clip", cell_clip), ("proj_clip", proj_clip)):
        if clip is not None and not isinstance(clip, jax.core.Tracer) and jnp.any(jnp.asarray(clip) <= 0):
            raise _core.error(
                f"{where}: `{clip_name}` must be positive.",
                expected=f"{clip_name} > 0, or None for no clipping",
                got=repr(clip),
                fix=f"pass e.g. {clip_name}=3.0.",
            )
    if proj_clip is not None and P is None:
        raise _core.error(
            f"{where}: `proj_clip` clips the projection, but there is none.",
            expected="proj_size set when proj_clip is given",
            got=f"proj_size=None, proj_clip={proj_clip!r}",
            fix="pass proj_size=..., or use cell_clip to clip the cell state.",
        )


def _lstm_settings(where, transform, params_type, o: dict[str, Any]) -> _LSTMSettings:
    """Checks the options ``o`` of :func:`_lstm_family` and resolves them."""
    H = _core.check_positive_int("hidden_size", o["hidden_size"], where=where)
    P = None if o["proj_size"] is None else _core.check_positive_int("proj_size", o["proj_size"], where=where)
    _check_gates(where, o["coupled"], o["input_gate"], o["forget_gate"])
    _check_clips(where, o["cell_clip"], o["proj_clip"], P)
    has = {"input": o["input_gate"] and not o["coupled"], "forget": o["forget_gate"], "output": o["output_gate"]}
    gates = tuple(g for g in LSTM_GATES if has.get(g, True))
    return _LSTMSettings(
        where=where,
        transform=transform,
        params_type=params_type,
        H=H,
        P=P,
        gates=gates,
        coupled=o["coupled"],
        peephole=o["peephole"],
        gate_recurrence=o["gate_recurrence"],
        layer_norm=o["layer_norm"],
        eps=o["layer_norm_epsilon"],
        cell_clip=o["cell_clip"],
        proj_clip=o["proj_clip"],
        act_in=_identity if o["input_activation"] is None else o["input_activation"],
        act_out=_identity if o["output_activation"] is None else o["output_activation"],
        inits={
            "input_kernel": o["kernel_init"],
            "recurrent_kernel": o["recurrent_kernel_init"],
            "bias": o["bias_init"],
            "peephole": o["peephole_init"],
            "gate_recurrent_kernel": o["gate_recurrent_kernel_init"],
            "projection": o["projection_init"],
        },
        forget_bias=resolve_forget_bias(o["forget_bias"], o["bias_init"], gates, where=where),
        dtype=o["dtype"],
        param_dtype=o["param_dtype"],
    )


def field_keys(params_type: type, key: jax.Array) -> dict[str, jax.Array]:
    """One key per parameter field but ``layer_norm`` (which is drawn from none), in field
    order, so a cell's draws depend only on its parameter type."""
    names = [f for f in params_type._fields if f != "layer_norm"]
    return dict(zip(names, jax.random.split(key, len(names))))


def _lstm_init(s: _LSTMSettings, key, input_shape):
    spatial, F = s.transform.split(input_shape)
    H, G, S, dt = s.H, len(s.gates), len(s.sigmoid_gates), s.param_dtype
    keys, init, shape = field_keys(s.params_type, key), s.inits, s.transform.kernel_shape
    bias = init_bias(init["bias"], keys["bias"], H, s.gates, dt)
    if "forget" in s.gates:
        f = s.gates.index("forget")
        bias = bias.at[f * H : (f + 1) * H].add(jnp.asarray(s.forget_bias, dt))

    def peep(gate):
        present = s.peephole and gate in s.gates
        return init["peephole"](keys[f"peephole_{gate}"], (*spatial, H), dt) if present else None

    fields = dict(
        input_kernel=fused_blocks(init["input_kernel"], keys["input_kernel"], shape(F, H), G, dt),
        recurrent_kernel=fused_blocks(init["recurrent_kernel"], keys["recurrent_kernel"], shape(s.R, H), G, dt),
        bias=bias,
        peephole_input=peep("input"),
        peephole_forget=peep("forget"),
        peephole_output=peep("output"),
        layer_norm=(
            LayerNormParams(jnp.ones((G * H,), dt), jnp.ones((G * H,), dt), jnp.ones((H,), dt), jnp.zeros((H,), dt))
            if s.layer_norm
            else None
        ),
    )
    if s.gate_recurrence:
        gr_init = init["gate_recurrent_kernel"]
        fields["gate_recurrent_kernel"] = fused_blocks(gr_init, keys["gate_recurrent_kernel"], (S * H, H), S, dt)
    if s.P is not None:
        fields["projection"] = init["projection"](keys["projection"], (H, s.P), dt)
    return s.params_type(**fields)


def _lstm_initial_carry(s: _LSTMSettings, params, x_shape):
    batch = s.transform.check_x_shape(x_shape)[:-1]  # with a convolution's spatial axes
    cdt, sdt = dtypes(s.dtype, params)
    h, c = jnp.zeros((*batch, s.R), cdt), jnp.zeros((*batch, s.H), sdt)
    if s.gate_recurrence:
        return LSTMGateState(h, c, jnp.zeros((*batch, len(s.sigmoid_gates) * s.H), sdt))
    return LSTMState(h, c)


def peephole_spatial(params) -> tuple[int, ...] | None:
    """The spatial shape that peepholes ``(*spatial, H)`` fix, or ``None`` without them."""
    peepholes = [p for p in (params.peephole_input, params.peephole_forget, params.peephole_output) if p is not None]
    return tuple(peepholes[0].shape[:-1]) if peepholes else None


def _lstm_project(s: _LSTMSettings, params, x):
    return transformed_input(
        s.transform, params, x, layer_norm=s.layer_norm, eps=s.eps, dtype=s.dtype, spatial=peephole_spatial(params)
    )


def _lstm_preactivations(s: _LSTMSettings, params, carry, xp, noise, cdt, sdt) -> dict[str, jax.Array]:
    """The gate pre-activations by gate name: the projected input plus the recurrent transform of
    ``h`` (layer-normalised with ``layer_norm``), plus the previous gates with gate recurrence."""
    h = _core.noisy_input(noise, carry.h)
    rec = s.transform.apply(h.astype(cdt), params.recurrent_kernel.astype(cdt), sdt)
    if s.layer_norm:
        rec = s.transform.norm(rec, params.layer_norm.recurrent_scale.astype(sdt), eps=s.eps)
    blocks = dict(zip(s.gates, jnp.split(xp.astype(sdt) + rec, len(s.gates), axis=-1)))
    if s.gate_recurrence:
        extra = carry.gates @ params.gate_recurrent_kernel.astype(sdt)
        for g, e in zip(s.sigmoid_gates, jnp.split(extra, len(s.sigmoid_gates), axis=-1)):
            blocks[g] = blocks[g] + e
    return blocks


def _with_peephole(s: _LSTMSettings, params, gate: str, z: jax.Array, c: jax.Array, sdt) -> jax.Array:
    """The pre-activation ``z`` of ``gate`` plus its diagonal peephole times the cell state ``c``."""
    return z + getattr(params, f"peephole_{gate}").astype(sdt) * c if s.peephole else z


def _fast_pointwise(s: _LSTMSettings, params, blocks, c, sdt):
    """``(m, c, gates)`` of the usual LSTM, through :func:`lstm_pointwise`."""
    zf = _with_peephole(s, params, "forget", blocks["forget"], c, sdt)
    zi = None if s.coupled else _with_peephole(s, params, "input", blocks["input"], c, sdt)
    p_o = params.peephole_output.astype(sdt) if s.peephole else None
    m, c_new = s.transform.lstm_pointwise(s.coupled, zf, zi, blocks["cell"], blocks["output"], c, p_o)
    # The gates for `return_trace` and the gate recurrence; unused, they cost nothing, and XLA
    # merges them with the same expressions inside `lstm_pointwise`.
    i, f, g, o, _, _ = lstm_gates(s.coupled, zf, zi, blocks["cell"], blocks["output"], c, p_o)
    return m, c_new, {"input": i, "forget": f, "cell": g, "output": o}


def _general_pointwise(s: _LSTMSettings, params, blocks, c, sdt):
    """``(m, c, gates)`` of any member: absent gates are 1 (``None`` here), ``i = 1 - f`` when
    coupled; the cell state clipped, and normalised on its way out with layer norm."""
    f = jax.nn.sigmoid(_with_peephole(s, params, "forget", blocks["forget"], c, sdt)) if "forget" in s.gates else None
    if s.coupled:
        i = 1.0 - f
    elif "input" in s.gates:
        i = jax.nn.sigmoid(_with_peephole(s, params, "input", blocks["input"], c, sdt))
    else:
        i = None
    g = s.act_in(blocks["cell"])
    c = (c if f is None else f * c) + (g if i is None else i * g)
    if s.cell_clip is not None:
        c = jnp.clip(c, -s.cell_clip, s.cell_clip)
    o = jax.nn.sigmoid(_with_peephole(s, params, "output", blocks["output"], c, sdt)) if "output" in s.gates else None
    c_out = c
    if s.layer_norm:
        ln = params.layer_norm
        c_out = s.transform.norm(c, ln.cell_scale.astype(sdt), ln.cell_offset.astype(sdt), eps=s.eps)
    m = s.act_out(c_out)
    return (m if o is None else o * m), c, {"input": i, "forget": f, "cell": g, "output": o}


def _lstm_output(s: _LSTMSettings, params, m, cdt, sdt) -> jax.Array:
    """``h`` from the gated cell output ``m``: projected (and clipped) with ``proj_size``."""
    if s.P is not None:
        m = _core.matmul(m.astype(cdt), params.projection.astype(cdt), sdt)
        if s.proj_clip is not None:
            m = jnp.clip(m, -s.proj_clip, s.proj_clip)
    return m.astype(cdt)


def _lstm_probe(s: _LSTMSettings, params, carry, xp, noise=None):
    cdt, sdt = dtypes(s.dtype, params)
    blocks = _lstm_preactivations(s, params, carry, xp, noise, cdt, sdt)
    pointwise = _fast_pointwise if s.fast else _general_pointwise
    m, c, values = pointwise(s, params, blocks, carry.c, sdt)
    h = _lstm_output(s, params, m, cdt, sdt)
    if s.gate_recurrence:
        new = LSTMGateState(h, c, jnp.concatenate([values[g] for g in s.sigmoid_gates], axis=-1))
    else:
        new = LSTMState(h, c)
    new = _core.zoneout(noise, carry, new)
    return new, new.h, {g: values[g] for g in s.gates}


def _lstm_family(
    hidden_size: int,
    *,
    name: str,
    transform: Any = None,
    params_type: type = LSTMParams,
    record: dict[str, Any] | None = None,
    peephole: bool = False,
    coupled: bool = False,
    input_gate: bool = True,
    forget_gate: bool = True,
    output_gate: bool = True,
    input_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    output_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    gate_recurrence: bool = False,
    proj_size: int | None = None,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    cell_clip: float | jax.Array | None = None,
    proj_clip: float | jax.Array | None = None,
    kernel_init: Initializer = _KERNEL_INIT,
    recurrent_kernel_init: Initializer = _RECURRENT_INIT,
    bias_init: Initializer = jax.nn.initializers.zeros,
    peephole_init: Initializer = jax.nn.initializers.zeros,
    gate_recurrent_kernel_init: Initializer = _RECURRENT_INIT,
    projection_init: Initializer = _KERNEL_INIT,
    forget_bias: float | jax.Array | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
) -> Cell:
    """The LSTM family over ``transform`` (a :class:`DenseTransform` by default; the
    convolution of :func:`recurrent.conv_lstm`), with parameters of ``params_type``.
    ``record`` is the options record of the cell (by default these options)."""
    options = {k: v for k, v in locals().items() if k not in ("name", "transform", "params_type", "record")}
    where = f"recurrent.{name}"
    transform = DenseTransform(where, "recurrent.conv_lstm") if transform is None else transform
    s = _lstm_settings(where, transform, params_type, options)
    kernels = _kernels.lstm_kernels(options, params_type) if transform.sequence_kernels else {}
    spec = _core.cell_spec(
        recurrent_input="h",
        cell_state=("c",),
        fixed=("gates",),  # the full gate recurrence's previous gates: no zoneout
        recurrent_kernels=("recurrent_kernel",),
        kernels=kernels,
        compute_dtype=dtype,
        jacobian_diagonal=_kernels.lstm_jacobian_diagonal(options, params_type) if transform.sequence_kernels else None,
    )
    return _core.make_cell(
        init=functools.partial(_lstm_init, s),
        initial_carry=functools.partial(_lstm_initial_carry, s),
        project=functools.partial(_lstm_project, s),
        probe=functools.partial(_lstm_probe, s),
        output_shape=lambda input_shape: transform.output_shape(input_shape, s.R),
        input_rank=transform.input_rank,
        name=name,
        options=options if record is None else record,
        spec=spec,
    )


def lstm(
    hidden_size: int,
    *,
    peephole: bool = False,
    coupled: bool = False,
    input_gate: bool = True,
    forget_gate: bool = True,
    output_gate: bool = True,
    input_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    output_activation: Callable[[jax.Array], jax.Array] | None = jnp.tanh,
    gate_recurrence: bool = False,
    proj_size: int | None = None,
    layer_norm: bool = False,
    layer_norm_epsilon: float = 1e-5,
    cell_clip: float | jax.Array | None = None,
    proj_clip: float | jax.Array | None = None,
    kernel_init: Initializer = _KERNEL_INIT,
    recurrent_kernel_init: Initializer = _RECURRENT_INIT,
    bias_init: Initializer = jax.nn.initializers.zeros,
    peephole_init: Initializer = jax.nn.initializers.zeros,
    gate_recurrent_kernel_init: Initializer = _RECURRENT_INIT,
    projection_init: Initializer = _KERNEL_INIT,
    forget_bias: float | jax.Array | None = None,
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
    ``input_kernel (F, 4H)``, ``recurrent_kernel (H, 4H)``, ``bias (4H,)``; the optional fields
    are ``None``. Parameter count ``4H(F + H + 1)``.

    Carry: :class:`LSTMState` ``(h, c)``, each ``(*batch, H)``; ``h`` in the compute dtype,
    ``c`` in float32 (float64 if computing in float64).

    Every option below composes with every other; :func:`lstm_variant` names the
    combinations studied by Greff et al. 2017.

    Args:
      hidden_size: ``H``, the size of ``c`` (and of ``h`` without projection).
      peephole: diagonal peepholes (Gers & Schmidhuber 2000): ``p_i * c(t-1)`` and
        ``p_f * c(t-1)`` enter the input and forget gates, ``p_o * c(t)`` the output gate.
      coupled: couple the input and forget gates, ``i = 1 - f`` (CIFG); drops the input block.
      input_gate, forget_gate, output_gate: ``False`` removes the gate (fixed to 1) with its
        weight block and peephole (Greff's NIG, NFG, NOG).
      input_activation: applied to the cell candidate ``g`` (``tanh``); ``None`` for the
        identity (NIAF).
      output_activation: applied to the cell state in ``h = o * act(c)`` (``tanh``); ``None``
        for the identity (NOAF).
      gate_recurrence: full gate recurrence (FGR): the sigmoid gates at ``t-1`` feed every
        sigmoid gate at ``t`` through ``gate_recurrent_kernel``; the carry is then
        :class:`LSTMGateState` ``(h, c, gates)``.
      proj_size: ``P``: project the output, ``h = (o * act(c)) @ projection`` (LSTMP, Sak et
        al. 2014; PyTorch's ``proj_size``); ``h`` and the recurrent input have size ``P``.
      layer_norm: layer normalisation (Ba et al. 2016) of the input projection, the recurrent
        projection and the cell state before the output activation:
        ``z = LN(W x) + LN(U h) + b``, ``h = o * act(LN(c))``.
      layer_norm_epsilon: added to the variance in layer normalisation.
      cell_clip: clip ``c`` to ``[-cell_clip, cell_clip]`` after each update (as TensorFlow's
        LSTMCell and TFLite); may be a traced array.
      proj_clip: clip the projected output likewise; needs ``proj_size``.
      kernel_init: initialiser of each ``(F, H)`` block of ``input_kernel``.
      recurrent_kernel_init: initialiser of each ``(R, H)`` block of ``recurrent_kernel``
        (orthogonal by default).
      bias_init: initialiser of each ``(H,)`` block of ``bias``, or :func:`chrono_init`,
        which draws the whole fused bias (chrono initialisation for long dependencies).
      peephole_init: initialiser of each ``(H,)`` peephole vector (zeros by default, so the
        cell starts as a standard LSTM and learns to use the cell state).
      gate_recurrent_kernel_init: initialiser of each block of ``gate_recurrent_kernel``.
      projection_init: initialiser of ``projection``.
      forget_bias: added to the forget-gate bias at init; ``None`` (the default) adds 1.0
        (Jozefowicz et al. 2015), or nothing with ``bias_init=chrono_init(...)``, which
        refuses any other value. May be a traced array, so a population can be initialised
        under ``vmap``.
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
    >>> cell = recurrent.lstm(16, proj_size=4, layer_norm=True, cell_clip=3.0)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> cell.step(params, cell.initial_carry(params, x.shape), x)[1].shape
    (2, 4)
    """
    return _lstm_family(name="lstm", **locals())


def _check_preset(name: str, preset: dict[str, Any], options: dict[str, Any]) -> None:
    """Raises if ``options`` contradict a preset (e.g. ``cifg_lstm(coupled=False)``), which would
    otherwise silently build another cell under the preset's name."""
    clash = {k: v for k, v in options.items() if k in preset and preset[k] is not v and preset[k] != v}
    if clash:
        raise _core.error(
            f"recurrent.{name}: options contradict the preset.",
            expected=f"options other than {sorted(preset)} (the preset is {preset})",
            got=repr(clash),
            fix=f"drop {sorted(clash)}, or build the cell with recurrent.lstm(...) directly.",
        )


def peephole_lstm(hidden_size: int, **options: Any) -> Cell:
    r"""LSTM with diagonal peephole connections (Gers & Schmidhuber 2000): ``lstm(peephole=True)``.

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
      **options: any option of :func:`lstm` (``peephole_init`` sets the peepholes' initialiser,
        zeros by default).

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.peephole_lstm(16)
    >>> params = cell.init(jax.random.key(0), (8,))
    >>> recurrent.count_params(params) - recurrent.count_params(recurrent.lstm(16).init(jax.random.key(0), (8,)))
    48
    """
    _check_preset("peephole_lstm", {"peephole": True}, options)
    return _lstm_family(hidden_size, name="peephole_lstm", **{"peephole": True, **options})


def cifg_lstm(hidden_size: int, *, peephole: bool = False, **options: Any) -> Cell:
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
      **options: any other option of :func:`lstm`.

    Example:

    >>> import jax, recurrent
    >>> params = recurrent.cifg_lstm(16).init(jax.random.key(0), (8,))
    >>> params.input_kernel.shape, params.recurrent_kernel.shape
    ((8, 48), (16, 48))
    """
    _check_preset("cifg_lstm", {"coupled": True}, options)
    return _lstm_family(hidden_size, name="cifg_lstm", **{"coupled": True, "peephole": peephole, **options})


#: Greff et al. 2017's nine variants as options of :func:`lstm`. V, the "vanilla" LSTM of
#: the paper, has peepholes; NP ("no peepholes") is the standard :func:`lstm`.
GREFF_VARIANTS: dict[str, dict[str, Any]] = {
    "V": dict(peephole=True),
    "NIG": dict(peephole=True, input_gate=False),
    "NFG": dict(peephole=True, forget_gate=False),
    "NOG": dict(peephole=True, output_gate=False),
    "NIAF": dict(peephole=True, input_activation=None),
    "NOAF": dict(peephole=True, output_activation=None),
    "NP": dict(peephole=False),
    "CIFG": dict(peephole=True, coupled=True),
    "FGR": dict(peephole=True, gate_recurrence=True),
}


def lstm_variant(name: str, hidden_size: int, **options: Any) -> Cell:
    r"""One of the nine LSTM variants of Greff et al. 2017, "LSTM: A Search Space Odyssey".

    ======  ==============================================  ==========================
    name    variant                                          parameters vs V
    ======  ==============================================  ==========================
    V       vanilla: input, forget, output gates, peepholes  4H(F+H+1) + 3H
    NIG     no input gate (i = 1)                            one gate block and peephole fewer
    NFG     no forget gate (f = 1)                           one gate block and peephole fewer
    NOG     no output gate (o = 1)                           one gate block and peephole fewer
    NIAF    no input activation (g without tanh)             equal
    NOAF    no output activation (h = o * c)                 equal
    NP      no peepholes (the standard :func:`lstm`)         V - 3H
    CIFG    coupled input and forget gate (i = 1 - f)        one gate block and peephole fewer
    FGR     full gate recurrence (gates(t-1) -> gates(t))    V + 9H^2
    ======  ==============================================  ==========================

    The variants are presets of the options of :func:`lstm` (see ``GREFF_VARIANTS``), so
    they compose with every other option (projection, layer norm, clipping, initialisers).

    Args:
      name: one of ``GREFF_VARIANTS`` (case-insensitive).
      hidden_size: ``H``.
      **options: further options of :func:`lstm`; they may not contradict the preset.

    Example:

    >>> import jax, recurrent
    >>> key = jax.random.key(0)
    >>> n = {v: recurrent.count_params(recurrent.lstm_variant(v, 10).init(key, (5,))) for v in ("V", "NP", "FGR")}
    >>> n["V"] - n["NP"], n["FGR"] - n["V"]
    (30, 900)
    """
    key = str(name).upper()
    if key not in GREFF_VARIANTS:
        raise _core.error(
            f"recurrent.lstm_variant: unknown variant {name!r}.",
            expected=f"one of {', '.join(GREFF_VARIANTS)}",
            got=repr(name),
            fix='pass e.g. lstm_variant("CIFG", 128).',
        )
    preset = GREFF_VARIANTS[key]
    clash = {k: v for k, v in options.items() if k in preset and preset[k] is not v and preset[k] != v}
    if clash:
        raise _core.error(
            f"recurrent.lstm_variant: options contradict the {key} preset.",
            expected=f"options other than {sorted(preset)} (the preset is {preset})",
            got=repr(clash),
            fix=f"drop {sorted(clash)}, or build the cell with recurrent.lstm(...) directly.",
        )
    return _lstm_family(hidden_size, name=f"lstm_variant({key})", **{**preset, **options})
