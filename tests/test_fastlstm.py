"""``rnn(lstm(H) or gru(H), implementation="vjp")``: the plain, peephole and CIFG LSTMs and the GRU with a
hand-written backward pass (weight gradients outside the loop) equal the scan's autodiff,
exactly in float64."""

from __future__ import annotations

import warnings

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests.fast_compiles import optimisations_off

B, T, F, H = 3, 7, 4, 5


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Each check compiles a gradient of a small scan on both paths; XLA's optimisation passes
    would take most of the time. Both sides of each comparison are compiled alike."""
    with optimisations_off():
        yield


def _rand(shape, seed, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


LSTMS = {
    "lstm": lambda **o: recurrent.lstm(H, **o),
    "peephole": lambda **o: recurrent.peephole_lstm(H, **o),
    "cifg": lambda **o: recurrent.cifg_lstm(H, **o),
    "cifg+peephole": lambda **o: recurrent.lstm(H, coupled=True, peephole=True, **o),
}


def _randomised(params):
    """Random biases and peepholes (the initialisers give constants and zeros)."""
    fields = ("bias", "peephole_input", "peephole_forget", "peephole_output")
    return params._replace(
        **{
            k: _rand(getattr(params, k).shape, 5 + n, getattr(params, k).dtype)
            for n, k in enumerate(fields)
            if getattr(params, k) is not None
        }
    )


# (reverse, time_major). The hand-written pass itself sees every sequence forwards and batch-first:
# the driver reverses the valid prefixes and moves the time axis around it (``_rnn._kernel_apply``),
# the same code for every cell. So the plain LSTM runs in all four layouts with both projections,
# and each other cell (whose pass differs in the gates and the peepholes) in two of them, so that
# every layout meets several cells.
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]
LSTM_CASES = [
    pytest.param(cell, projection, reverse, time_major, id=f"{time_major}-{reverse}-{projection}-{cell}")
    for k, cell in enumerate(LSTMS)
    for j, projection in enumerate(["fused", "hoisted"])
    for reverse, time_major in (LAYOUTS if k == 0 else [LAYOUTS[(2 * k + j + 1) % 4]])
]


@pytest.mark.parametrize("cell, projection, reverse, time_major", LSTM_CASES)
def test_vjp_equals_scan_autodiff_in_float64(x64, cell, projection, reverse, time_major):
    make = lambda implementation: recurrent.rnn(  # noqa: E731
        LSTMS[cell](param_dtype=jnp.float64),
        projection=projection,
        reverse=reverse,
        implementation=implementation,
    )
    scan, fast = make("scan"), make("vjp")
    params = _randomised(scan.init(jax.random.key(0), (F,)))
    xs = _rand((2, B, T, F), 1)  # two batch axes
    if time_major:
        xs = jnp.moveaxis(xs, 2, 0)
    lengths = jnp.array([[7, 4, 0], [1, 7, 3]])
    carry = recurrent.LSTMState(_rand((2, B, H), 2), _rand((2, B, H), 3))

    def loss(layer, params, xs, carry):
        with warnings.catch_warnings():
            warnings.simplefilter("error", recurrent.FallbackWarning)  # the fast path must be taken
            c, ys = layer.apply(params, xs, lengths=lengths, carry=carry, time_major=time_major)
        return jnp.sum(jnp.sin(3 * ys)) + jnp.sum(jnp.sin(c.h)) + jnp.sum(c.c**2), (c, ys)

    value_and_grad = lambda layer: jax.value_and_grad(  # noqa: E731
        lambda *a: loss(layer, *a), argnums=(0, 1, 2), has_aux=True
    )(params, xs, carry)
    got, want = jax.jit(lambda: (value_and_grad(fast), value_and_grad(scan)))()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_vjp_vmaps_and_jits():
    fast = recurrent.rnn(recurrent.lstm(H), implementation="vjp")
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: fast.init(k, (F,)))(keys)
    xs = _rand((B, T, F), 1, jnp.float32)
    grad = jax.jit(jax.vmap(jax.grad(lambda p: jnp.sum(fast.apply(p, xs)[1] ** 2))))(params)
    scan = recurrent.rnn(recurrent.lstm(H))
    scan_grad = jax.jit(jax.grad(lambda p: jnp.sum(scan.apply(p, xs)[1] ** 2)))  # one member at a time
    for m in range(3):
        p = jax.tree.map(lambda a: a[m], params)
        want = scan_grad(p)
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[m], grad)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, options, match",
    [
        (lambda: recurrent.lstm(H, proj_size=3), {}, "proj_size"),
        (lambda: recurrent.lstm(H, layer_norm=True), {}, "layer_norm"),
        (lambda: recurrent.lstm_variant("NIG", H), {}, "input_gate"),
        (lambda: recurrent.gru(H, layer_norm=True), {}, "layer_norm"),
        (lambda: recurrent.gru(H, reset_after=False), {}, "reset_after"),
        (lambda: recurrent.lstm(H), {"remat": True}, "remat"),
        (lambda: recurrent.lstm(H), {"zoneout": 0.1}, "zoneout"),
    ],
)
def test_vjp_fallbacks_say_why(make, options, match):
    fast = recurrent.rnn(make(), implementation="vjp", **options)
    params = fast.init(jax.random.key(0), (F,))
    xs = _rand((B, T, F), 1, jnp.float32)
    with pytest.warns(recurrent.FallbackWarning, match=rf'implementation="vjp".*{match}'):
        got = jax.jit(fast.apply)(params, xs)  # the warning comes as the program is traced
    want = jax.jit(recurrent.rnn(make(), **options).apply)(params, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_vjp_is_reverse_mode_only():
    fast = recurrent.rnn(recurrent.lstm(H), implementation="vjp")
    params = fast.init(jax.random.key(0), (F,))
    xs = _rand((B, T, F), 1, jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: fast.apply(params, x)[1], (xs,), (xs,))


@pytest.mark.parametrize("name", ["lstm", "gru", "peephole_lstm", "cifg_lstm"])
def test_vjp_in_bfloat16_follows_the_cells_rounding(name):
    """With ``dtype=jnp.bfloat16`` the fast path computes what the cell computes (bfloat16
    matmul operands accumulated in float32, outputs rounded to bfloat16, the cell state in
    float32), and its gradients agree with the scan's autodiff to bfloat16 precision, and
    with float32's."""
    make = lambda implementation, dtype=jnp.bfloat16: recurrent.rnn(  # noqa: E731
        getattr(recurrent, name)(H, dtype=dtype), implementation=implementation
    )
    scan, fast = make("scan"), make("vjp")
    params = scan.init(jax.random.key(0), (F,))
    if name != "gru":
        params = _randomised(params)
    xs = _rand((B, T, F), 1, jnp.float32)
    lengths = jnp.array([7, 4, 0])
    state = (lambda carry: carry) if name == "gru" else (lambda carry: carry.c)  # noqa: E731

    def loss(layer, params, xs):
        with warnings.catch_warnings():
            warnings.simplefilter("error", recurrent.FallbackWarning)
            carry, ys = layer.apply(params, xs, lengths=lengths)
        return jnp.sum(jnp.sin(3 * ys.astype(jnp.float32))) + jnp.sum(state(carry) ** 2), (state(carry), ys)

    def value_and_grad(layer):
        return jax.value_and_grad(lambda *a: loss(layer, *a), (0, 1), has_aux=True)(params, xs)

    float32 = make("scan", None)
    ((_, (got_s, got_ys)), got_g), ((_, (want_s, want_ys)), want_g), (_, ref) = jax.jit(
        lambda: [value_and_grad(layer) for layer in (fast, scan, float32)]
    )()
    assert got_ys.dtype == want_ys.dtype == jnp.bfloat16 and got_s.dtype == want_s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_ys, np.float32), np.asarray(want_ys, np.float32), atol=2**-8)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-2, atol=1e-2)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=2e-2 * float(jnp.abs(b).max()))
    # and both are close to float32's gradients (bfloat16 is not a silent wrong answer)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(jnp.abs(b).max()))


