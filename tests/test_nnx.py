"""Tests of ``recurrent.nnx``: the NNX modules are thin holders of the functional parameters.

They check that every module gives exactly the functional results on its own parameters
(values and gradients), that all weights are ``nnx.Param`` with readable paths and the
functional parameter count, that the modules work with ``nnx.jit``, ``nnx.vmap``,
``jax.vmap`` and ``lengths``, and that a small NNX model trains end to end with optax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recurrent
from recurrent import nnx as rnnx
from tests.fast_compiles import optimisations_off

F = 4  # input features of the dense cases


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Small modules compiled for a call or two each: XLA's optimisation passes would take most of
    the time."""
    with optimisations_off():
        yield


def _lengths(batch: int, T: int) -> jax.Array:
    return jnp.array([T, 0, 1, T - 2][:batch], dtype=jnp.int32)


# name -> (build(rngs) -> module, functional layer the module must agree with, one step's input shape)
CASES = {
    "lstm": (lambda r: rnnx.LSTM(F, 6, rngs=r), recurrent.rnn(recurrent.lstm(6)), (F,)),
    "lstm_reverse": (
        lambda r: rnnx.LSTM(F, 6, reverse=True, rngs=r),
        recurrent.rnn(recurrent.lstm(6), reverse=True),
        (F,),
    ),
    "peephole_lstm": (
        lambda r: rnnx.PeepholeLSTM(F, 5, peephole_init=jax.nn.initializers.normal(0.5), rngs=r),
        recurrent.rnn(recurrent.peephole_lstm(5)),
        (F,),
    ),
    "cifg_lstm": (
        lambda r: rnnx.CIFGLSTM(F, 5, peephole=True, rngs=r),
        recurrent.rnn(recurrent.cifg_lstm(5, peephole=True)),
        (F,),
    ),
    "gru": (
        lambda r: rnnx.GRU(F, 7, reset_after=False, rngs=r),
        recurrent.rnn(recurrent.gru(7, reset_after=False)),
        (F,),
    ),
    "conv_lstm": (
        lambda r: rnnx.ConvLSTM((5, 5, 2), 3, (3, 3), peephole=True, rngs=r),
        recurrent.rnn(recurrent.conv_lstm(3, (3, 3), peephole=True)),
        (5, 5, 2),
    ),
    "slstm": (
        lambda r: rnnx.SLSTM(F, 4, num_heads=2, rngs=r),
        recurrent.rnn(recurrent.slstm(4, num_heads=2)),
        (F,),
    ),
    "mlstm_chunkwise": (
        lambda r: rnnx.MLSTM(F, 4, num_heads=2, implementation="chunkwise", chunk_size=4, rngs=r),
        recurrent.rnn(recurrent.mlstm(4, num_heads=2, chunk_size=4), implementation="chunkwise"),
        (F,),
    ),
    "min_gru_parallel_reverse": (
        lambda r: rnnx.MinGRU(F, 5, reverse=True, implementation="parallel", rngs=r),
        recurrent.rnn(recurrent.min_gru(5), reverse=True, implementation="parallel"),
        (F,),
    ),
    "min_lstm": (lambda r: rnnx.MinLSTM(F, 5, rngs=r), recurrent.rnn(recurrent.min_lstm(5)), (F,)),
    "rnn_of_layer": (
        lambda r: rnnx.RNN(recurrent.rnn(recurrent.gru(6), reverse=True), (F,), rngs=r),
        recurrent.rnn(recurrent.gru(6), reverse=True),
        (F,),
    ),
    "bidirectional_concat": (
        lambda r: rnnx.Bidirectional(recurrent.lstm(5), input_shape=(F,), rngs=r),
        recurrent.bidirectional(recurrent.lstm(5)),
        (F,),
    ),
    "bidirectional_mixed_sum": (
        lambda r: rnnx.Bidirectional(recurrent.gru(6), recurrent.lstm(6), input_shape=(F,), merge="sum", rngs=r),
        recurrent.bidirectional(recurrent.gru(6), recurrent.lstm(6), merge="sum"),
        (F,),
    ),
    "stacked_cells_residual": (
        lambda r: rnnx.Stacked(
            [recurrent.lstm(6), recurrent.gru(6), recurrent.cifg_lstm(6)], (F,), residual=True, rngs=r
        ),
        recurrent.rnn(recurrent.stacked([recurrent.lstm(6), recurrent.gru(6), recurrent.cifg_lstm(6)], residual=True)),
        (F,),
    ),
    "stacked_layers": (
        lambda r: rnnx.Stacked([recurrent.bidirectional(recurrent.lstm(5)), recurrent.gru(6)], (F,), rngs=r),
        recurrent.stacked([recurrent.bidirectional(recurrent.lstm(5)), recurrent.gru(6)]),
        (F,),
    ),
}


