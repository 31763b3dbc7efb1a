"""Higher-order combinators: ``bidirectional`` and ``stacked`` return the kind of thing they take."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core, _kernels, _scan
from recurrent._core import Cell, Layer, ScanLoop, Shape
from recurrent._regularisers import check_rate
from recurrent._regularisers import is_off as _is_off
from recurrent._regularisers import keep_mask as _keep_mask
from recurrent._rnn import rnn
from recurrent._sequence import read_sequence, reverse_sequences


class BidirectionalParams(NamedTuple):
    """Parameters of a bidirectional layer: one pytree per direction."""

    forward: Any
    backward: Any


class BidirectionalState(NamedTuple):
    """Carry of a bidirectional layer: the final carry of each direction. The backward
    carry is the one after processing each sequence's first step (its last in its order)."""

    forward: Any
    backward: Any


def as_layer(item: Cell | Layer, *, where: str) -> Layer:
    """A layer from a cell (scanned with :func:`rnn`) or a layer."""
    if isinstance(item, Layer):
        return item
    if isinstance(item, Cell):
        return rnn(item)
    raise _core.error(
        f"{where}: expected a cell or a layer.",
        expected="a recurrent.Cell (e.g. recurrent.lstm(64)) or recurrent.Layer (e.g. recurrent.rnn(cell))",
        got=type(item).__name__,
        fix="build items with the factories of `recurrent`.",
    )


def flipped(layer: Layer) -> Layer:
    """Any layer run backwards in time: the valid prefix of each sequence is reversed before
    the layer and its outputs are reversed back (a generic fallback for layers without a
    native reverse)."""
    rank = layer.input_rank
    where = f"reversed({layer.name})"

    def apply(params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        seq = read_sequence(xs, rank, lengths=lengths, resets=resets, time_major=time_major, where=where)
        lengths, resets, T, axis = seq.lengths, seq.resets, seq.T, seq.time_axis
        flip = lambda a: reverse_sequences(a, lengths, axis)  # noqa: E731
        if resets is not None:  # in reversed order a segment starts where the next one started
            shifted = jnp.concatenate(
                [lax.slice_in_dim(resets, 1, T, axis=axis), jnp.zeros_like(lax.slice_in_dim(resets, 0, 1, axis=axis))],
                axis=axis,
            )
            resets = flip(shifted)
        out = layer.apply(
            params,
            flip(xs),
            lengths=lengths,
            carry=carry,
            time_major=time_major,
            key=key,
            resets=resets,
            return_trace=return_trace,
        )
        if return_trace:
            carry, ys, trace = out
            return carry, flip(ys), jax.tree.map(flip, trace)
        carry, ys = out
        return carry, flip(ys)

    # Its options say it is flipped: equal options mean the same function (stacked's scan over
    # equal layers relies on it), and a flipped layer is not its original.
    options = None if layer.options is None else _core.Options({"flipped": layer.options})
    return layer._replace(
        apply=apply, name=f"reversed({layer.name})", reversed=lambda: layer, options=options, loop=None
    )


_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
    "mul": lambda a, b: a * b,
}


