"""The optional native GRU kernel (:mod:`recurrent.native._gru`: XLA FFI custom calls, oneDNN inside).

Skipped, with the reason, as ``tests/test_native.py`` is: only where the kernel cannot be built (or
JAX does not run on CPU). The reasons other GRUs declare, and the fallback, are tested everywhere.

Checked: values against the NumPy reference written from the equations (with an initial carry,
with lengths including 0 and T), values and gradients against the ``lax.scan`` layer to 1e-5
(forward and reverse, with and without lengths; directly and through ``rnn(...,
implementation="native")`` with ``carry=``), the fused loops at sizes that leave vector-loop
remainders (B = 1, H = 13, H = 21), empty inputs, lengths against per-sequence runs, the inference
forward against the training forward, ``jax.vmap`` against a loop, a ``jax.vmap``-ed population
(nested too; inputs or parameters shared) and ``bidirectional`` as one custom call per pass with
every layer in it (counted in the compiled HLO, no loop around it), values and gradients as each
member alone, and the errors on inputs the kernel does not take (operands of different groups
among them). Biases are random (not the initialiser's zeros), so that a kernel that dropped or
misplaced ``b`` or ``b_hn`` fails.

bfloat16 compute (``recurrent.gru(H, dtype=jnp.bfloat16)``, float32 parameters and state): values
and gradients against the scan's in the same dtype to ``BF16_TOL`` of each array's largest
magnitude (as ``test_native.py`` argues for the LSTM: the forward rounds where the cell does, the
backward rounds ``dR`` to bfloat16 for its GEMMs and sums ``dU``, ``dW`` over all steps in float32),
and at most 5 % of the bfloat16 outputs differing from the scan's at all.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent import native
from recurrent._sequence import reverse_sequences
from recurrent.native import _gru as native_gru
from tests import reference
from tests.native_support import BF16_TOL, TOL, backward_calls, close, close_to_largest, needs_kernel

B, T, F, H = 4, 6, 3, 5


def _params(cell, key, f):
    """The cell's parameters with random biases (the initialiser's are zero)."""
    k0, k1, k2 = jax.random.split(key, 3)
    params = cell.init(k0, (f,))
    return params._replace(
        bias=jax.random.normal(k1, params.bias.shape), recurrent_bias=jax.random.normal(k2, params.recurrent_bias.shape)
    )


def _setup(seed=0, shape=(B, T, F, H)):
    b, t, f, h = shape
    cell = recurrent.gru(h)
    keys = jax.random.split(jax.random.key(seed), 3)
    params = _params(cell, keys[0], f)
    xs = jax.random.normal(keys[1], (b, t, f))
    carry = jax.random.normal(keys[2], (b, h))
    return cell, params, xs, carry


def _loss(apply, lengths, argnums=(0, 1, 2)):
    def loss(params, xs, carry):
        carry, ys = apply(params, xs, lengths, carry)
        w = jnp.arange(ys.size, dtype=jnp.float32).reshape(ys.shape) / ys.size
        return jnp.sum(ys.astype(jnp.float32) * w) + jnp.sum(carry.astype(jnp.float32) * 1.3), (carry, ys)

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def _scan(cell, reverse=False):
    layer = recurrent.rnn(cell, reverse=reverse)
    return lambda params, xs, lengths, carry: layer.apply(params, xs, lengths=lengths, carry=carry)


def _native(reverse=False, dtype=None):
    """The native layer as the driver would run it (reverse: flip each valid prefix around it)."""

    def apply(params, xs, lengths, carry):
        if reverse:
            xs = reverse_sequences(xs, lengths, 1)
        carry, ys = native_gru.apply(params, xs, lengths, carry, dtype)
        return carry, reverse_sequences(ys, lengths, 1) if reverse else ys

    return apply


@needs_kernel
def test_loads_and_is_declared():
    assert native.reason() is None
    cell = recurrent.gru(H)
    kernel = cell.spec.kernels["native"]
    assert isinstance(kernel, recurrent.SequenceKernel)
    assert native.attach(cell) is cell  # declared by the cell itself
    _, params, xs, _ = _setup()
    assert kernel.reason(params, xs) is None


@needs_kernel
@pytest.mark.parametrize("lengths", [None, [0, 3, T, 1]], ids=["full", "lengths"])
def test_matches_numpy_reference(lengths):
    _, params, xs, carry = _setup()
    got_h, got_ys = jax.jit(native_gru.apply)(params, xs, None if lengths is None else jnp.array(lengths), carry)
    want_ys = np.zeros((B, T, H))
    want_h = np.asarray(carry, np.float64).copy()
    for b in range(B):
        n = T if lengths is None else lengths[b]
        if n == 0:
            continue
        ys, h = reference.gru(xs[b : b + 1, :n], *params[:4], h0=np.asarray(carry[b : b + 1]))
        want_ys[b, :n], want_h[b] = ys[0], h[0]
    close((got_ys, got_h), (want_ys, want_h))


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
    # the gradients are not all zero (a test of nothing)
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 7, 3, 13), (3, 9, 5, 21)], ids=["B1_H13", "B3_H21"])
def test_training_path_matches_scan_at_odd_sizes(shape):
    """The fused training forward and backward where the vector loops have remainders: H not a
    multiple of 8 (nor of 16), and a batch of one."""
    b, t = shape[:2]
    cell, params, xs, carry = _setup(6, shape)
    for lengths in (None, jnp.array([t - 2] + [t] * (b - 1))):
        close(_loss(_native(), lengths)(params, xs, carry), _loss(_scan(cell), lengths)(params, xs, carry))


@needs_kernel
@pytest.mark.parametrize("shape", [(B, 0, F), (0, T, F)], ids=["no_steps", "no_batch"])
def test_empty_inputs(shape):
    cell, params, _, _ = _setup()
    xs = jnp.ones(shape)
    layer = recurrent.rnn(cell, implementation="native")
    grads = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x)[1]) + jnp.sum(layer.apply(p, x)[0]), argnums=(0, 1))
    close(jax.jit(layer.apply)(params, xs), recurrent.rnn(cell).apply(params, xs), tol=0)
    close(grads(params, xs), jax.tree.map(jnp.zeros_like, (params, xs)), tol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_inference_forward_matches_training_forward(dtype):
    _, params, xs, carry = _setup(2)
    args = (*params[:4], xs.astype(dtype), carry)
    inference = jax.jit(native_gru.gru_layer)(*args)
    training, _ = jax.jit(lambda *a: jax.vjp(native_gru.gru_layer, *a))(*args)
    close(inference, training, tol=0)  # the same loop, once keeping the gates for the backward
    assert [a.dtype for a in inference] == [jnp.dtype(dtype), jnp.float32]


@needs_kernel
def test_vmap_matches_loop():
    _, params, xs, carry = _setup(3)
    xs2 = jnp.stack([xs, 2 * xs])

    def run(p, x):
        return native_gru.apply(p, x, jnp.array([1, T, 0, 2]), carry)

    def loss(p, x):
        h, ys = run(p, x)
        return jnp.sum(ys**2) + jnp.sum(h)

    got = jax.jit(jax.vmap(run, (None, 0)))(params, xs2)
    want = [jax.jit(run)(params, x) for x in xs2]
    close(got, jax.tree.map(lambda *a: jnp.stack(a), *want), tol=0)
    got_grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jax.vmap(loss, (None, 0))(p, x)), argnums=(0, 1)))(params, xs2)
    each = [jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x) for x in xs2]
    close(got_grads[0], jax.tree.map(lambda a, b: a + b, each[0][0], each[1][0]))
    close(got_grads[1], jnp.stack([each[0][1], each[1][1]]))


def test_rejects_other_dtypes_ranks_and_options():
    _, params, xs, carry = _setup()
    with pytest.raises(ValueError, match="float32 only(.|\n)*xs bfloat16(.|\n)*fix"):
        native_gru.apply(params, xs.astype(jnp.bfloat16), None, carry)
    with pytest.raises(ValueError, match="float32 only, or bfloat16 compute(.|\n)*got:      compute dtype float16"):
        native_gru.apply(params, xs, None, carry, jnp.float16)
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match="input_kernel bfloat16, recurrent_kernel bfloat16, bias bfloat16"):
        native_gru.apply(bf16_params, xs, None, carry, jnp.bfloat16)
    with pytest.raises(ValueError, match="carry bfloat16"):
        native_gru.apply(params, xs, None, carry.astype(jnp.bfloat16), jnp.bfloat16)
    with pytest.raises(ValueError, match="one batch axis(.|\n)*got:      xs \\(2, 4, 6, 3\\)"):
        native_gru.apply(params, jnp.stack([xs, xs]), None, carry)
    with pytest.raises(ValueError, match="reset_after=True and no layer norm"):
        native_gru.apply(params._replace(recurrent_bias=None), xs, None, carry)


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rnn_runs_native_with_lengths_and_carry(reverse):
    """Through the driver: lengths (0 and T among them), an initial carry, reverse, no fallback."""
    cell, params, xs, carry = _setup(4)
    lengths = jnp.array([2, 0, T, 5])
    native_layer = recurrent.rnn(cell, reverse=reverse, implementation="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = _loss(lambda p, x, n, c: native_layer.apply(p, x, lengths=n, carry=c), lengths)(params, xs, carry)
    close(got, _loss(_scan(cell, reverse), lengths)(params, xs, carry))


@needs_kernel
def test_rnn_native_lengths_equal_per_sequence_runs():
    """The battery's lengths check: each sequence alone, cut at its length, gives the same."""
    cell, params, xs, _ = _setup(5)
    lengths = [3, 0, T, 1]
    layer = recurrent.rnn(cell, implementation="native")
    carry, ys = jax.jit(layer.apply)(params, xs, lengths=jnp.array(lengths))
    zero = cell.initial_carry(params, (1, F))
    for b, n in enumerate(lengths):
        one_carry, one_ys = jax.jit(layer.apply)(params, xs[b : b + 1, :n]) if n else (zero, None)
        close(carry[b], one_carry[0])
        if n:
            close(ys[b, :n], one_ys[0])
        np.testing.assert_array_equal(np.asarray(ys[b, n:]), 0)


