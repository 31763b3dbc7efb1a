"""xLSTM's sLSTM (``recurrent.slstm``): against an independent NumPy reference of the paper's
equations, against the unstabilised maths where exponentials overflow float32, against the
official ``xlstm`` package (vanilla PyTorch backend) on the same weights, its zoneout of the
memory as one, its parameter count and its errors. The shared battery runs it through
``tests/registry.py`` (entries ``slstm`` and ``slstm_exp_forget``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import SLSTMParams, SLSTMState
from tests import reference_xlstm as ref
from tests.fast_compiles import optimisations_off

KEY = jax.random.key(0)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Small programs compared with tolerances: XLA's optimisation passes are not needed."""
    with optimisations_off():
        yield


def random_params(F, H, K, seed, *, scale=0.5, bias=None) -> SLSTMParams:
    rng = np.random.default_rng(seed)
    D = H // K
    b = rng.normal(0, scale, 4 * H) if bias is None else bias
    return SLSTMParams(
        input_kernel=jnp.asarray(rng.normal(0, scale, (F, 4 * H)), jnp.float32),
        recurrent_kernel=jnp.asarray(rng.normal(0, scale, (K, D, 4 * D)), jnp.float32),
        bias=jnp.asarray(b, jnp.float32),
    )


def as_reference(params):
    return dict(W=np.asarray(params.input_kernel), R=np.asarray(params.recurrent_kernel), b=np.asarray(params.bias))


@functools.cache
def jitted_apply(cell):
    layer = recurrent.rnn(cell)
    return jax.jit(lambda params, xs, carry: layer.apply(params, xs, carry=carry))


@functools.cache
def jitted_trace(cell):
    """``(carries, ys)``: every step's carry ``(B, T, H)``, and the outputs."""
    layer = recurrent.rnn(cell)

    def run(params, xs, carry):
        _, ys, trace = layer.apply(params, xs, carry=carry, return_trace=True)
        return trace.carries, ys

    return jax.jit(run)


def assert_close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------
# 1. the paper's equations


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_matches_the_paper_equations(forget_gate, num_heads):
    F, H, B, T = 3, 4, 2, 8
    cell = recurrent.slstm(H, num_heads=num_heads, forget_gate=forget_gate)
    params = random_params(F, H, num_heads, seed=num_heads)
    rng = np.random.default_rng(10 + num_heads)
    xs = rng.normal(0, 1.5, (B, T, F)).astype(np.float32)
    run = jitted_trace(cell)

    # every step's state, h, c, n and m (m, unlike h, shows the stabiliser's first step)
    carries, ys = run(params, xs, cell.initial_carry(params, (B, F)))
    ref_ys, ref_states = ref.slstm(xs, **as_reference(params), forget_gate=forget_gate, every_step=True)
    assert_close(ys, ref_ys)
    for got, want in zip(carries, ref_states):
        assert_close(got, want)

    # from a state of the middle of a sequence (n > 0, m != 0)
    last = [a[:, -1] for a in ref_states]
    carries, ys = run(params, xs[:, ::-1], SLSTMState(*(jnp.asarray(a, jnp.float32) for a in last)))
    ref_ys, ref_states = ref.slstm(
        xs[:, ::-1],
        **as_reference(params),
        forget_gate=forget_gate,
        every_step=True,
        h0=last[0],
        c0=last[1],
        n0=last[2],
        m0=last[3],
    )
    assert_close(ys, ref_ys)
    for got, want in zip(carries, ref_states):
        assert_close(got, want)


