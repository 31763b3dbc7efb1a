"""Types shared by every cell and layer, and the error helpers.

Shape legend (used in names such as ``h_BH`` or ``xs_TBF`` throughout the library):

====  =====================================================================
B     batch (in the driver, all leading batch axes flattened into one)
T     time
F     input features of one step
H     hidden size (``hidden_size``, or ``hidden_channels`` for ConvLSTM)
G     number of fused gate blocks (4 for LSTM, 3 for CIFG and GRU)
S     spatial axes of a ConvLSTM step (1, 2 or 3 of them)
C     input channels of a ConvLSTM step
====  =====================================================================
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PRNGKey = jax.Array
Shape = tuple[int, ...]
Params = Any
Carry = Any


class SequenceKernel(NamedTuple):
    """An exact implementation of a whole layer of one cell (a hand-written backward pass, a
    cuDNN call), which a cell's factory attaches to its :class:`CellSpec` only where it computes
    exactly what the scanned step computes.

    Attributes:
      apply: ``apply(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll) -> (carry_B, ys_BTH)``
        over one flattened batch axis, forward in time (the driver reverses sequences for a
        reversed layer); padded outputs are zero and the carry is the one after each
        sequence's last valid step.
      reason: ``reason(params, xs) -> str | None``: why it cannot run on these parameters and
        inputs (their dtypes, the backend), or ``None`` if it can.
      batchable: whether it runs under ``jax.vmap`` (a cuDNN call does not).
      remat: whether it honours ``rnn(..., remat=True)`` (a backward pass that stores every
        step's gates does not, so the driver scans instead).
    """

    apply: Callable[..., tuple[Carry, jax.Array]]
    reason: Callable[[Params, jax.Array], str | None] = lambda params, xs: None
    batchable: bool = True
    remat: bool = True


class CellSpec(NamedTuple):
    """What a cell declares about itself, so that the driver and the combinators never read a
    cell's name, options or leaf names. Build one with :func:`cell_spec`.

    Attributes:
      recurrent_input: ``recurrent_input(carry) -> part`` picks the part of a carry-shaped tree
        that the cell reads through its recurrent weights (``h``); recurrent dropout draws its
        masks for that part and hands them to the cell as ``noise.recurrent``, which the cell
        applies with :func:`noisy_input`. ``None``: the cell has no such input, and recurrent
        dropout is refused.
      carry_roles: ``carry_roles(carry) -> roles``, a tree like the carry with ``"hidden"``
        (zoneout at ``zoneout``'s rate), ``"cell"`` (``zoneout_cell``'s rate) or ``"fixed"`` (never
        zoned out) at each leaf.
      recurrent_kernels: ``recurrent_kernels(params) -> flags``, a tree like the parameters,
        True at the recurrent kernels that DropConnect drops; ``None``: DropConnect is refused.
      kernels: exact whole-layer implementations by name (``"vjp"``, ``"cudnn"``, or a name of
        the cell's own), a mapping from name to :class:`SequenceKernel`, or to a string that
        says why the cell has none under that name (the driver's fallback warning repeats it).
      compute_dtype: the compute dtype the cell was built with, if one was given (a 16-bit
        float makes the driver keep float32 copies of the carry in the loop on CPU).
      jacobian_diagonal: ``jacobian_diagonal(params, carry, xp, noise) -> diagonal``, the diagonal
        of the derivative of ``probe``'s new carry with respect to ``carry`` (a tree like the
        carry: the derivative of each entry by the same entry of the previous carry, noise
        included), or ``None`` where it does not apply (parameters of another type). The
        quasi-Newton solvers of ``rnn(..., implementation="parallel")`` use it in place of one
        forward-mode derivative per carry entry. ``None`` (the default): they compute it so.
    """

    recurrent_input: Callable[[Any], Any] | None = None
    carry_roles: Callable[[Carry], Any] = lambda carry: jax.tree.map(lambda _: "hidden", carry)
    recurrent_kernels: Callable[[Params], Any] | None = None
    kernels: Mapping[str, SequenceKernel | str] = types.MappingProxyType({})
    compute_dtype: Any = None
    jacobian_diagonal: Callable[..., Any] | None = None


def _field(tree: Any, name: str | None) -> Any:
    return tree if name is None else getattr(tree, name)


def cell_spec(
    *,
    recurrent_input: str | None | bool = False,
    cell_state: Sequence[str] = (),
    fixed: Sequence[str] = (),
    recurrent_kernels: Sequence[str] | None = None,
    kernels: Mapping[str, SequenceKernel | str] | None = None,
    compute_dtype: Any = None,
    jacobian_diagonal: Callable[..., Any] | None = None,
) -> CellSpec:
    """A :class:`CellSpec` from field names, for a cell whose carry and parameters are
    named tuples (or a single array).

    Args:
      recurrent_input: the carry field read through the recurrent weights (``"h"``), ``None``
        when the whole carry is (a GRU's array carry), or ``False`` for none.
      cell_state: carry fields zoned out at ``zoneout_cell``'s rate (``("c",)``).
      fixed: carry fields never zoned out.
      recurrent_kernels: parameter fields that DropConnect drops (``("recurrent_kernel",)``).
      kernels: exact whole-layer implementations by name.
      compute_dtype: the compute dtype option of the cell.
      jacobian_diagonal: the diagonal of the step's derivative by the carry (see
        :class:`CellSpec`), or ``None``.

    >>> from recurrent import LSTMState, cell_spec
    >>> spec = cell_spec(recurrent_input="h", cell_state=("c",), recurrent_kernels=("recurrent_kernel",))
    >>> spec.carry_roles(LSTMState(h=0.0, c=0.0))
    LSTMState(h='hidden', c='cell')
    """
    cell_state, fixed = tuple(cell_state), tuple(fixed)

    def roles(carry):
        if not hasattr(carry, "_fields"):
            return jax.tree.map(lambda _: "hidden", carry)
        role = lambda name: "cell" if name in cell_state else "fixed" if name in fixed else "hidden"  # noqa: E731
        return type(carry)(*(jax.tree.map(lambda _, r=role(n): r, v) for n, v in zip(carry._fields, carry)))

    def kernel_flags(params):
        names = tuple(recurrent_kernels)
        return type(params)(*(jax.tree.map(lambda _, hit=n in names: hit, v) for n, v in zip(params._fields, params)))

    return CellSpec(
        recurrent_input=None if recurrent_input is False else functools.partial(_field, name=recurrent_input),
        carry_roles=roles,
        recurrent_kernels=None if recurrent_kernels is None else kernel_flags,
        kernels=Options(kernels or {}),
        compute_dtype=compute_dtype,
        jacobian_diagonal=jacobian_diagonal,
    )


class Cell(NamedTuple):
    """One time step of a recurrent network: a bundle of pure functions.

    A cell holds its primary parts only; ``step`` and ``recur`` are derived from ``project``
    and ``probe`` where they are used, so replacing a part (``cell._replace(project=f)``)
    changes every use of it.

    Attributes:
      init: ``init(key, input_shape) -> params``; ``input_shape`` is one step's input
        without batch or time axes, e.g. ``(features,)`` or ``(*spatial, channels)``, of
        positive sizes.
      initial_carry: ``initial_carry(params, x_shape) -> carry``; ``x_shape`` is one
        step's input shape *with* its leading batch axes (possibly none).
      project: ``project(params, x) -> xp``, the part of a step that does not depend on
        the carry (the input-to-gates transform). It accepts any number of leading axes,
        so the driver may apply it to all time steps at once.
      probe: ``probe(params, carry, xp, noise=None) -> (carry, y, gates)``: the rest of the
        step, also returning the step's gate activations (a dict from gate name to array, a
        tuple of dicts for a stacked cell) for analysis and plots. ``noise`` is a
        :class:`StepNoise` the driver passes when regularisers are on.
      output_shape: ``output_shape(input_shape) -> shape`` of one step's output, without
        batch axes, so combinators can thread shapes without a forward pass.
      input_rank: number of trailing feature axes of one step's input (1 for dense
        cells, ``len(kernel_size) + 1`` for ConvLSTM).
      name: a short human-readable name, e.g. ``"lstm"``.
      options: the options the cell was built with (a read-only mapping from argument name
        to value, e.g. ``{"hidden_size": 128, "peephole": False, ...}``), or ``None`` for
        cells that do not record them. Equal options mean the same function (layers of
        equal cells can share one traced function), and converters read them to tell a
        plain cell from one with options that leave no trace in the parameters.
      spec: the :class:`CellSpec`: what the driver needs to know about the cell.

    Derived:
      step: ``step(params, carry, x) -> (carry, y)``, the ``lax.scan`` body order; works on
        any number of leading batch axes. ``step(p, c, x) == recur(p, c, project(p, x))``.
        Parameters whose structure or shapes differ from what ``init`` makes for ``x``'s
        feature shape raise at trace time.
      recur: ``recur(params, carry, xp, noise=None) -> (carry, y)``: ``probe`` without the gates.
    """

    init: Callable[[PRNGKey, Shape], Params]
    initial_carry: Callable[[Params, Shape], Carry]
    project: Callable[[Params, jax.Array], jax.Array]
    probe: Callable[..., tuple[Carry, jax.Array, Any]]
    output_shape: Callable[[Shape], Shape]
    input_rank: int
    name: str
    options: Mapping[str, Any] | None = None
    spec: CellSpec = CellSpec()

    @property
    def recur(self) -> Callable[..., tuple[Carry, jax.Array]]:
        return _recur(self.probe)

    @property
    def step(self) -> Callable[..., tuple[Carry, jax.Array]]:
        return _step(self.init, self.project, self.probe, self.input_rank, self.name)


@functools.lru_cache(maxsize=4096)
def _recur(probe):
    def recur(params, carry, xp, noise=None):
        carry, y, _ = probe(params, carry, xp, noise)
        return carry, y

    return recur


@functools.lru_cache(maxsize=4096)
def _step(init, project, probe, input_rank, name):
    """The step of a cell, made once per set of parts (so ``cell.step`` is the same function
    each time it is read, and ``jax.jit(cell.step)`` caches)."""

    def step(params, carry, x, noise=None):
        if getattr(x, "ndim", -1) >= input_rank:  # else `project` says the input has too few axes
            check_params(
                params,
                init,
                x.shape[x.ndim - input_rank :],
                where=f"{name}.step",
                inputs=lambda: only_input_errors(jax.eval_shape, project, params, x),
            )
        carry, y, _ = probe(params, carry, project(params, x), noise)
        return carry, y

    return step


def make_cell(
    *,
    init: Callable[[PRNGKey, Shape], Params],
    initial_carry: Callable[[Params, Shape], Carry],
    project: Callable[[Params, jax.Array], jax.Array],
    probe: Callable[..., tuple[Carry, jax.Array, Any]],
    output_shape: Callable[[Shape], Shape],
    input_rank: int,
    name: str,
    options: Mapping[str, Any] | None = None,
    spec: CellSpec | None = None,
) -> Cell:
    """Builds a :class:`Cell` from its parts. What every cell checks is added here, once:
    ``init`` refuses input shapes that are not tuples of positive ints
    (:func:`check_input_shape`), and ``step`` parameters that are not what ``init`` makes for
    the input's feature shape (:func:`check_params`).

    Args:
      init, initial_carry, project, probe, output_shape, input_rank, name, options: the
        :class:`Cell`'s parts.
      spec: what the cell declares about itself (:func:`cell_spec`); by default it declares no
        recurrent input, no recurrent kernels and no kernels, and zoneout treats every carry
        leaf as hidden state.
    """

    def checked_init(key, input_shape):
        return init(key, check_input_shape(input_shape, where=f"{name}.init"))

    options = None if options is None else Options(options)
    spec = spec or CellSpec()
    return Cell(checked_init, initial_carry, project, probe, output_shape, input_rank, name, options, spec)


class Options(Mapping):
    """A read-only record of the options a cell or layer was built with.

    It hashes and compares by identity, like the functions beside it in a :class:`Cell`, so
    cells and layers stay hashable (usable as static arguments of ``jax.jit``) whatever the
    option values are; :func:`same_options` compares two records by value."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]):
        self._items = types.MappingProxyType(dict(items))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"Options({dict(self._items)!r})"


