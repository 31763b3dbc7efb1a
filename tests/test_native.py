"""The optional native LSTM kernel (:mod:`recurrent.native`: an XLA FFI custom call, oneDNN inside).

The kernel's tests are skipped, with the reason, only where it cannot be built (oneDNN or a C++
compiler missing: ``pip install "recurrent[native]"``) or JAX does not run on CPU; elsewhere they
all run (compiling the kernel on first use), so a kernel that does not compile or load fails here
instead of being skipped.
The fallback (a clear warning, then the scan) and the reasons other cells declare are tested
everywhere.

Checked: values against the NumPy reference written from the paper's equations (with an initial
carry, with lengths including 0 and T), values and gradients against the ``lax.scan`` layer to
1e-5 (forward and reverse; directly and through ``rnn(..., implementation="native")`` with lengths
and ``carry=``), the fused training path at sizes that leave vector-loop remainders (B = 1, H not a
multiple of 8), lengths against per-sequence runs, the inference forward (oneDNN's primitive)
against the training forward (the fused one), ``jax.vmap`` against a loop, and the errors on inputs
the kernel does not take.

bfloat16 compute (``recurrent.lstm(H, dtype=jnp.bfloat16)``, float32 parameters and ``c``): values
and gradients against the scan's in the same dtype, with lengths, at B = 1 and odd H, to
``BF16_TOL`` of each array's largest magnitude. bfloat16 keeps 8 significant bits (a rounding
moves a value by up to 2^-9 of it, one step of the last bit is 2^-8 = 0.4 %); the forward rounds
exactly where the cell does, but the GEMMs add in another order, so an output now and then lands
one bfloat16 step away and carries that into the next steps; the backward rounds ``dz`` to
bfloat16 for every GEMM (the scan's derivative keeps it float32 for ``dh`` and ``dU``) and sums
``dU`` and ``dW`` over all steps in float32 (the scan rounds each step's term to bfloat16 first):
a few roundings of 2^-9 each, within 2 % of the largest entry. That the forward rounds where the
cell does is checked more sharply: at most 5 % of the bfloat16 outputs differ from the scan's at
all (none at these sizes; a kernel that did not round ``x W + b`` to bfloat16 differs in about 30 %).
"""

from __future__ import annotations

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import native
from recurrent._sequence import reverse_sequences
from tests import reference
from tests.native_support import BF16_TOL, TOL, backward_calls, close, close_to_largest, needs_kernel

B, T, F, H = 4, 6, 3, 5


def _setup(seed=0):
    cell = recurrent.lstm(H)
    keys = jax.random.split(jax.random.key(seed), 4)
    params = cell.init(keys[0], (F,))
    xs = jax.random.normal(keys[1], (B, T, F))
    carry = recurrent.LSTMState(jax.random.normal(keys[2], (B, H)), jax.random.normal(keys[3], (B, H)))
    return cell, params, xs, carry


def _loss(apply, lengths):
    def loss(params, xs, carry):
        carry, ys = apply(params, xs, lengths, carry)
        w = jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape) / ys.size
        return jnp.sum(ys * w) + jnp.sum(carry.h * 1.3) - jnp.sum(carry.c * 0.7), (carry, ys)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _scan(cell, reverse=False):
    layer = recurrent.rnn(cell, reverse=reverse)
    return lambda params, xs, lengths, carry: layer.apply(params, xs, lengths=lengths, carry=carry)


def _native(reverse=False):
    """The native layer as the driver would run it (reverse: flip each valid prefix around it)."""

    def apply(params, xs, lengths, carry):
        if reverse:
            xs = reverse_sequences(xs, lengths, 1)
        carry, ys = native.apply(params, xs, lengths, carry)
        return carry, reverse_sequences(ys, lengths, 1) if reverse else ys

    return apply


@needs_kernel
def test_loads():
    assert native.reason() is None


@needs_kernel
@pytest.mark.parametrize("lengths", [None, [0, 3, T, 1]], ids=["full", "lengths"])
def test_matches_numpy_reference(lengths):
    _, params, xs, carry = _setup()
    got_carry, got_ys = jax.jit(native.apply)(params, xs, None if lengths is None else jnp.array(lengths), carry)
    want_ys = np.zeros((B, T, H))
    want_h, want_c = np.asarray(carry.h, np.float64).copy(), np.asarray(carry.c, np.float64).copy()
    for b in range(B):
        n = T if lengths is None else lengths[b]
        if n == 0:
            continue
        ys, (h, c) = reference.lstm(
            xs[b : b + 1, :n], *params[:3], h0=np.asarray(carry.h[b : b + 1]), c0=np.asarray(carry.c[b : b + 1])
        )
        want_ys[b, :n], want_h[b], want_c[b] = ys[0], h[0], c[0]
    close((got_ys, got_carry.h, got_carry.c), (want_ys, want_h, want_c))


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, [0, 3, T, 1]], ids=["full", "lengths"])
def test_values_and_gradients_match_scan(lengths, reverse):
    cell, params, xs, carry = _setup(1)
    lengths = None if lengths is None else jnp.array(lengths)
    want = _loss(_scan(cell, reverse), lengths)(params, xs, carry)
    got = _loss(_native(reverse), lengths)(params, xs, carry)
    close(got, want)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 7, 3, 13), (3, 9, 5, 21)], ids=["B1_H13", "B3_H21"])
