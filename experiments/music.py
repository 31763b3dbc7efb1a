r"""Polyphonic music: next-step prediction of 88-key piano rolls.

Run ``python -m experiments.music`` (``--help`` lists the fields). A recurrent layer (any
LSTM-family cell or the GRU, ``--cell``; ``--layers`` stacked) reads the rolls
:math:`x_1 \dots x_{T-1}` and a linear readout gives 88 logits per step; the loss is the
negative log-likelihood of :math:`x_2 \dots x_T` under independent Bernoulli outputs,

.. math::

    \mathrm{NLL} = -\frac{1}{\sum_n (T_n - 1)} \sum_n \sum_{t=2}^{T_n} \sum_{k=1}^{88}
        x_{t,k} \log \sigma(z_{t,k}) + (1 - x_{t,k}) \log(1 - \sigma(z_{t,k})),

per time step summed over the keys, averaged over all predicted steps of a split (the metric
of Boulanger-Lewandowski et al. 2012, Chung et al. 2014, Bai et al. 2018).

Data (``--data``): ``jsb`` or ``nottingham`` (``JSB_Chorales.mat`` / ``Nottingham.mat`` in
``--data_dir``, by default ``../shared/data`` beside the repository), or a path to any ``.mat``
file of the Boulanger-Lewandowski format (keys ``traindata``, ``validdata``, ``testdata``,
each a ``(1, N)`` object array of ``(T, 88)`` 0/1 rolls). Files are read, never copied.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recurrent
from experiments import errors, pipeline
from experiments.pipeline import ConfigError, DataError, field

KEYS = 88
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FILES = {"jsb": "JSB_Chorales.mat", "nottingham": "Nottingham.mat"}
#: Each cell of ``--cell``, built from the config: ``make(config) -> Cell``.
CELLS: dict[str, Callable[[Any], recurrent.Cell]] = {
    "lstm": lambda c: recurrent.lstm(c.hidden),
    "peephole_lstm": lambda c: recurrent.peephole_lstm(c.hidden),
    "cifg_lstm": lambda c: recurrent.cifg_lstm(c.hidden),
    "gru": lambda c: recurrent.gru(c.hidden),
    "slstm": lambda c: recurrent.slstm(c.hidden, num_heads=c.heads),
    "mlstm": lambda c: recurrent.mlstm(c.hidden, num_heads=c.heads),
    "min_gru": lambda c: recurrent.min_gru(c.hidden),
    "min_lstm": lambda c: recurrent.min_lstm(c.hidden),
    **{f"greff_{n}": lambda c, n=n: recurrent.lstm_variant(n, c.hidden) for n in recurrent.GREFF_VARIANTS},
}


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Polyphonic music settings; ``python -m experiments.music --help`` lists them."""

    # Resuming may change these too: the chorale cache's folder.
    resume_safe = pipeline.TrainConfig.resume_safe | {"cache_dir"}

    data: str = field(
        "auto", "auto (jsb if its file is at hand, else music21) | jsb | nottingham | music21 | path to a .mat file"
    )
    cache_dir: str = field("", "where the music21 chorales are cached (default: ~/.cache/recurrent)")
    data_dir: str = field("", "folder of JSB_Chorales.mat / Nottingham.mat (default: ../shared/data)")
    cell: str = field("lstm", f"{' | '.join(CELLS)}")
    hidden: int = field(200, "hidden units per layer")
    heads: int = field(4, "heads of the sLSTM and mLSTM (--cell=slstm|mlstm)")
    layers: int = field(1, "stacked recurrent layers")
    input_dropout: float = field(0.0, "dropout on the input rolls")
    dropout: float = field(0.5, "dropout on the recurrent outputs (before the readout) and between layers")
    zoneout: float = field(0.0, "zoneout on the carry")
    recurrent_dropout: float = field(0.0, "variational dropout on the recurrent input h (one mask per sequence)")


def get_config() -> Config:
    """The JSB config: 300 units with variational recurrent dropout 0.25 and dropout 0.5 before the
    readout, one sequence per Adam step at a constant 1e-3 (the gradient noise of batch 1
    regularises better than annealing), the checkpoint with the best validation NLL kept, batches
    padded to at most 8 geometric buckets. It reaches test NLL 8.343 (LSTM) and 8.356 / 8.375 (GRU,
    ``--cell=gru``; final / best-valid checkpoint) on JSB (experiments/README.md). About 100 s of
    CPU time, 2-5 minutes on a shared 2-core CPU."""
    return Config(
        hidden=300,
        recurrent_dropout=0.25,
        steps=4000,
        batch_size=1,
        learning_rate=1e-3,
        schedule="constant",
        eval_every=250,
        checkpoint_every=250,
        log_every=50,
        buckets="geometric",  # at most 8 padded lengths: long pieces compile a few shapes, not one per 16 steps
        workdir="runs/music",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(), steps=6, batch_size=4, hidden=8, eval_every=3, checkpoint_every=2, log_every=2, progress=False
    )