def test_falls_back_with_a_clear_warning_when_not_built(monkeypatch, tmp_path):
    cell, params, xs, _ = _setup()
    monkeypatch.setenv("RECURRENT_NATIVE_LIBRARY", str(tmp_path / "missing.so"))
    layer = recurrent.rnn(cell, implementation="native")
    with pytest.warns(recurrent.FallbackWarning, match="not built"):
        _, ys = layer.apply(params, xs)
    close(ys, recurrent.rnn(cell).apply(params, xs)[1], tol=0)


@pytest.mark.parametrize(
    "options, why",
    [
        (dict(reset_after=False), "'reset_after': False"),
        (dict(layer_norm=True), "'layer_norm': True"),
        (dict(dtype=jnp.float16), "'dtype'"),
        (dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), "'dtype'"),
    ],
    ids=["reset_before", "layer_norm", "float16", "bfloat16_params"],
)
def test_other_options_declare_why_not(options, why):
    cell = native.attach(recurrent.gru(H, **options))
    entry = cell.spec.kernels["native"]
    assert isinstance(entry, str) and why in entry and "only; this cell has" in entry
    params = cell.init(jax.random.key(0), (F,))
    with pytest.warns(recurrent.FallbackWarning, match="only; this cell has"):
        recurrent.rnn(cell, implementation="native").apply(params, jnp.ones((B, T, F)))