def bidirectional(
    forward: Cell | Layer,
    backward: Cell | Layer | None = None,
    *,
    merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat",
    one_scan: bool | str = True,
) -> Layer:
    r"""A bidirectional layer (Schuster & Paliwal 1997): one direction forward in time, one backward.

    .. math::

        \overrightarrow{y}_t = \mathrm{fwd}(x_{1..t}), \quad
        \overleftarrow{y}_t = \mathrm{bwd}(x_{t..L}), \quad
        y_t = \mathrm{merge}(\overrightarrow{y}_t, \overleftarrow{y}_t)

    The backward direction runs over each sequence's valid prefix only (``lengths``), so
    padding never leaks into it; outputs stay aligned with input positions and padded
    outputs are zero, whatever the merge. ``lengths`` are as for :func:`rnn`: traced lengths
    (under ``jit``) out of ``[0, T]`` are clamped to it, concrete ones raise.

    Args:
      forward: a cell or layer for the forward direction.
      backward: a cell or layer run backwards in time; give it as a forward-running cell or
        layer (it is reversed here). Defaults to ``forward``, with its own parameters.
      merge: ``"concat"`` (last axis), ``"sum"``, ``"mean"``, ``"mul"`` or a function
        ``merge(y_forward, y_backward) -> y``.
      one_scan: run both directions in one ``lax.scan``, halving the loop's fixed costs.
        When both directions are the same :func:`rnn` layer (the default ``backward``), the
        scan is a ``vmap`` over a direction axis, so each step's two recurrent matmuls are
        one batched matmul (the backward direction runs over each sequence's reversed valid
        prefix); with ``resets`` or ``return_trace``, or different directions made by
        :func:`rnn`, one scan runs both step bodies (at step ``k`` the forward direction takes
        time ``k`` and the backward one time ``T-1-k``); other layers fall back to two scans.
        The values are the same either way (in training the dropout masks come from another
        random stream). One scan is the default because it was faster on every backend
        measured (``benchmarks/README.md``): on an H200 one batched scan takes 0.52x the
        forward+backward time of two; on a quiet 2-core CPU the forward is 1.3-1.6x faster
        and training 1.07-1.12x (1.16x with ``rnn(..., implementation="vjp")``, whose
        hand-written backward pass is then batched over the two directions too). ``False``
        runs two scans, one after the other (on a CPU crowded by other processes they were
        faster). ``"auto"`` is accepted as another name of ``True``.

    Returns:
      A :class:`Layer` with parameters :class:`BidirectionalParams` ``(forward, backward)``
      and carry :class:`BidirectionalState` ``(forward, backward)``.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> layer = recurrent.bidirectional(recurrent.lstm(16))
    >>> params = layer.init(jax.random.key(0), (8,))
    >>> carry, ys = layer.apply(params, jnp.ones((2, 5, 8)), lengths=jnp.array([5, 2]))
    >>> ys.shape, carry.backward.h.shape
    ((2, 5, 32), (2, 16))
    """
    where = "recurrent.bidirectional"
    fwd = as_layer(forward, where=where)
    bwd = as_layer(backward if backward is not None else forward, where=where).reversed()
    if fwd.input_rank != bwd.input_rank:
        raise _core.error(
            f"{where}: both directions must take inputs of the same rank.",
            expected=f"input_rank {fwd.input_rank}",
            got=f"input_rank {bwd.input_rank} for the backward direction",
            fix="use the same kind of cell in both directions.",
        )
    merge_fn = _merge_function(merge, where)
    plan = _plan(fwd, bwd, one_scan, where)
    output_shape = functools.partial(_merged_shape, fwd, bwd, merge_fn, where)

    def init(key, input_shape):
        input_shape = _core.check_input_shape(input_shape, where=f"{where}.init")
        k_f, k_b = jax.random.split(key)
        output_shape(input_shape)  # fail early on unmergeable directions
        return BidirectionalParams(fwd.init(k_f, input_shape), bwd.init(k_b, input_shape))

    def check_inputs(params, xs):
        for layer, p in ((fwd, params.forward), (bwd, params.backward)):
            if layer.check_inputs is not None:
                layer.check_inputs(p, xs)

    def initial_carry(params, x_shape):
        return BidirectionalState(
            fwd.initial_carry(params.forward, x_shape), bwd.initial_carry(params.backward, x_shape)
        )

    def apply(params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        seq = read_sequence(xs, fwd.input_rank, lengths=lengths, resets=resets, time_major=time_major, where=where)
        _core.check_params(params, init, seq.features, where=where, inputs=lambda: check_inputs(params, xs))
        c_f, c_b = _carry_pair(carry, where)
        k_f, k_b = (None, None) if key is None else jax.random.split(key)
        out_f, out_b = _run_directions(plan, fwd, bwd, params, xs, (c_f, c_b), (k_f, k_b), seq, time_major,
                                       return_trace)  # fmt: skip
        (c_f, y_f), (c_b, y_b) = out_f[:2], out_b[:2]
        ys = merge_fn(y_f, y_b)
        if seq.lengths is not None and merge_fn not in (_MERGES["concat"], _MERGES["sum"], _MERGES["mul"]):
            ys = _zero_padding(ys, seq, time_major)  # a merge of two zeros need not be zero
        if return_trace:
            return BidirectionalState(c_f, c_b), ys, BidirectionalState(out_f[2], out_b[2])
        return BidirectionalState(c_f, c_b), ys

    # What it is built from, when both directions record theirs: equal options mean the same
    # function (so stacks of equal bidirectional layers share one traced function, or a scan).
    options = None
    if fwd.options is not None and bwd.options is not None:
        recorded = {"bidirectional": True, "forward": fwd.options, "backward": bwd.options, "merge": merge}
        options = _core.Options({**recorded, "one_scan": one_scan})
    layer = Layer(
        init=init,
        apply=apply,
        initial_carry=initial_carry,
        output_shape=output_shape,
        input_rank=fwd.input_rank,
        name=f"bidirectional({fwd.name})",
        reversed=lambda: None,
        options=options,
        check_inputs=check_inputs,
    )
    return layer._replace(reversed=lambda: flipped(layer))


def _merge_function(merge: Any, where: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The merge of :func:`bidirectional`: a name of :data:`_MERGES` or a function."""
    if isinstance(merge, str):
        if merge not in _MERGES:
            raise _core.error(
                f"{where}: unknown merge {merge!r}.",
                expected=f"one of {sorted(_MERGES)} or a function (y_fwd, y_bwd) -> y",
                got=repr(merge),
                fix='pass e.g. merge="concat".',
            )
        return _MERGES[merge]
    if callable(merge):
        return merge
    raise _core.error(
        f"{where}: `merge` must be a name or a function.",
        expected=f"one of {sorted(_MERGES)} or a callable",
        got=repr(merge),
        fix='pass e.g. merge="sum".',
    )


class _Plan(NamedTuple):
    """How :func:`bidirectional` runs its two directions."""

    one: bool  # one scan asked for
    batchable: bool  # both directions the same rnn layer: one vmapped scan
    fused: tuple[ScanLoop, ScanLoop] | None  # both rnn layers without a kernel: both bodies in one scan


def _plan(fwd: Layer, bwd: Layer, one_scan: Any, where: str) -> _Plan:
    if one_scan not in (True, False, "auto"):
        raise _core.error(
            f"{where}: unknown `one_scan`.",
            expected='True (one scan, the default), False (two scans), or "auto" (the same as True)',
            got=repr(one_scan),
            fix="pass one_scan=True or one_scan=False.",
        )
    one = one_scan is not False
    loops = fwd.loop, bwd.loop
    directions = one and None not in loops and not loops[0].reverse and loops[1].reverse
    # Both directions the same rnn layer (but for the direction): one vmapped scan, so each
    # step's two recurrent matmuls are one batched matmul (through each layer's own apply, so
    # a kernel it runs with is batched too).
    batchable = bool(
        directions and loops[0].signature is not None and _core.same_options(loops[0].signature, loops[1].signature)
    )
    # Otherwise both step bodies in one scan; not for layers that run a kernel (which the
    # fused scan would bypass): those run as two layers, each taking its kernel or saying why not.
    fused = loops if directions and all(loop.implementation == "scan" for loop in loops) else None
    return _Plan(one, batchable, fused)


def _merged_shape(fwd: Layer, bwd: Layer, merge_fn: Callable, where: str, input_shape: Shape) -> Shape:
    a, b = fwd.output_shape(input_shape), bwd.output_shape(input_shape)
    if merge_fn is _MERGES["concat"]:
        if a[:-1] != b[:-1]:
            raise _core.error(
                f"{where}: cannot concatenate outputs of different shapes.",
                expected="equal shapes except the last axis",
                got=f"{a} and {b}",
                fix="use directions with matching spatial shapes.",
            )
        return (*a[:-1], a[-1] + b[-1])
    out = jax.eval_shape(merge_fn, jax.ShapeDtypeStruct(a, jnp.float32), jax.ShapeDtypeStruct(b, jnp.float32))
    return tuple(out.shape)


def _carry_pair(carry: Any, where: str) -> tuple[Any, Any]:
    if carry is None:
        return None, None
    if not (isinstance(carry, tuple) and len(carry) == 2):
        raise _core.error(
            f"{where}: carry must be a (forward, backward) pair.",
            expected="BidirectionalState(forward, backward), as returned by this layer",
            got=type(carry).__name__,
            fix="pass the carry this layer returned, or None.",
        )
    return carry


def _run_directions(plan: _Plan, fwd, bwd, params, xs, carries, keys, seq, time_major, return_trace):
    """Both directions' outputs ``(carry, ys[, trace])``: one vmapped scan, one fused scan or two."""
    (c_f, c_b), (k_f, k_b) = carries, keys
    kw = dict(lengths=seq.lengths, time_major=time_major, resets=seq.resets, return_trace=return_trace)
    same_shapes = plan.one and plan.batchable and _signature(params.forward) == _signature(params.backward)
    if same_shapes and seq.resets is None and not return_trace:
        return _batched_directions(fwd, params, xs, c_f, c_b, k_f, k_b, seq.lengths, time_major, seq.batch)
    if plan.one and plan.fused is not None:
        return _one_scan(plan.fused, params, xs, c_f, c_b, k_f, k_b, kw)
    return fwd.apply(params.forward, xs, carry=c_f, key=k_f, **kw), bwd.apply(
        params.backward, xs, carry=c_b, key=k_b, **kw
    )


def _zero_padding(ys: jax.Array, seq, time_major: bool) -> jax.Array:
    t = jnp.arange(seq.T)
    valid = t[(...,) + (None,) * len(seq.batch)] < seq.lengths if time_major else t < seq.lengths[..., None]
    return jnp.where(valid.reshape(valid.shape + (1,) * (ys.ndim - valid.ndim)), ys, 0)


def _signature(tree):
    """The tree structure, shapes and dtypes of a pytree: equal signatures can be stacked."""
    return jax.tree.structure(tree), tuple((a.shape, a.dtype) for a in jax.tree.leaves(tree))


def _batched_directions(fwd, params, xs, c_f, c_b, k_f, k_b, lengths, time_major, batch):
    """Both directions as one ``vmap`` of the forward layer over a direction axis: the
    backward direction runs forward over each sequence's reversed valid prefix (what a
    reversed layer computes), so the scan's two recurrent matmuls become one batched matmul.
    In training the regularisers' masks are drawn per direction as in two scans, but from a
    different stream."""
    time_axis = 0 if time_major else len(batch)
    x_shape = (*batch, *xs.shape[len(batch) + 1 :]) if not time_major else xs.shape[1:]
    c_f = fwd.initial_carry(params.forward, x_shape) if c_f is None else c_f
    c_b = fwd.initial_carry(params.backward, x_shape) if c_b is None else c_b
    stack = lambda a, b: jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)  # noqa: E731
    keys = None if k_f is None else jnp.stack([k_f, k_b])

    def run(p, x, c, k):
        return fwd.apply(p, x, lengths=lengths, carry=c, time_major=time_major, key=k)

    xs_both = jnp.stack([xs, reverse_sequences(xs, lengths, time_axis)])
    carry, ys = jax.vmap(run)(stack(params.forward, params.backward), xs_both, stack(c_f, c_b), keys)
    pick = lambda i: jax.tree.map(lambda a: a[i], carry)  # noqa: E731
    return (pick(0), ys[0]), (pick(1), reverse_sequences(ys[1], lengths, time_axis))


def _one_scan(loops, params, xs, c_f, c_b, k_f, k_b, kw):
    """Both directions of a bidirectional layer in one ``lax.scan``: the backward direction's
    scan inputs are visited in reverse time order, which is exactly what its own reversed
    scan does, so every option (lengths, resets, regularisers, traces) keeps its meaning."""
    loop_f = loops[0].prepare(params.forward, xs, carry=c_f, key=k_f, **kw)
    loop_b = loops[1].prepare(params.backward, xs, carry=c_b, key=k_b, **kw)
    flip = lambda tree: jax.tree.map(lambda a: jnp.flip(a, 0), tree)  # noqa: E731

    def body(carry, inputs):
        (carry_f, carry_b), (x_f, x_b) = carry, inputs
        carry_f, out_f = loop_f.body(carry_f, x_f)
        carry_b, out_b = loop_b.body(carry_b, x_b)
        return (carry_f, carry_b), (out_f, out_b)

    unroll = max(int(loops[0].unroll), int(loops[1].unroll))
    (carry_f, carry_b), (out_f, out_b) = _scan.run_scan(
        body, (loop_f.carry, loop_b.carry), (loop_f.inputs, flip(loop_b.inputs)), unroll=unroll
    )
    return loop_f.finish(carry_f, out_f), loop_b.finish(carry_b, flip(out_b))


def _thread_shapes(items, input_shape, residual, where):
    """Per-item input shapes, checking ranks and residual widths without a forward pass."""
    shapes = [tuple(input_shape)]
    for i, item in enumerate(items):
        shape = shapes[-1]
        if len(shape) != item.input_rank:
            raise _core.error(
                f"{where}: item {i} ({item.name}) cannot take the output of the item before it.",
                expected=f"an input of rank {item.input_rank}",
                got=f"shape {shape}",
                fix="stack cells of matching kinds (dense with dense, conv with conv of the same rank).",
            )
        out = tuple(item.output_shape(shape))
        if residual and i > 0 and out != shape:
            raise _core.error(
                f"{where}: residual connections need layers of equal width.",
                expected=f"item {i} ({item.name}) to output shape {shape}",
                got=f"output shape {out}",
                fix="give every layer after the first the same size, or pass residual=False.",
            )
        shapes.append(out)
    return shapes


def stacked(
    items: Sequence[Cell | Layer],
    *,
    residual: bool = False,
    dropout: float | jax.Array = 0.0,
    scan_layers: bool = False,
) -> Cell | Layer:
    r"""Stacks cells into a cell, or layers (and cells) into a layer.

    Layer :math:`k` takes the outputs of layer :math:`k-1`; with ``residual=True`` every layer
    after the first adds its input to its output, :math:`y^k_t = f^k(y^{k-1})_t + y^{k-1}_t`
    (He et al. 2016; Wu et al. 2016), which needs layers of equal width.

    Stacking only cells gives a :class:`Cell` whose one ``step`` advances every layer, so a
    deep model can be run one token at a time (generation); :func:`rnn` scans it in one
    loop. Stacking any layer (e.g. a bidirectional one) gives a :class:`Layer` that runs
    each layer over the whole sequence in turn, every layer with the same ``lengths`` (as for
    :func:`rnn`: traced lengths out of ``[0, T]`` are clamped to it, concrete ones raise).
    Parameters and carries are tuples with one entry per layer.

    A run of equal layers (equal options and parameter shapes, such as every layer after the
    first) runs one layer after the other through one jitted function, which JAX traces,
    differentiates and lowers once for the whole run. With ``scan_layers=True`` the run is
    instead one ``lax.scan`` over the stacked parameters, so the program XLA compiles stops
    growing with depth too. It is off by default because it costs run time: on a 2-core CPU,
    4 and 8 LSTM(256) layers trained 6-14 % slower scanned, and compiled no faster below
    about 16 layers (forward+backward of 1 / 8 / 16 / 32 layers: 0.38 / 0.65 / 0.88 / 1.73 s
    one after the other, 0.41 / 0.96 / 0.95 / 1.25 s scanned). Use it for very deep stacks.

    Args:
      items: cells or layers, first to last.
      residual: add residual connections around every layer but the first.
      dropout: dropout between layers (on every layer's output but the last's; Zaremba et
        al. 2014), a new mask at every step, active only when a PRNG key is given to
        ``apply`` (or, for a stacked cell, to the ``rnn`` that scans it). May be traced.
      scan_layers: run each run of equal layers as one scan over stacked parameters
        (stacks of layers only; the results are the same).

    Returns:
      A :class:`Cell` if every item is a cell, else a :class:`Layer`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> deep = recurrent.stacked([recurrent.lstm(32), recurrent.gru(32)], residual=True)
    >>> params = deep.init(jax.random.key(0), (8,))
    >>> x = jnp.ones((3, 8))
    >>> carry, y = deep.step(params, deep.initial_carry(params, x.shape), x)   # one step
    >>> y.shape, len(carry)
    ((3, 32), 2)
    >>> layer = recurrent.stacked([recurrent.bidirectional(recurrent.lstm(16)), recurrent.lstm(8)])
    >>> carry, ys = layer.apply(layer.init(jax.random.key(1), (8,)), jnp.ones((3, 5, 8)))
    >>> ys.shape
    (3, 5, 8)
    """
    where = "recurrent.stacked"
    if isinstance(items, (Cell, Layer)):  # a NamedTuple, which would pass for a list below
        raise _core.error(
            f"{where}: expected a list of cells or layers, got a single {type(items).__name__}.",
            expected="e.g. [recurrent.lstm(64), recurrent.lstm(64)]",
            got=f"{type(items).__name__} {items.name!r}",
            fix=f"pass a list: recurrent.stacked([{items.name}, ...]), one entry per layer.",
        )
    items = tuple(items) if isinstance(items, (list, tuple)) else items
    if not isinstance(items, tuple) or not items:
        raise _core.error(
            f"{where}: expected a non-empty list of cells or layers.",
            expected="e.g. [recurrent.lstm(64), recurrent.lstm(64)]",
            got=repr(items),
            fix="pass a list.",
        )
    for item in items:
        as_layer(item, where=where)  # type check with a clear error
    dropout = check_rate("dropout", dropout, where=where)
    n = len(items)
    if not isinstance(scan_layers, bool):
        raise _core.error(
            f"{where}: `scan_layers` must be True or False.",
            expected="a bool",
            got=repr(scan_layers),
            fix="pass scan_layers=True to scan runs of equal layers over stacked parameters (very deep stacks).",
        )

    check_tuple = functools.partial(_check_tuple, n=n, where=where)
    if all(isinstance(item, Cell) for item in items):
        return _stacked_cells(items, residual, dropout, check_tuple, where)
    layers = tuple(as_layer(item, where=where) for item in items)
    return _stacked_layers(layers, residual, dropout, scan_layers, check_tuple, where)


def _check_tuple(what, value, *, n, where):
    if not isinstance(value, tuple) or len(value) != n:
        raise _core.error(
            f"{where}: {what} must be a tuple with one entry per layer.",
            expected=f"a tuple of {n}",
            got=f"{type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}",
            fix=f"use the {what} made by this stack's init / initial_carry, or returned by it.",
        )


def _stacked_cells(cells, residual, dropout, check_tuple, where) -> Cell:
    """``stacked`` of cells: a cell whose one step advances every layer."""
    n, dropping = len(cells), not _is_off(dropout)
    rank = cells[0].input_rank

    def init(key, input_shape):
        input_shape = _core.check_shape("input_shape", input_shape, where=f"{where}.init")
        shapes = _thread_shapes(cells, input_shape, residual, where)
        keys = jax.random.split(key, n)
        return tuple(c.init(k, s) for c, k, s in zip(cells, keys, shapes))

    def initial_carry(params, x_shape):
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
        batch, features = x_shape[: len(x_shape) - rank], x_shape[len(x_shape) - rank :]
        shapes = _thread_shapes(cells, features, residual, where)
        return tuple(c.initial_carry(p, (*batch, *s)) for c, p, s in zip(cells, params, shapes))

    def project(params, x):
        return cells[0].project(params[0], x)

    def probe(params, carry, xp, noise=None):
        check_tuple("params", params)
        check_tuple("carry", carry)
        new, gates, y = [], [], None
        for i, (cell, p, c) in enumerate(zip(cells, params, carry)):
            layer_noise = _core.split_noise(noise, i)
            if i > 0:
                if dropping and layer_noise is not None and layer_noise.key is not None:
                    y = y * _keep_mask(layer_noise.key, dropout, y.shape, y.dtype)
                xp = cell.project(p, y)
            c, out, g = cell.probe(p, c, xp, layer_noise)
            y = out + y if residual and i > 0 else out
            new.append(c)
            gates.append(g)
        return tuple(new), y, tuple(gates)

    def output_shape(input_shape):
        return _thread_shapes(cells, input_shape, residual, where)[-1]

    return _core.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=output_shape,
        input_rank=rank,
        name="stacked(" + ", ".join(c.name for c in cells) + ")",
        options=(
            None
            if any(c.options is None for c in cells)
            else {"stacked": tuple(c.options for c in cells), "residual": residual, "dropout": dropout}
        ),
        spec=_stacked_spec(cells),
    )


