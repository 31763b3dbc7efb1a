"""The open design, checked: a cell stores its primary parts only (so replacing one changes every use
of it), the driver and the combinators know no cell by name, option or leaf name, and the step loop
is scanned in one place."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recurrent")
# The shared machinery: the driver, its parts, the combinators, the regularisers, the types and the
# NNX wrapper. They serve every cell, so none of them may read a cell's name, options or leaf names.
# (A cell's factory reads its own options and names its own fields; the converters in interop/
# read a cell's options to tell a plain cell from one with options that leave no trace in the
# parameters.)
SHARED = {"_core.py", "_rnn.py", "_scan.py", "_sequence.py", "_regularisers.py", "_combinators.py", "nnx.py"}
# Loops that are not the step loop: the hand-written kernels' own forward and backward loops, the
# mLSTM's chunkwise form's loop over chunks, and truncated_bptt's loop over chunks.
OWN_LOOPS = {"_fastlstm.py", "_fastgru.py", "_mlstm.py"}


def _sources():
    for name in sorted(os.listdir(LIBRARY)):
        if name.endswith(".py"):
            with open(os.path.join(LIBRARY, name)) as f:
                yield name, f.read()


def _code(text: str) -> str:
    """The source without docstrings and comments (their examples may name anything)."""
    text = re.sub(r'(?s)""".*?"""', '""', text)
    return "\n".join(line.split("#")[0] for line in text.splitlines())


def test_one_call_site_of_lax_scan_for_the_step_loop():
    sites = {}
    for name, text in _sources():
        n = len(re.findall(r"\blax\.scan\(", _code(text)))
        if n:
            sites[name] = n
    assert sites.pop("_scan.py") == 1
    assert sites.pop("_rnn.py", 0) == 1  # truncated_bptt's loop over chunks
    assert set(sites) <= OWN_LOOPS, sites


@pytest.mark.parametrize(
    "pattern",
    [r"\.name\s*==", r"options\[", r"options\.get\(", r"\"recurrent_kernel\"", r"==\s*\"c\"", r"\"gates\""],
)
def test_the_driver_and_the_combinators_ask_the_spec_not_names(pattern):
    found = [
        f"{name}: {line.strip()}"
        for name, text in _sources()
        if name in SHARED
        for line in _code(text).splitlines()
        if re.search(pattern, line)
    ]
    assert not found, found
    assert SHARED <= {name for name, _ in _sources()}, "a shared module was renamed: update SHARED"


def test_replacing_a_part_changes_step_and_rnn_alike():
    cell = recurrent.lstm(4)
    params = cell.init(jax.random.key(0), (3,))
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32))
    silent = cell._replace(project=lambda p, x: 0.0 * cell.project(p, x))

    def step_loop(c):
        carry, ys = c.initial_carry(params, (2, 3)), []
        for t in range(xs.shape[1]):
            carry, y = c.step(params, carry, xs[:, t])
            ys.append(y)
        return carry, jnp.stack(ys, 1)

    for c in (cell, silent):
        by_step, by_rnn = step_loop(c), recurrent.rnn(c).apply(params, xs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), by_step, by_rnn)
    assert not np.allclose(step_loop(cell)[1], step_loop(silent)[1])
    # the zero projection leaves only the bias-free recurrence from a zero state: zero outputs
    np.testing.assert_allclose(recurrent.rnn(silent).apply(params, xs)[1], 0.0, atol=1e-6)


def test_a_cell_stores_its_primary_parts_only():
    assert "step" not in recurrent.Cell._fields and "recur" not in recurrent.Cell._fields
    cell = recurrent.gru(3)
    assert cell.step is cell.step  # derived once per set of parts: jit caches it


def test_wrappers_pass_the_spec_on():
    """A learned initial carry keeps the fast path and the regularisers' knowledge of its cell."""
    inner = recurrent.lstm(4)
    wrapped = recurrent.learned_initial_carry(inner)
    assert set(wrapped.spec.kernels) == set(inner.spec.kernels)
    params = wrapped.init(jax.random.key(0), (3,))
    xs = jnp.ones((2, 5, 3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        fast = recurrent.rnn(wrapped, implementation="vjp").apply(params, xs)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), fast, recurrent.rnn(wrapped).apply(params, xs)
    )
    flags = wrapped.spec.recurrent_kernels(params)
    assert flags.cell.recurrent_kernel is True and flags.cell.input_kernel is False
    assert not any(jax.tree.leaves(flags.carry))
    stack = recurrent.stacked([recurrent.lstm(3), recurrent.gru(3)])
    roles = stack.spec.carry_roles(stack.initial_carry(stack.init(jax.random.key(1), (2,)), (2,)))
    assert roles[0] == recurrent.LSTMState("hidden", "cell") and roles[1] == "hidden"


@pytest.mark.parametrize(
    "make, implementation",
    [
        (lambda: recurrent.mlstm(4, num_heads=2, chunk_size=3), "chunkwise"),
        (lambda: recurrent.min_gru(4), "parallel"),
    ],
    ids=["mlstm_chunkwise", "min_gru_parallel"],
)
def test_a_wrapper_keeps_the_cells_whole_sequence_forms(make, implementation):
    """learned_initial_carry passes the wrapped cell's spec on: its kernels run (no fallback warning)
    from the learned carry, and equal the scan."""
    import warnings

    cell = recurrent.learned_initial_carry(make(), init=jax.nn.initializers.normal(0.5))
    scan, fast = recurrent.rnn(cell), recurrent.rnn(cell, implementation=implementation)
    params = scan.init(jax.random.key(0), (2,))
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 2)).astype(np.float32))
    lengths = jnp.array([7, 3, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        by_kernel = fast.apply(params, xs, lengths=lengths)
    by_scan = scan.apply(params, xs, lengths=lengths)
    for a, b in zip(jax.tree.leaves(by_kernel), jax.tree.leaves(by_scan), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the length-0 sequence's carry is the learned one, not zeros
    assert max(float(jnp.abs(leaf[2]).max()) for leaf in jax.tree.leaves(by_scan[0])) > 0
