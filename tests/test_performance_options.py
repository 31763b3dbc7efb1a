"""The speed options change no result: projection placement, remat and one-scan bidirectional."""

import jax
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
    reference = layers[0].apply(params, xs, **kw), jax.grad(loss(layers[0]))(params)
    for layer in layers[1:]:
        _close((layer.apply(params, xs, **kw), jax.grad(loss(layer))(params)), reference)


def test_auto_projection_is_chosen_per_backend():
    assert resolve_projection("auto", "cpu") == "fused"
    assert resolve_projection("auto", "gpu") == resolve_projection("auto", "tpu") == "hoisted"
    assert resolve_projection("hoisted", "cpu") == "hoisted"
    with pytest.raises(ValueError, match="projection"):
        recurrent.rnn(recurrent.lstm(3), projection="inside")


@pytest.mark.parametrize("name", ["lstm"])
def test_bidirectional_in_one_scan_equals_two_scans(name):
    one = recurrent.bidirectional(recurrent.rnn(CELLS[name](), recurrent_dropout=0.3, zoneout=0.2), one_scan=True)
    two = recurrent.bidirectional(recurrent.rnn(CELLS[name](), recurrent_dropout=0.3, zoneout=0.2))
    params = one.init(jax.random.key(0), (4,))
    xs = jax.random.normal(jax.random.key(1), (3, 6, 4))
    resets = jnp.zeros((3, 6), bool).at[:, 2].set(True)
    for kw in (dict(lengths=jnp.array([6, 3, 1]), resets=resets, key=jax.random.key(3), return_trace=True),):
        _close(one.apply(params, xs, **kw), two.apply(params, xs, **kw), atol=1e-6)
        grad = lambda layer: jax.grad(lambda p: jnp.sum(layer.apply(p, xs, **kw)[1] ** 2))(params)  # noqa: E731
        _close(grad(one), grad(two))
    tm = jnp.moveaxis(xs, 1, 0)
    _close(one.apply(params, tm, time_major=True), two.apply(params, tm, time_major=True), atol=1e-6)
