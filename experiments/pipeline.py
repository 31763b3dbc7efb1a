r"""The training pipeline shared by the experiments: configs, optimisers, batches, jitted steps,
metrics, checkpoints and data parallelism.

An experiment defines a frozen dataclass that extends :class:`TrainConfig`, a :class:`Task`
(``init(key) -> params``, ``loss(params, batch, key) -> (nll_sum, count)``) and its data as
lists of arrays ``(T_i, *features)``; :func:`make_train` turns them into ``train(key)``.

- **Configs as code**: every field overridable with ``--field=value``; ``--help`` lists them;
  an unknown field is a :class:`ConfigError` naming the valid ones; the resolved config is
  written to ``<workdir>/config.json``.
- **Optimisers** (:func:`make_optimizer`): Adam (AdamW with ``weight_decay``), SGD with
  momentum, RMSProp; constant, cosine or warmup-cosine schedules; global-norm clipping.
- **Batches** (:func:`epoch_batches`, :func:`pad_batch`): padded ``(B, T, *F)`` with
  ``lengths``; ``T`` rounded up to ``pad_multiple`` so only a few shapes compile; length
  bucketing (sort within windows of ``bucket`` batches); the order of epoch ``e`` is a pure
  function of ``(data_seed, e)``, so a resumed run sees exactly the batches it would have.
  Short last batches are filled with zero-length rows, which weigh nothing.
- **Steps**: the train step (gradient, optimiser update) and the eval step are ``jax.jit``
  compiled; losses stay on the device and are fetched every ``log_every`` steps.
- **Metrics**: ``metrics.jsonl``, ``metrics.csv`` (long format: step, split, name, value) and
  TensorBoard event files under ``tb/``; a tqdm progress bar (step, loss, steps/s, ETA).
- **Checkpoints** (orbax): every ``checkpoint_every`` steps under ``checkpoints/`` (the last
  ``keep_checkpoints``) and the best by validation NLL under ``best/``. Rerunning the same
  command resumes from the latest checkpoint; the data order and the PRNG stream are functions
  of the step, so the final parameters are bit-identical to an uninterrupted run on CPU. A
  latest checkpoint that fails to restore is moved aside to ``checkpoints/corrupt-<step>``
  with a warning and the previous one is used.
- **Data parallelism**: a 1-D mesh over ``num_devices`` devices (0: all local devices), the
  batch sharded along ``data``, parameters and optimiser state replicated; XLA inserts the
  gradient all-reduce. The same command runs on CPU, GPU or TPU. Multi-host: pass
  ``--distributed=true`` on every host (with the usual ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` or a cluster that ``jax.distributed.initialize``
  detects); each process builds the same global batch order and feeds its own rows.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# --------------------------------------------------------------------------------------
# Configs.


class ConfigError(ValueError):
    """A config override names an unknown field or gives a bad value."""


class DataError(ValueError):
    """A data file is missing, malformed or empty."""


def field(default: Any, help: str) -> Any:  # noqa: A002
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The pipeline's fields; experiments extend this dataclass with their own."""

    seed: int = field(0, "key of the init, the dropout masks and the data order")
    steps: int = field(1000, "optimiser steps")
    batch_size: int = field(16, "sequences per step (divisible by the number of devices)")
    optimizer: str = field("adam", "adam | sgd | rmsprop")
    learning_rate: float = field(1e-3, "peak learning rate")
    schedule: str = field("constant", "constant | cosine | warmup_cosine")
    warmup_steps: int = field(0, "linear warm-up steps (warmup_cosine)")
    final_lr_fraction: float = field(0.1, "cosine decays to this fraction of learning_rate")
    momentum: float = field(0.9, "SGD / RMSProp momentum")
    clip_norm: float = field(1.0, "global gradient-norm clip (0: off)")
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW; added to the gradient for sgd/rmsprop)")
    bucket: int = field(8, "length bucketing: sort within windows of this many batches (1: off)")
    pad_multiple: int = field(16, "pad the time axis up to a multiple of this (fewer compiled shapes)")
    eval_every: int = field(200, "steps between validation runs (0: only at the end)")
    checkpoint_every: int = field(100, "steps between checkpoints")
    keep_checkpoints: int = field(3, "latest checkpoints kept (plus the best)")
    log_every: int = field(20, "steps between metric fetches and log lines")
    ema_decay: float = field(0.0, "evaluate an exponential moving average of the parameters (0: off)")
    num_devices: int = field(0, "devices of the data-parallel mesh (0: all local devices)")
    distributed: bool = field(False, "call jax.distributed.initialize() first (multi-host)")
    progress: bool = field(True, "show a progress bar")
    workdir: str = field("runs/run", "work directory (config, metrics, checkpoints); rerun to resume")
    sleep_per_step: float = field(0.0, "testing only: seconds to sleep after each step")


