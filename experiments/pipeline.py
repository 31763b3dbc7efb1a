r"""The training pipeline shared by the experiments: configs, optimisers, batches, jitted steps,
metrics, checkpoints and data parallelism.

An experiment defines a frozen dataclass that extends :class:`TrainConfig`, a :class:`Task`
(``init(key) -> params``, ``loss(params, batch, key) -> (nll_sum, count)``) and its data as
lists of arrays ``(T_i, *features)``; :func:`make_train` turns them into ``train(key)``.

- **Configs as code**: every field overridable with ``--field=value``; ``--help`` lists them;
  an unknown field or an impossible value is a :class:`ConfigError` naming the valid ones;
  the resolved config is written to ``<workdir>/config.json``.
- **Optimisers** (:func:`make_optimizer`): Adam (AdamW with ``weight_decay``), SGD with
  momentum, RMSProp; constant, cosine or warmup-cosine schedules; global-norm clipping.
- **Batches** (:func:`epoch_batches`, :func:`pad_batch`): padded ``(B, T, *F)`` with
  ``lengths``. ``buckets="multiple"``: ``T`` rounded up to ``pad_multiple``, one compiled shape
  per multiple, with length bucketing (sort within windows of ``bucket`` batches);
  ``buckets="geometric"``: ``T`` one of at most ``max_buckets`` lengths of a ladder growing by
  ``bucket_ratio`` (:func:`geometric_buckets`), each epoch's rows grouped by them, so that any
  length distribution compiles a few shapes; ``padded_per_frame`` in the result is the cost.
  The order of epoch ``e`` is a pure function of ``(data_seed, e)``, so a resumed run sees
  exactly the batches it would have. Short last batches are filled with zero-length rows,
  which weigh nothing.
- **Steps**: the train step (gradient, optimiser update) and the eval step are ``jax.jit``
  compiled; losses stay on the device and are fetched every ``log_every`` steps.
- **Metrics**: ``metrics.jsonl``, ``metrics.csv`` (long format: step, split, name, value) and
  TensorBoard event files under ``tb/``; a tqdm progress bar (step, loss, steps/s, ETA).
- **Checkpoints** (orbax): every ``checkpoint_every`` steps under ``checkpoints/`` (the last
  ``keep_checkpoints``) and the best by validation NLL under ``best/``. Rerunning the same
  command resumes from the newest checkpoint that restores; the data order and the PRNG stream
  are functions of the step, so the final parameters are bit-identical to an uninterrupted run
  on CPU. A changed config in a used work directory is refused, damaged checkpoints are set
  aside, a full or read-only disk is one clear error: :mod:`experiments.workdir`.
- **Divergence**: a non-finite loss, gradient or parameter stops the run (:class:`Diverged`,
  naming the step) before anything after it is saved.
- **Data parallelism**: a 1-D mesh over ``num_devices`` devices (0: all devices), the
  batch sharded along ``data``, parameters and optimiser state replicated; XLA inserts the
  gradient all-reduce. The same command runs on CPU, GPU or TPU.
- **Several processes** (one per host, or several on one machine): start the same command in
  each with ``--distributed=true`` and ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or on a cluster that ``jax.distributed.initialize``
  detects (:func:`initialize_distributed`). The mesh spans every process's devices; each process
  computes the same batch order and places only the rows of its own devices
  (:func:`shard_batch`); process 0 alone prints the log and writes ``config.json``, the metrics,
  ``result.json`` and ``final_params.npz``; all processes save and restore the orbax checkpoints
  together, so ``--workdir`` must be one shared folder. A killed process stops the others (or
  leaves them waiting: stop them); rerunning every command resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import workdir as run_dir
from experiments.errors import ConfigError as ConfigError
from experiments.errors import ConfigMismatch as ConfigMismatch
from experiments.errors import DataError as DataError
from experiments.errors import Diverged as Diverged
from experiments.errors import StorageError as StorageError

# --------------------------------------------------------------------------------------
# Configs.


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
    bucket: int = field(8, "--buckets=multiple: sort by length within windows of this many batches (1: off)")
    pad_multiple: int = field(16, "pad the time axis up to a multiple of this (fewer compiled shapes)")
    buckets: str = field(
        "multiple",
        "padded lengths: multiple (every multiple of --pad_multiple: one compiled shape each, many on long pieces) "
        "| geometric (at most --max_buckets lengths from a ladder growing by --bucket_ratio; each epoch's rows "
        "grouped by them)",
    )
    bucket_ratio: float = field(1.1, "--buckets=geometric: ratio of the ladder's neighbouring lengths (> 1)")
    max_buckets: int = field(8, "--buckets=geometric: at most this many padded lengths (compiled shapes)")
    eval_every: int = field(200, "steps between validation runs (0: only at the end)")
    checkpoint_every: int = field(100, "steps between checkpoints")
    keep_checkpoints: int = field(3, "latest checkpoints kept (plus the best)")
    log_every: int = field(20, "steps between metric fetches and log lines")
    ema_decay: float = field(0.0, "evaluate an exponential moving average of the parameters (0: off)")
    num_devices: int = field(0, "devices of the data-parallel mesh (0: all local devices)")
    distributed: bool = field(
        False,
        "several processes (hosts): start the command in each, with JAX_COORDINATOR_ADDRESS=HOST:PORT of process 0, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID (or on a SLURM / Cloud TPU cluster); see experiments/README.md",
    )
    progress: bool = field(True, "show a progress bar")
    workdir: str = field("runs/run", "work directory (config, metrics, checkpoints); rerun to resume")
    overwrite: bool = field(False, "delete the run already in --workdir (its checkpoints, metrics, results) first")
    sleep_per_step: float = field(0.0, "testing only: seconds to sleep after each step")

    #: Fields that may differ when a run is resumed, because they cannot change its result
    #: (``steps`` only under a constant learning rate: :meth:`steps_resume_safe`). Any other
    #: difference from the config recorded in the work directory is refused (``ConfigMismatch``).
    #: An experiment's config overrides this (and ``unused``) without an annotation, e.g.
    #: ``resume_safe = TrainConfig.resume_safe | {"plots"}``: under ``from __future__ import
    #: annotations`` a ``ClassVar[...]`` is a string that ``dataclasses`` resolves in the module
    #: ``sys.modules`` names as the class's, which under ``python -m cProfile -m ...`` is not the
    #: script, and the set would become a field.
    resume_safe: ClassVar[frozenset[str]] = frozenset(
        {"steps", "log_every", "progress", "checkpoint_every", "keep_checkpoints", "num_devices", "distributed",
         "workdir", "overwrite", "sleep_per_step"}
    )  # fmt: skip
    #: Fields of the pipeline that this experiment does not read: left out of ``--help``, refused
    #: on the command line.
    unused: ClassVar[frozenset[str]] = frozenset()

    def steps_resume_safe(self, recorded: dict[str, Any]) -> bool:
        """Whether ``steps`` may change on a rerun: only if the learning rate does not depend on it."""
        return self.schedule == "constant" and recorded.get("schedule", "constant") == "constant"


def _valid_fields(config: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(config) if f.name not in config.unused)


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
    "buckets": ("multiple", "geometric"),
    "schedule": ("constant", "cosine", "warmup_cosine"),
}
_POSITIVE = ("steps", "batch_size", "bucket", "pad_multiple", "max_buckets", "checkpoint_every", "keep_checkpoints",
             "log_every")  # fmt: skip
_NON_NEGATIVE = ("warmup_steps", "eval_every", "num_devices", "clip_norm", "weight_decay", "sleep_per_step")
_FRACTIONS = ("momentum", "ema_decay", "final_lr_fraction")  # in [0, 1)  (final_lr_fraction: [0, 1])


def check_values(config: Any) -> None:
    """Rejects values no run can use (before anything compiles): non-finite numbers, a learning
    rate that is not positive, negative counts, fractions outside [0, 1)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"config field {f.name!r} must be a finite number; got {value!r}.\n"
                f"  fix:      e.g. --{f.name}={f.default!r}"
            )
    if config.learning_rate <= 0:
        raise ConfigError(
            f"config field 'learning_rate' must be > 0; got {config.learning_rate!r}.\n"
            "  fix:      e.g. --learning_rate=1e-3 (a negative rate ascends the loss)."
        )
    if config.bucket_ratio <= 1:
        raise ConfigError(
            f"config field 'bucket_ratio' must be > 1; got {config.bucket_ratio!r}.\n"
            "  fix:      e.g. --bucket_ratio=1.1 (each padded length a tenth longer than the one below)."
        )
    for name in _POSITIVE:
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ConfigError(f"config field {name!r} must be >= 0; got {getattr(config, name)}.")
    for name in _FRACTIONS:
        value, top = getattr(config, name), 1.0
        if not (0 <= value < top or (name == "final_lr_fraction" and value == top)):
            raise ConfigError(f"config field {name!r} must be in [0, 1); got {value}.")


