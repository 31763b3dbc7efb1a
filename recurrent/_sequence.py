"""A layer's input: one shared check of ``xs``, ``lengths`` and ``resets`` for every layer, and the
flattening of every batch axis into one, time first, that the driver and the kernels work on."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent import _core


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
    """Validates ``lengths`` (None, or integers of the batch shape in ``[0, T]``).

    Concrete lengths out of range raise. Traced ones (under ``jit`` or ``vmap``) cannot be
    checked at trace time: they are clamped to ``[0, T]`` (negative to 0, above ``T`` to ``T``),
    so every layer computes exactly what it computes for the clamped lengths."""
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
    return jnp.clip(lengths, 0, T)


def zero_padding(xs: jax.Array, lengths: jax.Array | None, time_axis: int) -> jax.Array:
    """``xs`` with the steps at or after each sequence's length replaced by zeros.

    A padded step is computed and then discarded (``jnp.where``), which keeps NaN or inf
    inputs out of the forward values, but not out of the gradients: the backward pass of the
    discarded step multiplies a zero cotangent by what the step computed from those inputs,
    and ``0 * NaN`` is NaN. So the driver zeroes padded inputs once, before any projection.
    ``lengths`` has the batch shape: the axes before ``time_axis``, or after it when
    ``time_axis`` is 0 (time-major)."""
    if lengths is None:
        return xs
    T = xs.shape[time_axis]
    t = jnp.arange(T)
    if time_axis == 0:
        valid = t.reshape((T,) + (1,) * lengths.ndim) < lengths
    else:
        valid = t < lengths[..., None]
    return jnp.where(valid.reshape(valid.shape + (1,) * (xs.ndim - valid.ndim)), xs, jnp.zeros((), xs.dtype))


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


def check_resets(resets: Any, batch_shape: tuple[int, ...], T: int, time_major: bool, *, where: str):
    """Validates ``resets`` (None, or booleans laid out like ``xs`` without the features)."""
    if resets is None:
        return None
    if not hasattr(resets, "dtype"):
        resets = np.asarray(resets)
    expected = (T, *batch_shape) if time_major else (*batch_shape, T)
    if resets.dtype != jnp.bool_ or tuple(resets.shape) != expected:
        raise _core.error(
            f"{where}: `resets` must be booleans with the batch and time axes of `xs`; nothing is broadcast.",
            expected=f"bool array of shape {expected}, True where a new sequence (episode) starts",
            got=f"{resets.dtype} array of shape {tuple(resets.shape)}",
            fix="build it as e.g. `resets = segment_ids != jnp.roll(segment_ids, 1, axis=-1)` (a bool array).",
        )
    return jnp.asarray(resets)


class Sequence(NamedTuple):
    """A layer's checked input: its batch shape, ``T``, the feature shape, the layout, and the
    checked ``lengths`` (clamped to ``[0, T]`` when traced) and ``resets``. Its methods flatten
    every batch axis into one (``B``) and put it back."""

    batch: tuple[int, ...]
    T: int
    features: tuple[int, ...]
    time_major: bool
    lengths: jax.Array | None
    resets: jax.Array | None

    @property
    def B(self) -> int:
        return math.prod(self.batch)

    @property
    def time_axis(self) -> int:
        return 0 if self.time_major else len(self.batch)

    @property
    def lengths_B(self) -> jax.Array | None:
        return None if self.lengths is None else self.lengths.reshape((self.B,))

    def flat(self, tree: Any) -> Any:
        """``(*batch, ...)`` leaves as ``(B, ...)``."""
        nb = len(self.batch)
        return jax.tree.map(lambda a: a.reshape((self.B, *a.shape[nb:])), tree)

    def unflat(self, tree: Any) -> Any:
        """``(B, ...)`` leaves as ``(*batch, ...)``."""
        return jax.tree.map(lambda a: a.reshape((*self.batch, *a.shape[1:])), tree)

    def time_first(self, xs: jax.Array) -> jax.Array:
        """``xs`` as ``(T, B, *features)``, padded steps zeroed (see :func:`zero_padding`)."""
        xs_TB = xs if self.time_major else jnp.moveaxis(xs, len(self.batch), 0)
        return zero_padding(xs_TB.reshape((self.T, self.B, *xs_TB.shape[1 + len(self.batch) :])), self.lengths_B, 0)

    def batch_first(self, xs: jax.Array) -> jax.Array:
        """``xs`` as ``(B, T, *features)``, padded steps zeroed."""
        nb = len(self.batch)
        xs_BT = jnp.moveaxis(xs, 0, nb) if self.time_major else xs
        return zero_padding(xs_BT.reshape((self.B, self.T, *xs_BT.shape[nb + 1 :])), self.lengths_B, 1)

    def resets_TB(self, reverse: bool) -> jax.Array | None:
        """``(T, B)`` resets; for a reversed layer shifted by one (a backward pass starts afresh
        where the next segment starts)."""
        if self.resets is None:
            return None
        r = self.resets if self.time_major else jnp.moveaxis(self.resets, len(self.batch), 0)
        r = r.reshape((self.T, self.B))
        return jnp.concatenate([r[1:], jnp.zeros((1, self.B), bool)]) if reverse else r

    def from_time_first(self, a: jax.Array) -> jax.Array:
        """``(T, B, ...)`` back to the caller's layout."""
        a = a.reshape((self.T, *self.batch, *a.shape[2:]))
        return a if self.time_major else jnp.moveaxis(a, 0, len(self.batch))

    def from_batch_first(self, a: jax.Array) -> jax.Array:
        """``(B, T, ...)`` back to the caller's layout."""
        a = a.reshape((*self.batch, self.T, *a.shape[2:]))
        return jnp.moveaxis(a, len(self.batch), 0) if self.time_major else a


def read_sequence(
    xs: Any, input_rank: int, *, lengths: Any = None, resets: Any = None, time_major: bool = False, where: str
) -> Sequence:
    """The one input check of every layer: ``xs`` a sequence of ``input_rank`` feature axes,
    ``lengths`` integers of its batch shape, ``resets`` booleans laid out like it."""
    batch, T, features = split_sequence_shape(xs, input_rank, time_major, where=where)
    lengths = check_lengths(lengths, batch, T, where=where)
    resets = check_resets(resets, batch, T, time_major, where=where)
    return Sequence(tuple(batch), T, tuple(features), bool(time_major), lengths, resets)
