"""The sequence driver :func:`rnn`: a cell over a sequence, assembled from small parts.

- :mod:`recurrent._sequence`: the one input check and batch flattening of every layer;
- :mod:`recurrent._regularisers`: dropout, DropConnect and zoneout through the cell's spec;
- :mod:`recurrent._scan`: the loop body's wrappers and :func:`~recurrent._scan.run_scan`, the one
  place that calls ``lax.scan`` on time steps;
- :mod:`recurrent._kernels`: the exact whole-layer kernels cells declare (``"vjp"``, ``"cudnn"``, ``"native"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent import _core, _kernels, _newton, _regularisers, _scan
from recurrent._core import Cell, Layer, Loop, ScanLoop
from recurrent._regularisers import Rates, check_rate
from recurrent._sequence import (  # noqa: F401 - re-exported: the combinators and users import them from here
    check_lengths,
    check_resets,
    read_sequence,
    reverse_sequences,
    split_sequence_shape,
    zero_padding,
)


class Trace(NamedTuple):
    """Every step's carry and gate activations, returned by ``apply(..., return_trace=True)``.

    Attributes:
      carries: the carry after each step, each leaf with a time axis where ``ys`` has it.
      gates: a dict from gate name to activations with the same layout (a tuple of dicts
        for a stacked cell). Padded steps hold the carry and have zero gates.
      solver: for ``rnn(..., implementation="parallel")`` solved by Newton's method, a
        :class:`~recurrent.SolverInfo` (iterations, converged, whether the sequential scan
        computed the result); ``None`` otherwise.
    """

    carries: Any
    gates: Any
    solver: Any = None


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
    method: str | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    damping: float | None = None,
) -> Layer:
    r"""Runs ``cell`` over a sequence with ``lax.scan``: the library's sequence driver.

    The cell's input projection runs inside the loop (on CPU, where that is faster) or is
    applied to all time steps at once before the recurrence is scanned (one large matmul or
    convolution, on GPU and TPU): ``projection``, by default chosen per backend. The driver
    knows no cell by name: what it needs (the recurrent input and cell state for the
    regularisers, the recurrent kernels for DropConnect, exact kernels) the cell declares in
    its :attr:`~recurrent.Cell.spec`. ``layer.init`` returns exactly the
    cell's parameters.

    ``layer.apply(params, xs, *, lengths=None, carry=None, time_major=False, key=None,
    resets=None, return_trace=False, guess=None) -> (carry, ys)``:

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
    - ``guess``: with ``implementation="parallel"`` solved by Newton's method, a starting
      trajectory for the solver laid out as ``trace.carries`` (a warm start, e.g. the trajectory of
      the previous training step); by default the starting carry at every step.

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
      implementation: ``"scan"`` (the default; every cell, every backend); ``"parallel"``: the
        layer evaluated in parallel over time, with ``O(log T)`` depth: the cell's own exact
        parallel form where it declares one (minGRU, minLSTM, mLSTM: ``method`` and the
        solver options are then refused), else Newton's method on the whole trajectory for any
        cell whose step is differentiable (:mod:`recurrent._newton`; ``method``), with the same
        results to ``tol`` and gradients by implicit differentiation; where it does not
        converge within ``max_iters`` the scan computes the result inside the same program, and
        ``Trace.solver`` (a :class:`~recurrent.SolverInfo`) says so. It pays on parallel
        hardware for long sequences of small or medium carries with contracting dynamics; on a
        CPU the scan is faster (see docs/parallel.md). Not differentiable in forward mode. Or
        the name of an exact whole-layer kernel that the cell declares in its
        :class:`~recurrent.CellSpec`. The library's cells declare three. ``"cudnn"``:
        run a plain float32 :func:`~recurrent.lstm` layer as one cuDNN call through
        ``jax.experimental.rnn`` on an NVIDIA GPU, with the same parameters and results.
        Where that does not apply (another backend or cell, regularisers in training,
        ``resets``, ``return_trace``, under ``jax.vmap``, which cuDNN cannot batch) the scan
        runs instead, with a :class:`~recurrent.FallbackWarning` that says why. ``"vjp"``:
        the plain, peephole and CIFG LSTMs (no projection, layer norm or clipping) and the
        default GRU (``reset_after=True``, no layer norm) with a
        hand-written backward pass whose weight gradients are computed outside the loop, as
        large matmuls over all steps (any backend and compute dtype; not differentiable in
        forward mode, ``jax.jvp``); same fallbacks but the GPU one. ``"native"``: the plain
        LSTM and the default GRU with float32 parameters (float32 or bfloat16 compute) on a
        CPU, as C++ kernels around oneDNN's GEMMs through XLA FFI custom calls
        (:mod:`recurrent.native`), with lengths, ``reverse``, ``carry=``, ``jit``, ``grad`` and
        ``vmap`` (a vmapped population, or both directions of :func:`bidirectional`, in one
        call); not ``jax.jvp``. Optional: ``pip install "recurrent[native]"`` brings oneDNN,
        and the kernels compile on first use; without them the scan runs, with a warning that
        says why. ``"auto"``: the fastest exact implementation for the backend, measured
        (``recurrent._kernels.AUTO``): on a CPU the cell's ``"native"`` kernel wherever it applies
        (installed and built, the cell, its options and the call covered), else the scan, without
        a warning; on GPUs and TPUs the scan. Where the native kernel runs, ``jax.jvp`` does not
        go through it: pass ``"scan"`` for forward-mode derivatives.
      method: the solver of ``implementation="parallel"`` for a cell without its own parallel
        form: ``"deer"`` (Newton's method with full Jacobians, Lim et al. 2024: few iterations,
        ``O(T D^3)`` work for a carry of ``D`` entries), ``"quasi"`` (the default: quasi-DEER,
        their diagonal, ``O(T D)`` per iteration, more iterations) or ``"elk"`` (quasi-DEER with
        a Levenberg-Marquardt trust region, computed as Kalman smoothing: Gonzalez et al. 2024;
        stable where quasi-DEER is not).
      tol: the solver stops at an iterate whose every residual ``|f_t(s_{t-1}) - s_t|`` and every
        entry of the update it would take are at most ``tol * (1 + |f_t(s_{t-1})|)``; by default
        1e-6 for float32 carries, 1e-12 for float64.
      max_iters: the most Newton iterations before the scan computes the result (default 100).
      damping: ``"elk"``'s initial damping ``lambda`` (default 1.0), then adapted per sequence.

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
    name = f"rnn({cell.name}{', reverse=True' if reverse else ''})"
    where = name
    if projection not in PROJECTIONS:
        raise _core.error(
            f"{where}: unknown `projection`.",
            expected=" or ".join(repr(p) for p in PROJECTIONS),
            got=repr(projection),
            fix='pass projection="auto" (the measured default per backend), "hoisted" or "fused".',
        )
    known = (*_kernels.IMPLEMENTATIONS, *(k for k in cell.spec.kernels if k not in _kernels.IMPLEMENTATIONS))
    if implementation not in known:
        raise _core.error(
            f"{where}: unknown `implementation`.",
            expected=" or ".join(repr(p) for p in known) + " (a name the cell declares a kernel under)",
            got=repr(implementation),
            fix='pass implementation="scan" (portable, the default), "parallel" (parallel over time), "cudnn" '
            '(plain LSTM on an NVIDIA GPU), "native" (plain LSTM and GRU on a CPU, oneDNN, when installed), '
            '"auto" (the fastest of these that applies, per backend), "vjp"'
            + "".join(f' or "{k}"' for k in known[len(_kernels.IMPLEMENTATIONS) :])
            + " (a kernel of this cell); a stack of cells declares none: stack rnn layers instead.",
        )
    own = cell.spec.kernels.get(implementation)
    newton = implementation == "parallel" and not isinstance(own, _core.SequenceKernel)
    solver = _solver_settings(implementation, newton, method, tol, max_iters, damping, where=where)
    rates = Rates(
        *(
            check_rate(n, r, where=where)
            for n, r in (
                ("input_dropout", input_dropout),
                ("recurrent_dropout", recurrent_dropout),
                ("dropconnect", dropconnect),
                ("zoneout", zoneout),
                ("zoneout_cell", zoneout if zoneout_cell is None else zoneout_cell),
            )
        )
    )
    _regularisers.check_spec(cell.spec, rates, where=where, name=cell.name)
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
        method=method,
        tol=tol,
        max_iters=max_iters,
        damping=damping,
    )
    where = f"{where}.apply"
    settings = _Settings(cell, reverse, unroll, resolve_projection(projection, remat=remat) == "hoisted", remat,
                         variational, rates, where)  # fmt: skip

    def prepare(params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False):
        seq = read_sequence(xs, cell.input_rank, lengths=lengths, resets=resets, time_major=time_major, where=where)
        return _loop(settings, params, xs, seq, carry, key, return_trace)

    diagonal = None
    if newton and solver.method != "deer":  # the cell whose forward-mode derivative is the diagonal
        diagonal = cell._replace(probe=_newton.diagonal_probe(cell.probe, cell.spec.jacobian_diagonal))

    def apply(
        params, xs, *, lengths=None, carry=None, time_major=False, key=None, resets=None, return_trace=False,
        guess=None,
    ):  # fmt: skip
        if guess is not None and not newton:
            raise _core.error(
                f"{where}: `guess` is a starting trajectory for Newton's method.",
                expected='guess=None, or a layer built with implementation="parallel" (a cell without its own '
                "parallel form)",
                got=f"implementation={implementation!r}",
                fix='drop `guess`, or build the layer with rnn(cell, implementation="parallel").',
            )
        if newton:
            seq = read_sequence(xs, cell.input_rank, lengths=lengths, resets=resets, time_major=time_major,
                                where=where)  # fmt: skip
            return _parallel(settings, solver, diagonal, params, xs, seq, carry, key, return_trace, guess)
        for kernel_name, kernel, quiet in _kernels.candidates(cell.spec, cell.name, implementation):
            out = _kernel_apply(settings, kernel_name, kernel, params, xs, lengths, carry, time_major, key, resets,
                                return_trace, quiet)  # fmt: skip
            if out is not None:
                return out
        loop = prepare(
            params, xs, lengths=lengths, carry=carry, time_major=time_major, key=key, resets=resets,
            return_trace=return_trace,
        )  # fmt: skip
        return loop.finish(*_scan.run_scan(loop.body, loop.carry, loop.inputs, reverse=reverse, unroll=unroll))

    recorded = None if cell.options is None else {"cell": cell.name, "cell_options": cell.options, **options}
    return Layer(
        init=cell.init,
        apply=apply,
        initial_carry=cell.initial_carry,
        output_shape=cell.output_shape,
        input_rank=cell.input_rank,
        name=name,
        reversed=lambda: rnn(cell, reverse=not reverse, **options),
        options=None if recorded is None else _core.Options({**recorded, "reverse": reverse}),
        loop=ScanLoop(prepare, reverse, unroll, None if recorded is None else _core.Options(recorded), implementation),
        check_inputs=lambda params, xs: _core.only_input_errors(_check_inputs, cell, params, xs),
    )


