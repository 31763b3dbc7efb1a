r"""The main job: members of the LSTM family trained side by side on polyphonic music.

Run ``python -m experiments.variants`` (``--help`` lists the fields, ``--quick`` shrinks the run,
``--steps=300 --hidden=32`` overrides fields). It trains, with the same budget (steps, batch,
optimiser, schedule, hidden size, dropout, data order), the rows of ``--family``:

- ``classic`` (the default): a standard LSTM, a peephole LSTM, a CIFG LSTM, a GRU, a ConvLSTM, a
  bidirectional LSTM and a stacked (2-layer) LSTM;
- ``modern``: xLSTM's sLSTM and mLSTM (``--heads`` heads each) and the minGRU and minLSTM of
  "Were RNNs All We Needed?", each a single layer with the same readout;
- ``all``: both.

It prints a summary table with measured columns and writes ``curves.png``, ``summary.csv``,
``summary.md`` and ``summary.json`` to ``--workdir`` (with ``--family=modern`` or ``all`` the
default work directory is ``runs/variants_modern`` / ``runs/variants_all``, so the classic table in
``runs/variants``, which the docs include, stays). Each variant is one run of the experiment pipeline
(:mod:`experiments.pipeline`) in ``<workdir>/<variant>`` with its metrics and checkpoints:
rerunning the command after a kill resumes where it stopped.

**The data** are those of :mod:`experiments.music`: by default (``--data=music21``) the Bach
chorales that ship inside the ``music21`` package, built to the JSB recipe and cached in
``~/.cache/recurrent`` after the first build (about a minute); ``--data=jsb``, ``nottingham``
or a path to any Boulanger-Lewandowski ``.mat`` file work too.

**The task** is next-step prediction of the 88-key piano roll (independent sigmoid outputs); the
metric is the NLL per time step summed over the keys (:mod:`experiments.music`). Every variant is
a recurrent layer and a linear readout to 88 logits, dropout ``dropout`` before the readout.

- ConvLSTM: each frame is a 1-D image of 88 keys with one channel, ``(88, 1)``; a 'same'
  convolution of width ``conv_kernel`` over the keys (13: an octave and its neighbours) with
  ``conv_channels`` channels per key; the readout sees the flattened ``(88 x channels)`` state.
- Bidirectional LSTM: a bidirectional layer cannot do next-step prediction honestly (its
  backward direction reads the frame it should predict). It gets the task a bidirectional model
  is made for instead, **infilling**: frame :math:`t` is predicted from the forward output at
  :math:`t-1` (it has read :math:`x_{<t}`) and the backward output at :math:`t+1` (it has read
  :math:`x_{>t}`), so it never sees :math:`x_t` itself but does see the future. Its NLL, per
  predicted (interior) frame, is therefore *not comparable* with the others' and is marked so;
  it shows the cost and the training behaviour of the bidirectional layer on the same data and
  budget.
- The modern rows run the sequential scan (``recurrent.rnn``'s default), as the classic rows do, so
  their ``ms/step`` compare; their ``cell state`` column says whether the carry holds a memory
  beside the output: the sLSTM's cell ``c`` (with normaliser ``n`` and stabiliser ``m``) and the
  mLSTM's matrix memory ``C`` (with ``n``, ``m``) do; the minGRU's and minLSTM's carry is ``h``
  alone. Their gates read the input only (``x only``), the sLSTM's and mLSTM's input gates are
  exponential (``exp i``).

**Columns.** ``compile (s)``: wall time of the train steps that compiled (the first one of each
padded batch shape: 4 with the chorales); ``ms/step``: wall time per train step without
those, evaluations and checkpoints (on a shared CPU this depends on the load);
``valid``/``test NLL``: the checkpoint with the best validation NLL (evaluated every
``eval_every`` steps), ``best step`` when that was. One seed's ranking of close variants is
anecdote, not evidence (try ``--seed=1``).

Example:

>>> from experiments import variants
>>> task = variants.make_task(variants.quick_config(), "gru")
>>> params = task.init(jax.random.key(0))
>>> sorted(params)
['readout', 'rnn']
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import recurrent
from experiments import errors, music, pipeline
from experiments.pipeline import ConfigError, DataError, field, override

__all__ = ["COLUMNS", "Config", "ConfigError", "DataError", "FAMILIES", "VARIANTS", "format_table", "get_config"]
__all__ += ["main", "make_task", "override", "quick_config", "run", "run_variant", "selected_variants"]

KEYS = music.KEYS


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """The main job's settings; ``python -m experiments.variants --help`` lists them."""

    # Resuming may change these too: which variants run, and the chorale cache's folder.
    resume_safe = pipeline.TrainConfig.resume_safe | {"variants", "family", "cache_dir"}

    data: str = field("music21", "music21 (the Bach chorales in music21) | jsb | nottingham | auto | a .mat path")
    cache_dir: str = field("", "where the music21 chorales are cached (default: ~/.cache/recurrent)")
    data_dir: str = field("", "folder of JSB_Chorales.mat / Nottingham.mat (default: ../shared/data)")
    hidden: int = field(64, "hidden units of every variant (per direction, per layer)")
    dropout: float = field(0.3, "dropout before the readout (and between the stacked layers)")
    conv_channels: int = field(4, "ConvLSTM channels per key")
    conv_kernel: int = field(13, "ConvLSTM kernel width over the keys")
    family: str = field("classic", "classic (the seven rows) | modern (slstm, mlstm, min_gru, min_lstm) | all")
    heads: int = field(4, "heads of slstm and mlstm (must divide hidden)")
    variants: str = field("all", "comma-separated names of rows of --family, or 'all'")


