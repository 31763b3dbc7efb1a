"""minGRU and minLSTM (Feng et al. 2024): the cells against a NumPy reference of the paper's
equations, their parallel form (``implementation="parallel"``) against the sequential scan in
values and gradients (float32 and float64; lengths, reverse, carried state, bidirectional and
stacked), the shared battery on the parallel form, the regularisers the cells refuse, and the
peer implementation ``minGRU-pytorch``."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import _minrnn
from tests import reference_minrnn as ref
from tests import test_battery as battery
from tests.fast_compiles import optimisations_off
from tests.registry import CellSpec, Entry, Rnn, _bias, _kernel
from tests.test_own_cell import _applies, _battery_checks

# The parallel form is checked on itself: a silent fall-back to the scan would pass every
# comparison, so a FallbackWarning fails a test unless the test expects it.
pytestmark = pytest.mark.filterwarnings("error::recurrent.FallbackWarning")

CELLS = {"min_gru": recurrent.min_gru, "min_lstm": recurrent.min_lstm}
CASES = [(name, candidate) for name in CELLS for candidate in _minrnn.CANDIDATES]
B, T, F, H = 3, 7, 3, 4
LENGTHS = np.array([T, 4, 0], np.int32)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Many small programs compared with tolerances: XLA's optimisation passes are not needed."""
    with optimisations_off():
        yield


def _params(cell, seed=0, dtype=np.float32):
    """Random kernel and bias (the default zero bias would leave the gates symmetric)."""
    params = cell.init(jax.random.key(seed), (F,))
    rng = np.random.default_rng(seed)
    return type(params)(*(rng.normal(0, 0.7, np.shape(p)).astype(dtype) for p in params))


def _inputs(seed, dtype=np.float32):
    rng = np.random.default_rng(100 + seed)
    return rng.normal(size=(B, T, F)).astype(dtype), rng.normal(size=(B, H)).astype(dtype)  # carry of both signs


def _close(actual, expected, tol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol, rtol=tol), actual, expected)


# --------------------------------------------------------------------------------------
# The equations


@pytest.mark.parametrize("name, candidate", CASES)
def test_scan_and_parallel_match_the_numpy_reference(name, candidate):
    cell = CELLS[name](H, candidate=candidate)
    params = _params(cell)
    xs, h0 = _inputs(0)
    want_ys, want_h = getattr(ref, name)(xs, *params, h0=h0, lengths=LENGTHS, candidate=candidate)
    for implementation in ("scan", "parallel"):
        layer = recurrent.rnn(cell, implementation=implementation)
        h, ys = jax.jit(lambda p, x, c: layer.apply(p, x, lengths=LENGTHS, carry=c))(params, xs, h0)
        _close((ys, h), (want_ys, want_h), 1e-5)
    assert np.abs(want_ys).max() > 0.1 and (want_ys < 0).any()  # the carry of both signs reaches the outputs


def test_g_and_log_g():
    x = np.concatenate([np.linspace(-30, 30, 61), [0.0, -0.0, 1e-8, -1e-8]])
    np.testing.assert_allclose(_minrnn.g(x), ref.g(x), rtol=1e-6)
    np.testing.assert_allclose(_minrnn.log_g(x), np.log(ref.g(x)), rtol=1e-5, atol=1e-6)
    assert float(_minrnn.g(0.0)) == 0.5 and np.all(np.asarray(_minrnn.g(x)) > 0)
    x32 = jnp.asarray(x, jnp.float32)
    d_g, d_log_g = (jax.jit(jax.vmap(jax.grad(f)))(x32) for f in (_minrnn.g, _minrnn.log_g))
    np.testing.assert_allclose(d_log_g, d_g / _minrnn.g(x32), rtol=1e-6)  # also at 0, where g has a kink
    assert float(jax.grad(_minrnn.log_g)(0.0)) == 2.0 and np.all(np.asarray(d_log_g) > 0)