def _case(name, seed=0):
    build, layer, input_shape = CASES[name]
    module = build(nnx.Rngs(seed))
    xs = jax.random.normal(jax.random.key(seed + 1), (3, 6, *input_shape))
    return module, layer, xs


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------
# (a) exactly the functional results


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_equals_functional_layer(name):
    module, layer, xs = _case(name)
    params = module.pure_params
    assert not any(
        isinstance(v, nnx.Variable) for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    assert jax.tree.structure(params) == jax.tree.structure(layer.init(jax.random.key(0), xs.shape[2:]))
    lengths = _lengths(3, 6)
    carry, ys = module(xs, lengths=lengths)
    _assert_trees_equal((carry, ys), layer.apply(params, xs, lengths=lengths))
    assert bool((ys[1] == 0).all())  # a length-0 sequence outputs zeros
    assert module.output_shape() == tuple(layer.output_shape(xs.shape[2:])) == ys.shape[2:]
    _assert_trees_equal(module.initial_carry(xs[:, 0].shape), layer.initial_carry(params, xs[:, 0].shape))


@pytest.mark.parametrize("name", ["gru", "stacked_layers"])
def test_time_major_and_no_lengths_equal_functional(name):
    module, layer, xs = _case(name)
    xs_tm = jnp.moveaxis(xs, 1, 0)
    _assert_trees_equal(module(xs_tm, time_major=True), layer.apply(module.pure_params, xs_tm, time_major=True))


@pytest.mark.parametrize("name", ["gru", "bidirectional_concat"])
def test_gradients_equal_functional(name):
    module, layer, xs = _case(name)
    lengths = _lengths(3, 6)

    def loss_module(module):
        carry, ys = module(xs, lengths=lengths)
        return jnp.sum(ys**2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))

    def loss_functional(params):
        carry, ys = layer.apply(params, xs, lengths=lengths)
        return jnp.sum(ys**2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))

    grads = nnx.jit(nnx.grad(loss_module))(module)
    expected = jax.jit(jax.grad(loss_functional))(module.pure_params)
    got = {path: v.get_value() for path, v in nnx.to_flat_state(grads)}
    want = {("params", *map(_key_name, path)): g for path, g in jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert set(got) == set(want)
    for path, g in want.items():
        np.testing.assert_allclose(got[path], g, rtol=1e-6, atol=1e-6, err_msg=str(path))
        assert float(jnp.abs(g).max()) > 0, path


def _key_name(entry):
    """The nnx state path entry of a jax key path entry (attribute name or index)."""
    return entry.name if isinstance(entry, jax.tree_util.GetAttrKey) else entry.idx


def test_cell_module_equals_cell_step():
    cell = recurrent.stacked([recurrent.lstm(6), recurrent.peephole_lstm(6)], residual=True)
    module = rnnx.Cell(cell, (F,), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, F))  # two batch axes
    carry = module.initial_carry(x.shape)
    _assert_trees_equal(carry, cell.initial_carry(module.pure_params, x.shape))
    expected_carry = carry
    for _ in range(3):
        carry, y = module(carry, x)
        expected_carry, expected_y = cell.step(module.pure_params, expected_carry, x)
        _assert_trees_equal((carry, y), (expected_carry, expected_y))
    assert y.shape == (2, 3, 6) and module.output_shape() == (6,)


def test_step_by_step_equals_sequence():
    module = rnnx.Stacked([recurrent.lstm(6), recurrent.gru(5)], (F,), rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (2, 3, F))
    carry_seq, ys = module(xs)
    carry = module.initial_carry(xs[:, 0].shape)
    outs = []
    for t in range(xs.shape[1]):
        carry, y = module.step(carry, xs[:, t])
        outs.append(y)
    np.testing.assert_allclose(jnp.stack(outs, 1), ys, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), carry, carry_seq)


def test_carry_continues_in_chunks():
    module = rnnx.LSTM(F, 6, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (2, 8, F))
    carry, ys = module(xs)
    c1, y1 = module(xs[:, :3])
    c2, y2 = module(xs[:, 3:], carry=c1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), ys, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), c2, carry)


