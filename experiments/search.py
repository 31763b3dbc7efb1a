r"""Hyperparameter search as one compiled program: a population of recurrent networks trained side by side.

Run ``python -m experiments.search`` (``--help`` lists the fields). The task is the music task of
:mod:`experiments.music` (next-step NLL of piano rolls under independent sigmoid outputs; ``--data``
as there, or ``synthetic`` for a small generated data set).

**One program per group.** A member's training is a pure function ``train_steps(group, state,
hypers, active, xs, lengths)`` of one member; ``jax.vmap`` runs it over a population axis and
``jax.jit`` compiles it once per *group* of discrete choices (variant, hidden size, depth; the
static :class:`Group`). The continuous hyperparameters (:data:`HYPERS`: learning rate, momentum,
weight decay, clip norm, forget-gate bias, initialisation scale, dropout, zoneout, input-noise std)
and each member's PRNG key are traced arrays with a population axis, never Python floats, so no
value of theirs ever causes a recompile (the optimiser is built inside the traced function from
those arrays; the regularisers of :func:`recurrent.rnn` accept traced rates).

**The cell is a discrete choice** (``--variants``, comma-separated, case-insensitive): Greff et
al.'s LSTM variant codes (``recurrent.GREFF_VARIANTS``: V, NIG, NFG, NOG, NIAF, NOAF, NP, CIFG, FGR;
:func:`recurrent.lstm_variant`), ``gru``, ``slstm`` and ``mlstm`` (xLSTM; ``--heads`` heads, which must
divide every hidden size), ``min_gru`` and ``min_lstm``. Each name is one entry of :data:`CELLS`
(name -> builder). Which hyperparameters reach which cell:

- learning rate, momentum, weight decay, clip norm, initialisation scale, dropout (before the readout
  and between stacked layers) and input noise: every cell.
- ``forget_bias``: added at init to the bias of the gate that keeps the previous state, on top of the
  cell's own initialiser: the forget gate of the LSTM variants (as ``lstm_variant(forget_bias=...)``,
  whose own bias is zero), of the sLSTM (its power-law init), the mLSTM (its 3..6 per head) and the
  minLSTM (zero); the GRU's update gate ``z`` (``h = (1 - z) n + z h_prev``); the minGRU's update bias
  gets ``-forget_bias`` (its ``1 - z`` keeps the state). ``--forget_bias_range=0`` leaves every cell at
  its own initialiser. A cell without such a gate (NFG) ignores it: a *ranged* ``--forget_bias_range``
  with such a cell is refused (:class:`ConfigError`), a fixed value is recorded in the member table and
  changes nothing. Whether a cell ignores it is asked of the cell: its ``init`` is traced with
  ``forget_bias`` as an input and the value followed to the parameters.
- ``zoneout``: every cell that accepts it (the mLSTM refuses zoneout: a nonzero ``--zoneout_range`` with
  ``mlstm`` is a :class:`ConfigError` before anything compiles, found by tracing the layer with
  ``jax.eval_shape`` on a tiny input and catching the library's error, never from a list of names).
  The sLSTM zones out ``h`` and its memory ``(c, n, m)`` at the same rate.
- ``--heads``: the sLSTM and the mLSTM; refused when no selected cell takes heads.

**Hidden sizes** sampled from a range (``--hidden=log:20:200``) are snapped to the nearest (in log
scale) of ``--hidden_buckets`` log-spaced sizes, the centres of equal log-width bins of the range;
every bucket is one group and one compiled program. The table records the sampled and the trained
size. We chose buckets over masking hidden units of one maximal size: a masked member would pay for
the largest size, and its initialisation (orthogonal recurrent kernel, fan-in scaling) would not be
that of the smaller network it stands for, so a member would no longer equal its configuration
trained alone.

**Devices.** Each group's population axis is sharded over all devices (``--num_devices``) with a
``NamedSharding`` on a 1-D mesh ``pop``; the population is padded with inactive copies to a
multiple of the device count. The batch is replicated: every member sees the same data order
(drawn from ``--seed``); its own key draws its initialisation, dropout masks and input noise.
With ``--distributed=true`` (several processes, started as for :mod:`experiments.pipeline`) the
mesh spans the devices of every process: each process places the members of its own devices, the
losses are gathered to every process, process 0 alone logs and writes the results, and the results
equal those of one process with as many devices.

**Samplers** (``--sampler``): ``grid`` (``--grid_points`` per ranged dimension; log ranges on a
geometric grid), ``random`` (uniform, log-uniform or one-minus-log-uniform per range), ``sobol``
and ``halton`` (scrambled, from :mod:`scipy.stats.qmc`). A range is ``lo:hi`` (uniform),
``log:lo:hi``, ``1-log:lo:hi`` (``1 - u`` with ``u`` log-uniform, for momentum) or a single value.
Variants and seeds are crossed with the sampled configurations: every variant is trained with
every draw, ``--seeds`` times.

**Successive halving** (``--halving=100,200``): at each listed step the active members are ranked
by validation NLL and the worst fraction ``1 - --halving_keep`` is frozen (an ``active`` mask makes
their update the identity; nothing recompiles, a frozen member still costs its compute).

**Checkpoints.** After every ``--eval_every`` steps the whole search (every group's states, the
mask, the curves) is saved with orbax under ``<workdir>/checkpoints``; rerunning the same command
resumes, with the same results as an uninterrupted run (data, crops and keys are functions of the
step).

**Results** in ``<workdir>``: ``members.csv`` / ``members.jsonl`` (one row per member: its
hyperparameters, final and best validation NLL, test NLL, the step it stopped at),
``curves.csv`` / ``curves.jsonl`` (member, step, train loss, validation NLL), ``importance.json``
(functional ANOVA by optuna's ``FanovaImportanceEvaluator``), and the plots ``curves.png``,
``hyperparameters.png`` and ``variants.png``. Read the tables with ``pandas.read_csv`` or
``pandas.read_json(path, lines=True)``.

Training batches are crops of ``--window`` steps (plus one target step) at random offsets, so one
shape compiles; evaluation runs over whole sequences, padded to one shape per split.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import recurrent
from experiments import errors, music, pipeline
from experiments.pipeline import ConfigError, field

#: The continuous hyperparameters, each a traced array with a population axis.
HYPERS = (
    "learning_rate",
    "momentum",
    "weight_decay",
    "clip_norm",
    "forget_bias",
    "init_scale",
    "dropout",
    "zoneout",
    "input_noise",
)
SAMPLERS = ("grid", "random", "sobol", "halton")
OPTIMIZERS = ("sgd", "adam")

#: How often each traced function was traced (a test counts recompiles with it).
TRACES: collections.Counter = collections.Counter()


class Hypers(NamedTuple):
    """One member's continuous hyperparameters (scalars), or a population's (``(P,)`` arrays)."""

    learning_rate: Any
    momentum: Any
    weight_decay: Any
    clip_norm: Any  # <= 0: no clipping
    forget_bias: Any
    init_scale: Any  # multiplies every weight matrix at init
    dropout: Any  # on the recurrent outputs before the readout (and between layers)
    zoneout: Any
    input_noise: Any  # std of Gaussian noise added to the inputs in training


class Group(NamedTuple):
    """The static choices of one compiled program."""

    variant: str  # a key of CELLS
    hidden: int
    layers: int
    features: int
    optimizer: str = "adam"  # sgd (momentum = ``momentum``) | adam (b1 = ``momentum``)
    nesterov: bool = False
    #: The regularisers in the program (of ``dropout``, ``zoneout``, ``input_noise``); one whose
    #: range is fixed at 0 is left out, which makes the program smaller and faster.
    regularisers: tuple[str, ...] = ("dropout", "zoneout", "input_noise")
    heads: int = 1  # of a cell that takes heads (slstm, mlstm); 1 for the others

    @property
    def name(self) -> str:
        return f"{self.variant}_h{self.hidden}_l{self.layers}" + (f"_k{self.heads}" if self.heads > 1 else "")


# --------------------------------------------------------------------------------------
# The cells: one table, name -> builder.


class CellChoice(NamedTuple):
    """An entry of :data:`CELLS`: ``build(hidden, forget_bias, heads) -> Cell`` (``forget_bias`` may be
    traced) and whether ``--heads`` reaches the cell."""

    build: Callable[[int, Any, int], recurrent.Cell]
    takes_heads: bool = False


def shift_gate_bias(cell: recurrent.Cell, amount: Any, field: str, gates: Sequence[str], gate: str) -> recurrent.Cell:
    """``cell`` whose ``init`` adds ``amount`` (may be traced) to the ``gate`` block of the fused bias
    ``params.<field>``, whose blocks are in ``gates`` order; everything else is the cell's own."""
    j, n = list(gates).index(gate), len(gates)

    def init(key, input_shape):
        params = cell.init(key, input_shape)
        bias = getattr(params, field)
        w = bias.shape[-1] // n
        return params._replace(**{field: bias.at[j * w : (j + 1) * w].add(jnp.asarray(amount, bias.dtype))})

    return cell._replace(init=init)