def override(config: Any, **values: Any) -> Any:
    """``config`` with some fields replaced; values may be strings from the command line.

    >>> override(TrainConfig(), steps="7", optimizer="sgd").steps
    7
    """
    names = [f.name for f in dataclasses.fields(config)]
    unused = [k for k in values if k in config.unused]
    if unused:
        raise ConfigError(
            f"this experiment does not use the config field(s) {', '.join(map(repr, unused))}.\n"
            f"  fix:      leave them out; see --help for the fields it reads"
            + (f" (e.g. --{unused[0]}_range)." if f"{unused[0]}_range" in names else ".")
        )
    names = [n for n in names if n not in config.unused]
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
    check_values(new)
    return new


def usage(config: Any, prog: str, description: str) -> str:
    lines = [f"usage: python -m {prog} [--quick] [--field=value ...]", "", description, ""]
    lines += [f"  {'--quick':<34} start from the shrunken smoke-test config", f"  {'--help':<34} show this message"]
    lines += ["", "config fields (default):"]
    for f in dataclasses.fields(config):
        if f.name in config.unused:
            continue
        lines.append(f"  {f'--{f.name}={getattr(config, f.name)!r}':<34} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str], config: Any, quick: Any = None) -> Any:
    """A config from ``--field=value`` (or ``--field value``) arguments; ``--quick`` starts from ``quick``."""
    args = list(argv)
    if "--quick" in args:
        if quick is None:
            raise ConfigError("this experiment has no --quick config.")
        # the smoke-test run writes to a work directory of its own, never into the full run's
        same = quick.workdir == config.workdir
        config = dataclasses.replace(quick, workdir=f"{quick.workdir}_quick") if same else quick
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
    """``parse_args`` for a ``main``: ``--help`` prints the fields, a bad config exits with code 2.

    With ``--distributed=true`` it then starts the multi-process runtime (:func:`initialize_distributed`),
    before the ``main`` touches a device; a bad or missing variable also exits with code 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage(config, prog, description))
        raise SystemExit(0)
    try:
        config = parse_args(argv, config, quick)
        if getattr(config, "distributed", False):
            initialize_distributed()
        return config
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------
# Several processes.

#: The variables :func:`initialize_distributed` reads (``JAX_LOCAL_DEVICE_IDS`` is optional).
DISTRIBUTED_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_DISTRIBUTED_EXAMPLE = (
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 (1 in the second process)"
)


def _distributed_error(expected: str, got: str, fix: str = "") -> ConfigError:
    fix = fix or f"set all three in every process, e.g. {_DISTRIBUTED_EXAMPLE}"
    return ConfigError(
        f"--distributed=true: bad multi-process variables.\n  expected: {expected}\n  got:      {got}\n"
        f"  fix:      {fix}; on a SLURM / Cloud TPU cluster set none of them (it is detected); for one process "
        "drop --distributed=true."
    )


def distributed_arguments(environ: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``jax.distributed.initialize`` from :data:`DISTRIBUTED_VARIABLES` (and
    ``JAX_LOCAL_DEVICE_IDS``) in ``environ``: all three, or none (``{}``: the cluster is detected).
    A bad or partial set is a :class:`ConfigError` naming what was expected, what was found and the fix.

    >>> distributed_arguments({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
    ...                        "JAX_PROCESS_ID": "1"})
    {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    """
    given = {name: environ[name].strip() for name in DISTRIBUTED_VARIABLES if environ.get(name, "").strip()}
    if not given:
        return {}
    missing = [name for name in DISTRIBUTED_VARIABLES if name not in given]
    if missing:
        got = ", ".join(f"{k}={v}" for k, v in given.items())
        raise _distributed_error(f"all of {', '.join(DISTRIBUTED_VARIABLES)}", f"{got} ({', '.join(missing)} unset)")
    address = given["JAX_COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _distributed_error(
            "JAX_COORDINATOR_ADDRESS=HOST:PORT of process 0 (a port in 1..65535)",
            f"JAX_COORDINATOR_ADDRESS={address}",
        )
    numbers = {}
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        try:
            numbers[name] = int(given[name])
        except ValueError:
            raise _distributed_error(f"{name} an integer", f"{name}={given[name]}") from None
    n, i = numbers["JAX_NUM_PROCESSES"], numbers["JAX_PROCESS_ID"]
    if n < 1 or not 0 <= i < n:
        raise _distributed_error(
            "JAX_NUM_PROCESSES >= 1 and JAX_PROCESS_ID in 0..JAX_NUM_PROCESSES-1",
            f"JAX_NUM_PROCESSES={n}, JAX_PROCESS_ID={i}",
        )
    kwargs: dict[str, Any] = {"coordinator_address": address, "num_processes": n, "process_id": i}
    ids = environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if ids:
        try:
            kwargs["local_device_ids"] = [int(d) for d in ids.split(",")]
        except ValueError:
            raise _distributed_error(
                "JAX_LOCAL_DEVICE_IDS as comma-separated device numbers",
                f"JAX_LOCAL_DEVICE_IDS={ids}",
                "e.g. JAX_LOCAL_DEVICE_IDS=0,1 (or leave it unset: all local devices)",
            ) from None
    return kwargs


def initialize_distributed(environ: Mapping[str, str] | None = None) -> None:
    """Starts JAX's multi-process runtime; every process of a run calls it before touching a device.

    With ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` set (:func:`distributed_arguments`), passes them to
    ``jax.distributed.initialize``; with none of them set, calls it without arguments, so that it
    detects the cluster (SLURM, Open MPI, Cloud TPU). On CPU the processes' collectives run over
    gloo. A second call in the same process does nothing. Prints one line: which process this is.
    A bad variable, or a runtime that does not start, is a :class:`ConfigError`.
    """
    kwargs = distributed_arguments(os.environ if environ is None else environ)
    if jax.distributed.is_initialized():
        return
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # arrays that span processes on CPU
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # jaxlib's runtime errors subclass RuntimeError
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "none of the variables set, no cluster detected"
        raise ConfigError(
            "--distributed=true: the multi-process runtime did not start.\n"
            f"  expected: {', '.join(DISTRIBUTED_VARIABLES)} (or a cluster that jax detects), every process started "
            "within the time-out, in a process that has not yet touched a device\n"
            f"  got:      {given}; jax says {type(e).__name__}: {' '.join(str(e).split())[:300]}\n"
            f"  fix:      set the three in every process, e.g. {_DISTRIBUTED_EXAMPLE}, with the address of process 0 "
            "reachable from all and its port free; for one process drop --distributed=true."
        ) from None
    print(
        f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local device(s), "
        f"{jax.device_count()} in all",
        flush=True,
    )


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


def geometric_buckets(
    lengths: Sequence[int], pad_multiple: int, ratio: float, max_buckets: int, longest: int = 0
) -> np.ndarray:
    """The padded lengths of ``--buckets=geometric``: at most ``max_buckets`` rungs of a geometric ladder.

    The ladder starts at the shortest length rounded up to ``pad_multiple``; each rung is ``ratio`` times the one
    below rounded up to ``pad_multiple`` (at least one ``pad_multiple`` more), and the last is the longest length
    (or ``longest``, e.g. of the evaluation splits, if that is longer) rounded up. Only the top rung and the rungs
    that some sequence pads to are kept; while more than ``max_buckets`` remain, they are merged into the
    ``max_buckets`` that pad the fewest frames of ``lengths`` (an exact dynamic programme over the rungs). So any
    length distribution compiles at most ``max_buckets`` shapes, and when no merge is needed every sequence of
    length ``n`` pads to less than ``ratio * n + pad_multiple``.

    >>> geometric_buckets([40, 255, 256, 300, 1788], 16, ratio=1.25, max_buckets=8).tolist()
    [48, 304, 1792]
    >>> geometric_buckets(range(1, 5001), 16, ratio=1.25, max_buckets=3).tolist()
    [1888, 3712, 5008]
    """
    n = np.asarray(lengths, np.int64)
    if n.size == 0:
        raise DataError("geometric buckets of no sequences.\n  fix:      give every split at least one sequence.")
    up = lambda x: max(pad_multiple, math.ceil(x / pad_multiple) * pad_multiple)  # noqa: E731
    ladder, top = [up(n.min())], up(max(n.max(), longest))
    while ladder[-1] < top:
        ladder.append(min(top, max(ladder[-1] + pad_multiple, up(ladder[-1] * ratio))))
    ladder = np.array(ladder)
    rung = np.searchsorted(ladder, n)  # the rung each sequence pads to
    count = np.bincount(rung, minlength=len(ladder))
    keep = (count > 0) | (ladder == top)
    rungs, count = ladder[keep], count[keep]
    if len(rungs) <= max_buckets:
        return rungs
    # cost[k, j]: fewest padded frames of the sequences of rungs[:j] in k buckets, the top one rungs[j - 1];
    # every sequence of a bucket pads to its top, so only the counts matter.
    below = np.concatenate([[0], np.cumsum(count)])
    cost = np.full((max_buckets + 1, len(rungs) + 1), np.inf)
    cost[0, 0] = 0.0
    previous = np.zeros_like(cost, dtype=np.int64)
    for k in range(1, max_buckets + 1):
        for j in range(1, len(rungs) + 1):
            options = cost[k - 1, :j] + (below[j] - below[:j]) * float(rungs[j - 1])
            previous[k, j] = np.argmin(options)
            cost[k, j] = options[previous[k, j]]
    chosen, j = [], len(rungs)
    for k in range(max_buckets, 0, -1):
        if j == 0:
            break
        chosen.append(int(rungs[j - 1]))
        j = int(previous[k, j])
    return np.array(chosen[::-1])


def padded_length(n: int, pad_multiple: int, buckets: np.ndarray | None = None) -> int:
    """The padded time axis of a batch whose longest sequence has ``n`` steps: the next multiple of
    ``pad_multiple`` (at least one), or with ``buckets`` (:func:`geometric_buckets`) the smallest that holds it."""
    if buckets is None:
        return max(pad_multiple, math.ceil(max(n, 1) / pad_multiple) * pad_multiple)
    i = int(np.searchsorted(buckets, n))
    if i == len(buckets):
        raise DataError(
            f"a sequence of {n} steps is longer than the longest padded length.\n"
            f"  expected: at most {int(buckets[-1])} steps (the buckets {np.asarray(buckets).tolist()})\n"
            "  fix:      build the buckets from the lengths of every split (geometric_buckets)."
        )
    return int(buckets[i])


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    data_seed: int,
    epoch: int,
    bucket: int,
    buckets: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Index arrays of one epoch's batches (``-1`` = filler), a pure function of ``(data_seed, epoch)``.

    With ``bucket > 1`` each window of ``bucket * batch_size`` shuffled examples is sorted by
    length before it is cut into batches, and the batches are shuffled again. With ``buckets``
    (the padded lengths of :func:`geometric_buckets`) the shuffled examples of the whole epoch are
    grouped by the bucket they pad to instead (in random order within a bucket) before the cut, so
    every batch but those that straddle two buckets holds one bucket; ``bucket`` is not used.
    Either way each example appears once and all batches but the last are full.

    >>> [b.tolist() for b in epoch_batches([5, 1, 3], 2, data_seed=0, epoch=0, bucket=1)]
    [[2, 0], [1, -1]]
    """
    rng = np.random.default_rng([data_seed, epoch])
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    if buckets is not None:
        order = order[np.argsort(np.searchsorted(buckets, lengths[order]), kind="stable")]
    elif bucket > 1:
        window = bucket * batch_size
        order = np.concatenate(
            [w[np.argsort(lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
        )
    n = math.ceil(len(order) / batch_size) * batch_size
    order = np.concatenate([order, -np.ones(n - len(order), dtype=order.dtype)])
    batches = order.reshape(-1, batch_size)
    if bucket > 1 or buckets is not None:
        batches = batches[rng.permutation(len(batches))]
    return list(batches)


def pad_batch(
    sequences: Sequence[np.ndarray], indices: np.ndarray, pad_multiple: int, buckets: np.ndarray | None = None
) -> Batch:
    """Stacks ``sequences[indices]`` (``-1``: an empty filler row) into a padded :class:`Batch`
    (time axis: :func:`padded_length`)."""
    lengths = np.array([len(sequences[i]) if i >= 0 else 0 for i in indices], np.int32)
    T = padded_length(int(lengths.max()), pad_multiple, buckets)
    feature_shape = sequences[0].shape[1:]
    xs = np.zeros((len(indices), T, *feature_shape), np.float32)
    for row, i in enumerate(indices):
        if i >= 0:
            xs[row, : lengths[row]] = sequences[i]
    return Batch(xs, lengths)


def eval_batches(
    sequences: Sequence[np.ndarray], batch_size: int, pad_multiple: int, buckets: np.ndarray | None = None
) -> list[Batch]:
    """Fixed batches of a whole split, sorted by length (one pass covers every sequence once)."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    n = math.ceil(len(order) / batch_size) * batch_size
    order = np.concatenate([order, -np.ones(n - len(order), dtype=order.dtype)])
    return [pad_batch(sequences, idx, pad_multiple, buckets) for idx in order.reshape(-1, batch_size)]


def padding_buckets(config: Any, data: Data) -> np.ndarray | None:
    """The padded lengths of ``config.buckets``: None for ``multiple``; for ``geometric`` the
    :func:`geometric_buckets` that pad the training sequences least and hold the longest sequence of every
    split, so that training and evaluation share the same at most ``max_buckets`` shapes."""
    if getattr(config, "buckets", "multiple") != "geometric":
        return None
    longest = max(len(s) for split in data for s in split)
    lengths = [len(s) for s in data.train]
    return geometric_buckets(lengths, config.pad_multiple, config.bucket_ratio, config.max_buckets, longest)


# --------------------------------------------------------------------------------------
# Devices.


class Devices(NamedTuple):
    mesh: jax.sharding.Mesh
    data: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding


def mesh_devices(num_devices: int) -> list:
    """The first ``num_devices`` devices of all processes (0: all); every process must own one of them."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ConfigError(
            f"num_devices={n} but only {len(devices)} device(s) exist.\n"
            "  fix:      --num_devices=0 uses all of them (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)."
        )
    idle = sorted(set(range(jax.process_count())) - {d.process_index for d in devices[:n]})
    if idle:
        raise ConfigError(
            f"num_devices={n} leaves process(es) {', '.join(map(str, idle))} without a device of the mesh.\n"
            f"  expected: a mesh over devices of every one of the {jax.process_count()} processes\n"
            f"  fix:      --num_devices=0 (all {len(devices)} devices), or start fewer processes."
        )
    return devices[:n]


def make_devices(config: TrainConfig) -> Devices:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices of all processes (0: all)."""
    devices = mesh_devices(config.num_devices)
    n = len(devices)
    if config.batch_size % n:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {n} devices of the mesh.")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    P = jax.sharding.PartitionSpec
    return Devices(mesh, jax.sharding.NamedSharding(mesh, P("data")), jax.sharding.NamedSharding(mesh, P()))


def shard_batch(batch: Batch, devices: Devices) -> Batch:
    """Places a global batch on the mesh (every process holds the same one): see :func:`place`."""
    return place(batch, devices.data)


def place(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host arrays that every process holds in full, as global arrays with ``sharding``: each process
    puts only the pieces of its own devices (no check that the processes agree, no communication)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda i: np.asarray(a)[i]), tree)