def test_params_argument_wraps_functional_params():
    layer = recurrent.bidirectional(recurrent.lstm(5))
    params = layer.init(jax.random.key(3), (F,))
    module = rnnx.RNN(layer, (F,), params=params)
    _assert_trees_equal(module.pure_params, params)
    xs = jax.random.normal(jax.random.key(1), (2, 4, F))
    _assert_trees_equal(module(xs), layer.apply(params, xs))
    # the parameters of another module are accepted too (nnx.Param leaves)
    other = rnnx.Bidirectional(recurrent.lstm(5), input_shape=(F,), params=module.params)
    _assert_trees_equal(other.pure_params, params)
    lstm = rnnx.LSTM(F, 5, params=params.forward)
    _assert_trees_equal(lstm(xs), recurrent.rnn(recurrent.lstm(5)).apply(params.forward, xs))


def test_rngs_draw_params_from_the_params_stream():
    a = rnnx.LSTM(F, 6, rngs=nnx.Rngs(params=7))
    b = rnnx.LSTM(F, 6, rngs=nnx.Rngs(params=7))
    c = rnnx.LSTM(F, 6, rngs=nnx.Rngs(params=8))
    _assert_trees_equal(a.pure_params, b.pure_params)
    assert not np.array_equal(a.pure_params.input_kernel, c.pure_params.input_kernel)
    rngs = nnx.Rngs(params=7)
    expected = recurrent.lstm(6).init(nnx.Rngs(params=7).params(), (F,))
    _assert_trees_equal(rnnx.LSTM(F, 6, rngs=rngs).pure_params, expected)


def test_param_dtype_and_compute_dtype():
    module = rnnx.LSTM(F, 6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
    carry, ys = module(jnp.ones((2, 3, F), jnp.bfloat16))
    assert ys.dtype == jnp.bfloat16 and carry.c.dtype == jnp.float32
    module = rnnx.GRU(F, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert module.params.input_kernel.dtype == jnp.float32
    assert module(jnp.ones((2, 3, F)))[1].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# (b) every weight is an nnx.Param with a readable path


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_is_all_params_and_count_matches(name):
    module, layer, xs = _case(name)
    params_state = nnx.state(module, nnx.Param)
    all_state = nnx.state(module)
    assert len(jax.tree.leaves(params_state)) == len(jax.tree.leaves(all_state))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params_state))
    assert (
        n
        == recurrent.count_params(module.pure_params)
        == recurrent.count_params(layer.init(jax.random.key(0), xs.shape[2:]))
    )
    for path, v in nnx.to_flat_state(params_state):
        assert isinstance(v, nnx.Param)
        assert path[0] == "params"


def test_state_paths_are_readable():
    module = rnnx.Stacked([recurrent.bidirectional(recurrent.lstm(5)), recurrent.gru(6)], (F,), rngs=nnx.Rngs(0))
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert ("params", 0, "forward", "input_kernel") in paths
    assert ("params", 0, "backward", "recurrent_kernel") in paths
    assert ("params", 1, "recurrent_bias") in paths
    lstm = rnnx.LSTM(F, 6, rngs=nnx.Rngs(0))
    assert {p for p, _ in nnx.to_flat_state(nnx.state(lstm))} == {
        ("params", "input_kernel"),
        ("params", "recurrent_kernel"),
        ("params", "bias"),
    }
    peephole = rnnx.PeepholeLSTM(F, 6, rngs=nnx.Rngs(0))
    assert ("params", "peephole_output") in {p for p, _ in nnx.to_flat_state(nnx.state(peephole))}


def test_split_merge_roundtrip_and_update():
    module = rnnx.GRU(F, 5, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (2, 4, F))
    graphdef, state = nnx.split(module)
    clone = nnx.merge(graphdef, state)
    _assert_trees_equal(clone(xs), module(xs))
    assert float(jnp.abs(clone(xs)[1]).max()) > 0
    nnx.update(clone, jax.tree.map(jnp.zeros_like, state))
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(clone.pure_params))
    _, ys = clone(xs)
    assert float(jnp.abs(ys).max()) == 0  # zero weights, zero state -> zero output


# --------------------------------------------------------------------------------------
# transforms: nnx.jit, jax.vmap, nnx.vmap


def test_nnx_jit_equals_eager_and_does_not_retrace():
    module, _, xs = _case("stacked_layers")
    traces = []

    @nnx.jit
    def forward(module, xs, lengths):
        traces.append(1)
        return module(xs, lengths=lengths)

    lengths = _lengths(3, 6)
    jitted, eager = forward(module, xs, lengths), module(xs, lengths=lengths)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), jitted, eager)
    forward(module, xs + 1, lengths)
    assert len(traces) == 1