def check_config(config: Config) -> Config:
    if config.cell not in CELLS:
        raise ConfigError(f"unknown cell {config.cell!r}.\n  valid:    {', '.join(CELLS)}\n  fix:      e.g. --cell=gru")
    for name in ("hidden", "layers"):
        if getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be >= 1; got {getattr(config, name)}.")
    for name in ("input_dropout", "dropout", "zoneout", "recurrent_dropout"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"config field {name!r} must be in [0, 1); got {getattr(config, name)}.")
    return config


# --------------------------------------------------------------------------------------
# Data.


def data_path(config: Config) -> str:
    """The ``.mat`` file the config names, or ``"music21"``."""
    name = config.data
    folder = config.data_dir or os.path.join(REPO_ROOT, "..", "shared", "data")
    if name == "auto":
        jsb = os.path.normpath(os.path.join(folder, DATA_FILES["jsb"]))
        return jsb if os.path.isfile(jsb) else "music21"
    if name in DATA_FILES:
        return os.path.normpath(os.path.join(folder, DATA_FILES[name]))
    return name


def load_mat(path: str) -> pipeline.Data:
    """The three splits of a Boulanger-Lewandowski ``.mat`` file as lists of ``(T, 88)`` float32 rolls.

    Raises :class:`DataError` naming the file, what was expected and the fix.
    """
    import scipy.io

    if not os.path.isfile(path):
        raise DataError(
            f"music data file not found: {path}\n"
            "  expected: a Boulanger-Lewandowski .mat file (JSB_Chorales.mat, Nottingham.mat, ...)\n"
            "  fix:      pass --data=PATH/TO/FILE.mat, or --data=jsb --data_dir=FOLDER holding JSB_Chorales.mat."
        )
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several types for a non-.mat file
        raise DataError(
            f"{path} is not a readable MATLAB .mat file ({type(e).__name__}: {e}).\n"
            "  fix:      pass the original JSB_Chorales.mat / Nottingham.mat / MuseData.mat / Piano-midi.de.mat."
        ) from None
    splits = []
    for key in ("traindata", "validdata", "testdata"):
        if key not in mat:
            raise DataError(
                f"{path} has no {key!r}.\n  expected: keys traindata, validdata, testdata\n"
                f"  got:      {sorted(k for k in mat if not k.startswith('__'))}"
            )
        rolls = []
        for i, roll in enumerate(np.asarray(mat[key], dtype=object).ravel()):
            roll = np.asarray(roll)
            if roll.ndim != 2 or roll.shape[1] != KEYS or roll.shape[0] < 2:
                raise DataError(
                    f"{path}: {key}[{i}] is not a piano roll.\n"
                    f"  expected: a (T >= 2, {KEYS}) array of 0/1\n  got:      shape {roll.shape}"
                )
            rolls.append(roll.astype(np.float32))
        if not rolls:
            raise DataError(f"{path}: {key} holds no sequences.")
        splits.append(rolls)
    return pipeline.Data(*splits)


def chorale_roll(path: str) -> np.ndarray | None:
    """One chorale of the music21 corpus as a JSB-style ``(T, 88)`` roll, or None if it has not 4 parts.

    The JSB recipe: transposed to C major / C minor (the nearer way), sampled on a
    quarter-note grid (a key sounds at step ``t`` if a note covers quarter ``t``).
    """
    from music21 import converter

    score = converter.parse(path)
    if len(score.parts) != 4:
        return None
    shift = -score.analyze("key").tonic.pitchClass % 12
    score = score.transpose(shift - 12 if shift > 6 else shift)
    roll = np.zeros((int(np.ceil(float(score.highestTime))), KEYS), np.uint8)
    for note in score.flatten().notes:
        on, off = float(note.offset), float(note.offset + note.quarterLength)
        steps = np.arange(int(np.ceil(on)), int(np.ceil(off)))
        for p in note.pitches:
            if 21 <= p.midi <= 108 and len(steps):
                roll[steps, p.midi - 21] = 1
    return roll if len(roll) >= 2 else None


