"""The sequence driver: the one place in the library that calls ``lax.scan``."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent import _core
from recurrent._core import Cell, Layer


def split_sequence_shape(xs: Any, input_rank: int, time_major: bool, *, where: str):
    """Returns ``(batch_shape, T, feature_shape)`` of a sequence input, or raises."""
    if not hasattr(xs, "shape") or not hasattr(xs, "dtype"):
        raise _core.error(
            f"{where}: `xs` must be an array.",
            expected="a jax or numpy array",
            got=type(xs).__name__,
            fix="convert with jnp.asarray(xs).",
        )
    if xs.ndim < input_rank + 1:
        layout = "(time, *batch, *features)" if time_major else "(*batch, time, *features)"
        raise _core.error(
            f"{where}: `xs` has too few axes for a sequence.",
            expected=f"{layout} with {input_rank} feature axis(es) and a time axis",
            got=f"shape {tuple(xs.shape)}",
            fix="add a time axis; to run one step use `cell.step` instead.",
        )
    nb = xs.ndim - input_rank - 1
    features = tuple(xs.shape[xs.ndim - input_rank :])
    if time_major:
        return tuple(xs.shape[1 : 1 + nb]), xs.shape[0], features
    return tuple(xs.shape[:nb]), xs.shape[nb], features


def check_lengths(lengths: Any, batch_shape: tuple[int, ...], T: int, *, where: str):
    """Validates ``lengths`` (None, or integers of the batch shape in ``[0, T]``)."""
    if lengths is None:
        return None
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    fix = "pass `lengths` as an integer array with one entry per sequence, e.g. jnp.array([5, 3])."
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise _core.error(
            f"{where}: `lengths` must have an integer dtype.",
            expected="an integer array (int32 or int64)",
            got=f"dtype {lengths.dtype}",
            fix=fix,
        )
    if tuple(lengths.shape) != tuple(batch_shape):
        raise _core.error(
            f"{where}: `lengths` must have the batch shape of `xs`; nothing is broadcast.",
            expected=f"shape {tuple(batch_shape)}",
            got=f"shape {tuple(lengths.shape)}",
            fix=fix,
        )
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > T):
            raise _core.error(
                f"{where}: `lengths` out of range for a time axis of {T} steps.",
                expected=f"0 <= lengths <= {T}",
                got=f"min {values.min()}, max {values.max()}",
                fix="check the lengths, or pad `xs` to the longest sequence.",
            )
    return jnp.asarray(lengths)


def reverse_sequences(xs: jax.Array, lengths: jax.Array | None, time_axis: int) -> jax.Array:
    """Reverses each sequence's valid prefix along ``time_axis``, leaving padding in place.

    ``lengths`` has the shape of the axes before ``time_axis`` (batch-major) or of the axes
    after it up to the features (time-major callers pass ``time_axis=0`` and lengths of the
    batch shape). With ``lengths=None`` the whole axis is flipped.

    >>> import jax.numpy as jnp
    >>> from recurrent import reverse_sequences
    >>> reverse_sequences(jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]]), jnp.array([3, 2]), 1)
    Array([[3, 2, 1, 0],
           [5, 4, 0, 0]], dtype=int32)
    """
    if lengths is None:
        return jnp.flip(xs, axis=time_axis)
    T = xs.shape[time_axis]
    t = jnp.arange(T)
    if time_axis == 0:  # (T, *batch, ...)
        L = lengths[None]
        t = t.reshape((T,) + (1,) * lengths.ndim)
    else:  # (*batch, T, ...)
        L = lengths[..., None]
    idx = jnp.where(t < L, L - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (xs.ndim - idx.ndim))
    return jnp.take_along_axis(xs, idx, axis=time_axis)


def rnn(cell: Cell, *, reverse: bool = False, unroll: int | bool = 1) -> Layer:
    r"""Runs ``cell`` over a sequence with ``lax.scan``: the library's sequence driver.

    The cell's input projection is applied to all time steps at once (one large matmul or
    convolution) before the recurrence is scanned. ``layer.init`` returns exactly the
    cell's parameters.

    ``layer.apply(params, xs, *, lengths=None, carry=None, time_major=False) -> (carry, ys)``:

    - ``xs``: ``(*batch, T, *features)``, any number of batch axes (also none), or
      ``(T, *batch, *features)`` with ``time_major=True``. ``ys`` has the same layout.
    - ``lengths``: optional integers of the batch shape, ``0 <= lengths <= T``. Steps at or
      after a sequence's length leave its carry unchanged and output zeros, so the returned
      carry is the one after the last valid step (the initial carry for length 0).
    - ``carry``: continue from a carry returned earlier (feed a long sequence in chunks);
      by default ``cell.initial_carry``.

    With ``reverse=True`` each sequence's valid prefix is processed from its last valid step
    to its first; outputs stay aligned with input positions and padding stays zero.

    Args:
      cell: a :class:`Cell`.
      reverse: run backwards in time over the valid prefix.
      unroll: passed to ``lax.scan``; how many steps each loop iteration runs.

    Returns:
      A :class:`Layer`.

    Example:

    >>> import jax, jax.numpy as jnp, recurrent
    >>> layer = recurrent.rnn(recurrent.lstm(32))
    >>> params = layer.init(jax.random.key(0), (8,))
    >>> xs = jnp.ones((4, 10, 8))                    # (batch, time, features)
    >>> carry, ys = layer.apply(params, xs, lengths=jnp.array([10, 7, 3, 0]))
    >>> ys.shape, carry.h.shape
    ((4, 10, 32), (4, 32))
    >>> bool((ys[1, 7:] == 0).all()), bool((carry.h[3] == 0).all())
    (True, True)
    """
    if not isinstance(cell, Cell):
        raise _core.error(
            "recurrent.rnn: expected a cell.",
            expected="a recurrent.Cell, e.g. recurrent.lstm(128)",
            got=type(cell).__name__,
            fix="build the cell with a factory such as recurrent.lstm, or use the layer directly.",
        )
    where = f"rnn({cell.name}{', reverse=True' if reverse else ''}).apply"
    rank = cell.input_rank

    def apply(params, xs, *, lengths=None, carry=None, time_major=False):
        batch, T, features = split_sequence_shape(xs, rank, time_major, where=where)
        lengths = check_lengths(lengths, batch, T, where=where)
        nb, B = len(batch), math.prod(batch)

        expected = cell.initial_carry(params, (*batch, *features))
        if carry is None:
            carry = expected
        else:
            _core.check_carry(carry, expected, where=where)
        carry = jax.tree.map(lambda a: a.reshape((B, *a.shape[nb:])), carry)

        xs_TB = xs if time_major else jnp.moveaxis(xs, nb, 0)
        xs_TB = xs_TB.reshape((T, B, *features))
        xp_TB = cell.project(params, xs_TB)  # all time steps at once

        if lengths is None:

            def body(carry, xp):
                return cell.recur(params, carry, xp)

            carry, ys = lax.scan(body, carry, xp_TB, reverse=reverse, unroll=unroll)
        else:
            lengths_B = lengths.reshape((B,))

            def body(carry, inputs):
                t, xp = inputs
                valid = t < lengths_B
                new_carry, y = cell.recur(params, carry, xp)
                keep = lambda new, old: jnp.where(valid.reshape((B,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
                carry = jax.tree.map(keep, new_carry, carry)
                return carry, keep(y, jnp.zeros_like(y))

            carry, ys = lax.scan(body, carry, (jnp.arange(T), xp_TB), reverse=reverse, unroll=unroll)

        carry = jax.tree.map(lambda a: a.reshape((*batch, *a.shape[1:])), carry)
        ys = ys.reshape((T, *batch, *ys.shape[2:]))
        if not time_major:
            ys = jnp.moveaxis(ys, 0, nb)
        return carry, ys

    return Layer(
        init=cell.init,
        apply=apply,
        initial_carry=cell.initial_carry,
        output_shape=cell.output_shape,
        input_rank=rank,
        name=f"rnn({cell.name})",
        reversed=lambda: rnn(cell, reverse=not reverse, unroll=unroll),
    )