def test_vjp_bfloat16_matmuls_take_bfloat16_operands_and_accumulate_in_float32():
    fast = recurrent.rnn(recurrent.lstm(H, dtype=jnp.bfloat16), implementation="vjp")
    params = fast.init(jax.random.key(0), (F,))
    xs = _rand((B, T, F), 1, jnp.float32)
    text = jax.jit(jax.grad(lambda p: jnp.sum(fast.apply(p, xs)[1].astype(jnp.float32)))).lower(params).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("bf16>" in line.split("->")[0] and "xf32>" in line.split("->")[-1] for line in dots), dots


def test_vjp_names_what_it_covers_for_other_cells():
    from recurrent._cudnn import cell_reason

    assert "LSTM (plain, peephole, CIFG) and the GRU only" in cell_reason(recurrent.conv_lstm(H, (3,)), "vjp")
    assert "plain LSTM only" in cell_reason(recurrent.conv_lstm(H, (3,)), "cudnn")  # was a KeyError
    assert "plain LSTM only" in cell_reason(recurrent.gru(H), "cudnn")
    assert cell_reason(recurrent.gru(H), "vjp") is None and cell_reason(recurrent.lstm(H), "vjp") is None
    assert cell_reason(recurrent.peephole_lstm(H), "vjp") is None and cell_reason(recurrent.cifg_lstm(H), "vjp") is None
    assert "peephole" in cell_reason(recurrent.peephole_lstm(H), "cudnn")  # cuDNN: the plain LSTM only
    assert "proj_size" in cell_reason(recurrent.lstm(H, proj_size=2), "vjp")


