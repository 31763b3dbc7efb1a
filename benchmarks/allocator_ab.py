"""glibc's allocator settings against the suite's CPU timings, ours and PyTorch's, each in child processes.

Run ``python -m benchmarks.allocator_ab [--cases lstm,gru] [--rounds 2] [--repeats 7] [--quick]
[--out PATH.json]``.

XLA's CPU runtime allocates each call's temporary buffers with ``malloc``, and PyTorch its
workspaces. glibc serves an allocation above its mmap threshold (dynamic, but never above 32 MB
unless set) with fresh pages from the kernel and unmaps them on ``free``, so every call pays a page
fault for each 4 KB it touches again: at the suite's LSTM shape our forward+backward program has
about 35 MB of temporaries, and PyTorch's oneDNN LSTM more. Setting ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` keeps that memory in the process (at the price of not returning freed
memory to the system while the process runs).

glibc reads these variables when a process starts, so each setting runs in a child process of its
own (``--child``), and the rounds alternate the two settings so that a drift of the machine's load
reaches both. Each child times, interleaved, the library's layer (default and, where the cell has
it, ``implementation="vjp"``) and PyTorch's (when installed and a peer of the case), forward and
forward+backward, on the suite's shapes, and counts the minor page faults of a forward+backward
call (``getrusage``); the parent reports the median over rounds of each child's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the children import benchmarks from here
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
SETTINGS = ("glibc default", "tuned")
CASES = "lstm,gru"
CONTENDERS = ("ours", "ours_vjp", "torch")  # of benchmarks.suite's contenders, those a case has


def _child(cases: list[str], repeats: int, quick: bool) -> dict:
    from benchmarks import suite
    from benchmarks._common import calls_per_sample, interleaved

    out = {}
    for name in cases:
        kind, B, T, F, H, layers, xs = suite.case_inputs(name, quick)
        built = {}
        for label, build in suite.contenders_for(kind, layers, quick).items():
            if label in CONTENDERS:
                try:
                    built[label] = build(kind, B, T, F, H, layers, xs)
                except ImportError:  # PyTorch not installed
                    pass
        calls = {(key, w): built[key][w] for key in built for w in (0, 1)}
        for fn in calls.values():  # warm up: the first calls set glibc's dynamic thresholds
            fn()
            fn()
        samples = interleaved(calls, repeats, {key: calls_per_sample(fn) for key, fn in calls.items()})
        out[name] = {f"{key}/{('fwd', 'fwdbwd')[w]}": statistics.median(v) for (key, w), v in samples.items()}
        out[name].update({f"{key}/fwdbwd_page_faults": _page_faults(built[key][1]) for key in built})
    return out


def _page_faults(fn, calls: int = 5) -> float:
    """Minor page faults of this process per call of ``fn`` (pages touched for the first time
    since the kernel handed them out)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help=f"comma-separated cases of benchmarks.suite (default {CASES})")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per setting, alternating")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats in each child")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from benchmarks import suite

    names = suite.case_names(parser, args.cases)
    if args.child:
        print(json.dumps(_child(names, args.repeats, args.quick)))
        return None

    rounds = 1 if args.quick else args.rounds
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    command = [sys.executable, "-m", "benchmarks.allocator_ab", "--child", "--cases", ",".join(names)]
    command += ["--repeats", str(2 if args.quick else args.repeats)] + (["--quick"] if args.quick else [])
    runs = {setting: [] for setting in SETTINGS}
    for r in range(rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            env = {**base_env, **(TUNED if setting == "tuned" else {})}
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"allocator_ab: the child ({setting}) failed:\n{done.stderr[-3000:]}")
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds}: {setting} done", flush=True)

    result = {"cpu_count": os.cpu_count(), "tuned_environment": TUNED, "rounds": rounds, "cases": {}}
    for name in names:
        keys = runs[SETTINGS[0]][0][name]
        ms = {s: {k: statistics.median(run[name][k] for run in runs[s]) for k in keys} for s in SETTINGS}
        result["cases"][name] = {"ms": ms, "per_round_ms": {s: [run[name] for run in runs[s]] for s in SETTINGS}}
        print(f"\n{name}: ms (median over {rounds} round(s)); tuned = {' '.join(f'{k}={v}' for k, v in TUNED.items())}")
        print(f"{'contender':28s} {'glibc default':>14s} {'tuned':>10s} {'default/tuned':>14s}")
        for k in keys:
            a, b = ms["glibc default"][k], ms["tuned"][k]
            ratio = f"{a / b:13.2f}x" if not k.endswith("page_faults") else ""
            print(f"{k:28s} {a:14.2f} {b:10.2f} {ratio}")
        if "torch/fwdbwd" in keys:
            for s in SETTINGS:
                ratio = ms[s]["ours/fwdbwd"] / ms[s]["torch/fwdbwd"]
                print(f"ours / PyTorch, forward+backward, {s}: {ratio:.2f}")
    if args.out:
        from benchmarks._common import write_json

        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
