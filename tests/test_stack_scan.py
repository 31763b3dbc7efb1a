"""Stacks of equal layers run as one scan over stacked parameters (``recurrent.stacked(...,
scan_layers=True)`` of layers): the same values and gradients as running them one by one (the
default), and a program whose size does not grow with depth."""

from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import _combinators
from tests.fast_compiles import optimisations_off

H = 8


@pytest.fixture
def fast_compiles():
    """Values and gradients of stacks compiled for one call each, compared with tolerances: XLA's
    optimisation passes would take most of their time. Not for the tests that read compiled
    programs."""
    with optimisations_off():
        yield


def _layers(n, **rnn_options):
    return [recurrent.rnn(recurrent.lstm(H), **rnn_options) for _ in range(n)]


def test_equal_runs_are_found():
    runs = _combinators._equal_runs
    params = lambda layer, *shapes: tuple(layer.init(jax.random.key(0), s) for s in shapes)  # noqa: E731
    a = recurrent.rnn(recurrent.lstm(H))
    # the first layer sees 5 features, the rest H: two runs
    assert runs([a] * 4, params(a, (5,), (H,), (H,), (H,)), None) == [(0, 1), (1, 4)]
    # separately built but equal layers are recognised from their recorded options
    layers = _layers(3)
    assert runs(layers, params(a, (H,), (H,), (H,)), None) == [(0, 3)]
    # different options or cells break a run
    odd = [a, recurrent.rnn(recurrent.lstm(H), zoneout=0.1), a]
    assert runs(odd, params(a, (H,), (H,), (H,)), None) == [(0, 1), (1, 2), (2, 3)]
    g = recurrent.rnn(recurrent.gru(H))
    mixed = [a, a, g]
    ps = params(a, (H,), (H,)) + (g.init(jax.random.key(0), (H,)),)
    assert runs(mixed, ps, None) == [(0, 2), (2, 3)]


@pytest.mark.parametrize(
    "features, options",
    [(5, {}), (H, {"residual": True, "dropout": 0.3})],  # a first layer of its own, or all four in one run
)
@pytest.mark.usefixtures("fast_compiles")
def test_scanned_stack_equals_layer_by_layer(features, options):
    layers = _layers(4, recurrent_dropout=0.2)
    scanned, one_by_one = (recurrent.stacked(layers, scan_layers=s, **options) for s in (True, False))
    params = scanned.init(jax.random.key(0), (features,))
    xs = jax.random.normal(jax.random.key(1), (3, 6, features))
    lengths = jnp.array([6, 2, 0])
    carry = scanned.initial_carry(params, (3, features))
    carry = jax.tree.map(lambda a: a + 0.1, carry)

    def loss(params, xs, key, stack):
        carry_out, ys, trace = stack.apply(params, xs, lengths=lengths, carry=carry, key=key, return_trace=True)
        return jnp.sum(ys**2) + sum(jnp.sum(a) for a in jax.tree.leaves((carry_out, trace))), (carry_out, ys, trace)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
    for key in (None, jax.random.key(2)):
        got, want = grad(params, xs, key, scanned), grad(params, xs, key, one_by_one)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _program(depth, scan_layers=True, compiled=False):
    stack = recurrent.stacked(_layers(depth), scan_layers=scan_layers)
    params = stack.init(jax.random.key(0), (5,))
    grad = jax.grad(lambda p, x: jnp.sum(stack.apply(p, x)[1]))
    lowered = jax.jit(grad).lower(params, jnp.ones((2, 4, 5)))
    return lowered.compile().as_text() if compiled else lowered.as_text()


def _program_size(depth, scan_layers=True):
    return len(_program(depth, scan_layers).splitlines())


def test_program_size_is_flat_in_depth():
    # The first layer (5 inputs) and one scanned body for the rest: from depth 3 to 12 the
    # program grows only by the stacking of parameters and unstacking of carries, a few
    # lines per layer, not by a layer's program (the size of a 1-layer program) per layer.
    one, three, twelve = _program_size(1), _program_size(3), _program_size(12)
    assert (twelve - three) / 9 < 0.1 * one, (one, three, twelve)


def test_default_runs_layers_one_by_one_from_one_traced_function():
    """Unscanned (the default, faster at run time) XLA runs every layer's own time loops (one
    forward, one backward), but equal layers are one function traced once and called per layer,
    so the program JAX lowers does not grow by a layer's program per layer either."""
    one, three, twelve = (_program_size(d, scan_layers=False) for d in (1, 3, 12))
    assert (twelve - three) / 9 < 0.1 * one, (one, three, twelve)
    assert _program(12, scan_layers=False).count("func.call @") >= 12  # the layers' calls
    loops = {d: _program(d, scan_layers=False, compiled=True).count(" while(") for d in (1, 6)}
    assert loops == {1: 2, 6: 12}, loops
    # scanned: the first layer's two loops, and a loop over layers around each of two more
    assert _program(6, scan_layers=True, compiled=True).count(" while(") == 6


