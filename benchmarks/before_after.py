"""Two versions of the library in one process, timed interleaved: the library as it is against the
library at an earlier git revision, on the suite's cases.

Run ``python -m benchmarks.before_after --before REV [--cases lstm,gru,bidirectional,stacked4]
[--repeats 7] [--out DIR]``. The earlier version is read with ``git archive REV recurrent`` into a
temporary package ``recurrent_before`` (its imports renamed), so both build the suite's layers
(``benchmarks.suite.ours``) on the same inputs; each repeat times every version's forward and
forward+backward in turn, the order alternating, as the suite does for its contenders. The table
gives medians, the ratio after / before (below 1: faster now) and the forward+backward compile time
of each version (the least of ``--compiles`` fresh builds, since one compile varies by 20-50 %).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

from benchmarks import suite
from benchmarks._common import calls_per_sample, interleaved

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_before(rev: str, folder: str):
    """The package ``recurrent`` at git revision ``rev``, importable as ``recurrent_before``."""
    archive = subprocess.run(["git", "archive", rev, "recurrent"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    root = os.path.join(folder, "recurrent_before")
    os.rename(os.path.join(folder, "recurrent"), root)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    text = f.read()
                # the package in imports and dotted names, not a local variable called `recurrent`
                text = re.sub(
                    r"\b(?<=import )recurrent\b|\b(?<=from )recurrent\b|\brecurrent(?=\.)", "recurrent_before", text
                )
                with open(path, "w") as f:
                    f.write(text)
    sys.path.insert(0, folder)
    return importlib.import_module("recurrent_before")


def build(lib, name: str):
    """The suite's layer of case ``name`` built with ``lib``: ``(forward, forward_backward, compile_s)``."""
    previous, suite.recurrent = suite.recurrent, lib
    try:
        kind, B, T, F, H, layers, xs = suite.case_inputs(name)
        fwd, fwdbwd, compile_s, _ = suite.ours(kind, B, T, F, H, layers, xs)
    finally:
        suite.recurrent = previous
    return fwd, fwdbwd, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the earlier version")
    parser.add_argument("--cases", default="lstm,gru,bidirectional,stacked4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compiles", type=int, default=2)
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args(argv)
    cases = suite.case_names(parser, args.cases)
    import recurrent

    with tempfile.TemporaryDirectory() as folder:
        libs = {"before": load_before(args.before, folder), "after": recurrent}
        rows = []
        for name in cases:
            built = {v: build(lib, name) for v, lib in libs.items()}
            compile_s = {v: min([built[v][2]] + [build(lib, name)[2] for _ in range(args.compiles - 1)])
                         for v, lib in libs.items()}  # fmt: skip
            calls = {(v, w): built[v][w] for v in libs for w in (0, 1)}
            for fn in calls.values():
                fn()
            samples = interleaved(calls, args.repeats, {k: calls_per_sample(fn) for k, fn in calls.items()})
            med = {k: statistics.median(s) for k, s in samples.items()}
            rows.append(
                {
                    "case": name,
                    **{f"{v}_{what}_ms": med[v, w] for v in libs for w, what in ((0, "fwd"), (1, "fwdbwd"))},
                    "after_over_before_fwd": med["after", 0] / med["before", 0],
                    "after_over_before_fwdbwd": med["after", 1] / med["before", 1],
                    **{f"{v}_compile_s": compile_s[v] for v in libs},
                    "samples": {f"{v}_{w}": samples[v, w] for v in libs for w in (0, 1)},
                }
            )
            print(_line(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    result = {"command": "python -m benchmarks.before_after " + " ".join(argv or sys.argv[1:]), "rows": rows,
              "environment": suite.speed_environment()}  # fmt: skip
    with open(os.path.join(args.out, "before_after.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _line(r):
    fwd = f"fwd {r['before_fwd_ms']:8.2f} -> {r['after_fwd_ms']:8.2f} ms ({r['after_over_before_fwd']:.3f}x)"
    ratio = r["after_over_before_fwdbwd"]
    both = f"fwd+bwd {r['before_fwdbwd_ms']:8.2f} -> {r['after_fwdbwd_ms']:8.2f} ms ({ratio:.3f}x)"
    return f"{r['case']:<14} {fwd}   {both}   compile {r['before_compile_s']:.2f} -> {r['after_compile_s']:.2f} s"


if __name__ == "__main__":
    main()