def test_bfloat16_compute_declares_the_kernel():
    assert isinstance(recurrent.gru(H, dtype=jnp.bfloat16).spec.kernels["native"], recurrent.SequenceKernel)
    assert isinstance(recurrent.gru(H, dtype=jnp.float32).spec.kernels["native"], recurrent.SequenceKernel)
    conv = recurrent.conv_gru(H, (3, 3))
    assert "native" not in conv.spec.kernels  # the driver's message names the cells that declare it


def _bf16_setup(shape, seed):
    b, t, f, h = shape
    cell = recurrent.gru(h, dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.key(seed), 3)
    params = _params(cell, keys[0], f)
    xs = jax.random.normal(keys[1], (b, t, f))
    carry = jax.random.normal(keys[2], (b, h))
    return cell, params, xs, carry


@needs_kernel
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(B, T, F, H), (1, 7, 3, 13), (3, 9, 5, 21)], ids=["B4_H5", "B1_H13", "B3_H21"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_bfloat16_values_and_gradients_match_scan(shape, with_lengths, reverse):
    b, t = shape[:2]
    cell, params, xs, carry = _bf16_setup(shape, 7)
    lengths = jnp.array([t - 2, 0, t, 1][:b] if b > 1 else [t - 2]) if with_lengths else None
    layer = recurrent.rnn(cell, reverse=reverse, implementation="native")
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = _loss(lambda p, x, n, c: layer.apply(p, x, lengths=n, carry=c), lengths)(params, xs, carry)
    want = _loss(_scan(cell, reverse), lengths)(params, xs, carry)
    ((_, (h_got, ys_got)), _), ((_, (_, ys_want)), _) = got, want
    assert ys_got.dtype == jnp.bfloat16 and h_got.dtype == jnp.float32
    close_to_largest(got, want)
    assert float(np.mean(np.asarray(ys_got, np.float32) != np.asarray(ys_want, np.float32))) <= 0.05
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(got))
    if with_lengths:
        for i, n in enumerate(np.asarray(lengths)):
            np.testing.assert_array_equal(np.asarray(ys_got[i, n:], np.float32), 0)


