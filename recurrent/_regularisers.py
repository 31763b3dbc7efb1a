"""The driver's regularisers, on any cell, through what its :class:`~recurrent.CellSpec` declares:
dropout on the inputs, variational dropout on the recurrent input, DropConnect on the recurrent
kernels, zoneout on the carry."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent import _core


def check_rate(name: str, rate: Any, *, where: str) -> Any:
    """A probability in ``[0, 1)``; traced rates pass unchecked (a population may vmap them)."""
    if isinstance(rate, jax.core.Tracer):
        return rate
    value = np.asarray(rate)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number) or not 0 <= value < 1:
        raise _core.error(
            f"{where}: `{name}` must be a probability in [0, 1).",
            expected="a float 0 <= rate < 1 (or a traced scalar)",
            got=repr(rate),
            fix=f"pass e.g. {name}=0.25; 0 turns it off.",
        )
    return rate


def is_off(rate: Any) -> bool:
    """True for a static zero rate, so the regulariser adds nothing to the program."""
    return not isinstance(rate, jax.core.Tracer) and float(np.asarray(rate)) == 0.0


def keep_mask(key: jax.Array, rate: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """An inverted-dropout mask: 0 with probability ``rate``, else ``1 / (1 - rate)``."""
    keep = 1.0 - rate
    return jax.random.bernoulli(key, keep, shape).astype(dtype) / jnp.asarray(keep, dtype)


def map_keys(fn, key, tree):
    """``fn(key_i, leaf)`` for every leaf with its own key."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [fn(k, leaf) for k, leaf in zip(keys, leaves)])


class Rates(NamedTuple):
    """The regularisers' rates of a layer (each a float or a traced scalar)."""

    input_dropout: Any
    recurrent_dropout: Any
    dropconnect: Any
    zoneout: Any
    zoneout_cell: Any

    @property
    def zoning(self) -> bool:
        return not (is_off(self.zoneout) and is_off(self.zoneout_cell))

    @property
    def dropping(self) -> bool:
        """Whether any dropout is on (in training)."""
        return not all(is_off(r) for r in (self.input_dropout, self.recurrent_dropout, self.dropconnect))


def check_spec(spec: _core.CellSpec, rates: Rates, *, where: str, name: str) -> None:
    """Refuses a regulariser the cell declares nothing for (at construction, not silently)."""
    if not is_off(rates.recurrent_dropout) and spec.recurrent_input is None:
        raise _core.error(
            f"{where}: `recurrent_dropout` needs to know the cell's recurrent input, and {name} declares none.",
            expected="a cell whose spec names its recurrent input, e.g. cell_spec(recurrent_input='h')",
            got=f"{name} with spec.recurrent_input=None",
            fix="pass recurrent_dropout=0 and regularise with zoneout or input_dropout (a cell without "
            "hidden-to-hidden weights, such as minGRU or the mLSTM, has nothing for it to act on); a cell of "
            "your own declares its input with recurrent.make_cell(..., spec=recurrent.cell_spec(recurrent_input=...)).",
        )
    if not is_off(rates.dropconnect) and spec.recurrent_kernels is None:
        raise _core.error(
            f"{where}: `dropconnect` needs to know the cell's recurrent kernels, and {name} declares none.",
            expected="a cell whose spec names its recurrent kernels, e.g. cell_spec(recurrent_kernels=('U',))",
            got=f"{name} with spec.recurrent_kernels=None",
            fix="declare them with recurrent.make_cell(..., spec=recurrent.cell_spec(recurrent_kernels=...)).",
        )


def input_dropout(key: jax.Array, rate: Any, xs_TB: jax.Array, variational: bool) -> jax.Array:
    """Dropout on ``(T, B, *F)`` inputs: a new mask at every step, or one per sequence."""
    shape = (1 if variational else xs_TB.shape[0], *xs_TB.shape[1:])
    return xs_TB * keep_mask(key, rate, shape, xs_TB.dtype)


def recurrent_masks(key: jax.Array, rate: Any, spec: _core.CellSpec, carry: Any) -> Any:
    """Variational dropout masks (one per sequence) for the cell's recurrent input: drawn for
    every carry leaf, then the part the spec names is kept."""
    masks = map_keys(lambda k, leaf: keep_mask(k, rate, leaf.shape, leaf.dtype), key, carry)
    return spec.recurrent_input(masks)


def drop_connect(key: jax.Array, rate: Any, spec: _core.CellSpec, params: Any) -> Any:
    """DropConnect: drops entries of the parameters the spec flags as recurrent kernels, one
    mask per call."""
    flags = jax.tree.leaves(spec.recurrent_kernels(params))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    dropped = [
        leaf * keep_mask(k, rate, leaf.shape, leaf.dtype) if hit else leaf for k, leaf, hit in zip(keys, leaves, flags)
    ]
    return treedef.unflatten(dropped)


def zoneout_values(spec: _core.CellSpec, rates: Rates, carry: Any, key: jax.Array | None) -> Any:
    """Zoneout's ``d`` for every carry leaf (the rate of its role): Bernoulli masks in training
    (``key``), the rates themselves at evaluation."""
    rate = {"hidden": rates.zoneout, "cell": rates.zoneout_cell, "fixed": 0.0}
    roles = jax.tree.leaves(spec.carry_roles(carry))
    leaves, treedef = jax.tree.flatten(carry)
    if key is None:
        return treedef.unflatten([rate[r] for r in roles])
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.bernoulli(k, rate[r], leaf.shape).astype(leaf.dtype) for k, r, leaf in zip(keys, roles, leaves)]
    )
