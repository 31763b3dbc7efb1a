"""ConvLSTM and ConvGRU are the LSTM and GRU families with a convolution where those have a matmul,
so every option of the gate arithmetic reaches them.

Checked here: the options that the convolutional cells gained (CIFG, cell clipping, layer norm with
gate ablations, peepholes on the gates present, activations) against the independent float64
NumPy reference of ``tests/reference_family.py`` (whose convolution is the explicit sliding window
of ``tests/reference.py``); scan == a Python loop of steps and lengths == per-sequence runs; a
ConvLSTM (ConvGRU) with a 1-wide kernel on a 1-wide image == the dense LSTM (GRU) with the same
options and weights, values and gradients; parameter counts; the options refused; and that the
convolutional cells declare none of the dense whole-layer kernels.

Every parameter is drawn at random (layer-norm gains around 1), so no term can hide behind a zero.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import reference_family as ref
from tests.fast_compiles import optimisations_off
from tests.registry import step_loop

B, T, H, C = 2, 5, 2, 2
LENGTHS = np.array([T, 2])
TOL64 = dict(rtol=1e-10, atol=1e-10)
_relu = lambda x: np.maximum(x, 0.0)  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Many tiny programs; results are compared in float64, so unoptimised code is fine."""
    with optimisations_off():
        yield