def _valid_fields(config: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(config))


def _convert(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(
        f"config field {name!r} expects a value of type {kind.__name__}.\n"
        f"  got:      {value!r}\n"
        f"  fix:      e.g. --{name}={default!r}"
    )


_CHOICES = {
    "optimizer": ("adam", "sgd", "rmsprop"),
    "schedule": ("constant", "cosine", "warmup_cosine"),
}
_POSITIVE = ("steps", "batch_size", "bucket", "pad_multiple", "checkpoint_every", "keep_checkpoints", "log_every")


def override(config: Any, **values: Any) -> Any:
    """``config`` with some fields replaced; values may be strings from the command line.

    >>> override(TrainConfig(), steps="7", optimizer="sgd").steps
    7
    """
    names = [f.name for f in dataclasses.fields(config)]
    unknown = [k for k in values if k not in names]
    if unknown:
        hints = [f"{k!r} -> did you mean {m[0]!r}?" for k in unknown if (m := difflib.get_close_matches(k, names, n=1))]
        raise ConfigError(
            f"unknown config field(s): {', '.join(map(repr, unknown))}.\n"
            + (f"  {'; '.join(hints)}\n" if hints else "")
            + f"  valid fields: {_valid_fields(config)}\n"
            + "  fix:      pass --field=value with one of the valid fields (see --help)."
        )
    new = dataclasses.replace(config, **{k: _convert(k, v, getattr(config, k)) for k, v in values.items()})
    for name, choices in _CHOICES.items():
        if getattr(new, name) not in choices:
            raise ConfigError(f"config field {name!r} must be one of {', '.join(choices)}; got {getattr(new, name)!r}.")
    for name in _POSITIVE:
        if getattr(new, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(new, name)}.")
    return new


def usage(config: Any, prog: str, description: str) -> str:
    lines = [f"usage: python -m {prog} [--quick] [--field=value ...]", "", description, ""]
    lines += [f"  {'--quick':<34} start from the shrunken smoke-test config", f"  {'--help':<34} show this message"]
    lines += ["", "config fields (default):"]
    for f in dataclasses.fields(config):
        lines.append(f"  {f'--{f.name}={getattr(config, f.name)!r}':<34} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str], config: Any, quick: Any = None) -> Any:
    """A config from ``--field=value`` (or ``--field value``) arguments; ``--quick`` starts from ``quick``."""
    args = list(argv)
    if "--quick" in args:
        if quick is None:
            raise ConfigError("this experiment has no --quick config.")
        config = quick
    args = [a for a in args if a != "--quick"]
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}.\n  fix:      pass --field=value (see --help).")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"no value for {arg!r}.\n  fix:      pass {arg}=VALUE.")
            value, i = args[i + 1], i + 1
        values[name.replace("-", "_")] = value
        i += 1
    return override(config, **values)


def choices(value: str, valid: Sequence[str], field_name: str, *, what: str = "value", example: str = "") -> list[str]:
    """The comma-separated names of a config field, each checked against ``valid``; a
    :class:`ConfigError` that lists the valid ones otherwise (also when none is given)."""
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in valid]
    if bad or not names:
        raise ConfigError(
            f"config field {field_name!r}: unknown {what}(s) {', '.join(map(repr, bad)) or '(none given)'}.\n"
            f"  valid:    {', '.join(valid)}\n  fix:      e.g. --{field_name}={example or valid[0]}"
        )
    return names


