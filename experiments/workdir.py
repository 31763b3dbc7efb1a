r"""A run's work directory, and what a rerun does with it: nothing lost, nothing silently wrong.

A work directory holds ``config.json``, ``checkpoints/`` (the latest few), ``best/`` (the best
by validation NLL), ``metrics.jsonl`` / ``metrics.csv``, ``tb/``, ``result.json`` and
``final_params.npz``. Rerunning a command in it:

- **same config**: resumes from the newest checkpoint that restores; the data order and the
  PRNG stream are functions of the step, so the result is bit-identical to an uninterrupted
  run on CPU. A step that is already saved (in ``best/`` after a kill before the next
  ``checkpoints/`` save, or after falling back past a damaged checkpoint) is not saved again:
  the rerun replays the same trajectory.
- **changed config**: refused with a :class:`ConfigMismatch` that names the differing fields,
  before anything on disk is touched, unless only fields that cannot change the result differ
  (:attr:`~experiments.pipeline.TrainConfig.resume_safe`: ``steps`` extended under a
  constant learning rate, logging, progress, checkpoint frequency). The ways out: a new
  ``--workdir``, or ``--overwrite=true`` (which deletes the run's files first).
- **damage** (truncated files, a half-written ``*.orbax-checkpoint-tmp*`` folder of a killed
  save, unreadable metadata, in ``checkpoints/`` or ``best/``): the damaged checkpoint is
  moved aside to ``corrupt-<step>`` with a warning, temporary folders are removed, and the
  run goes on from the newest checkpoint that restores.
- **read-only or full disk**: a one-line :class:`StorageError` (checked before anything
  compiles, and at every write); after space is freed the same command resumes.

With several processes (``--distributed=true``) every process reads the work directory, process 0
alone writes its files (:func:`primary`), and the processes wait for each other (:func:`barrier`)
where one must see what another wrote; the orbax checkpoints are written by all together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from experiments.errors import ConfigMismatch, StorageError

# What the pipeline writes into a work directory; --overwrite=true deletes exactly these.
RUN_FILES = ("config.json", "checkpoints", "best", "metrics.jsonl", "metrics.csv", "tb", "result.json",
             "final_params.npz")  # fmt: skip


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "file too large",
}
_STORAGE_WORDS = {  # how tensorstore and orbax report them in their own exceptions
    "No space left on device": _STORAGE_ERRNOS[errno.ENOSPC],
    "RESOURCE_EXHAUSTED": _STORAGE_ERRNOS[errno.ENOSPC],
    "Disk quota exceeded": _STORAGE_ERRNOS[errno.EDQUOT],
    "Read-only file system": _STORAGE_ERRNOS[errno.EROFS],
    "Permission denied": _STORAGE_ERRNOS[errno.EACCES],
    "File too large": _STORAGE_ERRNOS[errno.EFBIG],
}


def primary() -> bool:
    """Whether this process writes the run's files: process 0 (the only one of a single-process run)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (the same in all of them: no paths, which may
    differ between hosts); returns at once in a single-process run."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def storage_reason(error: BaseException) -> str | None:
    """Why ``error`` is a storage failure (full disk, read-only, ...), or None if it is not one.

    Looks through the exception chain: orbax and tensorstore wrap the ``OSError`` in their own
    exceptions (``RESOURCE_EXHAUSTED`` and ``ENOSPC`` in the message).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[error.errno]
        text = str(error)
        for word, reason in _STORAGE_WORDS.items():
            if word in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def writing(what: str, path: str, resume_hint: str = "") -> Iterator[None]:
    """Turns a storage failure while writing ``what`` to ``path`` into a one-line :class:`StorageError`."""
    try:
        yield
    except Exception as e:
        reason = storage_reason(e)
        if reason is None:
            raise
        _REPORTED.storage_failure_reported()
        hint = resume_hint or "rerun the same command"
        raise StorageError(
            f"cannot write {what} to {path}: {reason}. Free space or fix the permissions (or pass another "
            f"--workdir), then {hint}."
        ) from None


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` if needed and writes a probe file into it; a :class:`StorageError` otherwise."""
    probe = os.path.join(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")  # unique on a shared disk
    with writing("the work directory", os.path.abspath(workdir), "rerun"):
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)


# --------------------------------------------------------------------------------------
# The recorded config.


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
        return False
    return old != new


