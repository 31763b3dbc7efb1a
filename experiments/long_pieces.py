r"""A polyphonic music file of long pieces, built from the music21 corpus, for measuring batching schemes.

    python -m experiments.long_pieces --out=runs/data/music21_long.mat

JSB and Nottingham are short and even (Nottingham: 40 to 1,788 frames, three quarters under 260); the other
Boulanger-Lewandowski files (Piano-midi.de, MuseData) hold pieces of thousands of frames with a long tail, and
on those padding every batch to a multiple of ``--pad_multiple`` compiles a program per multiple. This builds a
file of that kind from the scores that ship inside the ``music21`` package (no download): the string quartets
and piano works of Beethoven, Mozart, Haydn, the Schumanns and the other single works of the corpus, the
Monteverdi madrigals, the trecento pieces and every ``--palestrina_every``-th Palestrina movement; Bach is left
out (JSB is the chorales). Each score is sampled on a grid of ``--steps_per_quarter`` steps per quarter note
(1: the JSB grid; a key sounds at step ``t`` if a note covers it), not transposed, repeats not expanded,
and the pieces are split 70/15/15 by ``--seed``. The result is a Boulanger-Lewandowski ``.mat`` file (keys
``traindata``, ``validdata``, ``testdata``) that ``python -m experiments.music --data=PATH`` reads.
Building takes 5-15 minutes of one CPU core (music21 parses a large quartet in 5-20 s); it prints the
length distribution at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from experiments.music import KEYS
from experiments.pipeline import DataError, field

#: Folders of the music21 corpus used whole; Palestrina is thinned by ``--palestrina_every``. Left out: Bach
#: (the chorales are JSB), collections of many tunes in one file (ryansMammoth, essenFolksong, oneills1850,
#: airdsAirs, nottingham-dataset), demos, exercises and lead sheets.
COMPOSERS = ("beethoven", "mozart", "haydn", "schumann_robert", "schumann_clara", "chopin", "handel", "schubert",
             "corelli", "cpebach", "weber", "verdi", "joplin", "beach", "johnson_j_r", "liliuokalani", "schoenberg",
             "webern", "monteverdi", "trecento", "josquin", "ciconia", "luca", "lusitano", "palestrina")  # fmt: skip
#: Score formats, the preferred first: a piece in two formats is taken once.
FORMATS = (".mxl", ".xml", ".musicxml", ".krn", ".mid", ".abc")


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = field("runs/data/music21_long.mat", "the .mat file to write")
    steps_per_quarter: int = field(1, "time steps per quarter note (1: the JSB grid)")
    palestrina_every: int = field(4, "take every N-th of the 1,318 Palestrina movements (1: all)")
    seed: int = field(0, "seed of the 70/15/15 split")
    limit: int = field(0, "testing only: at most this many scores (0: all)")


def corpus_files(palestrina_every: int) -> list[str]:
    """The selected scores of the music21 corpus, sorted, one format per piece."""
    from music21 import corpus

    chosen: dict[str, str] = {}
    for path in sorted(str(p) for p in corpus.getPaths()):
        rel = path.replace(os.sep, "/").split("/corpus/", 1)[-1]
        stem, ext = os.path.splitext(rel)
        if rel.split("/", 1)[0] not in COMPOSERS or ext not in FORMATS:
            continue
        if stem not in chosen or FORMATS.index(ext) < FORMATS.index(os.path.splitext(chosen[stem])[1]):
            chosen[stem] = path
    files = [chosen[s] for s in sorted(chosen)]
    palestrina = [f for f in files if "/palestrina/" in f.replace(os.sep, "/")]
    keep = set(palestrina[::palestrina_every])
    return [f for f in files if f not in palestrina or f in keep]


def piano_roll(path: str, steps_per_quarter: int) -> np.ndarray | None:
    """A score as a ``(T, 88)`` uint8 roll on a grid of ``steps_per_quarter`` steps per quarter, or None if
    it holds fewer than 2 steps."""
    from music21 import converter

    score = converter.parse(path)
    if hasattr(score, "scores"):  # an opus of several scores: the first
        score = score.scores[0]
    T = int(np.ceil(float(score.highestTime) * steps_per_quarter))
    roll = np.zeros((T, KEYS), np.uint8)
    for note in score.flatten().notes:
        on = float(note.offset) * steps_per_quarter
        off = on + float(note.quarterLength) * steps_per_quarter
        steps = np.arange(int(np.ceil(on)), min(int(np.ceil(off)), T))
        for p in note.pitches:
            if 21 <= p.midi <= 108 and len(steps):
                roll[steps, p.midi - 21] = 1
    return roll if T >= 2 else None


def build(config: Config) -> dict[str, list[np.ndarray]]:
    try:
        import music21  # noqa: F401
    except ImportError:
        raise DataError(
            "building the long-piece file needs the music21 package.\n  fix:      pip install music21"
        ) from None
    files = corpus_files(config.palestrina_every)
    files = files[: config.limit] if config.limit else files
    print(f"parsing {len(files)} scores of the music21 corpus ...", flush=True)
    rolls, t0 = [], time.perf_counter()
    for i, path in enumerate(files):
        try:
            roll = piano_roll(path, config.steps_per_quarter)
        except Exception as e:  # noqa: BLE001 - music21 raises many types on a score it cannot read
            print(f"  skipped {path}: {type(e).__name__}: {str(e)[:80]}", flush=True)
            continue
        if roll is not None:
            rolls.append(roll)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(files)} scores, {time.perf_counter() - t0:.0f} s", flush=True)
    if len(rolls) < 3:
        raise DataError(f"only {len(rolls)} scores could be read.\n  fix:      check the music21 installation.")
    order = np.random.default_rng(config.seed).permutation(len(rolls))
    n_valid = n_test = max(1, int(0.15 * len(rolls)))
    n_train = len(rolls) - n_valid - n_test
    parts = {"traindata": order[:n_train], "validdata": order[n_train : n_train + n_valid],
             "testdata": order[n_train + n_valid :]}  # fmt: skip
    return {key: [rolls[i] for i in idx] for key, idx in parts.items()}


def write_mat(path: str, splits: dict[str, list[np.ndarray]]) -> None:
    import scipy.io

    arrays = {}
    for key, rolls in splits.items():
        cell = np.empty((1, len(rolls)), dtype=object)
        for i, roll in enumerate(rolls):
            cell[0, i] = roll
        arrays[key] = cell
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scipy.io.savemat(path + ".tmp.mat", arrays)
    os.replace(path + ".tmp.mat", path)


def describe(splits: dict[str, list[np.ndarray]]) -> str:
    lines = []
    for key, rolls in splits.items():
        n = np.array([len(r) for r in rolls])
        q = np.percentile(n, [50, 90, 99]).round().astype(int)
        lines.append(f"{key}: {len(n)} pieces, {n.sum()} frames; length min {n.min()}, median {q[0]}, "
                     f"90% {q[1]}, 99% {q[2]}, max {n.max()}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.long_pieces", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    config = Config(**vars(parser.parse_args(argv)))
    splits = build(config)
    write_mat(config.out, splits)
    print(describe(splits))
    print(f"wrote {config.out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
