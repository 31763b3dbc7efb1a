"""Writes the notebooks of this directory from the cells below: ``python notebooks/build_notebooks.py``.

The ``.ipynb`` files are committed without outputs, and this script is their single source (a test
checks that they match it), so a change to a notebook is a readable diff of this file. Each notebook
uses only the public API of ``recurrent`` (plus JAX, optax and matplotlib), has a size switch at the
top (``RECURRENT_NOTEBOOK_SIZE=small`` is the CI smoke size; the default, ``full``, runs on a CPU in a
few minutes) and installs the package from its repository when it is not importable (Colab).
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# Every notebook's first code cell: where recurrent is not installed (e.g. on Colab) it installs it from a
# wheel uploaded to Colab or from a git URL the user sets; with neither it stops with what to do
# (tests/test_notebooks.py runs this cell with recurrent not importable).
SETUP = """\
import glob
import importlib
import os
import subprocess
import sys

SIZE = os.environ.get("RECURRENT_NOTEBOOK_SIZE", "full")  # "small": the seconds-long CI size
SMALL = SIZE == "small"

# >>> Where to install recurrent from, if it is not installed (see the first cell): <<<
GIT_URL = ""  # e.g. "git+https://github.com/YOUR_NAME/recurrent.git@main"; used when no wheel is uploaded
WHEEL_FOLDERS = [".", "/content"]  # a recurrent-*.whl uploaded to one of these is installed first

try:
    import recurrent
except ImportError:
    wheels = sorted(
        (w for folder in WHEEL_FOLDERS for w in glob.glob(os.path.join(folder, "recurrent-*.whl"))),
        key=os.path.getmtime,
    )
    if wheels:
        source = wheels[-1]  # the newest upload
    elif GIT_URL.strip():
        source = GIT_URL.strip() if GIT_URL.strip().startswith("git+") else "git+" + GIT_URL.strip()
    else:
        raise RuntimeError(
            "recurrent is not installed, and there is nothing to install it from.\\n"
            f"  expected: a recurrent-*.whl in {' or '.join(map(os.path.abspath, WHEEL_FOLDERS))}, or GIT_URL set\\n"
            "  got:      neither\\n"
            "  fix:      on your machine, in the repository: pip wheel . --no-deps -w dist ; upload\\n"
            "            dist/recurrent-*.whl with Colab's Files pane (it lands in /content), rerun this cell;\\n"
            '            or set GIT_URL = "git+https://github.com/YOUR_NAME/recurrent.git" above.'
        ) from None
    print("installing recurrent from", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)
    importlib.invalidate_caches()
    import recurrent
