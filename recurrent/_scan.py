"""The step loop: :func:`run_scan` is the one place in the library that calls ``lax.scan`` on time
steps, and the loop body is built from small wrappers, each of which can be tested alone.

A body here is ``body(carry, t, xp) -> (carry, (y, gates))`` for time index ``t`` and the step's
(projected or raw) input ``xp``; :func:`cell_body` makes one from a cell, and

- :func:`with_resets` resets the carry to the initial one where a new segment starts,
- :func:`with_lengths` keeps the carry and zeroes the outputs at padded steps,

wrap it; :func:`scan_body` turns it into a ``lax.scan`` body over ``(t, xp)`` inputs, packing
what it emits, and applies remat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from recurrent import _core

Body = Callable[[Any, jax.Array, Any], tuple[Any, tuple[jax.Array, Any]]]


def run_scan(body: Callable, carry: Any, inputs: Any, *, reverse: bool = False, unroll: int | bool = 1):
    """``lax.scan(body, carry, inputs)``: every step loop of the library's layers runs here."""
    return lax.scan(body, carry, inputs, reverse=reverse, unroll=unroll)


def cell_body(cell: _core.Cell, params: Any, step_params: Any, project_in_loop: bool, noise_at) -> Body:
    """One step of ``cell``: its projection (inside the loop, or done before it), then ``probe``
    with ``step_params`` (the parameters after DropConnect) and the step's noise
    ``noise_at(t, carry)`` (a :class:`~recurrent.StepNoise` or None)."""

    def body(carry, t, xp):
        if project_in_loop:
            xp = cell.project(params, xp)
        new, y, gates = cell.probe(step_params, carry, xp, noise_at(t, carry))
        return new, (y, gates)

    return body


def _expand(mask_B: jax.Array, like: jax.Array) -> jax.Array:
    return mask_B.reshape(mask_B.shape + (1,) * (like.ndim - mask_B.ndim))


def with_resets(body: Body, resets_TB: jax.Array, initial: Any) -> Body:
    """Resets the carry to ``initial`` before the steps where ``resets_TB[t]`` is True."""

    def wrapped(carry, t, xp):
        r = resets_TB[t]
        carry = jax.tree.map(lambda i, c: jnp.where(_expand(r, c), i, c), initial, carry)
        return body(carry, t, xp)

    return wrapped


def with_lengths(body: Body, lengths_B: jax.Array) -> Body:
    """At steps ``t >= lengths_B``: the carry before the step (also where a reset falls in the
    padding), zero outputs and zero gates."""

    def wrapped(carry, t, xp):
        new, (y, gates) = body(carry, t, xp)
        valid = t < lengths_B
        keep = lambda a, b: jnp.where(_expand(valid, a), a, b)  # noqa: E731
        new = jax.tree.map(keep, new, carry)
        y = keep(y, jnp.zeros_like(y))
        gates = jax.tree.map(lambda g: keep(g, jnp.zeros_like(g)), gates)
        return new, (y, gates)

    return wrapped


def scan_body(body: Body, *, trace: bool, remat: bool, narrow: bool):
    """A ``lax.scan`` body over ``(t, xp)`` inputs that emits ``y`` (and with ``trace`` the carry
    and the gates), and what finishes its results: ``(body, carry_in, finish_carry, finish_out)``.

    ``remat`` recomputes each step in the backward pass from its carry (``jax.checkpoint``)
    instead of storing its intermediates. ``narrow`` (a 16-bit float carry on CPU) carries
    float32 copies of the carry through the loop and recomputes the casts in the backward pass
    instead of storing bfloat16 values, so no stacked bfloat16 buffer is updated per step
    (see :class:`~recurrent._core.ScanOutputs`); outputs are packed the same way."""
    outputs = _core.ScanOutputs()
    wide = _core.ScanOutputs()

    def emit(carry, inputs):
        t, xp = inputs
        new, (y, gates) = body(carry, t, xp)
        return new, outputs.pack((y, new, gates) if trace else y)

    if narrow:

        def narrow_emit(carry, inputs):
            carry, out = emit(wide.unpack(carry), inputs)
            return wide.pack(carry), out

        # remat recomputes every step anyway; otherwise only the casts are recomputed
        policy = None if remat else (lambda prim, *_, **__: prim is not lax.convert_element_type_p)
        return jax.checkpoint(narrow_emit, policy=policy), wide.pack, wide.unpack, outputs.unpack
    identity = lambda tree: tree  # noqa: E731
    return (jax.checkpoint(emit) if remat else emit), identity, identity, outputs.unpack