def cli_config(argv: Sequence[str] | None, config: Any, quick: Any, prog: str, description: str) -> Any:
    """``parse_args`` for a ``main``: ``--help`` prints the fields, a bad config exits with code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage(config, prog, description))
        raise SystemExit(0)
    try:
        return parse_args(argv, config, quick)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------
# Optimisers.


def make_schedule(config: TrainConfig) -> optax.Schedule:
    lr, steps = config.learning_rate, config.steps
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps, alpha=config.final_lr_fraction)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        lr,
        max(1, config.warmup_steps),
        max(steps, config.warmup_steps + 1),
        end_value=lr * config.final_lr_fraction,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clipping, then Adam/AdamW, SGD with momentum or RMSProp on the config's schedule.

    >>> opt = make_optimizer(override(TrainConfig(), optimizer="sgd", weight_decay=1e-4))
    >>> opt.init({"w": jnp.zeros(3)}) is not None
    True
    """
    schedule = make_schedule(config)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm > 0 else []
    if config.optimizer == "adam":
        if config.weight_decay > 0:
            parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
        else:
            parts.append(optax.adam(schedule))
    else:
        if config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(config.weight_decay))
        if config.optimizer == "sgd":
            parts.append(optax.sgd(schedule, momentum=config.momentum or None))
        else:
            parts.append(optax.rmsprop(schedule, momentum=config.momentum))
    return optax.chain(*parts)


# --------------------------------------------------------------------------------------
# Batches.


class Batch(NamedTuple):
    """``xs (B, T, *F)`` zero-padded and ``lengths (B,)`` int32; zero-length rows are filler."""

    xs: np.ndarray
    lengths: np.ndarray