def _greff(code: str) -> CellChoice:
    return CellChoice(lambda H, fb, K: recurrent.lstm_variant(code, H, forget_bias=fb))


#: Every cell of ``--variants``: Greff et al.'s codes (upper case) and the other cells (lower case).
CELLS: dict[str, CellChoice] = {
    **{code: _greff(code) for code in recurrent.GREFF_VARIANTS},
    "gru": CellChoice(lambda H, fb, K: shift_gate_bias(recurrent.gru(H), fb, "bias", recurrent.GRU_GATES, "update")),
    "slstm": CellChoice(
        lambda H, fb, K: shift_gate_bias(recurrent.slstm(H, num_heads=K), fb, "bias", recurrent.SLSTM_GATES, "forget"),
        takes_heads=True,
    ),
    "mlstm": CellChoice(
        lambda H, fb, K: shift_gate_bias(
            recurrent.mlstm(H, num_heads=K), fb, "gate_bias", recurrent.MLSTM_GATES, "forget"
        ),
        takes_heads=True,
    ),
    "min_gru": CellChoice(
        lambda H, fb, K: shift_gate_bias(recurrent.min_gru(H), -fb, "bias", recurrent.MIN_GRU_GATES, "update")
    ),
    "min_lstm": CellChoice(
        lambda H, fb, K: shift_gate_bias(recurrent.min_lstm(H), fb, "bias", recurrent.MIN_LSTM_GATES, "forget")
    ),
}


def variant_names(text: str) -> list[str]:
    """The :data:`CELLS` keys of a comma-separated ``--variants`` (case-insensitive)."""
    keys = {k.lower(): k for k in CELLS}
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v.lower() not in keys]
    if unknown or not names:
        raise ConfigError(
            f"unknown variant(s) {unknown}.\n  valid:    {', '.join(CELLS)}\n  fix:      e.g. --variants=V,gru,slstm"
        )
    return [keys[v.lower()] for v in names]


# --------------------------------------------------------------------------------------
# One member: model, optimiser, init, train steps, evaluation (all pure, all vmappable).


def regulariser(group: Group, hypers: Hypers, name: str) -> Any:
    """The traced rate of a regulariser in the program, or a static 0.0 that removes it."""
    return getattr(hypers, name) if name in group.regularisers else 0.0


def make_layer(group: Group, hypers: Hypers) -> recurrent.Layer:
    cells = [CELLS[group.variant].build(group.hidden, hypers.forget_bias, group.heads)]
    cells *= group.layers
    cell = cells[0] if group.layers == 1 else recurrent.stacked(cells, dropout=regulariser(group, hypers, "dropout"))
    return recurrent.rnn(cell, zoneout=regulariser(group, hypers, "zoneout"))


def make_member_optimizer(group: Group, hypers: Hypers) -> optax.GradientTransformation:
    """Clipping, then SGD with momentum (weight decay added to the gradient) or AdamW, from traced values."""
    clip = optax.clip_by_global_norm(jnp.where(hypers.clip_norm > 0, hypers.clip_norm, jnp.inf))
    if group.optimizer == "sgd":
        return optax.chain(
            clip,
            optax.add_decayed_weights(hypers.weight_decay),
            optax.sgd(hypers.learning_rate, momentum=hypers.momentum, nesterov=group.nesterov),
        )
    return optax.chain(clip, optax.adamw(hypers.learning_rate, b1=hypers.momentum, weight_decay=hypers.weight_decay))


def init_member(group: Group, hypers: Hypers, key_data: jax.Array) -> dict[str, Any]:
    """A member's training state: ``params``, ``opt_state``, ``step`` and its key (as raw key data)."""
    k_rnn, k_out, k_steps = jax.random.split(jax.random.wrap_key_data(key_data), 3)
    params = {
        "rnn": make_layer(group, hypers).init(k_rnn, (group.features,)),
        "readout": {
            "kernel": jax.nn.initializers.lecun_normal()(k_out, (group.hidden, group.features)),
            "bias": jnp.full((group.features,), -3.0, jnp.float32),  # most keys are off
        },
    }
    params = jax.tree.map(lambda p: p * hypers.init_scale if p.ndim >= 2 else p, params)
    return {
        "params": params,
        "opt_state": make_member_optimizer(group, hypers).init(params),
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(k_steps),
    }


