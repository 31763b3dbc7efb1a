"""XLA's optimisation passes switched off for tests that compile many tiny programs for a call or
two each and compare the results with tolerances: the passes would take most of their time. Not
for tests that read compiled programs (fusions, loop counts)."""

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def optimisations_off() -> Iterator[None]:
    """``jax_disable_most_optimizations`` on inside the block, restored after it."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
