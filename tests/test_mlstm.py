"""xLSTM's mLSTM: the paper's equations (a NumPy reference), the three equal forms (the scanned step,
the parallel form and the chunkwise form: values and gradients, lengths, reverse, continuation,
chunk sizes), the official implementation on the same weights and inputs, the parameter count and
the errors. The shared battery runs on the cell through ``tests/registry.py``; here it also runs on
the two whole-sequence forms."""

from __future__ import annotations

import contextlib
import functools
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import MLSTMParams, MLSTMState
from tests import test_battery as battery
from tests.fast_compiles import optimisations_off
from tests.reference_mlstm import mlstm_reference
from tests.registry import MLSTM_INIT, CellSpec, Entry, Rnn, by_id

# A form that falls back to the scan would pass every equality here without being tested.
pytestmark = pytest.mark.filterwarnings("error::recurrent.FallbackWarning")

T = 7
LENGTHS = np.array([T, 4, 0], np.int32)
_gate = jax.nn.initializers.normal(0.5)
CONFIGS = {  # the paper's form, and every option on
    "paper": dict(num_heads=2),
    "options": dict(
        num_heads=2,
        forget_gate="exp",
        gates_from="qkv",
        output_gate=False,
        layer_norm=True,
        gate_soft_cap=3.0,
        forget_bias_init=jax.nn.initializers.normal(0.5),
    ),
}
# (implementation, chunk_size): chunks of 1, 3 (T is not a multiple), T and more than T
FORMS64 = [("parallel", 64), ("chunkwise", 1), ("chunkwise", 3)]
FORMS32 = [("parallel", 64), ("chunkwise", T), ("chunkwise", T + 5)]


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    with optimisations_off():
        yield


def make(config="paper", H=4, chunk_size=64, **kwargs):
    return recurrent.mlstm(H, gate_kernel_init=_gate, chunk_size=chunk_size, **{**CONFIGS[config], **kwargs})


def sample(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def random_carry(cell, params, batch, seed, dtype=np.float32):
    """A starting carry far from zero (its stabiliser too), so that its terms matter."""
    zero = cell.initial_carry(params, (*batch, 1))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.7, a.shape).astype(dtype)), zero)


@functools.cache
def jitted(layer):
    return jax.jit(layer.apply)


def reference_args(config, params):
    # the reference reads the layer norm from `norm_scale`, and needs no initialisers
    options = {k: v for k, v in CONFIGS[config].items() if not k.endswith("_init") and k != "layer_norm"}
    return {**params._asdict(), **options}


@functools.cache
def value_and_grad(config, implementation, chunk_size, dtype, reverse=False):
    """Jitted ``(carry, ys), grads`` w.r.t. ``(params, xs, carry)`` of a loss over every output and
    carry leaf, with ``LENGTHS``."""
    cell = make(config, chunk_size=chunk_size, param_dtype=dtype)
    layer = recurrent.rnn(cell, implementation=implementation, reverse=reverse)
    weights = sample((len(LENGTHS), T, 4), 3, dtype)

    def loss(params, xs, carry):
        out = layer.apply(params, xs, lengths=LENGTHS, carry=carry)
        carry, ys = out
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry)), out

    return cell, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def run_form(config, implementation, chunk_size, dtype, reverse=False):
    cell, fn = value_and_grad(config, implementation, chunk_size, np.dtype(dtype).name, reverse)
    params = cell.init(jax.random.key(1), (3,))
    xs = sample((len(LENGTHS), T, 3), 2, dtype)
    carry = random_carry(cell, params, (len(LENGTHS),), 4, dtype)
    (_, out), grads = fn(params, xs, carry)
    return jax.device_get(out), jax.device_get(grads)


# --------------------------------------------------------------------------------------
# The paper's equations


@pytest.mark.parametrize(
    "config, implementation",
    [("paper", "scan"), ("options", "scan"), ("options", "parallel"), ("options", "chunkwise")],
)
def test_matches_the_papers_equations(config, implementation):
    """All three forms against the unstabilised recurrence of the paper in NumPy float64, from a
    starting carry, with lengths (each sequence run alone on its valid steps)."""
    cell = make(config, chunk_size=3)
    params = cell.init(jax.random.key(1), (3,))
    xs = sample((len(LENGTHS), T, 3), 2)
    carry = random_carry(cell, params, (len(LENGTHS),), 4)
    out = jitted(recurrent.rnn(cell, implementation=implementation))(params, xs, lengths=LENGTHS, carry=carry)
    got_carry, ys = jax.device_get(out)
    for b, L in enumerate(LENGTHS):
        start = tuple(np.asarray(leaf[b]) for leaf in carry)
        ref_ys, ref_carry = mlstm_reference(xs[b, :L], carry=start, **reference_args(config, params))
        np.testing.assert_allclose(ys[b, :L], ref_ys, atol=1e-5, rtol=1e-5)
        assert np.all(ys[b, L:] == 0)
        for got, want in zip(got_carry, ref_carry):
            np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-5)