def member_loss(group, layer, params, xs, lengths, hypers, key):
    """``(nll_sum, count)`` of next-step prediction; ``key=None`` evaluates (no noise, no dropout)."""
    inputs, targets = xs[:, :-1], xs[:, 1:]
    steps = jnp.maximum(lengths - 1, 0)
    k_rnn = None
    if key is not None:
        k_noise, k_rnn, k_out = jax.random.split(key, 3)
        if "input_noise" in group.regularisers:
            inputs = inputs + hypers.input_noise * jax.random.normal(k_noise, inputs.shape, inputs.dtype)
    _, ys = layer.apply(params["rnn"], inputs, lengths=steps, key=k_rnn)
    if key is not None and "dropout" in group.regularisers:
        keep = 1.0 - hypers.dropout
        ys = ys * jax.random.bernoulli(k_out, keep, ys.shape) / keep
    logits = ys @ params["readout"]["kernel"] + params["readout"]["bias"]
    nll = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
    mask = jnp.arange(inputs.shape[1]) < steps[:, None]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(steps).astype(jnp.float32)


def train_steps(group: Group, state, hypers: Hypers, active, xs_SBTF, lengths_SB):
    """``S`` optimiser steps of one member (``lax.scan`` over the stacked batches) -> ``(state, losses_S)``.

    Where ``active`` is False the state is returned unchanged (a member frozen by halving).
    """
    TRACES["train_steps"] += 1
    layer = make_layer(group, hypers)
    optimizer = make_member_optimizer(group, hypers)

    def step(state, batch):
        xs, lengths = batch
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

        def loss_fn(params):
            total, count = member_loss(group, layer, params, xs, lengths, hypers, key)
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = dict(state, params=optax.apply_updates(state["params"], updates), opt_state=opt_state)
        new["step"] = state["step"] + 1
        new = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return new, loss

    return lax.scan(step, state, (xs_SBTF, lengths_SB))


def evaluate_member(group: Group, params, hypers: Hypers, xs_NBTF, lengths_NB) -> jax.Array:
    """Mean NLL per predicted step over a whole split given as ``N`` fixed batches."""
    TRACES["evaluate_member"] += 1
    layer = make_layer(group, hypers)

    def one(carry, batch):
        total, count = member_loss(group, layer, params, *batch, hypers, None)
        return (carry[0] + total, carry[1] + count), None

    (total, count), _ = lax.scan(one, (jnp.zeros(()), jnp.zeros(())), (xs_NBTF, lengths_NB))
    return total / jnp.maximum(count, 1.0)


# The population versions: vmapped over the members, compiled once per group (and shape).


_init_member = jax.jit(init_member, static_argnums=0)


def population_init(group: Group, hypers: Hypers, key_data: jax.Array) -> dict[str, Any]:
    """The members' states stacked along the population axis (of ``hypers`` and ``key_data``), placed with
    their sharding.

    Each member is initialised by the one jitted ``init_member`` in turn rather than vmapped: on a CPU,
    the vmapped init runs the QR of the orthogonal initialiser (one per gate) as batched LAPACK calls,
    and jaxlib's batched QR kernel (0.10.2) splits its batch over XLA's CPU thread pool and blocks a
    pool thread until the parts are done; with as many such calls at once as the pool has threads
    (two on a 2-core machine), every pool thread waits for work that none is free to run, and the
    program hangs (see benchmarks/README.md). One member at a time has no batch to split, and has not
    hung; the init runs once per search, so it costs little.
    """
    hypers_np, keys_np = pipeline.to_host((hypers, key_data))
    states = [_init_member(group, jax.tree.map(lambda a: a[m], hypers_np), keys_np[m]) for m in range(len(keys_np))]
    stacked = jax.tree.map(lambda *leaves: np.stack(jax.device_get(leaves)), *states)
    sharding = getattr(key_data, "sharding", None)
    return pipeline.place(stacked, sharding) if isinstance(sharding, jax.sharding.NamedSharding) else stacked


population_train = jax.jit(jax.vmap(train_steps, in_axes=(None, 0, 0, 0, None, None)), static_argnums=0)
population_evaluate = jax.jit(jax.vmap(evaluate_member, in_axes=(None, 0, 0, None, None)), static_argnums=0)


