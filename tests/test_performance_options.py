"""The speed options change no result: projection placement, remat and one-scan bidirectional."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent._rnn import resolve_projection


def _close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=atol)


CELLS = {
    "lstm": lambda: recurrent.lstm(6),
    "gru": lambda: recurrent.gru(6),
}


@pytest.mark.parametrize("name", CELLS)
def test_projection_and_remat_give_the_same_values_and_gradients(name):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), (4,))
    xs = jax.random.normal(jax.random.key(1), (3, 7, 4))
    kw = dict(lengths=jnp.array([7, 4, 0]), key=jax.random.key(2))
    layers = [
        recurrent.rnn(cell, projection=p, remat=r, recurrent_dropout=0.2, zoneout=0.1)
        for p, r in (("hoisted", False), ("fused", False), ("fused", True))
    ]
    loss = lambda layer: lambda p: jnp.sum(layer.apply(p, xs, **kw)[1] ** 2)  # noqa: E731
    # On GPUs the default float32 matmul precision is TF32, whose rounding differs between one large
    # matmul and many small ones (2e-4 seen on an H200): conftest.py sets full precision for the tests.
    reference = layers[0].apply(params, xs, **kw), jax.grad(loss(layers[0]))(params)
    for layer in layers[1:]:
        _close((layer.apply(params, xs, **kw), jax.grad(loss(layer))(params)), reference)


def test_auto_projection_is_chosen_per_backend():
    assert resolve_projection("auto", "cpu") == "fused"
    assert resolve_projection("auto", "gpu") == resolve_projection("auto", "tpu") == "hoisted"
    assert resolve_projection("hoisted", "cpu") == "hoisted"
    # with remat the (T, B, G*H) buffer of a hoisted projection would dominate memory
    assert resolve_projection("auto", "gpu", remat=True) == "fused"
    assert resolve_projection("hoisted", "gpu", remat=True) == "hoisted"
    with pytest.raises(ValueError, match="projection"):
        recurrent.rnn(recurrent.lstm(3), projection="inside")


def count_scans(fn, *args):
    """How many ``lax.scan`` loops the program of ``fn(*args)`` runs (nested ones included)."""

    def count(jaxpr):
        here = sum(eqn.primitive.name == "scan" for eqn in jaxpr.eqns)
        return here + sum(count(sub) for sub in jax.extend.core.subjaxprs(jaxpr))

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("name", CELLS)
def test_bidirectional_in_one_scan_equals_two_scans(name):
    """``one_scan=True`` runs both directions in one scan (here the path with both step bodies
    in one loop, as resets and traces take it), ``one_scan=False`` in two: the same values and
    gradients, and by hand, two ``rnn`` layers, one run reversed."""
    make = lambda one_scan, **kw: recurrent.bidirectional(  # noqa: E731
        recurrent.rnn(CELLS[name](), recurrent_dropout=0.3, zoneout=0.2, **kw), one_scan=one_scan
    )
    one, two = make(True), make(False)
    params = one.init(jax.random.key(0), (4,))
    xs = jax.random.normal(jax.random.key(1), (3, 6, 4))
    resets = jnp.zeros((3, 6), bool).at[:, 2].set(True).at[0, 4].set(True)
    kw = dict(lengths=jnp.array([6, 3, 1]), resets=resets, key=jax.random.key(3), return_trace=True)
    apply = lambda layer, kw: lambda p, x: layer.apply(p, x, **kw)  # noqa: E731
    # the two sides take different paths: one loop against two
    assert count_scans(apply(one, kw), params, xs) == 1
    assert count_scans(apply(two, kw), params, xs) == 2
    _close(one.apply(params, xs, **kw), two.apply(params, xs, **kw), atol=1e-6)
    loss = lambda layer: lambda p: jnp.sum(layer.apply(p, xs, **kw)[1] ** 2)  # noqa: E731
    # jitted: one compiled program per side (eagerly, the scan's linearisation is compiled op by op)
    _close(jax.jit(jax.grad(loss(one)))(params), jax.jit(jax.grad(loss(two)))(params))

    # evaluation, against the two directions run by hand
    kw = dict(lengths=kw["lengths"], resets=resets)
    fwd = recurrent.rnn(CELLS[name](), recurrent_dropout=0.3, zoneout=0.2)
    bwd = recurrent.rnn(CELLS[name](), recurrent_dropout=0.3, zoneout=0.2, reverse=True)
    (c_f, y_f), (c_b, y_b) = fwd.apply(params.forward, xs, **kw), bwd.apply(params.backward, xs, **kw)
    by_hand = recurrent.BidirectionalState(c_f, c_b), jnp.concatenate([y_f, y_b], -1)
    _close(one.apply(params, xs, **kw), by_hand, atol=1e-6)
    _close(two.apply(params, xs, **kw), by_hand, atol=1e-6)


@pytest.mark.parametrize("time_major", [False, True])
def test_bidirectional_batched_directions_equal_two_scans(monkeypatch, time_major):
    """``one_scan=True`` with the same rnn layer in both directions: one vmapped scan whose
    two recurrent matmuls per step are one batched matmul; same values and gradients."""
    from recurrent import _combinators

    taken = []
    original = _combinators._batched_directions
    monkeypatch.setattr(_combinators, "_batched_directions", lambda *a: taken.append(1) or original(*a))
    make = lambda one_scan: recurrent.bidirectional(  # noqa: E731
        recurrent.rnn(recurrent.lstm(6), recurrent_dropout=0.3), one_scan=one_scan
    )
    one, two = make(True), make(False)
    params = one.init(jax.random.key(0), (4,))
    xs = jax.random.normal(jax.random.key(1), (3, 6, 4))
    lengths = jnp.array([6, 3, 0])
    carry = jax.tree.map(lambda a: a + 0.5, one.initial_carry(params, (3, 4)))
    if time_major:
        xs = jnp.moveaxis(xs, 1, 0)
    kw = dict(lengths=lengths, carry=carry, time_major=time_major)
    loss = lambda layer: lambda p, x: jnp.sum(layer.apply(p, x, **kw)[1] ** 2)  # noqa: E731
    _close(one.apply(params, xs, **kw), two.apply(params, xs, **kw), atol=1e-6)
    _close(jax.grad(loss(one), argnums=(0, 1))(params, xs), jax.grad(loss(two), argnums=(0, 1))(params, xs))
    assert taken, "the batched path was not taken"
    apply = lambda layer: lambda p, x: layer.apply(p, x, **kw)  # noqa: E731
    assert (count_scans(apply(one), params, xs), count_scans(apply(two), params, xs)) == (1, 2)
    # training: the dropout masks are drawn (per direction), so the outputs move
    _, trained = one.apply(params, xs, key=jax.random.key(5), **kw)
    _, evaluated = one.apply(params, xs, **kw)
    assert not np.allclose(trained, evaluated)


def test_one_scan_auto_and_bad_values(monkeypatch):
    from recurrent import _combinators

    taken = []
    original = _combinators._batched_directions
    monkeypatch.setattr(_combinators, "_batched_directions", lambda *a: taken.append(1) or original(*a))
    layer = recurrent.bidirectional(recurrent.lstm(4))  # one_scan="auto"
    params = layer.init(jax.random.key(0), (3,))
    layer.apply(params, jnp.ones((2, 5, 3)))
    assert taken, "auto takes one batched scan on every backend, CPU included"
    taken.clear()
    recurrent.bidirectional(recurrent.lstm(4), one_scan=False).apply(params, jnp.ones((2, 5, 3)))
    assert not taken, "one_scan=False runs two scans"
    with pytest.raises(ValueError, match="one_scan"):
        recurrent.bidirectional(recurrent.lstm(4), one_scan="yes")


@pytest.mark.parametrize(
    "make, step_shape",
    [
        (lambda: recurrent.lstm(6, dtype=jnp.bfloat16), (3, 4)),
        (lambda: recurrent.lstm(6, proj_size=3, dtype=jnp.bfloat16), (3, 4)),
        (lambda: recurrent.gru(6, dtype=jnp.bfloat16), (3, 4)),
        (lambda: recurrent.gru(6, reset_after=False, dtype=jnp.bfloat16), (3, 4)),
        (lambda: recurrent.conv_lstm(6, (3, 3), dtype=jnp.bfloat16), (3, 5, 5, 4)),
        (lambda: recurrent.conv_gru(6, (3, 3), dtype=jnp.bfloat16), (3, 5, 5, 4)),
    ],
)
def test_bfloat16_cells_multiply_bfloat16_and_accumulate_in_float32(make, step_shape):
    """Every matmul and convolution of a bfloat16 cell step takes bfloat16 operands and
    returns float32 (``preferred_element_type``): more accurate than a bfloat16 product and,
    on CPUs, the fast kernel (a bfloat16 -> bfloat16 product is upcast and runs at float32
    speed; ``python -m benchmarks.techniques``)."""
    cell = make()
    params = cell.init(jax.random.key(0), step_shape[1:])
    x = jnp.ones(step_shape)
    carry = cell.initial_carry(params, step_shape)
    text = jax.jit(cell.step).lower(params, carry, x).as_text()
    ops = [line for line in text.splitlines() if "dot_general" in line or "convolution" in line]
    assert ops, text
    for line in ops:
        inputs, output = line.rsplit("->", 1)
        assert "bf16>" in inputs and "f32>" in output and "bf16>" not in output, line


@pytest.mark.parametrize("implementation", ["scan", "vjp"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bfloat16_outputs_are_not_stacked_as_bfloat16_on_cpu(name, implementation):
    """XLA's CPU backend updates a stacked bfloat16 buffer through float32 copies of all of it
    at every step (time in proportion to T per step): the loops stack float32 instead and
    cast after. The outputs are the same bfloat16 values, their gradients the same as the
    stepwise reference's."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU-backend layout; other backends stack bfloat16 directly")
    T = 7
    layer = recurrent.rnn(getattr(recurrent, name)(6, dtype=jnp.bfloat16), implementation=implementation)
    params = layer.init(jax.random.key(0), (4,))
    xs = jax.random.normal(jax.random.key(1), (3, T, 4))
    loss = lambda p, x: jnp.sum(layer.apply(p, x)[1].astype(jnp.float32) ** 2)  # noqa: E731
    for fn in (lambda p, x: layer.apply(p, x)[1], jax.grad(loss, argnums=(0, 1))):
        text = jax.jit(fn).lower(params, xs).compile().as_text()
        stacked_bf16 = [line for line in text.splitlines() if "dynamic-update-slice" in line and f"= bf16[{T}," in line]
        assert not stacked_bf16, stacked_bf16[:3]
    # the values: the cell stepped by hand in a Python loop
    cell = getattr(recurrent, name)(6, dtype=jnp.bfloat16)
    carry, ys = cell.initial_carry(params, (3, 4)), []
    for t in range(T):
        carry, y = cell.step(params, carry, xs[:, t])
        ys.append(y)
    got = layer.apply(params, xs)[1]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(jnp.stack(ys, 1), np.float32), atol=2**-7)