def _stacked_layers(layers, residual, dropout, scan_layers, check_tuple, where) -> Layer:
    """``stacked`` of layers: each layer over the whole sequence in turn."""
    n, dropping = len(layers), not _is_off(dropout)
    rank = layers[0].input_rank

    def init(key, input_shape):
        input_shape = _core.check_input_shape(input_shape, where=f"{where}.init")
        shapes = _thread_shapes(layers, input_shape, residual, where)
        keys = jax.random.split(key, n)
        return tuple(layer.init(k, s) for layer, k, s in zip(layers, keys, shapes))

    def check_inputs(params, xs):
        if layers[0].check_inputs is not None:
            layers[0].check_inputs(params[0], xs)

    def initial_carry(params, x_shape):
        x_shape = _core.check_shape("x_shape", x_shape, where=f"{where}.initial_carry")
        batch, features = x_shape[: len(x_shape) - rank], x_shape[len(x_shape) - rank :]
        shapes = _thread_shapes(layers, features, residual, where)
        return tuple(layer.initial_carry(p, (*batch, *s)) for layer, p, s in zip(layers, params, shapes))

    def one(i, p, c, k, k_drop, ys, lengths, resets, later, time_major, return_trace):
        """Layer ``i`` with its parameters, carry and keys given, so a run of equal layers can
        feed them to one function; in a scan over layers ``later`` is a traced "not the first
        layer", else a bool."""
        if dropping and k_drop is not None and later is not False:
            mask = _keep_mask(k_drop, dropout, ys.shape, ys.dtype)
            ys = ys * (mask if later is True else jnp.where(later, mask, jnp.ones_like(mask)))
        out = layers[i].apply(
            p, ys, lengths=lengths, carry=c, time_major=time_major, key=k, resets=resets, return_trace=return_trace
        )
        if residual and later is not False:
            ys = out[1] + (ys if later is True else jnp.where(later, ys, jnp.zeros_like(ys)))
        else:
            ys = out[1]
        return ys, (out[0], out[2] if return_trace else None)

    shared = {}

    def shared_one(i, later, time_major, return_trace):
        """``one`` for layer ``i`` as a jitted function, made once per stack and shared by the
        run of equal layers that ``i`` starts: JAX traces, differentiates and lowers it once
        for all of them (and XLA compiles less), so a deep stack's compile time grows less
        with depth. Nested in the caller's ``jit`` it is inlined; the results are the same."""
        fn = shared.get((i, later, time_major, return_trace))
        if fn is None:

            def run(p, c, k, k_drop, ys, lengths, resets):
                return one(i, p, c, k, k_drop, ys, lengths, resets, later, time_major, return_trace)

            fn = shared[i, later, time_major, return_trace] = jax.jit(run)
        return fn

    def apply(params, ys, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        seq = read_sequence(ys, rank, lengths=lengths, resets=resets, time_major=time_major, where=where)
        check_tuple("params", params)
        _core.check_params(params, init, seq.features, where=where, inputs=lambda: check_inputs(params, ys))
        lengths, resets = seq.lengths, seq.resets
        if carry is not None:
            check_tuple("carry", carry)
        keys = None if key is None else jax.random.split(key, 2 * n)

        carries, traces = [], []
        for start, stop in _equal_runs(layers, params, carry):
            if not scan_layers or stop - start == 1:  # one after the other, equal layers sharing one function
                for j in range(start, stop):
                    ys, (c, trace) = shared_one(start, j > 0, time_major, return_trace)(
                        params[j],
                        None if carry is None else carry[j],
                        None if keys is None else keys[j],
                        None if keys is None else keys[n + j],
                        ys,
                        lengths,
                        resets,
                    )
                    carries.append(c)
                    traces.append(trace)
                continue
            # A run of equal layers: one scan over their stacked parameters, so the program
            # (and its compile time) does not grow with depth.
            stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
            xs = (
                stack(params[start:stop]),
                None if carry is None else stack(carry[start:stop]),
                None if keys is None else keys[start:stop],
                None if keys is None else keys[n + start : n + stop],
                jnp.arange(start, stop) > 0,
            )
            ys, (cs, ts) = _scan.run_scan(
                lambda ys, x: one(
                    start, *x[:4], ys, lengths, resets, x[4] if start == 0 else True, time_major, return_trace
                ),
                ys,
                xs,
            )
            for j in range(stop - start):
                carries.append(jax.tree.map(lambda a: a[j], cs))
                traces.append(None if ts is None else jax.tree.map(lambda a: a[j], ts))
        if return_trace:
            return tuple(carries), ys, tuple(traces)
        return tuple(carries), ys

    def output_shape(input_shape):
        return _thread_shapes(layers, input_shape, residual, where)[-1]

    return Layer(
        init=init,
        apply=apply,
        initial_carry=initial_carry,
        output_shape=output_shape,
        input_rank=rank,
        name="stacked(" + ", ".join(layer.name for layer in layers) + ")",
        reversed=lambda: stacked(
            [layer.reversed() for layer in layers], residual=residual, dropout=dropout, scan_layers=scan_layers
        ),
        check_inputs=check_inputs,
    )


def _equal_runs(layers, params, carry):
    """``(start, stop)`` index ranges covering ``layers``: runs of consecutive layers known
    to compute the same function on parameters (and carries) of the same shapes."""

    def same(i, j):
        a, b = layers[i], layers[j]
        if not (a is b or (a.options is not None and _core.same_options(a.options, b.options))):
            return False
        if _signature(params[i]) != _signature(params[j]):
            return False
        return carry is None or _signature(carry[i]) == _signature(carry[j])

    runs, start = [], 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or not same(start, i):
            runs.append((start, i))
            start = i
    return runs


class LearnedCarryParams(NamedTuple):
    """Parameters of a cell with a learned initial carry: the cell's own and ``carry``, one
    unbatched carry broadcast over the batch."""

    cell: Any
    carry: Any


def learned_initial_carry(cell: Cell, *, init: Any = jax.nn.initializers.zeros) -> Cell:
    r"""The same cell with a learned initial carry (a trainable :math:`h_0`, :math:`c_0`).

    ``init`` adds an unbatched carry to the parameters (:class:`LearnedCarryParams`), and
    ``initial_carry`` broadcasts it over the batch axes, so every driver, combinator, reset
    (``resets=``) and zero-length sequence starts from it; gradients reach it through the
    scan. Works with any cell, stacked cells included.

    Args:
      cell: the cell.
      init: initialiser of every leaf of the learned carry (zeros by default).

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> cell = recurrent.learned_initial_carry(recurrent.lstm(4))
    >>> params = cell.init(jax.random.key(0), (3,))
    >>> params.carry.h.shape, cell.initial_carry(params, (5, 3)).c.shape
    ((4,), (5, 4))
    """
    if not isinstance(cell, Cell):
        raise _core.error(
            "recurrent.learned_initial_carry: expected a cell.",
            expected="a recurrent.Cell (stacked cells included)",
            got=type(cell).__name__,
            fix="wrap the cell before scanning it: rnn(learned_initial_carry(cell)).",
        )
    rank = cell.input_rank

    def _init(key, input_shape):
        k_cell, k_carry = jax.random.split(key)
        params = cell.init(k_cell, input_shape)
        template = cell.initial_carry(params, tuple(input_shape))
        leaves, treedef = jax.tree.flatten(template)
        keys = jax.random.split(k_carry, max(len(leaves), 1))
        dtype = jax.tree.leaves(params)[0].dtype  # stored like the other parameters (param_dtype)
        carry = jax.tree.unflatten(treedef, [init(k, leaf.shape, dtype) for k, leaf in zip(keys, leaves)])
        return LearnedCarryParams(params, carry)

    def initial_carry(params, x_shape):
        template = cell.initial_carry(params.cell, x_shape)
        return jax.tree.map(lambda v, t: jnp.broadcast_to(v.astype(t.dtype), t.shape), params.carry, template)

    return _core.make_cell(
        init=_init,
        initial_carry=initial_carry,
        project=lambda params, x: cell.project(params.cell, x),
        probe=lambda params, carry, xp, noise=None: cell.probe(params.cell, carry, xp, noise),
        output_shape=cell.output_shape,
        input_rank=rank,
        name=f"learned_initial_carry({cell.name})",
        options=None if cell.options is None else {"learned_initial_carry": cell.options, "init": init},
        spec=_learned_carry_spec(cell.spec),
    )


def _learned_carry_spec(spec: _core.CellSpec) -> _core.CellSpec:
    """The wrapped cell's spec, its parameters and kernels found under ``params.cell``."""
    flags = spec.recurrent_kernels
    return spec._replace(
        recurrent_kernels=None
        if flags is None
        else lambda params: LearnedCarryParams(flags(params.cell), jax.tree.map(lambda _: False, params.carry)),
        kernels=_core.Options(_kernels.within(spec.kernels, lambda params: params.cell)),
    )


def _stacked_spec(cells: Sequence[Cell]) -> _core.CellSpec:
    """The spec of a stacked cell, whose carry and parameters are tuples with one entry per
    layer: each layer's part as its own spec says (no kernels: a stack has none)."""
    specs = [c.spec for c in cells]

    def per_layer(get):
        return lambda tree: tuple(None if get(s) is None else get(s)(t) for s, t in zip(specs, tree))

    narrow = [s.compute_dtype for s in specs if s.compute_dtype is not None and _core.narrow_float(s.compute_dtype)]
    return _core.CellSpec(
        recurrent_input=None
        if all(s.recurrent_input is None for s in specs)
        else per_layer(lambda s: s.recurrent_input),
        carry_roles=per_layer(lambda s: s.carry_roles),
        recurrent_kernels=None
        if all(s.recurrent_kernels is None for s in specs)
        else lambda params: tuple(
            jax.tree.map(lambda _: False, p) if s.recurrent_kernels is None else s.recurrent_kernels(p)
            for s, p in zip(specs, params)
        ),
        compute_dtype=narrow[0] if narrow else None,
    )
