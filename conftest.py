"""Test-suite settings shared by the tests and the doctests (``testpaths`` in pyproject.toml).

The tests compare our numbers with references written from the papers and with PyTorch's, Flax's and
Keras's on the same weights, in float32 to about 1e-5. On a GPU, JAX's default float32 matmul precision
is TF32 (10-bit mantissa), which moves those numbers by 1e-4 to 3e-4: on an H100 that failed
``tests/test_flax_parity.py``, ``tests/test_interop_torch.py`` and ``tests/test_fastlstm.py`` with
nothing wrong. So on any accelerator the tests run with full float32 matmuls. On a CPU XLA computes
float32 matmuls in full precision anyway, and nothing is set.

On a CPU the tests compile thousands of tiny programs, and code generation takes most of a tiny
program's compile time. So the suite compiles with XLA's legacy CPU emitters instead of its newer
fusion emitters (MLIR), and with LLVM's optimisations off (backend optimisation level 0), set before JAX
starts its backend; the commands it runs in subprocesses do the same (``tests/subprocess_env.py``).
Both are code generation only: the HLO programs are the same, and tests that read compiled programs
read HLO. Measured on a 2-core CPU: without the fusion emitters, compiling the gradients of six small
registry layers took 5.1-5.7 s instead of 15.6-19.3 s; at optimisation level 0 an LSTM layer's gradient
compiled in 0.19 s instead of 0.69 s, and the family, performance-option, pointwise, padding, search and
mLSTM tests ran in 255 s instead of 373 s (``pytest -n 2``). The slower code is no loss at the tests'
sizes. XLA also splits each program's code generation into parallel parts by default, which costs a
tiny program more than it saves: with one part, the gradients of 40 registry layers compiled in
8.5-8.8 s instead of 10.0-10.6 s.

The test run shares one persistent compilation cache between its processes (below): with it, the
pipeline, search and multi-process tests ran in 249 s instead of 319 s on a 2-core CPU.
"""

import atexit
import importlib.util
import os
import shutil
import tempfile

FAST_COMPILES = {
    "xla_cpu_use_fusion_emitters": "false",
    "xla_backend_optimization_level": "0",
    "xla_cpu_parallel_codegen_split_count": "1",
}
for _flag, _value in FAST_COMPILES.items():  # a flag the caller set is kept as it is
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

# JAX's persistent compilation cache, one for the whole test run: the test workers (which inherit
# this environment) and the commands they run in subprocesses (experiments killed and rerun, the
# notebooks' kernels, the benchmarks' quick runs) compile many of the same programs, and all but
# the first load them from here. Programs are cached whatever their compile time. An XLA program
# is cached under a hash of its HLO, its compile options and the JAX and XLA versions, so a hit
# runs the same executable a compile would make. A cache the caller set (JAX_COMPILATION_CACHE_DIR)
# is used as it is; the one made here is removed when the run ends.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="recurrent-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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
