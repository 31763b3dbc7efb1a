"""What the benchmarks here share: the interleaved timer and the JSON writer of ``--out``.

On a shared machine the load drifts during a run; timing every contender once per repeat, in
an order that alternates between repeats, exposes them all to the same drift, so that the
ratios of their medians mean something even when the absolute times do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any


@contextlib.contextmanager
def autodiff_kernel_matmul():
    """Within: the library's kernel matmuls (``recurrent._core._kernel_matmul``) as a plain
    ``jnp.matmul`` that JAX differentiates itself, the path before that derivative. Programs
    traced inside keep it."""
    import jax.numpy as jnp

    from recurrent import _core

    saved = _core._kernel_matmul
    _core._kernel_matmul = lambda a, b, out: jnp.matmul(a, b, preferred_element_type=out)
    try:
        yield
    finally:
        _core._kernel_matmul = saved


def timed(fn: Callable[[], Any], number: int = 1) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls (``fn`` must block)."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def calls_per_sample(fn: Callable[[], Any], seconds: float = 0.05, most: int = 20) -> int:
    """How many back-to-back calls of ``fn`` make one sample of at least ``seconds``."""
    return max(1, min(most, int(seconds / max(timed(fn), 1e-6))))


def interleaved(
    calls: Mapping[tuple[Hashable, Hashable], Callable[[], Any]],
    repeats: int,
    number: int | Mapping[tuple[Hashable, Hashable], int] = 1,
) -> dict[tuple[Hashable, Hashable], list[float]]:
    """Milliseconds per call of each ``calls[contender, workload]`` (a blocking function), one
    sample per repeat: each repeat times every workload's contenders in turn, in insertion
    order on even repeats and reversed on odd ones. ``number`` is calls per sample (one for
    all, or per key)."""
    contenders = list(dict.fromkeys(c for c, _ in calls))
    workloads = list(dict.fromkeys(w for _, w in calls))
    samples: dict[tuple[Hashable, Hashable], list[float]] = {key: [] for key in calls}
    for r in range(repeats):
        for w in workloads:
            for c in contenders if r % 2 == 0 else contenders[::-1]:
                if (c, w) in calls:
                    n = number if isinstance(number, int) else number[c, w]
                    samples[c, w].append(timed(calls[c, w], n) * 1e3)
    return samples


def int_list(parser: argparse.ArgumentParser, flag: str, text: str, *, least: int, example: str) -> list[int]:
    """The integers of a comma-separated command-line value (``"1,2,4"``), each at least
    ``least``; anything else ends the program with ``parser.error`` saying what was expected."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers such as {example}, got {text!r}")
    if not values or min(values) < least:
        parser.error(f"{flag}: every value must be >= {least}, got {text!r}")
    return values


def write_json(path: str, result: dict) -> None:
    """Writes ``result`` to ``path`` as indented JSON, making the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
