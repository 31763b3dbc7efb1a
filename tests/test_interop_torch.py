"""PyTorch interop: our layers on converted weights against PyTorch's own forward and backward.

Random configurations (sizes, layers, directions, projection, bias, layout, ragged lengths through
``PackedSequence``) are drawn from a seeded generator; outputs and final states must agree to 1e-5
and gradients (inputs and every PyTorch tensor) to 1e-4. The gradient of our side is taken through
the converter's own pure mapping from PyTorch's tensors, so it is comparable tensor by tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from recurrent.interop import _torch, carry_from_torch, carry_to_torch, from_torch, to_torch

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

FWD = dict(rtol=1e-5, atol=1e-5)
GRAD = dict(rtol=1e-4, atol=1e-4)


def close(got, want, tol=FWD):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


def configs(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        kind = ("lstm", "gru")[i % 2]
        yield dict(
            kind=kind,
            F=int(rng.integers(1, 5)),
            H=(H := int(rng.integers(2, 6))),
            L=int(rng.integers(1, 4)),
            D=bool(rng.integers(2)),
            P=int(rng.integers(1, H)) if kind == "lstm" and rng.integers(2) else 0,
            bias=bool(rng.integers(4)),  # mostly True
            batch_first=bool(rng.integers(2)),
            B=int(rng.integers(1, 4)),
            T=int(rng.integers(1, 6)),
            seed=i,
        )


def make_module(c):
    kw = dict(num_layers=c["L"], bidirectional=c["D"], bias=c["bias"], batch_first=c["batch_first"])
    if c["kind"] == "lstm":
        module = torch.nn.LSTM(c["F"], c["H"], proj_size=c["P"], **kw)
    else:
        module = torch.nn.GRU(c["F"], c["H"], **kw)
    return randomize(module, c["seed"])


def torch_run(module, xs, lengths, batch_first):
    """PyTorch's outputs (zero-padded) and final state, through a PackedSequence if lengths."""
    if lengths is None:
        return module(xs)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        xs, torch.as_tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )
    out, state = module(packed)
    ys, _ = torch.nn.utils.rnn.pad_packed_sequence(
        out, batch_first=batch_first, total_length=xs.shape[1 if batch_first else 0]
    )
    return ys, state


CONFIGS = list(configs(12, seed=2024))


@pytest.mark.parametrize(
    "c", CONFIGS, ids=lambda c: "{kind}-F{F}H{H}L{L}D{D:d}P{P}b{bias:d}bf{batch_first:d}T{T}".format(**c)
)
def test_forward_backward_and_round_trip(c):
    module = make_module(c)
    layer, params = from_torch(module)
    B, T, F, bf = c["B"], c["T"], c["F"], c["batch_first"]
    rng = np.random.default_rng(c["seed"])
    x_np = rng.standard_normal((B, T, F) if bf else (T, B, F)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B) if c["seed"] % 3 else None  # PackedSequence needs >= 1
    if lengths is not None:
        lengths[rng.integers(B)] = T  # pad_packed_sequence pads to the longest

    # forward
    xs_t = torch.from_numpy(x_np).requires_grad_(True)
    ys_t, state_t = torch_run(module, xs_t, lengths, bf)
    carry, ys = layer.apply(params, jnp.asarray(x_np), lengths=lengths, time_major=not bf)
    close(ys, ys_t.detach())
    jax.tree.map(close, carry, carry_from_torch(module, state_t))

    # backward: a random linear functional of outputs and final states
    w_ys = rng.standard_normal(ys.shape).astype(np.float32)
    states = state_t if isinstance(state_t, tuple) else (state_t,)
    w_states = [rng.standard_normal(s.shape).astype(np.float32) for s in states]
    loss_t = (ys_t * torch.from_numpy(w_ys)).sum() + sum(
        (s * torch.from_numpy(w)).sum() for s, w in zip(states, w_states)
    )
    loss_t.backward()

    tensors = {name: jnp.asarray(p.detach().numpy()) for name, p in module.named_parameters()}

    def loss(tensors, xs):
        p = _torch.params_from_tensors(c["kind"], tensors, c["L"], c["D"])
        carry, ys = layer.apply(p, xs, lengths=lengths, time_major=not bf)
        st = carry_to_torch_jax(module, carry)
        return jnp.sum(ys * w_ys) + sum(jnp.sum(s * w) for s, w in zip(st, w_states))

    g_tensors, g_xs = jax.grad(loss, argnums=(0, 1))(tensors, jnp.asarray(x_np))
    close(g_xs, xs_t.grad, GRAD)
    for name, p in module.named_parameters():
        close(g_tensors[name], p.grad, GRAD)

    # round trip: to, then from, is exact
    back = to_torch(layer, params, batch_first=bf)
    layer2, params2 = from_torch(back)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    assert layer2.name == layer.name
    if c["bias"]:  # the module rebuilt from our parameters computes the same function
        close(torch_run(back, torch.from_numpy(x_np), lengths, bf)[0].detach(), ys)


