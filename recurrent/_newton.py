r"""A nonlinear recurrence evaluated in parallel over time: Newton's method on the whole trajectory,
behind ``rnn(cell, implementation="parallel", method=...)``.

The trajectory :math:`s_1, \dots, s_T` of a layer is the solution of the :math:`T` equations
:math:`s_t = f_t(s_{t-1})`, where :math:`f_t` is the driver's own loop body at step :math:`t`
(the cell's step with its lengths, resets, regularisers and dtype handling) and :math:`s_0` the
starting carry. Each iteration evaluates :math:`f_t` and its derivative :math:`J_t` at every step
at once (``jax.vmap`` over time) and solves the linear recurrence of the update,

.. math::

    \delta_t = A_t \delta_{t-1} + r_t, \qquad r_t = f_t(s_{t-1}) - s_t, \qquad
    s_t \leftarrow f_t(s_{t-1}) + A_t \delta_{t-1},

with ``lax.associative_scan`` in :math:`O(\log T)` depth. The methods differ in :math:`A_t`:

- ``"deer"``: :math:`A_t = J_t`, the full :math:`D \times D` Jacobian of the carry (``D`` entries
  per sequence): Newton's method (DEER, Lim et al. 2024). :math:`O(T D^3)` work, :math:`O(T D^2)`
  memory; quadratic convergence.
- ``"quasi"``: :math:`A_t = \operatorname{diag}(J_t)` (quasi-DEER, Gonzalez et al. 2024, Section 3):
  :math:`O(T D)` memory and elementwise scans; linear convergence. A cell may declare the diagonal
  (:attr:`~recurrent.CellSpec.jacobian_diagonal`: the LSTM and GRU do), else it costs one
  forward-mode derivative per carry entry.
- ``"elk"``: quasi-DEER with a trust region (quasi-ELK, Gonzalez et al. 2024, Section 4): the
  Levenberg-Marquardt step :math:`\min_\delta \sum_t \|r_t + A_t\delta_{t-1} - \delta_t\|^2 +
  \lambda \|\delta_t\|^2`, which is the posterior mean of a linear-Gaussian state-space model with
  dynamics :math:`\delta_t = A_t \delta_{t-1} + r_t + w_t`, :math:`w_t \sim N(0, I)`, and
  observations :math:`0 = \delta_t + v_t`, :math:`v_t \sim N(0, I/\lambda)`: a Kalman smoother, one
  scalar smoother per carry entry for a diagonal :math:`A_t`. Its filter is the damped recurrence
  :math:`\delta_t = (1 - K_t)(A_t \delta_{t-1} + r_t)` with the Kalman gain :math:`K_t \in [0, 1)`
  (for :math:`\lambda \to 0`, quasi-DEER); the gains' Riccati recursion is a Moebius map, so it
  and the Rauch-Tung-Striebel pass are associative scans too. Where the linearisation expands, the
  gains grow and the update shrinks: the iterates stay finite where quasi-DEER's overflow.
  :math:`\lambda` adapts per sequence in the manner of Levenberg-Marquardt (Marquardt 1963): halved
  where :math:`\sum_t \|r_t\|^2` fell since the last iterate, doubled where it did not, within
  ``[1e-6, 1e6]`` (the paper keeps it fixed; steps are never rejected, as a quasi-Newton step need
  not lower the residuals on its way).

Iterations stop at an iterate whose residuals :math:`|r_t|` and whose update are all within
``tol`` :math:`\cdot (1 + |f_t(s_{t-1})|)`, or after ``max_iters`` updates. In exact arithmetic DEER
and quasi-DEER end in at most :math:`T` iterations (after :math:`k` iterations the first :math:`k`
steps are exact); the update above keeps that in floating point. Where the iterations do not
converge (or leave the finite numbers) the sequential scan computes the answer inside the same
program, so it is never wrong: :class:`SolverInfo` says so. Where the dynamics amplify small
perturbations (chaos), a trajectory right to ``tol`` at every step may still drift from the scan's,
as the scan's own does under rounding differences; DEER's update, an estimate of the error with the
full Jacobian, sees that, the diagonal methods' does not.

Gradients are those of the fixed point (implicit differentiation, ``jax.custom_vjp``): the
cotangent :math:`\lambda` of the trajectory solves the adjoint recurrence
:math:`\lambda_t = g_t + J_{t+1}^\top \lambda_{t+1}` backwards in time, in parallel: one reverse
associative scan of the transposed Jacobians for ``"deer"``, and for ``"quasi"`` and ``"elk"``
iterative refinement with the diagonal as preconditioner (each iteration one vector-Jacobian
product of the step at all :math:`t` and one diagonal scan; exact after at most :math:`T`). The
parameter and input gradients are then one vector-Jacobian product of the step at all steps. Where
the adjoint does not converge, a sequential reverse scan of vector-Jacobian products computes it.

Assumptions: the batch rows of a step are independent (as every cell of the library: a cell is
written for one example), and the carry is floating point. Forward-mode differentiation
(``jax.jvp``) is not supported (a ``custom_vjp``), nor are second derivatives.

References:
  Lim, Zhu, Selfridge, Kasim. "Parallelizing non-linear sequential models over the sequence length."
  ICLR 2024. Gonzalez, Warrington, Smith, Linderman. "Towards scalable and stable parallelization of
  nonlinear RNNs." NeurIPS 2024. Saerkkae, Garcia-Fernandez. "Temporal parallelization of Bayesian
  smoothers." IEEE TAC 2021.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent import _core, _scan

#: The solvers of ``rnn(..., implementation="parallel", method=...)``.
METHODS = ("deer", "quasi", "elk")
#: What ``method`` is when a cell without its own parallel kernel is given none.
DEFAULT_METHOD = "quasi"
DEFAULT_MAX_ITERS = 100
DEFAULT_DAMPING = 1.0
# ELK's damping where the residuals fell and where they did not, and its range.
_DOWN, _UP = 0.5, 2.0
_DAMPING_RANGE = (1e-6, 1e6)


def default_tol(dtype: Any) -> float:
    """``tol`` when none is given: 1e-6 for float32 (and narrower) carries, 1e-12 for float64."""
    return 1e-12 if jnp.dtype(dtype).itemsize >= 8 else 1e-6


class Settings(NamedTuple):
    """The solver options of an ``rnn`` layer (``tol=None``: :func:`default_tol` of the carry)."""

    method: str
    tol: float | None
    max_iters: int
    damping: float


class SolverInfo(NamedTuple):
    """What ``rnn(..., implementation="parallel")`` did, in ``Trace.solver`` of
    ``apply(..., return_trace=True)`` (arrays with the batch axes of any ``jax.vmap`` around the
    call; one value for the whole batch otherwise).

    Attributes:
      iterations: the updates taken (int32): 0 where the guess already solves the recurrence,
        ``max_iters`` where the iterations did not converge.
      converged: whether an iterate's residual and its update fell within ``tol`` after at most
        ``max_iters`` updates.
      fell_back: whether the sequential scan computed the result (not converged, or non-finite).
      residual: the largest scaled residual ``|f_t(s_{t-1}) - s_t| / (1 + |f_t(s_{t-1})|)`` of
        the solver's last iterate.
    """

    iterations: jax.Array
    converged: jax.Array
    fell_back: jax.Array
    residual: jax.Array


# --------------------------------------------------------------------------------------
# The carry of one batch row as a vector.


class _Flat:
    """Flattens a carry tree whose leaves are ``(*lead, *shape)`` into ``(*lead, D)`` vectors of one
    floating dtype and back (to each leaf's dtype)."""

    def __init__(self, tree: Any, lead: int, *, where: str):
        leaves, self.treedef = jax.tree.flatten(tree)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise _core.error(
                    f'{where}: implementation="parallel" needs a floating-point carry.',
                    expected="float leaves (Newton's method differentiates the step by its carry)",
                    got=f"carry{jax.tree_util.keystr(path)} of dtype {leaf.dtype}",
                    fix='use implementation="scan" for this cell.',
                )
        self.shapes = [tuple(leaf.shape[lead:]) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.D = sum(self.sizes)
        self.dtype = jnp.result_type(jnp.float32, *self.dtypes)

    def flatten(self, tree: Any) -> jax.Array:
        leaves = jax.tree.leaves(tree)
        parts = []
        for leaf, shape, size in zip(leaves, self.shapes, self.sizes):
            lead = leaf.shape[: leaf.ndim - len(shape)]
            parts.append(leaf.reshape((*lead, size)).astype(self.dtype))
        return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def unflatten(self, v: jax.Array) -> Any:
        lead, out, start = v.shape[:-1], [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes):
            out.append(v[..., start : start + size].reshape((*lead, *shape)).astype(dtype))
            start += size
        return self.treedef.unflatten(out)


# --------------------------------------------------------------------------------------
# Linear recurrences over axis 0 by associative scans.

_HIGHEST = lax.Precision.HIGHEST  # the Jacobian products: no reduced-precision matmuls on GPU/TPU


def _combine(first, second, full: bool):
    a1, b1 = first
    a2, b2 = second
    if full:
        return (
            jnp.matmul(a2, a1, precision=_HIGHEST),
            jnp.einsum("...ij,...j->...i", a2, b1, precision=_HIGHEST) + b2,
        )
    return a2 * a1, a2 * b1 + b2


def linear_recurrence(a: jax.Array, b: jax.Array, *, full: bool = False, reverse: bool = False) -> jax.Array:
    """``x`` with ``x_t = a_t x_{t-1} + b_t`` from ``x_{-1} = 0`` over axis 0 (``x_t = a_t x_{t+1}
    + b_t`` from the end with ``reverse``); ``a`` elementwise ``(T, ..., D)``, or matrices ``(T, ...,
    D, D)`` with ``full``."""
    if reverse:
        return jnp.flip(linear_recurrence(jnp.flip(a, 0), jnp.flip(b, 0), full=full), 0)
    return lax.associative_scan(functools.partial(_combine, full=full), (a, b), axis=0)[1]


def _apply(a: jax.Array, x: jax.Array, full: bool) -> jax.Array:
    return jnp.einsum("...ij,...j->...i", a, x, precision=_HIGHEST) if full else a * x


def _shift(x: jax.Array, *, back: bool = False) -> jax.Array:
    """``x_{t-1}`` at ``t`` (zero at 0), or ``x_{t+1}`` at ``t`` (zero at the end) with ``back``."""
    zero = jnp.zeros_like(x[:1])
    return jnp.concatenate([x[1:], zero]) if back else jnp.concatenate([zero, x[:-1]])


def _moebius(first, second):
    """The composition ``second o first`` of Moebius maps ``P -> (p P + q) / (r P + s)`` of
    non-negative coefficients, normalised (a map is unchanged by scaling its coefficients)."""
    p1, q1, r1, s1 = first
    p2, q2, r2, s2 = second
    out = (p2 * p1 + q2 * r1, p2 * q1 + q2 * s1, r2 * p1 + s2 * r1, r2 * q1 + s2 * s1)
    norm = functools.reduce(jnp.maximum, out)
    return tuple(m / norm for m in out)


def kalman_step(a: jax.Array, r: jax.Array, damping: jax.Array) -> jax.Array:
    r"""The quasi-ELK step: the smoothed mean of ``delta_t = a_t delta_{t-1} + r_t + w_t``,
    ``w_t ~ N(0, 1)``, observed as ``0 = delta_t + v_t``, ``v_t ~ N(0, 1 / damping)``, from the
    known ``delta_{-1} = 0``, elementwise (one scalar smoother per entry), over axis 0.

    Filter: :math:`P^-_t = a_t^2 P_{t-1} + 1`, :math:`K_t = \lambda P^-_t / (\lambda P^-_t + 1)`,
    :math:`P_t = P^-_t / (\lambda P^-_t + 1)` (a Moebius map of :math:`P_{t-1}`, composed by an
    associative scan) and :math:`m_t = (1 - K_t)(a_t m_{t-1} + r_t)`; smoother (Rauch-Tung-Striebel):
    :math:`\hat m_t = m_t + G_t (\hat m_{t+1} - a_{t+1} m_t - r_{t+1})` with
    :math:`G_t = P_t a_{t+1} / P^-_{t+1}`, a reverse linear recurrence."""
    a2 = a * a
    one = jnp.ones_like(a)
    maps = (a2, one, damping * a2, damping * one + one)
    p, q, _, s = lax.associative_scan(_moebius, maps, axis=0)
    filtered_var = q / s  # P_t, from P_{-1} = 0
    prior_var = a2 * _shift(filtered_var) + 1.0
    keep = 1.0 / (damping * prior_var + 1.0)  # 1 - K_t
    filtered = linear_recurrence(keep * a, keep * r)
    a_next, r_next = _shift(a, back=True), _shift(r, back=True)
    prior_next = jnp.concatenate([prior_var[1:], jnp.ones_like(prior_var[:1])])
    gain = filtered_var * a_next / prior_next  # G_t; zero at the end (a_next = 0 there)
    return linear_recurrence(gain, filtered - gain * (a_next * filtered + r_next), reverse=True)


# --------------------------------------------------------------------------------------
# The diagonal of the step's derivative, through the cell's probe.


def diagonal_probe(probe, declared):
    """``probe`` whose forward-mode derivative by the carry is the diagonal of the true one
    (``declared(params, carry, xp, noise)``, or one forward-mode derivative per carry entry where
    that is ``None``); values unchanged. The driver's loop body built on it has, in forward mode,
    the diagonal of the body's derivative: the body's wrappers (lengths, resets, casts) act
    elementwise on the carry."""

    @jax.custom_jvp
    def diag(params, carry, xp, noise):
        return probe(params, carry, xp, noise)

    @diag.defjvp
    def diag_jvp(primals, tangents):
        params, carry, xp, noise = primals
        out = probe(params, carry, xp, noise)
        d = None if declared is None else declared(params, carry, xp, noise)
        if d is None:
            d = generic_diagonal(probe, params, carry, xp, noise)
        dcarry = jax.tree.map(lambda g, t, o: (g * t).astype(o.dtype), d, tangents[1], out[0])
        zeros = jax.tree.map(jnp.zeros_like, out[1:])
        return out, (dcarry, *zeros)

    return lambda params, carry, xp, noise=None: diag(params, carry, xp, noise)


def generic_diagonal(probe, params, carry, xp, noise):
    """The diagonal of the derivative of ``probe``'s new carry by ``carry`` (leaves ``(B, ...)``):
    one forward-mode derivative per carry entry of a row, all rows at once."""
    flat = _Flat(carry, 1, where="recurrent.rnn")
    c = flat.flatten(carry)
    _, lin = jax.linearize(lambda v: flat.flatten(probe(params, flat.unflatten(v), xp, noise)[0]), c)
    eye = jnp.eye(flat.D, dtype=c.dtype)
    d = jax.vmap(lambda j, e: lin(jnp.broadcast_to(e, c.shape))[..., j])(jnp.arange(flat.D), eye)
    return flat.unflatten(jnp.moveaxis(d, 0, -1))


# --------------------------------------------------------------------------------------
# The solver.


class _Problem(NamedTuple):
    """The flat step functions (closure-converted: their differentiable constants are explicit)."""

    step: Any  # step(prev_BD, inputs_t, *consts) -> (new_BD, out)
    diag_step: Any  # the same on the diagonal probe (quasi, elk), or None
    round: Any  # round(v): v as the carry holds it (16-bit leaves rounded)
    settings: Settings
    tol: float
    reverse: bool


def solve(loop: _core.Loop, diag_loop: _core.Loop | None, settings: Settings, *, reverse: bool, guess: Any, where: str):
    """``(carry, out, info)`` of the driver's ``loop`` (as ``run_scan`` would give them, and a
    :class:`SolverInfo`) by Newton's method; ``diag_loop``: the loop on :func:`diagonal_probe`."""
    inputs = loop.inputs
    T = jax.tree.leaves(inputs)[0].shape[0]
    if T == 0:
        carry, out = _scan.run_scan(loop.body, loop.carry, inputs, reverse=reverse)
        return carry, out, SolverInfo(jnp.int32(0), jnp.bool_(True), jnp.bool_(False), jnp.float32(0))
    flat = _Flat(loop.carry, 1, where=where)
    s0 = flat.flatten(loop.carry)
    first = jax.tree.map(lambda a: a[0], inputs)

    def flat_step(body):
        def step(prev, x):
            new, out = body(flat.unflatten(prev), x)
            return flat.flatten(new), out

        return _closure_convert(step, s0, first)

    step, consts = flat_step(loop.body)
    diag_step, diag_consts = flat_step(diag_loop.body) if diag_loop is not None else (None, [])
    S0 = jnp.broadcast_to(s0, (T, *s0.shape)) if guess is None else flat.flatten(guess)
    tol = settings.tol if settings.tol is not None else default_tol(flat.dtype)
    narrow = any(jnp.dtype(d) != flat.dtype for d in flat.dtypes)
    round_ = (lambda v: flat.flatten(flat.unflatten(v))) if narrow else (lambda v: v)
    problem = _Problem(step, diag_step, round_, settings, float(tol), reverse)
    C, out, info = _trajectory(problem, s0, inputs, S0, tuple(consts), tuple(diag_consts))
    return flat.unflatten(C[0 if reverse else -1]), out, info


def _closure_convert(fn, *example):
    """``(converted, consts)``: ``converted(*args, *consts) == fn(*args)`` with every value ``fn``
    closes over (the parameters, the lengths, the keys, ...) an explicit argument, so that the
    custom derivative sees them and its backward pass, traced later, holds none of the forward
    trace's values (``jax.closure_convert`` hoists only the differentiable ones)."""
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*example)
    out_tree, n = jax.tree.structure(shapes), len(example)

    def converted(*args):
        out = jax.core.eval_jaxpr(closed.jaxpr, args[n:], *jax.tree.leaves(args[:n]))
        return jax.tree.unflatten(out_tree, out)

    return converted, list(closed.consts)


def _forward_order(x: Any, reverse: bool) -> Any:
    """Time in processing order (a reversed layer processes from the end); also for cotangents
    (``float0`` leaves, all zero, stay as they are)."""
    if not reverse:
        return x
    return jax.tree.map(lambda a: a if a.dtype == jax.dtypes.float0 else jnp.flip(a, 0), x)


def _evaluate(step, prev, inputs, consts):
    """``(new, out)`` of the step at every time step at once."""
    return jax.vmap(lambda p, x: step(p, x, *consts))(prev, inputs)


def _linearise(pb: _Problem, S, s0, inputs, consts, diag_consts):
    """``(f, a)`` at the iterate ``S`` (processing order): the step's new carries and the matrix of
    the update's recurrence (the Jacobians, or their diagonals)."""
    prev = jnp.concatenate([s0[None], S[:-1]])
    if pb.settings.method == "deer":
        f, lin = jax.linearize(lambda p: _evaluate(pb.step, p, inputs, consts)[0], prev)
        D = S.shape[-1]
        J = jax.vmap(lambda e: lin(jnp.broadcast_to(e, prev.shape)), out_axes=-1)(jnp.eye(D, dtype=S.dtype))
        return f, J
    return jax.jvp(lambda p: _evaluate(pb.diag_step, p, inputs, diag_consts)[0], (prev,), (jnp.ones_like(prev),))


def _scaled(d, ref):
    """The largest ``|d| / (1 + |ref|)`` (0 for no entries): a residual or a change, relative to the
    state's size above 1."""
    return jnp.max(jnp.abs(d) / (1.0 + jnp.abs(ref)), initial=0.0)


def _finite(x):
    return jnp.all(jnp.isfinite(x))


def _newton(pb: _Problem, s0, inputs, S, consts, diag_consts):
    """The iterations from the guess ``S``: ``(S, steps, converged)`` with ``S`` in processing order.

    Each iteration linearises the step at the iterate and takes the update; the iterate has
    converged when both its residual and the update it would take are within ``tol`` (with full
    Jacobians the update estimates the iterate's error, which a small residual alone does not
    where the dynamics amplify it). ``"elk"`` adapts its damping per sequence first: halved where
    the sum of squared residuals fell since the last iterate, doubled where it did not."""
    full = pb.settings.method == "deer"
    elk = pb.settings.method == "elk"
    B = S.shape[1]
    damping = jnp.full((B,), pb.settings.damping, S.dtype)
    state = (jnp.int32(0), S, jnp.bool_(False), damping, jnp.full((B,), jnp.inf, S.dtype))

    def cond(state):
        steps, S, done, _, _ = state
        return ~done & (steps < pb.settings.max_iters) & _finite(S)

    def body(state):
        steps, S, _, damping, merit = state
        f, a = _linearise(pb, S, s0, inputs, consts, diag_consts)
        r = f - S
        if elk:
            new_merit = jnp.sum(jnp.square(r), axis=(0, 2))
            damping = jnp.clip(jnp.where(new_merit < merit, damping * _DOWN, damping * _UP), *_DAMPING_RANGE)
            merit = new_merit
            S_new = S + kalman_step(a, r, damping[None, :, None])
        else:
            S_new = f + _apply(a, _shift(linear_recurrence(a, r, full=full)), full)
        S_new = pb.round(S_new)
        done = (_scaled(r, f) <= pb.tol) & (_scaled(S_new - S, S_new) <= pb.tol) & _finite(r)
        return steps + jnp.where(done, 0, 1), jnp.where(done, S, S_new), done, damping, merit

    steps, S, done, _, _ = lax.while_loop(cond, body, state)
    return S, steps, done


def _only_if(need: jax.Array, compute, default):
    """``compute()`` where ``need``, else ``default``: a loop of at most one iteration, which runs
    nothing where nothing needs it, also under ``jax.vmap`` (where ``lax.cond`` would run both)."""

    def body(state):
        _, _ = state
        return jnp.bool_(False), compute()

    return lax.while_loop(lambda state: state[0], body, (need, default))[1]


def _forward(pb: _Problem, s0, inputs, guess, consts, diag_consts):
    """``(C, out, info)``: the carries after each step (input order) and the stacked outputs."""
    inputs_f = _forward_order(inputs, pb.reverse)
    S, k, converged = _newton(pb, s0, inputs_f, _forward_order(guess, pb.reverse), consts, diag_consts)
    prev = jnp.concatenate([s0[None], S[:-1]])
    C, out = _evaluate(pb.step, prev, inputs_f, consts)
    residual = _scaled(C - S, C)
    converged = converged & _finite(C)
    C, out = _forward_order((C, out), pb.reverse)

    def sequential():
        last, outs = _scan.run_scan(lambda c, x: _carry_and_out(pb.step(c, x, *consts)), s0, inputs,
                                    reverse=pb.reverse)  # fmt: skip
        del last
        return outs

    C, out = _only_if(~converged, sequential, (C, out))
    info = SolverInfo(k, converged, ~converged, residual)
    return C, out, info


def _carry_and_out(step_result):
    new, out = step_result
    return new, (new, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _trajectory(pb: _Problem, s0, inputs, guess, consts, diag_consts):
    return _forward(pb, s0, inputs, guess, consts, diag_consts)


def _trajectory_fwd(pb, s0, inputs, guess, consts, diag_consts):
    C, out, info = _forward(pb, s0, inputs, guess, consts, diag_consts)
    return (C, out, info), (C, s0, inputs, consts, diag_consts)


def _trajectory_bwd(pb, residuals, cotangents):
    C, s0, inputs, consts, diag_consts = residuals
    C_bar, out_bar, _ = cotangents
    inputs_f, C_f = _forward_order(inputs, pb.reverse), _forward_order(C, pb.reverse)
    C_bar_f, out_bar_f = _forward_order((C_bar, out_bar), pb.reverse)
    prev = jnp.concatenate([s0[None], C_f[:-1]])
    _, vjp = jax.vjp(lambda p, c, x: _evaluate(pb.step, p, x, c), prev, consts, inputs_f)
    zero_out = jax.tree.map(jnp.zeros_like, out_bar_f)
    zero_carry = jnp.zeros_like(C_f)

    def transpose(v):  # J_t^T v_t at every t, as the cotangent of s_{t-1}
        return vjp((v, zero_out))[0]

    g = _shift(vjp((zero_carry, out_bar_f))[0], back=True) + C_bar_f  # the cotangent of each s_t
    lam = _adjoint(pb, g, transpose, prev, inputs_f, consts, diag_consts)
    prev_bar, consts_bar, inputs_bar = vjp((lam, out_bar_f))
    inputs_bar = _forward_order(inputs_bar, pb.reverse)
    zeros = lambda tree: jax.tree.map(_zero_cotangent, tree)  # noqa: E731
    return prev_bar[0], inputs_bar, zeros(C), consts_bar, zeros(diag_consts)


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _adjoint(pb: _Problem, g, transpose, prev, inputs_f, consts, diag_consts):
    """``lam`` with ``lam_t = g_t + J_{t+1}^T lam_{t+1}`` (processing order): iterative refinement
    of the residual with the full Jacobians (``"deer"``: exact in one iteration) or their diagonal
    as the preconditioner; a sequential reverse scan where it does not converge."""
    full = pb.settings.method == "deer"
    if full:
        _, lin = jax.linearize(lambda p: _evaluate(pb.step, p, inputs_f, consts)[0], prev)
        eye = jnp.eye(prev.shape[-1], dtype=prev.dtype)
        J = jax.vmap(lambda e: lin(jnp.broadcast_to(e, prev.shape)), out_axes=-1)(eye)
        a = jnp.swapaxes(_shift(J, back=True), -1, -2)  # J_{t+1}^T at t
    else:
        _, d = jax.jvp(lambda p: _evaluate(pb.diag_step, p, inputs_f, diag_consts)[0], (prev,),
                       (jnp.ones_like(prev),))  # fmt: skip
        a = _shift(d, back=True)
    scale = jnp.max(jnp.abs(g), initial=0.0)

    def residual(lam):
        return g + _shift(transpose(lam), back=True) - lam

    def cond(state):
        k, lam, res = state
        size = jnp.max(jnp.abs(res), initial=0.0)
        bound = pb.tol * (scale + jnp.max(jnp.abs(lam), initial=0.0))
        return (k < pb.settings.max_iters) & (size > bound) & _finite(res)

    def body(state):
        k, lam, res = state
        lam = lam + linear_recurrence(a, res, full=full, reverse=True)
        return k + 1, lam, residual(lam)

    lam0 = jnp.zeros_like(g)
    k, lam, res = lax.while_loop(cond, body, (jnp.int32(0), lam0, g))
    size = jnp.max(jnp.abs(res), initial=0.0)
    ok = (size <= pb.tol * (scale + jnp.max(jnp.abs(lam), initial=0.0))) & _finite(res)

    def sequential():
        def back(next_lam_and_q, x):  # from the end: lam_t = g_t + J_{t+1}^T lam_{t+1}
            q_next = next_lam_and_q
            g_t, p_t, x_t = x
            lam_t = g_t + q_next
            _, vjp_t = jax.vjp(lambda p: pb.step(p, x_t, *consts)[0], p_t)
            return vjp_t(lam_t)[0], lam_t

        _, lams = _scan.run_scan(back, jnp.zeros_like(g[0]), (g, prev, inputs_f), reverse=True)
        return lams

    return _only_if(~ok, sequential, lam)


_trajectory.defvjp(_trajectory_fwd, _trajectory_bwd)