def build_music21_chorales(cache_dir: str = "", limit: int = 0, seed: int = 0) -> pipeline.Data:
    """The Bach chorales of the ``music21`` corpus built to the JSB recipe, split 60/20/20 by a fixed
    seed, cached as ``music21_chorales[_<limit>].npz`` after the first build (minutes)."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "recurrent")
    path = os.path.join(cache_dir, f"music21_chorales{f'_{limit}' if limit else ''}.npz")
    if not os.path.isfile(path):
        try:
            from music21 import corpus
        except ImportError:
            raise DataError(
                "no music data at hand: the default data set needs the music21 package.\n"
                "  fix:      pip install music21, or pass --data=PATH/TO/JSB_Chorales.mat."
            ) from None
        files = sorted(str(p) for p in corpus.getComposer("bach") if str(p).endswith((".mxl", ".xml", ".krn")))
        files = files[:limit] if limit else files
        print(f"building the music21 Bach chorales ({len(files)} files) into {path} ...", flush=True)
        rolls = [r for r in map(chorale_roll, files) if r is not None]
        order = np.random.default_rng(seed).permutation(len(rolls))
        n_train, n_valid = int(0.6 * len(rolls)), int(0.2 * len(rolls))
        split = {
            "train": order[:n_train],
            "valid": order[n_train : n_train + n_valid],
            "test": order[n_train + n_valid :],
        }
        os.makedirs(cache_dir, exist_ok=True)
        arrays = {}
        for name, idx in split.items():
            arrays[f"{name}_rolls"] = np.concatenate([rolls[i] for i in idx]) if len(idx) else np.zeros((0, KEYS))
            arrays[f"{name}_lengths"] = np.array([len(rolls[i]) for i in idx], np.int64)
        np.savez_compressed(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
    with np.load(path) as f:
        splits = []
        for name in ("train", "valid", "test"):
            bounds = np.cumsum(f[f"{name}_lengths"])[:-1]
            rolls = np.split(f[f"{name}_rolls"].astype(np.float32), bounds)
            if not len(f[f"{name}_lengths"]):
                raise DataError(f"{path}: the {name} split is empty.\n  fix:      build with more chorales.")
            splits.append(rolls)
    return pipeline.Data(*splits)


def load_data(config: Config) -> pipeline.Data:
    path = data_path(config)
    if path == "music21":
        return build_music21_chorales(config.cache_dir)
    return load_mat(path)


# --------------------------------------------------------------------------------------
# The model.


def make_cell(config: Config) -> recurrent.Cell:
    return CELLS[config.cell](config)


def make_task(config: Config) -> pipeline.Task:
    cells = [make_cell(config) for _ in range(config.layers)]
    cell = cells[0] if config.layers == 1 else recurrent.stacked(cells, dropout=config.dropout)
    layer = recurrent.rnn(
        cell, input_dropout=config.input_dropout, zoneout=config.zoneout, recurrent_dropout=config.recurrent_dropout
    )
    return next_step_task(layer, config.dropout)


def next_step_task(
    layer: recurrent.Layer,
    dropout: float,
    input_shape: tuple[int, ...] = (KEYS,),
    to_input: Any = None,
    to_features: Any = None,
) -> pipeline.Task:
    """Next-step prediction with ``layer`` and a linear readout to 88 logits (any recurrent layer:
    ``to_input`` maps the ``(B, T, 88)`` rolls to its input layout, ``to_features`` its outputs to
    ``(B, T, F)``); ``dropout`` before the readout."""
    to_input = to_input or (lambda xs: xs)
    to_features = to_features or (lambda ys: ys)
    features = math.prod(layer.output_shape(input_shape))

    def init(key):
        k_rnn, k_out = jax.random.split(key)
        return {
            "rnn": layer.init(k_rnn, input_shape),
            "readout": {
                "kernel": jax.nn.initializers.lecun_normal()(k_out, (features, KEYS)),
                "bias": jnp.full((KEYS,), -3.0, jnp.float32),  # most keys are off: start near the mean activity
            },
        }

    def loss(params, batch, key):
        xs, lengths = batch
        inputs, targets = xs[:, :-1], xs[:, 1:]
        steps = jnp.maximum(lengths - 1, 0)
        k_rnn, k_out = jax.random.split(key) if key is not None else (None, None)
        _, ys = layer.apply(params["rnn"], to_input(inputs), lengths=steps, key=k_rnn)
        ys = to_features(ys)
        if k_out is not None and dropout > 0:
            keep = 1.0 - dropout
            ys = ys * jax.random.bernoulli(k_out, keep, ys.shape) / keep
        logits = ys @ params["readout"]["kernel"] + params["readout"]["bias"]
        nll = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
        mask = jnp.arange(inputs.shape[1]) < steps[:, None]
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(steps).astype(jnp.float32)

    return pipeline.Task(init, loss)


def make_train(config: Config, data: pipeline.Data | None = None):
    """``train(key) -> result``; loads the data first, so a bad file fails before any compilation."""
    check_config(config)
    data = load_data(config) if data is None else data
    return pipeline.make_train(config, make_task(config), data)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.music", "Next-step prediction of 88-key piano rolls."
    )
    with errors.report():
        check_config(config)
        train = make_train(config)
        print(f"data: {data_path(config)}  cell: {config.cell}  device(s): {jax.devices()}", flush=True)
        result = train(jax.random.key(config.seed))
    line = f"final: valid NLL {result['valid']:.4f}, test NLL {result['test']:.4f}"
    if "best_step" in result:
        line += f"; best (step {result['best_step']}): valid {result['best_valid']:.4f}, test {result['best_test']:.4f}"
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
