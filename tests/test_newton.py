"""``rnn(cell, implementation="parallel", method=...)``: Newton's method over the driver's loop body
(DEER, quasi-DEER, quasi-ELK) against the sequential scan, in values and gradients.

The parallel solver is checked on itself: ``_newton._only_if`` (where the sequential scan takes
over, forwards or in the adjoint) is replaced by NaN in the equality tests, so a silent fall-back
would fail them. The fall-back has its own tests, on cells that do not converge on purpose.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import recurrent
from recurrent import _newton
from tests import test_battery as battery
from tests.fast_compiles import optimisations_off
from tests.test_own_cell import janet

METHODS = ("deer", "quasi", "elk")
T, F, H = 7, 2, 3
LENGTHS = np.array([T, 3], np.int32)
_normal = jax.nn.initializers.normal(0.5)
CELLS = {
    "lstm": lambda **kw: recurrent.lstm(H, **kw),
    "peephole_lstm": lambda **kw: recurrent.peephole_lstm(H, peephole_init=_normal, **kw),
    "cifg_lstm": lambda **kw: recurrent.cifg_lstm(H, **kw),
    "lstm_layer_norm": lambda **kw: recurrent.lstm(H, layer_norm=True, **kw),
    "gru": lambda **kw: recurrent.gru(H, bias_init=_normal, **kw),
    "janet": lambda **kw: janet(H, **kw),  # a user's cell: the public API alone, no declared diagonal
}


@pytest.fixture(autouse=True)
def _fast_compiles():
    """Many small programs: XLA's optimisation passes would take most of the time (results are
    compared with tolerances)."""
    with optimisations_off():
        yield


@pytest.fixture
def no_fallback(monkeypatch):
    """Where the sequential scan would take over (forwards or in the adjoint), NaN instead."""

    def poisoned(need, compute, default):
        return jax.tree.map(lambda d: jnp.where(need, jnp.nan, d) if jnp.issubdtype(d.dtype, jnp.inexact) else d,
                            default)  # fmt: skip

    monkeypatch.setattr(_newton, "_only_if", poisoned)


def close(actual, expected, atol):
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=atol)


def data(seed=0, batch=(2,), T=T, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(*batch, T, F)).astype(dtype)


def loss_and_grads(layers, grads_of):
    """One jitted program: every layer's ``(carry, ys, trace)`` from a starting carry (``carry=``)
    with lengths, and the gradients of a loss of every output and carry leaf with respect to the
    parameters, the inputs and the starting carry for the layers ``grads_of`` names."""
    weights = np.random.default_rng(9).normal(size=(2, T, H)).astype(np.float32)

    def loss(layer, params, xs, carry):
        carry, ys = layer.apply(params, xs, lengths=LENGTHS, carry=carry)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry))

    @jax.jit
    def run(params, xs, carry):
        outs = {
            k: layer.apply(params, xs, lengths=LENGTHS, carry=carry, return_trace=True) for k, layer in layers.items()
        }
        grads = {k: jax.grad(loss, argnums=(1, 2, 3))(layers[k], params, xs, carry) for k in grads_of}
        return outs, grads

    return run


def start(layer, params):
    """A starting carry other than the initial one (``carry=``)."""
    initial = layer.initial_carry(params, (2, F))
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda a: (a + 0.3 * rng.normal(size=a.shape)).astype(a.dtype), initial)


# --------------------------------------------------------------------------------------
# Equality with the scan


@pytest.mark.parametrize("name", CELLS)
def test_matches_the_scan_in_values_and_gradients(name, no_fallback):
    """Every method's values, and one method's gradients per cell (each method on two cells)."""
    i = list(CELLS).index(name)
    reverse = i % 2 == 1  # backwards in time over each valid prefix
    cell = CELLS[name]()
    layers = {"scan": recurrent.rnn(cell, reverse=reverse)}
    layers |= {m: recurrent.rnn(cell, reverse=reverse, implementation="parallel", method=m) for m in METHODS}
    graded = METHODS[i % 3]
    params = layers["scan"].init(jax.random.key(i), (F,))
    outs, grads = loss_and_grads(layers, ("scan", graded))(params, data(i), start(layers["scan"], params))
    expected = outs["scan"][:2]
    for method in METHODS:
        c, ys, trace = outs[method]
        close((c, ys), expected, 1e-5)
        assert bool(trace.solver.converged) and not bool(trace.solver.fell_back), method
        assert 1 <= int(trace.solver.iterations) <= (T if method != "elk" else 100), method
        assert float(trace.solver.residual) <= 1e-6, method
        assert np.all(np.asarray(ys)[1, 3:] == 0), "padded outputs are zero"
    close(grads[graded], grads["scan"], 1e-4)


def test_float64_is_tighter_and_gradients_match_finite_differences(no_fallback):
    with jax.enable_x64(True):
        cell = recurrent.lstm(H, param_dtype=jnp.float64)
        scan, parallel = recurrent.rnn(cell), recurrent.rnn(cell, implementation="parallel", method="quasi")
        params = scan.init(jax.random.key(1), (F,))
        xs = jnp.asarray(data(1, dtype=np.float64))
        _, expected = jax.jit(scan.apply)(params, xs, lengths=LENGTHS)
        _, ys = jax.jit(parallel.apply)(params, xs, lengths=LENGTHS)
        assert ys.dtype == jnp.float64
        np.testing.assert_allclose(ys, expected, atol=1e-11, rtol=0)
        loss = jax.jit(lambda p, x: jnp.sum(jnp.sin(parallel.apply(p, x, lengths=LENGTHS)[1])))
        check_grads(battery.checkable(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))), (params, xs), 1,
                    modes=["rev"])  # fmt: skip


def test_regularisers_in_training_match_the_scan(no_fallback):
    """Dropout masks, DropConnect and zoneout come from the driver's loop body, key and all; the
    declared diagonal includes the noise."""
    options = dict(input_dropout=0.2, recurrent_dropout=0.3, dropconnect=0.2, zoneout=0.2, zoneout_cell=0.1)
    cell = CELLS["lstm"]()
    scan = recurrent.rnn(cell, **options)
    parallel = recurrent.rnn(cell, implementation="parallel", method="quasi", **options)
    params = scan.init(jax.random.key(0), (F,))
    xs, key = data(2), jax.random.key(5)
    expected = jax.jit(lambda p, x: scan.apply(p, x, lengths=LENGTHS, key=key))(params, xs)
    got = jax.jit(lambda p, x: parallel.apply(p, x, lengths=LENGTHS, key=key))(params, xs)
    close(got, expected, 1e-5)


def test_bidirectional_and_stacked_keep_the_solver(no_fallback):
    def model(implementation):
        options = {} if implementation == "scan" else dict(implementation="parallel")
        lstm = recurrent.rnn(CELLS["lstm"](), **options, **({"method": "deer"} if options else {}))
        gru = recurrent.rnn(CELLS["gru"](), **options, **({"method": "elk"} if options else {}))
        return recurrent.stacked([recurrent.bidirectional(lstm), gru])

    scan, parallel = model("scan"), model("parallel")
    assert parallel.reversed().name == scan.reversed().name
    bwd = recurrent.bidirectional(recurrent.rnn(CELLS["lstm"](), implementation="parallel", method="deer"))
    assert bwd.options["backward"]["method"] == "deer", "the reversed layer keeps the solver options"
    params = scan.init(jax.random.key(2), (F,))
    xs = data(4)

    def fn(layer):
        def loss(p, x):
            carry, ys = layer.apply(p, x, lengths=LENGTHS)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(carry)), (carry, ys)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (_, expected), grads = fn(scan)(params, xs)
    (_, got), p_grads = fn(parallel)(params, xs)
    close(got, expected, 1e-5)
    close(p_grads, grads, 1e-4)


def test_jit_and_vmap(no_fallback):
    cell = CELLS["gru"]()
    scan, parallel = recurrent.rnn(cell), recurrent.rnn(cell, implementation="parallel")
    params = scan.init(jax.random.key(0), (F,))
    xs = data(6, batch=(3,))
    lengths = np.array([T, 2, 0], np.int32)

    @jax.jit
    def per_example(p, x):
        return jax.vmap(lambda x, n: parallel.apply(p, x, lengths=n, return_trace=True))(x, lengths)

    carry, ys, trace = per_example(params, xs)
    close((carry, ys), jax.jit(scan.apply)(params, xs, lengths=lengths), 1e-5)
    assert trace.solver.iterations.shape == (3,) and bool(jnp.all(trace.solver.converged))
    assert int(trace.solver.iterations[2]) <= 1, "a sequence of length 0 is solved at once"
    unbatched = jax.jit(lambda p, x: parallel.apply(p, x, lengths=np.int32(2)))(params, xs[1])
    close(unbatched, jax.tree.map(lambda a: a[1], (carry, ys)), 1e-6)


# --------------------------------------------------------------------------------------
# The fall-back and the solver's report


def elman(w: float):
    """``h' = tanh(w h + x U)``: for ``w > 1`` the zero state repels (Newton's linearisation at
    the starting guess grows like ``w^T``), and each sequence settles near one of two states."""
    return recurrent.make_cell(
        init=lambda key, shape: {"U": 0.1 * jax.random.normal(key, (shape[0], H))},
        initial_carry=lambda p, x_shape: jnp.zeros((*x_shape[:-1], H)),
        project=lambda p, x: x @ p["U"],
        probe=lambda p, h, xp, noise=None: (jnp.tanh(w * h + xp),) * 2 + ({},),
        output_shape=lambda shape: (H,),
        input_rank=1,
        name="elman",
    )


def _scan_and_solvers(cell, T, options, *, grads_of=()):
    """The scan's and each method's ``apply`` (with the trace) in one program, and gradients of a
    loss for the scan and the methods ``grads_of``."""
    layers = {"scan": recurrent.rnn(cell)}
    layers |= {m: recurrent.rnn(cell, implementation="parallel", method=m, **options) for m in METHODS}
    params = layers["scan"].init(jax.random.key(0), (F,))
    loss = lambda layer, p, x: jnp.sum(jnp.sin(layer.apply(p, x)[1]))  # noqa: E731

    @jax.jit
    def run(p, x):
        outs = {k: layer.apply(p, x, return_trace=k != "scan") for k, layer in layers.items()}
        return outs, {k: jax.grad(loss, argnums=(1, 2))(layers[k], p, x) for k in ("scan", *grads_of)}

    return run(params, data(0, T=T))


def test_too_few_iterations_fall_back_to_exactly_the_scan():
    cell = recurrent.gru(H, recurrent_kernel_init=jax.nn.initializers.normal(8.0))  # saturating, far from linear
    outs, grads = _scan_and_solvers(cell, T, dict(max_iters=2), grads_of=("quasi",))
    for method in METHODS:
        c, ys, trace = outs[method]
        assert bool(trace.solver.fell_back) and not bool(trace.solver.converged), method
        assert int(trace.solver.iterations) == 2, method
        chex.assert_trees_all_equal((c, ys), outs["scan"])
    close(grads["quasi"], grads["scan"], 1e-4)  # the adjoint of the scan's trajectory


def test_elk_stays_finite_where_deer_and_quasi_diverge():
    """From the zero guess the linearised recurrence of the repelling Elman cell multiplies by 8
    per step: over 48 steps DEER's and quasi-DEER's iterates overflow at once; ELK's Kalman gains
    damp them. All three return the scan's answer (ELK, which here needs many iterations, falls
    back within these)."""
    outs, _ = _scan_and_solvers(elman(8.0), 48, dict(max_iters=6))
    for method in METHODS:
        chex.assert_trees_all_equal(outs[method][:2], outs["scan"])
    infos = {m: outs[m][2].solver for m in METHODS}
    for method in ("deer", "quasi"):
        assert bool(infos[method].fell_back) and int(infos[method].iterations) <= 1, method
        assert not np.isfinite(float(infos[method].residual)), method
    assert bool(infos["elk"].fell_back) and int(infos["elk"].iterations) == 6
    assert np.isfinite(float(infos["elk"].residual))


def test_warm_start_from_a_trace(no_fallback):
    cell = CELLS["lstm"]()
    layer = recurrent.rnn(cell, implementation="parallel", method="deer")
    params = layer.init(jax.random.key(0), (F,))
    xs = data(7)
    apply = jax.jit(lambda p, x, g: layer.apply(p, x, lengths=LENGTHS, return_trace=True, guess=g))
    c, ys, trace = apply(params, xs, None)
    assert int(trace.solver.iterations) >= 3
    c2, ys2, trace2 = apply(params, xs, trace.carries)  # the converged trajectory: nothing left to do
    assert int(trace2.solver.iterations) == 0 and bool(trace2.solver.converged)
    close((c2, ys2), (c, ys), 1e-6)
    # time-major: the guess laid out like the outputs
    time_major = jax.jit(
        lambda p, x, g: layer.apply(p, x, lengths=LENGTHS, time_major=True, return_trace=True, guess=g)
    )
    _, _, trace_tm = time_major(
        params, np.moveaxis(xs, 1, 0), jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), trace.carries)
    )
    assert int(trace_tm.solver.iterations) == 0


# --------------------------------------------------------------------------------------
# The declared diagonals


def _noise(carry, recurrent_input):
    rng = np.random.default_rng(4)
    mask = (rng.random(recurrent_input.shape) > 0.3).astype(np.float32) / 0.7
    zone = jax.tree.map(lambda a: (rng.random(a.shape) < 0.2).astype(np.float32), carry)
    return recurrent.StepNoise(jnp.asarray(mask), zone, None)


@pytest.mark.parametrize("name", ["lstm", "peephole_lstm", "cifg_lstm", "gru"])
def test_declared_diagonal_is_the_diagonal_of_forward_mode(name):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(1), (F,))
    x = jnp.asarray(data(8)[:, 0])
    rng = np.random.default_rng(5)
    carry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), cell.initial_carry(params, x.shape))
    xp = cell.project(params, x)
    recurrent_input = cell.spec.recurrent_input(carry)

    @jax.jit
    def both(params, carry, xp, noise):
        declared = cell.spec.jacobian_diagonal(params, carry, xp, noise)
        return declared, _newton.generic_diagonal(cell.probe, params, carry, xp, noise)

    for noise in (None, _noise(carry, recurrent_input)):
        close(*both(params, carry, xp, noise), 1e-6)
    assert cell.spec.jacobian_diagonal(("other", "params"), carry, xp, None) is None


def test_which_cells_declare_a_diagonal():
    assert CELLS["lstm_layer_norm"]().spec.jacobian_diagonal is None  # layer norm mixes the units
    assert recurrent.gru(3, reset_after=False).spec.jacobian_diagonal is None
    assert recurrent.conv_lstm(3, (3,)).spec.jacobian_diagonal is None
    assert recurrent.learned_initial_carry(recurrent.lstm(3)).spec.jacobian_diagonal is not None  # params.cell:
    # the declared function sees the wrapper's parameters, says None, and the solver differentiates


# --------------------------------------------------------------------------------------
# Errors


def _raises(*fragments):
    return pytest.raises(recurrent._core.Error, match="(?s)" + ".*".join(map(str, fragments)))


def test_bad_arguments_raise_clear_errors():
    cell = CELLS["lstm"]()
    with _raises("unknown `method`", "'deer' or 'quasi' or 'elk'", "'newton'", "fix"):
        recurrent.rnn(cell, implementation="parallel", method="newton")
    for tol in (0.0, -1e-3, True, "1e-6", float("nan")):
        with _raises("`tol` must be a positive number", "expected", repr(tol)[:3], "fix"):
            recurrent.rnn(cell, implementation="parallel", tol=tol)
    for max_iters in (0, 2.5, True):
        with _raises("`max_iters` must be a positive int", "fix"):
            recurrent.rnn(cell, implementation="parallel", max_iters=max_iters)
    with _raises("`damping` is the trust region", 'method="elk"'):
        recurrent.rnn(cell, implementation="parallel", method="quasi", damping=1.0)
    with _raises("`damping` must be a positive number"):
        recurrent.rnn(cell, implementation="parallel", method="elk", damping=0.0)
    for implementation in ("scan", "vjp"):
        with _raises("options of implementation=", "method='deer'", 'pass implementation="parallel"'):
            recurrent.rnn(cell, implementation=implementation, method="deer")
    with _raises("own exact parallel form", "tol=0.001", "drop them"):
        recurrent.rnn(recurrent.min_gru(4), implementation="parallel", tol=1e-3)
    layer = recurrent.rnn(cell)
    params = layer.init(jax.random.key(0), (F,))
    with _raises("`guess` is a starting trajectory", "implementation='scan'"):
        layer.apply(params, data(), guess=np.zeros((2, T, H)))
    parallel = recurrent.rnn(cell, implementation="parallel")
    with _raises("`guess` has the wrong structure"):
        parallel.apply(params, data(), guess=np.zeros((2, T, H)))
    bad = recurrent.LSTMState(np.zeros((2, T - 1, H), np.float32), np.zeros((2, T, H), np.float32))
    with _raises("guess.h has the wrong shape", f"(2, {T}, {H})", f"(2, {T - 1}, {H})"):
        parallel.apply(params, data(), guess=bad)


def test_an_integer_carry_is_refused():
    counter = recurrent.make_cell(
        init=lambda key, shape: {"w": jnp.ones(shape)},
        initial_carry=lambda p, x_shape: jnp.zeros(x_shape[:-1], jnp.int32),
        project=lambda p, x: x * p["w"],
        probe=lambda p, n, xp, noise=None: (n + 1, xp * n[..., None], {}),
        output_shape=lambda shape: shape,
        input_rank=1,
        name="counter",
    )
    layer = recurrent.rnn(counter, implementation="parallel")
    with _raises("floating-point carry", "int32", 'implementation="scan"'):
        layer.apply(layer.init(jax.random.key(0), (F,)), data())