# --------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Search settings; ``python -m experiments.search --help`` lists them. The ``*_range`` fields
    set the hyperparameters (constant learning rate); the pipeline fields in :attr:`unused` are
    not read, so they are left out of ``--help`` and refused on the command line."""

    unused = frozenset(
        {"learning_rate", "schedule", "warmup_steps", "final_lr_fraction", "momentum", "clip_norm", "weight_decay",
         "bucket", "buckets", "bucket_ratio", "max_buckets", "pad_multiple", "checkpoint_every", "log_every",
         "ema_decay", "progress", "sleep_per_step"}
    )  # fmt: skip
    # The curves' shapes depend on steps, so a search cannot be extended on a rerun.
    resume_safe = (pipeline.TrainConfig.resume_safe - {"steps"}) | {"stop_after", "plots"}

    data: str = field("auto", "synthetic | auto | jsb | nottingham | music21 | path to a .mat file (as music)")
    data_dir: str = field("", "folder of JSB_Chorales.mat (default: ../shared/data)")
    cache_dir: str = field("", "where the music21 chorales are cached")
    window: int = field(64, "training crops of this many input steps")
    eval_batch: int = field(32, "sequences per evaluation batch")
    sampler: str = field("random", " | ".join(SAMPLERS))
    configs: int = field(16, "configurations drawn (random, sobol, halton)")
    grid_points: int = field(3, "grid: points per ranged dimension")
    seeds: int = field(1, "members per (configuration, variant), each with its own key")
    variants: str = field(
        "V",
        f"cells, comma-separated, crossed with the draws: {', '.join(CELLS)} (mlstm refuses zoneout; "
        "NFG has no forget gate, so refuses a ranged forget_bias)",
    )
    heads: int = field(1, "heads of slstm / mlstm (must divide every hidden size)")
    hidden: str = field("log:20:200", "hidden sizes: comma-separated list, or a range lo:hi / log:lo:hi")
    hidden_buckets: int = field(3, "a hidden range is snapped to this many log-spaced sizes")
    layers: str = field("1", "depths, comma-separated")
    nesterov: bool = field(False, "Nesterov momentum (sgd)")
    learning_rate_range: str = field("log:1e-4:1e-2", "value | lo:hi | log:lo:hi | 1-log:lo:hi")
    momentum_range: str = field("0.9", "SGD momentum / Adam b1")
    weight_decay_range: str = field("0", "decoupled (AdamW) / added to the gradient (sgd)")
    clip_norm_range: str = field("1", "global gradient-norm clip (0: off)")
    forget_bias_range: str = field(
        "1",
        "added at init to the bias of the gate that keeps the state: forget gate (LSTM variants, slstm, "
        "mlstm, min_lstm, on top of their own init), update gate (gru; min_gru: subtracted)",
    )
    init_scale_range: str = field("1", "multiplies every weight matrix at init")
    dropout_range: str = field("0", "dropout before the readout and between layers")
    zoneout_range: str = field("0", "zoneout on the carry (not mlstm)")
    input_noise_range: str = field("0", "std of Gaussian input noise in training")
    halving: str = field("", "steps (multiples of eval_every) at which the worst members are frozen")
    halving_keep: float = field(0.5, "fraction of the active members kept at each halving step")
    plots: bool = field(True, "write the plots")
    stop_after: int = field(0, "testing: exit after this many steps (after the checkpoint), as if killed")


def get_config() -> Config:
    """Adam on the JSB chorales: 16 random draws of learning rate, weight decay, dropout and
    initialisation scale over three hidden sizes; about 10 minutes on a free 2-core CPU."""
    return Config(
        steps=400,
        batch_size=16,
        eval_every=50,
        workdir="runs/search",
        configs=16,
        learning_rate_range="log:1e-4:3e-2",
        weight_decay_range="log:1e-6:1e-2",
        dropout_range="0:0.5",
        init_scale_range="log:0.3:3",
        hidden="log:20:200",
        hidden_buckets=2,
        halving="200",
        progress=True,
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests (synthetic data)."""
    return dataclasses.replace(
        get_config(),
        data="synthetic",
        steps=4,
        batch_size=4,
        eval_every=2,
        window=8,
        eval_batch=4,
        configs=4,
        hidden="6",
        hidden_buckets=1,
        halving="2",
        progress=False,
    )


class Dim(NamedTuple):
    """A continuous dimension: ``kind`` is fixed | uniform | log | 1-log."""

    name: str
    kind: str
    low: float
    high: float

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, np.float64)
        if self.kind == "fixed":
            return np.full(u.shape, self.low)
        if self.kind == "uniform":
            return self.low + u * (self.high - self.low)
        value = np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low)))
        return 1.0 - value if self.kind == "1-log" else value

    def grid(self, n: int) -> np.ndarray:
        return self.from_unit(np.linspace(0.0, 1.0, n)) if self.kind != "fixed" else np.array([self.low])


def parse_range(name: str, text: str) -> Dim:
    """``"0.9"`` | ``"lo:hi"`` | ``"log:lo:hi"`` | ``"1-log:lo:hi"`` -> :class:`Dim`.

    >>> parse_range("momentum", "1-log:0.01:1")
    Dim(name='momentum', kind='1-log', low=0.01, high=1.0)
    """
    fix = f"  fix:      e.g. --{name}=0.5, --{name}=0:1, --{name}=log:1e-4:1e-2 or --{name}=1-log:0.01:1"
    parts = str(text).split(":")
    kind = "uniform"
    if parts[0] in ("log", "1-log"):
        kind, parts = parts[0], parts[1:]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{name}: cannot read the range {text!r}.\n{fix}") from None
    if len(values) == 1 and kind == "uniform":
        return Dim(name, "fixed", values[0], values[0])
    if len(values) != 2 or not values[0] <= values[1]:
        raise ConfigError(f"{name}: a range is two numbers lo <= hi; got {text!r}.\n{fix}")
    if kind != "uniform" and values[0] <= 0:
        raise ConfigError(f"{name}: a log range needs lo > 0; got {text!r}.\n{fix}")
    return Dim(name, kind, *values)


def hypers_dims(config: Config) -> list[Dim]:
    return [parse_range(f"{h}_range", getattr(config, f"{h}_range")) for h in HYPERS]


def hidden_choices(config: Config) -> tuple[Dim | None, list[int]]:
    """``(range or None, sizes)``: a range is snapped to ``hidden_buckets`` log-spaced sizes."""
    text = config.hidden
    if ":" not in text:
        try:
            sizes = [int(s) for s in text.split(",")]
        except ValueError:
            raise ConfigError(f"hidden: expected sizes like 64 or 32,64 or a range log:20:200; got {text!r}.") from None
        return None, sizes
    dim = parse_range("hidden", text)
    if dim.low < 1:
        raise ConfigError(f"hidden: sizes must be >= 1; got {text!r}.")
    lo, hi = math.log(dim.low), math.log(dim.high)
    k = config.hidden_buckets
    centres = [round(math.exp(lo + (i + 0.5) * (hi - lo) / k)) for i in range(k)]
    return dim, sorted(set(centres))


def snap_hidden(value: float, sizes: Sequence[int]) -> int:
    return min(sizes, key=lambda s: abs(math.log(s) - math.log(value)))


