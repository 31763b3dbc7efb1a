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


def exact(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


# Every option appears, also together (a stacked, bidirectional, projected LSTM without bias);
# batch sizes and sequence lengths are drawn per configuration.
CONFIGS = [
    dict(kind="lstm", F=3, H=4, L=1, D=False, P=0, bias=True, batch_first=True, lengths=True),
    dict(kind="lstm", F=2, H=5, L=2, D=True, P=3, bias=True, batch_first=True, lengths=True),
    dict(kind="lstm", F=4, H=3, L=1, D=True, P=2, bias=False, batch_first=False, lengths=True),
    dict(kind="lstm", F=3, H=4, L=3, D=False, P=0, bias=True, batch_first=False, lengths=False),
    dict(kind="lstm", F=1, H=2, L=2, D=True, P=1, bias=False, batch_first=False, lengths=True),
    dict(kind="gru", F=3, H=4, L=1, D=False, P=0, bias=True, batch_first=True, lengths=True),
    dict(kind="gru", F=2, H=3, L=2, D=True, P=0, bias=True, batch_first=False, lengths=True),
    dict(kind="gru", F=4, H=2, L=1, D=True, P=0, bias=False, batch_first=True, lengths=False),
]
for i, c in enumerate(CONFIGS):
    rng = np.random.default_rng(i)
    c.update(seed=i, B=int(rng.integers(1, 4)), T=int(rng.integers(1, 6)))


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


@pytest.mark.parametrize(
    "c", CONFIGS, ids=lambda c: "{kind}-F{F}H{H}L{L}D{D:d}P{P}b{bias:d}bf{batch_first:d}T{T}".format(**c)
)
def test_forward_backward_and_round_trip(c):
    module = make_module(c)
    layer, params = from_torch(module)
    B, T, F, bf = c["B"], c["T"], c["F"], c["batch_first"]
    rng = np.random.default_rng(c["seed"])
    x_np = rng.standard_normal((B, T, F) if bf else (T, B, F)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B) if c["lengths"] else None  # PackedSequence needs >= 1
    if lengths is not None:
        lengths[rng.integers(B)] = T  # pad_packed_sequence pads to the longest

    # PyTorch: forward, and backward of a random linear functional of outputs and final states
    xs_t = torch.from_numpy(x_np).requires_grad_(True)
    ys_t, state_t = torch_run(module, xs_t, lengths, bf)
    states = state_t if isinstance(state_t, tuple) else (state_t,)
    w_ys = rng.standard_normal(ys_t.shape).astype(np.float32)
    w_states = [rng.standard_normal(s.shape).astype(np.float32) for s in states]
    loss_t = (ys_t * torch.from_numpy(w_ys)).sum() + sum(
        (s * torch.from_numpy(w)).sum() for s, w in zip(states, w_states)
    )
    loss_t.backward()

    # Ours, as a function of PyTorch's tensors through the converter's own mapping (the one
    # from_torch uses), so the gradient is PyTorch's tensor by tensor; one compiled call.
    tensors = {name: jnp.asarray(p.detach().numpy()) for name, p in module.named_parameters()}
    exact(_torch.params_from_tensors(c["kind"], tensors, c["L"], c["D"]), params)

    def loss(tensors, xs):
        p = _torch.params_from_tensors(c["kind"], tensors, c["L"], c["D"])
        carry, ys = layer.apply(p, xs, lengths=lengths, time_major=not bf)
        st = carry_to_torch_jax(module, carry)
        return jnp.sum(ys * w_ys) + sum(jnp.sum(s * w) for s, w in zip(st, w_states)), (carry, ys)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (g_tensors, g_xs), (carry, ys) = grad(tensors, jnp.asarray(x_np))
    close(ys, ys_t.detach())
    jax.tree.map(close, carry, carry_from_torch(module, state_t))
    close(g_xs, xs_t.grad, GRAD)
    for name, p in module.named_parameters():
        close(g_tensors[name], p.grad, GRAD)

    # round trip: to, then from, is exact
    back = to_torch(layer, params, batch_first=bf)
    layer2, params2 = from_torch(back)
    exact(params, params2)
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


def random_params(layer, input_shape, seed=0):
    """Random values (biases included) of the shapes ``layer.init`` makes, without running it."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: layer.init(key, input_shape), jax.random.key(0))
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), shapes)


def test_to_torch_from_our_params_round_trips_exactly():
    layer = recurrent.stacked([recurrent.bidirectional(recurrent.gru(5))] * 2)
    params = random_params(layer, (3,))
    jax.tree.map(np.testing.assert_array_equal, params, from_torch(to_torch(layer, params))[1])


def test_clear_errors():
    with pytest.raises(ValueError, match="nonlinearity='relu'"):
        from_torch(torch.nn.RNN(3, 4, nonlinearity="relu"))
    with pytest.raises(ValueError, match="peephole_input"):
        to_torch(recurrent.rnn(recurrent.peephole_lstm(4)), random_params(recurrent.peephole_lstm(4), (3,)))
    with pytest.raises(ValueError, match="gate blocks instead of 4"):
        to_torch(recurrent.rnn(recurrent.cifg_lstm(4)), random_params(recurrent.cifg_lstm(4), (3,)))
    cell = recurrent.gru(4, reset_after=False)
    with pytest.raises(ValueError, match="reset_after=True"):
        to_torch(cell, random_params(cell, (3,)))
    bi = recurrent.bidirectional(recurrent.lstm(4), merge="sum")
    with pytest.raises(ValueError, match='merge="concat"'):
        to_torch(bi, random_params(bi, (3,)))
    mixed = recurrent.stacked([recurrent.lstm(4), recurrent.gru(4)])
    with pytest.raises(ValueError, match="all-LSTM or all-GRU"):
        to_torch(mixed, random_params(mixed, (3,)))
    big = recurrent.lstm(3, proj_size=3)
    with pytest.raises(ValueError, match="proj_size < hidden_size"):
        to_torch(big, random_params(big, (2,)))