print("recurrent", getattr(recurrent, "__version__", "(version unknown)"), "is ready")"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ----------------------------------------------------------------------------------------------
QUICKSTART = [
    md("""
# 01 · Quickstart: the LSTM family in a few lines

`recurrent` is the LSTM family for JAX as pure functions. A **cell** is one time step, built by a
lowercase factory (`lstm`, `peephole_lstm`, `cifg_lstm`, `gru`, `conv_lstm`, `conv_gru`); `rnn(cell)`
scans it over a sequence and returns a **layer** with `init` and `apply`; `bidirectional` and `stacked`
combine cells and layers. This notebook shows every variant, shapes, variable lengths, the
combinators and a small training run with optax.

`SIZE = "small"` (the environment variable `RECURRENT_NOTEBOOK_SIZE`) shrinks the training run to a
few seconds; the default runs in about a minute on a CPU.
"""),
    code(SETUP),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## Every variant: init and apply

`layer.init(key, input_shape)` takes the shape of **one step's input** (no batch, no time axis), so no
example batch is needed. `layer.apply(params, xs)` takes `xs` of shape `(*batch, time, features)` and
returns the final carry and every step's output.
"""),
    code("""
F, H = 8, 16
key = jax.random.key(0)
xs = jax.random.normal(key, (4, 10, F))  # (batch, time, features)

cells = {
    "lstm": recurrent.lstm(H),
    "peephole_lstm": recurrent.peephole_lstm(H),
    "cifg_lstm": recurrent.cifg_lstm(H),
    "gru": recurrent.gru(H),
}
for name, cell in cells.items():
    layer = recurrent.rnn(cell)
    params = layer.init(key, (F,))
    carry, ys = layer.apply(params, xs)
    carry_shapes = jax.tree.map(jnp.shape, carry)
    print(f"{name:14s} {recurrent.count_params(params):5d} parameters  ys {ys.shape}  carry {carry_shapes}")
"""),
    md("""
Convolutional cells take frames `(*batch, time, *spatial, channels)`; the state keeps the spatial layout.
"""),
    code("""
video = jax.random.uniform(key, (2, 6, 12, 12, 1))  # (batch, time, height, width, channels)
for name, cell in {"conv_lstm": recurrent.conv_lstm(8, (3, 3)), "conv_gru": recurrent.conv_gru(8, (3, 3))}.items():
    layer = recurrent.rnn(cell)
    params = layer.init(key, (12, 12, 1))
    carry, ys = layer.apply(params, video)
    print(f"{name:10s} {recurrent.count_params(params):5d} parameters  ys {ys.shape}")
"""),
    md("""
## A cell is one step

`cell.step(params, carry, x) -> (carry, y)` is the `lax.scan` body; `rnn` is exactly the loop below
(it only moves the input projection out of the recurrence for speed).
"""),
    code("""
cell = recurrent.lstm(H)
params = cell.init(key, (F,))
carry = cell.initial_carry(params, (4, F))  # one step's input shape *with* its batch axes
for t in range(xs.shape[1]):
    carry, y = cell.step(params, carry, xs[:, t])

_, ys = recurrent.rnn(cell).apply(params, xs)
print("loop vs rnn, max difference:", float(jnp.abs(y - ys[:, -1]).max()))
"""),
    md("""
## Variable lengths, and sequences in chunks

`lengths` marks each sequence's valid prefix: outputs past it are zero and the returned carry is the
one after the last valid step (the initial carry for length 0). `carry=` continues a sequence.
"""),
    code("""
layer = recurrent.rnn(recurrent.lstm(H))
params = layer.init(key, (F,))
lengths = jnp.array([10, 7, 3, 0])
carry, ys = layer.apply(params, xs, lengths=lengths)
print("padded outputs are zero:", not bool(ys[2, 3:].any()))
print("carry = last valid output:", bool(jnp.allclose(carry.h[1], ys[1, 6])))
print("length 0 keeps the initial carry:", not bool(carry.c[3].any()))

carry_a, ys_a = layer.apply(params, xs[:, :4])
carry_b, ys_b = layer.apply(params, xs[:, 4:], carry=carry_a)
_, ys_all = layer.apply(params, xs)
print("two chunks == one pass:", bool(jnp.allclose(jnp.concatenate([ys_a, ys_b], 1), ys_all, atol=1e-5)))
"""),
    md("""
## Bidirectional and stacked

Combinators return the kind of thing they take: a stack of cells is a cell (so it can be stepped one
token at a time), a stack containing a bidirectional layer is a layer.
"""),
    code("""
bi = recurrent.bidirectional(recurrent.lstm(H))
params = bi.init(key, (F,))
carry, ys = bi.apply(params, xs, lengths=lengths)
print("bidirectional:", ys.shape, "carry fields", carry._fields)

deep_cell = recurrent.stacked([recurrent.lstm(H), recurrent.gru(H)], residual=True)
params = deep_cell.init(key, (F,))
carry = deep_cell.initial_carry(params, (4, F))
carry, y = deep_cell.step(params, carry, xs[:, 0])
print("stacked cell, one step:", y.shape, "carries per layer:", len(carry))

deep = recurrent.stacked([recurrent.bidirectional(recurrent.gru(H)), recurrent.lstm(H)])
params = deep.init(key, (F,))
print("stacked layer:", deep.apply(params, xs)[1].shape, recurrent.count_params(params), "parameters")
"""),
    md("""
## A tiny training run: the adding problem

Each sequence has two features, a value $u_t \\sim U[0, 1]$ and a marker; two steps are marked and the
target is the sum of their values (Hochreiter & Schmidhuber 1997). Predicting the mean gives MSE
$1/6$; a model below that remembers the first marked value across the distractors. The whole training
step is one jitted function of pure arrays.
"""),
    code("""
T = 20 if SMALL else 50
STEPS = 40 if SMALL else 800
BATCH = 64


def adding_batch(key, n=BATCH):
    k_u, k_i, k_j = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, (n, T))
    first = jax.random.randint(k_i, (n,), 0, T // 2)
    second = jax.random.randint(k_j, (n,), T // 2, T)
    marks = jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T)
    return jnp.stack([u, marks], -1), (u * marks).sum(-1)


model = recurrent.rnn(recurrent.lstm(32))


def init(key):
    return {"rnn": model.init(key, (2,)), "w": jnp.zeros(32), "b": jnp.ones(())}


def loss_fn(params, xs, target):
    carry, _ = model.apply(params["rnn"], xs)
    prediction = carry.h @ params["w"] + params["b"]  # read out the last step's output
    return jnp.mean((prediction - target) ** 2)


optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


@jax.jit
def train_step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, *adding_batch(key))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = init(jax.random.key(1))
opt_state = optimizer.init(params)
losses = []
for step in range(STEPS):
    params, opt_state, loss = train_step(params, opt_state, jax.random.fold_in(jax.random.key(2), step))
    losses.append(float(loss))
print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} (baseline 1/6 = {1 / 6:.3f})")
"""),
    code("""
plt.figure(figsize=(6, 3))
plt.plot(losses, label="LSTM")
plt.axhline(1 / 6, color="gray", ls="--", label="predict the mean")
plt.yscale("log")
plt.xlabel("Adam step")
plt.ylabel("MSE")
plt.legend()
plt.title(f"Adding problem, T = {T}")
plt.show()
"""),
    md("""
Next: `02_variants` puts each variant's equations beside its code and plots its gates;
`03_hyperparameter_search` trains a population of these models at once with `jax.vmap`.
"""),
]

# ----------------------------------------------------------------------------------------------
VARIANTS = [
    md("""
# 02 · The variants: equations beside code, parameter counts, gates over time