def randomize(params, seed):
    """Every leaf drawn anew in float64: layer-norm gains ``1 + 0.3 N``, the rest ``0.8 N``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = getattr(path[-1], "name", "").endswith("scale")
        value = (1.0 if scale else 0.0) + (0.3 if scale else 0.8) * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, jnp.float64)

    return jax.tree_util.tree_map_with_path(draw, params)


def random_params(cell, input_shape, seed):
    shapes = jax.eval_shape(lambda key: cell.init(key, input_shape), jax.random.key(0))
    return randomize(shapes, seed)


def sample(shape, seed):
    return np.random.default_rng(1000 + seed).standard_normal(shape)


# --------------------------------------------------------------------------------------
# ConvLSTM options against the reference


# id: (options of conv_lstm, what the reference computes (written independently), kernel, spatial)
CASES = {
    "cifg_peephole_2d": (dict(coupled=True, peephole=True), dict(coupled=True), (2, 3), (3, 4)),
    "cell_clip": (dict(cell_clip=0.3), dict(cell_clip=0.3), (3,), (5,)),
    "layer_norm_no_output_gate": (
        dict(layer_norm=True, output_gate=False, peephole=True),
        dict(output_gate=False),
        (3,),
        (4,),
    ),
    "peephole_no_input_gate": (dict(peephole=True, input_gate=False), dict(input_gate=False), (3,), (5,)),
    "no_forget_gate": (dict(forget_gate=False, peephole=True), dict(forget_gate=False), (2,), (5,)),
    "activations": (
        dict(input_activation=None, output_activation=jax.nn.relu),
        dict(input_activation=ref.identity, output_activation=_relu),
        (3,),
        (4,),
    ),
    "everything_2d": (
        dict(coupled=True, peephole=True, layer_norm=True, cell_clip=0.5, output_activation=None),
        dict(coupled=True, cell_clip=0.5, output_activation=ref.identity),
        (3, 2),
        (3, 3),
    ),
}


def _conv_lstm(case_id):
    options, _, kernel, _ = CASES[case_id]
    return recurrent.conv_lstm(H, kernel, **options)


def _reference(case_id, params):
    """The reference with ``params``, after checking that exactly the fields the options call
    for exist (a peephole for each sigmoid gate present)."""
    options, expected, _, _ = CASES[case_id]
    has = {
        "input": expected.get("input_gate", True) and not expected.get("coupled", False),
        "forget": expected.get("forget_gate", True),
        "output": expected.get("output_gate", True),
    }
    for gate, present in has.items():
        assert (getattr(params, f"peephole_{gate}") is not None) == (options.get("peephole", False) and present)
    assert params.bias.shape == ((1 + sum(has.values())) * H,)
    assert (params.layer_norm is not None) == options.get("layer_norm", False)
    return functools.partial(
        ref.conv_lstm,
        W=params.input_kernel,
        U=params.recurrent_kernel,
        b=params.bias,
        p_i=params.peephole_input,
        p_f=params.peephole_forget,
        p_o=params.peephole_output,
        ln=None if params.layer_norm is None else tuple(params.layer_norm),
        **expected,
    )


@functools.cache
def _run(case_id):
    """The case's cell, float64 parameters and inputs, and ``rnn(...).apply`` with lengths and
    its trace (jitted)."""
    _, _, _, spatial = CASES[case_id]
    cell = _conv_lstm(case_id)
    params = random_params(cell, (*spatial, C), seed=len(case_id))
    xs = sample((B, T, *spatial, C), seed=len(case_id))
    apply = functools.partial(recurrent.rnn(cell).apply, lengths=LENGTHS, return_trace=True)
    return cell, params, xs, jax.jit(apply)(params, xs)


@pytest.mark.parametrize("case_id", CASES)
def test_conv_lstm_matches_reference(case_id):
    with jax.enable_x64(True):
        cell, params, xs, (carry, ys, trace) = _run(case_id)
        ys_ref, carries_ref = ref.run_lengths(_reference(case_id, params), xs, LENGTHS)
        assert ys.dtype == jnp.float64 and ys.shape == ys_ref.shape == (B, T, *xs.shape[2:-1], H)
        np.testing.assert_allclose(ys, ys_ref, **TOL64)
        for b, (h, c) in enumerate(carries_ref):
            np.testing.assert_allclose(carry.h[b], h[0], **TOL64)
            np.testing.assert_allclose(carry.c[b], c[0], **TOL64)
        gates = {"input": "input_gate", "forget": "forget_gate", "output": "output_gate"}
        expected = CASES[case_id][1]
        present = {g for g, o in gates.items() if expected.get(o, True)} - (
            {"input"} if "coupled" in expected else set()
        )
        assert set(trace.gates) == present | {"cell"}


@pytest.mark.parametrize("case_id", ["cell_clip", "everything_2d"])
def test_cell_clip_is_engaged(case_id):
    """The clip really clips (else the comparison would prove nothing): the reference without it
    differs, and the cell state touches the bound."""
    with jax.enable_x64(True):
        _, params, xs, (_, _, trace) = _run(case_id)
        fn = _reference(case_id, params)
        assert np.abs(fn(xs)[0] - fn(xs, cell_clip=None)[0]).max() > 1e-3
        bound = CASES[case_id][1]["cell_clip"]
        c = np.asarray(trace.carries.c)
        assert np.abs(c).max() <= bound + 1e-12 and np.isclose(np.abs(c), bound).any()


# --------------------------------------------------------------------------------------
# Battery checks: scan == Python loop of steps; lengths == each sequence run alone


BATTERY = {
    "conv_lstm_everything_2d": (lambda: _conv_lstm("everything_2d"), (3, 3, C)),
    "conv_lstm_no_forget_gate": (lambda: _conv_lstm("no_forget_gate"), (5, C)),
    "conv_gru_before_ln": (lambda: recurrent.conv_gru(H, (3,), reset_after=False, layer_norm=True), (4, C)),
}


@pytest.mark.parametrize("name", BATTERY)
def test_scan_loop_and_lengths(name):
    make, input_shape = BATTERY[name]
    cell = make()
    with jax.enable_x64(True):
        params = random_params(cell, input_shape, seed=3)
        xs = sample((B, T, *input_shape), seed=4)
        apply = jax.jit(lambda p, x, lengths: recurrent.rnn(cell).apply(p, x, lengths=lengths))
        carry, ys = apply(params, xs, None)
        loop_carry, loop_ys = step_loop(cell, params, xs)
        np.testing.assert_allclose(ys, loop_ys, **TOL64)
        for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(loop_carry), strict=True):
            np.testing.assert_allclose(a, b, **TOL64)
        carry, ys = apply(params, xs, LENGTHS)
        for b, length in enumerate(LENGTHS):
            alone_carry, alone_ys = apply(params, xs[b : b + 1, :length], None)
            np.testing.assert_allclose(ys[b, :length], alone_ys[0], **TOL64)
            assert np.all(np.asarray(ys[b, length:]) == 0)
            for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(alone_carry), strict=True):
                np.testing.assert_allclose(got[b], want[0], **TOL64)


# --------------------------------------------------------------------------------------
# A 1-wide kernel over a 1-wide image is the dense cell: values and gradients


# Between them they take every branch of the gate arithmetic: the written-out elementwise half
# (coupled or not) and the general one with each gate removed, layer norm, clipping, activations.
LSTM_OPTIONS = {
    "cifg_peephole": dict(coupled=True, peephole=True),
    "peephole_layer_norm_clip_2d": dict(peephole=True, layer_norm=True, cell_clip=0.4),
    "no_input_gate": dict(input_gate=False, peephole=True),
    "no_forget_gate_layer_norm": dict(forget_gate=False, peephole=True, layer_norm=True),
    "no_output_gate_clip_activations": dict(
        output_gate=False, peephole=True, cell_clip=0.5, input_activation=None, output_activation=jax.nn.soft_sign
    ),
}
GRU_OPTIONS = {"reset_after_ln": dict(layer_norm=True), "reset_before_ln": dict(reset_after=False, layer_norm=True)}


def _as_dense(params, dense_type, spatial_rank):
    """The dense parameters of a 1-wide convolution's: kernels ``(1, ..., fan_in, O)`` become
    ``(fan_in, O)``, peepholes ``(1, ..., H)`` become ``(H,)``; the rest is shared."""
    fields = params._asdict()
    for name in ("input_kernel", "recurrent_kernel"):
        fields[name] = fields[name].reshape(fields[name].shape[spatial_rank:])
    for name in ("peephole_input", "peephole_forget", "peephole_output"):
        if fields.get(name) is not None:
            fields[name] = fields[name].reshape(-1)
    return dense_type(**fields)


def _equivalence(conv_cell, dense_cell, dense_type, spatial, seed):
    n = len(spatial)
    with jax.enable_x64(True):
        p_conv = random_params(conv_cell, (*spatial, C), seed)
        p_dense = _as_dense(p_conv, dense_type, n)
        xs_dense = sample((B, T, C), seed)
        xs_conv = xs_dense.reshape((B, T, *spatial, C))

        def loss(cell, p, xs):
            carry, ys = recurrent.rnn(cell).apply(p, xs, lengths=LENGTHS)
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(v**2) for v in jax.tree.leaves(carry)), (carry, ys)

        grad = lambda cell: jax.jit(jax.value_and_grad(functools.partial(loss, cell), (0, 1), has_aux=True))  # noqa: E731
        (l_conv, (c_conv, y_conv)), (g_conv, gx_conv) = grad(conv_cell)(p_conv, xs_conv)
        (l_dense, (c_dense, y_dense)), (g_dense, gx_dense) = grad(dense_cell)(p_dense, xs_dense)
        assert y_conv.shape == (B, T, *spatial, H)
        np.testing.assert_allclose(y_conv.reshape(y_dense.shape), y_dense, **TOL64)
        for a, b in zip(jax.tree.leaves(c_conv), jax.tree.leaves(c_dense), strict=True):
            np.testing.assert_allclose(a.reshape(b.shape), b, **TOL64)
        np.testing.assert_allclose(l_conv, l_dense, **TOL64)
        np.testing.assert_allclose(gx_conv.reshape(gx_dense.shape), gx_dense, **TOL64)
        g_conv = _as_dense(g_conv, dense_type, n)
        for a, b in zip(jax.tree.leaves(g_conv), jax.tree.leaves(g_dense), strict=True):
            np.testing.assert_allclose(a, b, **TOL64)
        assert np.abs(np.asarray(y_dense)).max() > 1e-2  # not a degenerate comparison


@pytest.mark.parametrize("name", LSTM_OPTIONS)
def test_one_wide_conv_lstm_is_the_lstm(name):
    options = LSTM_OPTIONS[name]
    spatial = (1, 1) if name.endswith("_2d") else (1,)
    conv = recurrent.conv_lstm(H, (1,) * len(spatial), **options)
    _equivalence(conv, recurrent.lstm(H, **options), recurrent.LSTMParams, spatial, seed=len(name))


@pytest.mark.parametrize("name", GRU_OPTIONS)
def test_one_wide_conv_gru_is_the_gru(name):
    options = GRU_OPTIONS[name]
    conv = recurrent.conv_gru(H, (1,), **options)
    _equivalence(conv, recurrent.gru(H, **options), recurrent.GRUParams, (1,), seed=len(name))


# --------------------------------------------------------------------------------------
# Parameters, refusals, kernels


@pytest.mark.parametrize(
    "options, gates, peepholes",
    [
        ({}, 4, 0),
        (dict(coupled=True), 3, 0),
        (dict(coupled=True, peephole=True), 3, 2),
        (dict(input_gate=False, peephole=True, layer_norm=True), 3, 2),
        (dict(output_gate=False, cell_clip=1.0), 3, 0),
        (dict(peephole=True, layer_norm=True), 4, 3),
    ],
)
def test_parameter_counts(options, gates, peepholes):
    K, S = (3, 2), (4, 5)
    cell = recurrent.conv_lstm(H, K, **options)
    params = jax.eval_shape(lambda key: cell.init(key, (*S, C)), jax.random.key(0))
    k = math.prod(K)
    expected = gates * H * (k * (C + H) + 1) + peepholes * math.prod(S) * H
    if options.get("layer_norm"):
        expected += 2 * gates * H + 2 * H
    assert recurrent.count_params(params) == expected
    assert type(params) is recurrent.ConvLSTMParams


def _clear_error():
    """A ``ValueError`` with the library's expected / got / fix lines."""
    return pytest.raises(ValueError, match="(?s)expected:.*got:.*fix:")


