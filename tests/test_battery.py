"""The shared battery: every cell and layer of ``tests/registry.py`` through the same checks.

Reference results come from Python loops over cell steps (``Entry.reference``), with each
variable-length sequence run alone on its valid prefix. Shapes are tiny and the jitted
functions are memoised per entry, so most checks reuse one compiled function.
"""

from __future__ import annotations

import math
import warnings

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import recurrent
from tests.fast_compiles import optimisations_off
from tests.registry import CELLS, FORWARD_ONLY, REGISTRY, by_id, jitted_apply, step_loop, to_numpy

each = pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.id)
# The batch and time layouts (no batch axis, several, time-major, vmapped over the batch) and
# eager execution go through the driver's and the combinators' own reshaping, which is the same
# for every cell: they are checked on an entry of every cell family, every combinator and every
# implementation, not on every option of every cell (each entry costs a compilation per check).
LAYOUT_IDS = """
    lstm gru conv_lstm_2d conv_gru_1d slstm mlstm min_gru min_lstm learned_initial_carry
    stacked_lstm_gru stacked_conv_lstm_2d stacked_mlstm_lstm rnn_reverse_gru rnn_reverse_stacked
    bidirectional_concat bidirectional_of_layers bidirectional_mlstm stacked_layers_residual reversed_stacked
    rnn_lstm_hoisted rnn_lstm_vjp rnn_gru_vjp_hoisted bidirectional_lstm_vjp rnn_stacked_remat_hoisted
    rnn_lstm_parallel_deer
""".split()
LAYOUT = [by_id(i) for i in LAYOUT_IDS]  # a renamed entry fails here rather than dropping out
layouts = pytest.mark.parametrize("entry", LAYOUT, ids=lambda e: e.id)
# Entries with implementation="vjp" are checked on the hand-written backward pass itself: a
# fall-back to the scan (which warns) fails the check, but where the fall-back is by design.
pytestmark = pytest.mark.filterwarnings("error::recurrent.FallbackWarning")


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Hundreds of tiny programs are compiled here; XLA's optimisation passes would take most
    of the battery's time. Results are compared with tolerances, so unoptimised code is fine."""
    with optimisations_off():
        yield


T = 5
BATCH = (2,)
LENGTHS = np.array([T, 2], np.int32)
BATCH3 = (3,)
LENGTHS3 = np.array([T, 2, 0], np.int32)
ATOL = 1e-5


def assert_close(actual, expected, atol=ATOL):
    """Same pytree structure and values within ``atol`` (also relative)."""
    chex.assert_trees_all_close(actual, expected, atol=atol, rtol=atol)