def test_training_path_matches_scan_at_odd_sizes(shape):
    """The fused training forward and backward where the vector loops have remainders: H not a
    multiple of 8 (nor of 16), and a batch of one."""
    b, t, f, h = shape
    cell = recurrent.lstm(h)
    keys = jax.random.split(jax.random.key(6), 4)
    params = cell.init(keys[0], (f,))
    xs = jax.random.normal(keys[1], (b, t, f))
    carry = recurrent.LSTMState(jax.random.normal(keys[2], (b, h)), jax.random.normal(keys[3], (b, h)))
    for lengths in (None, jnp.array([t - 2] + [t] * (b - 1))):
        close(_loss(_native(), lengths)(params, xs, carry), _loss(_scan(cell), lengths)(params, xs, carry))


@needs_kernel
@pytest.mark.parametrize("shape", [(B, 0, F), (0, T, F)], ids=["no_steps", "no_batch"])
def test_empty_inputs(shape):
    cell, params, _, _ = _setup()
    xs = jnp.ones(shape)
    layer = recurrent.rnn(native.attach(cell), implementation="native")
    grads = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[1]) + jnp.sum(layer.apply(p, x)[0].c), argnums=(0, 1))
    close(jax.jit(layer.apply)(params, xs), recurrent.rnn(cell).apply(params, xs), tol=0)
    close(grads(params, xs), jax.tree.map(jnp.zeros_like, (params, xs)), tol=0)


@needs_kernel
def test_inference_forward_matches_training_forward():
    _, params, xs, carry = _setup(2)
    inference = jax.jit(native.lstm_layer)(*params[:3], xs, carry.h, carry.c)
    training, _ = jax.jit(lambda *a: jax.vjp(native.lstm_layer, *a))(*params[:3], xs, carry.h, carry.c)
    close(inference, training)  # two implementations: oneDNN's primitive and the fused training forward


@needs_kernel
def test_vmap_matches_loop():
    _, params, xs, carry = _setup(3)
    xs2 = jnp.stack([xs, 2 * xs])

    def run(p, x):
        return native.apply(p, x, jnp.array([1, T, 0, 2]), carry)

    def loss(p, x):
        carry, ys = run(p, x)
        return jnp.sum(ys**2) + jnp.sum(carry.c)

    got = jax.jit(jax.vmap(run, (None, 0)))(params, xs2)
    want = [jax.jit(run)(params, x) for x in xs2]
    # Several layers in one call run the fused forward (one alone, oneDNN's primitive): to 1e-5.
    close(got, jax.tree.map(lambda *a: jnp.stack(a), *want))
    got_grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jax.vmap(loss, (None, 0))(p, x)), argnums=(0, 1)))(params, xs2)
    each = [jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x) for x in xs2]
    close(got_grads[0], jax.tree.map(lambda a, b: a + b, each[0][0], each[1][0]))
    close(got_grads[1], jnp.stack([each[0][1], each[1][1]]))


def test_rejects_other_dtypes_and_ranks():
    _, params, xs, carry = _setup()
    with pytest.raises(ValueError, match="float32 only(.|\n)*xs bfloat16(.|\n)*fix"):
        native.apply(params, xs.astype(jnp.bfloat16), None, carry)
    with pytest.raises(ValueError, match="float32 only, or bfloat16 compute(.|\n)*got:      compute dtype float16"):
        native.apply(params, xs, None, carry, jnp.float16)
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    bf16_carry = recurrent.LSTMState(carry.h.astype(jnp.bfloat16), carry.c)
    with pytest.raises(ValueError, match="input_kernel bfloat16, recurrent_kernel bfloat16, bias bfloat16"):
        native.apply(bf16_params, xs, None, bf16_carry, jnp.bfloat16)
    with pytest.raises(ValueError, match="carry.h float32"):
        native.apply(params, xs, None, carry, jnp.bfloat16)
    with pytest.raises(ValueError, match="one batch axis(.|\n)*got:      xs \\(2, 4, 6, 3\\)"):
        native.apply(params, jnp.stack([xs, xs]), None, carry)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rnn_runs_native_with_lengths_and_carry(reverse):
    """Through the driver: lengths (0 and T among them), an initial carry, reverse, no fallback."""
    cell, params, xs, carry = _setup(4)
    lengths = jnp.array([2, 0, T, 5])
    native_layer = recurrent.rnn(native.attach(cell), reverse=reverse, implementation="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = _loss(lambda p, x, n, c: native_layer.apply(p, x, lengths=n, carry=c), lengths)(params, xs, carry)
    close(got, _loss(_scan(cell, reverse), lengths)(params, xs, carry))


@needs_kernel
def test_rnn_native_lengths_equal_per_sequence_runs():
    """The battery's lengths check: each sequence alone, cut at its length, gives the same."""
    cell, params, xs, _ = _setup(5)
    lengths = [3, 0, T, 1]
    layer = recurrent.rnn(native.attach(cell), implementation="native")
    carry, ys = jax.jit(layer.apply)(params, xs, lengths=jnp.array(lengths))
    zero = cell.initial_carry(params, (1, F))
    for b, n in enumerate(lengths):
        one_carry, one_ys = jax.jit(layer.apply)(params, xs[b : b + 1, :n]) if n else (zero, None)
        close((carry.h[b], carry.c[b]), (one_carry.h[0], one_carry.c[0]))
        if n:
            close(ys[b, :n], one_ys[0])
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0)