def test_reference_is_the_stabilised_recurrence_in_float64():
    with jax.enable_x64(True):
        cell = make("options", param_dtype=jnp.float64)
        params = cell.init(jax.random.key(1), (3,))
        xs = sample((1, T, 3), 5, np.float64)
        carry, ys = jax.device_get(jitted(recurrent.rnn(cell, implementation="parallel"))(params, xs))
    ref_ys, ref_carry = mlstm_reference(xs[0], **reference_args("options", params))
    np.testing.assert_allclose(ys[0], ref_ys, atol=1e-12, rtol=1e-10)
    for got, want in zip(carry, ref_carry):
        np.testing.assert_allclose(got[0], want, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------------------
# Three equal forms


def assert_forms_equal(config, dtype, tolerance, forms, reverse=False):
    scan_out, scan_grads = run_form(config, "scan", 64, dtype, reverse)
    assert np.abs(scan_out[1]).max() > 1e-3
    for path, g in jax.tree_util.tree_flatten_with_path(scan_grads)[0]:
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    for implementation, chunk_size in forms:
        out, grads = run_form(config, implementation, chunk_size, dtype, reverse)
        label = f"{implementation}, chunk_size={chunk_size}"
        chex.assert_trees_all_close(out, scan_out, atol=tolerance, rtol=tolerance, custom_message=label)
        chex.assert_trees_all_close(grads, scan_grads, atol=tolerance, rtol=tolerance, custom_message=label)


def test_three_forms_agree_in_float64():
    """Values and gradients (parameters, inputs, starting carry) of the scan, the parallel form and
    the chunkwise form (chunks of 1 and 3, T = 7) to 1e-10, with lengths (among them 0) and a
    starting carry, every option on."""
    with jax.enable_x64(True):
        assert_forms_equal("options", np.float64, 1e-10, FORMS64)


def test_three_forms_agree_in_float32():
    """The same in float32 to 1e-5, the paper's form, chunks of T and more than T."""
    assert_forms_equal("paper", np.float32, 1e-5, FORMS32)


def test_three_forms_agree_reversed():
    with jax.enable_x64(True):
        assert_forms_equal("options", np.float64, 1e-10, [("chunkwise", 3)], reverse=True)


def test_continuation_first_half_then_second_half():
    """``carry=``: the carry after the first half, fed to the second half, gives the whole
    sequence's outputs and carry (of the scan). The battery checks the parallel form so."""
    cell = make("options", chunk_size=3)
    params = cell.init(jax.random.key(1), (3,))
    xs = sample((len(LENGTHS), T, 3), 6)
    start = random_carry(cell, params, (len(LENGTHS),), 7)
    split = 4
    first = np.minimum(LENGTHS, split)
    apply = jitted(recurrent.rnn(cell, implementation="chunkwise"))
    c1, y1 = apply(params, xs[:, :split], lengths=first, carry=start)
    c2, y2 = apply(params, xs[:, split:], lengths=LENGTHS - first, carry=c1)
    whole = jitted(recurrent.rnn(cell))(params, xs, lengths=LENGTHS, carry=start)
    chex.assert_trees_all_close((c2, np.concatenate([y1, y2], axis=1)), whole, atol=1e-5, rtol=1e-5)


def _scan_lengths(fn, *args):
    lengths = []

    def walk(jaxpr):
        lengths.extend(eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan")
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return lengths


def test_the_whole_sequence_forms_have_no_step_loop():
    """The parallel form scans nothing longer than one chunk, the chunkwise form one step per chunk."""
    cell = make(chunk_size=3)
    params = cell.init(jax.random.key(1), (3,))
    xs = jnp.ones((2, 10, 3))
    lengths = {
        impl: _scan_lengths(lambda p, x, i=impl: recurrent.rnn(cell, implementation=i).apply(p, x), params, xs)
        for impl in ("scan", "parallel", "chunkwise")
    }
    assert lengths == {"scan": [10], "parallel": [1], "chunkwise": [4]}


# --------------------------------------------------------------------------------------
# The stabiliser: ties and overflow


@pytest.mark.parametrize("implementation", ["scan", "parallel", "chunkwise"])
def test_no_nan_at_stabiliser_ties_or_huge_gates(implementation):
    """Exact ties everywhere (log f = 0, log i = 0, m = 0: every max is a tie) and gate
    pre-activations whose exponentials overflow float32 (exp(200)): finite values and gradients,
    the same values in every form."""
    H, N = 4, 2
    cell = recurrent.mlstm(H, num_heads=N, forget_gate="exp", chunk_size=3)
    params = cell.init(jax.random.key(1), (3,))
    ties = params._replace(gate_kernel=jnp.zeros_like(params.gate_kernel), gate_bias=jnp.zeros(2 * N))
    huge = params._replace(gate_bias=jnp.array([200.0, -200.0, 150.0, 90.0]))
    xs = sample((len(LENGTHS), T, 3), 8)
    layer = recurrent.rnn(cell, implementation=implementation)

    def loss(params, xs):
        out = layer.apply(params, xs, lengths=LENGTHS)
        return jnp.sum(jnp.sin(out[1])) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(out[0])), out

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    for p in (ties, huge):
        (value, got), grads = value_and_grad(p, xs)
        assert np.isfinite(value)
        for g in jax.tree.leaves(grads):
            assert np.all(np.isfinite(g))
        if implementation != "scan":
            chex.assert_trees_all_close(got, jitted(recurrent.rnn(cell))(p, xs, lengths=LENGTHS), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# The official implementation (xlstm 2.0.6, mlstm_kernels 2.0.6, PyTorch)


@contextlib.contextmanager
def _torch_seed(seed):
    torch = pytest.importorskip("torch")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield torch
    finally:
        torch.random.set_rng_state(state)


def _numpy(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("implementation", ["scan", "parallel", "chunkwise"])
def test_official_mlstm_cell_through_the_converter(implementation):
    """``from_xlstm(mLSTMCell)`` on ``[q, k, v]`` gives the official cell's ``forward`` (its
    ``parallel_stabilized_simple`` and multi-head layer norm), and the scan gives its ``step`` loop
    (``recurrent_step_stabilized_simple``), outputs and state."""
    pytest.importorskip("xlstm")
    from xlstm.blocks.mlstm.cell import mLSTMCell, mLSTMCellConfig

    from recurrent.interop import from_xlstm

    H, N, B = 8, 2, 2
    with _torch_seed(0) as torch:
        official = mLSTMCell(mLSTMCellConfig(context_length=T, embedding_dim=H, num_heads=N))
        with torch.no_grad():
            for p in official.parameters():  # the defaults are zeros and constants: make every weight matter
                p.normal_(0.0, 0.5)
    cell, params = from_xlstm(official)
    cell = recurrent.mlstm(**{**cell.options, "chunk_size": 3})  # the same cell, chunks that do not divide T
    q, k, v = (sample((B, T, H), s) for s in (10, 11, 12))
    xs = np.concatenate([q, k, v], axis=-1)
    carry, ys = jitted(recurrent.rnn(cell, implementation=implementation))(params, xs)
    t = torch.from_numpy
    np.testing.assert_allclose(ys, _numpy(official(t(q), t(k), t(v))), atol=1e-5, rtol=1e-5)
    if implementation == "scan":
        state, steps = None, []
        for s in range(T):
            h, state = official.step(t(q[:, s : s + 1]), t(k[:, s : s + 1]), t(v[:, s : s + 1]), mlstm_state=state)
            steps.append(_numpy(h))
        np.testing.assert_allclose(ys, np.concatenate(steps, axis=1), atol=1e-5, rtol=1e-5)
        c, n, m = map(_numpy, state)
        chex.assert_trees_all_close(carry, MLSTMState(c, n[..., 0], m[..., 0, 0]), atol=1e-5, rtol=1e-5)


def _backend_cell(H, N, chunk_size):
    """An mLSTM whose input is ``[q, k, v, i~, f~]`` and whose output is ``h~``: identity
    projections, no output gate, no layer norm (so the cell is the official backend functions)."""
    cell = recurrent.mlstm(H, num_heads=N, output_gate=False, chunk_size=chunk_size)
    F = 3 * H + 2 * N
    eye = np.eye(F, dtype=np.float32)
    params = MLSTMParams(
        input_kernel=jnp.asarray(eye[:, : 3 * H]),
        input_bias=jnp.zeros(3 * H),
        gate_kernel=jnp.asarray(eye[:, 3 * H :]),
        gate_bias=jnp.zeros(2 * N),
    )
    return cell, params


@pytest.mark.parametrize("implementation", ["scan", "parallel", "chunkwise"])
def test_official_native_chunkwise_kernel_from_a_starting_state(implementation):
    """Given the same q, k, v, i~, f~ and starting state, every form is ``mlstm_kernels``' native
    chunkwise kernel (which scales q where we scale k: its C and n are ours times sqrt(D))."""
    pytest.importorskip("mlstm_kernels")
    torch = pytest.importorskip("torch")
    from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd

    H, N, B, L = 8, 2, 2, 4
    D, S = H // N, 12
    cell, params = _backend_cell(H, N, chunk_size=5)
    rng = np.random.default_rng(13)
    q, k, v = (rng.normal(size=(B, N, S, D)).astype(np.float32) for _ in range(3))
    i, f = rng.normal(size=(B, N, S)).astype(np.float32), (rng.normal(size=(B, N, S)) + 2.0).astype(np.float32)
    C0, n0 = rng.normal(size=(B, N, D, D)).astype(np.float32), rng.normal(size=(B, N, D)).astype(np.float32)
    m0 = rng.normal(size=(B, N)).astype(np.float32)
    t = torch.from_numpy
    h, (C, n, m) = mlstm_chunkwise__native_autograd(
        t(q), t(k), t(v), t(i), t(f), t(C0), t(n0), t(m0[..., None]), return_last_states=True, chunk_size=L
    )
    time_major = lambda a: np.moveaxis(a, 1, 2).reshape(B, S, -1)  # noqa: E731 - (B, N, S, X) -> (B, S, N*X)
    xs = np.concatenate([time_major(q), time_major(k), time_major(v), np.moveaxis(i, 1, 2), np.moveaxis(f, 1, 2)], -1)
    start = MLSTMState(jnp.asarray(C0) / math.sqrt(D), jnp.asarray(n0) / math.sqrt(D), jnp.asarray(m0))
    carry, ys = jitted(recurrent.rnn(cell, implementation=implementation))(params, xs, carry=start)
    np.testing.assert_allclose(ys, time_major(_numpy(h)), atol=1e-5, rtol=1e-5)
    official = MLSTMState(_numpy(C) / math.sqrt(D), _numpy(n) / math.sqrt(D), _numpy(m)[..., 0])
    chex.assert_trees_all_close(carry, official, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["scan", "parallel", "chunkwise"])
def test_official_xlstm_large_layer_is_the_default_form_with_layer_norm(implementation):
    """``xlstm_large``'s ``mLSTMLayer`` (q, k, v, output gate and the gates from ``x``, soft-capped
    gates, multi-head layer norm) with an identity output projection is
    ``mlstm(H, layer_norm=True, layer_norm_epsilon=1e-6, gate_soft_cap=15.0)``: outputs and state."""
    pytest.importorskip("xlstm")
    from xlstm.xlstm_large.model import mLSTMBackendConfig, mLSTMLayer, mLSTMLayerConfig

    H, N, B, S = 8, 2, 2, 8
    backend = mLSTMBackendConfig(
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        chunk_size=4,
        return_last_states=True,
        autocast_kernel_dtype="float32",
    )
    config = mLSTMLayerConfig(
        embedding_dim=H, num_heads=N, use_bias=True, norm_eps=1e-6, qk_dim_factor=1.0, v_dim_factor=1.0,
        gate_soft_cap=15.0, mlstm_backend=backend,
    )  # fmt: skip
    with _torch_seed(0) as torch:
        official = mLSTMLayer(config)
        with torch.no_grad():
            for p in official.parameters():
                p.normal_(0.0, 0.5)
            official.out_proj.weight.copy_(torch.eye(H))
            official.out_proj.bias.zero_()
            official.multihead_norm.bias.zero_()  # ours has a gain only
    projections = (official.q, official.k, official.v, official.ogate_preact)
    gates = (official.igate_preact, official.fgate_preact)
    params = MLSTMParams(
        input_kernel=jnp.asarray(np.concatenate([_numpy(p.weight).T for p in projections], axis=1)),
        input_bias=jnp.asarray(np.concatenate([_numpy(p.bias) for p in projections])),
        gate_kernel=jnp.asarray(np.concatenate([_numpy(g.weight).T for g in gates], axis=1)),
        gate_bias=jnp.asarray(np.concatenate([_numpy(g.bias) for g in gates])),
        norm_scale=jnp.asarray(_numpy(official.multihead_norm.weight)),
    )
    cell = recurrent.mlstm(H, num_heads=N, layer_norm=True, layer_norm_epsilon=1e-6, gate_soft_cap=15.0, chunk_size=3)
    xs = sample((B, S, H), 14)
    out, (C, n, m) = official(torch.from_numpy(xs))
    carry, ys = jitted(recurrent.rnn(cell, implementation=implementation))(params, xs)
    np.testing.assert_allclose(ys, _numpy(out), atol=1e-5, rtol=1e-5)
    D = H // N
    official_carry = MLSTMState(_numpy(C) / math.sqrt(D), _numpy(n) / math.sqrt(D), _numpy(m)[..., 0])
    chex.assert_trees_all_close(carry, official_carry, atol=1e-5, rtol=1e-5)


def test_converter_refuses_a_layer_norm_with_an_offset():
    pytest.importorskip("xlstm")
    from xlstm.blocks.mlstm.cell import mLSTMCell, mLSTMCellConfig
    from xlstm.components.ln import MultiHeadLayerNorm

    from recurrent.interop import from_xlstm

    official = mLSTMCell(mLSTMCellConfig(context_length=4, embedding_dim=4, num_heads=2))
    official.outnorm = MultiHeadLayerNorm(ndim=4, weight=True, bias=True)
    with clear_error("offset", "bias=False"):
        from_xlstm(official)


# --------------------------------------------------------------------------------------
# Parameters and errors


@pytest.mark.parametrize("F, H, N", [(1, 1, 1), (3, 8, 2), (5, 12, 4)])
def test_parameter_count_formula(F, H, N):
    """``(F + 1)(3 + o) H + (G + 1) 2N + l H``: o = output gate, G = F or 3H (gates from q, k, v),
    l = layer norm."""
    for output_gate in (True, False):
        for gates_from in ("input", "qkv"):
            for layer_norm in (False, True):
                cell = recurrent.mlstm(
                    H, num_heads=N, output_gate=output_gate, gates_from=gates_from, layer_norm=layer_norm
                )
                G = F if gates_from == "input" else 3 * H
                want = (F + 1) * (3 + output_gate) * H + (G + 1) * 2 * N + layer_norm * H
                assert recurrent.count_params(cell.init(jax.random.key(0), (F,))) == want
    assert recurrent.count_params(recurrent.mlstm(H, num_heads=N).init(jax.random.key(0), (F,))) == (F + 1) * (
        4 * H + 2 * N
    )


def test_official_initialisation():
    """Forget-gate biases 3 ... 6 across heads, zero gate kernels, small-init projections."""
    params = recurrent.mlstm(64, num_heads=4).init(jax.random.key(0), (256,))
    np.testing.assert_allclose(params.gate_bias[4:], [3.0, 4.0, 5.0, 6.0])
    assert np.all(params.gate_kernel == 0)
    np.testing.assert_allclose(np.std(params.input_kernel), math.sqrt(2 / (5 * 256)), rtol=0.05)


@contextlib.contextmanager
def clear_error(*words):
    with pytest.raises(ValueError) as info:
        yield
    message = str(info.value)
    for part in ("expected:", "got:", "fix:", *words):
        assert part in message, f"message lacks {part!r}:\n{message}"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(hidden_size=6, num_heads=4), ("multiple of `num_heads`", "num_heads=4", "num_heads=3")),
        (dict(hidden_size=8, num_heads=0), ("num_heads", "positive int")),
        (dict(hidden_size=8, num_heads=2.0), ("num_heads", "2.0")),
        (dict(hidden_size=8, num_heads=True), ("num_heads",)),
        (dict(hidden_size=8, num_heads=2, forget_gate="tanh"), ("forget_gate", "'sigmoid' or 'exp'")),
        (dict(hidden_size=8, num_heads=2, gates_from="x"), ("gates_from", "'qkv'")),
        (dict(hidden_size=8, num_heads=2, chunk_size=0), ("chunk_size",)),
        (dict(hidden_size=8, num_heads=2, eps=-1.0), ("eps", "non-negative")),
        (dict(hidden_size=8, num_heads=2, gate_soft_cap=0.0), ("gate_soft_cap", "positive")),
    ],
)
def test_bad_options_are_refused(kwargs, words):
    with clear_error(*words):
        recurrent.mlstm(**kwargs)