def index(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def run(entry, params, xs, lengths=None, carry=None, resets=None, **options):
    """The entry's jitted ``apply``, results as NumPy arrays."""
    return to_numpy(entry.apply(**options)(params, xs, lengths, carry, resets))


def padding_mask(lengths, T):
    """``(*batch, T)`` booleans, True at padded steps."""
    return np.arange(T) >= np.asarray(lengths)[..., None]


def assert_padding_is_zero(ys, lengths, T):
    padded = np.asarray(ys)[padding_mask(lengths, T)]
    assert np.all(padded == 0), "outputs at padded steps must be exactly zero"


def assert_carry_dtypes(carry, compute, state):
    """Leaves named ``h`` (LSTM family) hold the compute dtype; every other leaf (the LSTM
    cell state ``c``, the GRU's ``h`` array) is accumulated state."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
        name = getattr(path[-1], "name", None) if path else None
        expected = compute if name == "h" else state
        assert leaf.dtype == expected, f"carry{jax.tree_util.keystr(path)}: {leaf.dtype}, expected {expected}"


# --------------------------------------------------------------------------------------
# 1. scan == Python loop over step


@each
def test_scan_matches_python_loop(entry):
    params = entry.init()
    xs = entry.sample(0, BATCH, T)
    carry, ys = run(entry, params, xs)
    assert ys.shape == (*BATCH, T, *entry.output_shape())
    chex.assert_trees_all_equal_shapes_and_dtypes(
        carry, entry.layer().initial_carry(params, (*BATCH, *entry.input_shape))
    )
    assert np.abs(ys).max() > 1e-3, "degenerate test: all outputs are ~0"

    ref_carry, ref_ys = entry.reference(params, xs)
    assert_close((carry, ys), (ref_carry, ref_ys))

    if entry.is_cell:  # the cell's own step, forwards and from the end
        cell = entry.make()
        assert_close((carry, ys), step_loop(cell, params, xs))
        c_rev, y_rev = to_numpy(jitted_apply(recurrent.rnn(cell, reverse=True))(params, xs))
        assert_close((c_rev, y_rev), step_loop(cell, params, xs, reverse=True))


@pytest.mark.parametrize("entry", CELLS, ids=lambda e: e.id)
def test_step_is_project_then_recur(entry):
    cell = entry.make()
    params = entry.init()
    x = jnp.asarray(entry.sample(1, BATCH, 1)[:, 0])
    carry = jax.tree.map(lambda a: a + 0.5, cell.initial_carry(params, x.shape))
    c1, y1 = cell.step(params, carry, x)
    c2, y2 = cell.recur(params, carry, cell.project(params, x))
    assert_close((c1, y1), (c2, y2), atol=1e-6)
    assert y1.shape == (*BATCH, *cell.output_shape(entry.input_shape))


# --------------------------------------------------------------------------------------
# 2. vmap == loop


@layouts
def test_vmap_over_batch_matches_per_example(entry):
    params, layer = entry.init(), entry.layer()
    xs = entry.sample(1, BATCH3, T)
    carry, ys = to_numpy(jax.vmap(lambda x, n: layer.apply(params, x, lengths=n))(xs, LENGTHS3))
    for i in range(BATCH3[0]):
        c_i, y_i = run(entry, params, xs[i], LENGTHS3[i])  # one unbatched sequence
        assert_close(index(carry, i), c_i)
        assert_close(ys[i], y_i)


@each
def test_vmap_over_params_matches_per_member(entry):
    params, layer = entry.init(), entry.layer()
    rng = np.random.default_rng(2)
    members = [params] + [
        jax.tree.map(lambda a: np.asarray(a) * 0.8 + rng.normal(0, 0.2, np.shape(a)).astype(np.float32), params)
        for _ in range(2)
    ]
    population = jax.tree.map(lambda *leaves: np.stack(leaves), *members)
    xs = entry.sample(2, BATCH, T)
    carry, ys = to_numpy(jax.vmap(lambda p: layer.apply(p, xs, lengths=LENGTHS))(population))
    for i, member in enumerate(members):
        c_i, y_i = run(entry, member, xs, LENGTHS)
        assert_close(index(carry, i), c_i)
        assert_close(ys[i], y_i)
    assert not np.allclose(ys[0], ys[1]), "members of the population should differ"


# Initialising a population under vmap is slow to compile for every shape: a representative subset.
POPULATION_IDS = (
    "lstm gru cifg_lstm_projection_clip conv_lstm_2d stacked_residual bidirectional_concat "
    "stacked_bidirectional_then_cell"
)
POPULATION = [e for e in REGISTRY if e.id in POPULATION_IDS.split()]


@pytest.mark.parametrize("entry", POPULATION, ids=lambda e: e.id)
def test_vmap_init_population_matches_per_member(entry):
    layer = entry.layer()
    keys = jax.random.split(jax.random.key(3), 3)  # threefry: "rbg" bits are not vmap-invariant
    population = jax.vmap(lambda k: layer.init(k, entry.input_shape))(keys)
    xs = entry.sample(2, BATCH, T)
    carry, ys = to_numpy(jax.vmap(lambda p: layer.apply(p, xs, lengths=LENGTHS))(population))
    population = to_numpy(population)
    for i in range(3):
        member = layer.init(keys[i], entry.input_shape)
        assert_close(index(population, i), member, atol=1e-6)
        c_i, y_i = run(entry, member, xs, LENGTHS)
        assert_close(index(carry, i), c_i)
        assert_close(ys[i], y_i)
    assert not np.allclose(ys[0], ys[1]), "members of the population should differ"


# --------------------------------------------------------------------------------------
# 3. lengths == per-sequence runs

BATCH_SHAPES = [(), (3,), (2, 2)]


@st.composite
def batch_and_lengths(draw):
    batch = draw(st.sampled_from(BATCH_SHAPES))
    n = math.prod(batch)
    return batch, tuple(draw(st.lists(st.integers(0, T), min_size=n, max_size=n)))


@each
@settings(
    max_examples=5,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=batch_and_lengths(), seed=st.integers(0, 2**16))
@example(case=((3,), (0, T, 2)), seed=0)
@example(case=((2, 2), (T, 1, 0, 3)), seed=1)
@example(case=((), (0,)), seed=2)
@example(case=((), (T,)), seed=3)
def test_lengths_match_per_sequence_runs(entry, case, seed):
    batch, lengths = case
    lengths = np.array(lengths, np.int32).reshape(batch)
    params = entry.init()
    xs = entry.sample(seed, batch, T)
    carry, ys = run(entry, params, xs, lengths)

    ref_carries, ref_ys = entry.reference_with_lengths(params, xs, lengths)
    assert_close(ys, ref_ys)
    assert_padding_is_zero(ys, lengths, T)
    initial = to_numpy(entry.layer().initial_carry(params, entry.input_shape))
    for k, idx in enumerate(np.ndindex(*batch)):
        assert_close(index(carry, idx), ref_carries[k])
        if lengths[idx] == 0:
            chex.assert_trees_all_equal(index(carry, idx), initial)


# --------------------------------------------------------------------------------------
# 3b. resets == each segment run alone from the initial carry


@each
def test_resets_match_separate_segments(entry):
    params = entry.init()
    xs = entry.sample(12, BATCH3, T)
    resets = np.random.default_rng(12).random((*BATCH3, T)) < 0.3
    resets[0, 2] = True  # a segment boundary inside a valid prefix, at least
    resets[1, 3] = True  # in the padding of a sequence of length 2: changes nothing
    with warnings.catch_warnings():
        if entry.implementation != "scan":  # a kernel leaves resets to the scan, by design
            warnings.simplefilter("ignore", recurrent.FallbackWarning)
        carry, ys = run(entry, params, xs, LENGTHS3, resets=resets)

    ref_carries, ref_ys = entry.reference_with_resets(params, xs, LENGTHS3, resets)
    assert_close(ys, ref_ys)
    assert_padding_is_zero(ys, LENGTHS3, T)
    for k, idx in enumerate(np.ndindex(*BATCH3)):
        assert_close(index(carry, idx), ref_carries[k])
    _, ys_without = run(entry, params, xs, LENGTHS3)
    assert not np.allclose(ys[0], ys_without[0]), "degenerate test: the resets change nothing"


# --------------------------------------------------------------------------------------
# 4. reverse == forward on reversed sequences


@each
def test_reversed_matches_forward_on_reversed_sequences(entry):
    params, layer = entry.init(), entry.layer()
    xs = entry.sample(4, BATCH3, T)
    c_rev, y_rev = to_numpy(jitted_apply(layer.reversed())(params, xs, LENGTHS3))
    xs_flipped = np.asarray(recurrent.reverse_sequences(jnp.asarray(xs), jnp.asarray(LENGTHS3), 1))
    assert not np.allclose(xs_flipped, xs)
    c_fwd, y_fwd = run(entry, params, xs_flipped, LENGTHS3)
    assert_close(c_rev, c_fwd)
    assert_close(y_rev, np.asarray(recurrent.reverse_sequences(jnp.asarray(y_fwd), jnp.asarray(LENGTHS3), 1)))
    assert_padding_is_zero(y_rev, LENGTHS3, T)


def test_reverse_sequences_matches_numpy():
    xs = np.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)  # (B1, B2, T, F)
    lengths = np.array([[4, 0, 1], [2, 3, 4]])
    expected = xs.copy()
    for b1, b2 in np.ndindex(2, 3):
        n = lengths[b1, b2]
        expected[b1, b2, :n] = xs[b1, b2, :n][::-1]
    np.testing.assert_array_equal(recurrent.reverse_sequences(jnp.asarray(xs), jnp.asarray(lengths), 2), expected)
    time_major = recurrent.reverse_sequences(jnp.asarray(np.moveaxis(xs, 2, 0)), jnp.asarray(lengths), 0)
    np.testing.assert_array_equal(time_major, np.moveaxis(expected, 2, 0))
    np.testing.assert_array_equal(recurrent.reverse_sequences(jnp.asarray(xs), None, 2), xs[:, :, ::-1])


# --------------------------------------------------------------------------------------
# 5. jit == eager


@layouts
def test_jit_matches_eager(entry):
    params = entry.init()
    xs = entry.sample(5, BATCH, T)
    eager = to_numpy(entry.layer().apply(params, xs, lengths=LENGTHS))
    jitted = run(entry, params, xs, LENGTHS)
    assert_close(eager, jitted, atol=1e-6)


# --------------------------------------------------------------------------------------
# 6. gradients: finite, checked against finite differences in float64


def checkable(value_and_grad):
    """A scalar function for ``check_grads`` whose primal and VJP both come from one compiled
    ``value_and_grad`` (checking the gradient it computes, at the cost of one compilation)."""

    @jax.custom_vjp
    def f(*args):
        return value_and_grad(*args)[0]

    def f_fwd(*args):
        return value_and_grad(*args)

    def f_bwd(grads, cotangent):
        return jax.tree.map(lambda g: cotangent * g, grads)

    f.defvjp(f_fwd, f_bwd)
    return f


@each
def test_gradients_match_finite_differences(entry):
    with jax.enable_x64(True):
        params = entry.init(param_dtype=jnp.float64)
        apply = entry.apply(param_dtype=jnp.float64)
        xs = jnp.asarray(entry.sample(6, BATCH, T, np.float64))
        weights = np.random.default_rng(0).normal(size=(*BATCH, T, *entry.output_shape()))

        def loss(params, xs):  # every output and every carry leaf contributes
            carry, ys = apply(params, xs, LENGTHS)
            return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry))

        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        check_grads(checkable(value_and_grad), (params, xs), order=1, modes=["rev"])

        g_params, g_xs = to_numpy(value_and_grad(params, xs)[1])
        for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0]:
            name = jax.tree_util.keystr(path)
            assert g.dtype == np.float64, name
            assert np.all(np.isfinite(g)), f"non-finite gradient for params{name}"
            assert np.any(g != 0), f"no gradient reaches params{name}"
        assert np.all(np.isfinite(g_xs))
        assert np.all(g_xs[padding_mask(LENGTHS, T)] == 0), "inputs at padded steps must not matter"
        valid = g_xs[~padding_mask(LENGTHS, T)]  # (valid steps, *input_shape)
        assert np.all(np.abs(valid).reshape(len(valid), -1).max(axis=1) > 0), "every valid input step must matter"


def test_check_grads_catches_a_wrong_gradient():
    """The gradient check above is real: a 1% error in the gradient fails it."""
    with jax.enable_x64(True):
        layer = recurrent.rnn(recurrent.lstm(3, param_dtype=jnp.float64))
        params = layer.init(jax.random.key(0), (2,))
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 2)))

        def loss(params, xs):
            return jnp.sum(jnp.sin(layer.apply(params, xs)[1]))

        value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        check_grads(checkable(value_and_grad), (params, xs), order=1, modes=["rev"])

        def scaled(params, xs):  # 1% off everywhere
            value, grads = value_and_grad(params, xs)
            return value, jax.tree.map(lambda g: 1.01 * g, grads)

        def without_bias(params, xs):  # one parameter's gradient missing
            value, (g_params, g_xs) = value_and_grad(params, xs)
            return value, (g_params._replace(bias=jnp.zeros_like(g_params.bias)), g_xs)

        for wrong in (scaled, without_bias):
            with pytest.raises(AssertionError):
                check_grads(checkable(wrong), (params, xs), order=1, modes=["rev"])


# --------------------------------------------------------------------------------------
# 7. dtypes kept


@each
def test_float32_kept(entry):
    params = entry.init()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    carry, ys = entry.apply()(params, entry.sample(7, BATCH, T), LENGTHS)
    assert ys.dtype == jnp.float32
    assert_carry_dtypes(carry, jnp.float32, jnp.float32)


@each
def test_bfloat16_compute_keeps_float32_state(entry):
    params = entry.init(dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    xs = entry.sample(7, BATCH, T)
    carry, ys = entry.apply(dtype=jnp.bfloat16)(params, xs, LENGTHS)
    assert ys.dtype == jnp.bfloat16
    assert_carry_dtypes(carry, jnp.bfloat16, jnp.float32)
    ys = np.asarray(ys, np.float32)
    assert_padding_is_zero(ys, LENGTHS, T)
    # The same parameters computed in float32: close, at bfloat16's precision.
    _, ys32 = run(entry, params, xs, LENGTHS)
    np.testing.assert_allclose(ys, ys32, atol=0.1, rtol=0.1)
    assert not np.array_equal(ys, ys32), "bfloat16 compute should round differently from float32"


@each
def test_float64_under_x64(entry):
    with jax.enable_x64(True):
        params = entry.init(param_dtype=jnp.float64)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
        xs = entry.sample(6, BATCH, T, np.float64)
        carry, ys = entry.apply(param_dtype=jnp.float64)(params, xs, LENGTHS)
        assert ys.dtype == jnp.float64
        assert_carry_dtypes(carry, jnp.float64, jnp.float64)
    # Same parameters and inputs in float32: close, at float32's precision.
    params32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    assert_close(to_numpy((carry, ys)), run(entry, params32, xs.astype(np.float32), LENGTHS), atol=1e-4)


# --------------------------------------------------------------------------------------
# 8. chunked feeding


@pytest.mark.parametrize("entry", FORWARD_ONLY, ids=lambda e: e.id)
def test_chunked_feeding_matches_one_apply(entry):
    params = entry.init()
    xs = entry.sample(8, BATCH3, T)
    first = np.minimum(LENGTHS3, 3)
    c1, y1 = entry.apply()(params, xs[:, :3], first)
    c2, y2 = run(entry, params, xs[:, 3:], LENGTHS3 - first, c1)
    c_full, y_full = run(entry, params, xs, LENGTHS3)
    assert_close(c2, c_full)
    assert_close(np.concatenate([np.asarray(y1), y2], axis=1), y_full)


# --------------------------------------------------------------------------------------
# 9. empty time axis, empty batch, no batch axes


@each
def test_zero_length_time_axis(entry):
    params = entry.init()
    xs = entry.sample(9, BATCH, 0)
    initial = to_numpy(entry.layer().initial_carry(params, (*BATCH, *entry.input_shape)))
    for lengths in (None, np.zeros(BATCH, np.int32)):
        carry, ys = run(entry, params, xs, lengths)
        assert ys.shape == (*BATCH, 0, *entry.output_shape())
        chex.assert_trees_all_equal(carry, initial)


@each
def test_zero_size_batch(entry):
    params = entry.init()
    xs = entry.sample(9, (0,), 3)
    carry, ys = run(entry, params, xs, np.zeros((0,), np.int32))
    assert ys.shape == (0, 3, *entry.output_shape())
    chex.assert_trees_all_equal_shapes_and_dtypes(carry, entry.layer().initial_carry(params, (0, *entry.input_shape)))


@layouts
def test_unbatched_matches_batch_of_one(entry):
    params = entry.init()
    xs = entry.sample(10, (), T)
    carry, ys = run(entry, params, xs, np.int32(3))
    c1, y1 = run(entry, params, xs[None], np.array([3], np.int32))
    assert ys.shape == (T, *entry.output_shape())
    assert_close(carry, index(c1, 0))
    assert_close(ys, y1[0])


# --------------------------------------------------------------------------------------
# 10. time-major == batch-major


@layouts
def test_time_major_matches_batch_major(entry):
    params = entry.init()
    xs = entry.sample(11, (2, 2), T)  # two batch axes
    lengths = np.array([[T, 1], [0, 3]], np.int32)
    carry, ys = run(entry, params, np.moveaxis(xs, 2, 0), lengths, time_major=True)
    c_b, y_b = run(entry, params, xs, lengths)
    assert_close(carry, c_b)
    assert_close(ys, np.moveaxis(y_b, 2, 0))
    assert_padding_is_zero(np.moveaxis(ys, 0, 2), lengths, T)


# --------------------------------------------------------------------------------------
# 11. the hand-written backward pass is taken where it applies


def _primitives(fn, *args):
    names = []

    def walk(jaxpr):
        names.extend(eqn.primitive.name for eqn in jaxpr.eqns)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def _different_vjp_directions():
    lstm = recurrent.rnn(recurrent.lstm(3), implementation="vjp")
    return recurrent.bidirectional(lstm, recurrent.rnn(recurrent.gru(3), implementation="vjp")), (2,)


VJP = [pytest.param(lambda e=e: (e.layer(), e.input_shape), id=e.id) for e in REGISTRY if e.implementation == "vjp"]
# two different vjp directions: each runs its own kernel (a fused scan of their step bodies
# would bypass both without a word)
VJP.append(pytest.param(_different_vjp_directions, id="bidirectional_lstm_gru_vjp"))


@pytest.mark.parametrize("make", VJP)
def test_vjp_entries_take_the_hand_written_backward_pass(make):
    layer, input_shape = make()
    params = layer.init(jax.random.key(0), input_shape)
    xs = jnp.ones((*BATCH, T, *input_shape))
    loss = lambda p, x: jnp.sum(layer.apply(p, x, lengths=LENGTHS)[1] ** 2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)  # no fall-back to the scan
        forward = _primitives(lambda p, x: layer.apply(p, x, lengths=LENGTHS), params, xs)
        _primitives(jax.grad(loss, argnums=(0, 1)), params, xs)
        _primitives(jax.vmap(lambda x: layer.apply(params, x)), xs)
    assert any("custom_vjp" in name for name in forward), "the hand-written backward pass is not in the program"


def test_vjp_fall_back_is_seen():
    """The check above is live: where the hand-written pass does not apply, a warning says so."""
    entry = by_id("rnn_lstm_vjp")
    params = entry.init()
    xs = jnp.ones((*BATCH, T, *entry.input_shape))
    resets = jnp.zeros((*BATCH, T), bool)
    with pytest.warns(recurrent.FallbackWarning, match="resets"):
        forward = _primitives(lambda p, x: entry.layer().apply(p, x, resets=resets), params, xs)
    assert not any("custom_vjp" in name for name in forward)