def test_falls_back_with_a_clear_warning_when_not_built(monkeypatch, tmp_path):
    cell, params, xs, _ = _setup()
    monkeypatch.setenv("RECURRENT_NATIVE_LIBRARY", str(tmp_path / "missing.so"))
    layer = recurrent.rnn(native.attach(cell), implementation="native")
    with pytest.warns(recurrent.FallbackWarning, match="not built(.|\n)*python -m recurrent.native.build"):
        _, ys = layer.apply(params, xs)
    close(ys, recurrent.rnn(cell).apply(params, xs)[1], tol=0)


def test_other_cells_declare_why_not():
    peephole = native.attach(recurrent.lstm(H, peephole=True))
    params = peephole.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning, match="only; this cell has {'peephole': True}"):
        recurrent.rnn(peephole, implementation="native").apply(params, jnp.ones((B, T, F)))
    assert "is not one" in native.attach(recurrent.min_gru(H)).spec.kernels["native"]
    # bfloat16 compute with float32 parameters gets the kernel (declared by the cell itself); other
    # dtypes the reason why not.
    assert isinstance(recurrent.lstm(H, dtype=jnp.bfloat16).spec.kernels["native"], recurrent.SequenceKernel)
    assert isinstance(
        native.attach(recurrent.lstm(H, dtype=jnp.bfloat16)).spec.kernels["native"], recurrent.SequenceKernel
    )
    for odd in (dict(dtype=jnp.float16), dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)):
        cell = native.attach(recurrent.lstm(H, **odd))
        with pytest.warns(recurrent.FallbackWarning, match="only; this cell has {'dtype'"):
            recurrent.rnn(cell, implementation="native").apply(cell.init(jax.random.key(0), (F,)), jnp.ones((B, T, F)))
    peephole_bf16 = native.attach(recurrent.lstm(H, peephole=True, dtype=jnp.bfloat16)).spec.kernels["native"]
    assert "'peephole': True" in peephole_bf16


def _bf16_setup(shape, seed):
    b, t, f, h = shape
    cell = recurrent.lstm(h, dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.key(seed), 5)
    params = cell.init(keys[0], (f,))
    params = params._replace(bias=jax.random.normal(keys[4], params.bias.shape))  # no zero bias to hide rounding
    xs = jax.random.normal(keys[1], (b, t, f))
    carry = recurrent.LSTMState(
        jax.random.normal(keys[2], (b, h)).astype(jnp.bfloat16), jax.random.normal(keys[3], (b, h))
    )
    return cell, params, xs, carry


def _bf16_loss(layer, lengths, argnums=(0, 1, 2)):
    """The jitted value and gradients (w.r.t. ``argnums``) of a loss of ``layer``'s outputs and carry,
    summed in float32 (so it serves float32 compute too)."""

    def loss(params, xs, carry):
        carry, ys = layer.apply(params, xs, lengths=lengths, carry=carry)
        w = jnp.arange(ys.size, dtype=jnp.float32).reshape(ys.shape) / ys.size
        value = jnp.sum(ys.astype(jnp.float32) * w) + jnp.sum(carry.h.astype(jnp.float32) * 1.3)
        return value - jnp.sum(carry.c * 0.7), (carry, ys)

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(B, T, F, H), (1, 7, 3, 13), (3, 9, 5, 21)], ids=["B4_H5", "B1_H13", "B3_H21"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_bfloat16_values_and_gradients_match_scan(shape, with_lengths, reverse):
    b, t = shape[:2]
    cell, params, xs, carry = _bf16_setup(shape, 7)
    lengths = jnp.array([t - 2, 0, t, 1][:b] if b > 1 else [t - 2]) if with_lengths else None
    layer = recurrent.rnn(native.attach(cell), reverse=reverse, implementation="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = _bf16_loss(layer, lengths)(params, xs, carry)
    want = _bf16_loss(recurrent.rnn(cell, reverse=reverse), lengths)(params, xs, carry)
    ((_, (carry_got, ys_got)), _), ((_, (_, ys_want)), _) = got, want
    assert ys_got.dtype == carry_got.h.dtype == jnp.bfloat16 and carry_got.c.dtype == jnp.float32
    close_to_largest(got, want)
    assert float(np.mean(np.asarray(ys_got, np.float32) != np.asarray(ys_want, np.float32))) <= 0.05
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))
    if with_lengths:
        for i, n in enumerate(np.asarray(lengths)):
            np.testing.assert_array_equal(np.asarray(ys_got[i, n:], np.float32), 0)