def epoch_batches(lengths: Sequence[int], batch_size: int, data_seed: int, epoch: int, bucket: int) -> list[np.ndarray]:
    """Index arrays of one epoch's batches (``-1`` = filler), a pure function of ``(data_seed, epoch)``.

    With ``bucket > 1`` each window of ``bucket * batch_size`` shuffled examples is sorted by
    length before it is cut into batches, and the batches are shuffled again.

    >>> [b.tolist() for b in epoch_batches([5, 1, 3], 2, data_seed=0, epoch=0, bucket=1)]
    [[2, 0], [1, -1]]
    """
    rng = np.random.default_rng([data_seed, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    if bucket > 1:
        window = bucket * batch_size
        order = np.concatenate(
            [w[np.argsort(lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
        )
    n = math.ceil(len(order) / batch_size) * batch_size
    order = np.concatenate([order, -np.ones(n - len(order), dtype=order.dtype)])
    batches = order.reshape(-1, batch_size)
    if bucket > 1:
        batches = batches[rng.permutation(len(batches))]
    return list(batches)


def pad_batch(sequences: Sequence[np.ndarray], indices: np.ndarray, pad_multiple: int) -> Batch:
    """Stacks ``sequences[indices]`` (``-1``: an empty filler row) into a padded :class:`Batch`."""
    lengths = np.array([len(sequences[i]) if i >= 0 else 0 for i in indices], np.int32)
    T = max(pad_multiple, math.ceil(max(lengths.max(), 1) / pad_multiple) * pad_multiple)
    feature_shape = sequences[0].shape[1:]
    xs = np.zeros((len(indices), T, *feature_shape), np.float32)
    for row, i in enumerate(indices):
        if i >= 0:
            xs[row, : lengths[row]] = sequences[i]
    return Batch(xs, lengths)


def eval_batches(sequences: Sequence[np.ndarray], batch_size: int, pad_multiple: int) -> list[Batch]:
    """Fixed batches of a whole split, sorted by length (one pass covers every sequence once)."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    n = math.ceil(len(order) / batch_size) * batch_size
    order = np.concatenate([order, -np.ones(n - len(order), dtype=order.dtype)])
    return [pad_batch(sequences, idx, pad_multiple) for idx in order.reshape(-1, batch_size)]


# --------------------------------------------------------------------------------------
# Devices.


class Devices(NamedTuple):
    mesh: jax.sharding.Mesh
    data: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def make_devices(config: TrainConfig) -> Devices:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (0: all)."""
    devices = jax.devices()
    n = config.num_devices or len(devices)
    if n > len(devices):
        raise ConfigError(
            f"num_devices={n} but only {len(devices)} device(s) exist.\n"
            "  fix:      --num_devices=0 uses all of them (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)."
        )
    if config.batch_size % n:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {n} devices of the mesh.")
    mesh = jax.sharding.Mesh(np.array(devices[:n]), ("data",))
    P = jax.sharding.PartitionSpec
    return Devices(mesh, jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P()))


def shard_batch(batch: Batch, devices: Devices) -> Batch:
    """Places a global batch on the mesh; each process contributes its own rows."""
    if jax.process_count() == 1:
        return jax.device_put(batch, devices.data)
    p, P = jax.process_index(), jax.process_count()
    rows = len(batch.lengths) // P
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(devices.data, a[p * rows : (p + 1) * rows], a.shape), batch
    )


# --------------------------------------------------------------------------------------
# Metrics.


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard under ``tb/``."""

    def __init__(self, workdir: str, resume_step: int):
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
        self._truncate(resume_step)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _keep(row: dict, resume_step: int) -> bool:
        return row["step"] < resume_step or (row["step"] == resume_step and row["split"] != "final")

    def _truncate(self, resume_step: int) -> None:
        """Drops rows after the restored step, which the resumed run writes again."""
        if os.path.exists(self.jsonl):
            with open(self.jsonl) as f:
                rows = [line for line in f if line.strip() and self._keep(json.loads(line), resume_step)]
            with open(self.jsonl, "w") as f:
                f.writelines(rows)
        if os.path.exists(self.csv):
            with open(self.csv, newline="") as f:
                rows = [r for r in csv.reader(f)]
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerows(
                    [rows[0]] + [r for r in rows[1:] if self._keep({"step": int(r[0]), "split": r[1]}, resume_step)]
                )

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        new = not os.path.exists(self.csv)
        with open(self.csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "split", "name", "value"])
            writer.writerows([[step, split, k, v] for k, v in values.items()])
        for k, v in values.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


# --------------------------------------------------------------------------------------
# Checkpoints.


def _manager(path: str, **options: Any):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(path),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True, **options),
    )


def save_checkpoint(manager, step: int, state: Any, metrics: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    manager.wait_until_finished()


def restore_latest(path: str, target: Any, keep: int) -> tuple[Any, int, Any]:
    """``(state, step, manager)`` from the newest checkpoint that restores; ``(target, 0, manager)`` if none.

    A checkpoint that fails to restore is moved to ``corrupt-<step>`` beside it, with a warning.
    """
    import orbax.checkpoint as ocp

    manager = _manager(path, max_to_keep=keep)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(target))
            return state, step, manager
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            step_dir = os.path.join(os.path.abspath(path), str(step))
            aside = os.path.join(os.path.abspath(path), f"corrupt-{step}")
            warnings.warn(
                f"checkpoint {step_dir} could not be restored ({type(e).__name__}: {str(e)[:200]}); "
                f"moved it to {aside} and falling back to the previous checkpoint.",
                stacklevel=2,
            )
            manager.close()
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(step_dir, aside)
            manager = _manager(path, max_to_keep=keep)
    return target, 0, manager


def save_params(path: str, params: Any) -> None:
    """The parameters as an ``.npz`` keyed by pytree path (for comparisons and export)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


# --------------------------------------------------------------------------------------
# Training.


class Task(NamedTuple):
    """What an experiment gives the pipeline.

    - ``init(key) -> params``;
    - ``loss(params, batch, key) -> (nll_sum, count)``: the summed loss of a :class:`Batch`
      and the number of terms it sums (the train loss is ``nll_sum / count``); ``key`` is
      ``None`` in evaluation (regularisers off).
    """

    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, jax.Array]]


class Data(NamedTuple):
    train: Sequence[np.ndarray]
    valid: Sequence[np.ndarray]
    test: Sequence[np.ndarray]


def write_config(config: Any) -> None:
    """Writes ``config.json``; a different earlier config is kept as ``config.<time>.json``."""
    os.makedirs(config.workdir, exist_ok=True)
    path = os.path.join(config.workdir, "config.json")
    text = json.dumps(dataclasses.asdict(config), indent=1, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            kept = os.path.join(config.workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json")
            os.rename(path, kept)
            warnings.warn(f"{path} held a different config; kept it as {kept}.", stacklevel=2)
    with open(path, "w") as f:
        f.write(text)


def make_steps(task: Task, optimizer: optax.GradientTransformation, ema_decay: float = 0.0):
    """The jitted ``train_step(state, batch) -> (state, loss)`` and ``eval_step(params, batch) -> (sum, count)``."""

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

        def loss_fn(params):
            total, count = task.loss(params, batch, key)
            return total / jnp.maximum(count, 1), count

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(state, params=params, opt_state=opt_state)
        if "ema" in state:  # Polyak averaging of the iterates
            new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], params)
        new["step"] = state["step"] + 1
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_step(params, batch):
        return task.loss(params, batch, None)

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step, params, batches: Sequence[Batch], devices: Devices) -> float:
    """Mean loss per term over a split: summed on the device, one fetch at the end."""
    total, count = 0.0, 0.0
    for batch in batches:
        t, c = eval_step(params, shard_batch(batch, devices))
        total, count = total + t, count + c
    return float(total) / max(float(count), 1.0)


