r"""State tracking: parity and modular addition, trained on short sequences, tested on long ones.

Run ``python -m experiments.state_tracking`` (``--help`` lists the fields). A stream of digits
``x_1 .. x_T`` in ``{0, .., k-1}`` is read one digit per step, and at every step the model names
the running sum :math:`y_t = (x_1 + \dots + x_t) \bmod k`:

- ``parity``: bits, ``k = 2`` (the parity of the ones seen so far);
- ``mod3``, ``mod5``: digits, ``k = 3`` and ``k = 5``.

Training sequences have lengths drawn uniformly from ``--train_min_length`` to
``--train_max_length`` (3 to 40); the test sets have fixed lengths ``--test_lengths`` (40 to 256),
so everything past 40 measures length generalisation, as in the xLSTM paper's formal-language
experiments (Beck et al. 2024, after Delétang et al. 2023). The score is the accuracy of the
answer at the last step (a sequence is right when its final running sum is); chance is ``1/k``.

What the literature expects: the running sum mod ``k`` is a walk on a cyclic group, which a
recurrence solves for every length only if its state can rotate. The LSTM, the GRU and the sLSTM
(nonlinear, with hidden-to-hidden weights) can; recurrences that are linear in the state with a
positive diagonal transition (the mLSTM, minGRU and minLSTM) cannot represent parity at
arbitrary length (Grazzi et al., ICLR 2025, "Unlocking state-tracking in linear RNNs through
negative eigenvalues"; Merrill et al. 2024). The table reports what the runs give, per seed.

Each run trains with the shared pipeline (:mod:`experiments.pipeline`) in
``<workdir>/<task>_<cell>_seed<s>`` (checkpoints, resuming, metrics), then scores the test
lengths; ``summary.json`` and ``state_tracking.png`` are written to ``--workdir``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recurrent
from experiments import errors, pipeline
from experiments import workdir as run_dir
from experiments.generated import Generated
from experiments.pipeline import ConfigError, field

#: Each task's modulus ``k``.
TASKS = {"parity": 2, "mod3": 3, "mod5": 5}

#: Each cell, built from the config: ``make(config) -> Cell``.
CELLS: dict[str, Callable[[Any], recurrent.Cell]] = {
    "lstm": lambda c: recurrent.lstm(c.hidden),
    "gru": lambda c: recurrent.gru(c.hidden),
    "slstm": lambda c: recurrent.slstm(c.hidden, num_heads=c.heads),
    "mlstm": lambda c: recurrent.mlstm(c.hidden, num_heads=c.heads),
    "min_gru": lambda c: recurrent.min_gru(c.hidden),
    "min_lstm": lambda c: recurrent.min_lstm(c.hidden),
}
SPLITS = {"train": 0, "valid": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """State-tracking settings; ``python -m experiments.state_tracking --help`` lists them."""

    # Resuming may change these too: which runs are made (each in its own sub-directory) and how they are scored.
    resume_safe = pipeline.TrainConfig.resume_safe | {
        "tasks",
        "cells",
        "seeds",
        "test_lengths",
        "test_sequences",
    }

    tasks: str = field("parity,mod3,mod5", f"comma-separated tasks: {', '.join(TASKS)}")
    cells: str = field(",".join(CELLS), f"comma-separated cells: {', '.join(CELLS)}")
    seeds: str = field("0,1,2", "comma-separated seeds; each (task, cell, seed) is one run")
    hidden: int = field(64, "hidden units of each layer")
    layers: int = field(1, "stacked recurrent layers (the xLSTM paper's formal-language models have two blocks)")
    heads: int = field(4, "heads of the sLSTM and mLSTM")
    train_min_length: int = field(3, "shortest training sequence")
    train_max_length: int = field(40, "longest training sequence")
    test_lengths: str = field("40,64,128,256", "comma-separated test lengths")
    train_sequences: int = field(200000, "training sequences (generated on demand)")
    test_sequences: int = field(512, "test sequences per test length")
    data_seed: int = field(0, "seed of the generated sequences")


def get_config() -> Config:
    """1500 Adam steps of 64 sequences, lr 3e-3 on a cosine, per task, cell and seed (about 45 s of a
    2-core CPU per run for one layer of 64 units: 54 runs, about 40 minutes)."""
    return Config(
        steps=1500,
        batch_size=64,
        learning_rate=3e-3,
        schedule="cosine",
        pad_multiple=8,
        bucket=8,
        eval_every=500,
        checkpoint_every=500,
        log_every=100,
        workdir="runs/state_tracking",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(),
        tasks="parity",
        cells="lstm",
        seeds="0",
        hidden=4,
        layers=1,
        heads=2,
        train_max_length=8,
        test_lengths="8,16",
        train_sequences=32,
        test_sequences=8,
        steps=2,
        batch_size=4,
        eval_every=0,
        checkpoint_every=2,
        log_every=1,
        progress=False,
    )


def _integers(value: str, name: str, minimum: int) -> list[int]:
    try:
        out = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < minimum:
        raise ConfigError(
            f"config field {name!r} must be comma-separated integers >= {minimum}; got {value!r}.\n"
            f"  fix:      e.g. --{name}={getattr(get_config(), name)}"
        )
    return out


def seeds(config: Config) -> list[int]:
    return _integers(config.seeds, "seeds", 0)


def eval_lengths(config: Config) -> list[int]:
    return _integers(config.test_lengths, "test_lengths", 1)


def check_config(config: Config) -> Config:
    pipeline.choices(config.tasks, list(TASKS), "tasks")
    pipeline.choices(config.cells, list(CELLS), "cells")
    seeds(config)
    eval_lengths(config)
    for name in ("hidden", "layers", "heads", "train_min_length", "train_sequences", "test_sequences"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    if config.train_max_length < config.train_min_length:
        raise ConfigError(
            f"config field 'train_max_length' ({config.train_max_length}) is below 'train_min_length' "
            f"({config.train_min_length}).\n  fix:      e.g. --train_min_length=3 --train_max_length=40"
        )
    return config


# --------------------------------------------------------------------------------------
# Data: each sequence is (T, k + 1), the one-hot digits and, in the last column, the running sum mod k.


def sequence(k: int, length: int, rng: np.random.Generator) -> np.ndarray:
    digits = rng.integers(0, k, length)
    x = np.zeros((length, k + 1), np.float32)
    x[np.arange(length), digits] = 1.0
    x[:, k] = np.cumsum(digits) % k
    return x


def make_data(config: Config, task: str) -> pipeline.Data:
    """Training lengths uniform in [train_min_length, train_max_length]; validation and test at
    the longest training length (the pipeline's own NLL); each item a pure function of
    ``(data_seed, task, split, i)``."""
    k = TASKS[task]
    seed = [config.data_seed, k]
    lengths = np.random.default_rng([*seed, 9]).integers(
        config.train_min_length, config.train_max_length + 1, config.train_sequences
    )
    width = k + 1

    def split(name: str, n: int, lengths: np.ndarray | None) -> Generated:
        def make(i):
            rng = np.random.default_rng([*seed, SPLITS[name], i])
            return sequence(k, config.train_max_length if lengths is None else int(lengths[i]), rng)

        return Generated(n, (config.train_max_length, width), make, lengths)

    n_eval = max(1, config.test_sequences // 2)
    return pipeline.Data(split("train", config.train_sequences, lengths), split("valid", n_eval, None),
                         split("test", n_eval, None))  # fmt: skip


def eval_set(config: Config, task: str, length: int) -> np.ndarray:
    """The fixed test sequences of one length, ``(test_sequences, length, k + 1)``."""
    k = TASKS[task]
    return np.stack(
        [sequence(k, length, np.random.default_rng([config.data_seed, k, 3, length, i]))
         for i in range(config.test_sequences)]
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Model: the digits, one-hot, through `layers` stacked recurrent layers and a linear readout.


def make_layer(config: Config, cell_name: str) -> recurrent.Layer:
    cells = [CELLS[cell_name](config) for _ in range(config.layers)]
    return recurrent.rnn(cells[0]) if config.layers == 1 else recurrent.stacked([recurrent.rnn(c) for c in cells])


def make_model(config: Config, task: str, cell_name: str):
    k, layer = TASKS[task], make_layer(config, cell_name)
    width = layer.output_shape((k,))[-1]

    def init(key):
        k_rnn, k_out = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, (k,)),
            "readout": {"kernel": jax.nn.initializers.lecun_normal()(k_out, (width, k)), "bias": jnp.zeros((k,))},
        }

    def logits(params, xs, lengths=None):
        _, ys = layer.apply(params["rnn"], xs, lengths=lengths)
        return ys @ params["readout"]["kernel"] + params["readout"]["bias"]

    return init, logits


def make_task(config: Config, task: str, cell_name: str) -> pipeline.Task:
    init, logits = make_model(config, task, cell_name)
    k = TASKS[task]

    def loss(params, batch, key):
        xs, lengths = batch
        z = logits(params, xs[..., :k], lengths)
        step_loss = optax.softmax_cross_entropy_with_integer_labels(z, xs[..., k].astype(jnp.int32))
        valid = jnp.arange(xs.shape[1]) < lengths[:, None]
        return jnp.sum(jnp.where(valid, step_loss, 0.0)), jnp.sum(valid)

    return pipeline.Task(init, loss)


def score(config: Config, task: str, cell_name: str, params: Any) -> dict[int, float]:
    """Accuracy of the last step's answer at each test length."""
    _, logits = make_model(config, task, cell_name)
    k = TASKS[task]

    @jax.jit
    def correct(params, xs):
        z = logits(params, xs[..., :k])
        return jnp.argmax(z[:, -1], -1) == xs[:, -1, k].astype(jnp.int32)

    out = {}
    for length in eval_lengths(config):
        xs = eval_set(config, task, length)
        hits = [np.asarray(correct(params, jnp.asarray(xs[i : i + 256]))) for i in range(0, len(xs), 256)]
        out[length] = float(np.mean(np.concatenate(hits)))
    return out


# --------------------------------------------------------------------------------------
# Runs, table and plot.


def make_train(config: Config, task: str, cell_name: str, seed: int, data: pipeline.Data | None = None):
    """``train(key) -> result`` for one task, cell and seed, in ``<workdir>/<task>_<cell>_seed<seed>``."""
    check_config(config)
    data = make_data(config, task) if data is None else data
    sub = dataclasses.replace(config, seed=seed, workdir=os.path.join(config.workdir, f"{task}_{cell_name}_seed{seed}"))
    return pipeline.make_train(sub, make_task(config, task, cell_name), data)


def summarize(runs: dict[str, dict[str, dict[int, dict[int, float]]]], lengths: Sequence[int]) -> str:
    """The markdown table: accuracy per task, cell and test length, mean over seeds (min-max)."""
    head = "| task | cell | seeds | " + " | ".join(f"T={n}" for n in lengths) + " |"
    lines = [head, "|" + " --- |" * 3 + " ---: |" * len(lengths)]
    for task, cells in runs.items():
        for cell_name, by_seed in cells.items():
            accs = np.array([[by_seed[s][n] for n in lengths] for s in by_seed])
            cols = [f"{m:.3f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in zip(accs.mean(0), accs.min(0), accs.max(0))]
            lines.append(f"| {task} | {cell_name} | {len(by_seed)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, dict[int, dict[int, float]]]], lengths: Sequence[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1.2, 3.4), squeeze=False)
    for ax, (task, cells) in zip(axes[0], runs.items()):
        for i, (cell_name, by_seed) in enumerate(cells.items()):  # markers and dashes: equal curves stay visible
            accs = np.array([[by_seed[s][n] for n in lengths] for s in by_seed])
            ax.plot(
                lengths, accs.mean(0), marker="os^vDx"[i % 6], ls=("-", "--", ":")[i % 3], ms=7 - i, label=cell_name
            )
            ax.fill_between(lengths, accs.min(0), accs.max(0), alpha=0.15)
        ax.axhline(1 / TASKS[task], color="grey", lw=0.8, ls="--", label="chance")
        ax.set(title=task, xlabel="test length", xscale="log", ylim=(0, 1.02))
        ax.set_xticks(list(lengths), [str(n) for n in lengths])
        ax.minorticks_off()
    axes[0][0].set_ylabel("accuracy of the final answer")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: Config) -> dict[str, Any]:
    """Every task, cell and seed; returns ``{"accuracy": {task: {cell: {seed: {length: acc}}}}, "table": str}``."""
    check_config(config)
    lengths = eval_lengths(config)
    runs: dict[str, dict[str, dict[int, dict[int, float]]]] = {}
    for task in pipeline.choices(config.tasks, list(TASKS), "tasks"):
        data = make_data(config, task)
        for cell_name in pipeline.choices(config.cells, list(CELLS), "cells"):
            for seed in seeds(config):
                result = make_train(config, task, cell_name, seed, data)(jax.random.key(seed))
                acc = score(config, task, cell_name, result["params"])
                runs.setdefault(task, {}).setdefault(cell_name, {})[seed] = acc
                print(f"{task} {cell_name} seed {seed}: " + ", ".join(f"T={n} {a:.3f}" for n, a in acc.items()),
                      flush=True)  # fmt: skip
    table = summarize(runs, lengths)
    print("\naccuracy of the final answer, mean over seeds (min-max); trained on lengths "
          f"{config.train_min_length}-{config.train_max_length}\n\n{table}")  # fmt: skip
    os.makedirs(config.workdir, exist_ok=True)
    summary = {"config": dataclasses.asdict(config), "accuracy": runs, "table": table}
    run_dir.write_json(os.path.join(config.workdir, "summary.json"), summary, "the summary")
    plot(runs, lengths, os.path.join(config.workdir, "state_tracking.png"))
    return {"accuracy": runs, "table": table}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.state_tracking",
        "Parity and modular addition: trained on short sequences, tested on long ones.",
    )  # fmt: skip
    with errors.report():
        check_config(config)
        return run(config)


if __name__ == "__main__":
    main()