def test_jax_vmap_over_examples_equals_batch():
    module = rnnx.LSTM(F, 6, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (3, 6, F))
    lengths = _lengths(3, 6)
    carry, ys = module(xs, lengths=lengths)
    v_carry, v_ys = jax.vmap(lambda x, n: module(x, lengths=n))(xs, lengths)  # one unbatched sequence each
    np.testing.assert_allclose(v_ys, ys, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), v_carry, carry)


def test_nnx_vmap_ensemble():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return rnnx.GRU(F, 5, rngs=rngs)

    ensemble = create(nnx.Rngs(0))
    assert ensemble.params.input_kernel.shape == (3, F, 15)

    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def forward(model, xs):
        return model(xs)[1]

    xs = jax.random.normal(jax.random.key(1), (2, 4, F))
    ys = forward(ensemble, xs)
    assert ys.shape == (3, 2, 4, 5)
    layer = recurrent.rnn(recurrent.gru(5))
    expected = jax.vmap(lambda params: layer.apply(params, xs)[1])(ensemble.pure_params)
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ys[0], ys[1])  # members have their own parameters


# --------------------------------------------------------------------------------------
# errors


def test_errors():
    with pytest.raises(ValueError, match="exactly one of `rngs` and `params`"):
        rnnx.LSTM(F, 6)
    params = recurrent.lstm(6).init(jax.random.key(0), (F,))
    with pytest.raises(ValueError, match="exactly one"):
        rnnx.LSTM(F, 6, rngs=nnx.Rngs(0), params=params)
    with pytest.raises(ValueError, match=r"params\.input_kernel has the wrong shape(.|\n)*expected: \(5, 24\)"):
        rnnx.LSTM(5, 6, params=params)
    with pytest.raises(ValueError, match="wrong structure"):
        rnnx.GRU(F, 6, params=params)
    with pytest.raises(ValueError, match="must be an nnx.Rngs"):
        rnnx.LSTM(F, 6, rngs=jax.random.key(0))
    with pytest.raises(ValueError, match="expected a cell or a layer"):
        rnnx.RNN(rnnx.LSTM(F, 6, rngs=nnx.Rngs(0)), (F,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected a cell"):
        rnnx.Cell(recurrent.rnn(recurrent.lstm(6)), (F,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`in_features` must be a positive int"):
        rnnx.LSTM(0, 6, rngs=nnx.Rngs(0))
    birnn = rnnx.Bidirectional(recurrent.lstm(6), input_shape=(F,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has no single step(.|\n)*fix:"):
        birnn.step(None, jnp.ones((2, F)))
    with pytest.raises(ValueError, match="input feature shape does not match"):
        rnnx.LSTM(F, 6, rngs=nnx.Rngs(0))(jnp.ones((2, 3, F + 1)))


# --------------------------------------------------------------------------------------
# (c) end-to-end training of an NNX model with optax


class _SumModel(nnx.Module):
    """Linear embedding -> stacked (bidirectional LSTM, GRU) -> linear head on the final carry."""

    def __init__(self, features: int, rngs: nnx.Rngs):
        self.embed = nnx.Linear(features, 8, rngs=rngs)
        self.rnn = rnnx.Stacked([recurrent.bidirectional(recurrent.lstm(16)), recurrent.gru(16)], (8,), rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, xs, lengths):
        carry, _ = self.rnn(self.embed(xs), lengths=lengths)
        return self.head(carry[-1])[..., 0]  # the GRU state after each sequence's last valid step


def test_training_end_to_end_reduces_loss():
    """Regress the (scaled) sum of the first feature over each sequence's valid steps: the
    model must use `lengths`, since padding holds random values."""
    T, features = 12, 2

    def batch(key, n):
        kx, kl = jax.random.split(key)
        xs = jax.random.normal(kx, (n, T, features))
        lengths = jax.random.randint(kl, (n,), 1, T + 1)
        valid = jnp.arange(T) < lengths[:, None]
        return xs, lengths, jnp.where(valid, xs[..., 0], 0.0).sum(-1) / jnp.sqrt(T)

    def loss_fn(model, xs, lengths, targets):
        return jnp.mean((model(xs, lengths) - targets) ** 2)

    model = _SumModel(features, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        loss, grads = nnx.value_and_grad(loss_fn)(model, *batch(key, 64))
        optimizer.update(model, grads)
        return loss

    evaluate = nnx.jit(loss_fn)
    held_out = batch(jax.random.key(12345), 256)
    before = float(evaluate(model, *held_out))
    params_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    for i in range(100):
        train_step(model, optimizer, jax.random.key(i))
    after = float(evaluate(model, *held_out))
    assert np.isfinite(after)
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.2 * before, (before, after)
    # every recurrent weight was trained
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), params_before, nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(changed))