def get_config() -> Config:
    """The default budget: 500 Adam steps of 8 chorales each (about 18 epochs of the music21
    chorales) at 3e-3 on a cosine, for every variant: about 3.5 minutes of CPU time for the seven
    classic rows (experiments/README.md has the measured runs, the modern rows' too)."""
    return Config(
        steps=500,
        batch_size=8,
        learning_rate=3e-3,
        schedule="cosine",
        final_lr_fraction=0.05,
        eval_every=100,
        checkpoint_every=100,
        log_every=25,
        pad_multiple=64,  # 4 padded lengths for the chorales (16 gave 9): compiling costs more than padding
        progress=False,
        workdir="runs/variants",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(), steps=4, batch_size=4, hidden=4, heads=2, conv_channels=2, conv_kernel=3, eval_every=2,
        checkpoint_every=2, log_every=2, pad_multiple=16,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The variants.


def infill_features(layer: recurrent.Layer, hidden: int, params: Any, xs: jax.Array, lengths: jax.Array, key=None):
    """``(B, T-2, 2 hidden)``: for frame ``t`` (``1 .. T-2``) the forward output at ``t-1`` and the
    backward output at ``t+1`` of a bidirectional ``layer`` (concatenated outputs); neither has read ``x_t``."""
    _, ys = layer.apply(params, xs, lengths=lengths, key=key)
    return jnp.concatenate([ys[:, :-2, :hidden], ys[:, 2:, hidden:]], axis=-1)


def infill_task(layer: recurrent.Layer, hidden: int, dropout: float) -> pipeline.Task:
    """Frame ``t`` from a bidirectional ``layer``'s forward output at ``t-1`` and backward output at
    ``t+1``: neither has read ``x_t``. The loss counts the interior frames ``1 .. T-2``."""

    def init(key):
        k_rnn, k_out = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, (KEYS,)),
            "readout": {
                "kernel": jax.nn.initializers.lecun_normal()(k_out, (2 * hidden, KEYS)),
                "bias": jnp.full((KEYS,), -3.0, jnp.float32),
            },
        }

    def loss(params, batch, key):
        xs, lengths = batch
        k_rnn, k_out = jax.random.split(key) if key is not None else (None, None)
        features = infill_features(layer, hidden, params["rnn"], xs, lengths, k_rnn)
        if k_out is not None and dropout > 0:
            keep = 1.0 - dropout
            features = features * jax.random.bernoulli(k_out, keep, features.shape) / keep
        logits = features @ params["readout"]["kernel"] + params["readout"]["bias"]
        nll = optax.sigmoid_binary_cross_entropy(logits, xs[:, 1:-1]).sum(-1)
        steps = jnp.maximum(lengths - 2, 0)
        mask = jnp.arange(xs.shape[1] - 2) < steps[:, None]
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(steps).astype(jnp.float32)

    return pipeline.Task(init, loss)