class _Settings(NamedTuple):
    """What :func:`rnn` was built with, for its parts."""

    cell: Cell
    reverse: bool
    unroll: int | bool
    hoist: bool
    remat: bool
    variational: bool
    rates: Rates
    where: str


def _solver_settings(implementation, newton, method, tol, max_iters, damping, *, where) -> _newton.Settings | None:
    """The options of Newton's method, checked: refused unless ``newton`` (a cell without its own
    parallel form under ``implementation="parallel"``)."""
    given = {k: v for k, v in (("method", method), ("tol", tol), ("max_iters", max_iters), ("damping", damping))
             if v is not None}  # fmt: skip
    if not newton:
        if not given:
            return None
        names = ", ".join(f"{k}={v!r}" for k, v in given.items())
        if implementation == "parallel":
            raise _core.error(
                f"{where}: this cell declares its own exact parallel form; {names} are options of Newton's method.",
                expected="no solver options: the cell's parallel form is exact and runs in one pass",
                got=names,
                fix="drop them; Newton's method (method=...) serves cells without a parallel form of their own.",
            )
        raise _core.error(
            f'{where}: {names} are options of implementation="parallel".',
            expected='implementation="parallel" with solver options, or no solver options',
            got=f"implementation={implementation!r} with {names}",
            fix='pass implementation="parallel", or drop the solver options.',
        )
    method = _newton.DEFAULT_METHOD if method is None else method
    if method not in _newton.METHODS:
        raise _core.error(
            f"{where}: unknown `method`.",
            expected=" or ".join(repr(m) for m in _newton.METHODS),
            got=repr(method),
            fix='pass method="quasi" (the default), "deer" (full Jacobians) or "elk" (damped).',
        )
    for name, value, example in (("tol", tol, 1e-6), ("damping", damping, 1.0)):
        if value is not None:
            _core.check_number(name, value, where=where, example=example)
    if damping is not None and method != "elk":
        raise _core.error(
            f'{where}: `damping` is the trust region of method="elk".',
            expected='damping=None, or method="elk"',
            got=f"method={method!r}, damping={damping!r}",
            fix='pass method="elk", or drop `damping`.',
        )
    max_iters = _newton.DEFAULT_MAX_ITERS if max_iters is None else max_iters
    max_iters = _core.check_positive_int("max_iters", max_iters, where=where)
    return _newton.Settings(
        method,
        None if tol is None else float(tol),
        max_iters,
        _newton.DEFAULT_DAMPING if damping is None else float(damping),
    )


