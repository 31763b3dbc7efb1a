"""Chrono initialisation (Tallec & Ollivier 2018): ``recurrent.chrono_init`` as ``bias_init``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests.test_errors import clear_error

KEY = jax.random.key(0)
T, H, F = 50, 8, 3
ZERO_KERNELS = dict(kernel_init=jax.nn.initializers.zeros, recurrent_kernel_init=jax.nn.initializers.zeros)


def blocks(bias, gates):
    """The fused bias as a dict from gate name to its ``(H,)`` block."""
    return dict(zip(gates, np.asarray(bias, np.float32).reshape(len(gates), -1)))


def assert_chrono(b_keep, max_steps=T):
    """``b_keep = log u`` with ``u`` in ``[1, max_steps - 1]``, and not one constant."""
    assert (b_keep >= 0).all() and (b_keep <= np.log(max_steps - 1) + 1e-6).all(), b_keep
    assert np.ptp(b_keep) > 0.1


def test_the_formula():
    gates = recurrent.LSTM_GATES
    bias = recurrent.chrono_init(T)(KEY, (4 * H,), jnp.float32, gates=gates)
    u = jax.random.uniform(KEY, (H,), minval=1.0, maxval=T - 1.0)
    np.testing.assert_array_equal(bias, jnp.concatenate([-jnp.log(u), jnp.log(u), jnp.zeros(2 * H)]))
    # u is uniform on [1, T - 1]: check its moments on many units.
    u = np.exp(recurrent.chrono_init(T)(KEY, (4 * 20000,), gates=gates)[20000:40000])
    assert 1 <= u.min() < 1.05 and T - 1.05 < u.max() <= T - 1
    np.testing.assert_allclose(u.mean(), T / 2, rtol=0.01)
    np.testing.assert_allclose(u.std(), (T - 2) / np.sqrt(12), rtol=0.02)


LSTM_LAYOUTS = {
    "lstm": (recurrent.lstm, recurrent.LSTM_GATES),
    "peephole_lstm": (recurrent.peephole_lstm, recurrent.LSTM_GATES),
    "V": (lambda h, **o: recurrent.lstm_variant("V", h, **o), recurrent.LSTM_GATES),
    "NOG": (lambda h, **o: recurrent.lstm_variant("NOG", h, **o), ("input", "forget", "cell")),
    "FGR": (lambda h, **o: recurrent.lstm_variant("FGR", h, **o), recurrent.LSTM_GATES),
    "NIAF": (lambda h, **o: recurrent.lstm_variant("NIAF", h, **o), recurrent.LSTM_GATES),
    "cifg_lstm": (recurrent.cifg_lstm, recurrent.CIFG_GATES),
    "CIFG": (lambda h, **o: recurrent.lstm_variant("CIFG", h, **o), recurrent.CIFG_GATES),
    "NIG": (lambda h, **o: recurrent.lstm_variant("NIG", h, **o), ("forget", "cell", "output")),
}


@pytest.mark.parametrize("name", LSTM_LAYOUTS)
def test_lstm_family_layouts(name):
    factory, gates = LSTM_LAYOUTS[name]
    b = blocks(factory(H, bias_init=recurrent.chrono_init(T)).init(KEY, (F,)).bias, gates)
    assert_chrono(b["forget"])  # the default forget_bias adds nothing
    if "input" in gates:
        np.testing.assert_array_equal(b["input"], -b["forget"])
    for gate in set(gates) - {"input", "forget"}:
        np.testing.assert_array_equal(b[gate], 0.0)


def test_cifg_starts_with_the_lstms_gates():
    """The coupled input gate 1 - f equals the LSTM's sigmoid(-log u), and the draws agree."""
    chrono = recurrent.chrono_init(T)
    lstm = blocks(recurrent.lstm(H, bias_init=chrono).init(KEY, (F,)).bias, recurrent.LSTM_GATES)
    cifg = blocks(recurrent.cifg_lstm(H, bias_init=chrono).init(KEY, (F,)).bias, recurrent.CIFG_GATES)
    np.testing.assert_array_equal(cifg["forget"], lstm["forget"])
    np.testing.assert_allclose(1 - jax.nn.sigmoid(cifg["forget"]), jax.nn.sigmoid(lstm["input"]), atol=1e-6)


def test_conv_lstm():
    params = recurrent.conv_lstm(H, (3,), bias_init=recurrent.chrono_init(T)).init(KEY, (5, F))
    b = blocks(params.bias, recurrent.LSTM_GATES)
    assert_chrono(b["forget"])
    np.testing.assert_array_equal(b["input"], -b["forget"])
    np.testing.assert_array_equal(np.r_[b["cell"], b["output"]], 0.0)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("factory", [recurrent.gru, lambda h, **o: recurrent.conv_gru(h, (3,), **o)])
