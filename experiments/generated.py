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
    """``n`` items of ``shape`` (time first) made by ``make(i) -> ndarray`` when used."""

    def __init__(self, n: int, shape: tuple[int, ...], make: Callable[[int], np.ndarray]):
        self.n, self.shape, self.make = n, tuple(shape), make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"item {i} of a generated split of {self.n}")
        return Item(self.make, i % self.n, self.shape)

    def array(self, i: int) -> np.ndarray:
        """Item ``i``, made."""
        return np.asarray(self[i])
