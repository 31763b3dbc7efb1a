"""``rnn(..., implementation="auto")``: the fastest exact implementation per backend
(``recurrent._kernels.AUTO``), without a warning.

Checked: on a CPU where the native kernels run, the LSTM and the GRU layer compile to the native
calls (training: forward and backward; inference: the inference call), with values and gradients
equal to the scan's to 1e-5 (lengths with 0 and T, an initial carry, reverse), and a bidirectional
layer and a vmapped population run in one call per pass. Where the kernel does not apply (not
built, a cell or an option it does not cover, zoneout, resets, a trace), the scan runs with no
warning, bit for bit the scan's layer, and no native call is compiled. Everywhere: ``"auto"`` is
in the list of implementations an unknown name is told, and on GPUs and TPUs it is the scan.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import recurrent
from recurrent import _kernels
from tests.native_support import CANNOT_BUILD, NOT_CPU, TOL, close, needs_kernel

B, T, F, H = 4, 6, 3, 5
CELLS = {"lstm": recurrent.lstm, "gru": recurrent.gru}


def _native_calls(fn, *args):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r'custom_call_target="(recurrent_(?:lstm|gru)\w*)"', hlo)


def _setup(name, seed=0, **cell_options):
    cell = CELLS[name](H, **cell_options)
    keys = jax.random.split(jax.random.key(seed), 3)
    params = cell.init(keys[0], (F,))
    xs = jax.random.normal(keys[1], (B, T, F))
    carry = jax.tree.map(lambda a: jax.random.normal(keys[2], a.shape, a.dtype), cell.initial_carry(params, (B, F)))
    return cell, params, xs, carry


def _loss(layer, lengths, **apply_kwargs):
    def loss(params, xs, carry):
        carry, ys = layer.apply(params, xs, lengths=lengths, carry=carry, **apply_kwargs)
        w = jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape) / ys.size
        return jnp.sum(ys * w) + sum(jnp.sum(c * 1.3) for c in jax.tree.leaves(carry)), (carry, ys)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def test_auto_is_an_implementation_and_the_scan_off_cpu():
    with pytest.raises(ValueError, match="'auto'"):
        recurrent.rnn(recurrent.lstm(H), implementation="fastest")
    assert _kernels.auto_order("cpu") == ("native",)
    assert _kernels.auto_order("gpu") == _kernels.auto_order("tpu") == ()


@needs_kernel
@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_auto_runs_native_on_cpu(name, reverse):
    cell, params, xs, carry = _setup(name, 1)
    lengths = jnp.array([2, 0, T, 5])
    auto = recurrent.rnn(cell, reverse=reverse, implementation="auto")
    scan = recurrent.rnn(cell, reverse=reverse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(_loss(auto, lengths))(params, xs, carry)
        assert _native_calls(_loss(auto, lengths), params, xs, carry) == [
            f"recurrent_{name}_forward",
            f"recurrent_{name}_backward",
        ]
        forward = lambda p, x, c: auto.apply(p, x, lengths=lengths, carry=c)  # noqa: E731
        assert _native_calls(forward, params, xs, carry) == [f"recurrent_{name}_inference"]
    close(got, jax.jit(_loss(scan, lengths))(params, xs, carry))
    close(jax.jit(forward)(params, xs, carry), scan.apply(params, xs, lengths=lengths, carry=carry))


@needs_kernel
def test_auto_bidirectional_and_population_in_one_call():
    cell, params, xs, _ = _setup("lstm", 2)
    bi = recurrent.bidirectional(recurrent.rnn(cell, implementation="auto"))
    bi_params = bi.init(jax.random.key(3), (F,))
    lengths = jnp.array([3, 0, T, 1])
    loss = lambda p, x: jnp.sum(jnp.sin(bi.apply(p, x, lengths=lengths)[1]))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native_calls(jax.grad(loss), bi_params, xs) == ["recurrent_lstm_forward", "recurrent_lstm_backward"]
    scan_bi = recurrent.bidirectional(recurrent.rnn(cell))
    scan_loss = lambda p, x: jnp.sum(jnp.sin(scan_bi.apply(p, x, lengths=lengths)[1]))  # noqa: E731
    close(jax.jit(jax.grad(loss))(bi_params, xs), jax.jit(jax.grad(scan_loss))(bi_params, xs))

    layer = recurrent.rnn(cell, implementation="auto")
    population = jax.vmap(lambda k: layer.init(k, (F,)))(jax.random.split(jax.random.key(4), 3))
    members = lambda p: jax.vmap(lambda q: layer.apply(q, xs)[1])(p)  # noqa: E731
    assert _native_calls(members, population) == ["recurrent_lstm_inference"]
    for m in range(3):
        one = jax.tree.map(lambda a, m=m: a[m], population)
        close(jax.jit(members)(population)[m], recurrent.rnn(cell).apply(one, xs)[1])


def _silent_scan(layer, scan, params, xs, **apply_kwargs):
    """``layer`` runs the scan without any warning: the same numbers as ``scan`` bit for bit, and
    no native call."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(lambda p, x: layer.apply(p, x, **apply_kwargs))(params, xs)
        assert _native_calls(lambda p, x: layer.apply(p, x, **apply_kwargs), params, xs) == []
    want = jax.jit(lambda p, x: scan.apply(p, x, **apply_kwargs))(params, xs)
    close(got, want, tol=0)


@pytest.mark.parametrize("name", list(CELLS))
def test_auto_runs_the_scan_silently_where_native_is_not_built(name, monkeypatch, tmp_path):
    cell, params, xs, _ = _setup(name, 5)
    monkeypatch.setenv("RECURRENT_NATIVE_LIBRARY", str(tmp_path / "missing.so"))
    _silent_scan(recurrent.rnn(cell, implementation="auto"), recurrent.rnn(cell), params, xs)


@pytest.mark.parametrize(
    "cell_options, rnn_options, apply_kwargs",
    [
        (dict(peephole=True), {}, {}),  # a cell the kernel does not cover
        (dict(layer_norm=True), {}, {}),
        ({}, dict(zoneout=0.1), {}),  # a regulariser the kernel does not run
        ({}, {}, dict(resets=jnp.zeros((B, T), bool).at[:, 3].set(True))),
        ({}, {}, dict(return_trace=True)),
    ],
    ids=["peephole", "layer_norm", "zoneout", "resets", "trace"],
)
def test_auto_runs_the_scan_silently_where_native_does_not_apply(cell_options, rnn_options, apply_kwargs):
    cell, params, xs, _ = _setup("lstm", 6, **cell_options)
    auto = recurrent.rnn(cell, implementation="auto", **rnn_options)
    _silent_scan(auto, recurrent.rnn(cell, **rnn_options), params, xs, **apply_kwargs)


def test_benchmark_smoke(tmp_path):
    """``python -m benchmarks.auto --quick``: every implementation it times agrees with the scan,
    and the rows say what "auto" picks (the native kernel where it runs here, else the scan)."""
    from benchmarks import auto as bench

    out = tmp_path / "auto.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert out.exists() and len(result["rows"]) == 2
    runs = result["native"] == "runs"
    assert runs == (CANNOT_BUILD is None and not NOT_CPU)
    for row in result["rows"]:
        assert row["auto_picks"] == ("native" if runs else "scan")
        assert set(row["fwd"]["ms"]) == {"scan", "vjp"} | ({"native"} if runs else set())
        assert max(row["largest_difference_from_scan"].values()) < TOL