@needs_kernel
def test_bfloat16_inference_forward_matches_training_forward():
    _, params, xs, carry = _bf16_setup((B, T, F, H), 8)
    args = (*params[:3], xs.astype(jnp.bfloat16), carry.h, carry.c)
    inference = jax.jit(native.lstm_layer)(*args)
    training, _ = jax.jit(lambda *a: jax.vjp(native.lstm_layer, *a))(*args)
    close(inference, training, tol=0)  # the same fused forward, once with a workspace of its own
    assert [a.dtype for a in inference] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


# ---- Many layers in one call: jax.vmap (a population, both directions of bidirectional) ----------


def _custom_calls(fn, *args, groups=None):
    """The kernel's custom calls in the compiled HLO of ``fn(*args)``, in order; with ``groups``,
    asserts that each runs that many layers (the leading axes of its first result, ``ys`` or ``dx``),
    so that a call per layer (in a loop, ``vmap_method="sequential"``) fails."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    calls = re.findall(r'= \(\w+\[([\d,]*)\][^\n]*custom_call_target="(recurrent_lstm\w*)"', hlo)
    if groups is not None:
        assert [tuple(int(d) for d in dims.split(","))[:-3] for dims, _ in calls] == [groups] * len(calls), calls
    return [target for _, target in calls]


def _population(shape, seed, dtype=None):
    """``(cell, params, xs, carry)`` for ``shape`` leading axes of independent layers."""
    n = int(np.prod(shape))
    cell = recurrent.lstm(H, dtype=dtype)
    keys = jax.random.split(jax.random.key(seed), n + 4)
    params = jax.vmap(lambda k: cell.init(k, (F,)))(keys[:n])
    params = params._replace(bias=jax.random.normal(keys[n + 3], params.bias.shape))  # no zero bias
    params = jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), params)
    h_dtype = jnp.float32 if dtype is None else dtype
    xs = jax.random.normal(keys[n], (*shape, B, T, F))
    h0 = jax.random.normal(keys[n + 1], (*shape, B, H)).astype(h_dtype)
    return cell, params, xs, recurrent.LSTMState(h0, jax.random.normal(keys[n + 2], (*shape, B, H)))


def _loop(fn, args, in_axes, shape):
    """``fn`` per member of the population (its leading ``shape`` axes), the results stacked back."""
    flat = [
        a if ax is None else jax.tree.map(lambda v: v.reshape(-1, *v.shape[len(shape) :]), a)
        for a, ax in zip(args, in_axes)
    ]
    each = [
        fn(*(a if ax is None else jax.tree.map(lambda v: v[i], a) for a, ax in zip(flat, in_axes)))
        for i in range(int(np.prod(shape)))
    ]
    return jax.tree.map(lambda *v: jnp.stack(v).reshape(*shape, *v[0].shape), *each)


@needs_kernel
@pytest.mark.parametrize("shape", [(3,), (2, 2)], ids=["M3", "nested_2x2"])
@pytest.mark.parametrize("inputs", ["batched", "shared"])
def test_vmap_population_matches_loop_and_scan(shape, inputs):
    """A population of layers (own parameters, carry; inputs each its own or shared) as one
    custom call per pass: values and gradients as each member alone, and as the scan, to 1e-5;
    nested vmaps fold into the same call."""
    cell, params, xs, carry = _population(shape, 9)
    if inputs == "shared":
        xs = xs[(0,) * len(shape)]
    lengths = jnp.array([0, 3, T, 1])
    in_axes = (0, 0 if inputs == "batched" else None, 0)

    def vmapped(fn):
        for _ in shape:
            fn = jax.vmap(fn, in_axes)
        return fn

    native_loss, scan_loss = _loss(_native(), lengths), _loss(_scan(cell), lengths)
    got = jax.jit(vmapped(native_loss))(params, xs, carry)
    close(got, _loop(native_loss, (params, xs, carry), in_axes, shape))
    close(got, jax.jit(vmapped(scan_loss))(params, xs, carry))
    assert _custom_calls(vmapped(native_loss), params, xs, carry, groups=shape) == [
        "recurrent_lstm_forward",
        "recurrent_lstm_backward",
    ]
    forward = vmapped(lambda p, x, c: native.apply(p, x, lengths, c))
    assert _custom_calls(forward, params, xs, carry, groups=shape) == ["recurrent_lstm_inference"]
    close(jax.jit(forward)(params, xs, carry), got[0][1])


@needs_kernel
def test_vmap_shared_parameters_sum_their_gradients():
    """Parameters shared by the population (unbatched under vmap): their gradient is the sum of
    each member's, from one backward call."""
    cell, params, xs, carry = _population((3,), 10)
    params = jax.tree.map(lambda a: a[0], params)
    lengths = jnp.array([2, T, 0, 5])

    def total(apply):
        def loss(p, x, c):
            def one(x, c):
                c, ys = apply(p, x, lengths, c)
                return jnp.sum(ys**2) + jnp.sum(c.h * 1.3) - jnp.sum(c.c * 0.7)

            return jnp.sum(jax.vmap(one)(x, c))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    got = total(_native())(params, xs, carry)
    close(got, total(_scan(cell))(params, xs, carry))
    each = [total(_native())(params, *jax.tree.map(lambda a: a[i : i + 1], (xs, carry))) for i in range(3)]
    close(got[1][0], jax.tree.map(lambda *g: sum(g), *(e[1][0] for e in each)))
    assert _custom_calls(total(_native()), params, xs, carry, groups=(3,)) == [
        "recurrent_lstm_forward",
        "recurrent_lstm_backward",
    ]