@pytest.mark.parametrize("projection", ["fused", "hoisted"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_vjp_equals_scan_autodiff_in_float64(x64, projection, reverse):
    make = lambda implementation: recurrent.rnn(  # noqa: E731
        recurrent.gru(H, param_dtype=jnp.float64), projection=projection, reverse=reverse, implementation=implementation
    )
    scan, fast = make("scan"), make("vjp")
    params = scan.init(jax.random.key(0), (F,))
    params = params._replace(bias=_rand(params.bias.shape, 5), recurrent_bias=_rand(params.recurrent_bias.shape, 6))
    xs = _rand((2, B, T, F), 1)
    lengths = jnp.array([[7, 4, 0], [1, 7, 3]])
    carry = _rand((2, B, H), 2)

    def loss(layer, params, xs, carry):
        with warnings.catch_warnings():
            warnings.simplefilter("error", recurrent.FallbackWarning)
            h, ys = layer.apply(params, xs, lengths=lengths, carry=carry)
        return jnp.sum(jnp.sin(3 * ys)) + jnp.sum(h**2), (h, ys)

    value_and_grad = lambda layer: jax.value_and_grad(  # noqa: E731
        lambda *a: loss(layer, *a), argnums=(0, 1, 2), has_aux=True
    )(params, xs, carry)
    got, want = jax.jit(lambda: (value_and_grad(fast), value_and_grad(scan)))()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def _scan_unrolls(jaxpr) -> list:
    """The ``unroll`` of every ``scan`` in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["unroll"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _scan_unrolls(sub)
    return found


@pytest.mark.parametrize("make", [recurrent.lstm, recurrent.gru])
def test_vjp_honours_unroll_in_both_loops(x64, make):
    """``unroll`` reaches the forward and the backward loop of the hand-written pass (it was
    silently dropped), and the results are the scan's."""
    layers = {
        implementation: recurrent.rnn(make(H, param_dtype=jnp.float64), unroll=3, implementation=implementation)
        for implementation in ("scan", "vjp")
    }
    params = layers["scan"].init(jax.random.key(0), (F,))
    xs = _rand((B, T, F), 1)
    grad = {
        name: jax.grad(lambda p, xs, layer=layer: jnp.sum(jnp.sin(layer.apply(p, xs)[1])), argnums=(0, 1))
        for name, layer in layers.items()
    }
    jaxpr = jax.make_jaxpr(grad["vjp"])(params, xs)
    assert _scan_unrolls(jaxpr.jaxpr) == [3, 3], "the forward and the backward loop, each unrolled 3 times"
    got, want = jax.jit(lambda p, xs: (grad["vjp"](p, xs), grad["scan"](p, xs)))(params, xs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