For each variant we compute one step **by hand from its equations** with the cell's own parameters and
check it against `cell.step`; we count parameters against the formula; and we train each one on a
timing task and plot its gates and cell state over time, to see what a peephole or a coupled gate
changes.
"""),
    code(SETUP),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

sigmoid, tanh = jax.nn.sigmoid, jnp.tanh
F, H = 3, 4
key = jax.random.key(0)
k_x, k_h, k_c = jax.random.split(jax.random.key(1), 3)
x = jax.random.normal(k_x, (F,))
h_prev, c_prev = jax.random.normal(k_h, (H,)), jax.random.normal(k_c, (H,))
"""),
    md("""
## LSTM (Hochreiter & Schmidhuber 1997; Gers et al. 2000)

$$
\\begin{aligned}
i_t &= \\sigma(W_i x_t + U_i h_{t-1} + b_i), \\quad f_t = \\sigma(W_f x_t + U_f h_{t-1} + b_f) \\\\
g_t &= \\tanh(W_g x_t + U_g h_{t-1} + b_g), \\quad o_t = \\sigma(W_o x_t + U_o h_{t-1} + b_o) \\\\
c_t &= f_t \\odot c_{t-1} + i_t \\odot g_t, \\qquad h_t = o_t \\odot \\tanh(c_t)
\\end{aligned}
$$

The four blocks are fused along the last axis in `recurrent.LSTM_GATES` order.
"""),
    code("""
cell = recurrent.lstm(H)
p = cell.init(key, (F,))
print(recurrent.LSTM_GATES, p.input_kernel.shape, p.recurrent_kernel.shape, p.bias.shape)

z = x @ p.input_kernel + h_prev @ p.recurrent_kernel + p.bias
i, f, g, o = jnp.split(z, 4)
i, f, g, o = sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
c = f * c_prev + i * g
h = o * tanh(c)

carry, y = cell.step(p, recurrent.LSTMState(h_prev, c_prev), x)
print("by hand == cell.step:", bool(jnp.allclose(h, y, atol=1e-6) and jnp.allclose(c, carry.c, atol=1e-6)))
"""),
    md("""
## Peephole LSTM (Gers & Schmidhuber 2000)

The gates also see the cell state: $p_i \\odot c_{t-1}$ and $p_f \\odot c_{t-1}$ enter the input and forget
gates, $p_o \\odot c_t$ (the *new* state) the output gate.
"""),
    code("""
cell = recurrent.peephole_lstm(H, peephole_init=jax.nn.initializers.normal(1.0))  # non-zero, to see them act
p = cell.init(key, (F,))

z = x @ p.input_kernel + h_prev @ p.recurrent_kernel + p.bias
zi, zf, zg, zo = jnp.split(z, 4)
i = sigmoid(zi + p.peephole_input * c_prev)
f = sigmoid(zf + p.peephole_forget * c_prev)
c = f * c_prev + i * tanh(zg)
o = sigmoid(zo + p.peephole_output * c)
h = o * tanh(c)

carry, y = cell.step(p, recurrent.LSTMState(h_prev, c_prev), x)
print("by hand == cell.step:", bool(jnp.allclose(h, y, atol=1e-6) and jnp.allclose(c, carry.c, atol=1e-6)))
"""),
    md("""
## CIFG LSTM (Greff et al. 2017)

One gate decides what to forget and what to write: $i_t = 1 - f_t$, so
$c_t = f_t \\odot c_{t-1} + (1 - f_t) \\odot g_t$. Three blocks, in `recurrent.CIFG_GATES` order.
"""),
    code("""
cell = recurrent.cifg_lstm(H)
p = cell.init(key, (F,))
print(recurrent.CIFG_GATES, p.input_kernel.shape)

z = x @ p.input_kernel + h_prev @ p.recurrent_kernel + p.bias
f, g, o = jnp.split(z, 3)
f, g, o = sigmoid(f), tanh(g), sigmoid(o)
c = f * c_prev + (1 - f) * g
h = o * tanh(c)

carry, y = cell.step(p, recurrent.LSTMState(h_prev, c_prev), x)
print("by hand == cell.step:", bool(jnp.allclose(h, y, atol=1e-6) and jnp.allclose(c, carry.c, atol=1e-6)))
"""),
    md("""
## GRU (Cho et al. 2014), `reset_after=True` as in cuDNN, PyTorch, Keras and Flax

$$
\\begin{aligned}
r_t &= \\sigma(W_r x_t + U_r h_{t-1} + b_r), \\quad z_t = \\sigma(W_z x_t + U_z h_{t-1} + b_z) \\\\
n_t &= \\tanh(W_n x_t + b_n + r_t \\odot (U_n h_{t-1} + b_{hn})) \\\\
h_t &= (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}
\\end{aligned}
$$
"""),
    code("""
cell = recurrent.gru(H)
p = cell.init(key, (F,))
print(recurrent.GRU_GATES, p.input_kernel.shape, p.recurrent_bias.shape)

xr, xz, xn = jnp.split(x @ p.input_kernel + p.bias, 3)
hr, hz, hn = jnp.split(h_prev @ p.recurrent_kernel, 3)
r, z = sigmoid(xr + hr), sigmoid(xz + hz)
n = tanh(xn + r * (hn + p.recurrent_bias))
h = (1 - z) * n + z * h_prev

carry, y = cell.step(p, h_prev, x)
print("by hand == cell.step:", bool(jnp.allclose(h, y, atol=1e-6)))
"""),
    md("""
## Parameter counts

| variant | formula |
| --- | --- |
| LSTM | $4H(F + H + 1)$ |
| peephole LSTM | $4H(F + H + 1) + 3H$ |
| CIFG LSTM | $3H(F + H + 1)$ |
| GRU | $3H(F + H + 1) + H$ |
| ConvLSTM | $4H(k(C + H) + 1)$, $k$ = kernel positions, $C$ = input channels |
| ConvGRU | $3H(k(C + H) + 1) + H$ |
| bidirectional | twice its cell |
| stacked | sum of its layers |
"""),
    code("""
F, H, C, K = 10, 32, 3, (3, 3)
k = int(np.prod(K))
lstm_count = 4 * H * (F + H + 1)
rows = [
    ("lstm", recurrent.lstm(H), (F,), lstm_count),
    ("peephole_lstm", recurrent.peephole_lstm(H), (F,), lstm_count + 3 * H),
    ("cifg_lstm", recurrent.cifg_lstm(H), (F,), 3 * H * (F + H + 1)),
    ("gru", recurrent.gru(H), (F,), 3 * H * (F + H + 1) + H),
    ("conv_lstm", recurrent.conv_lstm(H, K), (8, 8, C), 4 * H * (k * (C + H) + 1)),
    ("conv_gru", recurrent.conv_gru(H, K), (8, 8, C), 3 * H * (k * (C + H) + 1) + H),
    ("bidirectional lstm", recurrent.bidirectional(recurrent.lstm(H)), (F,), 2 * lstm_count),
    ("stacked lstm x2", recurrent.stacked([recurrent.lstm(H)] * 2), (F,), lstm_count + 4 * H * (2 * H + 1)),
]
print(f"{'variant':20s} {'count_params':>12s} {'formula':>8s}")
for name, model, shape, formula in rows:
    counted = recurrent.count_params(model.init(key, shape))
    print(f"{name:20s} {counted:12d} {formula:8d}  {'ok' if counted == formula else 'MISMATCH'}")
    assert counted == formula
"""),
    md("""
## Gates over time on a timing task

The task (in the spirit of Gers et al. 2002, *Learning precise timing*): the input is a single spike at
a random time $t_0$; the target is a spike exactly `DELAY` steps later, and silence elsewhere. The
network has to *count* steps since the input spike. We train an LSTM, a peephole LSTM, a CIFG LSTM and a
GRU with the same budget, then plot each one's gates and cell state on one sequence with
`layer.apply(..., return_trace=True)`, which returns every step's carry and gate activations.
"""),
    code("""
T, DELAY = (30, 8) if SMALL else (50, 20)
H = 8
STEPS = 30 if SMALL else 1500
BATCH = 32


def timing_batch(key, n=BATCH):
    t0 = jax.random.randint(key, (n,), 0, T - DELAY)
    xs = jax.nn.one_hot(t0, T)[..., None]  # (n, T, 1): the spike
    ys = jax.nn.one_hot(t0 + DELAY, T)  # (n, T): the spike DELAY steps later
    return xs, ys


def make_train(cell):
    layer = recurrent.rnn(cell)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))

    def logits(params, xs):
        _, ys = layer.apply(params["rnn"], xs)
        return ys @ params["w"] + params["b"]

    def loss_fn(params, xs, target):
        return optax.sigmoid_binary_cross_entropy(logits(params, xs), target).mean()

    def train(key):
        k_init, k_data = jax.random.split(key)
        params = {"rnn": layer.init(k_init, (1,)), "w": jnp.zeros(H), "b": jnp.full((), -3.0)}

        def step(state, k):
            params, opt_state = state
            loss, grads = jax.value_and_grad(loss_fn)(params, *timing_batch(k))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(k_data, STEPS))
        return params, losses

    return layer, jax.jit(train), logits


variants = {
    "LSTM": recurrent.lstm(H),
    "peephole LSTM": recurrent.peephole_lstm(H),
    "CIFG LSTM": recurrent.cifg_lstm(H),
    "GRU": recurrent.gru(H),
}
trained = {}
for name, cell in variants.items():
    layer, train, logits = make_train(cell)
    params, losses = train(jax.random.key(0))
    trained[name] = (layer, params, losses, logits)
    print(f"{name:14s} final loss {float(losses[-20:].mean()):.4f}")
"""),
    code("""
xs, target = timing_batch(jax.random.key(123), n=1)
fig, axes = plt.subplots(3, len(trained), figsize=(4 * len(trained), 7.5), sharex=True)
for col, (name, (layer, params, _, logits)) in enumerate(trained.items()):
    _, _, trace = layer.apply(params["rnn"], xs, return_trace=True)
    prediction = jax.nn.sigmoid(logits(params, xs))[0]
    ax = axes[0, col]
    ax.plot(xs[0, :, 0], label="input spike")
    ax.plot(target[0], label="target", lw=3, alpha=0.5)
    ax.plot(prediction, label="prediction")
    ax.set_title(name)
    ax.legend(fontsize=7)
    ax = axes[1, col]
    gate_names = [g for g in ("input", "forget", "output", "reset", "update") if g in trace.gates]
    for gate, color in zip(gate_names, ["C0", "C1", "C2", "C3", "C4"]):
        ax.plot(trace.gates[gate][0].mean(-1), color=color, label=f"{gate} (mean)")
        ax.fill_between(range(T), trace.gates[gate][0].min(-1), trace.gates[gate][0].max(-1), color=color, alpha=0.15)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_ylabel("gate activation")
    ax = axes[2, col]
    state = trace.carries.c if hasattr(trace.carries, "c") else trace.carries
    ax.plot(state[0])
    ax.set_ylabel("cell state c" if hasattr(trace.carries, "c") else "state h (GRU)")
    ax.set_xlabel("time step")
plt.tight_layout()
plt.show()
"""),
    md("""
**Reading the plots** (at the full size; the details change with the seed). The LSTM and the
peephole LSTM keep some cell units as *counters*: their cell state rises or falls by a nearly
constant amount at every step (forget gate near 1, input gate open), an additive clock that the
gates and the readout compare with the time of the input spike. Peepholes let the gates read that
clock from $c$ directly, even while the output gate keeps $h$ small; without them the gates see it
only through $h_{t-1}$. The **CIFG** cannot build such a ramp: with $i = 1 - f$ its cell state is a
running average of candidates in $[-1, 1]$, so it times the delay with decaying and saturating units
instead, and every write (the forget gate dips at the spike and at the target) is also a forget. The
**GRU**, whose state is its output and also a convex combination, times it the same way through its
update gate. At this delay all four solve the task; the final losses above and the curves below
compare how fast. The learned peepholes:
"""),
    code("""
layer, params, losses, logits = trained["peephole LSTM"]
p = params["rnn"]
for gate in ("input", "forget", "output"):
    weights = getattr(p, f"peephole_{gate}")
    print(f"peephole to the {gate:6s} gate: mean |p| = {float(jnp.abs(weights).mean()):.3f}")

plt.figure(figsize=(6, 3))
for name, (_, _, losses, _) in trained.items():
    plt.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"), label=name)
plt.yscale("log")
plt.xlabel("Adam step")
plt.ylabel("loss (moving average)")
plt.legend()
plt.show()
"""),
]