def _check_inputs(cell: Cell, params: Any, xs: jax.Array) -> None:
    """The cell's input checks, on the caller's own shape (not the driver's internal one)."""
    jax.eval_shape(cell.project, params, jax.ShapeDtypeStruct(xs.shape, xs.dtype))


def _check(s: _Settings, params: Any, xs: jax.Array, seq) -> None:
    """The parameters (what ``init`` makes for these features: see :func:`~recurrent._core.check_params`)
    and the inputs, before anything reads the parameters."""
    inputs = lambda: _core.only_input_errors(_check_inputs, s.cell, params, xs)  # noqa: E731
    _core.check_params(params, s.cell.init, seq.features, where=s.where, inputs=inputs)
    _check_inputs(s.cell, params, xs)


def _start(s: _Settings, params: Any, xs: jax.Array, seq, carry: Any) -> tuple[Any, Any]:
    """``(carry, initial)`` with the batch flattened: the given carry (checked) or the initial one."""
    _check(s, params, xs, seq)
    initial = s.cell.initial_carry(params, (*seq.batch, *seq.features))
    if carry is None:
        carry = initial
    else:
        _core.check_carry(carry, initial, where=s.where)
    return seq.flat(carry), seq.flat(initial)


def _noise(s: _Settings, params: Any, xs_TB: jax.Array, carry: Any, key: jax.Array | None):
    """The regularisers for one call: ``(xs_TB, step_params, noise_at)`` with the inputs
    dropped out, the parameters after DropConnect, and ``noise_at(t, carry)`` the step's
    :class:`~recurrent.StepNoise` (None when nothing is on)."""
    spec, rates = s.cell.spec, s.rates
    step_params, recurrent, k_step = params, None, None
    if key is not None:
        k_in, k_rec, k_dc, k_step, key = jax.random.split(key, 5)
        if not _regularisers.is_off(rates.input_dropout):
            xs_TB = _regularisers.input_dropout(k_in, rates.input_dropout, xs_TB, s.variational)
        if not _regularisers.is_off(rates.recurrent_dropout):
            recurrent = _regularisers.recurrent_masks(k_rec, rates.recurrent_dropout, spec, carry)
        if not _regularisers.is_off(rates.dropconnect):
            step_params = _regularisers.drop_connect(k_dc, rates.dropconnect, spec, params)

    def noise_at(t, carry):
        zone = None
        if rates.zoning:
            zone = _regularisers.zoneout_values(spec, rates, carry, None if key is None else jax.random.fold_in(key, t))
        step_key = None if k_step is None else jax.random.fold_in(k_step, t)
        if recurrent is None and zone is None and step_key is None:
            return None
        return _core.StepNoise(recurrent, zone, step_key)

    return xs_TB, step_params, noise_at


