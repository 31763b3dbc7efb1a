"""The kernel matmul's derivative (``recurrent._core._kernel_matmul``).

On CPU every ``x @ kernel`` of the cells goes through a ``custom_jvp`` whose tangent contracts
with the kernel's transpose, so that reverse mode through a scan multiplies each step's
cotangent by a plainly laid-out ``kernel.T`` computed once outside the loop. These tests hold
its values and derivatives of every order to JAX's own of ``jnp.matmul``, and check that the
backward loop of a layer really reads the transposed kernel.
"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import _core


def _plain(a, b, out_dtype):
    return jnp.matmul(a, b, preferred_element_type=out_dtype)


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("a_shape", [(5,), (3, 5), (2, 3, 5)], ids=["vector", "matrix", "two batch axes"])
def test_values_and_derivatives_of_every_order_equal_matmul(a_shape):
    with jax.enable_x64(True):
        ka, kb, kt, ku = jax.random.split(jax.random.key(0), 4)
        a = jax.random.normal(ka, a_shape, jnp.float64)
        b = jax.random.normal(kb, (5, 4), jnp.float64)
        da, db = jax.random.normal(kt, a.shape, jnp.float64), jax.random.normal(ku, b.shape, jnp.float64)
        ours = lambda a, b: _core._kernel_matmul(a, b, jnp.float64)  # noqa: E731
        plain = lambda a, b: _plain(a, b, jnp.float64)  # noqa: E731
        _close(ours(a, b), plain(a, b), 1e-13)
        for tangents in ((da, db), (da, jnp.zeros_like(b)), (jnp.zeros_like(a), db)):
            _close(jax.jvp(ours, (a, b), tangents), jax.jvp(plain, (a, b), tangents), 1e-13)

        def loss(f):
            return lambda a, b: jnp.sum(jnp.sin(f(a, b)))

        _close(jax.grad(loss(ours), (0, 1))(a, b), jax.grad(loss(plain), (0, 1))(a, b), 1e-13)
        # one argument only: the other's tangent is a symbolic zero
        _close(jax.grad(lambda a: loss(ours)(a, b))(a), jax.grad(lambda a: loss(plain)(a, b))(a), 1e-13)
        _close(jax.grad(lambda b: loss(ours)(a, b))(b), jax.grad(lambda b: loss(plain)(a, b))(b), 1e-13)
        _close(jax.hessian(loss(ours), (0, 1))(a, b), jax.hessian(loss(plain), (0, 1))(a, b), 1e-12)
        population = jnp.stack([b, 2 * b])  # a vmapped population of kernels
        batched = [jax.vmap(jax.grad(loss(f), (0, 1)), in_axes=(None, 0))(a, population) for f in (ours, plain)]
        _close(*batched, 1e-13)


def test_bfloat16_operands_accumulate_in_float32_as_matmul():
    a = jax.random.normal(jax.random.key(0), (3, 8)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (8, 4)).astype(jnp.bfloat16)
    ours = lambda a, b: jnp.sum(jnp.sin(_core._kernel_matmul(a, b, jnp.float32)))  # noqa: E731
    plain = lambda a, b: jnp.sum(jnp.sin(_plain(a, b, jnp.float32)))  # noqa: E731
    assert _core._kernel_matmul(a, b, jnp.float32).dtype == jnp.float32
    _close(jax.grad(ours, (0, 1))(a, b), jax.grad(plain, (0, 1))(a, b), 1e-2)


def _dots_in_loops(jaxpr, inside=False):
    for eqn in jaxpr.eqns:
        if inside and eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _dots_in_loops(sub, inside or eqn.primitive.name in ("scan", "while"))


@pytest.mark.parametrize("make", [recurrent.lstm, recurrent.gru])
def test_backward_loop_reads_the_transposed_kernel(make):
    """The step's cotangent is multiplied by the kernel's transpose as its own ``(G*H, H)``
    array: no matmul inside the loops contracts the ``(H, G*H)`` recurrent kernel over its
    second axis (autodiff's transpose of ``h @ kernel``)."""
    assert jax.default_backend() == "cpu"  # where `_core.matmul` uses it
    H = 6
    layer = recurrent.rnn(make(H), projection="fused")
    xs = jnp.ones((2, 4, 3))
    params = layer.init(jax.random.key(0), (3,))
    G = params.recurrent_kernel.shape[1] // H
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(layer.apply(p, xs)[1] ** 2)))(params).jaxpr
    dots = list(_dots_in_loops(jaxpr))
    read_transposed = [
        e for e in dots if e.invars[1].aval.shape == (H, G * H) and e.params["dimension_numbers"][0][1] == (1,)
    ]
    assert not read_transposed, read_transposed
    plain_transposed = [
        e for e in dots if e.invars[1].aval.shape == (G * H, H) and e.params["dimension_numbers"][0][1] == (0,)
    ]
    assert plain_transposed, [e.params["dimension_numbers"] for e in dots]