def test_bad_inputs_and_regularisers_are_refused():
    cell = make()
    params = cell.init(jax.random.key(0), (3,))
    for implementation in ("scan", "parallel", "chunkwise"):
        with clear_error("input feature shape", "(*batch, 3)"):
            recurrent.rnn(cell, implementation=implementation).apply(params, jnp.ones((2, 4, 5)))
    with clear_error("(features,)"):
        cell.init(jax.random.key(0), (3, 2))
    with clear_error("recurrent_dropout", "mlstm declares none"):
        recurrent.rnn(cell, recurrent_dropout=0.1)
    with clear_error("dropconnect", "mlstm declares none"):
        recurrent.rnn(cell, dropconnect=0.1)
    for key in (None, jax.random.key(0)):  # evaluation and training
        with clear_error("zoneout", "MLSTMState"):
            recurrent.rnn(cell, zoneout=0.1).apply(params, jnp.ones((2, 4, 3)), key=key)
    with clear_error("unknown `implementation`", "'chunkwise'"):
        recurrent.rnn(cell, implementation="chunked")
    with clear_error("unknown `implementation`"):
        recurrent.rnn(recurrent.lstm(4), implementation="chunkwise")  # the LSTM declares no such form


def test_input_dropout_runs_on_the_scan_and_the_forms_fall_back_with_a_reason():
    cell = make()
    params = cell.init(jax.random.key(0), (3,))
    xs = jnp.ones((2, 4, 3))
    apply = jitted(recurrent.rnn(cell, implementation="parallel", input_dropout=0.5))
    with pytest.warns(recurrent.FallbackWarning, match="dropout is on in training"):
        _, train = apply(params, xs, key=jax.random.key(1))
    _, clean = apply(params, xs)
    assert not np.allclose(train, clean)


