r"""Seven members of the LSTM family trained side by side on the adding problem.

Run ``python -m experiments.variants`` (``--help`` lists the config fields, ``--quick`` shrinks
the run, ``--steps=300 --hidden=16`` overrides fields). It trains, with the same budget (steps,
batch, optimiser, learning rate, hidden size, data), a standard LSTM, a peephole LSTM, a CIFG
LSTM, a GRU, a ConvLSTM, a bidirectional LSTM and a stacked (2-layer) LSTM, prints a summary
table with measured columns and writes ``loss_curves.png``, ``summary.csv``, ``summary.md`` and
``summary.json`` to ``--out``.

**The task: the adding problem** (Hochreiter & Schmidhuber 1997, experiment 4, in the form of
Le et al. 2015 and Arjovsky et al. 2016). An example is a sequence of ``seq_len`` steps with two
features, a value :math:`u_t \sim U[0, 1]` and a marker :math:`m_t \in \{0, 1\}`. Exactly two
steps are marked, one in the first half and one in the second; the target is

.. math::

    y = \sum_t m_t u_t = u_i + u_j, \qquad y \in [0, 2].

Why this one task suits all seven:

- *It needs memory.* The first marked value must be carried across on average ``seq_len / 2``
  distractor steps to be added to the second one; nothing in the last input reveals it.
- *It is a whole-sequence regression*, read out after the model has seen every step, so a
  bidirectional model is legitimate (on next-step prediction its backward direction would see
  the future).
- *It has an exact baseline.* Predicting the mean, 1, gives MSE :math:`\mathrm{Var}(u_i + u_j)
  = 2/12 = 1/6 \approx 0.167`; a loss well below it means the model remembers. Hochreiter &
  Schmidhuber count a prediction as correct when its absolute error is below 0.04: that is the
  ``eval_accuracy`` column, on a held-out set drawn from ``eval_seed``.
- *It is generated and deterministic.* Training step ``s`` draws a fresh batch from
  ``fold_in(data_key, s)`` with ``data_key`` split from the seed's key, so every variant sees
  exactly the same batches.

**The models.** A recurrent layer followed by a linear readout of its *final outputs*:

- one-directional variants: the output at the last step, :math:`y_T`;
- bidirectional LSTM: each direction's last output in its own order,
  :math:`[\overrightarrow{y}_T; \overleftarrow{y}_1]`, both of which have seen the whole sequence;
- ConvLSTM: each step's two features are laid out as a 1-D spatial signal of width 2 with one
  channel, ``(spatial=2, channels=1)``, and a 'same' convolution of width ``conv_kernel`` (3)
  sees both positions. It gets ``hidden // 2`` channels, so its state has as many units
  (2 positions x ``hidden // 2``) as the LSTM's; the readout flattens the last output.

The readout starts at zero weights and the target's mean as bias, so every curve starts at the
baseline 1/6 and a drop below it is the recurrent layer at work. Parameter counts differ
between variants (a bidirectional LSTM has twice the LSTM's, a stacked one almost three times,
a GRU and a CIFG three quarters); the table reports them. Every variant gets the same budget:
``steps`` Adam steps (gradient norm clipped to ``clip_norm``, learning rate decayed along a
cosine to ``final_lr_fraction`` of ``learning_rate``) on the same batches.

**Reading the results.** On this task a model first sits on the baseline plateau, then drops
once it discovers the markers; *when* it drops varies from seed to seed by hundreds of steps,
so one seed's ranking of close variants is anecdote, not evidence (try ``--seed=1``).

**Timing.** ``make_train(config, variant) -> train(key) -> (params, losses)`` runs the whole
training as one ``lax.scan`` over steps. It is compiled ahead of time (``jit(train).lower(key)
.compile()``, the *compile* column) and then run once; *ms/step* is that run's wall time
divided by ``steps`` (parameter init included, negligible). ``--quick`` also compiles at XLA
optimisation level 0 (``xla_opt_level``), which compiles 2-3x faster and runs slower: its timing
columns are not comparable with a default run's. Since ``train`` is a pure function of its key,
``jax.jit(jax.vmap(train))`` trains a population of seeds in one call.

Example:

>>> from experiments import variants
>>> config = variants.override(variants.quick_config(), steps=3)
>>> params, losses = variants.make_train(config, "gru")(jax.random.key(0))
>>> losses.shape
(3,)
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import recurrent

BASELINE_MSE = 1.0 / 6.0  # Var(u_i + u_j) for u ~ U[0, 1]: the MSE of always predicting 1.


# --------------------------------------------------------------------------------------
# Config: code, overridable from the command line.


@dataclasses.dataclass(frozen=True)
class Config:
    """The experiment's settings; ``python -m experiments.variants --help`` lists them."""

    seed: int = dataclasses.field(default=0, metadata={"help": "key of the model inits and training batches"})
    steps: int = dataclasses.field(default=700, metadata={"help": "Adam steps per variant (the same for all)"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "sequences per training step"})
    seq_len: int = dataclasses.field(default=80, metadata={"help": "time steps per sequence (T)"})
    hidden: int = dataclasses.field(default=32, metadata={"help": "hidden size H (ConvLSTM: H // 2 channels)"})
    learning_rate: float = dataclasses.field(default=5e-3, metadata={"help": "Adam's initial learning rate"})
    final_lr_fraction: float = dataclasses.field(
        default=0.1, metadata={"help": "cosine decay to this fraction of it (1 = constant)"}
    )
    clip_norm: float = dataclasses.field(default=1.0, metadata={"help": "global gradient-norm clip"})
    conv_kernel: int = dataclasses.field(default=3, metadata={"help": "ConvLSTM kernel width (1-D)"})
    eval_size: int = dataclasses.field(default=1024, metadata={"help": "held-out sequences"})
    eval_seed: int = dataclasses.field(default=12345, metadata={"help": "key of the held-out set"})
    tolerance: float = dataclasses.field(default=0.04, metadata={"help": "|error| counted as correct"})
    xla_opt_level: int = dataclasses.field(
        default=-1, metadata={"help": "XLA backend optimisation level of train (-1: default; 0: fast compile)"}
    )
    variants: str = dataclasses.field(default="all", metadata={"help": "comma-separated names, or 'all'"})
    out: str = dataclasses.field(default="runs/variants", metadata={"help": "output directory"})


