"""The elementwise half of a step with a written-out derivative (``_lstm.lstm_pointwise``,
``_gru.gru_pointwise``).

The usual LSTM family (sigmoid gates, tanh activations; plain, peephole, CIFG), ConvLSTM and the
GRU run their elementwise half through a ``custom_jvp`` so that reverse mode stores a few products
per step instead of every gate and derivative factor. These tests hold them to JAX's own
derivatives of the same equations, in every mode of differentiation, and check that they store
fewer arrays. For the LSTM the general code is reached through the public ``input_activation``
option: ``lambda x: jnp.tanh(x)`` is the same function, but not ``jnp.tanh`` itself, so the cell
takes the general path; for ConvLSTM and the GRU the plain expression is patched in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests.fast_compiles import optimisations_off

B, T, F, H = 3, 6, 4, 5
_normal = jax.nn.initializers.normal(0.5)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Every check compiles a few derivative programs of a small scan; XLA's optimisation passes
    would take most of their time. Both sides of each comparison are compiled alike."""
    with optimisations_off():
        yield


CONFIGS = {
    "lstm": {},
    "cifg": {"coupled": True},
    "peephole": {"peephole": True, "peephole_init": _normal},
    "peephole cifg": {"peephole": True, "coupled": True, "peephole_init": _normal},
    "projection": {"proj_size": 3},
    "gate recurrence": {"gate_recurrence": True},
    "forget bias": {"forget_bias": 1.0, "bias_init": _normal},
}


def _pair(**options):
    def tanh(x):
        return jnp.tanh(x)

    written = recurrent.lstm(H, **options)
    general = recurrent.lstm(H, input_activation=tanh, **options)
    return written, general


def _close(a, b, tol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _every_order(f, args, tangents, kernel_of=None):
    """Values and derivatives of ``f`` in every mode, for one program to compute them all:
    forward (``jvp``: the value and a directional derivative), reverse (``grad``, the primal output
    of the forward-over-reverse ``jvp`` that gives the Hessian-vector product) and, with
    ``kernel_of``, reverse over reverse (the gradient of a function of the gradient with respect
    to ``args[0]``, of which ``kernel_of`` picks a leaf)."""
    grad, hvp = jax.jvp(jax.grad(f, tuple(range(len(args)))), args, tangents)
    results = (jax.jvp(f, args, tangents), grad, hvp)
    if kernel_of is not None:
        results += (jax.grad(lambda p: jnp.sum(kernel_of(jax.grad(f)(p, *args[1:])) ** 2))(args[0]),)
    return results


def _assert_every_order_close(written, general):
    """``written`` and ``general``: the results of :func:`_every_order`, first-order ones to
    1e-12 and second-order ones to 1e-10."""
    (written_jvp, written_grad, *written_second), (general_jvp, general_grad, *general_second) = written, general
    _close((written_jvp, written_grad), (general_jvp, general_grad))
    _close(written_second, general_second, tol=1e-10)


@pytest.mark.parametrize("name", CONFIGS)
def test_values_and_derivatives_of_every_order_equal_autodiff(name):
    with jax.enable_x64(True):
        cells = _pair(**CONFIGS[name])
        layers = [recurrent.rnn(cell) for cell in cells]
        params = jax.tree.map(lambda a: a.astype(jnp.float64), cells[0].init(jax.random.key(0), (F,)))
        xs = jax.random.normal(jax.random.key(1), (B, T, F), jnp.float64)
        carry = jax.tree.map(
            lambda a: jax.random.normal(jax.random.key(2), a.shape, jnp.float64),
            cells[0].initial_carry(params, (B, F)),
        )
        kw = dict(lengths=jnp.array([6, 3, 0]))

        def loss(layer):
            def f(p, x, c):
                c_out, ys = layer.apply(p, x, carry=c, **kw)
                return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v**2) for v in jax.tree.leaves(c_out))

            return f

        args = (params, xs, carry)
        tangents = jax.tree.map(lambda a: 0.3 * jnp.cos(a), args)
        kernel = lambda g: g.recurrent_kernel  # noqa: E731

        # One program for both paths, each with its trace and its derivatives of every order.
        @jax.jit
        def both(args, tangents):
            return [
                (layer.apply(*args[:2], return_trace=True), _every_order(loss(layer), args, tangents, kernel))
                for layer in layers
            ]

        (written_trace, written), (general_trace, general) = both(args, tangents)
        _close(written_trace, general_trace)
        _assert_every_order_close(written, general)