def test_trace_records_the_normalised_gates():
    for name, gates in (("min_gru", recurrent.MIN_GRU_GATES), ("min_lstm", recurrent.MIN_LSTM_GATES)):
        cell = CELLS[name](H)
        xs, _ = _inputs(1)
        _, _, trace = recurrent.rnn(cell).apply(_params(cell), xs, lengths=LENGTHS, return_trace=True)
        assert set(trace.gates) == set(gates)
        if name == "min_lstm":  # f' + i' = 1 at valid steps, zero gates in the padding
            total = np.asarray(trace.gates["forget"] + trace.gates["input"])
            valid = np.arange(T) < LENGTHS[:, None]
            np.testing.assert_allclose(total[valid], 1.0, rtol=1e-6)
            assert np.all(total[~valid] == 0)


@pytest.mark.parametrize("F_, H_", [(1, 1), (7, 5), (32, 64)])
def test_parameter_count_formulas(F_, H_):
    def count(cell):
        return recurrent.count_params(jax.eval_shape(lambda key: cell.init(key, (F_,)), jax.random.key(0)))

    assert count(recurrent.min_gru(H_)) == 2 * H_ * (F_ + 1)
    assert count(recurrent.min_lstm(H_)) == 3 * H_ * (F_ + 1)


def test_chrono_init_sets_the_keep_gate():
    """minGRU keeps h with 1 - z, so its update bias is the negated draw; minLSTM's forget and input
    biases are an LSTM's, so f' = f at init."""
    key = jax.random.key(0)
    b_z, b_h = recurrent.min_gru(6, bias_init=recurrent.chrono_init(50)).init(key, (2,)).bias.reshape(2, 6)
    keep = 1 - jax.nn.sigmoid(b_z)
    assert np.all(np.asarray(b_z) <= 0) and np.all(b_h == 0)
    assert np.all((1 / (1 - keep) >= 2 - 1e-5) & (1 / (1 - keep) <= 50 + 1e-3))  # forgetting times in [2, 50]
    b_f, b_i, b_h = recurrent.min_lstm(6, bias_init=recurrent.chrono_init(50)).init(key, (2,)).bias.reshape(3, 6)
    np.testing.assert_array_equal(b_i, -b_f)
    assert np.all(np.asarray(b_f) >= 0) and np.all(b_h == 0)


# --------------------------------------------------------------------------------------
# Parallel == scan: values and gradients


def _values_and_grads(layer, lengths):
    def loss(params, xs, carry):
        h, ys = layer.apply(params, xs, lengths=lengths, carry=carry)
        weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape))
        return jnp.sum(ys * weights) + jnp.sum(jnp.sin(h)), (h, ys)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize(
    "name, candidate, dtype",
    [(name, "g", dtype) for name in CELLS for dtype in ("float32", "float64")]
    + [("min_gru", "linear", "float64"), ("min_lstm", "linear", "float32")],
)
def test_parallel_equals_scan_in_values_and_gradients(name, candidate, dtype):
    """Forwards (and reversed, in float64), with lengths (also 0 and T) and a starting carry of both
    signs: outputs, final carry, and gradients with respect to parameters, inputs and the carry."""
    tol = {"float32": 1e-5, "float64": 1e-10}[dtype]
    directions = (False, True) if dtype == "float64" else (False,)  # the battery reverses in float32
    with jax.enable_x64(dtype == "float64"):
        cell = CELLS[name](H, candidate=candidate, param_dtype=dtype)
        params = _params(cell, 1, dtype)
        xs, h0 = _inputs(1, dtype)

        @jax.jit
        def both(params, xs, h0):
            out = {}
            for reverse in directions:
                for implementation in ("scan", "parallel"):
                    layer = recurrent.rnn(cell, reverse=reverse, implementation=implementation)
                    out[reverse, implementation] = _values_and_grads(layer, LENGTHS)(params, xs, h0)
            return out

        out = jax.device_get(both(params, xs, h0))
    for reverse in directions:
        (_, (h, ys)), grads = out[reverse, "parallel"]
        assert ys.dtype == dtype and h.dtype == dtype
        _close(out[reverse, "parallel"], out[reverse, "scan"], tol)
        assert np.all(ys[2] == 0) and np.all(h[2] == h0[2])  # length 0: zero outputs, the starting carry
        g_params, g_xs, g_h0 = grads
        assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in (*g_params, g_xs, g_h0))
        assert np.all(g_xs[1, 4:] == 0)  # padded inputs do not matter


