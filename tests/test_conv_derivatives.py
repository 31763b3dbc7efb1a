"""The convolutional cells' convolution on CPU (``recurrent._conv._conv``) computes its
derivatives as matmuls over patches, because XLA's CPU backend runs autodiff's own gradient
convolutions slowly inside a scan. These tests pin that the values, the gradients and forward
mode are those of the plain convolution, and that no kernel-gradient convolution (batch and
feature axes swapped) is left in a ConvLSTM's backward pass."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import _conv


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


CASES = [  # (spatial shape, kernel size): 1, 2 and 3 spatial axes, odd, even and mixed sizes
    ((9,), (3,)),
    ((8,), (4,)),
    ((6, 7), (3, 3)),
    ((6, 5), (5, 2)),
    ((4, 5, 3), (3, 1, 2)),
]


def _with(conv, x, k, n):
    lead = x.shape[: x.ndim - n - 1]
    y = conv(x.reshape((-1, *x.shape[len(lead) :])), k, n, None)
    return y.reshape((*lead, *y.shape[1:]))


def _plain(x, k, n):
    return _with(_conv._conv_same, x, k, n)


def _patches(x, k, n):
    """The patch derivatives called directly, so that they are checked on any backend (``_conv._conv``
    picks them on CPU only)."""
    return _with(_conv._conv_matmul_derivatives, x, k, n)


@pytest.mark.parametrize("spatial, kernel_size", CASES)
def test_values_gradients_and_jvp_equal_the_plain_convolution(x64, spatial, kernel_size):
    n, C, out = len(spatial), 3, 5
    kx, kk, kt, ku = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (2, 3, *spatial, C), jnp.float64)  # two leading axes
    k = jax.random.normal(kk, (*kernel_size, C, out), jnp.float64)
    ours, plain = (lambda x, k: _patches(x, k, n)), (lambda x, k: _plain(x, k, n))
    np.testing.assert_allclose(ours(x, k), plain(x, k), rtol=1e-12, atol=1e-12)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    got, want = jax.grad(loss(ours), (0, 1))(x, k), jax.grad(loss(plain), (0, 1))(x, k)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)
    dx, dk = jax.random.normal(kt, x.shape, jnp.float64), jax.random.normal(ku, k.shape, jnp.float64)
    for tangents in ((dx, dk), (dx, jnp.zeros_like(k)), (jnp.zeros_like(x), dk)):
        np.testing.assert_allclose(
            jax.jvp(ours, (x, k), tangents)[1], jax.jvp(plain, (x, k), tangents)[1], rtol=1e-11, atol=1e-11
        )
    only_k = jax.jvp(lambda k: ours(x, k), (k,), (dk,))[1]  # a symbolic-zero input tangent
    np.testing.assert_allclose(only_k, jax.jvp(lambda k: plain(x, k), (k,), (dk,))[1], rtol=1e-11, atol=1e-11)


def _convolutions(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn.params["dimension_numbers"]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _convolutions(sub)


@pytest.mark.parametrize("make", [recurrent.conv_lstm, recurrent.conv_gru])
def test_kernel_gradient_convolutions_only_off_cpu(make):
    """The kernel gradient of a convolution, as autodiff writes it, convolves with the batch as
    the feature axis: the form XLA's CPU backend runs ~30x too slowly inside a loop. On CPU the
    cells' backward pass has none; elsewhere (cuDNN runs it well) autodiff's own is used."""
    layer = recurrent.rnn(make(4, (3, 3)))
    xs = jnp.ones((2, 3, 5, 5, 2))
    params = layer.init(jax.random.key(0), xs.shape[2:])
    grad = jax.grad(lambda p, xs: jnp.sum(layer.apply(p, xs)[1] ** 2), argnums=(0, 1))
    specs = list(_convolutions(jax.make_jaxpr(grad)(params, xs).jaxpr))
    assert specs, "the forward convolutions are there"
    kernel_gradients = [s for s in specs if not (s.lhs_spec[0] == 0 and s.out_spec[0] == 0)]
    if jax.default_backend() == "cpu":
        assert not kernel_gradients, specs
    else:
        assert kernel_gradients, specs


def test_bfloat16_gradients_follow_float32():
    """In bfloat16 compute the patch matmuls accumulate in float32, like the forward."""
    cell32 = recurrent.conv_lstm(8, (3, 3))
    cell16 = recurrent.conv_lstm(8, (3, 3), dtype=jnp.bfloat16)
    xs = jax.random.normal(jax.random.key(1), (2, 4, 6, 6, 3))
    params = recurrent.rnn(cell32).init(jax.random.key(0), xs.shape[2:])

    def grads(cell):
        return jax.grad(lambda p: jnp.sum(recurrent.rnn(cell).apply(p, xs)[1].astype(jnp.float32) ** 2))(params)

    g16, g32 = grads(cell16), grads(cell32)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(jnp.abs(b).max()))


def test_layer_gradients_under_remat_vmap_and_second_order(x64):
    """The custom derivative composes with the rest of JAX: remat, vmap over a population,
    forward-over-reverse (Hessian-vector products), all equal to the plain convolution's."""
    cell = recurrent.conv_lstm(3, (3,), param_dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 4, 6, 2), jnp.float64)
    params = recurrent.rnn(cell).init(jax.random.key(0), xs.shape[2:])

    def loss(p, remat=False):
        return jnp.sum(jnp.sin(recurrent.rnn(cell, remat=remat).apply(p, xs)[1]))

    def plain_loss(p, remat=False):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_conv, "_conv_matmul_derivatives", _conv._conv_same)
            return loss(p, remat)

    want = jax.grad(plain_loss)(params)
    for got in (jax.grad(loss)(params), jax.grad(lambda p: loss(p, remat=True))(params)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    population = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    batched = jax.vmap(jax.grad(loss))(population)
    np.testing.assert_allclose(batched.recurrent_kernel[0], want.recurrent_kernel, rtol=1e-10, atol=1e-10)
    hvp = lambda f: jax.jvp(jax.grad(f), (params,), (params,))[1]  # noqa: E731
    for a, b in zip(jax.tree.leaves(hvp(loss)), jax.tree.leaves(hvp(plain_loss)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