@needs_kernel
@pytest.mark.parametrize("merge", ["concat", "sum"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_bidirectional_runs_both_directions_in_one_call(merge, dtype):
    """``bidirectional(rnn(lstm(H), implementation="native"))``: both directions as one custom call
    per pass (the combinator vmaps the layer's own apply over a direction axis), values and
    gradients as the scan's, with lengths (0 and T among them)."""
    cell = recurrent.lstm(H, dtype=dtype)
    native_bi = recurrent.bidirectional(recurrent.rnn(cell, implementation="native"), merge=merge)
    scan_bi = recurrent.bidirectional(recurrent.rnn(cell), merge=merge)
    keys = jax.random.split(jax.random.key(11), 3)
    params = native_bi.init(keys[0], (F,))
    xs = jax.random.normal(keys[1], (B, T, F))
    lengths = jnp.array([3, 0, T, 1])

    def loss(layer):
        def f(params, xs):
            _, ys = layer.apply(params, xs, lengths=lengths)
            w = jnp.arange(ys.size, dtype=jnp.float32).reshape(ys.shape) / ys.size
            return jnp.sum(ys.astype(jnp.float32) * w), ys

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = jax.jit(loss(native_bi))(params, xs)
        suffix = "" if dtype is None else "_bf16"
        training = [f"recurrent_lstm_forward{suffix}", f"recurrent_lstm_backward{suffix}"]
        assert _custom_calls(loss(native_bi), params, xs, groups=(2,)) == training
        inference = f"recurrent_lstm_inference{suffix}"
        forward = lambda p, x: native_bi.apply(p, x, lengths=lengths)  # noqa: E731
        assert _custom_calls(forward, params, xs, groups=(2,)) == [inference]
        ys_forward = jax.jit(forward)(params, xs)[1]
    want = jax.jit(loss(scan_bi))(params, xs)
    if dtype is None:
        close(got, want)
        close(ys_forward, want[0][1])
    else:
        close_to_largest(got, want)
        close_to_largest(ys_forward, want[0][1])


@needs_kernel
def test_bfloat16_vmap_population_matches_loop_and_scan():
    """bfloat16 compute under vmap: each layer of the population as it alone (the same fused
    loops; the GEMMs run single-threaded inside a group, so within bfloat16's precision) and as
    the scan in bfloat16."""
    cell, params, xs, carry = _population((3,), 12, jnp.bfloat16)
    lengths = jnp.array([T - 2, 0, T, 1])
    layer = recurrent.rnn(native.attach(cell), implementation="native")
    native_loss, scan_loss = _bf16_loss(layer, lengths), _bf16_loss(recurrent.rnn(cell), lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = jax.jit(jax.vmap(native_loss))(params, xs, carry)
        calls = _custom_calls(jax.vmap(native_loss), params, xs, carry, groups=(3,))
    assert calls == ["recurrent_lstm_forward_bf16", "recurrent_lstm_backward_bf16"]
    for m in range(3):
        member = jax.tree.map(lambda a: a[m], got)
        args = jax.tree.map(lambda a: a[m], (params, xs, carry))
        close_to_largest(member, native_loss(*args))
        close_to_largest(member, scan_loss(*args))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))


# ---- Inputs not differentiated (a network's data): the backward skips dx ------------------------


@needs_kernel
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_parameter_gradients_skip_dx_and_match_scan(dtype, with_lengths):
    """Gradients w.r.t. the parameters and carry only (xs data, not differentiated): the backward call
    passes need_dx = false and declares its dx result empty, and the gradients are the scan's (to
    1e-5 in float32, to BF16_TOL of the largest in bfloat16); with xs differentiated too it passes
    need_dx = true, and dx is the scan's as well. With lengths the kernel reads xs with the hold
    feature concatenated, still not differentiated."""
    cell, params, xs, carry = _setup(13) if dtype is None else _bf16_setup((B, T, F, H), 13)
    lengths = jnp.array([T - 2, 0, T, 1]) if with_lengths else None
    layer, scan = recurrent.rnn(cell, implementation="native"), recurrent.rnn(cell)
    agree = close if dtype is None else close_to_largest
    suffix = "" if dtype is None else "_bf16"
    f = F + 1 if with_lengths else F  # the hold feature
    x_type = "f32" if dtype is None else "bf16"
    cases = [((0, 2), "false", f"tensor<0x{x_type}>"), ((0, 1, 2), "true", f"tensor<{T}x{B}x{f}x{x_type}>")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        for argnums, need_dx, dx in cases:
            got = _bf16_loss(layer, lengths, argnums)(params, xs, carry)
            agree(got, _bf16_loss(scan, lengths, argnums)(params, xs, carry))
            assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))
            calls = backward_calls("lstm", _bf16_loss(layer, lengths, argnums), params, xs, carry)
            assert calls == [(f"recurrent_lstm_backward{suffix}", need_dx, dx)]