def _loop(s: _Settings, params: Any, xs: jax.Array, seq, carry: Any, key, return_trace: bool) -> Loop:
    """Everything of ``apply`` but the scan (see :class:`~recurrent._core.Loop`)."""
    carry, initial = _start(s, params, xs, seq, carry)
    xs_TB, step_params, noise_at = _noise(s, params, seq.time_first(xs), carry, key)
    xp_TB = s.cell.project(params, xs_TB) if s.hoist else xs_TB
    body = _scan.cell_body(s.cell, params, step_params, not s.hoist, noise_at)
    if seq.resets is not None:
        body = _scan.with_resets(body, seq.resets_TB(s.reverse), initial)
    if seq.lengths is not None:
        body = _scan.with_lengths(body, seq.lengths_B)
    # bfloat16 on CPU: float32 copies of the carry through the loop (see _scan.scan_body)
    compute = s.cell.spec.compute_dtype
    narrow = jax.default_backend() == "cpu" and (
        any(_core.narrow_float(a.dtype) for a in jax.tree.leaves(carry))
        or (compute is not None and _core.narrow_float(compute))
    )
    body, carry_in, carry_out, unpack = _scan.scan_body(body, trace=return_trace, remat=s.remat, narrow=narrow)

    def finish(carry, out):
        carry, out = seq.unflat(carry_out(carry)), unpack(out)
        if not return_trace:
            return carry, seq.from_time_first(out)
        ys, carries, gates = jax.tree.map(seq.from_time_first, out)
        return carry, ys, Trace(carries, gates)

    return Loop(carry_in(carry), body, (jnp.arange(seq.T), xp_TB), finish)


