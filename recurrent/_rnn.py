"""The sequence driver: the one place in the library that calls ``lax.scan``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent import _core, _cudnn, _fastgru, _fastlstm, _gru, _lstm
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


def _is_off(rate: Any) -> bool:
    """True for a static zero rate, so the regulariser adds nothing to the program."""
    return not isinstance(rate, jax.core.Tracer) and float(np.asarray(rate)) == 0.0


def _keep_mask(key: jax.Array, rate: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """An inverted-dropout mask: 0 with probability ``rate``, else ``1 / (1 - rate)``."""
    keep = 1.0 - rate
    return jax.random.bernoulli(key, keep, shape).astype(dtype) / jnp.asarray(keep, dtype)


def _map_keys(fn, key, tree):
    """``fn(key_i, leaf)`` for every leaf with its own key."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [fn(k, leaf) for k, leaf in zip(keys, leaves)])


def _leaf_name(path) -> str | None:
    last = path[-1] if path else None
    return getattr(last, "name", None)


class Trace(NamedTuple):
    """Every step's carry and gate activations, returned by ``apply(..., return_trace=True)``.

    Attributes:
      carries: the carry after each step, each leaf with a time axis where ``ys`` has it.
      gates: a dict from gate name to activations with the same layout (a tuple of dicts
        for a stacked cell). Padded steps hold the carry and have zero gates.
    """

    carries: Any
    gates: Any


#: Where ``rnn`` applies the cell's input projection (see :func:`rnn`).
PROJECTIONS = ("auto", "hoisted", "fused")


def resolve_projection(projection: str, backend: str | None = None, *, remat: bool = False) -> str:
    """The projection placement ``projection="auto"`` picks on ``backend`` (default: JAX's).

    Measured (``python -m benchmarks.techniques``): on CPU the per-step projection inside the
    loop is faster, since the small ``(B, F) @ (F, G*H)`` matmul runs while the weights are in
    cache and no ``(T, B, G*H)`` buffer is written and read back; on GPU and TPU one large
    matmul over all steps fills the device, so it is hoisted. With ``remat`` the projection
    stays in the loop everywhere: the hoisted ``(T, B, G*H)`` buffer and its gradient would
    dominate memory, which is what remat is asked to save (measured on an H200 over 10,000
    steps: 3.4 GB hoisted; see benchmarks/README.md).
    """
    if projection != "auto":
        return projection
    if remat:
        return "fused"
    return "fused" if (backend or jax.default_backend()) == "cpu" else "hoisted"