@needs_kernel
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("inputs", ["batched", "shared"])
def test_vmap_parameter_gradients_skip_dx(dtype, inputs):
    """A vmapped population trained w.r.t. its parameters only (its inputs each its own, or shared):
    one backward call for all, need_dx = false with a dx result of (3, 0), and each member's
    gradients as it alone and as the scan's."""
    cell, params, xs, carry = _population((3,), 14, dtype)
    if inputs == "shared":
        xs = xs[0]
    lengths = jnp.array([T - 2, 0, T, 1])
    in_axes = (0, 0 if inputs == "batched" else None, 0)
    layer = recurrent.rnn(cell, implementation="native")
    native_loss = _bf16_loss(layer, lengths, (0, 2))
    scan_loss = _bf16_loss(recurrent.rnn(cell), lengths, (0, 2))
    agree = close if dtype is None else close_to_largest
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = jax.jit(jax.vmap(native_loss, in_axes))(params, xs, carry)
        calls = backward_calls("lstm", jax.vmap(native_loss, in_axes), params, xs, carry)
    x_type = "f32" if dtype is None else "bf16"
    assert calls == [(f"recurrent_lstm_backward{'' if dtype is None else '_bf16'}", "false", f"tensor<3x0x{x_type}>")]
    agree(got, _loop(native_loss, (params, xs, carry), in_axes, (3,)))
    agree(got, jax.jit(jax.vmap(scan_loss, in_axes))(params, xs, carry))
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))


@needs_kernel
def test_stacked_bidirectional_skips_dx_in_its_first_layer_only():
    """A stack of a bidirectional native layer (both directions in one call) and a native layer,
    trained w.r.t. its parameters: the first layer's inputs are data (need_dx = false, for both
    directions), the second's are the first's outputs (need_dx = true: their gradient reaches the
    first layer); the gradients are the scan stack's."""
    cell = recurrent.lstm(H)

    def stack(implementation):
        return recurrent.stacked(
            [
                recurrent.bidirectional(recurrent.rnn(cell, implementation=implementation)),
                recurrent.rnn(cell, implementation=implementation),
            ]
        )

    native_stack, scan_stack = stack("native"), stack("scan")
    keys = jax.random.split(jax.random.key(15), 2)
    params = native_stack.init(keys[0], (F,))
    xs = jax.random.normal(keys[1], (B, T, F))
    lengths = jnp.array([3, 0, T, 1])

    def grads(layer):
        def loss(params):
            _, ys = layer.apply(params, xs, lengths=lengths)
            return jnp.sum(ys * jnp.cos(ys))

        return jax.grad(loss)

    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = jax.jit(grads(native_stack))(params)
        calls = backward_calls("lstm", grads(native_stack), params)
    assert calls == [
        ("recurrent_lstm_backward", "false", "tensor<2x0xf32>"),
        ("recurrent_lstm_backward", "true", f"tensor<{T}x{B}x{2 * H + 1}xf32>"),
    ]
    close(got, jax.jit(grads(scan_stack))(params))


@needs_kernel
@pytest.mark.parametrize("layout", ["bidirectional", "population"])
def test_benchmark_smoke_layouts(tmp_path, layout):
    from benchmarks import native as bench

    result = bench.main(["--quick", f"--layout={layout}", "--members=3", "--out", str(tmp_path)])
    assert result["agreement"]["ys"] < TOL and result["agreement"]["grad"] < TOL
    assert set(result["rows"]) == {"torch", "ours_scan", "native"}
    assert (tmp_path / f"native_{layout}.json").exists()


@needs_kernel
@pytest.mark.parametrize("inputs", ["differentiated", "data"])
def test_benchmark_smoke(tmp_path, inputs):
    from benchmarks import native as bench

    result = bench.main(["--quick", "--inputs", inputs, "--out", str(tmp_path)])
    assert result["agreement"]["ys"] < TOL and result["agreement"]["grad"] < TOL
    assert set(result["rows"]) == {"torch", "ours_scan", "ours_vjp", "native"}
    assert result["inputs"] == inputs
    assert all(row["fwdbwd_ms"] > 0 for row in result["rows"].values())
    assert (tmp_path / "native.json").exists()


