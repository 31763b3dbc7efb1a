"""A cell defined here, with the public API alone, gets everything the library's cells get.

JANET (van der Westhuizen & Lasenby 2018, "The unreasonable effectiveness of the forget gate")
is an LSTM with a forget gate only:

    s_t = W_f x_t + U_f h_{t-1} + b_f,    f_t = sigma(s_t)
    c_t = f_t * c_{t-1} + (1 - sigma(s_t - beta)) * tanh(W_c x_t + U_c h_{t-1} + b_c),    h_t = c_t

It declares its recurrent input (``h``), its cell state (``c``) and its recurrent kernel in a
:class:`recurrent.CellSpec`, and then runs through the whole shared battery (scan against a
Python loop, lengths against per-sequence runs, reverse, resets, jit, vmap over batches and over
a population, finite-difference gradients, dtypes), bidirectional and stacked, every regulariser
of the driver, and the NNX wrapper, with no change to any file of the library.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import test_battery as battery
from tests.fast_compiles import optimisations_off
from tests.registry import Bidi, CellSpec, Entry, Rnn, Stack, StackCells


class JanetParams(NamedTuple):
    input_kernel: jax.Array  # (F, 2H): forget | candidate
    recurrent_kernel: jax.Array  # (H, 2H)
    bias: jax.Array  # (2H,)


class JanetState(NamedTuple):
    h: jax.Array  # compute dtype
    c: jax.Array  # float32 (the state that accumulates)


def janet(hidden_size: int, *, beta: float = 1.0, dtype=None, param_dtype=jnp.float32) -> recurrent.Cell:
    H = hidden_size

    def init(key, input_shape):
        (F,) = input_shape
        k_in, k_rec = jax.random.split(key)
        draw = lambda k, shape: (0.5 * jax.random.normal(k, shape)).astype(param_dtype)  # noqa: E731
        return JanetParams(draw(k_in, (F, 2 * H)), draw(k_rec, (H, 2 * H)), jnp.zeros((2 * H,), param_dtype))

    def dtypes(params):
        cdt = jnp.dtype(dtype or params.bias.dtype)
        return cdt, jnp.promote_types(cdt, jnp.float32)

    def initial_carry(params, x_shape):
        cdt, sdt = dtypes(params)
        return JanetState(jnp.zeros((*x_shape[:-1], H), cdt), jnp.zeros((*x_shape[:-1], H), sdt))

    def project(params, x):
        cdt, sdt = dtypes(params)
        xp = jnp.matmul(x.astype(cdt), params.input_kernel.astype(cdt), preferred_element_type=sdt)
        return (xp + params.bias.astype(sdt)).astype(cdt)

    def probe(params, carry, xp, noise=None):
        cdt, sdt = dtypes(params)
        h = recurrent.noisy_input(noise, carry.h)
        rec = jnp.matmul(h.astype(cdt), params.recurrent_kernel.astype(cdt), preferred_element_type=sdt)
        s, u = jnp.split(xp.astype(sdt) + rec, 2, axis=-1)
        c = jax.nn.sigmoid(s) * carry.c + (1.0 - jax.nn.sigmoid(s - beta)) * jnp.tanh(u)
        new = recurrent.zoneout(noise, carry, JanetState(c.astype(cdt), c))
        return new, new.h, {"forget": jax.nn.sigmoid(s)}

    return recurrent.make_cell(
        init=init,
        initial_carry=initial_carry,
        project=project,
        probe=probe,
        output_shape=lambda input_shape: (H,),
        input_rank=1,
        name="janet",
        options={"hidden_size": H, "beta": beta, "dtype": dtype, "param_dtype": param_dtype},
        spec=recurrent.cell_spec(recurrent_input="h", cell_state=("c",), recurrent_kernels=("recurrent_kernel",)),
    )


def _janet(hidden_size: int) -> CellSpec:
    return CellSpec(janet, hidden_size, default_init=True)  # its own initialisers (no registry overrides)


OWN = [
    Entry("janet", _janet(3), (2,)),
    Entry("janet_rnn_reverse", Rnn(_janet(3), reverse=True), (2,)),
    Entry("janet_hoisted_remat", Rnn(_janet(3), projection="hoisted", remat=True), (2,)),
    Entry("janet_bidirectional", Bidi(_janet(2)), (3,)),
    Entry("janet_stacked_cells", StackCells([_janet(3), _janet(3)], residual=True), (2,)),
    Entry("janet_stack_of_layers", Stack([Bidi(_janet(2)), _janet(3)]), (2,)),
]


def _battery_checks():
    """Every check of the battery that takes an entry (the others take no entry)."""
    return [name for name, fn in vars(battery).items() if name.startswith("test_") and _takes_entry(fn)]


def _applies(check: str, entry: Entry) -> bool:
    """Whether the battery runs ``check`` on entries like ``entry``: some checks run on cells
    only (``CELLS``), or on layers that run forwards (``FORWARD_ONLY``)."""
    for mark in getattr(getattr(battery, check), "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == "entry":
            if mark.args[1] is battery.CELLS:
                return entry.is_cell
            if mark.args[1] is battery.FORWARD_ONLY:
                return entry.forward_only
    return True


def _takes_entry(fn) -> bool:
    fn = getattr(fn, "hypothesis", None) and fn.hypothesis.inner_test or fn
    return "entry" in inspect.signature(fn).parameters


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    with optimisations_off():
        yield


@pytest.mark.parametrize(
    "entry, check",
    [pytest.param(e, c, id=f"{e.id}-{c}") for e in OWN for c in _battery_checks() if _applies(c, e)],
)
def test_own_cell_passes_the_whole_battery(entry, check):
    getattr(battery, check)(entry=entry)  # checks with hypothesis draw their own cases


def test_the_battery_is_all_there():
    assert len(_battery_checks()) >= 18
    assert {
        "test_scan_matches_python_loop",
        "test_lengths_match_per_sequence_runs",
        "test_resets_match_separate_segments",
        "test_vmap_over_params_matches_per_member",
        "test_gradients_match_finite_differences",
    } <= set(_battery_checks())


def _numpy_janet(params, xs, h0, c0, beta=1.0, mask=None):
    """The equations above in NumPy float64, one sequence ``(T, F)``."""
    p = [np.asarray(a, np.float64) for a in params]
    h, c, ys = np.asarray(h0, np.float64), np.asarray(c0, np.float64), []
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for x in np.asarray(xs, np.float64):
        z = x @ p[0] + p[2] + (h if mask is None else h * mask) @ p[1]
        s, u = np.split(z, 2)
        c = sigmoid(s) * c + (1 - sigmoid(s - beta)) * np.tanh(u)
        h = c
        ys.append(h)
    return np.stack(ys), c


def test_own_cell_matches_its_equations():
    cell = janet(4)
    params = cell.init(jax.random.key(0), (3,))
    xs = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    carry, ys = recurrent.rnn(cell).apply(params, xs)
    ref_ys, ref_c = _numpy_janet(params, xs, np.zeros(4), np.zeros(4))
    np.testing.assert_allclose(ys, ref_ys, atol=1e-5)
    np.testing.assert_allclose(carry.c, ref_c, atol=1e-5)


def test_every_regulariser_reaches_the_own_cell():
    cell = janet(4)
    params = cell.init(jax.random.key(0), (3,))
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 3)).astype(np.float32))
    _, clean = jax.jit(recurrent.rnn(cell).apply)(params, xs)
    for options in ({"input_dropout": 0.5}, {"recurrent_dropout": 0.5}, {"dropconnect": 0.5}, {"zoneout": 0.5},
                    {"zoneout": 0.3, "zoneout_cell": 0.6}):  # fmt: skip
        layer = recurrent.rnn(cell, **options)
        apply = jax.jit(layer.apply)
        _, train = apply(params, xs, key=jax.random.key(2))
        _, again = apply(params, xs, key=jax.random.key(2))
        _, evaluation = apply(params, xs)
        assert not np.allclose(train, clean, atol=1e-4), options  # the noise is applied in training
        np.testing.assert_array_equal(train, again)  # a pure function of the key
        if "zoneout" not in options:
            np.testing.assert_array_equal(evaluation, clean)  # off without a key
        grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, xs, key=jax.random.key(3))[1])))(params)  # noqa: B023
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_recurrent_dropout_masks_exactly_the_declared_recurrent_input():
    """With recurrent dropout the cell sees ``h * mask`` in its recurrent matmul, one mask per
    sequence: recover the mask from the first two steps and check every step against NumPy."""
    cell = janet(4)
    params = cell.init(jax.random.key(0), (3,))
    xs = np.random.default_rng(2).normal(size=(1, 6, 3)).astype(np.float32)
    layer = recurrent.rnn(cell, recurrent_dropout=0.5)
    _, ys = layer.apply(params, xs, key=jax.random.key(5))
    # the driver draws masks for every carry leaf and keeps the declared one (h)
    k_rec = jax.random.split(jax.random.key(5), 5)[1]
    carry = cell.initial_carry(params, (1, 3))
    masks = jax.tree.map(
        lambda k, leaf: jax.random.bernoulli(k, 0.5, leaf.shape).astype(leaf.dtype) / 0.5,
        JanetState(*jax.random.split(k_rec, 2)),
        carry,
    )
    ref_ys, _ = _numpy_janet(params, xs[0], np.zeros(4), np.zeros(4), mask=np.asarray(masks.h[0]))
    np.testing.assert_allclose(ys[0], ref_ys, atol=1e-5)


def test_the_nnx_wrapper_runs_the_own_cell():
    from flax import nnx

    import recurrent.nnx

    module = recurrent.nnx.RNN(janet(4), (3,), rngs=nnx.Rngs(0))
    xs = jnp.ones((2, 5, 3))
    carry, ys = module(xs, lengths=jnp.array([5, 2]))
    params = module.pure_params
    want = recurrent.rnn(janet(4)).apply(params, xs, lengths=jnp.array([5, 2]))
    np.testing.assert_allclose(ys, want[1], atol=1e-6)
    assert ys.shape == (2, 5, 4) and bool((ys[1, 2:] == 0).all())


def test_a_population_of_own_cells_trains_in_one_vmapped_program():
    cell = janet(3)
    layer = recurrent.rnn(cell, recurrent_dropout=0.2)
    keys = jax.random.split(jax.random.key(0), 4)
    params = jax.vmap(lambda k: layer.init(k, (2,)))(keys)
    xs = jnp.ones((4, 2, 5, 2))

    def loss(p, x, k):
        return jnp.mean(layer.apply(p, x, key=k)[1] ** 2)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(params, xs, keys)
    one_member = jax.jit(jax.grad(loss))  # compiled once, called per member
    for m in range(4):
        one = one_member(jax.tree.map(lambda a: a[m], params), xs[m], keys[m])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[m], b, atol=1e-6), grads, one)