def get_config() -> Config:
    """The default config: under three minutes for all seven variants on a busy 2-core CPU."""
    return Config()


def quick_config() -> Config:
    """A shrunken config for smoke tests: tiny sizes, a few steps."""
    return dataclasses.replace(get_config(), steps=4, batch_size=4, seq_len=6, hidden=4, eval_size=16, xla_opt_level=0)


class ConfigError(ValueError):
    """A config override names an unknown field or gives a bad value."""


def _valid_fields(config: Config) -> str:
    return ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))


def _convert(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ConfigError(
        f"config field {name!r} expects a value of type {kind.__name__}.\n"
        f"  got:      {value!r}\n"
        f"  fix:      e.g. --{name}={default!r}"
    )


def override(config: Config, **values: Any) -> Config:
    """``config`` with some fields replaced; values may be strings from the command line.

    Raises :class:`ConfigError` naming the valid fields if a name is unknown, and on values
    of the wrong type or out of range.
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
    for name in ("steps", "batch_size", "hidden", "conv_kernel", "eval_size"):
        if getattr(new, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(new, name)}.")
    if new.seq_len < 2:
        raise ConfigError(f"config field 'seq_len' must be >= 2 (one marker per half); got {new.seq_len}.")
    selected_variants(new)  # unknown variant names fail here
    return new


def usage() -> str:
    config = get_config()
    lines = [
        "usage: python -m experiments.variants [--quick] [--field=value ...]",
        "",
        "Trains seven LSTM-family variants on the adding problem; writes a table and a plot to --out.",
        "",
        f"  {'--quick':<30} start from the shrunken smoke-test config",
        f"  {'--help':<30} show this message",
        "",
        "config fields (default):",
    ]
    for f in dataclasses.fields(config):
        lines.append(f"  {f'--{f.name}={getattr(config, f.name)!r}':<30} {f.metadata.get('help', '')}")
    lines.append(f"\nvariants: {', '.join(VARIANTS)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> Config:
    """A config from ``--field=value`` (or ``--field value``) arguments; ``--quick`` first shrinks it."""
    args = list(argv)
    config = quick_config() if "--quick" in args else get_config()
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


# --------------------------------------------------------------------------------------
# The task.


def adding_batch(key: jax.Array, batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """A batch of the adding problem: ``xs (batch, T, 2)`` (value, marker) and ``y (batch,)``.

    >>> xs, y = adding_batch(jax.random.key(0), 3, 10)
    >>> xs.shape, y.shape, xs[..., 1].sum(axis=1).tolist()
    ((3, 10, 2), (3,), [2.0, 2.0, 2.0])
    """
    k_u, k_i, k_j = jax.random.split(key, 3)
    half = seq_len // 2
    u_BT = jax.random.uniform(k_u, (batch_size, seq_len))
    first_B = jax.random.randint(k_i, (batch_size,), 0, half)
    second_B = jax.random.randint(k_j, (batch_size,), half, seq_len)
    t = jnp.arange(seq_len)
    marks_BT = ((t == first_B[:, None]) | (t == second_B[:, None])).astype(u_BT.dtype)
    return jnp.stack([u_BT, marks_BT], axis=-1), jnp.sum(u_BT * marks_BT, axis=1)


# --------------------------------------------------------------------------------------
# The seven variants.


class Variant(NamedTuple):
    """How one variant is built: its recurrent layer, the shape of one step's input, how the
    ``(batch, T, 2)`` sequence is fed to it, and which of its outputs the readout sees."""

    name: str
    gates: str
    cell_state: bool
    build: Callable[[Config], tuple[recurrent.Layer, tuple[int, ...], Callable, Callable]]


def _last(ys_BTD):
    return ys_BTD[:, -1]


def _dense(make_cell):
    return lambda c: (recurrent.rnn(make_cell(c)), (2,), lambda xs: xs, _last)


def _conv(c):
    cell = recurrent.conv_lstm(max(1, c.hidden // 2), (c.conv_kernel,))
    # (B, T, 2) -> (B, T, spatial=2, channels=1); last output (B, 2, Hc) -> (B, 2 Hc).
    return recurrent.rnn(cell), (2, 1), lambda xs: xs[..., None], lambda ys: ys[:, -1].reshape(ys.shape[0], -1)


def _bidirectional(c):
    H = c.hidden
    # Forward direction's output at the last step, backward's at the first: both saw all of it.
    readout = lambda ys: jnp.concatenate([ys[:, -1, :H], ys[:, 0, H:]], axis=-1)  # noqa: E731
    return recurrent.bidirectional(recurrent.lstm(H)), (2,), lambda xs: xs, readout


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("lstm", "i f o", True, _dense(lambda c: recurrent.lstm(c.hidden))),
        Variant("peephole_lstm", "i f o +peep", True, _dense(lambda c: recurrent.peephole_lstm(c.hidden))),
        Variant("cifg_lstm", "f o (i=1-f)", True, _dense(lambda c: recurrent.cifg_lstm(c.hidden))),
        Variant("gru", "r z", False, _dense(lambda c: recurrent.gru(c.hidden))),
        Variant("conv_lstm", "i f o (conv)", True, _conv),
        Variant("bidirectional_lstm", "i f o x2 dir", True, _bidirectional),
        Variant(
            "stacked_lstm",
            "i f o x2 layer",
            True,
            _dense(lambda c: recurrent.stacked([recurrent.lstm(c.hidden), recurrent.lstm(c.hidden)])),
        ),
    ]
}


def selected_variants(config: Config) -> list[str]:
    if config.variants.strip() == "all":
        return list(VARIANTS)
    names = [n.strip() for n in config.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise ConfigError(
            f"unknown variant(s) {bad or config.variants!r}.\n"
            f"  valid:    all, or a comma-separated subset of {', '.join(VARIANTS)}\n"
            "  fix:      e.g. --variants=lstm,gru"
        )
    return names


class Model(NamedTuple):
    """A recurrent layer and a linear readout: ``init(key) -> params``, ``apply(params, xs_BT2) -> y_B``."""

    init: Callable[[jax.Array], dict]
    apply: Callable[[dict, jax.Array], jax.Array]


def make_model(config: Config, variant: str) -> Model:
    layer, input_shape, to_input, readout = VARIANTS[variant].build(config)
    features = math.prod(layer.output_shape(input_shape))

    def init(key):
        return {
            "rnn": layer.init(key, input_shape),
            "readout": {"kernel": jnp.zeros((features,)), "bias": jnp.ones(())},  # start at the mean
        }

    def apply(params, xs_BT2):
        _, ys = layer.apply(params["rnn"], to_input(xs_BT2))
        return readout(ys) @ params["readout"]["kernel"] + params["readout"]["bias"]

    return Model(init, apply)


# --------------------------------------------------------------------------------------
# Training and evaluation.


def make_train(config: Config, variant: str) -> Callable[[jax.Array], tuple[dict, jax.Array]]:
    """``train(key) -> (params, losses)``: ``config.steps`` Adam steps as one ``lax.scan``."""
    model = make_model(config, variant)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=config.final_lr_fraction)
    optimizer = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(schedule))

    def loss_fn(params, xs, y):
        return jnp.mean((model.apply(params, xs) - y) ** 2)

    def train(key):
        init_key, data_key = jax.random.split(key)
        params = model.init(init_key)

        def update(state, step):
            params, opt_state = state
            xs, y = adding_batch(jax.random.fold_in(data_key, step), config.batch_size, config.seq_len)
            loss, grads = jax.value_and_grad(loss_fn)(params, xs, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = lax.scan(update, (params, optimizer.init(params)), jnp.arange(config.steps))
        return params, losses

    return train


def make_eval(config: Config, variant: str) -> Callable[[dict], dict[str, jax.Array]]:
    """``evaluate(params) -> {"eval_mse", "eval_accuracy"}`` on the held-out set of ``eval_seed``."""
    model = make_model(config, variant)
    xs, y = adding_batch(jax.random.key(config.eval_seed), config.eval_size, config.seq_len)

    @jax.jit
    def evaluate(params):
        error = model.apply(params, xs) - y
        return {"eval_mse": jnp.mean(error**2), "eval_accuracy": jnp.mean(jnp.abs(error) < config.tolerance)}

    return evaluate


def compile_options(config: Config) -> dict[str, Any] | None:
    """XLA options for compiling ``train``: level 0 compiles 2-3x faster (used by smoke tests)."""
    return None if config.xla_opt_level < 0 else {"xla_backend_optimization_level": config.xla_opt_level}


COLUMNS = ("variant", "gates", "cell_state", "rnn_params", "params")
COLUMNS += ("compile_s", "ms_per_step", "final_loss", "eval_mse", "eval_accuracy")


def run_variant(config: Config, variant: str) -> tuple[dict[str, Any], np.ndarray, dict]:
    """Compiles and runs one variant's training; returns its table row, loss curve and params."""
    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    compiled = jax.jit(make_train(config, variant)).lower(key).compile(compile_options(config))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    params, losses = jax.block_until_ready(compiled(key))
    run_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in make_eval(config, variant)(params).items()}
    losses = np.asarray(losses)
    spec = VARIANTS[variant]
    row = {
        "variant": variant,
        "gates": spec.gates,
        "cell_state": "yes" if spec.cell_state else "no",
        "rnn_params": recurrent.count_params(params["rnn"]),
        "params": recurrent.count_params(params),
        "compile_s": compile_s,
        "ms_per_step": run_s / config.steps * 1e3,
        # Mean of the last 5% of training losses: one batch of 64 is a noisy estimate.
        "final_loss": float(losses[-max(1, config.steps // 20) :].mean()),
        **metrics,
    }
    return row, losses, params


# Column -> (header, format); left-aligned text columns have no format.
_TABLE = {
    "variant": ("variant", None),
    "gates": ("gates", None),
    "cell_state": ("cell state", None),
    "rnn_params": ("rnn params", "d"),
    "params": ("params", "d"),
    "compile_s": ("compile (s)", ".2f"),
    "ms_per_step": ("ms/step", ".2f"),
    "final_loss": ("final loss", ".4f"),
    "eval_mse": ("eval MSE", ".4f"),
    "eval_accuracy": ("eval acc", ".3f"),
}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    body = [[str(r[k]) if fmt is None else format(r[k], fmt) for k, (_, fmt) in _TABLE.items()] for r in rows]
    headers = [h for h, _ in _TABLE.values()]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    numeric = [fmt is not None for _, fmt in _TABLE.values()]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if n else "-" * (w + 2) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(b) for b in body)])