@needs_kernel
def test_onednn_gemm_benchmark_times_the_kernels_products_and_checks_them(tmp_path):
    from benchmarks import onednn_gemm

    out = tmp_path / "gemm.json"
    result = onednn_gemm.main(["--batch=3", "--steps=5", "--features=7", "--hidden=9", "--repeats=2", f"--out={out}"])
    assert result["agreement"] < 1e-5  # the ctypes binding multiplies what it says
    blocked = 3 if _cpu_has_avx2_fma() else 0  # the kernel's own GEMM, at three of the products
    assert len(result["gemms"]) == 6 + blocked and out.exists()
    assert all(row["ms"] > 0 and np.isfinite(row["gflops"]) for row in result["gemms"].values())
    assert sum("over_onednn" in row for row in result["gemms"].values()) == blocked


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_gemm_matches_numpy(threads):
    """The kernel's blocked GEMM (the products over all steps on AVX2 CPUs): C = op(A) B and
    C += op(A) B against NumPy's, with op(A) = A and A^T, at shapes that leave strips, panels and
    K-blocks partly filled, with K-blocks of 256 after the first (K = 517), a single row or column,
    and K = 0, on one thread and on two (which deal out groups of panels or strips)."""
    from benchmarks.onednn_gemm import _blocked_gemm, _omp_threads

    if not _cpu_has_avx2_fma():
        pytest.skip("the blocked GEMM is the kernel's AVX2 code; this CPU has no AVX2 and FMA")
    gemm = _blocked_gemm()
    assert gemm is not None  # the kernel is built and the CPU has AVX2 and FMA
    rng = np.random.default_rng(0)
    _omp_threads(threads)
    try:
        for M, N, K in [
            (7, 13, 5),
            (100, 37, 300),
            (131, 1030, 517),
            (1000, 17, 260),
            (1, 33, 7),
            (9, 1, 600),
            (5, 6, 0),
        ]:
            for trans in (b"N", b"T"):
                for beta in (0.0, 1.0):
                    A = rng.standard_normal((M, K) if trans == b"N" else (K, M), dtype=np.float32)
                    B = rng.standard_normal((K, N), dtype=np.float32)
                    C = rng.standard_normal((M, N + 3), dtype=np.float32)  # rows ldc = N + 3 apart
                    before = C.copy()
                    lda = A.shape[1]
                    gemm(trans, M, N, K, A, lda, B, N, C, N + 3, beta=beta)
                    opA = (A if trans == b"N" else A.T).astype(np.float64)
                    want = opA @ B + beta * before[:, :N]
                    scale = max(1.0, float(np.abs(want).max()))
                    assert np.abs(C[:, :N] - want).max() <= 1e-5 * scale, (M, N, K, trans, beta)
                    assert np.array_equal(C[:, N:], before[:, N:])  # nothing written past a row's N
    finally:
        _omp_threads(os.cpu_count() or 1)


@needs_kernel
def test_benchmark_smoke_bfloat16(tmp_path):
    from benchmarks import native as bench

    result = bench.main(["--quick", "--dtype=bfloat16", "--out", str(tmp_path)])
    assert result["agreement"]["ys"] < BF16_TOL and result["agreement"]["grad"] < BF16_TOL
    ours = {"torch", "ours_scan", "ours_vjp", "native"}
    if _torch_runs_a_bfloat16_lstm():
        assert set(result["rows"]) == ours | {"torch_bf16"} and not result["skipped"]
        assert "fwdbwd_over_torch_bf16" in result["rows"]["native"]
    else:  # PyTorch's peer is reported as skipped, with PyTorch's own error; ours still run
        assert set(result["rows"]) == ours
        assert "primitive descriptor" in result["skipped"]["torch_bf16"]


WIDENED_BF16 = """
import warnings
import jax, jax.numpy as jnp, numpy as np, recurrent
from recurrent import native
warnings.simplefilter("error", recurrent.FallbackWarning)  # the native kernels, not the scan again
assert native._load().recurrent_bf16_gemm() == 0  # the widening path
for make in (recurrent.lstm, recurrent.gru):
    cell = make(16, dtype=jnp.bfloat16)
    params = cell.init(jax.random.key(0), (8,))
    xs = jax.random.normal(jax.random.key(1), (3, 7, 8))
    lengths = jnp.array([7, 4, 0])
    h = {"native": recurrent.rnn(cell, implementation="native"), "scan": recurrent.rnn(cell)}
    def loss(p, x, layer):
        return jnp.sum(layer.apply(p, x, lengths=lengths)[1].astype(jnp.float32) ** 2)
    got = [jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(params, xs, h[k]) for k in h]
    for a, b in zip(*map(jax.tree.leaves, got)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 2e-2 * max(np.abs(b).max(), 1e-6), (make.__name__, np.abs(a - b).max())
print("ok")
"""