def make_train(config: TrainConfig, task: Task, data: Data) -> Callable[[jax.Array], dict[str, Any]]:
    """``train(key) -> {"params", "valid", "test", "best_valid", "steps_per_s", "ms_per_step", ...}``: the whole run.

    ``ms_per_step`` is the wall time per train step alone: without the steps that compile (the first
    of each batch shape, ``compiled_shapes`` of them, ``compile_s`` seconds in all), evaluations and
    checkpoints.

    Resumes from ``config.workdir`` when it holds checkpoints. ``key`` seeds the init, the
    per-step PRNG keys (``fold_in(key, step)``) and the data order.
    """
    optimizer = make_optimizer(config)
    devices = make_devices(config)
    train_step, eval_step = make_steps(task, optimizer, config.ema_decay)

    def eval_params(state):
        if not config.ema_decay:
            return state["params"]
        # The average starts at zero; dividing by 1 - decay^step removes that bias (as Adam's moments).
        scale = 1.0 / (1.0 - config.ema_decay ** jnp.maximum(state["step"], 1).astype(jnp.float32))
        return jax.tree.map(lambda e: e * scale, state["ema"])

    valid_batches = eval_batches(data.valid, config.batch_size, config.pad_multiple)
    test_batches = eval_batches(data.test, config.batch_size, config.pad_multiple)
    train_lengths = [len(s) for s in data.train]
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)

    def train(key: jax.Array) -> dict[str, Any]:
        write_config(config)
        init_key, step_key, data_key = jax.random.split(key, 3)
        data_seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
        # Strong dtypes: a weakly typed leaf (e.g. jnp.full(n, -3.0)) would turn strong after one
        # update and compile the train step a second time.
        params = jax.tree.map(lambda p: jnp.asarray(p, dtype=p.dtype), task.init(init_key))
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
            "key": jax.random.key_data(step_key),
        }
        if config.ema_decay:
            state["ema"] = jax.tree.map(jnp.zeros_like, params)
        state = jax.device_put(state, devices.replicated)
        ckpt_dir = os.path.join(config.workdir, "checkpoints")
        state, start, latest = restore_latest(ckpt_dir, state, config.keep_checkpoints)
        state = jax.device_put(state, devices.replicated)
        best = _manager(
            os.path.join(config.workdir, "best"), max_to_keep=1, best_fn=lambda m: m["valid"], best_mode="min"
        )
        if start:
            print(f"resumed from {ckpt_dir}/{start}", flush=True)
        writer = MetricsWriter(config.workdir, start)
        bar = None
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        epoch_cache: dict[int, list[np.ndarray]] = {}
        pending: list[dict] = []
        t_start, s_start = time.perf_counter(), start
        # Wall time of the train steps alone: steps that compile (each new batch shape) are timed
        # apart, evaluations and checkpoints not at all.
        step_seconds, compile_seconds, shapes, t_mark = 0.0, 0.0, set(), time.perf_counter()

        def lap() -> float:
            nonlocal t_mark
            jax.block_until_ready(state)
            now = time.perf_counter()
            seconds, t_mark = now - t_mark, now
            return seconds

        def batch_at(step: int) -> Batch:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(train_lengths, config.batch_size, data_seed, epoch, config.bucket)
            return pad_batch(data.train, epoch_cache[epoch][i], config.pad_multiple)

        for step in range(start, config.steps):
            batch = batch_at(step)
            compiles = batch.xs.shape not in shapes
            if compiles:
                shapes.add(batch.xs.shape)
                step_seconds += lap()
            state, metrics = train_step(state, shard_batch(batch, devices))
            pending.append(metrics)
            done = step + 1
            if compiles:
                compile_seconds += lap()
            if config.sleep_per_step:
                time.sleep(config.sleep_per_step)
            if done % config.log_every == 0 or done == config.steps:
                fetched = jax.device_get(pending)
                pending = []
                loss = float(np.mean([m["loss"] for m in fetched]))
                rate = (done - s_start) / (time.perf_counter() - t_start)
                writer.write(
                    done, "train", {"loss": loss, "grad_norm": float(fetched[-1]["grad_norm"]), "steps_per_s": rate}
                )
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    bar.update(done - bar.n)
            evaluating = (config.eval_every and done % config.eval_every == 0) or done == config.steps
            if evaluating or done % config.checkpoint_every == 0:
                step_seconds += lap()
            if evaluating:
                valid = evaluate(eval_step, eval_params(state), valid_batches, devices)
                writer.write(done, "valid", {"nll": valid})
                save_checkpoint(best, done, state, {"valid": valid})
                if bar is not None:
                    bar.write(f"step {done}: valid {valid:.4f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(latest, done, state)
            if evaluating or done % config.checkpoint_every == 0:
                lap()
        if bar is not None:
            bar.close()
        timed_steps = config.steps - start - len(shapes)
        ms_per_step = step_seconds / timed_steps * 1e3 if timed_steps > 0 else float("nan")
        timing = {"compile_s": compile_seconds, "compiled_shapes": len(shapes), "ms_per_step": ms_per_step}
        result_path = os.path.join(config.workdir, "result.json")
        if start == config.steps and os.path.exists(result_path):  # nothing ran now: keep the earlier timing
            with open(result_path) as f:
                earlier = json.load(f)
            timing = {k: earlier.get(k, float("nan")) for k in timing}
        steps_per_s = (config.steps - s_start) / max(time.perf_counter() - t_start, 1e-9)
        valid = evaluate(eval_step, eval_params(state), valid_batches, devices)
        test = evaluate(eval_step, eval_params(state), test_batches, devices)
        result = {"step": config.steps, "valid": valid, "test": test, **timing}
        best_step = best.best_step()
        if best_step is not None:
            import orbax.checkpoint as ocp

            best_state = best.restore(best_step, args=ocp.args.StandardRestore(state))
            result.update(
                best_step=best_step,
                best_valid=evaluate(eval_step, eval_params(best_state), valid_batches, devices),
                best_test=evaluate(eval_step, eval_params(best_state), test_batches, devices),
            )
        writer.write(config.steps, "final", result)
        writer.close()
        latest.close()
        best.close()
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        params = jax.device_get(eval_params(state))
        save_params(os.path.join(config.workdir, "final_params.npz"), params)
        return {**result, "params": params, "steps_per_s": steps_per_s}

    return train