@needs_kernel
def test_bfloat16_rounds_where_the_cell_does():
    """A float32 forward (no rounding) differs from the bfloat16 scan in many outputs; the kernel's
    bfloat16 forward in (almost) none."""
    cell, params, xs, carry = _bf16_setup((3, 9, 5, 21), 9)
    want = np.asarray(recurrent.rnn(cell).apply(params, xs, carry=carry)[1], np.float32)
    got = np.asarray(native_gru.apply(params, xs, None, carry, jnp.bfloat16)[1], np.float32)
    unrounded = np.asarray(native_gru.apply(params, xs, None, carry)[1].astype(jnp.bfloat16), np.float32)
    assert float(np.mean(got != want)) <= 0.05 < float(np.mean(unrounded != want))


# ---- Many layers in one call: jax.vmap (a population, both directions of bidirectional) ----------


def _custom_calls(fn, *args, groups):
    """The kernel's custom calls in ``fn(*args)``, in order, each asserted to run ``groups`` layers at
    once (the leading axes of its first result, ``ys`` or ``dx``, in the compiled HLO) outside any
    loop: ``vmap_method="sequential"`` lowers to a while loop around a call per layer."""
    lowered = jax.jit(fn).lower(*args)
    assert "while" not in lowered.as_text()
    hlo = lowered.compile().as_text()
    calls = re.findall(r'= \(\w+\[([\d,]*)\][^\n]*custom_call_target="(recurrent_gru\w*)"', hlo)
    assert [tuple(int(d) for d in dims.split(","))[:-3] for dims, _ in calls] == [groups] * len(calls), calls
    return [target for _, target in calls]