def plot_losses(curves: dict[str, np.ndarray], path: str, config: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    window = max(1, config.steps // 30)
    for i, (name, losses) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(losses, color=color, alpha=0.15, linewidth=0.8)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(losses)), smooth, color=color, label=name, linewidth=1.6)
    ax.axhline(BASELINE_MSE, color="k", linestyle="--", linewidth=1, label="predict the mean (1/6)")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel(f"training MSE (moving average of {window})")
    ax.set_title(
        f"Adding problem, T={config.seq_len}, H={config.hidden}, batch {config.batch_size}, lr {config.learning_rate}"
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(config: Config, rows: list[dict], curves: dict[str, np.ndarray]) -> dict[str, str]:
    """Writes the plot, CSV, markdown and JSON to ``config.out``; returns their paths."""
    os.makedirs(config.out, exist_ok=True)
    paths = {
        "plot": os.path.join(config.out, "loss_curves.png"),
        "csv": os.path.join(config.out, "summary.csv"),
        "markdown": os.path.join(config.out, "summary.md"),
        "json": os.path.join(config.out, "summary.json"),
    }
    plot_losses(curves, paths["plot"], config)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["markdown"], "w") as f:
        f.write(format_table(rows) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(
            {
                "config": dataclasses.asdict(config),
                "baseline_mse": BASELINE_MSE,
                "device": str(jax.devices()[0]),
                "rows": rows,
                "losses": {k: v.tolist() for k, v in curves.items()},
            },
            f,
            indent=1,
        )
    return paths


def run(config: Config) -> dict[str, Any]:
    """Trains every selected variant; returns rows, curves and output paths."""
    jnp.zeros(()).block_until_ready()  # start the backend outside the first compile time
    rows, curves = [], {}
    for name in selected_variants(config):
        row, losses, _ = run_variant(config, name)
        rows.append(row)
        curves[name] = losses
        print(
            f"  {name:<19} compile {row['compile_s']:5.2f}s  {row['ms_per_step']:6.2f} ms/step  "
            f"final loss {row['final_loss']:.4f}  eval MSE {row['eval_mse']:.4f}",
            flush=True,
        )
    paths = write_outputs(config, rows, curves)
    return {"rows": rows, "losses": curves, "paths": paths}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    try:
        config = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"config: {dataclasses.asdict(config)}\ndevice: {jax.devices()[0]}", flush=True)
    result = run(config)
    print(f"\nAdding problem (T={config.seq_len}), {config.steps} Adam steps, seed {config.seed}; ", end="")
    print(f"baseline MSE (predict the mean) = {BASELINE_MSE:.4f}; eval acc = |error| < {config.tolerance}.\n")
    print(format_table(result["rows"]))
    print("\nwrote " + ", ".join(result["paths"].values()))
    return result


if __name__ == "__main__":
    main()