def check_config(config: Config) -> Config:
    if config.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {config.sampler!r}.\n  valid:    {', '.join(SAMPLERS)}")
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"the search supports --optimizer={' or '.join(OPTIMIZERS)}; got {config.optimizer!r}.")
    for name in ("window", "eval_batch", "configs", "grid_points", "seeds", "hidden_buckets", "heads"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    if config.eval_every < 1 or config.steps % config.eval_every:
        raise ConfigError(
            f"steps={config.steps} must be a multiple of eval_every={config.eval_every} (the search "
            "evaluates, halves and checkpoints every eval_every steps).\n  fix:      e.g. --eval_every=50 --steps=400"
        )
    variant_names(config.variants)
    hypers_dims(config)
    hidden_choices(config)
    try:
        layers = [int(s) for s in config.layers.split(",")]
    except ValueError:
        raise ConfigError(f"layers: expected depths like 1 or 1,2; got {config.layers!r}.") from None
    if min(layers) < 1:
        raise ConfigError(f"layers must be >= 1; got {config.layers!r}.")
    check_cells(config)
    for step in halving_steps(config):
        if step % config.eval_every or not 0 < step < config.steps:
            raise ConfigError(
                f"halving step {step} must be a multiple of eval_every={config.eval_every} below steps={config.steps}."
            )
    if not 0 < config.halving_keep <= 1:
        raise ConfigError(f"halving_keep must be in (0, 1]; got {config.halving_keep}.")
    return config


def searched_regularisers(config: Config) -> tuple[str, ...]:
    """The regularisers whose range is not fixed at 0: the ones in the programs."""
    dims = {d.name.removesuffix("_range"): d for d in hypers_dims(config)}
    return tuple(n for n in ("dropout", "zoneout", "input_noise") if dims[n] != Dim(f"{n}_range", "fixed", 0.0, 0.0))


def heads_of(variant: str, config: Config) -> int:
    return config.heads if CELLS[variant].takes_heads else 1


@functools.lru_cache(maxsize=256)
def refusal(group: Group) -> str | None:
    """The library's error message if ``group``'s program refuses its configuration (a regulariser
    the cell does not accept), else ``None``. Asked of the cell itself: one member's initialisation
    and loss are traced by ``jax.eval_shape`` on a tiny input, with traced rates as in the program;
    nothing runs or compiles."""
    hypers = Hypers(*[jax.ShapeDtypeStruct((), jnp.float32) for _ in HYPERS])
    key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)
    xs = jax.ShapeDtypeStruct((1, 3, group.features), jnp.float32)

    def loss(hypers, key_data, xs):
        params = init_member(group, hypers, key_data)["params"]
        key = jax.random.wrap_key_data(key_data)
        return member_loss(group, make_layer(group, hypers), params, xs, jnp.full((1,), 3), hypers, key)

    try:
        jax.eval_shape(loss, hypers, key_data, xs)
    except ValueError as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=64)