def to_host(tree: Any) -> Any:
    """Global arrays as NumPy arrays in every process (gathered across processes when they span several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# --------------------------------------------------------------------------------------
# Metrics.


def _tensorboardx_writer():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports ``torch``
    whenever it is installed, only to accept torch tensors (1.6 s of every run's start on 2 CPU cores;
    the writer here is given Python floats). Where the process has already imported PyTorch, it is
    left as it is."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError inside tensorboardX's import
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard under ``tb/``.

    On a resume the rows after the restored step are dropped (the resumed run writes them
    again), and so is a row cut short by a kill or a full disk, with a warning; the files are
    rewritten atomically, so a failure while doing so leaves them as they were.
    """

    def __init__(self, workdir: str, resume_step: int):
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
        self._truncate(resume_step)
        SummaryWriter = _tensorboardx_writer()
        with run_dir.writing("TensorBoard events", os.path.join(workdir, "tb")):
            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    @staticmethod
    def _keep(row: dict, resume_step: int) -> bool:
        return row["step"] < resume_step or (row["step"] == resume_step and row["split"] != "final")

    @staticmethod
    def _rewrite(path: str, text: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with run_dir.writing("metrics", path):
            with open(tmp, "w", newline="") as f:
                f.write(text)
            os.replace(tmp, path)

    def _truncate(self, resume_step: int) -> None:
        """Drops rows after the restored step, and rows that a kill cut short."""
        broken = 0
        if os.path.exists(self.jsonl):
            kept = []
            with open(self.jsonl) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        keep = self._keep(row, resume_step)
                    except (ValueError, KeyError, TypeError):
                        broken += bool(line.strip())
                        continue
                    if keep:
                        kept.append(line if line.endswith("\n") else line + "\n")
            self._rewrite(self.jsonl, "".join(kept))
        if os.path.exists(self.csv):
            with open(self.csv, newline="") as f:
                rows = list(csv.reader(f))
            kept = []
            for r in rows[1:]:
                try:
                    step, split, _, value = r
                    keep = self._keep({"step": int(step), "split": split}, resume_step)
                    value == "" or float(value)  # an empty value: a missing number (None)
                except ValueError:
                    broken, keep = broken + 1, False
                if keep:
                    kept.append(r)
            buffer = io.StringIO()
            csv.writer(buffer).writerows([["step", "split", "name", "value"], *kept])
            self._rewrite(self.csv, buffer.getvalue())
        if broken:
            warnings.warn(f"dropped {broken} metric row(s) cut short by an interrupted write.", stacklevel=3)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        with run_dir.writing("metrics", self.jsonl):
            row = run_dir.finite_or_none({"step": step, "split": split, **values})
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
            new = not os.path.exists(self.csv)
            with open(self.csv, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", "split", "name", "value"])
                writer.writerows([[step, split, k, v] for k, v in values.items()])
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):  # TensorBoard has no missing values
                    self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        with run_dir.writing("TensorBoard events", self.jsonl):
            self.tb.close()


class NoMetrics:
    """The :class:`MetricsWriter` of the processes other than 0: they write no metrics."""

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Checkpoints.


Checkpoints = run_dir.Checkpoints
primary = run_dir.primary
barrier = run_dir.barrier


def save_params(path: str, params: Any) -> None:
    """The parameters as an ``.npz`` keyed by pytree path (for comparisons and export), written atomically."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    with run_dir.writing("the final parameters", path):
        np.savez(tmp, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
        os.replace(tmp, path)


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


def prepare_workdir(config: Any) -> None:
    """Checks ``config.workdir`` before anything compiles: refuses a changed config there
    (:class:`ConfigMismatch`, nothing on disk touched) and an unwritable directory
    (:class:`StorageError`). See :mod:`experiments.workdir` for what a rerun does."""
    run_dir.check_resume(config)
    run_dir.check_writable(config.workdir)


def write_config(config: Any) -> None:
    """Writes ``config.json`` (atomically); with ``overwrite`` first deletes the run already there.
    Process 0 writes, the others wait for it."""
    if primary():
        if getattr(config, "overwrite", False):
            run_dir.overwrite(config.workdir)
        run_dir.check_resume(config)
        os.makedirs(config.workdir, exist_ok=True)
        run_dir.write_json(os.path.join(config.workdir, "config.json"), dataclasses.asdict(config), "the config")
    barrier("config.json written")


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
        grad_norm = optax.tree.norm(grads)
        # one flag for the divergence check: the loss, the gradient and the updated parameters
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(params):
            finite &= jnp.isfinite(leaf).all()
        return new, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

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
    checkpoints. ``padded_per_frame`` is the frames of the padded train batches (``B x T``, fillers
    included) per real frame over the run's steps: 1.0 without padding.

    Resumes from ``config.workdir`` when it holds checkpoints (see :mod:`experiments.workdir`:
    a changed config there is refused here, before anything compiles; damaged checkpoints are
    set aside). ``key`` seeds the init, the per-step PRNG keys (``fold_in(key, step)``) and the
    data order. A loss, gradient or parameter that turns non-finite stops the run with
    :class:`Diverged`, naming the step; no checkpoint after the last finite step is written.
    """
    prepare_workdir(config)
    optimizer = make_optimizer(config)
    devices = make_devices(config)
    train_step, eval_step = make_steps(task, optimizer, config.ema_decay)

    def eval_params(state):
        if not config.ema_decay:
            return state["params"]
        # The average starts at zero; dividing by 1 - decay^step removes that bias (as Adam's moments).
        scale = 1.0 / (1.0 - config.ema_decay ** jnp.maximum(state["step"], 1).astype(jnp.float32))
        return jax.tree.map(lambda e: e * scale, state["ema"])

    buckets = padding_buckets(config, data)
    valid_batches = eval_batches(data.valid, config.batch_size, config.pad_multiple, buckets)
    test_batches = eval_batches(data.test, config.batch_size, config.pad_multiple, buckets)
    train_lengths = np.array([len(s) for s in data.train])
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)

    def batch_indices(data_seed: int, epoch: int) -> list[np.ndarray]:
        return epoch_batches(train_lengths, config.batch_size, data_seed, epoch, config.bucket, buckets)

    def padded_per_frame(data_seed: int) -> float:
        """Frames of the padded train batches (fillers included) per real frame, over steps 0..steps-1: a pure
        function of the data order, the same after a resume."""
        padded = real = 0
        for epoch in range(math.ceil(config.steps / steps_per_epoch)):
            for idx in batch_indices(data_seed, epoch)[: config.steps - epoch * steps_per_epoch]:
                n = train_lengths[idx[idx >= 0]]
                padded += len(idx) * padded_length(int(n.max()), config.pad_multiple, buckets)
                real += int(n.sum())
        return padded / max(real, 1)

    @jax.jit
    def initial_state(init_key: jax.Array, step_key: jax.Array) -> dict[str, Any]:
        """The state at step 0, as one compiled program: run op by op, a model's init is dozens of
        small programs, each compiled (or loaded from the compilation cache) on its own, which took
        about 1 s of every run's start on a 2-core CPU."""
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
        return state

    def train(key: jax.Array) -> dict[str, Any]:
        write_config(config)
        init_key, step_key, data_key = jax.random.split(key, 3)
        data_seed = int(jax.random.randint(data_key, (), 0, 2**31 - 1))
        state = jax.device_put(initial_state(init_key, step_key), devices.replicated)  # with several processes: checks that they agree
        ckpt_dir = os.path.join(config.workdir, "checkpoints")
        latest = Checkpoints(ckpt_dir, config.keep_checkpoints)
        state, start = latest.restore_newest(state)
        state = jax.device_put(state, devices.replicated)
        best = Checkpoints(os.path.join(config.workdir, "best"), 1, best=True)
        best.check_restores(state)  # read only at the end: a damaged one is set aside now
        main_process = primary()  # prints the log and writes the files
        if start and main_process:
            print(f"resumed from {ckpt_dir}/{start}", flush=True)
        writer = MetricsWriter(config.workdir, start) if main_process else NoMetrics()
        bar = None
        if config.progress and main_process:
            from tqdm import tqdm

            bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        epoch_cache: dict[int, list[np.ndarray]] = {}
        pending: list[dict] = []
        fetched: list[dict] = []
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
                epoch_cache[epoch] = batch_indices(data_seed, epoch)
            return pad_batch(data.train, epoch_cache[epoch][i], config.pad_multiple, buckets)

        def fetch(done: int) -> None:
            """Fetches the pending steps' metrics; a non-finite one stops the run before any save."""
            nonlocal pending
            rows, pending = jax.device_get(pending), []
            for i, m in enumerate(rows):
                if not m["finite"]:
                    stop(done - len(rows) + i + 1, m)
            fetched.extend(rows)

        def stop(step: int, m: dict) -> None:
            saved = [s for s in latest.steps() if s < step]
            keep = f"the last good checkpoint, {ckpt_dir}/{saved[-1]}," if saved else "no checkpoint"
            writer.close()
            latest.close()
            best.close()
            if bar is not None:
                bar.close()
            raise Diverged(
                f"training diverged at step {step}: loss {float(m['loss'])}, gradient norm {float(m['grad_norm'])} "
                f"(the loss, gradient or updated parameters are not finite). Nothing after it was saved; {keep} "
                "is kept.\n  fix:      lower --learning_rate (or set --clip_norm), then rerun with a new --workdir "
                "or --overwrite=true."
            )

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
            evaluating = (config.eval_every and done % config.eval_every == 0) or done == config.steps
            saving = done % config.checkpoint_every == 0 or done == config.steps
            if done % config.log_every == 0 or done == config.steps or evaluating or saving:
                fetch(done)
            if fetched and (done % config.log_every == 0 or done == config.steps):
                loss = float(np.mean([m["loss"] for m in fetched]))
                rate = (done - s_start) / (time.perf_counter() - t_start)
                writer.write(
                    done, "train", {"loss": loss, "grad_norm": float(fetched[-1]["grad_norm"]), "steps_per_s": rate}
                )
                fetched = []
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    bar.update(done - bar.n)
            if evaluating or saving:
                step_seconds += lap()
            if evaluating:
                valid = evaluate(eval_step, eval_params(state), valid_batches, devices)
                writer.write(done, "valid", {"nll": valid})
                best.save(done, state, {"valid": valid})
                if bar is not None:
                    bar.write(f"step {done}: valid {valid:.4f}")
            if saving:
                latest.save(done, state)
            if evaluating or saving:
                lap()
        if bar is not None:
            bar.close()
        timed_steps = config.steps - start - len(shapes)
        ms_per_step = step_seconds / timed_steps * 1e3 if timed_steps > 0 else float("nan")
        timing = {"compile_s": compile_seconds, "compiled_shapes": len(shapes), "ms_per_step": ms_per_step}
        result_path = os.path.join(config.workdir, "result.json")
        if start == config.steps and os.path.exists(result_path):  # nothing ran now: keep the earlier timing
            try:
                with open(result_path) as f:
                    earlier = json.load(f)
                timing = {k: float("nan") if earlier.get(k) is None else earlier[k] for k in timing}
            except (OSError, ValueError):
                pass  # a damaged result file is written anew
        steps_per_s = (config.steps - s_start) / max(time.perf_counter() - t_start, 1e-9)
        valid = evaluate(eval_step, eval_params(state), valid_batches, devices)
        test = evaluate(eval_step, eval_params(state), test_batches, devices)
        result = {"step": config.steps, "valid": valid, "test": test, **timing,
                  "padded_per_frame": padded_per_frame(data_seed)}  # fmt: skip
        best_step = best.best_step()
        if best_step is not None:
            best_state = best.restore(best_step, state)
            result.update(
                best_step=best_step,
                best_valid=evaluate(eval_step, eval_params(best_state), valid_batches, devices),
                best_test=evaluate(eval_step, eval_params(best_state), test_batches, devices),
            )
        writer.write(config.steps, "final", result)
        writer.close()
        latest.close()
        best.close()
        params = jax.device_get(eval_params(state))  # replicated: every process holds all of it
        if main_process:
            run_dir.write_json(result_path, run_dir.finite_or_none(result), "the result")
            save_params(os.path.join(config.workdir, "final_params.npz"), params)
        barrier("results written")
        return {**result, "params": params, "steps_per_s": steps_per_s}

    return train