def test_bfloat16_compute_matches_the_general_path():
    cells = _pair(dtype=jnp.bfloat16)
    layers = [recurrent.rnn(cell) for cell in cells]
    params = cells[0].init(jax.random.key(0), (F,))
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    loss = lambda layer: lambda p: jnp.sum(layer.apply(p, xs)[1].astype(jnp.float32) ** 2)  # noqa: E731
    got, want = jax.jit(lambda p: [jax.grad(loss(layer))(p) for layer in layers])(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def _stored_per_step(cell, step_shape=(F,)):
    """How many arrays with a leading time axis the forward loop of a layer's gradient stores."""
    layer = recurrent.rnn(cell)
    params = layer.init(jax.random.key(0), step_shape)
    xs = jnp.ones((B, T, *step_shape))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.apply(p, xs)[1])))(params).jaxpr

    def scans(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from scans(inner)

    (forward,) = [e for e in scans(jaxpr) if not e.params["reverse"]]
    return sum(1 for v in forward.outvars if v.aval.shape[:1] == (T,))


@pytest.mark.parametrize(
    "options, most",
    [
        # the outputs, the previous h (for the recurrent kernel's gradient) and six products
        ({}, 8),
        ({"coupled": True}, 7),  # one product fewer: i = 1 - f
        ({"peephole": True}, 10),  # and c_{t-1}, c_t for the peepholes' gradients
    ],
)
def test_reverse_mode_stores_fewer_arrays_per_step(options, most):
    written, general = _pair(**options)
    stored, before = _stored_per_step(written), _stored_per_step(general)
    assert stored <= most < before, (stored, before)


def test_conv_lstm_derivatives_equal_autodiff(monkeypatch):
    """ConvLSTM uses the same function; the reference here is JAX's derivative of its plain
    expression (`_lstm_pointwise_primal`, patched in)."""
    cell = recurrent.conv_lstm(3, (3, 3), peephole=True, peephole_init=_normal)
    layer = recurrent.rnn(cell)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), layer.init(jax.random.key(0), (4, 4, 2)))
        xs = jax.random.normal(jax.random.key(1), (2, 3, 4, 4, 2), jnp.float64)
        f = lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)[1]))  # noqa: E731
        args = (params, xs)
        tangents = jax.tree.map(lambda a: 0.3 * jnp.cos(a), args)

        def everything():
            # a new function each call, so that it is traced again with the patched module
            return jax.jit(lambda a, t: (layer.apply(*a, return_trace=True), _every_order(f, a, t)))(args, tangents)

        written, stored = everything(), _stored_per_step(cell, (4, 4, 2))
        monkeypatch.setattr(recurrent._conv, "lstm_pointwise", recurrent._lstm._lstm_pointwise_primal)
        _close(written, everything(), tol=1e-10)
        assert stored < _stored_per_step(cell, (4, 4, 2)), stored


@pytest.mark.parametrize("options", [{}, {"layer_norm": True}], ids=["gru", "gru layer norm"])
def test_gru_derivatives_equal_autodiff(monkeypatch, options):
    """The GRU (``reset_after``, the default) has the same kind of function, ``gru_pointwise``;
    the reference is JAX's derivative of its plain expression, patched in."""
    cell = recurrent.gru(H, bias_init=_normal, **options)
    layer = recurrent.rnn(cell)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: a.astype(jnp.float64), layer.init(jax.random.key(0), (F,)))
        xs = jax.random.normal(jax.random.key(1), (B, T, F), jnp.float64)
        h0 = jax.random.normal(jax.random.key(2), (B, H), jnp.float64)
        f = lambda p, x, h: jnp.sum(jnp.sin(layer.apply(p, x, carry=h, lengths=jnp.array([6, 2, 0]))[1]))  # noqa: E731
        args = (params, xs, h0)
        tangents = jax.tree.map(lambda a: 0.3 * jnp.cos(a), args)
        kernel = lambda g: g.recurrent_kernel  # noqa: E731

        def everything():
            # a new function each call, so that it is traced again with the patched module
            return jax.jit(
                lambda a, t: (layer.apply(a[0], a[1], carry=a[2], return_trace=True), _every_order(f, a, t, kernel))
            )(args, tangents)

        written, stored = everything(), _stored_per_step(cell)
        monkeypatch.setattr(recurrent._gru, "gru_pointwise", recurrent._gru._gru_pointwise_primal)
        _close(written, everything(), tol=1e-10)
        assert stored < _stored_per_step(cell), stored