def ignores_forget_bias(variant: str, hidden: int, heads: int) -> bool:
    """Whether the cell's initial parameters do not depend on ``forget_bias``, asked of the cell: its
    ``init`` is traced with ``forget_bias`` as an input (``jax.make_jaxpr``, nothing runs) and the
    value is followed through the equations to the parameters."""
    build = CELLS[variant].build
    jaxpr = jax.make_jaxpr(lambda fb: build(hidden, fb, heads).init(jax.random.key(0), (2,)))(1.0).jaxpr
    reached = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(isinstance(v, jax.extend.core.Var) and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return not any(isinstance(v, jax.extend.core.Var) and v in reached for v in jaxpr.outvars)


def _indent(message: Any) -> str:
    return "\n".join("    " + line for line in str(message).splitlines())


def check_cells(config: Config) -> None:
    """Refuses, before anything compiles, what a selected cell does not take: a hidden size its heads
    do not divide, a searched regulariser it refuses, a ranged ``forget_bias`` it ignores, ``--heads``
    with no cell that takes heads."""
    names = variant_names(config.variants)
    _, sizes = hidden_choices(config)
    layers = sorted({int(s) for s in config.layers.split(",")})
    if config.heads != 1 and not any(CELLS[n].takes_heads for n in names):
        raise ConfigError(
            f"heads={config.heads} but no selected cell takes heads (--variants={config.variants}).\n"
            f"  valid:    --heads with {', '.join(n for n, c in CELLS.items() if c.takes_heads)}\n"
            "  fix:      drop --heads, or add such a cell to --variants."
        )
    regs = searched_regularisers(config)
    ranged_forget_bias = parse_range("forget_bias_range", config.forget_bias_range).kind != "fixed"
    for name in names:
        heads = heads_of(name, config)
        for size in sizes:
            try:
                CELLS[name].build(size, 1.0, heads)
            except ValueError as e:
                raise ConfigError(
                    f"variant {name!r} refuses hidden size {size} with heads={heads}. The library says:\n{_indent(e)}\n"
                    "  fix:      --heads dividing every hidden size (see --hidden, --hidden_buckets)."
                ) from None
        for depth in layers:
            group = Group(name, min(sizes), depth, 2, regularisers=regs, heads=heads)
            if not regs or refusal(group) is None:
                continue
            for reg in regs:  # name the one refused
                message = refusal(group._replace(regularisers=(reg,)))
                if message is not None:
                    raise ConfigError(
                        f"variant {name!r} refuses {reg}, but --{reg}_range={getattr(config, reg + '_range')!r} "
                        f"is not 0. The library says:\n{_indent(message)}\n"
                        f"  fix:      --{reg}_range=0, or drop {name!r} from --variants."
                    )
            raise ConfigError(
                f"variant {name!r} refuses the searched regularisers {regs} together. The library says:\n"
                f"{_indent(refusal(group))}\n"
                f"  fix:      set one of their ranges to 0, or drop {name!r} from --variants."
            )
        if ranged_forget_bias and ignores_forget_bias(name, min(sizes), heads):
            raise ConfigError(
                f"variant {name!r} has no gate that keeps the state, so it ignores forget_bias, but "
                f"--forget_bias_range={config.forget_bias_range!r} is a range: it would be searched for nothing.\n"
                f"  fix:      a fixed --forget_bias_range (recorded, no effect on {name!r}), or drop {name!r}."
            )


def halving_steps(config: Config) -> list[int]:
    try:
        return sorted(int(s) for s in config.halving.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"halving: expected steps like 100,200; got {config.halving!r}.") from None


# --------------------------------------------------------------------------------------
# Samplers.


def unit_samples(sampler: str, n: int, d: int, seed: int) -> np.ndarray:
    """``(n, d)`` points in ``[0, 1)^d``: ``random`` (NumPy), ``sobol`` or ``halton`` (scrambled, scipy).

    >>> unit_samples("sobol", 4, 2, seed=0).shape
    (4, 2)
    """
    if d == 0:
        return np.zeros((n, 0))
    if sampler == "random":
        return np.random.default_rng(seed).random((n, d))
    from scipy.stats import qmc

    engine = (qmc.Sobol if sampler == "sobol" else qmc.Halton)(d, scramble=True, rng=np.random.default_rng(seed))
    if sampler == "sobol" and n & (n - 1) == 0:
        return engine.random_base2(int(math.log2(n)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Sobol's balance warning for n not a power of two
        return engine.random(n)


def sample_members(config: Config) -> list[dict[str, Any]]:
    """Every member of the search as a dict: ``member, config, seed, variant, hidden_sampled, hidden, layers``
    and the continuous hyperparameters. Deterministic for a config."""
    check_config(config)
    dims = hypers_dims(config)
    ranged = [d for d in dims if d.kind != "fixed"]
    hidden_dim, sizes = hidden_choices(config)
    layers = [int(s) for s in config.layers.split(",")]
    variants = variant_names(config.variants)
    draws: list[dict[str, Any]] = []
    if config.sampler == "grid":
        axes = [list(d.grid(config.grid_points)) for d in ranged] + [sizes, layers]
        for point in itertools.product(*axes):
            values = dict(zip([d.name for d in ranged], point[: len(ranged)]))
            draws.append({**values, "hidden_sampled": point[-2], "layers": point[-1]})
    else:
        extra = (hidden_dim is not None or len(sizes) > 1) + (len(layers) > 1)
        U = unit_samples(config.sampler, config.configs, len(ranged) + extra, config.seed)
        for u in U:
            values = {d.name: float(d.from_unit(u[i])) for i, d in enumerate(ranged)}
            j = len(ranged)
            if hidden_dim is not None:
                h, j = float(hidden_dim.from_unit(u[j])), j + 1
            elif len(sizes) > 1:
                h, j = sizes[min(int(u[j] * len(sizes)), len(sizes) - 1)], j + 1
            else:
                h = sizes[0]
            depth = layers[min(int(u[j] * len(layers)), len(layers) - 1)] if len(layers) > 1 else layers[0]
            draws.append({**values, "hidden_sampled": h, "layers": depth})
    members = []
    for c, draw in enumerate(draws):
        for variant in variants:
            for s in range(config.seeds):
                row = {"member": len(members), "config": c, "seed": s, "variant": variant}
                row.update(hidden_sampled=draw["hidden_sampled"], hidden=snap_hidden(draw["hidden_sampled"], sizes))
                row["layers"] = draw["layers"]
                for d in dims:
                    row[d.name.removesuffix("_range")] = draw.get(d.name, d.low)
                members.append(row)
    return members


# --------------------------------------------------------------------------------------
# Data.


def synthetic_data(seed: int = 0, keys: int = 12, sizes=(24, 8, 8), length=(10, 40)) -> pipeline.Data:
    """Small piano rolls with structure: a few voices that step up or down by a random interval.

    >>> [len(split) for split in synthetic_data()]
    [24, 8, 8]
    """
    rng = np.random.default_rng(seed)

    def roll():
        T = int(rng.integers(*length))
        x = np.zeros((T, keys), np.float32)
        voices = rng.integers(0, keys, 3)
        for t in range(T):
            x[t, voices] = 1.0
            voices = (voices + rng.choice([-1, 0, 1, 2], 3)) % keys
        return x

    return pipeline.Data(*[[roll() for _ in range(n)] for n in sizes])


def load_data(config: Config) -> pipeline.Data:
    if config.data == "synthetic":
        return synthetic_data(config.seed)
    return music.load_data(music.Config(data=config.data, data_dir=config.data_dir, cache_dir=config.cache_dir))


def crop_batches(data: pipeline.Data, config: Config, data_seed: int, start: int, stop: int):
    """Training batches of steps ``[start, stop)``: ``xs (S, B, window + 1, F)`` and ``lengths (S, B)``.

    Sequence indices follow :func:`pipeline.epoch_batches`; each sequence longer than the window
    is cropped at an offset drawn from ``(data_seed, step)``, so any step's batch can be rebuilt.
    """
    train = data.train
    W = config.window + 1
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    lengths_all = [len(s) for s in train]
    xs = np.zeros((stop - start, config.batch_size, W, train[0].shape[1]), np.float32)
    lengths = np.zeros((stop - start, config.batch_size), np.int32)
    epoch_cache: dict[int, list[np.ndarray]] = {}
    for row, step in enumerate(range(start, stop)):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {epoch: pipeline.epoch_batches(lengths_all, config.batch_size, data_seed, epoch, 1)}
        rng = np.random.default_rng([data_seed, step, 1])
        for b, idx in enumerate(epoch_cache[epoch][i]):
            if idx < 0:
                continue
            seq = train[idx]
            offset = int(rng.integers(0, len(seq) - W + 1)) if len(seq) > W else 0
            piece = seq[offset : offset + W]
            xs[row, b, : len(piece)], lengths[row, b] = piece, len(piece)
    return xs, lengths


def split_batches(sequences: Sequence[np.ndarray], batch: int, T: int = 0, N: int = 0):
    """A whole split as fixed batches ``xs (N, batch, T, F)``, ``lengths (N, batch)``; by default ``T`` is the
    longest sequence rounded up to a multiple of 16 and ``N`` the fewest batches (zero-length rows fill)."""
    T = T or math.ceil(max(len(s) for s in sequences) / 16) * 16
    N = N or math.ceil(len(sequences) / batch)
    xs = np.zeros((N * batch, T, sequences[0].shape[1]), np.float32)
    lengths = np.zeros((N * batch,), np.int32)
    for i, s in enumerate(sequences):
        xs[i, : len(s)], lengths[i] = s, len(s)
    return xs.reshape(N, batch, T, -1), lengths.reshape(N, batch)


# --------------------------------------------------------------------------------------
# The search.


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
    """A 1-D ``pop`` mesh over the first ``num_devices`` devices of all processes (0: all)."""
    return jax.sharding.Mesh(np.array(pipeline.mesh_devices(num_devices)), ("pop",))


def stack_hypers(rows: Sequence[dict[str, Any]]) -> Hypers:
    return Hypers(*[np.array([r[h] for r in rows], np.float32) for h in HYPERS])


def member_keys(seed: int, members: Sequence[int]) -> np.ndarray:
    """Raw key data ``(P, 2)``: member ``m``'s key is ``fold_in(key(seed), m)``."""
    root = jax.random.key(seed)
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(root, m))) for m in members])


class GroupRun(NamedTuple):
    group: Group
    members: list[int]  # member ids (the real ones; the padded copies come after)
    hypers: Hypers  # (P_padded,)
    keys: np.ndarray  # (P_padded, 2)


def plan_groups(config: Config, members: list[dict[str, Any]], features: int, n_devices: int) -> list[GroupRun]:
    regs = searched_regularisers(config)
    by_group: dict[Group, list[dict]] = {}
    for row in members:
        v = row["variant"]
        g = Group(
            v, row["hidden"], row["layers"], features, config.optimizer, config.nesterov, regs, heads_of(v, config)
        )
        by_group.setdefault(g, []).append(row)
    runs = []
    for g, rows in by_group.items():
        padded = rows + [rows[0]] * (-len(rows) % n_devices)
        ids = [r["member"] for r in rows]
        runs.append(
            GroupRun(g, ids, stack_hypers(padded), member_keys(config.seed, ids + [ids[0]] * (len(padded) - len(ids))))
        )
    return runs