# ----------------------------------------------------------------------------------------------
SEARCH = [
    md("""
# 03 · Hyperparameter search: a population trained in one call

A training run written as a pure function `train(key, hyperparameters) -> losses` can be vectorised
with `jax.vmap`: one compiled program trains a whole population of LSTMs at once (one program, one
compilation, the device kept busy). Here we sample learning rates and forget-gate biases at random,
train every member on the adding problem, plot the results and estimate how much each hyperparameter
matters with fANOVA (Hutter et al. 2014).

This notebook uses the public API and optax only; the project's search experiment
(`experiments.search`) runs the same idea at scale.
"""),
    code(SETUP),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

POPULATION = 8 if SMALL else 32
STEPS = 30 if SMALL else 600
T, H, BATCH = (15, 16, 32) if SMALL else (30, 32, 32)
print(f"{POPULATION} models x {STEPS} steps on", jax.devices())
"""),
    code("""
def adding_batch(key, n=BATCH):
    k_u, k_i, k_j = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, (n, T))
    first = jax.random.randint(k_i, (n,), 0, T // 2)
    second = jax.random.randint(k_j, (n,), T // 2, T)
    marks = jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T)
    return jnp.stack([u, marks], -1), (u * marks).sum(-1)


def train(key, learning_rate, forget_bias):
    # Both hyperparameters may be traced arrays, so the whole function vmaps over them.
    layer = recurrent.rnn(recurrent.lstm(H, forget_bias=forget_bias))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))

    def loss_fn(params, xs, target):
        carry, _ = layer.apply(params["rnn"], xs)
        return jnp.mean((carry.h @ params["w"] + params["b"] - target) ** 2)

    k_init, k_data = jax.random.split(key)
    params = {"rnn": layer.init(k_init, (2,)), "w": jnp.zeros(H), "b": jnp.ones(())}

    def step(state, k):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *adding_batch(k))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(k_data, STEPS))
    return losses