def test_gru_update_gate(factory, reset_after):
    cell = factory(H, reset_after=reset_after, bias_init=recurrent.chrono_init(T))
    params = cell.init(KEY, (F,) if cell.name == "gru" else (5, F))
    b = blocks(params.bias, recurrent.GRU_GATES)
    assert_chrono(b["update"])
    np.testing.assert_array_equal(np.r_[b["reset"], b["candidate"]], 0.0)
    if reset_after:
        np.testing.assert_array_equal(params.recurrent_bias, 0.0)
    else:
        assert params.recurrent_bias is None


def test_forget_bias_composition():
    chrono = recurrent.chrono_init(3)  # log u <= log 2 < 1: an added 1.0 could not hide
    default = recurrent.lstm(H, bias_init=chrono).init(KEY, (F,)).bias
    assert_chrono(blocks(default, recurrent.LSTM_GATES)["forget"], max_steps=3)
    for zero in (0, 0.0, jnp.zeros(())):
        np.testing.assert_array_equal(
            recurrent.lstm(H, bias_init=chrono, forget_bias=zero).init(KEY, (F,)).bias, default
        )
    for factory in (recurrent.lstm, recurrent.cifg_lstm, lambda h, **o: recurrent.conv_lstm(h, (3,), **o)):
        for value in (1.0, 2, -0.5, jnp.ones(())):
            with clear_error("forget_bias", "chrono_init"):
                factory(H, bias_init=chrono, forget_bias=value)
    with clear_error("forget_bias"):  # a traced forget_bias cannot be checked to be 0
        jax.vmap(lambda fb: recurrent.lstm(H, bias_init=chrono, forget_bias=fb).init(KEY, (F,)).bias)(jnp.zeros(2))
    # Without chrono_init, forget_bias=None still means 1.0, and a value is added as before.
    assert recurrent.lstm(H).options["forget_bias"] is None
    np.testing.assert_array_equal(blocks(recurrent.lstm(H).init(KEY, (F,)).bias, recurrent.LSTM_GATES)["forget"], 1.0)
    b = blocks(recurrent.lstm(H, forget_bias=2.5).init(KEY, (F,)).bias, recurrent.LSTM_GATES)
    np.testing.assert_array_equal(b["forget"], 2.5)
    np.testing.assert_array_equal(recurrent.conv_lstm(H, (3,)).init(KEY, (5, F)).bias[H : 2 * H], 1.0)


def test_no_forget_gate_raises():
    chrono = recurrent.chrono_init(T)
    with clear_error("forget gate", "gates ('input', 'cell', 'output')"):
        recurrent.lstm_variant("NFG", H, bias_init=chrono)
    with clear_error("forget gate"):
        recurrent.lstm(H, forget_gate=False, bias_init=chrono)
    with clear_error("forget gate"):
        chrono(KEY, (3 * H,), gates=("reset", "candidate", "output"))


@pytest.mark.parametrize(
    "max_steps", [2, 2.0, 1, 0, -10, float("nan"), float("inf"), True, None, "100", [100], jnp.ones(2)]
)
def test_max_steps_must_be_a_number_above_two(max_steps):
    with clear_error("max_steps", "greater than 2"):
        recurrent.chrono_init(max_steps)


def test_max_steps_accepted():
    for max_steps in (3, 2.5, np.int64(100), jnp.asarray(1000.0)):
        assert recurrent.chrono_init(max_steps).max_steps is max_steps
    # a population over max_steps: traced, unchecked, and each member drawn in its own range
    bias = jax.vmap(lambda m: recurrent.lstm(H, bias_init=recurrent.chrono_init(m)).init(KEY, (F,)).bias)(
        jnp.array([3.0, 1000.0])
    )
    assert_chrono(np.asarray(bias[0, H : 2 * H]), max_steps=3)
    assert_chrono(np.asarray(bias[1, H : 2 * H]), max_steps=1000)
    assert bias[1, H : 2 * H].max() > np.log(3)


def test_direct_call_checks_the_fused_shape():
    chrono = recurrent.chrono_init(T)
    # Not a multiple of 4 blocks, or not one axis. (One block (H,) of an H divisible by 4 cannot
    # be told from a whole bias, so a cell that draws its bias per block must not take chrono_init.)
    for shape in ((6,), (4 * H + 1,), (4, H), ()):
        with clear_error("shape", "bias_init="):
            chrono(KEY, shape)
    assert chrono(KEY, (3 * H,), gates=recurrent.GRU_GATES).shape == (3 * H,)


