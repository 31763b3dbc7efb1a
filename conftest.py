"""Test-suite settings shared by the tests and the doctests (``testpaths`` in pyproject.toml).

The tests compare our numbers with references written from the papers and with PyTorch's, Flax's and
Keras's on the same weights, in float32 to about 1e-5. On a GPU, JAX's default float32 matmul precision
is TF32 (10-bit mantissa), which moves those numbers by 1e-4 to 3e-4: on an H100 that failed
``tests/test_flax_parity.py``, ``tests/test_interop_torch.py`` and ``tests/test_fastlstm.py`` with
nothing wrong. So on any accelerator the tests run with full float32 matmuls. On a CPU XLA computes
float32 matmuls in full precision anyway, and nothing is set.

On a CPU the tests compile thousands of tiny programs, and XLA's newer fusion emitters (MLIR) spend most
of a tiny program's compile time: with them off, compiling the gradients of six small registry layers took
5.1-5.7 s instead of 15.6-19.3 s. The emitters are code generation only, the HLO programs are the
same, so the suite runs with them off (set before JAX starts its backend), and so do the commands it
runs in subprocesses (``tests/subprocess_env.py``). Tests that read compiled programs read HLO.
"""

import importlib.util
import os

FAST_COMPILES = "--xla_cpu_use_fusion_emitters=false"
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILES}".strip()

import jax  # noqa: E402

if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


# The peer converters' doctests need their peer, as their tests do (``pytest.importorskip`` there):
# where the optional package is missing, their examples are not collected. CI installs both.
collect_ignore = [
    f"recurrent/interop/_{peer}.py" for peer in ("keras", "torch", "xlstm") if importlib.util.find_spec(peer) is None
]


import pytest  # noqa: E402


def _resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# Above this, a test worker drops JAX's caches after the current test module.
CLEAR_CACHES_ABOVE = 3 * 2**30


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches():
    """Each test worker compiles thousands of small programs; JAX keeps every executable and trace
    cached for the life of the process. XLA's CPU compiler crashed in workers that had grown to
    several GB, so a worker past :data:`CLEAR_CACHES_ABOVE` drops them after a test module. Not
    after every module: later modules reuse many of the programs earlier ones compiled (the
    registry's memoised functions), and recompiling them all cost a quarter of the suite's time."""
    yield
    if _resident_bytes() > CLEAR_CACHES_ABOVE:
        jax.clear_caches()