class StepNoise(NamedTuple):
    """Regularisation noise for one step, built by the driver (:func:`recurrent.rnn`).

    Attributes:
      recurrent: ``None``, or multiplicative masks shaped like the cell's recurrent input
        (the part of the carry its :attr:`CellSpec.recurrent_input` picks: ``h``); the cell
        multiplies its recurrent input by it before the recurrent transform, with
        :func:`noisy_input` (variational dropout, Gal & Ghahramani 2016).
      zoneout: ``None``, or values ``d`` shaped like the carry (scalars broadcast): each
        carry entry becomes ``d * old + (1 - d) * new`` (zoneout, Krueger et al. 2017), with
        ``d`` a Bernoulli mask in training and the rate at evaluation.
      key: ``None`` at evaluation, else a PRNG key for this step (used by stacked cells for
        dropout between layers).
    """

    recurrent: Any = None
    zoneout: Any = None
    key: jax.Array | None = None


def noisy_input(noise: StepNoise | None, h: jax.Array) -> jax.Array:
    """The recurrent input ``h`` with its variational dropout mask applied, if any: the mask
    is the part of the carry that the cell's :attr:`CellSpec.recurrent_input` picks."""
    if noise is None or noise.recurrent is None:
        return h
    return h * noise.recurrent.astype(h.dtype)


