"""Flax NNX modules for every cell and combinator of ``recurrent``.

Each module holds the parameters of a functional :class:`recurrent.Cell` or
:class:`recurrent.Layer` as ``nnx.Param`` variables (one per array, the functional
parameter pytree kept as is, so ``nnx.state`` paths read like ``params/input_kernel`` or
``params/0/forward/bias``) and calls the functional code on their values. The modules add
no math of their own: on the same parameters they give exactly the functional results.

- :class:`Cell`: one time step, ``cell(carry, x) -> (carry, y)``.
- :class:`RNN`: a whole sequence, ``rnn(xs, *, lengths=None, carry=None, time_major=False)
  -> (carry, ys)``, from a cell (scanned with :func:`recurrent.rnn`) or any layer.
- :class:`Bidirectional` and :class:`Stacked`: :class:`RNN` around
  :func:`recurrent.bidirectional` and :func:`recurrent.stacked`.
- :class:`LSTM`, :class:`PeepholeLSTM`, :class:`CIFGLSTM`, :class:`GRU`, :class:`ConvLSTM`,
  :class:`SLSTM`, :class:`MLSTM`, :class:`MinGRU`, :class:`MinLSTM`: sequence modules for each
  cell, built from sizes.

Parameters are drawn with ``rngs.params()``. Every module also takes ``params=`` instead of
``rngs`` to wrap existing functional parameters (e.g. trained or loaded with the functional
API), and exposes them back, unwrapped, as ``module.pure_params``.

Import it as ``from recurrent import nnx as rnnx`` (it is not imported by ``import
recurrent``, which keeps that import free of ``flax.nnx``).

>>> import jax, jax.numpy as jnp, optax
>>> from flax import nnx
>>> from recurrent import nnx as rnnx
>>> class Classifier(nnx.Module):
...     def __init__(self, rngs):
...         self.rnn = rnnx.LSTM(8, 32, rngs=rngs)
...         self.head = nnx.Linear(32, 2, rngs=rngs)
...     def __call__(self, xs, lengths):
...         carry, ys = self.rnn(xs, lengths=lengths)
...         return self.head(carry.h)          # the output after each last valid step
>>> model = Classifier(nnx.Rngs(0))
>>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
>>> @nnx.jit
... def train_step(model, optimizer, xs, lengths, labels):
...     def loss_fn(model):
...         logits = model(xs, lengths)
...         return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
...     loss, grads = nnx.value_and_grad(loss_fn)(model)
...     optimizer.update(model, grads)
...     return loss
>>> loss = train_step(model, optimizer, jnp.ones((4, 10, 8)), jnp.array([10, 7, 3, 1]), jnp.array([0, 1, 0, 1]))
>>> loss.shape
()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import recurrent
from recurrent import _core
from recurrent._core import Shape

__all__ = [
    "CIFGLSTM",
    "GRU",
    "LSTM",
    "MLSTM",
    "MinGRU",
    "MinLSTM",
    "SLSTM",
    "Bidirectional",
    "Cell",
    "ConvLSTM",
    "PeepholeLSTM",
    "RNN",
    "Stacked",
]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _make_params(init: Callable, input_shape: Shape, rngs: nnx.Rngs | None, params: Any, *, where: str):
    """The functional parameters as a pytree of ``nnx.Param``: drawn with ``rngs.params()``, or
    ``params`` checked against what ``init`` would make for ``input_shape``."""
    if (rngs is None) == (params is None):
        raise _core.error(
            f"{where}: give exactly one of `rngs` and `params`.",
            expected="rngs=nnx.Rngs(0) to initialise, or params=... to wrap existing functional parameters",
            got=f"rngs={'None' if rngs is None else type(rngs).__name__}, "
            f"params={'None' if params is None else type(params).__name__}",
            fix="pass rngs=nnx.Rngs(0) (or params=layer.init(key, input_shape)), not both.",
        )
    if rngs is not None:
        if not isinstance(rngs, nnx.Rngs):
            raise _core.error(
                f"{where}: `rngs` must be an nnx.Rngs.",
                expected="nnx.Rngs(seed) or nnx.Rngs(params=key)",
                got=type(rngs).__name__,
                fix="pass rngs=nnx.Rngs(0).",
            )
        params = init(rngs.params(), input_shape)
    else:
        params = jax.tree.map(lambda v: v.get_value() if _is_variable(v) else v, params, is_leaf=_is_variable)
        _core.check_params(params, init, input_shape, where=where)
        params = jax.tree.map(jnp.asarray, params)
    return nnx.data(jax.tree.map(nnx.Param, params))


class _Recurrent(nnx.Module):
    """Shared by the modules: the parameter pytree of ``nnx.Param`` and its plain values."""

    params: Any

    @property
    def pure_params(self) -> Any:
        """The parameters as the functional API takes them (arrays, not ``nnx.Param``)."""
        return jax.tree.map(lambda v: v.get_value(), self.params, is_leaf=_is_variable)


class Cell(_Recurrent):
    """One time step of a :class:`recurrent.Cell` as an NNX module.

    ``module(carry, x) == cell.step(module.pure_params, carry, x)``; ``x`` has any number of
    leading batch axes.

    Args:
      cell: a :class:`recurrent.Cell`, e.g. ``recurrent.lstm(64)`` or a stacked cell.
      input_shape: one step's input without batch or time axes, e.g. ``(features,)``.
      rngs: ``nnx.Rngs``; the parameters are ``cell.init(rngs.params(), input_shape)``.
      params: instead of ``rngs``, existing functional parameters of ``cell``.

    Attributes:
      cell: the functional cell.
      input_shape: as given.
      params: the cell's parameter pytree with ``nnx.Param`` leaves.

    Example (generation, one step at a time):

    >>> import jax.numpy as jnp, recurrent
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> cell = rnnx.Cell(recurrent.stacked([recurrent.lstm(16), recurrent.gru(16)]), (8,), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 8))
    >>> carry = cell.initial_carry(x.shape)
    >>> for _ in range(3):
    ...     carry, y = cell(carry, x)
    >>> y.shape, len(carry)
    ((2, 16), 2)
    """

    def __init__(
        self,
        cell: recurrent.Cell,
        input_shape: Sequence[int],
        *,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        where = "recurrent.nnx.Cell"
        if not isinstance(cell, recurrent.Cell):
            raise _core.error(
                f"{where}: expected a cell.",
                expected="a recurrent.Cell, e.g. recurrent.lstm(64)",
                got=type(cell).__name__,
                fix="for layers (bidirectional, stacked with layers) use recurrent.nnx.RNN.",
            )
        self.cell = cell
        self.input_shape = _core.check_shape("input_shape", input_shape, where=where)
        self.params = _make_params(cell.init, self.input_shape, rngs, params, where=where)

    def initial_carry(self, x_shape: Sequence[int]) -> Any:
        """The initial carry for a step input of shape ``x_shape`` (with its batch axes)."""
        return self.cell.initial_carry(self.pure_params, x_shape)

    def output_shape(self) -> Shape:
        """One step's output shape, without batch axes."""
        return tuple(self.cell.output_shape(self.input_shape))

    def __call__(self, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        return self.cell.step(self.pure_params, carry, x)


class RNN(_Recurrent):
    """A whole-sequence recurrent layer as an NNX module.

    ``module(xs, *, lengths=None, carry=None, time_major=False) -> (carry, ys)`` is
    ``layer.apply`` (see :func:`recurrent.rnn`) on the module's parameters: ``xs`` is
    ``(*batch, T, *features)`` (``(T, *batch, *features)`` when ``time_major``), ``lengths``
    optional integers of the batch shape; padded outputs are zero and the returned carry is
    the one after each sequence's last valid step.

    Args:
      cell_or_layer: a :class:`recurrent.Cell` (scanned with :func:`recurrent.rnn`) or any
        :class:`recurrent.Layer`, e.g. ``recurrent.rnn(cell, reverse=True)``.
      input_shape: one step's input without batch or time axes, e.g. ``(features,)``.
      rngs: ``nnx.Rngs``; the parameters are ``layer.init(rngs.params(), input_shape)``.
      params: instead of ``rngs``, existing functional parameters of the layer.

    Attributes:
      layer: the functional layer.
      cell: the functional cell when built from one (then :meth:`step` works), else ``None``.
      input_shape: as given.
      params: the layer's parameter pytree with ``nnx.Param`` leaves.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> rnn = rnnx.RNN(recurrent.gru(16), (8,), rngs=nnx.Rngs(0))
    >>> carry, ys = rnn(jnp.ones((4, 10, 8)), lengths=jnp.array([10, 5, 2, 0]))
    >>> ys.shape, carry.shape
    ((4, 10, 16), (4, 16))
    >>> layer = recurrent.rnn(recurrent.gru(16))                  # the same, functionally
    >>> bool((layer.apply(rnn.pure_params, jnp.ones((4, 10, 8)))[1] == rnn(jnp.ones((4, 10, 8)))[1]).all())
    True
    """

    def __init__(
        self,
        cell_or_layer: recurrent.Cell | recurrent.Layer,
        input_shape: Sequence[int],
        *,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        where = f"recurrent.nnx.{type(self).__name__}"
        if isinstance(cell_or_layer, recurrent.Cell):
            self.cell, self.layer = cell_or_layer, recurrent.rnn(cell_or_layer)
        elif isinstance(cell_or_layer, recurrent.Layer):
            self.cell, self.layer = None, cell_or_layer
        else:
            raise _core.error(
                f"{where}: expected a cell or a layer.",
                expected="a recurrent.Cell (e.g. recurrent.lstm(64)) or a recurrent.Layer (e.g. recurrent.rnn(cell))",
                got=type(cell_or_layer).__name__,
                fix="build it with the factories of `recurrent`.",
            )
        self.input_shape = _core.check_shape("input_shape", input_shape, where=where)
        self.params = _make_params(self.layer.init, self.input_shape, rngs, params, where=where)

    def initial_carry(self, x_shape: Sequence[int]) -> Any:
        """The initial carry for one step's input of shape ``x_shape`` (with its batch axes)."""
        return self.layer.initial_carry(self.pure_params, x_shape)

    def output_shape(self) -> Shape:
        """One step's output shape, without batch or time axes."""
        return tuple(self.layer.output_shape(self.input_shape))

    def step(self, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        """One time step, ``cell.step(params, carry, x)``, for modules built from a cell."""
        if self.cell is None:
            raise _core.error(
                f"recurrent.nnx.{type(self).__name__}.step: this module runs a layer, which has no single step.",
                expected="a module built from a cell (recurrent.lstm, recurrent.stacked of cells, ...)",
                got=self.layer.name,
                fix="call the module on the whole sequence; bidirectional layers cannot be stepped.",
            )
        return self.cell.step(self.pure_params, carry, x)

    def __call__(
        self,
        xs: jax.Array,
        *,
        lengths: jax.Array | None = None,
        carry: Any = None,
        time_major: bool = False,
        key: jax.Array | None = None,
        resets: jax.Array | None = None,
        return_trace: bool = False,
    ) -> tuple[Any, jax.Array]:
        """Runs the layer: ``layer.apply(params, xs, ...)`` with the module's parameters (see
        :func:`recurrent.rnn` for the arguments; a ``key`` turns regularisers on)."""
        return self.layer.apply(
            self.pure_params,
            xs,
            lengths=lengths,
            carry=carry,
            time_major=time_major,
            key=key,
            resets=resets,
            return_trace=return_trace,
        )


class Bidirectional(RNN):
    """:func:`recurrent.bidirectional` as an NNX module (an :class:`RNN`).

    Parameters are ``BidirectionalParams(forward, backward)``, so state paths read
    ``params/forward/...`` and ``params/backward/...``; the carry is a
    ``BidirectionalState(forward, backward)``.

    Args:
      forward: a cell or layer for the forward direction.
      backward: a cell or layer run backwards in time (given forward-running); defaults to
        ``forward`` with its own parameters.
      input_shape: one step's input without batch or time axes.
      merge: ``"concat"``, ``"sum"``, ``"mean"``, ``"mul"`` or a function ``(y_fwd, y_bwd) -> y``.
      rngs, params: as for :class:`RNN`.

    Example:

    >>> import jax.numpy as jnp, recurrent
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> birnn = rnnx.Bidirectional(recurrent.lstm(16), input_shape=(8,), rngs=nnx.Rngs(0))
    >>> carry, ys = birnn(jnp.ones((2, 5, 8)), lengths=jnp.array([5, 3]))
    >>> ys.shape, birnn.params.backward.input_kernel.shape
    ((2, 5, 32), (8, 64))
    """

    def __init__(
        self,
        forward: recurrent.Cell | recurrent.Layer,
        backward: recurrent.Cell | recurrent.Layer | None = None,
        *,
        input_shape: Sequence[int],
        merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat",
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        super().__init__(recurrent.bidirectional(forward, backward, merge=merge), input_shape, rngs=rngs, params=params)


class Stacked(RNN):
    """:func:`recurrent.stacked` as an NNX module (an :class:`RNN`).

    Parameters are a tuple with one entry per layer (state paths ``params/0/...``,
    ``params/1/...``). Stacking only cells keeps a cell, so :meth:`RNN.step` advances every
    layer one time step (generation).

    Args:
      items: cells or layers, first to last.
      input_shape: one step's input without batch or time axes.
      residual: add residual connections around every layer but the first.
      rngs, params: as for :class:`RNN`.

    Example:

    >>> import jax.numpy as jnp, recurrent
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> deep = rnnx.Stacked([recurrent.bidirectional(recurrent.lstm(16)), recurrent.lstm(8)], (4,), rngs=nnx.Rngs(0))
    >>> carry, ys = deep(jnp.ones((3, 7, 4)))
    >>> ys.shape, len(deep.params)
    ((3, 7, 8), 2)
    """

    def __init__(
        self,
        items: Sequence[recurrent.Cell | recurrent.Layer],
        input_shape: Sequence[int],
        *,
        residual: bool = False,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        super().__init__(recurrent.stacked(items, residual=residual), input_shape, rngs=rngs, params=params)


class _DenseRNN(RNN):
    """A sequence module for a dense cell built by ``_factory(hidden_size, **cell_kwargs)``."""

    _factory: ClassVar[Callable[..., recurrent.Cell]]

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        reverse: bool = False,
        implementation: str = "scan",
        rngs: nnx.Rngs | None = None,
        params: Any = None,
        **cell_kwargs: Any,
    ):
        in_features = _core.check_positive_int("in_features", in_features, where=f"recurrent.nnx.{type(self).__name__}")
        cell = type(self)._factory(hidden_size, **cell_kwargs)
        plain = not reverse and implementation == "scan"
        layer = cell if plain else recurrent.rnn(cell, reverse=reverse, implementation=implementation)
        super().__init__(layer, (in_features,), rngs=rngs, params=params)
        self.cell = cell


class LSTM(_DenseRNN):
    """A sequence of :func:`recurrent.lstm` steps as an NNX module (an :class:`RNN`).

    Parameters ``params`` are :class:`recurrent.LSTMParams` of ``nnx.Param``
    (``input_kernel (F, 4H)``, ``recurrent_kernel (H, 4H)``, ``bias (4H,)``); the carry is
    :class:`recurrent.LSTMState` ``(h, c)``; :meth:`RNN.step` runs one time step.

    Args:
      in_features: ``F``, features of one step's input.
      hidden_size: ``H``.
      reverse: run each sequence's valid prefix backwards in time (outputs stay aligned).
      implementation: as for :func:`recurrent.rnn` (``"vjp"``, or a cell's own whole-sequence
        form such as the mLSTM's ``"chunkwise"``).
      rngs: ``nnx.Rngs``; parameters from ``rngs.params()``.
      params: instead of ``rngs``, existing functional parameters of the cell.
      **cell_kwargs: passed to :func:`recurrent.lstm` (initialisers, ``forget_bias``,
        ``dtype``, ``param_dtype``).

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> lstm = rnnx.LSTM(8, 32, rngs=nnx.Rngs(0))
    >>> carry, ys = lstm(jnp.ones((4, 10, 8)), lengths=jnp.array([10, 7, 3, 0]))
    >>> ys.shape, carry.h.shape, lstm.params.recurrent_kernel.shape
    ((4, 10, 32), (4, 32), (32, 128))
    """

    _factory = staticmethod(recurrent.lstm)


class PeepholeLSTM(_DenseRNN):
    """A sequence of :func:`recurrent.peephole_lstm` steps as an NNX module (an :class:`RNN`).

    Args: as for :class:`LSTM`; ``**cell_kwargs`` go to :func:`recurrent.peephole_lstm`.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> lstm = rnnx.PeepholeLSTM(8, 16, rngs=nnx.Rngs(0))
    >>> lstm(jnp.ones((2, 5, 8)))[1].shape, lstm.params.peephole_forget.shape
    ((2, 5, 16), (16,))
    """

    _factory = staticmethod(recurrent.peephole_lstm)


class CIFGLSTM(_DenseRNN):
    """A sequence of :func:`recurrent.cifg_lstm` steps (coupled input and forget gates) as an
    NNX module (an :class:`RNN`).

    Args: as for :class:`LSTM`; ``**cell_kwargs`` (e.g. ``peephole=True``) go to
    :func:`recurrent.cifg_lstm`.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> lstm = rnnx.CIFGLSTM(8, 16, peephole=True, rngs=nnx.Rngs(0))
    >>> lstm(jnp.ones((2, 5, 8)))[1].shape, lstm.params.input_kernel.shape
    ((2, 5, 16), (8, 48))
    """

    _factory = staticmethod(recurrent.cifg_lstm)


class GRU(_DenseRNN):
    """A sequence of :func:`recurrent.gru` steps as an NNX module (an :class:`RNN`); the carry
    is the hidden state ``h``.

    Args: as for :class:`LSTM`; ``**cell_kwargs`` (e.g. ``reset_after=False``) go to
    :func:`recurrent.gru`.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> gru = rnnx.GRU(8, 16, reset_after=False, rngs=nnx.Rngs(0))
    >>> carry, ys = gru(jnp.ones((2, 5, 8)))
    >>> ys.shape, carry.shape
    ((2, 5, 16), (2, 16))
    """

    _factory = staticmethod(recurrent.gru)


class SLSTM(_DenseRNN):
    """A sequence of :func:`recurrent.slstm` steps (xLSTM's scalar-memory LSTM) as an NNX module
    (an :class:`RNN`); the carry is :class:`recurrent.SLSTMState` ``(h, c, n, m)``.

    Args: as for :class:`LSTM`; ``**cell_kwargs`` (``num_heads``, ``forget_gate``, ...) go to
    :func:`recurrent.slstm`.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> slstm = rnnx.SLSTM(8, 16, num_heads=4, rngs=nnx.Rngs(0))
    >>> carry, ys = slstm(jnp.ones((2, 5, 8)))
    >>> ys.shape, carry.m.shape
    ((2, 5, 16), (2, 16))
    """

    _factory = staticmethod(recurrent.slstm)


class MLSTM(_DenseRNN):
    """A sequence of :func:`recurrent.mlstm` steps (xLSTM's matrix-memory LSTM) as an NNX module
    (an :class:`RNN`); ``implementation="parallel"`` or ``"chunkwise"`` evaluates the whole
    sequence at once.

    Args: as for :class:`LSTM`, and ``implementation`` as for :func:`recurrent.rnn`;
    ``**cell_kwargs`` (``num_heads``, ``chunk_size``, ...) go to :func:`recurrent.mlstm`.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> mlstm = rnnx.MLSTM(8, 16, num_heads=2, implementation="chunkwise", chunk_size=4, rngs=nnx.Rngs(0))
    >>> carry, ys = mlstm(jnp.ones((2, 10, 8)))
    >>> ys.shape, carry.C.shape
    ((2, 10, 16), (2, 2, 8, 8))
    """

    _factory = staticmethod(recurrent.mlstm)


class MinGRU(_DenseRNN):
    """A sequence of :func:`recurrent.min_gru` steps as an NNX module (an :class:`RNN`);
    ``implementation="parallel"`` evaluates the whole sequence with an associative scan.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> gru = rnnx.MinGRU(8, 16, implementation="parallel", rngs=nnx.Rngs(0))
    >>> carry, ys = gru(jnp.ones((2, 5, 8)))
    >>> ys.shape, carry.shape
    ((2, 5, 16), (2, 16))
    """

    _factory = staticmethod(recurrent.min_gru)


class MinLSTM(_DenseRNN):
    """A sequence of :func:`recurrent.min_lstm` steps as an NNX module (an :class:`RNN`);
    ``implementation="parallel"`` evaluates the whole sequence with an associative scan.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> lstm = rnnx.MinLSTM(8, 16, rngs=nnx.Rngs(0))
    >>> lstm(jnp.ones((2, 5, 8)))[1].shape
    (2, 5, 16)
    """

    _factory = staticmethod(recurrent.min_lstm)


class ConvLSTM(RNN):
    """A sequence of :func:`recurrent.conv_lstm` steps (1, 2 or 3 spatial axes, channels last)
    as an NNX module (an :class:`RNN`).

    Args:
      input_shape: one step's input ``(*S, C)``, spatial axes then channels.
      hidden_channels: ``H``, channels of the hidden and cell states.
      kernel_size: the convolution window, one int per spatial axis.
      reverse: run each sequence's valid prefix backwards in time.
      rngs: ``nnx.Rngs``; parameters from ``rngs.params()``.
      params: instead of ``rngs``, existing functional parameters of the cell.
      **cell_kwargs: passed to :func:`recurrent.conv_lstm` (``peephole``, initialisers,
        ``forget_bias``, ``dtype``, ``param_dtype``).

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from recurrent import nnx as rnnx
    >>> conv = rnnx.ConvLSTM((16, 16, 1), 8, (3, 3), rngs=nnx.Rngs(0))
    >>> carry, ys = conv(jnp.ones((2, 5, 16, 16, 1)))                 # (batch, time, H, W, C)
    >>> ys.shape, carry.c.shape
    ((2, 5, 16, 16, 8), (2, 16, 16, 8))
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: int,
        kernel_size: Sequence[int],
        *,
        reverse: bool = False,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
        **cell_kwargs: Any,
    ):
        cell = recurrent.conv_lstm(hidden_channels, kernel_size, **cell_kwargs)
        super().__init__(recurrent.rnn(cell, reverse=True) if reverse else cell, input_shape, rngs=rngs, params=params)
        self.cell = cell