def config_changes(config: Any, recorded: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, now)}`` for every field of ``config`` that differs from ``recorded``."""
    changes = {}
    for f in dataclasses.fields(config):
        new = getattr(config, f.name)
        old = recorded.get(f.name, f.default)
        if _differs(old, json.loads(json.dumps(new))):
            changes[f.name] = (old, new)
    return changes


def saved_steps(path: str) -> list[int]:
    """The steps of the checkpoints under ``path`` (folder names that are integers), sorted."""
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def read_recorded_config(workdir: str) -> dict[str, Any] | None:
    """The config recorded in ``workdir/config.json``; None if there is none or it is unreadable (with a warning)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
        return recorded
    except (OSError, ValueError) as e:
        warnings.warn(f"{path} is unreadable ({e}); the config of the run in it cannot be checked.", stacklevel=2)
        return None


def check_resume(config: Any) -> None:
    """Refuses to resume the run in ``config.workdir`` with a config that could change its result.

    Fields in ``config.resume_safe`` may differ, ``steps`` only while the learning-rate schedule
    does not depend on it and no checkpoint lies beyond the new value. Reads only: nothing on
    disk is touched. Raises :class:`ConfigMismatch` naming the fields and the two ways out.
    """
    if getattr(config, "overwrite", False):
        return
    recorded = read_recorded_config(config.workdir)
    if recorded is None:
        return
    changes = config_changes(config, recorded)
    safe = set(config.resume_safe)
    if "steps" in changes and not config.steps_resume_safe(recorded):
        safe.discard("steps")
    newest = max(saved_steps(os.path.join(config.workdir, "checkpoints")) or [0])
    if "steps" in changes and config.steps < newest:
        safe.discard("steps")
    refused = {k: v for k, v in changes.items() if k not in safe}
    if not refused:
        return
    rows = "\n".join(f"    --{k}: {old!r} in the run there, {new!r} now" for k, (old, new) in refused.items())
    note = ""
    if "steps" in refused:
        note = (
            "\n  (--steps may grow on a rerun only under a constant learning rate, whose schedule does not "
            f"depend on it, and not below the newest checkpoint, step {newest}.)"
        )
    raise ConfigMismatch(
        f"the work directory {config.workdir} holds a run made with another config; resuming it would "
        f"mix the two and report numbers of neither.\n  differing fields:\n{rows}{note}\n"
        f"  fix:      pass a new --workdir=DIR for the new config, or --overwrite=true to delete the run in "
        f"{config.workdir} and start afresh (or rerun with the recorded values to resume it)."
    )


def overwrite(workdir: str) -> None:
    """Deletes the files of a run in ``workdir`` (:data:`RUN_FILES` and kept old configs); nothing else."""
    if not os.path.isdir(workdir):
        return
    with writing("the work directory (deleting the old run for --overwrite=true)", os.path.abspath(workdir)):
        for name in os.listdir(workdir):
            path = os.path.join(workdir, name)
            if name in RUN_FILES or (name.startswith("config.") and name.endswith(".json")):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)


def write_json(path: str, value: Any, what: str) -> None:
    """Writes ``value`` as JSON atomically (a temporary file, then a rename): a kill leaves the old file or the new."""
    text = json.dumps(value, indent=1, sort_keys=True, allow_nan=False)
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(what, path):
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------
# Checkpoints.


def _readable_metadata(step_dir: str) -> str | None:
    """Why the orbax metadata of ``step_dir`` is unreadable, or None. Reads the JSON files only (cheap)."""
    names = ["_CHECKPOINT_METADATA", os.path.join("metrics", "metrics")]
    for name in names:
        path = os.path.join(step_dir, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{name}: {type(e).__name__}: {e}"
    return None


class _ReportedStorageFailures(logging.Filter):
    """Keeps the echoes of a storage failure off stderr, where :func:`writing` reports it as one line.

    A failed orbax save leaves three kinds of echo, each printed before or after the main thread
    sees the failure: orbax logs the exception of its save thread (through absl, which installs
    a stderr handler on first use); asyncio logs "Task exception was never retrieved" for the
    writes gathered with the failed one; and tensorstore writes that finish after orbax closed
    its event loop raise "Event loop is closed" in a callback, which Python prints as an
    unraisable exception; the writes that never started are coroutines garbage-collected unawaited,
    which Python reports as a ``RuntimeWarning`` ("coroutine ... was never awaited"), often at
    exit. The log records are dropped when their exception is a storage failure (other records
    pass). The unraisable exceptions and the warnings carry no cause, so they are held back:
    dropped once a storage failure has been reported, printed at exit otherwise (and passed on
    as they come after that).
    """

    def __init__(self):
        super().__init__()
        self.reported = False
        self.released = False
        self.held: list[Callable[[], None]] = []  # each prints one held echo
        self._next_hook = None
        self._next_showwarning = None

    def install(self) -> None:
        """Idempotent: the filter is added once per logger, the hook is chained once."""
        import atexit
        import sys

        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(self)
        if self._next_hook is None:
            self._next_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
            self._next_showwarning = warnings.showwarning
            warnings.showwarning = self._showwarning
            atexit.register(self._release)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or storage_reason(error) is None

    def _unraisable(self, unraisable: Any) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value
        )
        self._screen(closed_loop, functools.partial(self._next_hook, _HeldUnraisable(unraisable)))

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        unawaited = issubclass(category, RuntimeWarning) and "was never awaited" in str(message)
        self._screen(
            unawaited, functools.partial(self._next_showwarning, message, category, filename, lineno, file, line)
        )

    def _screen(self, echo: bool, show: Callable[[], None]) -> None:
        """``show()`` now, unless it is a possible echo of a storage failure before exit: then held
        until exit, or dropped once a storage failure has been reported."""
        if not echo or self.released:
            show()
        elif not self.reported:
            self.held.append(show)

    def storage_failure_reported(self) -> None:
        self.reported = True
        self.held.clear()

    def _release(self) -> None:
        self.released = True
        held, self.held = self.held, []
        for show in held:
            show()


