"""Runs an experiment's ``main`` in this process with a SIGKILL at a chosen point: the fault injection
of tests/test_faults.py.

    FAULT=KIND:N python -m tests.faults experiments.music --field=value ...

kills the process (``SIGKILL``: no cleanup, no ``finally``) at the ``N``-th event of ``KIND``:

- ``save_latest`` / ``save_best``: right after a checkpoint of ``checkpoints/`` / ``best/`` was saved;
- ``finalize``: during a save, inside orbax, after the arrays are written and before the
  temporary folder is renamed to the step (what a kill in the middle of a save leaves);
- ``evaluate``: at the start of an evaluation (``evaluate`` runs at every validation and for
  the final results after the last step);
- ``write``: before a metric row is written;
- ``any``: the ``N``-th event of any of these kinds.

Without ``FAULT`` (or with ``FAULT=count``) the run goes to its end; with ``FAULT=count`` it
prints ``events: K`` last, the number of events it passed.
"""

import os
import runpy
import signal
import sys

from experiments import pipeline, workdir

KINDS = ("save_latest", "save_best", "finalize", "evaluate", "write")
counts = dict.fromkeys((*KINDS, "any"), 0)
FAULT = os.environ.get("FAULT", "")
kind, _, nth = FAULT.partition(":")


def event(name: str) -> None:
    counts[name] += 1
    counts["any"] += 1
    if kind in (name, "any") and counts[kind] == int(nth):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, attr, before=None, after=None):
    original = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = original(*args, **kwargs)
        if after:
            after(*args, **kwargs)
        return out

    setattr(owner, attr, wrapped)


def install() -> None:
    from orbax.checkpoint._src.path import atomicity

    def saved(self, step, *args, **kwargs):
        event("save_best" if self.best else "save_latest")

    def finalize(*args, **kwargs):
        event("finalize")

    wrap(workdir.Checkpoints, "save", after=saved)
    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        original = cls.finalize

        async def finalized(self, *args, _original=original, **kwargs):
            finalize()
            return await _original(self, *args, **kwargs)

        cls.finalize = finalized
    wrap(pipeline, "evaluate", before=lambda *a, **k: event("evaluate"))
    wrap(pipeline.MetricsWriter, "write", before=lambda *a, **k: event("write"))


if __name__ == "__main__":
    install()
    module, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        if kind == "count":
            print(f"events: {counts['any']}", flush=True)