def zoneout(noise: StepNoise | None, old: Carry, new: Carry) -> Carry:
    """Mixes the previous and the new carry with the zoneout values of ``noise``, if any."""
    if noise is None or noise.zoneout is None:
        return new
    return jax.tree.map(lambda d, o, n: (d * o + (1 - d) * n).astype(n.dtype), noise.zoneout, old, new)


def split_noise(noise: StepNoise | None, i: int) -> StepNoise | None:
    """The noise of layer ``i`` of a stacked cell (whose carry is a tuple of layer carries)."""
    if noise is None:
        return None
    recurrent, zone, key = noise
    return StepNoise(
        None if recurrent is None else recurrent[i],
        None if zone is None else zone[i],
        None if key is None else jax.random.fold_in(key, i),
    )


class Layer(NamedTuple):
    """A whole-sequence recurrent layer: ``init`` and ``apply``.

    Attributes:
      init: ``init(key, input_shape) -> params`` with ``input_shape`` one step's input
        without batch or time axes.
      apply: ``apply(params, xs, *, lengths=None, carry=None, time_major=False)
        -> (carry, ys)`` with ``xs`` of shape ``(*batch, time, *features)``
        (``(time, *batch, *features)`` when ``time_major``). The layers of this library
        raise at trace time on parameters whose structure or shapes differ from what
        ``init`` makes for the input's feature shape (dtypes may differ).
      initial_carry: ``initial_carry(params, x_shape) -> carry`` as for a cell.
      output_shape: ``output_shape(input_shape) -> shape`` of one step's output.
      input_rank: number of trailing feature axes of one step's input.
      name: a short human-readable name.
      reversed: ``reversed() -> Layer`` that runs the same parameters over each
        sequence's valid prefix in reverse, outputs aligned with input positions.
      options: what the layer was built from (for :func:`~recurrent.rnn`: the cell's name
        and options and the driver's options; for :func:`~recurrent.bidirectional`: both
        directions' options, the merge and ``one_scan``), or ``None``. Two layers with equal
        options compute the same function, which lets :func:`~recurrent.stacked` run a run of
        equal layers through one traced function, or scan it over stacked parameters. A
        layer made by hand with ``layer._replace(apply=...)`` must drop or change them.
      loop: for a layer made by :func:`~recurrent.rnn`, the :class:`ScanLoop` that ``apply``
        runs, so a combinator can run several such loops in one ``lax.scan`` (both
        directions of :func:`~recurrent.bidirectional`); ``None`` for other layers.
      check_inputs: ``check_inputs(params, xs)`` raises the library's error for inputs of
        another feature shape than ``params`` were made for (used by combinators to report
        that before a parameter mismatch); ``None`` if the layer has no such check.
    """

    init: Callable[[PRNGKey, Shape], Params]
    apply: Callable[..., tuple[Carry, jax.Array]]
    initial_carry: Callable[[Params, Shape], Carry]
    output_shape: Callable[[Shape], Shape]
    input_rank: int
    name: str
    reversed: Callable[[], Layer]
    options: Mapping[str, Any] | None = None
    loop: ScanLoop | None = None
    check_inputs: Callable[[Params, jax.Array], None] | None = None