def test_parallel_continues_from_its_carry():
    """The first part, then the rest from the returned carry == the whole, per sequence lengths
    (the battery checks the same on its forward entry, the minGRU)."""
    cell = recurrent.min_lstm(H)
    params = _params(cell, 2)
    xs, _ = _inputs(2)
    parallel = recurrent.rnn(cell, implementation="parallel")
    first = np.minimum(LENGTHS, 3)
    apply = jax.jit(lambda x, n, c: parallel.apply(params, x, lengths=n, carry=c))
    h1, y1 = apply(xs[:, :3], first, jnp.zeros((B, H)))
    h2, y2 = apply(xs[:, 3:], LENGTHS - first, h1)
    whole_h, whole_ys = apply(xs, LENGTHS, jnp.zeros((B, H)))
    _close((h2, np.concatenate([y1, y2], axis=1)), (whole_h, whole_ys), 1e-5)
    _close(whole_h, recurrent.rnn(cell).apply(params, xs, lengths=LENGTHS)[0], 1e-5)


def test_parallel_gradients_are_finite_at_the_edges():
    """A zero starting carry (log 0 in the paper's form), sequences of length 0 (every step the
    identity, log b = -inf), saturated gates (both minLSTM gates underflow) and pre-activations of
    exactly 0 (the kink of g): finite values and gradients, equal to the scan's; NaN inputs in the
    padding change nothing."""
    saturated = 60.0 * _inputs(3)[0]
    zeros = _inputs(3)[0] * (np.arange(T) % 2)[:, None]  # every other step zero: zero pre-activations
    lengths = np.array([T, 0, 5], np.int32)
    for name, xs in (("min_lstm", saturated), ("min_gru", zeros)):
        cell = CELLS[name](H)
        params = _params(cell, 3)
        params = params._replace(bias=np.zeros_like(params.bias)) if name == "min_gru" else params

        @jax.jit
        def both(params, xs, cell=cell):
            return [
                _values_and_grads(recurrent.rnn(cell, implementation=i), lengths)(params, xs, jnp.zeros((B, H)))
                for i in ("scan", "parallel")
            ]

        scanned, parallel = both(params, xs)
        for leaf in jax.tree.leaves(parallel):
            assert np.all(np.isfinite(leaf)), name
        _close(parallel, scanned, 1e-4)
        padded = np.arange(T)[None, :, None] >= lengths[:, None, None]
        _, dirty = both(params, np.where(padded, np.float32(np.nan), xs))  # NaN in the padding: no change
        _close(dirty, parallel, 0.0)


def _no_scan(fn, *args):
    """Whether the program of ``fn`` has no ``lax.scan`` (the parallel form runs, not the step loop)."""
    return "scan" not in battery._primitives(fn, *args)


def test_bidirectional_and_stacked_pass_the_parallel_form_through():
    xs, _ = _inputs(4)
    lengths = jnp.asarray(LENGTHS)

    def build(implementation):
        gru = recurrent.rnn(recurrent.min_gru(H), implementation=implementation)
        lstm = recurrent.rnn(recurrent.min_lstm(H), implementation=implementation)
        reversed_gru = recurrent.rnn(recurrent.min_gru(H), reverse=True, implementation=implementation)
        # one layer for both directions (run as one vmapped apply), then a stack of layers
        return [recurrent.bidirectional(lstm), recurrent.stacked([gru, reversed_gru], residual=True)]

    def loss(layer, params, xs):
        carry, ys = layer.apply(params, xs, lengths=lengths)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(carry)), (carry, ys)

    for scanned, parallel in zip(build("scan"), build("parallel")):
        params = parallel.init(jax.random.key(5), (F,))

        @jax.jit
        def both(params, xs, layers=(scanned, parallel)):
            return [jax.value_and_grad(functools.partial(loss, layer), has_aux=True)(params, xs) for layer in layers]

        want, got = both(params, xs)
        _close(got, want, 1e-5)
        assert _no_scan(lambda p, x: parallel.apply(p, x, lengths=lengths), params, xs), parallel.name
        assert not _no_scan(lambda p, x: scanned.apply(p, x, lengths=lengths), params, xs)


