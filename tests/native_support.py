"""Whether the optional native kernels (:mod:`recurrent.native`) can run in the tests' process, and
the tolerances their tests compare with.

Their tests are skipped, with the reason, only where the kernels cannot be built (oneDNN or a C++
compiler missing: ``pip install "recurrent[native]"``) or JAX does not run on CPU; where they can be
built they are compiled on first use, so kernels that do not compile or load fail instead of
being skipped.
"""

from __future__ import annotations

import re

import jax
import numpy as np
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

TOL = 1e-5  # float32: values and gradients against the scan
BF16_TOL = 2e-2  # bfloat16: of each array's largest magnitude (see tests/test_native.py)


def close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def close_to_largest(got, want, tol=BF16_TOL):
    """Each array within ``tol`` of the largest magnitude of the wanted one, in the same dtype."""
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == y.dtype
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=0, atol=tol * float(np.max(np.abs(y))) + 1e-30)


def backward_calls(cell, fn, *args):
    """``(target, need_dx, dx result type)`` of each of ``cell``'s (``"lstm"``, ``"gru"``) backward
    custom calls in the lowered ``fn(*args)``, sorted: the attribute the call passes the kernel, and
    the dx result it declares (``tensor<0x..>``, with any vmapped axes in front, where dx is skipped)."""
    text = jax.jit(fn).lower(*args).as_text()
    pattern = rf"custom_call @(recurrent_{cell}_backward\w*)\(.*?need_dx = (\w+)\}}.*?-> \((tensor<[^>]*>)"
    return sorted(re.findall(pattern, text))