def run_search(config: Config, data: pipeline.Data | None = None, log=print) -> dict[str, Any]:
    """Trains every member; returns ``{"members": DataFrame, "curves": DataFrame, "importance": dict}``
    and writes the tables and plots to ``config.workdir``. Resumes from its checkpoints.

    With several processes (``--distributed=true``) the population spans every process's devices; every
    process returns the same results, process 0 alone logs and writes the files."""
    check_config(config)
    pipeline.prepare_workdir(config)
    data = load_data(config) if data is None else data
    members = sample_members(config)
    log = log if pipeline.primary() else (lambda *_: None)
    mesh = make_mesh(config.num_devices)
    n_dev = mesh.devices.size
    pop = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pop"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    features = data.train[0].shape[1]
    runs = plan_groups(config, members, features, n_dev)
    pipeline.write_config(dataclasses.replace(config, stop_after=0))  # a testing field, not the search's
    P = len(members)
    n_evals = config.steps // config.eval_every
    data_seed = int(np.random.default_rng(config.seed).integers(2**31 - 1))
    # validation and test share one padded shape, so the evaluation compiles once per group
    T_eval = math.ceil(max(len(s) for s in [*data.valid, *data.test]) / 16) * 16
    N_eval = math.ceil(max(len(data.valid), len(data.test)) / config.eval_batch)
    valid = pipeline.place(split_batches(data.valid, config.eval_batch, T_eval, N_eval), replicated)
    t0 = time.perf_counter()

    def active_of(run, active):
        a = np.zeros(len(run.hypers.learning_rate), bool)
        a[: len(run.members)] = active[run.members]
        return pipeline.place(a, pop)

    hypers = {r.group.name: pipeline.place(r.hypers, pop) for r in runs}
    # One group at a time (fewer executions in flight on a small CPU).
    search = {
        "groups": {
            r.group.name: jax.block_until_ready(
                population_init(r.group, hypers[r.group.name], pipeline.place(r.keys, pop))
            )
            for r in runs
        },
        "active": np.ones(P, bool),
        "stopped_at": np.full(P, config.steps, np.int32),
        "train_curve": np.full((n_evals, P), np.nan, np.float32),
        "valid_curve": np.full((n_evals, P), np.nan, np.float32),
    }
    ckpt_dir = os.path.join(config.workdir, "checkpoints")
    manager = pipeline.Checkpoints(ckpt_dir, config.keep_checkpoints)
    search, start = manager.restore_newest(search)
    search["groups"] = jax.device_put(search["groups"], pop)
    search = {k: (np.array(v) if k != "groups" else v) for k, v in search.items()}
    if start:
        log(f"resumed from {ckpt_dir}/{start}")
    log(
        f"search: {P} members in {len(runs)} group(s) ({', '.join(r.group.name for r in runs)}), "
        f"{config.steps} steps, {n_dev} device(s)"
    )
    rungs = halving_steps(config)
    for done in range(start + config.eval_every, config.steps + 1, config.eval_every):
        xs, lengths = crop_batches(data, config, data_seed, done - config.eval_every, done)
        xs, lengths = pipeline.place((xs, lengths), replicated)
        e = done // config.eval_every - 1
        for r in runs:
            name = r.group.name
            search["groups"][name], losses = population_train(
                r.group, search["groups"][name], hypers[name], active_of(r, search["active"]), xs, lengths
            )
            nll = population_evaluate(r.group, search["groups"][name]["params"], hypers[name], *valid)
            losses, nll = pipeline.to_host((losses, nll))
            k = len(r.members)
            search["train_curve"][e, r.members] = losses[:k].mean(axis=1)
            search["valid_curve"][e, r.members] = nll[:k]
        if done in rungs:
            halve(search, done, config.halving_keep)
        manager.save(done, search)
        curve = search["valid_curve"][e]
        log(
            f"step {done}: valid NLL best {np.nanmin(np.where(np.isfinite(curve), curve, np.nan)):.4f}, "
            f"{int(search['active'].sum())}/{P} active, {time.perf_counter() - t0:.1f}s"
        )
        if config.stop_after and done >= config.stop_after and done < config.steps:
            manager.close()
            log(f"stopping after step {done} (--stop_after)")
            raise SystemExit(3)
    manager.close()
    test = pipeline.place(split_batches(data.test, config.eval_batch, T_eval, N_eval), replicated)
    test_nll = np.full(P, np.nan)
    for r in runs:
        nll = population_evaluate(r.group, search["groups"][r.group.name]["params"], hypers[r.group.name], *test)
        test_nll[r.members] = pipeline.to_host(nll)[: len(r.members)]
    out = write_results(config, members, search, test_nll, log=log, write=pipeline.primary())
    pipeline.barrier("search results written")
    return out


def halve(search: dict[str, Any], step: int, keep: float) -> None:
    """Freezes the worst active members by their latest validation NLL (non-finite counts as worst)."""
    e = np.where(~np.isnan(search["valid_curve"]).all(axis=1))[0].max()
    score = np.where(np.isfinite(search["valid_curve"][e]), search["valid_curve"][e], np.inf)
    active = np.where(search["active"])[0]
    n_keep = max(1, math.ceil(keep * len(active)))
    order = active[np.argsort(score[active], kind="stable")]
    search["active"][order[n_keep:]] = False
    search["stopped_at"][order[n_keep:]] = step


# --------------------------------------------------------------------------------------
# Results: tables, plots, importance.