# --------------------------------------------------------------------------------------
# The shared battery on the parallel form


def _cell(factory, hidden_size, **options):
    return CellSpec(factory, hidden_size, kernel_init=_kernel, bias_init=_bias, default_init=True, **options)


PARALLEL = [
    Entry("min_gru_parallel", Rnn(_cell(recurrent.min_gru, 4), implementation="parallel"), (3,)),
    Entry(
        "min_lstm_linear_parallel_reverse",
        Rnn(_cell(recurrent.min_lstm, 3, candidate="linear"), implementation="parallel", reverse=True),
        (2,),
    ),
]


@pytest.mark.parametrize(
    "entry, check",
    [pytest.param(e, c, id=f"{e.id}-{c}") for e in PARALLEL for c in _battery_checks() if _applies(c, e)],
)
def test_parallel_form_passes_the_battery(entry, check):
    with warnings.catch_warnings():
        if check == "test_resets_match_separate_segments":  # resets run the scan, by design
            warnings.simplefilter("ignore", recurrent.FallbackWarning)
        getattr(battery, check)(entry=entry)


# --------------------------------------------------------------------------------------
# Regularisers and errors


def test_recurrent_dropout_and_dropconnect_are_refused():
    """No recurrent input and no recurrent kernel: the driver refuses both, saying why."""
    for make in CELLS.values():
        with pytest.raises(ValueError, match=r"recurrent_dropout.*declares none(.|\n)*got:.*recurrent_input=None"):
            recurrent.rnn(make(H), recurrent_dropout=0.1)
        with pytest.raises(ValueError, match=r"dropconnect.*declares none(.|\n)*got:.*recurrent_kernels=None"):
            recurrent.rnn(make(H), dropconnect=0.1)


def test_zoneout_on_h_and_the_fall_back_of_the_parallel_form():
    cell = recurrent.min_gru(H)
    params = _params(cell, 7)
    xs, _ = _inputs(7)
    _, clean = recurrent.rnn(cell).apply(params, xs)
    zoned = recurrent.rnn(cell, zoneout=0.5)
    _, train = zoned.apply(params, xs, key=jax.random.key(0))
    assert not np.allclose(train, clean, atol=1e-4)

    # at evaluation: h = rate * h_prev + (1 - rate) * h_new, the reference with the update halved
    _, evaluation = zoned.apply(params, xs)
    h, want = np.zeros((B, H)), []
    for t in range(T):
        _, step = ref.min_gru(xs[:, t : t + 1], *params, h0=h)
        h = 0.5 * h + 0.5 * step
        want.append(h)
    _close(evaluation, np.stack(want, 1), 1e-5)

    with pytest.warns(recurrent.FallbackWarning, match="zoneout is on"):
        _, fell_back = recurrent.rnn(cell, zoneout=0.5, implementation="parallel").apply(params, xs)
    _close(fell_back, evaluation, 1e-6)


def test_factory_errors_say_expected_got_and_fix():
    with pytest.raises(ValueError, match=r"unknown `candidate`(.|\n)*expected: 'g' or 'linear'(.|\n)*got:\s+'tanh'"):
        recurrent.min_gru(4, candidate="tanh")
    with pytest.raises(ValueError, match=r"positive int"):
        recurrent.min_lstm(0)
    cell = recurrent.min_lstm(4)
    params = cell.init(jax.random.key(0), (3,))
    with pytest.raises(ValueError, match=r"input feature shape(.|\n)*fix:"):
        recurrent.rnn(cell, implementation="parallel").apply(params, jnp.ones((2, 5, 2)))
    with pytest.raises(ValueError, match=r"params(.|\n)*wrong"):  # another cell's parameters
        recurrent.rnn(cell, implementation="parallel").apply(
            recurrent.min_gru(4).init(jax.random.key(0), (3,)), jnp.ones((2, 5, 3))
        )
    with pytest.raises(ValueError, match=r"input_shape(.|\n)*\(features,\)"):
        cell.init(jax.random.key(0), (3, 2))


