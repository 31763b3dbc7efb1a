"""Environments for the tests that run the experiments' commands in a subprocess.

``FAST_ENV``: the test process's environment with the repository first on ``PYTHONPATH`` (and the
process's own path after it, where packages may be installed) and XLA's optimisations off, which
compiles the tiny test models several times faster (backend optimisation level 0, and XLA's legacy
CPU emitters instead of its fusion emitters, code generation in one part, as in the test process
itself: see ``conftest.py``).
``VIRTUAL_CPUS_ENV``: the same with four virtual CPU devices, for the data-parallel and sharding
tests; ``JAX_PLATFORMS=cpu`` keeps them on the CPU on a machine with an accelerator too.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHONPATH = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
# conftest.py's FAST_COMPILES (code generation only: the same programs, compiled faster)
FAST_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
FAST_ENV = {**os.environ, "XLA_FLAGS": FAST_FLAGS, "PYTHONPATH": PYTHONPATH}
VIRTUAL_CPUS_ENV = {
    **FAST_ENV,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_FLAGS}",
}