def _run_script(source: str, **env: str) -> list[str]:
    """The words ``source`` prints, run by a fresh Python on CPU with the kernels' settings ``env``
    (read once per process); a failure shows its stderr."""
    import subprocess
    import sys

    from tests.subprocess_env import FAST_ENV

    env = {**FAST_ENV, **env, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_bfloat16_without_onednns_bfloat16_gemm_matches_scan():
    """Where oneDNN has no bfloat16 GEMM (CPUs without AVX-512), the kernels widen the same bfloat16
    operands to float32: forced here on any CPU, the LSTM's and the GRU's bfloat16 values and
    gradients still match the scan's."""
    assert _run_script(WIDENED_BF16, RECURRENT_NATIVE_WIDEN_BF16="1") == ["ok"]


STEP_GEMM = """
import warnings
import jax, jax.numpy as jnp, numpy as np, recurrent
from recurrent import native
warnings.simplefilter("error", recurrent.FallbackWarning)  # the native kernel, not the scan again
print(native._load().recurrent_step_panels())
B, H = 7, 13  # row tiles of 6 and 1; the 2 threads' 4 n = 28 and 24 columns: a whole panel and a part
T = 40  # T B = 280: the weight gradients' products run over two K-blocks (of 256 and 24)
cell = recurrent.lstm(H)
params = cell.init(jax.random.key(0), (3,))
xs = jax.random.normal(jax.random.key(1), (B, T, 3))
lengths = jnp.array([40, 33, 26, 0, 12, 5, 39])  # the last row (a tile of its own) runs
k = jax.random.split(jax.random.key(2))
carry = recurrent.LSTMState(jax.random.normal(k[0], (B, H)), jax.random.normal(k[1], (B, H)))
def check(native, scan, params, carry):
    def loss(p, x, c, layer):
        c, ys = layer.apply(p, x, lengths=lengths, carry=c)
        return jnp.sum(ys * jnp.cos(ys)) + sum(jnp.sum(l * w) for l, w in zip(jax.tree.leaves(c), (1.3, -0.7) * 2))
    h = (native, scan)
    for argnums in ((0, 1, 2), (0, 2)):  # xs differentiated, or not (the backward then skips dx)
        grad = jax.jit(jax.value_and_grad(loss, argnums=argnums), static_argnums=3)
        got = [grad(params, xs, carry, l) for l in h]
        for a, b in zip(*map(jax.tree.leaves, got)):  # to 1e-5 of each array's scale (sums over 40 steps)
            d, scale = np.abs(np.asarray(a) - np.asarray(b)).max(), max(1.0, np.abs(np.asarray(b)).max())
            assert d <= 1e-5 * scale, (d, scale)
# One layer split across the 2 threads (the hidden units partitioned):
check(recurrent.rnn(cell, implementation="native"), recurrent.rnn(cell), params, carry)
# Both directions in one call, each on one thread ([x_t, h_{t-1}] [W; U] per step, K = F + H):
both = [recurrent.bidirectional(recurrent.rnn(cell, implementation=i)) for i in ("native", "scan")]
check(*both, both[0].init(jax.random.key(4), (3,)), (carry, carry))
print("ok")
"""


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@needs_kernel
@pytest.mark.parametrize("pick", ["panels", "onednn"])
def test_float32_step_products_on_packed_panels_or_onednn_match_scan(pick):
    """The per-step products (h U and dz U^T of a layer split across threads; [x, h] [W; U] and
    dz [W; U]^T of a layer on one thread, here both directions of a bidirectional layer) run on
    weights packed into panels (the kernel's own AVX2 tile) or on oneDNN's GEMM, and the products
    over all steps (x W, dx, [dW; dU]) on the kernel's blocked GEMM or oneDNN's; either, forced,
    gives the scan's values and gradients, with tiles and panels left partly filled (B = 7, H = 13
    on 2 threads), with xs differentiated and not (dx skipped: the one-thread per-step product is
    then dz U^T alone). The older name of the switch, RECURRENT_NATIVE_STEP_GEMM, still picks."""
    panels = "1" if pick == "panels" and _cpu_has_avx2_fma() else "0"
    assert _run_script(STEP_GEMM, RECURRENT_NATIVE_GEMM=pick, OMP_NUM_THREADS="2") == [panels, "ok"]
    if pick == "onednn":
        assert _run_script(STEP_GEMM, RECURRENT_NATIVE_STEP_GEMM=pick, OMP_NUM_THREADS="2") == ["0", "ok"]


def _torch_runs_a_bfloat16_lstm() -> bool:
    """Whether PyTorch's bfloat16 LSTM runs on this CPU (its oneDNN primitive needs AVX-512)."""
    torch = pytest.importorskip("torch")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 3, batch_first=True)(torch.ones(1, 2, 2))
    except RuntimeError:
        return False
    return True