class Loop(NamedTuple):
    """Everything of a layer's ``apply`` but the ``lax.scan``: ``finish(*run_scan(body, carry,
    inputs, ...))`` is its result. The body takes the true time index among its inputs, so
    a combinator may scan several loops in one ``lax.scan``."""

    carry: Carry
    body: Callable[[Carry, Any], tuple[Carry, Any]]
    inputs: Any
    finish: Callable[[Carry, Any], Any]


class ScanLoop(NamedTuple):
    """How a layer made by :func:`~recurrent.rnn` runs: ``prepare(params, xs, **apply_kwargs)
    -> Loop``, the scan's direction and unroll, and ``signature``: the layer's options without
    its direction (equal signatures: the same step, so two directions can share one batched
    scan), or ``None`` if unknown; ``implementation``: the layer's ``implementation``, whose
    kernel a fused scan would bypass (so a combinator fuses ``"scan"`` loops only)."""

    prepare: Callable[..., Loop]
    reverse: bool
    unroll: int | bool
    signature: Mapping[str, Any] | None = None
    implementation: str = "scan"


def same_options(a: Any, b: Any) -> bool:
    """Whether two recorded option mappings (see :attr:`Cell.options`) are known to be equal:
    plain values compare by value, anything else (functions, arrays) by identity."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_options(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(same_options(x, y) for x, y in zip(a, b))
    plain = (int, float, str, bool, complex, type(None), np.dtype, type)
    if isinstance(a, plain) and type(a) is type(b):
        return a == b
    return False


class LSTMState(NamedTuple):
    """Carry of the LSTM family: hidden output ``h`` (compute dtype) and cell state ``c``
    (float32, or float64 when the parameters are float64). Both have shape
    ``(*batch, H)`` (``(*batch, *S, H)`` for ConvLSTM)."""

    h: jax.Array
    c: jax.Array


def count_params(params: Params) -> int:
    """Number of scalars in a parameter pytree.

    >>> import jax, recurrent
    >>> recurrent.count_params(recurrent.lstm(8).init(jax.random.key(0), (4,)))
    416
    """
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


# --------------------------------------------------------------------------------------
# Errors. Every message says what was expected, what was received and how to fix it.


class Error(ValueError):
    """The library's error on user input (a ``ValueError``): what is wrong, then the expected,
    got and fix lines. Its own class lets a check tell the library's clear errors from what
    JAX raises on malformed input (see :func:`only_input_errors`)."""


def error(what: str, *, expected: str, got: str, fix: str) -> ValueError:
    return Error(f"{what}\n  expected: {expected}\n  got:      {got}\n  fix:      {fix}")


def check_dense_x_shape(x_shape: Sequence[int], *, where: str) -> Shape:
    """``initial_carry``'s ``x_shape`` for a dense cell: one step's input shape with its batch axes."""
    x_shape = check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
    if len(x_shape) < 1:
        raise error(
            f"{where}.initial_carry: `x_shape` must be one step's input shape with its batch axes.",
            expected="(*batch, features)",
            got=repr(x_shape),
            fix="pass x.shape of one time step, e.g. (batch, features) or (features,).",
        )
    return x_shape


def check_shape(name: str, shape: Sequence[int], *, where: str) -> Shape:
    """Validates a user-given shape tuple of non-negative ints."""
    try:
        # Only ints: int() would silently truncate 2.5 or parse "3".
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) for d in shape):
            raise TypeError
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise error(
            f"{where}: `{name}` must be a tuple of ints.",
            expected="a tuple such as (features,) or (*spatial, channels)",
            got=repr(shape),
            fix=f"pass `{name}` as a tuple of ints, e.g. (32,).",
        ) from None
    if any(d < 0 for d in shape):
        raise error(
            f"{where}: `{name}` has a negative size.",
            expected="non-negative sizes",
            got=repr(shape),
            fix="check how the shape was computed.",
        )
    return shape


def check_input_shape(input_shape: Any, *, where: str) -> Shape:
    """Validates the ``input_shape`` given to ``init`` (one step's input without batch or time
    axes): a tuple of positive ints. A zero-size axis would leave the initialisers nothing to
    scale by (a ZeroDivisionError inside JAX) or make parameters of size zero."""
    shape = check_shape("input_shape", input_shape, where=where)
    if any(d == 0 for d in shape):
        raise error(
            f"{where}: `input_shape` has a zero-size axis.",
            expected="positive sizes: one step's input has at least one feature (and one position per spatial axis)",
            got=repr(shape),
            fix="check how the shape was computed, e.g. input_shape=(xs.shape[-1],) of non-empty inputs.",
        )
    return shape


def check_positive_int(name: str, value: Any, *, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise error(
            f"{where}: `{name}` must be a positive int.",
            expected="an int >= 1",
            got=repr(value),
            fix=f"pass e.g. {name}=128.",
        )
    return int(value)


def check_number(name: str, value: Any, *, where: str, example: float, allow_zero: bool = False) -> float:
    """``value`` as a float: a finite Python or NumPy real number, > 0 (>= 0 with ``allow_zero``)."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise error(
            f"{where}: `{name}` must be a {'non-negative' if allow_zero else 'positive'} number.",
            expected=f"a finite float {'>= 0' if allow_zero else '> 0'}",
            got=repr(value),
            fix=f"pass e.g. {name}={example}.",
        )
    return float(value)