class Variant(NamedTuple):
    """One variant: its name, gates, whether it has a cell state, its task, ``build(config) -> Task``
    and its family (``--family``)."""

    name: str
    gates: str
    cell_state: bool
    task: str
    build: Callable[[Config], pipeline.Task]
    family: str = "classic"


def _dense(make_cell: Callable[[Config], recurrent.Cell]) -> Callable[[Config], pipeline.Task]:
    return lambda c: music.next_step_task(recurrent.rnn(make_cell(c)), c.dropout)


def _conv(c: Config) -> pipeline.Task:
    layer = recurrent.rnn(recurrent.conv_lstm(c.conv_channels, (c.conv_kernel,)))
    return music.next_step_task(
        layer,
        c.dropout,
        input_shape=(KEYS, 1),
        to_input=lambda xs: xs[..., None],  # (B, T, 88) -> (B, T, keys=88, channels=1)
        to_features=lambda ys: ys.reshape(*ys.shape[:2], -1),  # (B, T, 88, C) -> (B, T, 88 C)
    )


def _stacked(c: Config) -> recurrent.Cell:
    return recurrent.stacked([recurrent.lstm(c.hidden), recurrent.lstm(c.hidden)], dropout=c.dropout)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("lstm", "i f o", True, "next step", _dense(lambda c: recurrent.lstm(c.hidden))),
        Variant("peephole_lstm", "i f o +peep", True, "next step", _dense(lambda c: recurrent.peephole_lstm(c.hidden))),
        Variant("cifg_lstm", "f o (i=1-f)", True, "next step", _dense(lambda c: recurrent.cifg_lstm(c.hidden))),
        Variant("gru", "r z", False, "next step", _dense(lambda c: recurrent.gru(c.hidden))),
        Variant("conv_lstm", "i f o (conv)", True, "next step", _conv),
        Variant(
            "bidirectional_lstm",
            "i f o x2 dir",
            True,
            "infilling*",
            lambda c: infill_task(recurrent.bidirectional(recurrent.lstm(c.hidden)), c.hidden, c.dropout),
        ),
        Variant("stacked_lstm", "i f o x2 layer", True, "next step", _dense(_stacked)),
        Variant(
            "slstm",
            "i f o (exp i, heads)",
            True,
            "next step",
            _dense(lambda c: recurrent.slstm(c.hidden, num_heads=c.heads)),
            "modern",
        ),
        Variant(
            "mlstm",
            "i f o (exp i, matrix C)",
            True,
            "next step",
            _dense(lambda c: recurrent.mlstm(c.hidden, num_heads=c.heads)),
            "modern",
        ),
        Variant("min_gru", "z (x only)", False, "next step", _dense(lambda c: recurrent.min_gru(c.hidden)), "modern"),
        Variant(
            "min_lstm", "f i (x only)", False, "next step", _dense(lambda c: recurrent.min_lstm(c.hidden)), "modern"
        ),
    ]
}

#: The rows of each ``--family``, in table order.
FAMILIES: dict[str, list[str]] = {
    "classic": [v.name for v in VARIANTS.values() if v.family == "classic"],
    "modern": [v.name for v in VARIANTS.values() if v.family == "modern"],
    "all": list(VARIANTS),
}


def selected_variants(config: Config) -> list[str]:
    """The variants of ``--variants``: ``all`` (every row of ``--family``) or a comma-separated subset of them."""
    families = pipeline.choices(config.family, list(FAMILIES), "family", what="family", example="modern")
    if len(families) != 1:
        raise ConfigError(f"config field 'family' takes one of {', '.join(FAMILIES)}; got {config.family!r}.")
    family = families[0]
    rows = FAMILIES[family]
    names = [s.strip() for s in config.variants.split(",") if s.strip()]
    elsewhere = [n for n in names if n in VARIANTS and n not in rows]
    if elsewhere:
        raise ConfigError(
            f"config field 'variants': {', '.join(map(repr, elsewhere))} not in --family={family}.\n"
            f"  valid:    all, {', '.join(rows)}\n  fix:      --family=all, or --family={VARIANTS[elsewhere[0]].family}"
        )
    names = pipeline.choices(config.variants, ["all", *rows], "variants", what="variant", example=",".join(rows[:2]))
    return list(rows) if "all" in names else names