# --------------------------------------------------------------------------------------
# The peer: minGRU-pytorch (lucidrains), with expansion_factor=1 (no output projection)


@pytest.fixture(scope="module")
def peers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("minGRU_pytorch")
    from minGRU_pytorch.minGRU import minGRU
    from minGRU_pytorch.minLSTM import minLSTM

    torch.manual_seed(0)
    return torch, minGRU(H), minLSTM(H)


def _from_peer(weight, blocks, order):
    """Our ``(F, G*H)`` kernel from a ``Linear(F, G*H, bias=False)`` weight, blocks reordered."""
    w = weight.detach().numpy().T
    return np.concatenate([w[:, k * H : (k + 1) * H] for k in order], axis=1)


def test_peer_min_gru_matches(peers):
    """Their blocks are (candidate, gate); their parallel mode starts from ``prev_hidden.log()``:
    the state itself, as here."""
    torch, peer, _ = peers
    params = recurrent.MinGRUParams(_from_peer(peer.to_hidden_and_gate.weight, 2, (1, 0)), np.zeros(2 * H, np.float32))
    xs = np.random.default_rng(8).normal(size=(2, 9, H)).astype(np.float32)
    with torch.no_grad():
        out, h = peer(torch.from_numpy(xs[:, :6]), return_next_prev_hidden=True)
        out2, h2 = peer(torch.from_numpy(xs[:, 6:]), prev_hidden=h, return_next_prev_hidden=True)
        stepped = peer(torch.from_numpy(xs[:, 6:7]), prev_hidden=h)  # their sequential mode
    for implementation in ("scan", "parallel"):
        layer = recurrent.rnn(recurrent.min_gru(H), implementation=implementation)
        carry, ys = layer.apply(params, xs[:, :6])
        _close((ys, carry), (out.numpy(), h.numpy()[:, 0]), 1e-5)
        carry2, ys2 = layer.apply(params, xs[:, 6:], carry=carry)
        _close((ys2, carry2), (out2.numpy(), h2.numpy()[:, 0]), 1e-5)
    _, y = recurrent.min_gru(H).step(params, h.numpy()[:, 0], xs[:, 6])
    _close(y, stepped.numpy()[:, 0], 1e-5)


def test_peer_min_lstm_matches_but_for_its_parallel_continuation(peers):
    """Their blocks are (candidate, f, i). From no state, and stepped one token at a time, they
    compute the paper's equations as here. Their parallel mode continued from ``prev_hidden``
    starts from ``g(prev_hidden)`` (``log_g`` of it), not from the state itself, so a sequence fed
    in chunks there differs from the whole; it equals ours started from ``g(prev_hidden)``."""
    torch, _, peer = peers
    kernel = _from_peer(peer.to_hidden_and_f_i_gate.weight, 3, (1, 2, 0))
    params = recurrent.MinLSTMParams(kernel, np.zeros(3 * H, np.float32))
    xs = np.random.default_rng(9).normal(size=(2, 9, H)).astype(np.float32)
    with torch.no_grad():
        out, h = peer(torch.from_numpy(xs[:, :6]), return_next_prev_hidden=True)
        out2 = peer(torch.from_numpy(xs[:, 6:]), prev_hidden=h)
        stepped = peer(torch.from_numpy(xs[:, 6:7]), prev_hidden=h)
    layer = recurrent.rnn(recurrent.min_lstm(H), implementation="parallel")
    carry, ys = layer.apply(params, xs[:, :6])
    _close((ys, carry), (out.numpy(), h.numpy()[:, 0]), 1e-5)
    _, y = recurrent.min_lstm(H).step(params, carry, xs[:, 6])
    _close(y, stepped.numpy()[:, 0], 1e-5)
    _, continued = layer.apply(params, xs[:, 6:], carry=carry)
    assert not np.allclose(continued, out2.numpy(), atol=1e-3)
    _, from_g = layer.apply(params, xs[:, 6:], carry=_minrnn.g(carry))
    _close(from_g, out2.numpy(), 1e-5)