def narrow_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a 16-bit float (bfloat16, float16)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


class ScanOutputs:
    """Packs what a ``lax.scan`` body emits (its stacked outputs, or its carry), and unpacks it.

    XLA's CPU backend writes each step's slice of a stacked bfloat16 (or float16) output
    through float32 copies of the whole ``(T, ...)`` buffer, so every step costs time in
    proportion to ``T`` (95 us a step at ``T = 2000``, batch 8, width 256; 2.7 us stacked as
    float32). On CPU, :meth:`pack` casts such leaves to float32 and :meth:`unpack` casts them
    back: exact (every bfloat16 and float16 value is a float32 value) and differentiable
    (a bitcast to integers would be cheaper in memory but cut the gradient). Elsewhere both
    return their argument. One instance serves one tree structure: ``pack`` records the
    dtypes (when the body is traced)."""

    def __init__(self):
        self.dtypes = None

    def pack(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        self.dtypes = [a.dtype for a in leaves]
        if jax.default_backend() != "cpu" or not any(narrow_float(d) for d in self.dtypes):
            return tree
        return treedef.unflatten([a.astype(jnp.float32) if narrow_float(a.dtype) else a for a in leaves])

    def unpack(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        return treedef.unflatten([a.astype(d) if a.dtype != d else a for a, d in zip(leaves, self.dtypes)])


def compute_dtype(dtype: Any, reference: jax.Array) -> jnp.dtype:
    """The compute dtype: ``dtype`` if given, else that of the parameters."""
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(reference.dtype)


def state_dtype(cdtype: Any) -> jnp.dtype:
    """Cell state accumulates in float32 (float64 when computing in float64)."""
    return jnp.promote_types(jnp.float32, cdtype)


def matmul(a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
    """``a @ b`` of operands in the compute dtype, accumulated and returned in ``out_dtype``
    (the state dtype). With bfloat16 operands this is both more accurate than a bfloat16
    product and faster: XLA's CPU backend runs bfloat16 x bfloat16 -> float32 on its fast
    kernels but upcasts a bfloat16 -> bfloat16 product (measured on AVX512-BF16: a scanned
    LSTM step 2x faster; ``python -m benchmarks.techniques``); GPUs and TPUs accumulate in
    float32 either way.

    On CPU a matrix ``b`` (a kernel) goes through :func:`_kernel_matmul`, whose derivative makes
    the backward pass multiply by ``b``'s transpose as an array laid out as such (measured on CPU
    only; GPU and TPU matmuls read a transposed operand natively)."""
    if b.ndim == 2 and jax.default_backend() == "cpu":
        return _kernel_matmul(a, b, out_dtype)
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _kernel_matmul(a, b, out_dtype):
    """``a (..., K) @ b (K, N)``, with the usual derivative written so that the cotangent of ``a``
    is ``g @ b.T`` with ``b.T`` materialised as a ``(N, K)`` array.

    Reverse mode through a ``lax.scan`` otherwise computes each step's ``g @ b.T`` as a matmul
    whose right operand is read transposed (``b`` as laid out for the forward pass), which
    XLA's CPU backend runs more slowly than a matmul of plainly laid-out operands: the
    forward+backward of the benchmark suite's LSTM, GRU, peephole, CIFG, bidirectional and
    4-layer cells took 4-10 % longer that way (``python -m benchmarks.kernel_ab`` times both).
    Here the tangent contracts ``da`` with ``b.T``, a value of the primal ``b`` alone: JAX
    computes it once, outside the loop (a loop-invariant residual), and transposes the
    contraction into a plain ``g @ b.T``. Values are those of ``a @ b``; every transformation
    (``jvp``, ``vmap``, higher orders) applies as to a matmul."""
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


def _kernel_matmul_jvp(out_dtype, primals, tangents):
    a, b = primals
    da, db = tangents
    y = jnp.matmul(a, b, preferred_element_type=out_dtype)
    zero = jax.custom_derivatives.SymbolicZero
    terms = []
    if not isinstance(da, zero):
        dt = jnp.promote_types(a.dtype, b.dtype)  # as jnp.matmul promotes its operands
        bt = b.T.astype(dt)  # (N, K): the cotangent of `a` is g @ bt, a plainly laid-out matmul
        contract = (((da.ndim - 1,), (1,)), ((), ()))
        terms.append(jax.lax.dot_general(da.astype(dt), bt, contract, preferred_element_type=out_dtype))
    if not isinstance(db, zero):
        terms.append(jnp.matmul(a, db, preferred_element_type=out_dtype))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_kernel_matmul.defjvp(_kernel_matmul_jvp, symbolic_zeros=True)


def check_input(x: jax.Array, expected: Shape, *, where: str, fix: str) -> None:
    """Checks the trailing (feature) axes of a step input against ``expected``."""
    rank = len(expected)
    if not hasattr(x, "shape") or x.ndim < rank:
        raise error(
            f"{where}: input has too few axes.",
            expected=f"shape (*batch, {', '.join(map(str, expected))}) with {rank} feature axis(es)",
            got=f"shape {getattr(x, 'shape', type(x).__name__)}",
            fix=fix,
        )
    if tuple(x.shape[x.ndim - rank :]) != tuple(expected):
        raise error(
            f"{where}: input feature shape does not match the parameters.",
            expected=f"trailing axes {tuple(expected)} (the input_shape given to init)",
            got=f"shape {tuple(x.shape)} with trailing axes {tuple(x.shape[x.ndim - rank :])}",
            fix=fix,
        )


def check_carry(carry: Carry, expected: Carry, *, where: str) -> None:
    """Checks a user-given carry against the structure, shapes and dtypes of ``expected``
    (a pytree of ``jax.ShapeDtypeStruct`` or arrays)."""
    fix = "pass a carry returned by this layer or cell, or one from `initial_carry(params, x_shape)`."
    s_got, s_exp = jax.tree.structure(carry), jax.tree.structure(expected)
    if s_got != s_exp:
        raise error(f"{where}: carry has the wrong structure.", expected=str(s_exp), got=str(s_got), fix=fix)
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, e), g in zip(paths, jax.tree.leaves(carry)):
        name = "carry" + jax.tree_util.keystr(path)
        if tuple(np.shape(g)) != tuple(e.shape):
            raise error(
                f"{where}: {name} has the wrong shape.",
                expected=f"{tuple(e.shape)} (batch axes of the input, then the state shape)",
                got=str(tuple(np.shape(g))),
                fix=fix,
            )
        if jnp.result_type(g) != e.dtype:
            raise error(
                f"{where}: {name} has the wrong dtype.",
                expected=str(e.dtype),
                got=str(jnp.result_type(g)),
                fix=fix + " Cell state is kept in float32; cast with `.astype` if you built it by hand.",
            )


# --------------------------------------------------------------------------------------
# Parameters: what ``init`` makes, checked on every ``apply`` and ``step``.

_EXPECTED_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def expected_params(init: Callable[[PRNGKey, Shape], Params], input_shape: Shape) -> Any:
    """What ``init(key, input_shape)`` makes, as a pytree of ``jax.ShapeDtypeStruct``: traced
    (never run) once per ``init`` and input shape, then cached while ``init`` lives."""
    input_shape = tuple(int(d) for d in input_shape)
    try:
        per_shape = _EXPECTED_PARAMS.setdefault(init, {})
    except TypeError:  # an `init` that cannot be weakly referenced: not cached
        per_shape = {}
    if input_shape not in per_shape:
        per_shape[input_shape] = jax.eval_shape(lambda: init(jax.random.key(0), input_shape))
    return per_shape[input_shape]


def only_input_errors(check: Callable[..., Any], *args: Any) -> None:
    """Runs ``check(*args)``, a cell's or layer's input checks, on parameters that may not be
    its own: the library's errors (an input of another feature shape than the parameters
    were made for) propagate; anything else, which the parameters break, is left to
    :func:`check_params`."""
    try:
        check(*args)
    except Error:
        raise
    except Exception:  # noqa: BLE001 - the parameter check explains it
        pass


def _is_array(x: Any) -> bool:
    return x is not None and (hasattr(x, "shape") or isinstance(x, (int, float, complex, np.number)))


def _describe(x: Any) -> str:
    if x is None:
        return "None"
    if _is_array(x):
        return f"an array of shape {tuple(np.shape(x))}"
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return f"{type(x).__name__}({', '.join(x._fields)})"
    if isinstance(x, Mapping):
        return f"a {type(x).__name__} with keys {sorted(map(str, x))}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return type(x).__name__


def _node(tree: Any):
    """One level of a pytree node: its definition (the node's type and keys) and its children."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    return treedef, [(path[0], child) for path, child in flat]


def _difference(got: Any, expected: Any, path: tuple, shapes: bool):
    """``(path, expected, got)`` of the first place where ``got`` differs from ``expected`` (a
    pytree of ``jax.ShapeDtypeStruct``) in structure, or in leaf shapes when ``shapes``; or None."""
    if isinstance(expected, jax.ShapeDtypeStruct):
        if not _is_array(got):
            return path, _describe(expected), _describe(got)
        if shapes and tuple(np.shape(got)) != tuple(expected.shape):
            return path, str(tuple(expected.shape)), str(tuple(np.shape(got)))
        return None
    if expected is None:
        return None if got is None else (path, "None (no such parameter here)", _describe(got))
    if got is None or _is_array(got):
        return path, _describe(expected), _describe(got)
    (e_def, e_children), (g_def, g_children) = _node(expected), _node(got)
    if e_def != g_def:
        return path, _describe(expected), _describe(got)
    for (key, e), (_, g) in zip(e_children, g_children):
        found = _difference(g, e, (*path, key), shapes)
        if found is not None:
            return found
    return None


def check_params(
    params: Params,
    init: Callable[[PRNGKey, Shape], Params],
    input_shape: Shape,
    *,
    where: str,
    inputs: Callable[[], None] | None = None,
) -> None:
    """Raises unless ``params`` have the pytree structure and leaf shapes that
    ``init(key, input_shape)`` makes (dtypes may differ: parameters cast to bfloat16 are fine),
    naming the first leaf that differs. Parameters of another cell, hidden size or option
    would otherwise run with some of them ignored, or fail deep inside JAX.

    Only shapes are traced (:func:`expected_params`), so it costs nothing at run time and
    raises at trace time under ``jit``. ``inputs`` runs the caller's input checks first when
    the shapes differ (not the structure), so that inputs of another feature shape than the
    parameters were made for get the input's error."""
    try:
        expected = expected_params(init, input_shape)
    except Exception:
        if inputs is not None:
            inputs()
        raise
    leaves, treedef = jax.tree.flatten(params)
    if treedef == jax.tree.structure(expected) and all(
        tuple(np.shape(g)) == e.shape for g, e in zip(leaves, jax.tree.leaves(expected))
    ):
        return  # the usual case, without walking the tree
    found = _difference(params, expected, (), shapes=False)
    shaped = found is None
    if shaped:
        found = _difference(params, expected, (), shapes=True)
        if found is None:
            return
        if inputs is not None:
            inputs()
    path, want, got = found
    name = "params" + jax.tree_util.keystr(path)
    if shaped:
        what = f"{where}: {name} has the wrong shape."
    else:
        what = f"{where}: `params` has the wrong structure at {name} (parameters of another cell or layer?)."
    raise error(
        what,
        expected=f"{want}, as `init(key, {tuple(input_shape)})` makes it",
        got=got,
        fix="apply parameters with the cell or layer (and options) they were made for, or make new ones "
        f"with `init(key, {tuple(input_shape)})`; other dtypes (e.g. bfloat16 casts) are fine.",
    )
