"""Builds the optional native LSTM kernel (XLA FFI custom calls, oneDNN inside).

Run ``python -m recurrent.native.build`` after ``pip install onednn-devel``: it compiles
``lstm_onednn.cc`` with the C++ compiler (``$CXX``, else ``g++``) against jaxlib's FFI headers
and the oneDNN of the running environment, into ``recurrent/native/_build/`` (git-ignored).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("*.cc"))  # every kernel of the library (lstm_onednn.cc, ...); common.h beside them
BUILD = HERE / "_build"
LIBRARY = BUILD / "librecurrent_native.so"


def onednn_prefix() -> Path | None:
    """The environment prefix whose ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so`` the
    ``onednn`` and ``onednn-devel`` wheels installed, or ``None``."""
    for prefix in dict.fromkeys((sys.prefix, sysconfig.get_paths()["data"], sys.base_prefix)):
        p = Path(prefix)
        if (p / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any((p / "lib").glob("libdnnl.so*")):
            return p
    return None


def command(output: Path = LIBRARY, sources: list[Path] | None = None) -> list[str]:
    """The compiler command line that builds the kernels (``sources``: every ``*.cc`` here) into ``output``."""
    import jax

    prefix = onednn_prefix()
    if prefix is None:
        raise SystemExit(
            "recurrent.native.build: oneDNN's headers and library were not found in this environment "
            f"({sys.prefix}).\n  fix: pip install onednn onednn-devel"
        )
    lib = prefix / "lib"
    return [
        *shlex.split(os.environ.get("CXX", "g++")),
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


def build(output: Path = LIBRARY, verbose: bool = True, sources: list[Path] | None = None) -> Path:
    """Compiles the kernel into ``output`` and returns its path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(output, sources)
    if verbose:
        print(" ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True)
    return output


if __name__ == "__main__":
    print(build())