def _population(shape, seed, dtype=None):
    """``(cell, params, xs, carry)`` for ``shape`` leading axes of independent layers (random biases)."""
    n = int(np.prod(shape))
    cell = recurrent.gru(H, dtype=dtype)
    keys = jax.random.split(jax.random.key(seed), n + 2)
    params = jax.vmap(lambda k: _params(cell, k, F))(keys[:n])
    params = jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), params)
    xs = jax.random.normal(keys[n], (*shape, B, T, F))
    return cell, params, xs, jax.random.normal(keys[n + 1], (*shape, B, H))


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
@pytest.mark.parametrize("shared", ["none", "inputs", "params"])
def test_vmap_population_is_one_call_per_pass_and_matches_members(shape, shared):
    """A population of GRU layers (own parameters, inputs and carry; or inputs, or parameters, shared
    by all) as one custom call per pass: values and gradients as each member alone to 1e-5, nested
    vmaps folded into the same call."""
    _, params, xs, carry = _population(shape, 10)
    if shared == "inputs":
        xs = xs[(0,) * len(shape)]
    if shared == "params":
        params = jax.tree.map(lambda a: a[(0,) * len(shape)], params)
    in_axes = (None if shared == "params" else 0, None if shared == "inputs" else 0, 0)
    lengths = jnp.array([0, 3, T, 1])

    def vmapped(fn):
        for _ in shape:
            fn = jax.vmap(fn, in_axes)
        return fn

    native_loss = _loss(_native(), lengths)
    got = jax.jit(vmapped(native_loss))(params, xs, carry)
    close(got, _loop(native_loss, (params, xs, carry), in_axes, shape))
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))
    assert _custom_calls(vmapped(native_loss), params, xs, carry, groups=shape) == [
        "recurrent_gru_forward",
        "recurrent_gru_backward",
    ]
    forward = vmapped(lambda p, x, c: native_gru.apply(p, x, lengths, c))
    assert _custom_calls(forward, params, xs, carry, groups=shape) == ["recurrent_gru_inference"]
    close(jax.jit(forward)(params, xs, carry), got[0][1])


@needs_kernel
def test_bfloat16_vmap_population_is_one_call_per_pass_and_matches_members():
    """bfloat16 compute under vmap: each layer of the population as it alone (the same fused loops;
    the GEMMs single-threaded inside a group, so within bfloat16's precision) and as the scan in
    bfloat16, one call per pass."""
    cell, params, xs, carry = _population((3,), 11, jnp.bfloat16)
    lengths = jnp.array([T - 2, 0, T, 1])
    native_loss = _loss(_native(dtype=jnp.bfloat16), lengths)
    got = jax.jit(jax.vmap(native_loss))(params, xs, carry)
    for m in range(3):
        args = jax.tree.map(lambda a: a[m], (params, xs, carry))
        member = jax.tree.map(lambda a: a[m], got)
        close_to_largest(member, native_loss(*args))
        close_to_largest(member, _loss(_scan(cell), lengths)(*args))
    assert _custom_calls(jax.vmap(native_loss), params, xs, carry, groups=(3,)) == [
        "recurrent_gru_forward_bf16",
        "recurrent_gru_backward_bf16",
    ]
    forward = jax.vmap(lambda p, x, c: native_gru.apply(p, x, lengths, c, jnp.bfloat16))
    assert _custom_calls(forward, params, xs, carry, groups=(3,)) == ["recurrent_gru_inference_bf16"]


@needs_kernel
def test_bidirectional_runs_both_directions_in_one_call():
    """``bidirectional(rnn(gru(H), implementation="native"))``: both directions as one custom call
    per pass, values and gradients as the scan's to 1e-5, with lengths (0 and T among them)."""
    cell = recurrent.gru(H)
    native_bi = recurrent.bidirectional(recurrent.rnn(cell, implementation="native"))
    scan_bi = recurrent.bidirectional(recurrent.rnn(cell))
    keys = jax.random.split(jax.random.key(12), 3)
    params = native_bi.init(keys[0], (F,))
    xs = jax.random.normal(keys[1], (B, T, F))
    lengths = jnp.array([3, 0, T, 1])

    def loss(layer):
        def f(params, xs):
            _, ys = layer.apply(params, xs, lengths=lengths)
            w = jnp.arange(ys.size, dtype=jnp.float32).reshape(ys.shape) / ys.size
            return jnp.sum(ys * w), ys

        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        got = jax.jit(loss(native_bi))(params, xs)
        calls = _custom_calls(loss(native_bi), params, xs, groups=(2,))
    assert calls == ["recurrent_gru_forward", "recurrent_gru_backward"]
    close(got, jax.jit(loss(scan_bi))(params, xs))


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
    native_apply = _native(dtype=dtype)
    agree = close if dtype is None else close_to_largest
    suffix = "" if dtype is None else "_bf16"
    f = F + 1 if with_lengths else F  # the hold feature
    x_type = "f32" if dtype is None else "bf16"
    cases = [((0, 2), "false", f"tensor<0x{x_type}>"), ((0, 1, 2), "true", f"tensor<{T}x{B}x{f}x{x_type}>")]
    for argnums, need_dx, dx in cases:
        got = _loss(native_apply, lengths, argnums)(params, xs, carry)
        agree(got, _loss(_scan(cell), lengths, argnums)(params, xs, carry))
        assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))
        calls = backward_calls("gru", _loss(native_apply, lengths, argnums), params, xs, carry)
        assert calls == [(f"recurrent_gru_backward{suffix}", need_dx, dx)]


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
    native_loss = _loss(_native(dtype=dtype), lengths, (0, 2))
    scan_loss = _loss(_scan(cell), lengths, (0, 2))
    agree = close if dtype is None else close_to_largest
    got = jax.jit(jax.vmap(native_loss, in_axes))(params, xs, carry)
    x_type = "f32" if dtype is None else "bf16"
    assert backward_calls("gru", jax.vmap(native_loss, in_axes), params, xs, carry) == [
        (f"recurrent_gru_backward{'' if dtype is None else '_bf16'}", "false", f"tensor<3x0x{x_type}>")
    ]
    agree(got, _loop(native_loss, (params, xs, carry), in_axes, (3,)))
    agree(got, jax.jit(jax.vmap(scan_loss, in_axes))(params, xs, carry))
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree.leaves(got[1]))