def write_results(config: Config, members, search, test_nll, log=print, write: bool = True) -> dict[str, Any]:
    """The members' table, the curves and the importance; written to ``config.workdir`` with ``write``."""
    import pandas as pd

    steps = [(i + 1) * config.eval_every for i in range(len(search["valid_curve"]))]
    frame = pd.DataFrame(members)
    curve = search["valid_curve"]
    final_idx = [steps.index(s) for s in search["stopped_at"]]
    frame["valid"] = [curve[i, m] for m, i in enumerate(final_idx)]
    frame["best_valid"] = [np.nanmin(np.where(np.isfinite(c), c, np.nan)) if np.isfinite(c).any() else np.nan
                           for c in curve.T]  # fmt: skip
    frame["test"] = test_nll
    frame["stopped_at"] = search["stopped_at"]
    frame["diverged"] = ~np.isfinite(frame["test"])
    curves = pd.DataFrame(
        [
            {"member": m, "step": s, "train_loss": float(search["train_curve"][i, m]), "valid_nll": float(curve[i, m])}
            for m in range(len(members))
            for i, s in enumerate(steps)
            if s <= search["stopped_at"][m]
        ]
    )
    varied = varied_columns(config, frame)
    importance = fanova_importance(frame, varied, "valid", seed=config.seed)
    if write:
        os.makedirs(config.workdir, exist_ok=True)
        path = lambda name: os.path.join(config.workdir, name)  # noqa: E731
        frame.to_csv(path("members.csv"), index=False)
        frame.to_json(path("members.jsonl"), orient="records", lines=True)
        curves.to_csv(path("curves.csv"), index=False)
        curves.to_json(path("curves.jsonl"), orient="records", lines=True)
        with open(path("importance.json"), "w") as f:
            json.dump(importance, f, indent=1)
        if config.plots:
            plot_results(config.workdir, frame, curves, varied, "valid")
    best = frame.loc[frame["valid"].idxmin()] if frame["valid"].notna().any() else None
    if best is not None:
        log(f"best member {int(best['member'])}: valid {best['valid']:.4f}, test {best['test']:.4f}")
    log("importance (fANOVA, valid NLL): " + ", ".join(f"{k} {v:.3f}" for k, v in importance.items()))
    return {"members": frame, "curves": curves, "importance": importance}


def varied_columns(config: Config, frame) -> dict[str, str]:
    """The columns that vary, with their scale: ``log``, ``1-log``, ``uniform``, ``int`` or ``categorical``."""
    out = {}
    for d in hypers_dims(config):
        name = d.name.removesuffix("_range")
        if frame[name].nunique() > 1:
            out[name] = d.kind
    if frame["hidden"].nunique() > 1:
        out["hidden"] = "log"
    if frame["layers"].nunique() > 1:
        out["layers"] = "int"
    if frame["variant"].nunique() > 1:
        out["variant"] = "categorical"
    return out


def fanova_importance(frame, varied: dict[str, str], metric: str, seed: int = 0) -> dict[str, float]:
    """Functional ANOVA importance of each varied column for ``metric`` (lower is better), by optuna.

    Each member becomes a completed optuna trial (``optuna.trial.create_trial``); non-finite
    metrics (diverged members) are set to the worst finite value.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values = frame[metric].to_numpy(float)
    if not varied or not np.isfinite(values).any() or len(frame) < 2:
        return {}
    values = np.where(np.isfinite(values), values, np.nanmax(np.where(np.isfinite(values), values, np.nan)))
    distributions: dict[str, Any] = {}
    for name, kind in varied.items():
        col = frame[name]
        if kind == "categorical":
            distributions[name] = CategoricalDistribution(sorted(col.unique().tolist()))
        elif kind == "int":
            distributions[name] = IntDistribution(int(col.min()), int(col.max()))
        elif kind == "1-log":  # momentum = 1 - u, u log-uniform: analyse u
            distributions[name] = FloatDistribution(float((1 - col).min()), float((1 - col).max()), log=True)
        else:
            distributions[name] = FloatDistribution(float(col.min()), float(col.max()), log=kind == "log")

    def param(name, kind, v):
        if kind == "categorical":
            return v
        if kind == "int":
            return int(v)
        return float(1 - v) if kind == "1-log" else float(v)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    study.add_trials(
        [
            optuna.trial.create_trial(
                params={n: param(n, k, row[n]) for n, k in varied.items()},
                distributions=distributions,
                value=float(v),
            )
            for (_, row), v in zip(frame.iterrows(), values)
        ]
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}


def _clip_limits(values: np.ndarray) -> tuple[float, float] | None:
    v = values[np.isfinite(values)]
    if not len(v):
        return None
    lo, hi = np.min(v), np.percentile(v, 95)
    pad = 0.05 * max(hi - lo, 1e-6)
    return lo - pad, hi + pad


def plot_results(workdir: str, frame, curves, varied: dict[str, str], metric: str) -> None:
    """``curves.png`` (validation NLL per member), ``hyperparameters.png`` (metric against each varied
    hyperparameter) and ``variants.png`` (box plot per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(frame["variant"].unique())
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rows in curves.groupby("member"):
        ax.plot(rows["step"], rows["valid_nll"], color=colours[frame.loc[m, "variant"]], alpha=0.5, lw=0.8)
    for v in variants:
        ax.plot([], [], color=colours[v], label=v)
    limits = _clip_limits(curves["valid_nll"].to_numpy(float))
    if limits:
        ax.set_ylim(*limits)
    ax.set(xlabel="step", ylabel="validation NLL", title="learning curves (frozen members end early)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=110)
    plt.close(fig)

    names = [n for n in varied if n != "variant"] or ["learning_rate"]
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    limits = _clip_limits(frame[metric].to_numpy(float))
    for ax, name in zip(axes.ravel(), names):
        kind = varied.get(name, "log")
        x = 1 - frame[name] if kind == "1-log" else frame[name]
        ax.scatter(x, frame[metric], s=10, c=[colours[v] for v in frame["variant"]], alpha=0.7)
        if kind in ("log", "1-log"):
            ax.set_xscale("log")
        if limits:
            ax.set_ylim(*limits)
        ax.set(xlabel=f"1 - {name}" if kind == "1-log" else name, ylabel=f"{metric} NLL")
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "hyperparameters.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(variants) + 2), 4))
    data = [frame.loc[(frame["variant"] == v) & np.isfinite(frame[metric]), metric].to_numpy() for v in variants]
    ax.boxplot(data, tick_labels=variants)
    if limits:
        ax.set_ylim(*limits)
    ax.set(ylabel=f"{metric} NLL", title="per variant (diverged members left out)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "variants.png"), dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, *, defaults: Config | None = None, prog: str = "experiments.search"):
    config = pipeline.cli_config(
        argv,
        defaults or get_config(),
        quick_config(),
        prog,
        "A population of recurrent networks (LSTM variants, gru, slstm, mlstm, min_gru, min_lstm) trained as one\n"
        "compiled program per group (see the module docstring: which hyperparameters reach which cell).",
    )
    with errors.report():
        check_config(config)
        pipeline.prepare_workdir(config)
        data = load_data(config)
        return run_search(config, data, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    main()