def test_the_heads_are_block_diagonal():
    """Head k's units of h(t-1) reach only head k's units of each gate: the per-head kernel is the
    dense recurrent matrix with zeros off the heads."""
    H, K = 6, 3
    params = random_params(2, H, K, seed=3)
    dense = ref.slstm_dense_recurrent_kernel(np.asarray(params.recurrent_kernel))
    h = np.random.default_rng(4).normal(size=(5, H))
    np.testing.assert_allclose(ref.slstm_recurrent(h, np.asarray(params.recurrent_kernel)), h @ dense, atol=1e-12)
    assert np.count_nonzero(dense) == 4 * H * (H // K)
    # and the cell: a unit of head 0 in h(t-1) moves no gate of heads 1 and 2
    cell = recurrent.slstm(H, num_heads=K)
    carry = cell.initial_carry(params, (1, 2))._replace(n=jnp.ones((1, H)))
    bumped = carry._replace(h=carry.h.at[0, 0].set(1.0))
    x = jnp.zeros((1, 2))
    _, _, g0 = cell.probe(params, carry, cell.project(params, x))
    _, _, g1 = cell.probe(params, bumped, cell.project(params, x))
    for name in recurrent.SLSTM_GATES:
        moved = np.abs(np.asarray(g1[name] - g0[name]))[0]
        assert moved[: H // K].max() > 0 and moved[H // K :].max() == 0, name


# --------------------------------------------------------------------------------------
# 2. the stabiliser


@pytest.mark.parametrize(
    "forget_gate, i_bias, f_bias",
    [("sigmoid", 100.0, 100.0), ("sigmoid", -100.0, -3.0), ("exp", 100.0, 50.0), ("exp", -100.0, -60.0)],
)
def test_the_stabiliser_keeps_overflowing_exponentials_finite(forget_gate, i_bias, f_bias):
    """Pre-activations around +-100: exp(100) overflows float32 (exp(-100) is a denormal), so the
    unstabilised equations fail in float32; the stabilised cell gives the unstabilised maths of
    float64, and its state is that maths' state: n e^m = N, c e^m = C."""
    F, H, K, B, T = 2, 4, 2, 2, 8
    rng = np.random.default_rng(5)
    bias = rng.normal(0, 0.5, 4 * H)
    bias[:H] += i_bias
    bias[H : 2 * H] += f_bias
    params = random_params(F, H, K, seed=6, scale=0.5, bias=bias)
    xs = rng.normal(0, 2.0, (B, T, F)).astype(np.float32)

    want_ys, (_, C, N) = ref.slstm_unstabilised(xs, **as_reference(params), forget_gate=forget_gate)
    assert np.all(np.isfinite(want_ys)) and np.all(np.isfinite(N)) and np.all(N > 0)
    with np.errstate(all="ignore"):  # the same maths in float32 breaks down: inf / inf, or denormals
        ys32, _ = ref.slstm_unstabilised(xs, **as_reference(params), forget_gate=forget_gate, dtype=np.float32)
    assert not np.allclose(ys32, want_ys, atol=1e-3, equal_nan=False)

    cell = recurrent.slstm(H, num_heads=K, forget_gate=forget_gate)
    carry, ys = jitted_apply(cell)(params, xs, cell.initial_carry(params, (B, F)))
    assert np.all(np.isfinite(ys)) and np.all(np.isfinite(np.asarray(carry.m)))
    assert_close(ys, want_ys)
    assert_close(np.log(np.asarray(carry.n, np.float64)) + np.asarray(carry.m), np.log(N))
    assert_close(np.asarray(carry.c, np.float64) / np.asarray(carry.n), C / N)
    assert np.all(np.asarray(carry.n) >= 1.0)  # n >= 1 after the first step: no epsilon needed


# --------------------------------------------------------------------------------------
# 3. the official xlstm package (vanilla PyTorch backend)


def _official_cell(H, K, seed):
    torch = pytest.importorskip("torch")
    cell_module = pytest.importorskip("xlstm.blocks.slstm.cell")
    torch.manual_seed(seed)
    config = cell_module.sLSTMCellConfig(hidden_size=H, num_heads=K, backend="vanilla", dtype="float32")
    official = cell_module.sLSTMCell(config)
    D = H // K
    official.recurrent_kernel[...] = torch.randn(K, D, 4, D) * 0.5  # the default is zeros
    official.bias[...] = torch.randn(K, 4, D) * 0.5
    return official


def _official_output(out, H):
    """The official cell's ``(B, K, T, D)`` output as ``(B, T, H)``."""
    B, K, T, D = out.shape
    return out.detach().permute(0, 2, 1, 3).reshape(B, T, H).numpy()


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_matches_the_official_slstm_cell(num_heads):
    torch = pytest.importorskip("torch")
    from recurrent.interop import from_xlstm

    H, B, T = 8, 3, 7
    official = _official_cell(H, num_heads, seed=num_heads)
    cell, params = from_xlstm(official)
    assert cell.options["num_heads"] == num_heads and cell.options["forget_gate"] == "sigmoid"
    rng = np.random.default_rng(num_heads)
    xs = rng.normal(0, 2.0, (B, 2 * T, 4 * H)).astype(np.float32)
    apply = jitted_apply(cell)

    with torch.no_grad():
        _, state1 = official(torch.from_numpy(xs[:, :1]))  # the stabiliser's first step: m = log i
        out, state = official(torch.from_numpy(xs[:, :T]))
        out2, state2 = official(torch.from_numpy(xs[:, T:]), state)  # continued from a state
    carry1, _ = apply(params, xs[:, :1], cell.initial_carry(params, (B, 4 * H)))
    for got, want in zip(carry1, state1.numpy()):  # (h, c, n, m) = the official (y, c, n, m)
        assert_close(got, want)
    carry, ys = apply(params, xs[:, :T], cell.initial_carry(params, (B, 4 * H)))
    assert_close(ys, _official_output(out, H))
    for got, want in zip(carry, state.numpy()):
        assert_close(got, want)
    carry2, ys2 = apply(params, xs[:, T:], SLSTMState(*jnp.asarray(state.numpy())))
    assert_close(ys2, _official_output(out2, H))
    for got, want in zip(carry2, state2.numpy()):
        assert_close(got, want)
    # and the layer in one call, as the official cell in two
    carry_all, ys_all = apply(params, xs, cell.initial_carry(params, (B, 4 * H)))
    assert_close(ys_all, np.concatenate([_official_output(out, H), _official_output(out2, H)], axis=1))


def test_gradients_match_the_official_slstm_cell():
    torch = pytest.importorskip("torch")
    from recurrent.interop import from_xlstm

    H, K, B, T = 4, 2, 2, 6
    official = _official_cell(H, K, seed=7)
    cell, params = from_xlstm(official)
    rng = np.random.default_rng(8)
    xs = rng.normal(0, 2.0, (B, T, 4 * H)).astype(np.float32)
    weights = rng.normal(size=(B, T, H)).astype(np.float32)

    x_torch = torch.from_numpy(xs).requires_grad_(True)
    out, _ = official(x_torch)
    loss = (out.permute(0, 2, 1, 3).reshape(B, T, H) * torch.from_numpy(weights)).sum()
    loss.backward()
    want_R = official._recurrent_kernel_int2ext(official._recurrent_kernel_.grad).numpy()  # (K, D, 4, D)
    want_b = official._bias_int2ext(official._bias_.grad).numpy()  # (K, 4, D)

    layer = recurrent.rnn(cell)
    g_params, g_xs = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[1] * weights), argnums=(0, 1)))(
        params, jnp.asarray(xs)
    )
    assert_close(g_xs, x_torch.grad.numpy(), tol=1e-4)
    assert_close(np.asarray(g_params.recurrent_kernel).reshape(want_R.shape), want_R, tol=1e-4)
    assert_close(np.asarray(g_params.bias).reshape(4, K, H // K).transpose(1, 0, 2), want_b, tol=1e-4)


def test_the_official_layer_is_our_cell_then_a_group_norm():
    """What ``from_xlstm`` refuses, rebuilt by hand: the official ``sLSTMLayer`` without its
    convolution is our cell with the per-head input projections as a block-diagonal kernel (the
    module named ``fgate`` making the input gate), then a per-head group norm. This pins the
    documented conventions of the refusal message."""
    torch = pytest.importorskip("torch")
    layer_module = pytest.importorskip("xlstm.blocks.slstm.layer")
    from recurrent.interop import from_xlstm

    H, K, B, T = 8, 2, 2, 5
    torch.manual_seed(9)
    config = layer_module.sLSTMLayerConfig(
        embedding_dim=H, num_heads=K, conv1d_kernel_size=0, backend="vanilla", dtype="float32"
    )
    official = layer_module.sLSTMLayer(config)
    D = H // K
    official.slstm_cell.recurrent_kernel[...] = torch.randn(K, D, 4, D) * 0.5
    with torch.no_grad():
        official.group_norm.weight.normal_(0, 0.3)
    with pytest.raises(ValueError, match="slstm_cell"):
        from_xlstm(official)

    cell, params = from_xlstm(official.slstm_cell)

    def block_diagonal(weight):  # LinearHeadwiseExpand (K, out, in) -> (H, H)
        w = weight.detach().numpy()
        dense = np.zeros((H, H), np.float32)
        for k in range(K):
            dense[k * D : (k + 1) * D, k * D : (k + 1) * D] = w[k].T
        return dense

    gates = [official.fgate, official.igate, official.zgate, official.ogate]  # i, f, z, o
    params = params._replace(input_kernel=jnp.asarray(np.concatenate([block_diagonal(g.weight) for g in gates], 1)))
    xs = np.random.default_rng(10).normal(size=(B, T, H)).astype(np.float32)
    _, ys = jitted_apply(cell)(params, xs, cell.initial_carry(params, (B, H)))

    ys = np.asarray(ys, np.float64).reshape(B, T, K, D)
    mean, var = ys.mean(-1, keepdims=True), ys.var(-1, keepdims=True)
    normed = ((ys - mean) / np.sqrt(var + 1e-5)).reshape(B, T, H) * (1.0 + official.group_norm.weight.detach().numpy())
    with torch.no_grad():
        want = official(torch.from_numpy(xs)).numpy()
    assert_close(normed, want, tol=2e-5)


def test_from_xlstm_refuses_what_it_cannot_convert():
    torch = pytest.importorskip("torch")
    cell_module = pytest.importorskip("xlstm.blocks.slstm.cell")
    from recurrent.interop import from_xlstm

    with pytest.raises(ValueError, match=r"cannot convert torch\.nn\.modules\.rnn\.LSTM(.|\n)*sLSTMCell"):
        from_xlstm(torch.nn.LSTM(3, 4))
    lstm_function = cell_module.sLSTMCell(
        cell_module.sLSTMCellConfig(hidden_size=4, num_heads=1, backend="vanilla", function="lstm", dtype="float32")
    )
    with pytest.raises(ValueError, match="function='lstm'"):
        from_xlstm(lstm_function)


def test_default_initialisers_are_the_official_ones():
    """Zero recurrent kernel and the "powerlaw_blockdependent" forget bias (one block), zero
    other biases; with ``forget_gate="exp"`` the same initial forget values."""
    cell_module = pytest.importorskip("xlstm.blocks.slstm.cell")
    H, K = 12, 3
    official = cell_module.sLSTMCell(
        cell_module.sLSTMCellConfig(hidden_size=H, num_heads=K, backend="vanilla", dtype="float32")
    )
    params = recurrent.slstm(H, num_heads=K).init(KEY, (5,))
    assert not np.any(np.asarray(params.recurrent_kernel))
    want_bias = official.bias[:].numpy().transpose(1, 0, 2).reshape(4 * H)  # (K, 4, D) -> gate-major
    np.testing.assert_allclose(params.bias, want_bias, atol=1e-6)
    exp_bias = recurrent.slstm(H, num_heads=K, forget_gate="exp").init(KEY, (5,)).bias
    np.testing.assert_allclose(np.exp(exp_bias[H : 2 * H]), jax.nn.sigmoid(params.bias[H : 2 * H]), rtol=1e-5)
    kernel = np.asarray(recurrent.slstm(64).init(KEY, (100,)).input_kernel)
    assert abs(kernel.std() / np.sqrt(2 / (5 * 100)) - 1) < 0.05  # "small init"
    one_unit_heads = recurrent.slstm(2, num_heads=2).init(KEY, (1,)).bias  # D = 1: 5, not the official NaN
    np.testing.assert_array_equal(one_unit_heads[2:4], [5.0, 5.0])


# --------------------------------------------------------------------------------------
# 4. zoneout: the memory (c, n, m) as one


def _zoneout_run(cell, params, xs, masks):
    """Steps ``cell.probe`` with explicit zoneout values ``masks[t] = (d_h, d_c)``."""
    probe = jax.jit(cell.probe)
    carry = cell.initial_carry(params, xs[:, 0].shape)
    ys = []
    for t in range(xs.shape[1]):
        d_h, d_c = masks[t]
        noise = recurrent.StepNoise(zoneout=SLSTMState(d_h, d_c, 0.0, 0.0))
        carry, y, _ = probe(params, carry, cell.project(params, xs[:, t]), noise)
        ys.append(y)
    return carry, np.stack(ys, 1)


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_mixes_the_memory_in_unstabilised_terms(training):
    F, H, K, B, T = 3, 4, 2, 3, 9
    cell = recurrent.slstm(H, num_heads=K)
    params = random_params(F, H, K, seed=11)
    rng = np.random.default_rng(12)
    xs = rng.normal(0, 2.0, (B, T, F)).astype(np.float32)
    if training:
        masks = [tuple((rng.random((B, H)) < 0.4).astype(np.float32) for _ in range(2)) for _ in range(T)]
    else:
        masks = [(np.full((B, H), 0.2, np.float32), np.full((B, H), 0.35, np.float32))] * T
    carry, ys = _zoneout_run(cell, params, xs, masks)
    want_ys, want = ref.slstm(xs, **as_reference(params), zoneout=masks)
    assert_close(ys, want_ys)
    readout = np.asarray(carry.c, np.float64) / np.asarray(carry.n)
    assert_close(readout, want[1] / want[2])
    if training:  # a kept memory is the old one exactly, not a rescaled copy
        for got, w in zip(carry, want):
            assert_close(got, w)


def test_zoneout_in_training_keeps_the_readout_of_a_real_memory():
    """Through the driver (``rnn(..., zoneout_cell=p)`` in training): at every step and unit the
    readout ``c / n`` is the previous step's or the new memory's, never a cell state divided by
    another step's normaliser; with ``zoneout=0``, ``h = o * c / n`` of the new memory (as
    Krueger et al.'s LSTM computes ``h`` from the new cell state)."""
    F, H, K, B, T = 2, 4, 2, 3, 8
    cell = recurrent.slstm(H, num_heads=K)
    params = random_params(F, H, K, seed=13)
    xs = jnp.asarray(np.random.default_rng(14).normal(0, 2.0, (B, T, F)).astype(np.float32))
    layer = recurrent.rnn(cell, zoneout_cell=0.5)
    _, ys, trace = jax.jit(lambda p, x, k: layer.apply(p, x, key=k, return_trace=True))(params, xs, jax.random.key(1))
    carries = jax.tree.map(np.asarray, trace.carries)
    recur = jax.jit(cell.recur)
    previous = cell.initial_carry(params, (B, F))
    kept = updated = 0
    for t in range(T):
        fresh, y = recur(params, previous, cell.project(params, xs[:, t]))
        now = jax.tree.map(lambda a, t=t: a[:, t], carries)
        np.testing.assert_allclose(ys[:, t], y, atol=1e-6)  # h from the new memory
        is_old = np.all([np.asarray(a) == np.asarray(b) for a, b in zip(now[1:], previous[1:])], axis=0)
        is_new = np.all([np.abs(a - np.asarray(b)) <= 1e-6 for a, b in zip(now[1:], fresh[1:])], axis=0)
        assert np.all(is_old | is_new), f"step {t}: a memory that is neither the old nor the new one"
        kept, updated = kept + np.sum(is_old & ~is_new), updated + np.sum(is_new & ~is_old)
        previous = SLSTMState(*(jnp.asarray(a) for a in now))
    assert kept > 5 and updated > 5  # both happen


def test_zoneout_at_evaluation_stays_exact_on_long_sequences():
    """At evaluation the memory is a weighted mix, stored renormalised (``n = 1``, ``m = log N``).
    Kept at the larger side's stabiliser instead, a large first input gate (i~ = 50) followed by
    small ones (i~ = -50) with a small forget gate would shrink ``n`` by ``d + (1 - d) f`` every
    step, to float32's underflow and 0 / 0 within about 80 steps; the float64 maths is fine."""
    H, K, T = 2, 1, 200
    W = np.zeros((1, 4 * H), np.float32)
    W[0, :H] = 1.0  # i~ = x
    W[0, 2 * H : 3 * H] = [0.01, -0.02]  # z~ = x / 100: c != 0
    b = np.zeros(4 * H, np.float32)
    b[H : 2 * H] = -6.0  # f ~ 0.0025
    params = SLSTMParams(jnp.asarray(W), jnp.zeros((K, H // K, 4 * H // K)), jnp.asarray(b))
    xs = np.full((1, T, 1), -50.0, np.float32)
    xs[:, 0] = 50.0
    carry, ys = jax.jit(recurrent.rnn(recurrent.slstm(H, num_heads=K), zoneout_cell=0.3).apply)(params, xs)
    masks = [(np.zeros((1, H)), np.full((1, H), 0.3))] * T
    want_ys, _ = ref.slstm(xs, **as_reference(params), zoneout=masks)
    assert np.all(np.isfinite(ys)) and np.all(np.asarray(carry.n) > 0)
    assert_close(ys, want_ys)


def test_every_regulariser_reaches_the_slstm():
    cell = recurrent.slstm(4, num_heads=2, recurrent_kernel_init=jax.nn.initializers.normal(0.5))
    params = cell.init(KEY, (3,))
    xs = jnp.asarray(np.random.default_rng(17).normal(size=(2, 6, 3)).astype(np.float32))
    _, clean = jax.jit(recurrent.rnn(cell).apply)(params, xs)
    for options in ({"recurrent_dropout": 0.5}, {"dropconnect": 0.5}, {"zoneout": 0.3, "zoneout_cell": 0.5}):
        layer = recurrent.rnn(cell, **options)

        def loss(p, layer=layer):
            ys = layer.apply(p, xs, key=jax.random.key(2))[1]
            return jnp.sum(ys), ys

        if "zoneout" in options:  # the memory's mix has guarded branches: its gradient is finite
            (value, train), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        else:
            _, train = jax.jit(loss)(params)
        assert not np.allclose(train, clean, atol=1e-4), options


# --------------------------------------------------------------------------------------
# 5. parameter count, 6. errors


@pytest.mark.parametrize("F, H, K", [(1, 1, 1), (3, 4, 2), (7, 12, 3), (32, 64, 4)])
def test_parameter_count_formula(F, H, K):
    params = jax.eval_shape(lambda: recurrent.slstm(H, num_heads=K).init(KEY, (F,)))
    assert recurrent.count_params(params) == 4 * H * (F + H // K + 1)


def test_bad_num_heads_is_refused():
    with pytest.raises(ValueError, match=r"multiple of `num_heads`(.|\n)*one of \[1, 2, 3, 6\](.|\n)*num_heads=3"):
        recurrent.slstm(6, num_heads=4)
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match="num_heads"):
            recurrent.slstm(4, num_heads=bad)


def test_bad_forget_gate_is_refused():
    for bad in ("tanh", "Sigmoid", None, jax.nn.sigmoid):
        with pytest.raises(ValueError, match=r"forget_gate(.|\n)*\"sigmoid\"(.|\n)*\"exp\""):
            recurrent.slstm(4, forget_gate=bad)


def test_inputs_of_another_feature_size_are_refused():
    cell = recurrent.slstm(4, num_heads=2)
    params = cell.init(KEY, (3,))
    with pytest.raises(ValueError, match=r"expected(.|\n)*\(3,\)(.|\n)*fix"):
        cell.step(params, cell.initial_carry(params, (2, 3)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="input_shape"):
        cell.init(KEY, (3, 2))