def carry_to_torch_jax(module, carry):
    """``carry_to_torch`` in jax arrays (so it can be differentiated): stacked (h, c) or (h,)."""
    layers = carry if module.num_layers > 1 else (carry,)
    parts = [c for layer in layers for c in ((layer.forward, layer.backward) if module.bidirectional else (layer,))]
    if isinstance(parts[0], recurrent.LSTMState):
        return jnp.stack([p.h for p in parts]), jnp.stack([p.c for p in parts])
    return (jnp.stack(parts),)


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
def test_cells(kind):
    F, H, B = 3, 4, 2
    module = randomize((torch.nn.LSTMCell if kind == "lstm_cell" else torch.nn.GRUCell)(F, H), 5)
    cell, params = from_torch(module)
    assert isinstance(cell, recurrent.Cell)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, F)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    state0 = (torch.from_numpy(h0), torch.from_numpy(h0 * 0.5)) if kind == "lstm_cell" else torch.from_numpy(h0)
    state = module(torch.from_numpy(x), state0)
    carry, y = cell.step(params, carry_from_torch(module, state0), jnp.asarray(x))
    jax.tree.map(close, carry, carry_from_torch(module, state))
    jax.tree.map(lambda a, b: close(a, b.detach()), carry_to_torch(module, carry), state)
    back = to_torch(cell, params)
    assert type(back) is type(module)
    jax.tree.map(np.testing.assert_array_equal, params, from_torch(back)[1])


def test_to_torch_from_our_init_round_trips_exactly():
    layer = recurrent.stacked([recurrent.bidirectional(recurrent.gru(5))] * 2)
    params = layer.init(jax.random.key(0), (3,))
    params = jax.tree.map(lambda a: a + 0.1, params)  # nonzero biases everywhere
    jax.tree.map(np.testing.assert_array_equal, params, from_torch(to_torch(layer, params))[1])


def test_clear_errors():
    with pytest.raises(ValueError, match="nonlinearity='relu'"):
        from_torch(torch.nn.RNN(3, 4, nonlinearity="relu"))
    with pytest.raises(ValueError, match="peephole_input"):
        to_torch(recurrent.rnn(recurrent.peephole_lstm(4)), recurrent.peephole_lstm(4).init(jax.random.key(0), (3,)))
    with pytest.raises(ValueError, match="gate blocks instead of 4"):
        to_torch(recurrent.rnn(recurrent.cifg_lstm(4)), recurrent.cifg_lstm(4).init(jax.random.key(0), (3,)))
    cell = recurrent.gru(4, reset_after=False)
    with pytest.raises(ValueError, match="reset_after=True"):
        to_torch(cell, cell.init(jax.random.key(0), (3,)))
    bi = recurrent.bidirectional(recurrent.lstm(4), merge="sum")
    with pytest.raises(ValueError, match='merge="concat"'):
        to_torch(bi, bi.init(jax.random.key(0), (3,)))
    mixed = recurrent.stacked([recurrent.lstm(4), recurrent.gru(4)])
    with pytest.raises(ValueError, match="all-LSTM or all-GRU"):
        to_torch(mixed, mixed.init(jax.random.key(0), (3,)))