class _HeldUnraisable:
    """A copy of an ``UnraisableHookArgs`` (whose fields Python clears after the hook returns)."""

    def __init__(self, unraisable: Any):
        self.exc_type, self.exc_value = unraisable.exc_type, unraisable.exc_value
        self.exc_traceback, self.err_msg, self.object = unraisable.exc_traceback, unraisable.err_msg, unraisable.object


_REPORTED = _ReportedStorageFailures()


class Checkpoints:
    """An orbax ``CheckpointManager`` over ``path`` that survives kills and damage.

    - half-written temporary folders of a killed save are removed when it opens;
    - a checkpoint whose metadata or arrays cannot be read is moved aside to
      ``corrupt-<step>`` with a warning (:meth:`restore_newest`, :meth:`check_restores`);
    - :meth:`save` of a step that is already there does nothing (a rerun replays it);
    - storage failures are one-line :class:`StorageError`.
    """

    def __init__(self, path: str, keep: int, *, best: bool = False):
        self.path = os.path.abspath(path)
        self.keep, self.best = keep, best
        _REPORTED.install()
        if primary():
            for step in saved_steps(self.path):
                reason = _readable_metadata(os.path.join(self.path, str(step)))
                if reason is not None:
                    self._set_aside(step, reason)
        barrier("checkpoints checked")
        self.manager = self._open()

    def _open(self):
        import orbax.checkpoint as ocp

        options = {"best_fn": lambda m: m["valid"], "best_mode": "min"} if self.best else {}
        with writing("checkpoints", self.path):
            return ocp.CheckpointManager(
                self.path,
                options=ocp.CheckpointManagerOptions(
                    enable_async_checkpointing=False,
                    create=True,
                    cleanup_tmp_directories=True,
                    max_to_keep=self.keep,
                    **options,
                ),
            )

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves a damaged checkpoint aside (process 0 only: the caller waits at a :func:`barrier`)."""
        step_dir = os.path.join(self.path, str(step))
        aside = os.path.join(self.path, f"corrupt-{step}")
        warnings.warn(
            f"checkpoint {step_dir} could not be restored ({reason[:300]}); moved it to {aside} and going on "
            "without it.",
            stacklevel=3,
        )
        with writing("checkpoints", self.path):
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(step_dir, aside)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, target: Any) -> Any:
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def _try_restore(self, step: int, target: Any) -> tuple[bool, Any]:
        try:
            return True, self.restore(step, target)
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            self.manager.close()
            if primary():
                self._set_aside(step, f"{type(e).__name__}: {e}")
            barrier("checkpoint set aside")
            self.manager = self._open()
            return False, None

    def restore_newest(self, target: Any) -> tuple[Any, int]:
        """``(state, step)`` from the newest checkpoint that restores; ``(target, 0)`` if none does."""
        for step in reversed(self.steps()):
            ok, state = self._try_restore(step, target)
            if ok:
                return state, step
        return target, 0

    def check_restores(self, target: Any) -> None:
        """Restores every checkpoint once, setting aside those that fail (for ``best/``, whose
        checkpoint is read only at the end of a run)."""
        for step in self.steps():
            self._try_restore(step, target)

    def save(self, step: int, state: Any, metrics: dict | None = None) -> None:
        import orbax.checkpoint as ocp

        if step in self.manager.all_steps():
            return  # saved before a kill or a fall-back: the rerun replays the same step
        with writing(f"the checkpoint of step {step}", self.path, "rerun the same command: it resumes"):
            self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
            self.manager.wait_until_finished()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def close(self) -> None:
        self.manager.close()