def check_config(config: Config) -> Config:
    for name in ("hidden", "heads", "conv_channels", "conv_kernel"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"config field 'dropout' must be in [0, 1); got {config.dropout}.")
    for name in selected_variants(config):
        try:  # a cell refuses its options when it is built (e.g. heads that do not divide hidden)
            make_task(config, name)
        except ValueError as e:
            raise ConfigError(f"variant {name!r} refuses this config. The library says:\n{e}") from None
    return config


def family_workdir(config: Config) -> Config:
    """``--family=modern`` or ``all`` with a default work directory writes beside it, ``runs/variants_modern``
    (``_quick`` for ``--quick``), so the classic table in ``runs/variants`` stays as it is."""
    default = get_config().workdir
    if config.family == "classic" or config.workdir not in (default, f"{default}_quick"):
        return config
    return dataclasses.replace(config, workdir=f"{default}_{config.family}" + config.workdir[len(default) :])


def make_task(config: Config, variant: str) -> pipeline.Task:
    return VARIANTS[variant].build(config)


# --------------------------------------------------------------------------------------
# Runs, table, plot.

COLUMNS = ("variant", "task", "gates", "cell_state", "rnn_params", "params", "compile_s", "ms_per_step")
COLUMNS += ("train_loss", "valid_nll", "test_nll", "best_step")

# Column -> (header, format); left-aligned text columns have no format.
_TABLE = {
    "variant": ("variant", None),
    "task": ("task", None),
    "gates": ("gates", None),
    "cell_state": ("cell state", None),
    "rnn_params": ("rnn params", "d"),
    "params": ("params", "d"),
    "compile_s": ("compile (s)", ".1f"),
    "ms_per_step": ("ms/step", ".1f"),
    "train_loss": ("train loss", ".3f"),
    "valid_nll": ("valid NLL", ".3f"),
    "test_nll": ("test NLL", ".3f"),
    "best_step": ("best step", "d"),
}


def read_curves(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "valid": [(step, nll)]}`` from a run's ``metrics.jsonl``."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "valid": []}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["split"] == "train":
                curves["train"].append((row["step"], row["loss"]))
            elif row["split"] == "valid":
                curves["valid"].append((row["step"], row["nll"]))
    return curves


def run_variant(config: Config, variant: str, data: pipeline.Data) -> tuple[dict[str, Any], dict]:
    """Trains one variant in ``<workdir>/<variant>`` (resuming if it holds checkpoints); its table row and curves."""
    sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, variant))
    task = make_task(config, variant)
    result = pipeline.make_train(sub, task, data)(jax.random.key(config.seed))
    curves = read_curves(sub.workdir)
    spec = VARIANTS[variant]
    row = {
        "variant": variant,
        "task": spec.task,
        "gates": spec.gates,
        "cell_state": "yes" if spec.cell_state else "no",
        "rnn_params": recurrent.count_params(result["params"]["rnn"]),
        "params": recurrent.count_params(result["params"]),
        "compile_s": result["compile_s"],
        "ms_per_step": result["ms_per_step"],
        "train_loss": curves["train"][-1][1],
        "valid_nll": result.get("best_valid", result["valid"]),
        "test_nll": result.get("best_test", result["test"]),
        "best_step": int(result.get("best_step", config.steps)),
    }
    return row, curves


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


