"""A registry of every cell and layer of ``recurrent``, for the shared test battery.

Each :class:`Entry` names one configuration (a cell, or a layer built by ``rnn``,
``bidirectional``, ``stacked`` or ``.reversed()``) together with ``input_shape``, one step's
input without batch or time axes. Entries are built from small *specs* that know two things:

- ``build(**dtypes)``: the library object, with ``dtype``/``param_dtype`` passed to every
  cell factory inside it;
- ``reference(params, xs)``: the same computation written as plain Python loops over the
  cells' ``step`` functions (flipping the time axis for backward directions), never calling
  ``rnn``, ``bidirectional`` or ``stacked``. It runs a whole sequence without ``lengths``;
  tests get variable-length behaviour by running each sequence alone, truncated.

Everything is memoised, so a configuration is built, initialised and compiled once per
process; keep sizes tiny (hidden 2-5, features 1-3, spatial 2-4).

>>> from tests.registry import REGISTRY, by_id
>>> entry = by_id("bidirectional_concat")
>>> entry.layer().output_shape(entry.input_shape)
(6,)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import recurrent
from recurrent import Cell, Layer

_peep = jax.nn.initializers.normal(0.5)  # peepholes are zero at init by default: make them matter
_bias = jax.nn.initializers.normal(0.3)
# Plain normal kernels: compiling the default initialisers (truncated normal, orthogonal by QR)
# for every shape would dominate the battery's time. A few entries keep the defaults.
_kernel = jax.nn.initializers.normal(0.4)
KEY_IMPL = "rbg"  # cheaper to compile than threefry, for the many small init shapes
FAST_INIT = dict(kernel_init=_kernel, recurrent_kernel_init=_kernel)
# The mLSTM has no recurrent kernel; its gate kernels are zero by default: random, so the gates read the input.
MLSTM_INIT = dict(kernel_init=_kernel, gate_kernel_init=_kernel, default_init=True)

REFERENCE_MERGES: dict[str, Callable[[Any, Any], Any]] = {
    "concat": lambda a, b: np.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: 0.5 * (a + b),
    "mul": lambda a, b: a * b,
}


def weighted_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """A user merge function: neither symmetric nor linear, so swapped directions show, and
    non-zero where both directions output zero, so padding must be masked after merging."""
    return a - 0.5 * b + 0.25 * a * b + 0.1


def _learned_lstm(hidden_size: int, **kwargs: Any) -> Cell:
    """An LSTM with a learned (here random, so that it matters) initial carry."""
    return recurrent.learned_initial_carry(recurrent.lstm(hidden_size, **kwargs), init=jax.nn.initializers.normal(0.5))


# --------------------------------------------------------------------------------------
# Memoisation helpers.


def _dtype_key(dtypes: dict[str, Any]) -> tuple:
    return tuple(sorted((k, jnp.dtype(v).name) for k, v in dtypes.items()))


@functools.cache
def _built(spec: Spec, key: tuple) -> Cell | Layer:
    return spec.build(**{k: jnp.dtype(v) for k, v in key})


def built(spec: Spec, **dtypes: Any) -> Cell | Layer:
    """The (memoised) library object of ``spec``."""
    return _built(spec, _dtype_key(dtypes))


@functools.cache
def jitted(fn: Callable) -> Callable:
    """A memoised ``jax.jit(fn)``, so repeated calls reuse the compiled function."""
    return jax.jit(fn)


@functools.cache
def jitted_apply(layer: Layer, time_major: bool = False) -> Callable:
    """``jax.jit`` of ``layer.apply`` taking ``(params, xs, lengths=None, carry=None, resets=None)``."""

    @jax.jit
    def apply(params, xs, lengths, carry, resets):
        return layer.apply(params, xs, lengths=lengths, carry=carry, time_major=time_major, resets=resets)

    def call(params, xs, lengths=None, carry=None, resets=None):  # one signature, one compiled function per shape
        return apply(params, xs, lengths, carry, resets)

    return call


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def step_loop(cell: Cell, params: Any, xs: Any, *, reverse: bool = False, carry: Any = None):
    """Runs ``cell.step`` in a Python loop over the time axis of ``xs (*batch, T, *features)``
    (from the end when ``reverse``); outputs stay aligned with input positions. Returns
    NumPy arrays (only the steps themselves run in JAX, jitted)."""
    xs = np.asarray(xs)
    nb = xs.ndim - 1 - cell.input_rank
    T = xs.shape[nb]
    features = tuple(xs.shape[nb + 1 :])
    if carry is None:
        carry = cell.initial_carry(params, (*xs.shape[:nb], *features))
    step = jitted(cell.step)
    ys = [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        carry, y = step(params, carry, xs[(slice(None),) * nb + (t,)])
        ys[t] = np.asarray(y)
    if T == 0:
        return to_numpy(carry), np.zeros((*xs.shape[:nb], 0, *cell.output_shape(features)), np.float32)
    return to_numpy(carry), np.stack(ys, axis=nb)


# --------------------------------------------------------------------------------------
# Specs: how to build a configuration, and its loop reference.


class Spec:
    """Base of the specs. ``dtypes`` are passed through to every cell factory."""

    is_cell: bool = False
    #: Runs forward in time only, so a sequence can be fed in chunks with ``carry=``.
    forward_only: bool = True

    def build(self, **dtypes: Any) -> Cell | Layer:
        raise NotImplementedError

    def reference(self, params: Any, xs: jax.Array, dtypes: dict[str, Any]):
        """``(carry, ys)`` of the whole sequence, by Python loops over cell steps."""
        raise NotImplementedError

    def input_rank(self, dtypes: dict[str, Any]) -> int:
        return built(self, **dtypes).input_rank

    def reversed_reference(self, params: Any, xs: jax.Array, dtypes: dict[str, Any]):
        """The reference of this configuration run backwards in time (full sequences)."""
        axis = xs.ndim - 1 - self.input_rank(dtypes)
        carry, ys = self.reference(params, np.flip(xs, axis), dtypes)
        return carry, np.flip(ys, axis)

    def segment_carry(self, carries: list[Any], reverse: bool = False) -> Any:
        """The final carry of a sequence cut into segments, each run alone, from the segments'
        carries in time order: a part running forward ends with the last segment, a part
        running backward (``reverse``) with the first."""
        return carries[0] if reverse else carries[-1]


class CellSpec(Spec):
    is_cell = True

    def __init__(self, factory: Callable[..., Cell], *args: Any, default_init: bool = False, **kwargs: Any):
        self.factory, self.args = factory, args
        self.kwargs = kwargs if default_init else {**FAST_INIT, **kwargs}

    def build(self, **dtypes):
        return self.factory(*self.args, **self.kwargs, **dtypes)

    def reference(self, params, xs, dtypes):
        return step_loop(built(self, **dtypes), params, xs)


class StackCells(Spec):
    """``recurrent.stacked`` of cells only: a cell. The reference runs each cell's own step
    loop over the whole sequence in turn (not the stacked cell's step)."""

    is_cell = True

    def __init__(self, items: list[Spec], *, residual: bool = False):
        assert all(item.is_cell for item in items)
        self.items, self.residual = items, residual

    def build(self, **dtypes):
        return recurrent.stacked([item.build(**dtypes) for item in self.items], residual=self.residual)

    def reference(self, params, xs, dtypes):
        return _stack_reference(self.items, self.residual, params, xs, dtypes)


class Rnn(Spec):
    """``recurrent.rnn(cell, ...)``; ``options`` are more of its keywords (``projection``,
    ``remat``, ``implementation``): none of them changes the result, so the reference is the
    cell's own step loop."""

    def __init__(self, cell: Spec, *, reverse: bool = False, unroll: int = 1, **options: Any):
        assert cell.is_cell
        self.cell, self.reverse, self.unroll, self.options = cell, reverse, unroll, options
        self.forward_only = not reverse

    def build(self, **dtypes):
        return recurrent.rnn(self.cell.build(**dtypes), reverse=self.reverse, unroll=self.unroll, **self.options)

    def reference(self, params, xs, dtypes):
        return step_loop(built(self.cell, **dtypes), params, xs, reverse=self.reverse)

    def segment_carry(self, carries, reverse=False):
        return self.cell.segment_carry(carries, reverse != self.reverse)


class Bidi(Spec):
    forward_only = False

    def __init__(self, forward: Spec, backward: Spec | None = None, *, merge: str | Callable = "concat"):
        self.forward, self.backward, self.merge = forward, backward, merge

    def build(self, **dtypes):
        backward = None if self.backward is None else self.backward.build(**dtypes)
        return recurrent.bidirectional(self.forward.build(**dtypes), backward, merge=self.merge)

    def reference(self, params, xs, dtypes):
        c_f, y_f = self.forward.reference(params.forward, xs, dtypes)
        c_b, y_b = (self.backward or self.forward).reversed_reference(params.backward, xs, dtypes)
        merge = REFERENCE_MERGES[self.merge] if isinstance(self.merge, str) else self.merge
        return recurrent.BidirectionalState(c_f, c_b), merge(y_f, y_b)

    def segment_carry(self, carries, reverse=False):
        return recurrent.BidirectionalState(
            self.forward.segment_carry([c.forward for c in carries], reverse),
            (self.backward or self.forward).segment_carry([c.backward for c in carries], not reverse),
        )


class Stack(Spec):
    """``recurrent.stacked`` with at least one layer: a layer."""

    def __init__(self, items: list[Spec], *, residual: bool = False):
        assert not all(item.is_cell for item in items)
        self.items, self.residual = items, residual
        self.forward_only = all(item.forward_only for item in items)

    def build(self, **dtypes):
        return recurrent.stacked([item.build(**dtypes) for item in self.items], residual=self.residual)

    def reference(self, params, xs, dtypes):
        return _stack_reference(self.items, self.residual, params, xs, dtypes)

    def segment_carry(self, carries, reverse=False):
        return tuple(item.segment_carry([c[i] for c in carries], reverse) for i, item in enumerate(self.items))


class Reversed(Spec):
    """``layer.reversed()`` of any layer (a cell is first wrapped by ``rnn``)."""

    forward_only = False

    def __init__(self, inner: Spec):
        self.inner = inner

    def build(self, **dtypes):
        inner = self.inner.build(**dtypes)
        return (recurrent.rnn(inner) if isinstance(inner, Cell) else inner).reversed()

    def reference(self, params, xs, dtypes):
        return self.inner.reversed_reference(params, xs, dtypes)

    def segment_carry(self, carries, reverse=False):
        return self.inner.segment_carry(carries, not reverse)


def _implementation(spec: Spec) -> str:
    parts = [getattr(spec, name, None) for name in ("cell", "forward", "backward", "inner")]
    parts += list(getattr(spec, "items", ()))
    if getattr(spec, "options", {}).get("implementation", "scan") != "scan":
        return spec.options["implementation"]
    return next((i for i in (_implementation(p) for p in parts if p is not None) if i != "scan"), "scan")


def _stack_reference(items, residual, params, xs, dtypes):
    carries, ys = [], xs
    for i, item in enumerate(items):
        carry, out = item.reference(params[i], ys, dtypes)
        ys = out + ys if residual and i > 0 else out
        carries.append(carry)
    return tuple(carries), ys


# --------------------------------------------------------------------------------------
# Entries.


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One configuration of the registry.

    Attributes:
      id: the pytest id.
      spec: how to build it, and its loop reference.
      input_shape: one step's input without batch or time axes.
    """

    id: str
    spec: Spec
    input_shape: tuple[int, ...]

    def __repr__(self) -> str:
        return f"Entry({self.id})"

    @property
    def is_cell(self) -> bool:
        return self.spec.is_cell

    @property
    def forward_only(self) -> bool:
        return self.spec.forward_only

    @property
    def implementation(self) -> str:
        """The ``implementation`` of its ``rnn`` layers: ``"vjp"`` if any runs the hand-written
        backward pass (which falls back to the scan, with a warning, where it does not apply)."""
        return _implementation(self.spec)

    def make(self, **dtypes: Any) -> Cell | Layer:
        """The library object: a :class:`recurrent.Cell` or :class:`recurrent.Layer`."""
        return built(self.spec, **dtypes)

    def layer(self, **dtypes: Any) -> Layer:
        """The object as a layer (``rnn(cell)`` for cells)."""
        return _as_layer(self.spec, _dtype_key(dtypes))

    def apply(self, *, time_major: bool = False, **dtypes: Any) -> Callable:
        """Jitted ``layer.apply(params, xs, lengths=None, carry=None, resets=None)``."""
        return jitted_apply(self.layer(**dtypes), time_major)

    def init(self, seed: int = 0, **dtypes: Any) -> Any:
        """Parameters from ``layer.init(jax.random.key(seed), input_shape)``."""
        return _init(self, seed, _dtype_key(dtypes))

    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.layer().output_shape(self.input_shape))

    def sample(self, seed: int, batch: tuple[int, ...], T: int, dtype: Any = np.float32) -> np.ndarray:
        """Random inputs of shape ``(*batch, T, *input_shape)``."""
        rng = np.random.default_rng(seed)
        return rng.normal(size=(*batch, T, *self.input_shape)).astype(dtype)

    def reference(self, params: Any, xs: jax.Array, **dtypes: Any):
        """``(carry, ys)`` by Python loops over cell steps, for full sequences (NumPy arrays)."""
        return self.spec.reference(params, np.asarray(xs), dtypes)

    def reference_with_lengths(self, params: Any, xs: np.ndarray, lengths: np.ndarray, **dtypes: Any):
        """The reference with each sequence run alone on its first ``lengths`` steps;
        outputs zero-padded to ``T``. Returns ``(carries, ys)`` where ``carries`` is a list of
        per-sequence carries in ``np.ndindex(batch)`` order."""
        batch = tuple(np.shape(lengths))
        T = xs.shape[len(batch)]
        ys, carries = [], []
        for idx in np.ndindex(*batch):
            L = int(lengths[idx])
            carry, y = self.reference(params, xs[idx][:L], **dtypes)
            y = np.asarray(y)
            ys.append(np.concatenate([y, np.zeros((T - L, *y.shape[1:]), y.dtype)], axis=0))
            carries.append(carry)
        out = tuple(self.output_shape())
        return carries, np.stack(ys).reshape((*batch, T, *out)) if ys else np.zeros((*batch, T, *out))

    def reference_with_resets(self, params: Any, xs: np.ndarray, lengths: np.ndarray, resets: np.ndarray, **dtypes):
        """The reference with ``resets`` (booleans of shape ``(*batch, T)``): each sequence's
        valid prefix is cut before every step where a reset falls, and each segment is run
        alone from the initial carry (resets at step 0 or in the padding change nothing).
        Returns ``(carries, ys)`` as :meth:`reference_with_lengths` does."""
        batch = tuple(np.shape(lengths))
        T = xs.shape[len(batch)]
        ys, carries = [], []
        for idx in np.ndindex(*batch):
            L = int(lengths[idx])
            cuts = [0, *(t for t in range(1, L) if resets[idx][t]), L]
            pieces = [self.reference(params, xs[idx][a:b], **dtypes) for a, b in zip(cuts, cuts[1:])]
            y = np.concatenate([np.asarray(y) for _, y in pieces], axis=0)
            ys.append(np.concatenate([y, np.zeros((T - L, *y.shape[1:]), y.dtype)], axis=0))
            carries.append(self.spec.segment_carry([carry for carry, _ in pieces]))
        return carries, np.stack(ys).reshape((*batch, T, *self.output_shape()))


@functools.cache
def _as_layer(spec: Spec, key: tuple) -> Layer:
    obj = _built(spec, key)
    return recurrent.rnn(obj) if isinstance(obj, Cell) else obj


@functools.cache
def _init(entry: Entry, seed: int, key: tuple) -> Any:
    return _as_layer(entry.spec, key).init(jax.random.key(seed, impl=KEY_IMPL), entry.input_shape)


def _entries() -> list[Entry]:
    C, L, P, G = CellSpec, recurrent.lstm, recurrent.peephole_lstm, recurrent.gru
    CIFG, CONV = recurrent.cifg_lstm, recurrent.conv_lstm
    # Each entry costs every check of the battery (about 30 compilations): an option or
    # combination that another entry already exercises in the same code path is not repeated
    # (the CIFG peephole is in cifg_lstm_projection_clip and bidirectional_mean, the ConvLSTM
    # peephole in conv_lstm_2d_layer_norm and stacked_conv_lstm_2d, residual stacks in
    # stacked_residual and stacked_layers_residual).
    return [
        # ---- cells
        Entry("lstm", C(L, 5, default_init=True), (3,)),
        Entry("peephole_lstm", C(P, 4, peephole_init=_peep), (3,)),
        Entry("cifg_lstm", C(CIFG, 4), (2,)),
        Entry("gru", C(G, 4, bias_init=_bias, default_init=True), (3,)),
        Entry("gru_reset_before", C(G, 4, reset_after=False, bias_init=_bias), (2,)),
        Entry("conv_lstm_1d", C(CONV, 3, (3,)), (4, 2)),
        Entry("conv_lstm_2d", C(CONV, 2, (3, 3), default_init=True), (3, 3, 2)),
        Entry("conv_lstm_3d", C(CONV, 2, (3, 3, 3)), (2, 3, 2, 1)),
        # ---- options of the LSTM family and the other cells, through the same battery
        Entry(
            "lstm_fgr_projection",
            C(
                L,
                4,
                peephole=True,
                peephole_init=_peep,
                gate_recurrence=True,
                gate_recurrent_kernel_init=_kernel,
                proj_size=3,
            ),
            (3,),
        ),
        Entry("lstm_nig_noaf_cell_clip", C(L, 4, input_gate=False, output_activation=None, cell_clip=0.7), (2,)),
        Entry(
            "cifg_lstm_projection_clip",
            C(CIFG, 4, peephole=True, peephole_init=_peep, proj_size=2, proj_clip=0.3),
            (3,),
        ),
        Entry("gru_layer_norm", C(G, 3, layer_norm=True, reset_after=False, bias_init=_bias), (2,)),
        Entry(
            "conv_lstm_2d_layer_norm",
            C(CONV, 2, (3, 3), layer_norm=True, peephole=True, peephole_init=_peep),
            (3, 3, 1),
        ),
        Entry("conv_gru_1d", C(recurrent.conv_gru, 2, (3,), bias_init=_bias), (4, 2)),
        Entry("slstm", C(recurrent.slstm, 4, num_heads=2), (3,)),
        Entry("slstm_exp_forget", C(recurrent.slstm, 4, num_heads=2, forget_gate="exp", bias_init=_bias), (2,)),
        Entry("mlstm", C(recurrent.mlstm, 4, num_heads=2, **MLSTM_INIT), (3,)),
        Entry(
            "mlstm_exp_forget_qkv_gates_layer_norm",
            C(
                recurrent.mlstm,
                6,
                num_heads=2,
                forget_gate="exp",
                gates_from="qkv",
                output_gate=False,
                layer_norm=True,
                gate_soft_cap=4.0,
                forget_bias_init=_bias,
                bias_init=_bias,
                **MLSTM_INIT,
            ),
            (2,),
        ),
        Entry("stacked_mlstm_lstm", StackCells([C(recurrent.mlstm, 4, num_heads=2, **MLSTM_INIT), C(L, 3)]), (3,)),
        Entry("bidirectional_mlstm", Bidi(C(recurrent.mlstm, 4, num_heads=2, **MLSTM_INIT)), (2,)),
        # minGRU and minLSTM have no recurrent kernel (their own kernel_init, the registry's normal draw)
        Entry("min_gru", C(recurrent.min_gru, 4, kernel_init=_kernel, bias_init=_bias, default_init=True), (3,)),
        Entry("min_lstm", C(recurrent.min_lstm, 3, kernel_init=_kernel, bias_init=_bias, default_init=True), (2,)),
        Entry("learned_initial_carry", C(_learned_lstm, 3), (2,)),
        Entry("stacked_lstm_gru", StackCells([C(L, 4), C(G, 3)]), (3,)),
        Entry(
            "stacked_residual",
            StackCells([C(L, 4), C(G, 4), C(CIFG, 4, peephole=True, peephole_init=_peep)], residual=True),
            (4,),  # the first layer's input is as wide as its output, and still has no residual
        ),
        Entry("stacked_conv_lstm_2d", StackCells([C(CONV, 3, (3, 3)), C(CONV, 2, (1, 3), peephole=True)]), (3, 3, 2)),
        # ---- layers
        Entry("rnn_peephole_unroll2", Rnn(C(P, 3, peephole_init=_peep), unroll=2), (2,)),
        Entry("rnn_reverse_gru", Rnn(C(G, 4, bias_init=_bias), reverse=True), (3,)),
        Entry("rnn_reverse_stacked", Rnn(StackCells([C(L, 3), C(G, 3)], residual=True), reverse=True), (2,)),
        Entry("bidirectional_concat", Bidi(C(L, 3, default_init=True)), (2,)),
        Entry("bidirectional_sum", Bidi(C(G, 3), C(CIFG, 3), merge="sum"), (2,)),
        Entry("bidirectional_mean", Bidi(C(CIFG, 3, peephole=True, peephole_init=_peep), merge="mean"), (3,)),
        Entry("bidirectional_mul", Bidi(C(L, 3), C(G, 3, reset_after=False), merge="mul"), (2,)),
        Entry("bidirectional_callable", Bidi(C(L, 3), merge=weighted_difference), (2,)),
        Entry("bidirectional_conv_lstm_1d", Bidi(C(CONV, 2, (3,))), (4, 1)),
        Entry(
            "bidirectional_of_layers",
            Bidi(StackCells([C(L, 3), C(G, 2)]), Rnn(C(CIFG, 2), reverse=True)),  # a backward given reversed
            (2,),
        ),
        Entry(
            "stacked_bidirectional_peephole",
            Stack([Bidi(C(P, 3, peephole_init=_peep)), Bidi(C(P, 3, peephole_init=_peep))]),
            (2,),
        ),
        Entry("stacked_bidirectional_then_cell", Stack([Bidi(C(L, 3)), C(G, 4)]), (2,)),
        Entry(
            "stacked_layers_residual",
            Stack([Bidi(C(L, 2)), Rnn(C(L, 4), reverse=True), C(G, 4)], residual=True),
            (3,),
        ),
        Entry("reversed_stacked", Reversed(Stack([Bidi(C(G, 2)), C(L, 3)])), (2,)),
        # ---- the driver's other paths, which CPUs do not take by default: the projection of all
        # steps before the loop (the GPU/TPU default), the hand-written backward pass, remat
        Entry("rnn_lstm_hoisted", Rnn(C(L, 4), projection="hoisted"), (3,)),
        Entry("rnn_gru_hoisted", Rnn(C(G, 4, bias_init=_bias), projection="hoisted"), (3,)),
        Entry("rnn_lstm_vjp", Rnn(C(L, 4), implementation="vjp"), (3,)),
        Entry("rnn_peephole_lstm_vjp", Rnn(C(P, 3, peephole_init=_peep), implementation="vjp"), (2,)),
        Entry("rnn_cifg_lstm_vjp_hoisted", Rnn(C(CIFG, 3), implementation="vjp", projection="hoisted"), (2,)),
        Entry("rnn_gru_vjp", Rnn(C(G, 4, bias_init=_bias), implementation="vjp"), (3,)),
        Entry("rnn_gru_vjp_hoisted", Rnn(C(G, 3, bias_init=_bias), implementation="vjp", projection="hoisted"), (2,)),
        Entry("bidirectional_lstm_vjp", Bidi(Rnn(C(L, 3), implementation="vjp")), (2,)),
        Entry("rnn_lstm_remat", Rnn(C(L, 4), remat=True), (3,)),
        Entry(
            "rnn_stacked_remat_hoisted",
            Rnn(StackCells([C(L, 3), C(G, 3)]), remat=True, projection="hoisted"),
            (2,),
        ),
        # ---- Newton's method over the driver's loop body, in parallel over time
        Entry("rnn_lstm_parallel_deer", Rnn(C(L, 4), implementation="parallel", method="deer"), (3,)),
        Entry("rnn_gru_parallel_elk", Rnn(C(G, 4, bias_init=_bias), implementation="parallel", method="elk"), (3,)),
    ]


REGISTRY: list[Entry] = _entries()
CELLS: list[Entry] = [e for e in REGISTRY if e.is_cell]
LAYERS: list[Entry] = [e for e in REGISTRY if not e.is_cell]
FORWARD_ONLY: list[Entry] = [e for e in REGISTRY if e.forward_only]
_BY_ID = {e.id: e for e in REGISTRY}
assert len(_BY_ID) == len(REGISTRY), "duplicate registry ids"


def by_id(entry_id: str) -> Entry:
    return _BY_ID[entry_id]