def test_param_dtype():
    cell = lambda dtype: recurrent.lstm(H, bias_init=recurrent.chrono_init(T), param_dtype=dtype)  # noqa: E731
    bias16 = cell(jnp.bfloat16).init(KEY, (F,)).bias
    assert bias16.dtype == jnp.bfloat16
    np.testing.assert_allclose(bias16.astype(jnp.float32), cell(jnp.float32).init(KEY, (F,)).bias, rtol=1e-2)


@pytest.mark.parametrize("name", ["lstm", "cifg_lstm", "gru"])
def test_time_constants(name):
    """With zero kernels each unit starts as a leaky integrator: the kept state decays as
    ``keep^t`` with ``keep = u / (1 + u)``, forgetting time ``1 / (1 - keep) = 1 + u`` in
    ``[2, T]``, and the input is weighted ``1 - keep`` (LSTM: ``i = 1 - f``)."""
    factory = {"lstm": recurrent.lstm, "cifg_lstm": recurrent.cifg_lstm, "gru": recurrent.gru}[name]
    cell = factory(H, bias_init=recurrent.chrono_init(T), **ZERO_KERNELS)
    layer = recurrent.rnn(cell)
    params = layer.init(KEY, (F,))
    steps, state0 = 30, jnp.ones((1, H))
    carry0 = state0 if name == "gru" else recurrent.LSTMState(jnp.zeros((1, H)), state0)
    carry, _, trace = layer.apply(params, jnp.zeros((1, steps, F)), carry=carry0, return_trace=True)
    keep_gate = "update" if name == "gru" else "forget"
    keep = np.asarray(trace.gates[keep_gate][0], np.float64)  # (steps, H), constant over time
    np.testing.assert_allclose(keep, np.broadcast_to(keep[0], keep.shape), rtol=1e-6)
    times = 1 / (1 - keep[0])
    assert (times >= 2 - 1e-4).all() and (times <= T + 1e-3).all() and np.ptp(times) > T / 4
    bias_keep = blocks(params.bias, recurrent.GRU_GATES if name == "gru" else cell_gates(name))[keep_gate]
    np.testing.assert_allclose(times, 1 + np.exp(bias_keep), rtol=1e-4)
    state = carry if name == "gru" else carry.c
    np.testing.assert_allclose(state[0], keep[0] ** steps, rtol=1e-4)  # g = tanh(0) = 0 adds nothing
    if name == "lstm":  # CIFG's input gate is 1 - f by construction
        np.testing.assert_allclose(trace.gates["input"][0] + trace.gates["forget"][0], 1.0, rtol=1e-6)


def cell_gates(name):
    return recurrent.CIFG_GATES if name == "cifg_lstm" else recurrent.LSTM_GATES


def test_gate_blocks_are_drawn_one_after_another_with_the_values_of_separate_draws():
    """jaxlib's batched QR (the orthogonal initialiser under ``vmap``) holds an XLA CPU pool thread
    while its parts wait in the same pool; two at once deadlocked a 2-core machine's population init.
    So each gate block's key is computed from the previous block (a zero added to its bits): the QRs
    of one cell can never run at once. A race cannot be provoked reliably in a test, so this checks
    the dependency itself, and that the values are those of the blocks drawn separately."""
    from recurrent._lstm import fused_blocks

    orthogonal = jax.nn.initializers.orthogonal()
    for key in (jax.random.key(3), jax.random.PRNGKey(3)):  # typed and raw keys
        for blocks in (3, 4):
            separate = jnp.concatenate([orthogonal(k, (6, 6)) for k in jax.random.split(key, blocks)], axis=-1)
            np.testing.assert_array_equal(fused_blocks(orthogonal, key, (6, 6), blocks, jnp.float32), separate)
    # a real data dependency (the CPU runtime orders nothing else): a NaN in the first block, which
    # no initialiser returns, would change the second block's key
    calls = []

    def nan_first(k, shape, dtype):
        calls.append(k)
        return jnp.full(shape, jnp.nan, dtype) if len(calls) == 1 else orthogonal(k, shape, dtype)

    key = jax.random.key(3)
    second = orthogonal(jax.random.split(key, 2)[1], (6, 6))
    assert not np.array_equal(fused_blocks(nan_first, key, (6, 6), 2, jnp.float32)[:, 6:], second)