def _parallel(s: _Settings, solver, diagonal, params, xs, seq, carry, key, return_trace, guess):
    """``apply`` by Newton's method over the driver's own loop body (:mod:`recurrent._newton`);
    ``diagonal``: the cell whose forward-mode derivative is the diagonal (quasi, elk)."""
    loop = _loop(s, params, xs, seq, carry, key, return_trace)
    diag_loop = (
        None if diagonal is None else _loop(s._replace(cell=diagonal), params, xs, seq, carry, key, return_trace)
    )
    guess = None if guess is None else _guess(s, guess, seq, loop.carry)
    carry, out, info = _newton.solve(loop, diag_loop, solver, reverse=s.reverse, guess=guess, where=s.where)
    result = loop.finish(carry, out)
    if return_trace:
        carry, ys, trace = result
        return carry, ys, trace._replace(solver=info)
    return result


def _guess(s: _Settings, guess, seq, like) -> Any:
    """A user's starting trajectory (laid out as ``Trace.carries``) as ``(T, B, ...)`` leaves of the
    loop carry's dtypes."""
    fix = "pass the `carries` of a Trace that this layer returned for inputs of the same shape."
    if jax.tree.structure(guess) != jax.tree.structure(like):
        raise _core.error(
            f"{s.where}: `guess` has the wrong structure.",
            expected=f"{jax.tree.structure(like)}, the carry's, each leaf with a time axis",
            got=str(jax.tree.structure(guess)),
            fix=fix,
        )
    out = []
    for path_leaf, ref in zip(jax.tree_util.tree_flatten_with_path(guess)[0], jax.tree.leaves(like)):
        path, leaf = path_leaf
        state = tuple(ref.shape[1:])
        expected = (seq.T, *seq.batch, *state) if seq.time_major else (*seq.batch, seq.T, *state)
        if tuple(np.shape(leaf)) != expected:
            raise _core.error(
                f"{s.where}: guess{jax.tree_util.keystr(path)} has the wrong shape.",
                expected=f"{expected} (the layout of ys, with the carry's state shape)",
                got=str(tuple(np.shape(leaf))),
                fix=fix,
            )
        leaf = jnp.asarray(leaf)
        leaf = leaf if seq.time_major else jnp.moveaxis(leaf, len(seq.batch), 0)
        out.append(leaf.reshape((seq.T, seq.B, *state)).astype(ref.dtype))
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _kernel_apply(
    s: _Settings, implementation, kernel, params, xs, lengths, carry, time_major, key, resets, trace, quiet=False
):
    """``apply`` through the cell's declared kernel, or ``None`` after a :class:`FallbackWarning`
    where it does not apply (``None`` without one where ``quiet``: ``implementation="auto"``)."""
    rates = s.rates
    seq = read_sequence(xs, s.cell.input_rank, lengths=lengths, time_major=time_major, where=s.where)
    _check(s, params, xs, seq)  # before the parameters are read
    reason = (
        (kernel if isinstance(kernel, str) else None)
        or ("zoneout is on" if rates.zoning else None)
        or ("dropout is on in training (a `key` was given)" if key is not None and rates.dropping else None)
        or ("`resets` were given" if resets is not None else None)
        or ("`return_trace=True`" if trace else None)
        or ("remat=True (this backward pass stores every step's gates)" if s.remat and not kernel.remat else None)
        or kernel.reason(params, xs)
    )
    if reason is not None:
        if not quiet:
            _kernels.warn(reason, implementation)
        return None
    carry, _ = _start(s, params, xs, seq, carry)
    xs_BT, lengths_B = seq.batch_first(xs), seq.lengths_B
    if s.reverse:
        xs_BT = reverse_sequences(xs_BT, lengths_B, 1)
    try:
        carry, ys = kernel.apply(params, xs_BT, lengths_B, carry, hoist=s.hoist, unroll=s.unroll)
    except NotImplementedError as e:  # no batching rule: under jax.vmap
        if kernel.batchable:
            raise
        if quiet:
            return None
        _kernels.warn(f"JAX cannot run the cuDNN call here ({e}); cuDNN has no batching rule for jax.vmap",
                      implementation)  # fmt: skip
        return None
    if s.reverse:
        ys = reverse_sequences(ys, lengths_B, 1)
    return seq.unflat(carry), seq.from_batch_first(ys)


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