def plot_curves(curves: dict[str, dict], path: str, config: Config, data_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for i, (name, c) in enumerate(curves.items()):
        style = {"color": f"C{i}", "linestyle": "--" if VARIANTS[name].task != "next step" else "-"}
        label = name + (" (infilling*)" if VARIANTS[name].task != "next step" else "")
        if c["train"]:
            ax_train.plot(*zip(*c["train"]), label=label, linewidth=1.2, **style)
        if c["valid"]:
            ax_valid.plot(*zip(*c["valid"]), marker="o", markersize=3, label=label, linewidth=1.4, **style)
    ax_train.set_title(f"training loss (mean of {config.log_every} steps)")
    ax_valid.set_title("validation NLL")
    for ax in (ax_train, ax_valid):
        ax.set_xlabel("Adam step")
        ax.grid(True, alpha=0.3)
    ax_train.set_ylabel("NLL per time step (summed over 88 keys)")
    ax_valid.legend(fontsize=8)
    ax_train.set_ylim(top=min(20.0, ax_train.get_ylim()[1]))
    note = (
        "; * infilling sees the future: not comparable" if any(VARIANTS[n].task != "next step" for n in curves) else ""
    )
    fig.suptitle(
        f"{data_name}: H={config.hidden}, batch {config.batch_size}, {config.steps} steps, lr {config.learning_rate} "
        f"{config.schedule}{note}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(config: Config, rows: list[dict], curves: dict[str, dict], data_name: str) -> dict[str, str]:
    """Writes the plot, CSV, markdown and JSON to ``config.workdir``; returns their paths."""
    os.makedirs(config.workdir, exist_ok=True)
    paths = {name: os.path.join(config.workdir, name) for name in ("curves.png", "summary.csv", "summary.md")}
    paths["summary.json"] = os.path.join(config.workdir, "summary.json")
    plot_curves(curves, paths["curves.png"], config, data_name)
    with open(paths["summary.csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["summary.md"], "w") as f:
        f.write(format_table(rows) + "\n")
    with open(paths["summary.json"], "w") as f:
        summary = {"config": dataclasses.asdict(config), "data": data_name, "device": str(jax.devices()[0])}
        json.dump({**summary, "rows": rows, "curves": curves}, f, indent=1)
    return paths


def run(config: Config, data: pipeline.Data | None = None) -> dict[str, Any]:
    """Trains every selected variant with the same budget; returns rows, curves and output paths."""
    check_config(config)
    data = music.load_data(config) if data is None else data
    rows, curves = [], {}
    for name in selected_variants(config):
        row, c = run_variant(config, name, data)
        rows.append(row)
        curves[name] = c
        print(
            f"  {name:<19} compile {row['compile_s']:5.1f}s  {row['ms_per_step']:6.1f} ms/step  "
            f"valid {row['valid_nll']:.3f}  test {row['test_nll']:.3f}",
            flush=True,
        )
    paths = write_outputs(config, rows, curves, music.data_path(config))
    return {"rows": rows, "curves": curves, "paths": paths}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = pipeline.cli_config(
        argv,
        get_config(),
        quick_config(),
        "experiments.variants",
        "Trains LSTM-family variants on polyphonic music with the same budget; prints a table and writes a plot\n"
        f"and summaries to --workdir. --family=classic: {', '.join(FAMILIES['classic'])};\n"
        f"--family=modern: {', '.join(FAMILIES['modern'])}; --family=all: both.",
    )
    with errors.report():
        check_config(config)
        config = family_workdir(config)
        data = music.load_data(config)
        sizes = ", ".join(f"{len(getattr(data, s))} {s}" for s in ("train", "valid", "test"))
        print(f"data: {music.data_path(config)} ({sizes} sequences); device: {jax.devices()[0]}", flush=True)
        result = run(config, data)
    infilling = any(VARIANTS[r["variant"]].task != "next step" for r in result["rows"])
    print(
        f"\nNext-step NLL per time step (summed over 88 keys), {config.steps} Adam steps of batch {config.batch_size}, "
        f"seed {config.seed};\nvalid/test: the checkpoint with the best validation NLL."
        + (" * infilling (bidirectional): predicts frame t from both sides, not comparable." if infilling else "")
        + "\n"
    )
    print(format_table(result["rows"]))
    print("\nwrote " + ", ".join(result["paths"].values()))
    return result


if __name__ == "__main__":
    main()