# --------------------------------------------------------------------------------------
# The shared battery on the whole-sequence forms


def _cell(**kwargs):
    return CellSpec(recurrent.mlstm, 4, num_heads=2, **MLSTM_INIT, **kwargs)


KERNELS = [
    Entry("mlstm_parallel", Rnn(_cell(), implementation="parallel"), (3,)),
    Entry("mlstm_chunkwise_2_reverse", Rnn(_cell(chunk_size=2), implementation="chunkwise", reverse=True), (2,)),
]
CHECKS = {  # the battery's checks, shared between the two forms
    "mlstm_parallel": [
        "test_lengths_match_per_sequence_runs",
        "test_gradients_match_finite_differences",
        "test_bfloat16_compute_keeps_float32_state",
        "test_chunked_feeding_matches_one_apply",
        "test_zero_length_time_axis",
    ],
    "mlstm_chunkwise_2_reverse": [
        "test_lengths_match_per_sequence_runs",
        "test_reversed_matches_forward_on_reversed_sequences",
        "test_gradients_match_finite_differences",
        "test_float64_under_x64",
    ],
}


@pytest.mark.parametrize("entry, check", [pytest.param(e, c, id=f"{e.id}-{c}") for e in KERNELS for c in CHECKS[e.id]])
def test_the_battery_on_the_whole_sequence_forms(entry, check):
    getattr(battery, check)(entry=entry)


@pytest.mark.parametrize("entry", KERNELS, ids=lambda e: e.id)
def test_resets_fall_back_to_the_scan_with_a_warning(entry):
    """The driver runs ``resets`` on the scan (which the battery checks on the cell)."""
    resets = jnp.zeros((2, 5), bool)
    apply = lambda p, x: entry.layer().apply(p, x, resets=resets)  # noqa: E731
    with pytest.warns(recurrent.FallbackWarning, match="resets"):
        jax.eval_shape(apply, entry.init(), jnp.ones((2, 5, *entry.input_shape)))


def test_a_population_of_mlstms():
    """``jax.vmap`` over ``init`` and ``apply`` (the battery's population check, for the mLSTM)."""
    battery.test_vmap_init_population_matches_per_member(entry=by_id("mlstm"))