def rnn(
    cell: Cell,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
    projection: str = "auto",
    remat: bool = False,
    input_dropout: float | jax.Array = 0.0,
    variational: bool = False,
    recurrent_dropout: float | jax.Array = 0.0,
    dropconnect: float | jax.Array = 0.0,
    zoneout: float | jax.Array = 0.0,
    zoneout_cell: float | jax.Array | None = None,
    implementation: str = "scan",
) -> Layer:
    r"""Runs ``cell`` over a sequence with ``lax.scan``: the library's sequence driver.

    The cell's input projection is applied to all time steps at once (one large matmul or
    convolution) before the recurrence is scanned, or inside the loop where that is faster
    (``projection``; by default chosen per backend). ``layer.init`` returns exactly the
    cell's parameters.

    ``layer.apply(params, xs, *, lengths=None, carry=None, time_major=False, key=None,
    resets=None, return_trace=False) -> (carry, ys)``:

    - ``xs``: ``(*batch, T, *features)``, any number of batch axes (also none), or
      ``(T, *batch, *features)`` with ``time_major=True``. ``ys`` has the same layout.
    - ``lengths``: optional integers of the batch shape, ``0 <= lengths <= T``. Steps at or
      after a sequence's length leave its carry unchanged and output zeros, so the returned
      carry is the one after the last valid step (the initial carry for length 0). What the
      inputs hold there (even NaN or inf) reaches neither values nor gradients. Concrete
      lengths out of range raise; traced ones (under ``jit``), which cannot be checked, are
      clamped to ``[0, T]``: negative lengths count as 0, longer ones as ``T``.
    - ``carry``: continue from a carry returned earlier (feed a long sequence in chunks);
      by default ``cell.initial_carry``.
    - ``key``: a PRNG key turns the regularisers on (training); without one they are off
      (evaluation: dropout is the identity, zoneout uses its expectation).
    - ``resets``: optional booleans laid out like ``xs`` without features, True where a new
      sequence starts (episode boundaries, packed sequences): the carry is reset to the
      cell's initial carry before that step. Reversed layers reset at the matching places,
      so each packed segment is processed on its own in both directions.
    - ``return_trace``: also return a :class:`Trace` of every step's carry and gates:
      ``(carry, ys, trace)``.

    With ``reverse=True`` each sequence's valid prefix is processed from its last valid step
    to its first; outputs stay aligned with input positions and padding stays zero.

    Regularisers (all rates may be traced arrays, so a population can vmap over them):

    - ``input_dropout``: dropout on the inputs, a new mask at every step, or one mask per
      sequence with ``variational=True`` (Gal & Ghahramani 2016).
    - ``recurrent_dropout``: variational dropout on the recurrent input ``h``, one mask per
      sequence (Gal & Ghahramani 2016); the GRU's interpolation uses the unmasked state.
    - ``dropconnect``: DropConnect on the recurrent kernels (weight-dropped LSTM, Merity et
      al. 2018), one mask per call shared by the batch and all steps.
    - ``zoneout``, ``zoneout_cell``: zoneout (Krueger et al. 2017): each unit of ``h`` (and of
      ``c``, with rate ``zoneout_cell``, by default ``zoneout``) keeps its previous value with
      this probability; at evaluation ``h = rate * h_prev + (1 - rate) * h_new``.

    Args:
      cell: a :class:`Cell`.
      reverse: run backwards in time over the valid prefix.
      unroll: passed to ``lax.scan``; how many steps each loop iteration runs.
      projection: where the cell's input projection runs: ``"hoisted"`` applies it to all
        time steps at once before the scan (one large matmul; best on GPU and TPU),
        ``"fused"`` inside the loop, one step at a time (best on CPU), ``"auto"`` picks by
        backend (:func:`resolve_projection`). The result is the same.
      remat: recompute each step in the backward pass (``jax.checkpoint`` of the scan
        body) rather than storing its intermediates: for long sequences, memory grows with
        the carry per step only. With ``projection="auto"`` the projection then stays in
        the loop on every backend, so no ``(T, B, G*H)`` buffer is kept either.
      input_dropout, variational, recurrent_dropout, dropconnect, zoneout, zoneout_cell:
        the regularisers above.
      implementation: ``"scan"`` (the default; every cell, every backend) or ``"cudnn"``:
        run a plain float32 :func:`~recurrent.lstm` layer as one cuDNN call through
        ``jax.experimental.rnn`` on an NVIDIA GPU, with the same parameters and results.
        Where that does not apply (another backend or cell, regularisers in training,
        ``resets``, ``return_trace``, under ``jax.vmap``, which cuDNN cannot batch) the scan
        runs instead, with a :class:`~recurrent.FallbackWarning` that says why. ``"vjp"``:
        the plain, peephole and CIFG LSTMs (no projection, layer norm or clipping) and the
        default GRU (``reset_after=True``, no layer norm) with a
        hand-written backward pass whose weight gradients are computed outside the loop, as
        large matmuls over all steps (any backend and compute dtype; not differentiable in
        forward mode, ``jax.jvp``); same fallbacks but the GPU one.

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
    >>> noisy = recurrent.rnn(recurrent.lstm(32), recurrent_dropout=0.25, zoneout=0.1)
    >>> carry, ys = noisy.apply(params, xs, key=jax.random.key(1))   # training
    """
    if not isinstance(cell, Cell):
        raise _core.error(
            "recurrent.rnn: expected a cell.",
            expected="a recurrent.Cell, e.g. recurrent.lstm(128)",
            got=type(cell).__name__,
            fix="build the cell with a factory such as recurrent.lstm, or use the layer directly.",
        )
    where = f"rnn({cell.name}{', reverse=True' if reverse else ''})"
    if projection not in PROJECTIONS:
        raise _core.error(
            f"{where}: unknown `projection`.",
            expected=" or ".join(repr(p) for p in PROJECTIONS),
            got=repr(projection),
            fix='pass projection="auto" (the measured default per backend), "hoisted" or "fused".',
        )
    if implementation not in _cudnn.IMPLEMENTATIONS:
        raise _core.error(
            f"{where}: unknown `implementation`.",
            expected=" or ".join(repr(p) for p in _cudnn.IMPLEMENTATIONS),
            got=repr(implementation),
            fix='pass implementation="scan" (portable, the default), "cudnn" (plain LSTM on an NVIDIA GPU) or "vjp".',
        )
    rates = {
        name: check_rate(name, rate, where=where)
        for name, rate in (
            ("input_dropout", input_dropout),
            ("recurrent_dropout", recurrent_dropout),
            ("dropconnect", dropconnect),
            ("zoneout", zoneout),
            ("zoneout_cell", zoneout if zoneout_cell is None else zoneout_cell),
        )
    }
    zoning = not (_is_off(rates["zoneout"]) and _is_off(rates["zoneout_cell"]))
    where = f"{where}.apply"
    rank = cell.input_rank
    options = dict(
        unroll=unroll,
        projection=projection,
        remat=remat,
        input_dropout=input_dropout,
        variational=variational,
        recurrent_dropout=recurrent_dropout,
        dropconnect=dropconnect,
        zoneout=zoneout,
        zoneout_cell=zoneout_cell,
        implementation=implementation,
    )
    fast_cell_reason = _cudnn.cell_reason(cell, implementation) if implementation != "scan" else None
    # the hand-written backward pass of this cell ("vjp") and the parameters it takes
    gru_vjp = cell.name == "gru" and implementation == "vjp"
    fast_params, fast = (_gru.GRUParams, _fastgru) if gru_vjp else (_lstm.LSTMParams, _fastlstm)
    regularised = not all(_is_off(rates[n]) for n in ("input_dropout", "recurrent_dropout", "dropconnect"))

    def zoneout_rate(path):
        name = _leaf_name(path)
        return rates["zoneout_cell"] if name == "c" else 0.0 if name == "gates" else rates["zoneout"]

    def check_inputs(params, xs):
        """The cell's input checks, on the caller's own shape (not the driver's internal one)."""
        jax.eval_shape(cell.project, params, jax.ShapeDtypeStruct(xs.shape, xs.dtype))

    def check(params, xs, time_major):
        """``(batch, T, features)`` of ``xs``, after checking it and the parameters."""
        batch, T, features = split_sequence_shape(xs, rank, time_major, where=where)
        inputs = lambda: _core.only_input_errors(check_inputs, params, xs)  # noqa: E731
        _core.check_params(params, cell.init, features, where=where, inputs=inputs)
        check_inputs(params, xs)
        return batch, T, features

    def prepare(params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        """Everything but the scan: ``(carry, body, inputs, finish)`` such that
        ``finish(*lax.scan(body, carry, inputs, reverse=reverse))`` is ``apply``'s result.
        The body takes the true time index, so a combinator may scan several of them in
        one loop (both directions of ``bidirectional``)."""
        batch, T, features = check(params, xs, time_major)
        lengths = check_lengths(lengths, batch, T, where=where)
        resets = check_resets(resets, batch, T, time_major, where=where)
        nb, B = len(batch), math.prod(batch)
        flat = lambda a: a.reshape((B, *a.shape[nb:]))  # noqa: E731

        initial = cell.initial_carry(params, (*batch, *features))
        if carry is None:
            carry = initial
        else:
            _core.check_carry(carry, initial, where=where)
        carry, initial = jax.tree.map(flat, carry), jax.tree.map(flat, initial)

        lengths_B = None if lengths is None else lengths.reshape((B,))
        xs_TB = xs if time_major else jnp.moveaxis(xs, nb, 0)
        xs_TB = zero_padding(xs_TB.reshape((T, B, *features)), lengths_B, 0)
        step_params, noise = params, _core.StepNoise()
        if key is not None:
            k_in, k_rec, k_dc, k_step, key = jax.random.split(key, 5)
            if not _is_off(rates["input_dropout"]):
                shape = (1 if variational else T, B, *features)
                xs_TB = xs_TB * _keep_mask(k_in, rates["input_dropout"], shape, xs_TB.dtype)
            if not _is_off(rates["recurrent_dropout"]):
                mask = lambda k, leaf: _keep_mask(k, rates["recurrent_dropout"], leaf.shape, leaf.dtype)  # noqa: E731
                noise = noise._replace(recurrent=_map_keys(mask, k_rec, carry))
            if not _is_off(rates["dropconnect"]):
                step_params = _drop_connect(k_dc, rates["dropconnect"], params)
        hoist = resolve_projection(projection, remat=remat) == "hoisted"
        # hoisted: all time steps at once (one large matmul); fused: each step in the loop
        xp_TB = cell.project(params, xs_TB) if hoist else xs_TB

        if resets is not None:
            resets_TB = (resets if time_major else jnp.moveaxis(resets, nb, 0)).reshape((T, B))
            if reverse:  # a backward pass starts afresh where the next segment starts
                resets_TB = jnp.concatenate([resets_TB[1:], jnp.zeros((1, B), bool)])

        outputs = _core.ScanOutputs()  # bfloat16 outputs stacked cheaply on CPU

        def body(carry, inputs):
            t, xp = inputs
            if not hoist:
                xp = cell.project(params, xp)
            step_noise = noise
            if zoning:
                if key is None:  # evaluation: the expectation
                    d = jax.tree_util.tree_map_with_path(lambda p, _: zoneout_rate(p), carry)
                else:
                    paths, treedef = jax.tree_util.tree_flatten_with_path(carry)
                    keys = jax.random.split(jax.random.fold_in(key, t), len(paths))
                    d = jax.tree.unflatten(
                        treedef,
                        [
                            jax.random.bernoulli(k, zoneout_rate(p), leaf.shape).astype(leaf.dtype)
                            for k, (p, leaf) in zip(keys, paths)
                        ],
                    )
                step_noise = step_noise._replace(zoneout=d)
            previous = carry  # a padded step keeps this, even where a reset falls in the padding
            if resets is not None:
                r = resets_TB[t]
                carry = jax.tree.map(lambda i, c: jnp.where(_expand(r, c), i, c), initial, carry)
            if key is not None:
                step_noise = step_noise._replace(key=jax.random.fold_in(k_step, t))
            if all(part is None for part in step_noise):
                step_noise = None
            new_carry, y, gates = cell.probe(step_params, carry, xp, step_noise)
            if lengths_B is not None:
                valid = t < lengths_B
                keep = lambda new, old: jnp.where(_expand(valid, new), new, old)  # noqa: E731
                new_carry = jax.tree.map(keep, new_carry, previous)
                y = keep(y, jnp.zeros_like(y))
                if return_trace:
                    gates = jax.tree.map(lambda g: keep(g, jnp.zeros_like(g)), gates)
            out = (y, new_carry, gates) if return_trace else y
            return new_carry, outputs.pack(out)

        # bfloat16 on CPU: carry float32 copies of narrow carry leaves through the loop, and keep
        # the backward pass from storing bfloat16 values (recomputing the casts instead), so
        # no stacked bfloat16 buffer is updated per step (see _core.ScanOutputs).
        cell_dtype = None if cell.options is None else cell.options.get("dtype")
        narrow = jax.default_backend() == "cpu" and (
            any(_core.narrow_float(a.dtype) for a in jax.tree.leaves(carry))
            or (cell_dtype is not None and _core.narrow_float(cell_dtype))
        )
        wide_carry = _core.ScanOutputs()  # the carry's float32 copies
        if narrow:

            def narrow_body(carry, inputs):
                carry, out = body(wide_carry.unpack(carry), inputs)
                return wide_carry.pack(carry), out

            # remat recomputes every step anyway; otherwise only the casts are recomputed
            policy = None if remat else (lambda prim, *_, **__: prim is not lax.convert_element_type_p)
            scan_body = jax.checkpoint(narrow_body, policy=policy)
            carry = wide_carry.pack(carry)
        else:
            # remat: the backward pass recomputes each step from its carry instead of storing
            # every step's intermediates, so memory per step is the carry (and the input).
            scan_body = jax.checkpoint(body) if remat else body

        def unflat(a, time_axis):
            a = a.reshape((*a.shape[:time_axis], *batch, *a.shape[time_axis + 1 :]))
            return a if time_major or time_axis is None else jnp.moveaxis(a, 0, nb)

        def finish(carry, out):
            out = outputs.unpack(out)
            if narrow:
                carry = wide_carry.unpack(carry)
            carry = jax.tree.map(lambda a: a.reshape((*batch, *a.shape[1:])), carry)
            if not return_trace:
                return carry, unflat(out, 1)
            ys, carries, gates = jax.tree.map(lambda a: unflat(a, 1), out)
            return carry, ys, Trace(carries, gates)

        return carry, scan_body, (jnp.arange(T), xp_TB), finish

    def fast_apply(params, xs, lengths, carry, time_major, key, resets, return_trace):
        """The cuDNN call or the hand-written backward pass, or ``None`` after a
        :class:`FallbackWarning` where it does not apply."""
        batch, T, features = check(params, xs, time_major)  # before the parameters are read
        cudnn = implementation == "cudnn"
        warn = lambda reason: _cudnn.warn(reason, implementation)  # noqa: E731
        reason = (
            (_cudnn.backend_reason() if cudnn else None)
            or fast_cell_reason
            or ("zoneout is on" if zoning else None)
            or ("dropout is on in training (a `key` was given)" if key is not None and regularised else None)
            or ("`resets` were given" if resets is not None else None)
            or ("`return_trace=True`" if return_trace else None)
            or ("remat=True (this backward pass stores every step's gates)" if remat and not cudnn else None)
            or (None if isinstance(params, fast_params) else f"the parameters are a {type(params).__name__}")
        )
        if reason is None and cudnn and (xs.dtype != jnp.float32 or params.input_kernel.dtype != jnp.float32):
            reason = f"cuDNN runs float32 here, got inputs {xs.dtype}, parameters {params.input_kernel.dtype}"
        if reason is None and not cudnn and xs.dtype != params.input_kernel.dtype:
            reason = f"inputs {xs.dtype} and parameters {params.input_kernel.dtype} differ"
        if reason is not None:
            warn(reason)
            return None
        lengths = check_lengths(lengths, batch, T, where=where)
        initial = cell.initial_carry(params, (*batch, *features))
        if carry is None:
            carry = initial
        else:
            _core.check_carry(carry, initial, where=where)
        nb, B = len(batch), math.prod(batch)
        lengths_B = None if lengths is None else lengths.reshape((B,))
        xs_BTF = (jnp.moveaxis(xs, 0, nb) if time_major else xs).reshape((B, T, *features))
        xs_BTF = zero_padding(xs_BTF, lengths_B, 1)  # padded inputs reach no gradient (see zero_padding)
        carry_B = jax.tree.map(lambda a: a.reshape((B, *a.shape[nb:])), carry)
        if reverse:
            xs_BTF = reverse_sequences(xs_BTF, lengths_B, 1)
        if not cudnn:
            hoist = resolve_projection(projection, remat=remat) == "hoisted"
            cdt = _core.compute_dtype(cell.options["dtype"], params.input_kernel)
            extra = {} if gru_vjp else {"coupled": cell.options["coupled"]}
            carry_B, ys = fast.apply(params, xs_BTF, lengths_B, carry_B, hoist, cdt, unroll, **extra)
        else:
            try:
                carry_B, ys = _cudnn.apply(params, xs_BTF, lengths_B, carry_B)
            except NotImplementedError as e:  # no batching rule: under jax.vmap
                warn(f"JAX cannot run the cuDNN call here ({e}); cuDNN has no batching rule for jax.vmap")
                return None
        if reverse:
            ys = reverse_sequences(ys, lengths_B, 1)
        ys = ys.reshape((*batch, T, *ys.shape[2:]))
        if time_major:
            ys = jnp.moveaxis(ys, nb, 0)
        return jax.tree.map(lambda a: a.reshape((*batch, *a.shape[1:])), carry_B), ys

    def apply(params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        if implementation != "scan":
            out = fast_apply(params, xs, lengths, carry, time_major, key, resets, return_trace)
            if out is not None:
                return out
        carry, body, inputs, finish = prepare(
            params,
            xs,
            lengths=lengths,
            carry=carry,
            time_major=time_major,
            key=key,
            resets=resets,
            return_trace=return_trace,
        )
        return finish(*lax.scan(body, carry, inputs, reverse=reverse, unroll=unroll))

    # private hooks: for combinators that fuse several scans into one (see ``scan_parts``), and
    # for combinators' parameter checks, to report inputs of the wrong size first (``input_check``)
    apply._scan_parts = ScanParts(prepare, reverse, unroll)
    apply._check_inputs = lambda params, xs: _core.only_input_errors(check_inputs, params, xs)

    return Layer(
        init=cell.init,
        apply=apply,
        initial_carry=cell.initial_carry,
        output_shape=cell.output_shape,
        input_rank=rank,
        name=f"rnn({cell.name}{', reverse=True' if reverse else ''})",
        reversed=lambda: rnn(cell, reverse=not reverse, **options),
        options=None
        if cell.options is None
        else _core.Options({"cell": cell.name, "cell_options": cell.options, "reverse": reverse, **options}),
    )


class ScanParts(NamedTuple):
    """What a layer made by :func:`rnn` does apart from its ``lax.scan`` (private)."""

    prepare: Callable[..., tuple[Any, Callable, Any, Callable]]
    reverse: bool
    unroll: int | bool


def scan_parts(layer: Layer) -> ScanParts | None:
    """The :class:`ScanParts` of a layer made by :func:`rnn`, else ``None``."""
    return getattr(layer.apply, "_scan_parts", None)


def input_check(layer: Layer) -> Callable[[Any, Any], None] | None:
    """``check(params, xs)``: the input checks of a layer made by :func:`rnn` or a combinator,
    raising the library's error for inputs of another feature shape than ``params`` were made
    for, and nothing else (see :func:`recurrent._core.check_params`); ``None`` for other layers."""
    return getattr(layer.apply, "_check_inputs", None)


def _expand(mask_B: jax.Array, like: jax.Array) -> jax.Array:
    return mask_B.reshape(mask_B.shape + (1,) * (like.ndim - mask_B.ndim))


def _drop_connect(key: jax.Array, rate: Any, params: Any) -> Any:
    """Drops entries of every ``recurrent_kernel`` in ``params`` (also inside stacks)."""

    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, max(len(paths), 1))
    return jax.tree.unflatten(
        treedef,
        [
            leaf * _keep_mask(k, rate, leaf.shape, leaf.dtype) if _leaf_name(p) == "recurrent_kernel" else leaf
            for k, (p, leaf) in zip(keys, paths)
        ],
    )


def truncated_bptt(
    step_fn: Callable[[Any, Any, Any], tuple[Any, Any, Any]],
    state: Any,
    carry: Any,
    xs: Any,
    *,
    chunk_size: int,
    time_axis: int = 1,
) -> tuple[Any, Any, Any]:
    r"""Truncated backpropagation through time: runs ``step_fn`` over consecutive chunks of a
    long sequence, carrying the recurrent state across chunks without backpropagating
    through the chunk boundaries (Williams & Peng 1990).

    ``step_fn(state, carry, chunk) -> (state, carry, out)`` is typically one training step
    (``state`` holds parameters and optimiser state; it calls ``layer.apply(...,
    carry=carry)`` on the chunk and returns the final carry). The carry handed to each chunk
    is ``lax.stop_gradient`` of the previous chunk's. The chunks are scanned, so the
    compiled program does not grow with the sequence.

    Args:
      step_fn: the per-chunk function.
      state: its initial state (any pytree).
      carry: the initial recurrent carry, e.g. ``layer.initial_carry(params, x_shape)``.
      xs: a pytree of arrays (inputs, targets, ...) sharing a time axis.
      chunk_size: steps per chunk; must divide the time axis.
      time_axis: the time axis of every leaf of ``xs`` (1 for batch-major ``(B, T, ...)``).

    Returns:
      ``(state, carry, outs)`` with ``outs`` stacked over chunks on a leading axis.

    Example:

    >>> import jax, jax.numpy as jnp, optax, recurrent
    >>> layer = recurrent.rnn(recurrent.lstm(8))
    >>> params = layer.init(jax.random.key(0), (1,))
    >>> opt = optax.adam(1e-2)
    >>> def train_chunk(state, carry, chunk):
    ...     params, opt_state = state
    ...     def loss_fn(p):
    ...         carry_out, ys = layer.apply(p, chunk, carry=carry)
    ...         return jnp.mean((ys[..., 0] - chunk[..., 0]) ** 2), carry_out
    ...     (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ...     updates, opt_state = opt.update(grads, opt_state)
    ...     return (optax.apply_updates(params, updates), opt_state), carry, loss
    >>> xs = jnp.sin(jnp.linspace(0, 20, 400)).reshape(2, 200, 1)
    >>> carry = layer.initial_carry(params, (2, 1))
    >>> (params, _), carry, losses = recurrent.truncated_bptt(
    ...     train_chunk, (params, opt.init(params)), carry, xs, chunk_size=50)
    >>> losses.shape
    (4,)
    """
    where = "recurrent.truncated_bptt"
    chunk_size = _core.check_positive_int("chunk_size", chunk_size, where=where)
    leaves = jax.tree.leaves(xs)
    lengths = {leaf.shape[time_axis] for leaf in leaves}
    if len(lengths) != 1 or next(iter(lengths)) % chunk_size:
        raise _core.error(
            f"{where}: every leaf of `xs` needs the same time length, a multiple of chunk_size.",
            expected=f"time axis {time_axis} of a length divisible by {chunk_size}",
            got=f"time lengths {sorted(lengths)}",
            fix="pad or trim the sequence, or pick a chunk_size that divides its length.",
        )
    n = next(iter(lengths)) // chunk_size

    def to_chunks(a):
        a = a.reshape((*a.shape[:time_axis], n, chunk_size, *a.shape[time_axis + 1 :]))
        return jnp.moveaxis(a, time_axis, 0)

    outputs = _core.ScanOutputs()  # bfloat16 outputs stacked cheaply on CPU

    def body(state_carry, chunk):
        state, carry = state_carry
        state, carry, out = step_fn(state, lax.stop_gradient(carry), chunk)
        return (state, carry), outputs.pack(out)

    (state, carry), outs = lax.scan(body, (state, carry), jax.tree.map(to_chunks, xs))
    return state, carry, outputs.unpack(outs)
