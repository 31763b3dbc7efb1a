"""Builds the optional native kernels (XLA FFI custom calls around oneDNN's GEMMs).

``pip install "recurrent[native]"`` brings oneDNN (its CPU-only wheels, GNU OpenMP); the kernels
then compile with the system's C++ compiler (``$CXX``, else ``g++``) against jaxlib's FFI headers on
their first use, once, into a cache keyed by everything that goes into the build (the sources, the
command line, the compiler's and jaxlib's versions, oneDNN's library), so an edited source or a new
jaxlib never loads a stale build. ``python -m recurrent.native.build`` compiles them ahead of time
and prints where. The cache is ``$RECURRENT_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/recurrent/native``,
else ``~/.cache/recurrent/native``; concurrent first uses (test workers) wait on a file lock.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("*.cc"))  # every kernel of the library (lstm_onednn.cc, ...); common.h beside them
NAME = "librecurrent_native.so"
INSTALL_HINT = (
    'pip install "recurrent[native]" (oneDNN\'s CPU wheels: onednn-cpu-gomp, onednn-devel-cpu-gomp); '
    "the kernel then compiles on first use, or ahead of time with python -m recurrent.native.build"
)


def onednn_prefix() -> Path | None:
    """The environment prefix whose ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so`` the
    ``onednn`` and ``onednn-devel`` wheels installed, or ``None``."""
    for prefix in dict.fromkeys((sys.prefix, sysconfig.get_paths()["data"], sys.base_prefix)):
        p = Path(prefix)
        if (p / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any((p / "lib").glob("libdnnl.so*")):
            return p
    return None


def compiler() -> list[str]:
    """The C++ compiler's command: ``$CXX``, else ``g++``."""
    return shlex.split(os.environ.get("CXX", "g++"))


def missing() -> str | None:
    """What the build needs and this environment lacks (``None`` if nothing): oneDNN's headers and
    library, or a C++ compiler; with the fix."""
    if onednn_prefix() is None:
        return f"oneDNN's headers and library are not installed in this environment ({sys.prefix}); fix: {INSTALL_HINT}"
    if shutil.which(compiler()[0]) is None:
        return (
            f"no C++ compiler: {compiler()[0]!r} is not on PATH; fix: install one (e.g. apt-get install g++) "
            "or set $CXX to a C++17 compiler"
        )
    return None


def command(output: Path, sources: list[Path] | None = None) -> list[str]:
    """The compiler command line that builds the kernels (``sources``: every ``*.cc`` here) into ``output``."""
    import jax

    prefix = onednn_prefix()
    if prefix is None:
        raise SystemExit(f"recurrent.native.build: {missing()}")
    lib = prefix / "lib"
    return [
        *compiler(),
        "-O3",
        # Lets the pointwise loops (comparisons, float-to-int in exp) vectorise for AVX2 and SSE too;
        # no result changes.
        "-fno-trapping-math",
        "-std=c++17",
        # OpenMP runs independent layers of one call (a vmapped population, both directions) in parallel.
        "-fopenmp",
        "-shared",
        "-fPIC",
        *map(str, SOURCES if sources is None else sources),
        f"-I{HERE}",
        f"-I{prefix / 'include'}",
        f"-I{jax.ffi.include_dir()}",
        f"-L{lib}",
        "-ldnnl",
        # DT_RPATH (not RUNPATH) so that libdnnl's own dependencies (TBB, the SYCL runtime) are found
        # beside it too.
        "-Wl,--disable-new-dtags",
        f"-Wl,-rpath,{lib}",
        "-o",
        str(output),
    ]


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module's docstring)."""
    if "RECURRENT_NATIVE_CACHE" in os.environ:
        return Path(os.environ["RECURRENT_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recurrent" / "native"


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return ""


@functools.cache
def fingerprint() -> str:
    """A digest of everything the build reads: the sources and ``common.h``, the command line, the
    compiler's version, jaxlib's version and oneDNN's library (path, size, time); once per process."""
    import jaxlib

    h = hashlib.sha256()
    for path in sorted(HERE.glob("*.cc")) + sorted(HERE.glob("*.h")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(command(Path(NAME))).encode())
    h.update(_compiler_version(compiler()[0]).encode())
    h.update(jaxlib.__version__.encode())
    for lib in sorted((onednn_prefix() / "lib").glob("libdnnl.so*")):
        st = lib.stat()
        h.update(f"{lib.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_library() -> Path:
    """The cache's path of the kernels built from the sources as they are now (it may not exist)."""
    return cache_dir() / f"librecurrent_native-{fingerprint()}.so"


def ensure(verbose: bool = True) -> Path:
    """The compiled kernels, built into the cache first if they are not there (once: concurrent
    callers wait on a file lock; the library appears whole, by a rename). Raises
    ``subprocess.CalledProcessError`` (with the compiler's output) if the build fails."""
    target = cached_library()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            if verbose:
                print(f"recurrent.native: compiling the native kernels once, into {target} ...", file=sys.stderr)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = build(Path(tmp) / NAME, verbose=False)
                os.replace(built, target)
    return target


def build(output: Path, verbose: bool = True, sources: list[Path] | None = None) -> Path:
    """Compiles the kernels (``sources``: every ``*.cc`` here) into ``output`` and returns its path.
    Raises ``subprocess.CalledProcessError`` with the compiler's output if it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(output, sources)
    if verbose:
        print(" ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True, capture_output=not verbose, text=True)
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m recurrent.native.build [OUTPUT]``: compiles the kernels into the cache (and prints
    where), or into OUTPUT."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recurrent.native.build", description=main.__doc__)
    parser.add_argument("output", nargs="?", type=Path, help="a path of your own for the library")
    args = parser.parse_args(argv)
    if missing() is not None:
        raise SystemExit(f"recurrent.native.build: {missing()}")
    try:
        print(build(args.output) if args.output else ensure())
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"recurrent.native.build: the compiler failed:\n{e.stderr or ''}") from None


if __name__ == "__main__":
    main()