@pytest.mark.parametrize(
    "options, word",
    [
        (dict(proj_size=2), "proj_size"),
        (dict(proj_clip=0.5), "proj_clip"),
        (dict(gate_recurrence=True), "gate_recurrence"),
        (dict(projection_init=jax.nn.initializers.zeros), "projection_init"),
        (dict(peephole_size=2), "unknown option"),
        (dict(coupled=True, forget_gate=False), "coupled"),
        (dict(forget_gate=False, bias_init=recurrent.chrono_init(10)), "forget gate"),
        (dict(cell_clip=-1.0), "cell_clip"),
    ],
)
def test_refused_options_say_why(options, word):
    with _clear_error() as info:
        recurrent.conv_lstm(H, (3,), **options)
    assert word in str(info.value)


def test_dense_only_options_at_their_defaults_are_accepted():
    cell = recurrent.conv_lstm(H, (3,), proj_size=None, proj_clip=None, gate_recurrence=False)
    assert type(cell.init(jax.random.key(0), (4, C))) is recurrent.ConvLSTMParams


def test_convolutional_cells_declare_no_dense_kernels():
    """The exact whole-layer kernels run matmuls: the convolutional cells never declare them
    (and fall back to the scan, with a warning), while the dense family keeps them."""
    for cell in (recurrent.conv_lstm(H, (3,)), recurrent.conv_lstm(H, (3,), coupled=True), recurrent.conv_gru(H, (3,))):
        assert dict(cell.spec.kernels) == {}, cell.name
    assert isinstance(recurrent.lstm(H).spec.kernels["vjp"], recurrent.SequenceKernel)
    assert isinstance(recurrent.gru(H).spec.kernels["vjp"], recurrent.SequenceKernel)
    cell = recurrent.conv_lstm(H, (3,), coupled=True)
    params = cell.init(jax.random.key(0), (4, C))
    xs = jnp.ones((B, T, 4, C))
    with pytest.warns(recurrent.FallbackWarning, match="conv_lstm"):
        fast = recurrent.rnn(cell, implementation="vjp").apply(params, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        plain = recurrent.rnn(cell).apply(params, xs)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)