@pytest.mark.usefixtures("fast_compiles")
def test_default_stack_equals_its_layers_applied_in_turn():
    # An independent reference for the default path, whose equal layers share one function:
    # each layer's own apply, in turn (distinct parameters, carries, lengths, residual).
    layers = _layers(3) + [recurrent.rnn(recurrent.gru(H))]
    stack = recurrent.stacked(layers, residual=True)
    params = stack.init(jax.random.key(0), (5,))
    xs = jax.random.normal(jax.random.key(1), (3, 6, 5))
    lengths = jnp.array([6, 2, 0])
    carry = jax.tree.map(lambda a: a + 0.1, stack.initial_carry(params, (3, 5)))

    def by_hand(params, xs):
        ys, carries = xs, []
        for i, (layer, p, c) in enumerate(zip(layers, params, carry)):
            c, out = layer.apply(p, ys, lengths=lengths, carry=c)
            ys = out + ys if i > 0 else out
            carries.append(c)
        return tuple(carries), ys

    def loss(apply, params, xs):
        carry_out, ys = apply(params, xs)
        return jnp.sum(ys**2) + sum(jnp.sum(a) for a in jax.tree.leaves(carry_out))

    stacked_apply = lambda p, x: stack.apply(p, x, lengths=lengths, carry=carry)  # noqa: E731
    want = jax.jit(jax.value_and_grad(partial(loss, by_hand), argnums=(0, 1)))(params, xs)
    for fn in (lambda f: f, jax.jit):  # the stack eagerly and under jit
        got = fn(jax.value_and_grad(partial(loss, stacked_apply), argnums=(0, 1)))(params, xs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers"):
        recurrent.stacked(_layers(2), scan_layers="auto")


@pytest.mark.usefixtures("fast_compiles")
def test_a_flipped_layer_is_not_equal_to_its_original():
    # A layer run backwards keeps its original's parameters but not its function: scanning the
    # two as equal layers would run both forwards (a silent wrong answer before the fix).
    a = recurrent.rnn(recurrent.lstm(H))
    back = _combinators.flipped(recurrent.rnn(recurrent.lstm(H)))
    params = tuple(a.init(jax.random.key(i), (H,)) for i in range(3))
    assert _combinators._equal_runs([a, back, back], params, None) == [(0, 1), (1, 3)]
    xs = jax.random.normal(jax.random.key(3), (2, 5, H))
    lengths = jnp.array([5, 3])
    one_by_one = recurrent.stacked([a, back, back]).apply(params, xs, lengths=lengths)[1]
    scanned = recurrent.stacked([a, back, back], scan_layers=True).apply(params, xs, lengths=lengths)[1]
    np.testing.assert_allclose(scanned, one_by_one, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("fast_compiles")
def test_equal_bidirectional_layers_share_a_function_or_a_scan():
    bi = lambda **o: recurrent.bidirectional(recurrent.rnn(recurrent.lstm(H)), **o)  # noqa: E731
    layers = [bi(), bi(), bi(), bi(merge="sum"), bi(merge="sum", one_scan=False)]
    params = recurrent.stacked(layers).init(jax.random.key(0), (5,))  # 5 -> 2H -> 2H -> 2H -> H -> H
    # options record the directions, the merge and one_scan: a different one breaks a run
    assert _combinators._equal_runs(layers, params, None) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert _combinators._equal_runs([bi(), bi()], params[1:3], None) == [(0, 2)]
    xs = jax.random.normal(jax.random.key(7), (3, 6, 5))
    lengths = jnp.array([6, 2, 0])

    def by_hand(params, xs):
        ys = xs
        for layer, p in zip(layers, params):
            ys = layer.apply(p, ys, lengths=lengths)[1]
        return ys

    def loss(apply, params, xs):
        return jnp.sum(apply(params, xs) ** 2)

    want = jax.jit(jax.value_and_grad(partial(loss, by_hand), argnums=(0, 1)))(params, xs)
    for scan_layers in (False, True):
        stack = recurrent.stacked(layers, scan_layers=scan_layers)
        got = jax.jit(
            jax.value_and_grad(partial(loss, lambda p, x: stack.apply(p, x, lengths=lengths)[1]), argnums=(0, 1))
        )(params, xs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _compiles(fn):
    """``fn()``'s result and the names of the functions JAX compiled while running it."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            out = fn()
    finally:
        logger.removeHandler(handler)
    return out, [r.getMessage() for r in records if r.getMessage().startswith("Compiling")]


def test_eager_calls_compile_each_run_of_equal_layers_once():
    # The shared function is made once per stack, so eager calls reuse its compiled program.
    stack = recurrent.stacked(_layers(4))
    params = stack.init(jax.random.key(0), (5,))
    xs = jnp.ones((2, 3, 5))
    first, compiled_first = _compiles(lambda: stack.apply(params, xs)[1])
    again, compiled_again = _compiles(lambda: stack.apply(params, xs)[1])
    np.testing.assert_array_equal(first, again)
    assert sum("jit(run)" in m for m in compiled_first) == 2, compiled_first  # first layer, the other three
    assert not any("jit(run)" in m for m in compiled_again), compiled_again
