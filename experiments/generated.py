"""Data sets generated on demand, item by item, for the pipeline.

:class:`Generated` is a sequence of ``n`` items, item ``i`` made by ``make(i)`` only when the
pipeline copies it into a batch; ``len(item)`` and ``item.shape`` are known without making it,
so the pipeline's length bookkeeping costs nothing and a large (or endless) training set
needs no memory.

>>> import numpy as np
>>> data = Generated(3, (4, 2), lambda i: np.full((4, 2), i, np.float32))
>>> len(data), len(data[1]), np.asarray(data[2])[0].tolist()
(3, 4, [2.0, 2.0])
>>> [float(np.asarray(x).sum()) for x in data]
[0.0, 8.0, 16.0]

Items of different lengths give ``lengths`` (one per item; ``shape[0]`` is then the longest):

>>> ragged = Generated(2, (5, 1), lambda i: np.zeros((3 + i, 1), np.float32), lengths=[3, 4])
>>> [len(x) for x in ragged], np.asarray(ragged[1]).shape
([3, 4], (4, 1))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class Item:
    """One lazily made item: ``len``, ``shape`` and ``np.asarray(item)`` (which makes it)."""

    def __init__(self, make: Callable[[int], np.ndarray], i: int, shape: tuple[int, ...]):
        self._make, self._i, self.shape = make, i, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        a = self._make(self._i)
        return a if dtype is None else a.astype(dtype)


class Generated(Sequence):
    """``n`` items of ``shape`` (time first) made by ``make(i) -> ndarray`` when used; with
    ``lengths``, item ``i`` has ``lengths[i]`` steps."""

    def __init__(
        self, n: int, shape: tuple[int, ...], make: Callable[[int], np.ndarray], lengths: Sequence[int] | None = None
    ):
        self.n, self.shape, self.make = n, tuple(shape), make
        self.lengths = None if lengths is None else np.asarray(lengths, np.int64)
        if self.lengths is not None and self.lengths.shape != (n,):
            raise ValueError(f"Generated: expected {n} lengths, one per item; got shape {self.lengths.shape}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"item {i} of a generated split of {self.n}")
        i %= self.n
        shape = self.shape if self.lengths is None else (int(self.lengths[i]), *self.shape[1:])
        return Item(self.make, i, shape)

    def array(self, i: int) -> np.ndarray:
        """Item ``i``, made."""
        return np.asarray(self[i])