"""),
    md("""
Random search (Bergstra & Bengio 2012): learning rate log-uniform in $[10^{-4}, 10^{-1}]$, forget-gate
bias uniform in $[-2, 4]$. Every member gets its own initialisation key; the data stream is the same
for all (the key's second half), so differences come from the hyperparameters and the init.
"""),
    code("""
rng = np.random.default_rng(0)
learning_rates = 10 ** rng.uniform(-4, -1, POPULATION)
forget_biases = rng.uniform(-2, 4, POPULATION)
keys = jax.random.split(jax.random.key(0), POPULATION)

population_train = jax.jit(jax.vmap(train))
losses = np.asarray(population_train(keys, jnp.asarray(learning_rates), jnp.asarray(forget_biases)))
final = losses[:, -max(1, STEPS // 10) :].mean(1)  # mean loss over the last 10 % of steps
diverged = ~np.isfinite(final)
print(f"{int(diverged.sum())} of {POPULATION} members diverged (NaN loss)")
best = int(np.nanargmin(final))
print(
    f"losses {losses.shape}; best: lr {learning_rates[best]:.2e}, forget bias {forget_biases[best]:.2f}, "
    f"final loss {final[best]:.4f} (baseline 1/6 = {1 / 6:.4f})"
)
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
colors = plt.cm.viridis((np.log10(learning_rates) + 4) / 3)
for curve, color in zip(losses, colors):
    axes[0].plot(curve, color=color, alpha=0.7)
axes[0].axhline(1 / 6, color="gray", ls="--")
axes[0].set(yscale="log", xlabel="Adam step", ylabel="MSE", title="every member (color: log10 lr)")
points = axes[1].scatter(learning_rates, final, c=forget_biases, cmap="coolwarm")
axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final MSE", title="final loss vs lr")
fig.colorbar(points, ax=axes[1], label="forget bias")
points = axes[2].scatter(forget_biases, final, c=np.log10(learning_rates), cmap="viridis")
axes[2].set(yscale="log", xlabel="forget-gate bias", ylabel="final MSE", title="final loss vs forget bias")
fig.colorbar(points, ax=axes[2], label="log10 lr")
plt.tight_layout()
plt.show()
"""),
    md("""
## Which hyperparameter matters?

fANOVA fits a random forest to (hyperparameters -> final loss) and splits the variance of its
prediction into the share explained by each hyperparameter alone (Hutter, Hoos & Leyton-Brown 2014).
Optuna implements it (`optuna.importance.FanovaImportanceEvaluator`); we hand it the population as
finished trials. Beside it, a cruder cross-check that needs nothing: the variance of the mean loss
within quantile bins of one hyperparameter over the total variance (a first-order sensitivity index).
With a few dozen members both estimates are rough; `SIZE = "full"` samples more.
"""),
    code("""
# Losses span decades: compare them on a log scale. A diverged member counts as the worst one seen.
log_final = np.log(np.where(diverged, np.nanmax(final), final))
hyperparameters = {"learning_rate": np.log10(learning_rates), "forget_bias": forget_biases}


def main_effect(values, bins=4):
    # Variance of the mean log loss within quantile bins of one hyperparameter, over the total variance.
    edges = np.quantile(values, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    means = np.array([log_final[which == b].mean() for b in range(bins) if (which == b).any()])
    return float(means.var() / log_final.var())


importance = {"binned main effect": {name: main_effect(v) for name, v in hyperparameters.items()}}
try:
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    space = {"learning_rate": FloatDistribution(1e-4, 1e-1, log=True), "forget_bias": FloatDistribution(-2, 4)}
    for lr, fb, value in zip(learning_rates, forget_biases, log_final):
        trial_params = {"learning_rate": float(lr), "forget_bias": float(fb)}
        study.add_trial(optuna.trial.create_trial(params=trial_params, distributions=space, value=float(value)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importance["fANOVA (optuna)"] = optuna.importance.get_param_importances(study, evaluator=evaluator)
except ImportError:
    print("optuna is not installed (pip install optuna scikit-learn): showing the binned estimate only")

for method, values in importance.items():
    print(f"{method:20s}", "  ".join(f"{name} {float(v):.2f}" for name, v in values.items()))
fig, ax = plt.subplots(figsize=(5, 2.5))
for k, (method, values) in enumerate(importance.items()):
    names = list(hyperparameters)
    ax.barh(np.arange(len(names)) + 0.4 * k, [float(values[n]) for n in names], height=0.4, label=method)
ax.set_yticks(np.arange(len(hyperparameters)) + 0.2, list(hyperparameters))
ax.set_xlabel("share of the variance of log loss")
ax.legend(fontsize=8)
plt.show()
"""),
]

# ----------------------------------------------------------------------------------------------
VIDEO = [
    md("""
# 04 · Video prediction with a ConvLSTM

A ConvLSTM (Shi et al. 2015) keeps its state as feature maps and uses convolutions for both
transitions, so it can learn motion. We train a two-layer ConvLSTM to predict the next frame of a
synthetic video of a bouncing square (the shape of Moving MNIST, Srivastava et al. 2015, generated
here so nothing is downloaded), then show its one-step predictions and a closed-loop rollout in which
it feeds on its own predictions.
"""),
    code(SETUP),
    code("""
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

SIZE_PX = 12 if SMALL else 16  # frame height = width
FRAMES = 8 if SMALL else 10
HIDDEN = 4 if SMALL else 8
STEPS = 20 if SMALL else 400
BATCH = 8
SQUARE = 3


def bouncing_squares(seed, n):
    \"\"\"n videos (n, FRAMES, SIZE_PX, SIZE_PX, 1) of a square bouncing off the walls, deterministic in seed.\"\"\"
    rng = np.random.default_rng(seed)
    videos = np.zeros((n, FRAMES, SIZE_PX, SIZE_PX, 1), np.float32)
    high = SIZE_PX - SQUARE
    for k in range(n):
        position = rng.integers(0, high + 1, 2)
        velocity = rng.choice([-1, 1], 2)  # one pixel per frame along each axis
        for t in range(FRAMES):
            y, x = position
            videos[k, t, y : y + SQUARE, x : x + SQUARE, 0] = 1.0
            position = position + velocity
            for axis in range(2):  # reflect off the walls
                if position[axis] < 0:
                    position[axis], velocity[axis] = -position[axis], -velocity[axis]
                elif position[axis] > high:
                    position[axis], velocity[axis] = 2 * high - position[axis], -velocity[axis]
    return videos


train_videos = bouncing_squares(0, 512 if not SMALL else 32)
test_videos = bouncing_squares(1, 4)
print("train", train_videos.shape, "test", test_videos.shape)
"""),
    md("""
The model: two stacked ConvLSTM cells (a stack of cells is itself a cell, so we can step it frame by
frame later), and a 1x1 readout of the top layer's hidden channels to a logit per pixel. The loss is
the per-pixel binary cross-entropy of frame $t+1$ given frames $1..t$.
"""),
    code("""
cell = recurrent.stacked([recurrent.conv_lstm(HIDDEN, (3, 3)), recurrent.conv_lstm(HIDDEN, (3, 3))])
layer = recurrent.rnn(cell)
frame_shape = (SIZE_PX, SIZE_PX, 1)


def init(key):
    return {"rnn": layer.init(key, frame_shape), "w": jnp.zeros((HIDDEN, 1)), "b": jnp.full((1,), -2.0)}


def readout(params, hs):
    return hs @ params["w"] + params["b"]  # a 1x1 convolution: per-pixel logits


def loss_fn(params, videos):
    _, hs = layer.apply(params["rnn"], videos[:, :-1])
    return optax.sigmoid_binary_cross_entropy(readout(params, hs), videos[:, 1:]).mean()


optimizer = optax.adam(5e-3)


@jax.jit
def train_step(params, opt_state, videos):
    loss, grads = jax.value_and_grad(loss_fn)(params, videos)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = init(jax.random.key(0))
opt_state = optimizer.init(params)
print(recurrent.count_params(params), "parameters")
rng = np.random.default_rng(0)
losses = []
for _ in range(STEPS):
    batch = train_videos[rng.choice(len(train_videos), BATCH, replace=False)]
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batch))
    losses.append(float(loss))
print(f"loss: first {losses[0]:.4f}, last {np.mean(losses[-10:]):.4f}")
"""),
    md("""
## Predicted frames

Row 1: the video. Row 2: one-step predictions (each from the true frames before it). Row 3: a
closed-loop rollout: the model sees the first half of the video, then steps the stacked cell on its
own predictions with `cell.step`.
"""),
    code("""
video = jnp.asarray(test_videos[:1])
_, hs = layer.apply(params["rnn"], video[:, :-1])
one_step = jax.nn.sigmoid(readout(params, hs))[0, ..., 0]  # prediction of frames 1..FRAMES-1

warmup = FRAMES // 2
carry, hs = layer.apply(params["rnn"], video[:, :warmup])
frame = jax.nn.sigmoid(readout(params, hs[:, -1]))  # prediction of frame `warmup`
rollout = [frame[0, ..., 0]]
for _ in range(warmup + 1, FRAMES):
    carry, h = cell.step(params["rnn"], carry, frame)
    frame = jax.nn.sigmoid(readout(params, h))
    rollout.append(frame[0, ..., 0])

fig, axes = plt.subplots(3, FRAMES, figsize=(1.2 * FRAMES, 4))
for t in range(FRAMES):
    axes[0, t].imshow(video[0, t, ..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0, t].set_title(f"t={t}", fontsize=8)
    if t >= 1:
        axes[1, t].imshow(one_step[t - 1], cmap="gray", vmin=0, vmax=1)
    if t >= warmup:
        axes[2, t].imshow(rollout[t - warmup], cmap="gray", vmin=0, vmax=1)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
    if not ax.images:  # no prediction for this frame (the first one, the rollout's warm-up)
        ax.set_frame_on(False)
for row, label in enumerate(["truth", "one step", "rollout"]):
    axes[row, 0].set_ylabel(label)
plt.tight_layout()
plt.show()

plt.figure(figsize=(5, 2.5))
plt.plot(losses)
plt.yscale("log")
plt.xlabel("Adam step")
plt.ylabel("BCE per pixel")
plt.show()
"""),
]

# ----------------------------------------------------------------------------------------------
COLAB = [
    md("""
# 05 · On a Colab TPU or GPU: one population sharded over every core

Runs unchanged on a Colab TPU, a GPU or a CPU. It finds the accelerator and trains a population of
small LSTMs (one per learning rate) with `jax.vmap`, splitting the population over every device with
`jax.sharding`: each core trains its own slice of the population, with no communication. On a CPU with
one device the same code runs the whole population on it.

On Colab: *Runtime → Change runtime type → TPU* (or GPU), then install `recurrent` in one of two ways:

1. **A wheel** (works for a private or unpublished checkout). On your machine, in the repository:
   `pip wheel . --no-deps -w dist` (or `python -m build --wheel`, with `pip install build`). Upload
   `dist/recurrent-0.1.0-py3-none-any.whl` with Colab's *Files* pane (it lands in `/content`); the next
   cell installs the newest `recurrent-*.whl` it finds in the working directory or `/content`.
2. **A git URL**: set `GIT_URL = "git+https://github.com/YOUR_NAME/recurrent.git@main"` in the next cell
   (any URL that `pip install` accepts); it is used when no wheel is uploaded.

With neither, the next cell stops with a message saying this. Where `recurrent` is already importable
(a local kernel with the package installed), nothing is installed. Then run all cells. To try the
sharding on a CPU, start the kernel with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""),
    code(SETUP),
    code("""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

devices = jax.devices()
platform = devices[0].platform  # "tpu", "gpu" or "cpu"
print(f"{len(devices)} {platform} device(s):", devices)
if platform == "cpu":
    print("No accelerator found: running on the CPU (the same code runs on TPU and GPU).")

# Compute in bfloat16 on TPU (cell state and the loss stay in float32); float32 elsewhere.
COMPUTE_DTYPE = jnp.bfloat16 if platform == "tpu" else jnp.float32
"""),
    code("""
ACCELERATOR = platform in ("tpu", "gpu")
PER_DEVICE = 2 if SMALL else (16 if ACCELERATOR else 4)  # a CPU gets a smaller population ...
POPULATION = PER_DEVICE * len(devices)  # a multiple of the device count, so it splits evenly
STEPS = 20 if SMALL else 500
T, H, BATCH = (12, 16, 16) if SMALL else ((50, 64, 128) if ACCELERATOR else (40, 32, 64))  # ... and models


def adding_batch(key, n=BATCH):
    k_u, k_i, k_j = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, (n, T))
    first = jax.random.randint(k_i, (n,), 0, T // 2)
    second = jax.random.randint(k_j, (n,), T // 2, T)
    marks = jax.nn.one_hot(first, T) + jax.nn.one_hot(second, T)
    return jnp.stack([u, marks], -1), (u * marks).sum(-1)


def train(key, learning_rate):
    layer = recurrent.rnn(recurrent.lstm(H, dtype=COMPUTE_DTYPE))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))

    def loss_fn(params, xs, target):
        carry, _ = layer.apply(params["rnn"], xs)
        prediction = carry.h.astype(jnp.float32) @ params["w"] + params["b"]
        return jnp.mean((prediction - target) ** 2)

    k_init, k_data = jax.random.split(key)
    params = {"rnn": layer.init(k_init, (2,)), "w": jnp.zeros(H), "b": jnp.ones(())}

    def step(state, k):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, *adding_batch(k))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    _, losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(k_data, STEPS))
    return losses
"""),
    md("""
The population axis is split over a one-dimensional device mesh. Placing the inputs (keys and
learning rates) with a `NamedSharding` is enough: `jit` propagates the sharding through the vmapped
training, and each device computes its own members.
"""),
    code("""
mesh = Mesh(np.array(devices), ("population",))
sharding = NamedSharding(mesh, PartitionSpec("population"))

keys = jax.device_put(jax.random.split(jax.random.key(0), POPULATION), sharding)
learning_rates = jax.device_put(jnp.logspace(-3.5, -1.5, POPULATION), sharding)

population_train = jax.jit(jax.vmap(train), out_shardings=sharding)
start = time.perf_counter()
compiled = population_train.lower(keys, learning_rates).compile()
compile_s = time.perf_counter() - start
start = time.perf_counter()
losses = compiled(keys, learning_rates)
losses.block_until_ready()
run_s = time.perf_counter() - start

print(
    f"{POPULATION} models x {STEPS} steps: compile {compile_s:.1f} s, run {run_s:.1f} s "
    f"({1e3 * run_s / STEPS:.1f} ms per step of the whole population)"
)
print("losses", losses.shape, "sharded as", losses.sharding.spec)
for shard in losses.addressable_shards:
    members = range(POPULATION)[shard.index[0]]
    print(f"  {shard.device}: members {members[0]}..{members[-1]}")
"""),
    code("""
import matplotlib.pyplot as plt

final = np.asarray(losses[:, -max(1, STEPS // 10) :].mean(1))
learning_rates = np.asarray(learning_rates)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for curve, lr in zip(np.asarray(losses), learning_rates):
    axes[0].plot(curve, color=plt.cm.viridis((np.log10(lr) + 3.5) / 2), alpha=0.8)
axes[0].axhline(1 / 6, color="gray", ls="--")
axes[0].set(yscale="log", xlabel="Adam step", ylabel="MSE", title=f"{POPULATION} LSTMs on {len(devices)} {platform}")
axes[1].plot(learning_rates, final, "o")
axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final MSE")
plt.tight_layout()
plt.show()
print(f"best learning rate {learning_rates[np.argmin(final)]:.2e}: final MSE {final.min():.4f} (baseline 0.1667)")
"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_variants.ipynb": VARIANTS,
    "03_hyperparameter_search.ipynb": SEARCH,
    "04_video_prediction.ipynb": VIDEO,
    "05_colab_tpu.ipynb": COLAB,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` as written by this script (no outputs)."""
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "TPU" if name.startswith("05") else None,
    }
    if nb.metadata["accelerator"] is None:
        del nb.metadata["accelerator"]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids, so rebuilding gives the same file
    return nb


def text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main() -> None:
    for name in NOTEBOOKS:
        (HERE / name).write_text(text(name))
        print("wrote", HERE / name, file=sys.stderr)


if __name__ == "__main__":
    main()
