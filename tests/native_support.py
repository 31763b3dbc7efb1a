"""Whether the optional native kernels (:mod:`recurrent.native`) can run in the tests' process.

Their tests are skipped, with the reason, only where the kernels cannot be built (oneDNN or a C++
compiler missing: ``pip install "recurrent[native]"``) or JAX does not run on CPU; where they can be
built they are compiled on first use, so kernels that do not compile or load fail instead of
being skipped.
"""

from __future__ import annotations

import jax
import pytest

from recurrent import native

NOT_CPU = jax.default_backend() != "cpu"
CANNOT_BUILD = None if native.library_path().exists() else native.build.missing()
needs_kernel = pytest.mark.skipif(
    NOT_CPU or CANNOT_BUILD is not None,
    reason=f"the native kernel runs on CPU; JAX's default backend is {jax.default_backend()}"
    if NOT_CPU
    else f"the native kernel is not built and cannot be here: {CANNOT_BUILD}",
)