@needs_kernel
def test_stacked_bidirectional_skips_dx_in_its_first_layer_only():
    """A stack of a bidirectional native GRU layer (both directions in one call) and a native GRU
    layer, trained w.r.t. its parameters: the first layer's inputs are data (need_dx = false, for
    both directions), the second's are the first's outputs (need_dx = true); the gradients are the
    scan stack's."""
    cell = recurrent.gru(H)

    def stack(implementation):
        return recurrent.stacked(
            [
                recurrent.bidirectional(recurrent.rnn(cell, implementation=implementation)),
                recurrent.rnn(cell, implementation=implementation),
            ]
        )

    native_stack, scan_stack = stack("native"), stack("scan")
    keys = jax.random.split(jax.random.key(15), 3)
    params = native_stack.init(keys[0], (F,))
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(keys[2], a.shape), params)  # no zero biases
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
        calls = backward_calls("gru", grads(native_stack), params)
    assert calls == [
        ("recurrent_gru_backward", "false", "tensor<2x0xf32>"),
        ("recurrent_gru_backward", "true", f"tensor<{T}x{B}x{2 * H + 1}xf32>"),
    ]
    close(got, jax.jit(grads(scan_stack))(params))


@needs_kernel
def test_operands_of_different_groups_are_refused():
    """A caller that passes operands with different leading (group) dims (the wrapper batches them
    all alike) gets the kernel's error, not a read past a buffer's end."""
    _, params, xs, carry = _setup()
    W, U, b, b_hn = params[:4]
    xs_TBF = jnp.moveaxis(xs, 1, 0)
    native._load()
    call = jax.ffi.ffi_call("recurrent_gru_inference", native_gru._outputs(U, xs_TBF, carry))
    with pytest.raises(jax.errors.JaxRuntimeError, match="different leading \\(group\\) dims"):
        jax.block_until_ready(call(xs_TBF, jnp.stack([W, W]), U, b, b_hn, carry))


@needs_kernel
def test_benchmark_smoke(tmp_path):
    from benchmarks import native as bench

    result = bench.main(["--quick", "--cell=gru", "--out", str(tmp_path)])
    assert result["cell"] == "gru"
    assert result["agreement"]["ys"] < TOL and result["agreement"]["grad"] < TOL
    assert set(result["rows"]) == {"torch", "ours_scan", "ours_vjp", "native"}
    assert (tmp_path / "native_gru.json").exists()


@needs_kernel
def test_benchmark_smoke_bfloat16(tmp_path):
    from benchmarks import native as bench

    result = bench.main(["--quick", "--cell=gru", "--dtype=bfloat16", "--out", str(tmp_path)])
    assert result["agreement"]["ys"] < BF16_TOL and result["agreement"]["grad"] < BF16_TOL
    assert set(result["rows"]) == {"torch", "torch_bf16", "ours_scan", "ours_vjp", "native"}
