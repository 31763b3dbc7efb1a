"""The options of the LSTM family (Greff et al.'s variants, projection, layer norm, clipping), the
GRU with layer norm and the convolutional cells against the independent float64 NumPy references
of ``tests/reference_family.py``; alone and combined, through ``rnn``, its reverse,
``bidirectional`` and ``stacked``; parameter counts from the papers; and the errors on bad options.

Every parameter (kernels, biases, peepholes, gate recurrence, projection, layer-norm gains and
offsets) is drawn at random, so no term of an equation can hide behind a default zero or one.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recurrent
from tests import reference_family as ref
from tests.fast_compiles import optimisations_off

TOL = dict(rtol=1e-5, atol=1e-5)
B, T = 2, 6
LENGTHS = np.array([T, 3])
F, H, P = 3, 4, 3


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """A program per configuration, each run once against the NumPy reference: XLA's optimisation
    passes would take most of the time."""
    with optimisations_off():
        yield


identity = ref.identity


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: ``make()`` builds the cell; ``options`` says, independently of the
    library, what the reference computes (and which parameter fields must exist)."""

    id: str
    make: Callable[[int], recurrent.Cell]  # make(input_features_or_channels) -> cell (fresh)
    kind: str  # "lstm", "gru", "conv_lstm", "conv_gru"
    options: dict[str, Any]
    input_shape: tuple[int, ...] = (F,)

    def __repr__(self):
        return self.id


def L(**kw):
    return lambda: recurrent.lstm(H, **kw)


def V(name, **kw):
    return lambda: recurrent.lstm_variant(name, H, **kw)


# The paper's options of each variant, written independently of recurrent.GREFF_VARIANTS.
GREFF = {
    "V": dict(peephole=True),
    "NIG": dict(peephole=True, input_gate=False),
    "NFG": dict(peephole=True, forget_gate=False),
    "NOG": dict(peephole=True, output_gate=False),
    "NIAF": dict(peephole=True, input_activation=identity),
    "NOAF": dict(peephole=True, output_activation=identity),
    "NP": dict(),
    "CIFG": dict(peephole=True, coupled=True),
    "FGR": dict(peephole=True, fgr=True),
}

CASES = (
    [Case(name, V(name), "lstm", opts) for name, opts in GREFF.items()]
    + [
        # single options of lstm() and the presets
        Case("peephole_lstm", lambda: recurrent.peephole_lstm(H), "lstm", dict(peephole=True)),
        Case("cifg_lstm", lambda: recurrent.cifg_lstm(H), "lstm", dict(coupled=True)),
        Case("projection", L(proj_size=P), "lstm", dict(proj=True)),
        Case("layer_norm", L(layer_norm=True), "lstm", dict(ln=True)),
        Case("cell_clip", L(cell_clip=0.4), "lstm", dict(cell_clip=0.4)),
        Case("proj_clip", L(proj_size=P, proj_clip=0.25), "lstm", dict(proj=True, proj_clip=0.25)),
        Case(
            "relu_input_activation",
            L(input_activation=jax.nn.relu),
            "lstm",
            dict(input_activation=lambda x: np.maximum(x, 0)),
        ),
        # combinations
        Case(
            "CIFG+proj+ln+clip",
            V("CIFG", proj_size=P, layer_norm=True, cell_clip=0.5, proj_clip=0.3),
            "lstm",
            dict(peephole=True, coupled=True, proj=True, ln=True, cell_clip=0.5, proj_clip=0.3),
        ),
        Case("NOG+ln", V("NOG", layer_norm=True), "lstm", dict(peephole=True, output_gate=False, ln=True)),
        Case("FGR+proj", V("FGR", proj_size=2), "lstm", dict(peephole=True, fgr=True, proj=True)),
        Case(
            "peephole+proj_clip",
            lambda: recurrent.peephole_lstm(H, proj_size=P, proj_clip=0.25),
            "lstm",
            dict(peephole=True, proj=True, proj_clip=0.25),
        ),
        Case(
            "FGR+CIFG+ln",
            L(peephole=True, coupled=True, gate_recurrence=True, layer_norm=True),
            "lstm",
            dict(peephole=True, coupled=True, fgr=True, ln=True),
        ),
        Case(
            "NIG+NOAF+cell_clip",
            V("NIG", output_activation=None, cell_clip=0.5),
            "lstm",
            dict(peephole=True, input_gate=False, output_activation=identity, cell_clip=0.5),
        ),
        Case(
            "NFG+NIAF+proj",
            V("NFG", input_activation=None, proj_size=P),
            "lstm",
            dict(peephole=True, forget_gate=False, input_activation=identity, proj=True),
        ),
        Case("NOAF+ln", V("NOAF", layer_norm=True), "lstm", dict(peephole=True, output_activation=identity, ln=True)),
        Case("NP+ln+cell_clip", V("NP", layer_norm=True, cell_clip=0.6), "lstm", dict(ln=True, cell_clip=0.6)),
        Case(
            "FGR+NOG+proj_clip",
            V("FGR", output_gate=False, proj_size=P, proj_clip=0.3),
            "lstm",
            dict(peephole=True, fgr=True, output_gate=False, proj=True, proj_clip=0.3),
        ),
        # GRU
        Case("gru_ln_reset_after", lambda: recurrent.gru(H, layer_norm=True), "gru", dict(reset_after=True, ln=True)),
        Case(
            "gru_ln_reset_before",
            lambda: recurrent.gru(H, layer_norm=True, reset_after=False),
            "gru",
            dict(reset_after=False, ln=True),
        ),
        # convolutional cells: (spatial, channels) inputs
        Case(
            "conv_lstm_ln_peephole_1d",
            lambda: recurrent.conv_lstm(3, (3,), layer_norm=True, peephole=True),
            "conv_lstm",
            dict(peephole=True, ln=True),
            (5, 2),
        ),
        Case(
            "conv_lstm_ln_2d",
            lambda: recurrent.conv_lstm(2, (3, 2), layer_norm=True),
            "conv_lstm",
            dict(ln=True),
            (3, 4, 2),
        ),
    ]
    + [
        Case(
            f"conv_gru_{'after' if after else 'before'}{'_ln' if ln else ''}",
            functools.partial(
                lambda after, ln: recurrent.conv_gru(3, (3,), reset_after=after, layer_norm=ln), after, ln
            ),
            "conv_gru",
            dict(reset_after=after, ln=ln),
            (5, 2),
        )
        for after in (True, False)
        for ln in (False, True)
    ]
    + [
        Case(
            "conv_gru_ln_2d",
            lambda: recurrent.conv_gru(2, (2, 3), reset_after=False, layer_norm=True),
            "conv_gru",
            dict(reset_after=False, ln=True),
            (3, 4, 1),
        )
    ]
)
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES)


# --------------------------------------------------------------------------------------
# Helpers


def randomize(params, seed):
    """Every leaf replaced by random values: layer-norm gains ``1 + 0.3 N``, everything else
    ``0.8 N`` (float32). Works on ``jax.ShapeDtypeStruct`` leaves.

    Kernels of scale 0.8 keep the pre-activations' variance well away from zero, where layer
    normalisation amplifies float32 rounding past the 1e-5 tolerance (the float64 test below
    checks the same equations to 1e-10 whatever the conditioning)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "name", "")
        if name.endswith("scale"):
            value = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
        else:
            value = 0.8 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def shapes(layer, input_shape):
    """The parameter pytree of ``layer.init`` as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    return jax.eval_shape(lambda key: layer.init(key, input_shape), jax.random.key(0))


def random_params(layer, input_shape, seed):
    return randomize(shapes(layer, input_shape), seed)


def sample(input_shape, seed, batch=B, steps=T):
    return np.random.default_rng(1000 + seed).standard_normal((batch, steps, *input_shape)).astype(np.float32)


def present(value) -> bool:
    return value is not None


def reference_for(case: Case, params):
    """``fn(xs, **carry) -> (ys, carry)``: the float64 reference with ``params``, after checking
    that exactly the parameter fields the options call for exist."""
    o = case.options
    ln = None if params.layer_norm is None else tuple(params.layer_norm)
    assert present(params.layer_norm) == o.get("ln", False)
    if case.kind == "lstm":
        peep = o.get("peephole", False)
        has_i = o.get("input_gate", True) and not o.get("coupled", False)
        has_f, has_o = o.get("forget_gate", True), o.get("output_gate", True)
        assert present(params.peephole_input) == (peep and has_i)
        assert present(params.peephole_forget) == (peep and has_f)
        assert present(params.peephole_output) == (peep and has_o)
        assert present(params.gate_recurrent_kernel) == o.get("fgr", False)
        assert present(params.projection) == o.get("proj", False)
        G = has_i + has_f + has_o + 1
        assert params.input_kernel.shape[-1] == G * H
        kwargs = dict(
            W=params.input_kernel,
            U=params.recurrent_kernel,
            b=params.bias,
            p_i=params.peephole_input,
            p_f=params.peephole_forget,
            p_o=params.peephole_output,
            R=params.gate_recurrent_kernel,
            P=params.projection,
            ln=ln,
            input_gate=o.get("input_gate", True),
            forget_gate=has_f,
            output_gate=has_o,
            coupled=o.get("coupled", False),
            input_activation=o.get("input_activation", np.tanh),
            output_activation=o.get("output_activation", np.tanh),
            cell_clip=o.get("cell_clip"),
            proj_clip=o.get("proj_clip"),
        )
        return functools.partial(ref.lstm, **kwargs)
    if case.kind in ("gru", "conv_gru"):
        assert present(params.recurrent_bias) == o["reset_after"]
        fn = ref.gru if case.kind == "gru" else ref.conv_gru
        return functools.partial(
            fn,
            W=params.input_kernel,
            U=params.recurrent_kernel,
            b=params.bias,
            b_hn=params.recurrent_bias,
            reset_after=o["reset_after"],
            ln=ln,
        )
    assert case.kind == "conv_lstm"
    peep = o.get("peephole", False)
    assert all(present(getattr(params, f"peephole_{g}")) == peep for g in ("input", "forget", "output"))
    return functools.partial(
        ref.conv_lstm,
        W=params.input_kernel,
        U=params.recurrent_kernel,
        b=params.bias,
        p_i=params.peephole_input,
        p_f=params.peephole_forget,
        p_o=params.peephole_output,
        ln=ln,
    )


def carry_leaves(carry):
    return list(carry) if isinstance(carry, tuple) else [carry]


def assert_carry(lib_carry, ref_carries, what="", tol=TOL):
    """Library carry (batched pytree) == per-sequence reference carries (batch 1 each)."""
    lib = jax.tree.leaves(lib_carry)
    for bi, rc in enumerate(ref_carries):
        leaves = carry_leaves(rc)
        assert len(lib) == len(leaves), what
        for a, r in zip(lib, leaves):
            np.testing.assert_allclose(np.asarray(a)[bi], r[0], **tol, err_msg=f"carry {what} sequence {bi}")


# --------------------------------------------------------------------------------------
# The cells against the references, through rnn with lengths


@functools.cache
def _setup(case_id):
    case = BY_ID[case_id]
    cell = case.make()
    params = random_params(cell, case.input_shape, seed=zlib.crc32(case_id.encode()) % 1000)
    return case, cell, params, sample(case.input_shape, seed=len(case_id))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cell_matches_reference(case):
    case, cell, params, xs = _setup(case.id)
    fn = reference_for(case, params)
    carry, ys = jax.jit(recurrent.rnn(cell).apply)(params, xs, lengths=LENGTHS)
    ys_ref, carries_ref = ref.run_lengths(fn, xs, LENGTHS)
    assert ys.shape == ys_ref.shape == (B, T, *cell.output_shape(case.input_shape))
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, ys_ref, **TOL)
    assert_carry(carry, carries_ref)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cell_matches_reference_in_float64(case):
    """In float64 the library and the reference agree to rounding: any difference of formula,
    however small its effect in float32, shows."""
    case, cell, params, xs = _setup(case.id)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        xs = np.asarray(xs, np.float64)
        carry, ys = jax.jit(recurrent.rnn(cell).apply)(params, xs, lengths=LENGTHS)
        assert ys.dtype == jnp.float64
        ys_ref, carries_ref = ref.run_lengths(reference_for(case, params), xs, LENGTHS)
        np.testing.assert_allclose(ys, ys_ref, rtol=1e-10, atol=1e-10)
        assert_carry(carry, carries_ref, tol=dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_combinators_match_reference(case):
    """Reversed rnn, bidirectional and stacked, each against the reference composed by hand."""
    case = BY_ID[case.id]
    cell, second = case.make(), case.make()
    out = tuple(cell.output_shape(case.input_shape))
    rev = recurrent.rnn(cell).reversed()
    bidi = recurrent.bidirectional(cell)
    stack = recurrent.rnn(recurrent.stacked([cell, second]))
    seed = zlib.crc32(case.id.encode()) % 1000
    p_rev = random_params(rev, case.input_shape, seed + 1)
    p_bidi = random_params(bidi, case.input_shape, seed + 2)
    p_stack = random_params(stack, case.input_shape, seed + 3)
    xs = sample(case.input_shape, seed=len(case.id) + 1)

    @jax.jit
    def run(p_rev, p_bidi, p_stack, xs):
        kw = dict(lengths=LENGTHS)
        return rev.apply(p_rev, xs, **kw), bidi.apply(p_bidi, xs, **kw), stack.apply(p_stack, xs, **kw)

    (c_rev, y_rev), (c_bidi, y_bidi), (c_stack, y_stack) = run(p_rev, p_bidi, p_stack, xs)

    # reversed: each valid prefix from its end; final carry after its first position
    ys_ref, carries_ref = ref.run_reversed(reference_for(case, p_rev), xs, LENGTHS)
    assert y_rev.shape == (B, T, *out)
    np.testing.assert_allclose(y_rev, ys_ref, **TOL)
    assert_carry(c_rev, carries_ref, "reversed")

    # bidirectional: concat(forward, backward) on the last axis
    yf, cf = ref.run_lengths(reference_for(case, p_bidi.forward), xs, LENGTHS)
    yb, cb = ref.run_reversed(reference_for(case, p_bidi.backward), xs, LENGTHS)
    assert y_bidi.shape == (B, T, *out[:-1], 2 * out[-1])
    np.testing.assert_allclose(y_bidi, np.concatenate([yf, yb], axis=-1), **TOL)
    assert_carry(c_bidi.forward, cf, "bidirectional forward")
    assert_carry(c_bidi.backward, cb, "bidirectional backward")

    # stacked: the second cell runs on the first one's outputs
    y1, c1 = ref.run_lengths(reference_for(case, p_stack[0]), xs, LENGTHS)
    y2, c2 = ref.run_lengths(reference_for(case, p_stack[1]), y1, LENGTHS)
    assert y_stack.shape == (B, T, *out)
    np.testing.assert_allclose(y_stack, y2, **TOL)
    assert_carry(c_stack[0], c1, "stacked layer 0")
    assert_carry(c_stack[1], c2, "stacked layer 1")


def test_stacked_scan_equals_python_loop_of_its_cells():
    """A stacked cell scanned by rnn == a Python loop of each sub-cell's step (FGR + projection
    under CIFG + layer norm: two carry layouts in one stack). In float64, so that the two programs'
    different float32 roundings (fused differently on a GPU) cannot hide or fake a difference."""
    a, b = BY_ID["FGR+proj"].make(), BY_ID["CIFG+proj+ln+clip"].make()
    stack = recurrent.stacked([a, b])
    with jax.enable_x64(True):
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), random_params(stack, (F,), 7))
        xs = jnp.asarray(sample((F,), 7), jnp.float64)
        carry, ys = jax.jit(recurrent.rnn(stack).apply)(params, xs)
        assert ys.dtype == jnp.float64
        c_a, c_b = a.initial_carry(params[0], (B, F)), b.initial_carry(params[1], (B, 2))
        outs = []
        for t in range(T):
            c_a, y = a.step(params[0], c_a, xs[:, t])
            c_b, y = b.step(params[1], c_b, y)
            outs.append(y)
        np.testing.assert_allclose(ys, np.stack(outs, 1), rtol=1e-12, atol=1e-12)
        for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves((c_a, c_b)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case_id", ["cell_clip", "proj_clip", "CIFG+proj+ln+clip", "NIG+NOAF+cell_clip"])
def test_clipping_is_engaged(case_id):
    """The clip configurations really clip (else the reference comparison would prove nothing):
    the reference without clipping differs, and the library's cell state touches the bound."""
    case, cell, params, xs = _setup(case_id)
    fn = reference_for(case, params)
    ys_clip, _ = fn(xs)
    ys_free, _ = fn(xs, cell_clip=None, proj_clip=None)
    assert np.abs(ys_clip - ys_free).max() > 1e-3
    _, _, trace = jax.jit(functools.partial(recurrent.rnn(cell).apply, return_trace=True))(params, xs)
    if "cell_clip" in case.options:
        bound = case.options["cell_clip"]
        c = np.asarray(trace.carries.c)
        assert np.abs(c).max() <= bound + 1e-7
        assert np.isclose(np.abs(c), bound).any()
    if "proj_clip" in case.options:
        bound = case.options["proj_clip"]
        h = np.asarray(trace.carries.h)
        assert np.abs(h).max() <= bound + 1e-7
        assert np.isclose(np.abs(h), bound).any()


def test_fgr_carry_holds_previous_gates():
    """FGR's carry holds the sigmoid gates of the step (i, f, o), so feeding a carry whose
    gates differ changes the next step; without FGR gates are not carried."""
    case, cell, params, xs = _setup("FGR")
    carry, _, trace = recurrent.rnn(cell).apply(params, xs, return_trace=True)
    assert isinstance(carry, recurrent.LSTMGateState) and carry.gates.shape == (B, 3 * H)
    g = trace.gates
    np.testing.assert_allclose(
        trace.carries.gates, np.concatenate([g["input"], g["forget"], g["output"]], axis=-1), rtol=0, atol=0
    )
    other = carry._replace(gates=jnp.zeros_like(carry.gates))
    assert not np.allclose(cell.step(params, carry, xs[:, 0])[1], cell.step(params, other, xs[:, 0])[1])


# --------------------------------------------------------------------------------------
# Parameter counts (Greff et al. 2017, from the equations)


@pytest.mark.parametrize("F_, H_", [(3, 4), (2, 5)])
def test_greff_parameter_counts(F_, H_):
    n = {v: recurrent.count_params(shapes(recurrent.lstm_variant(v, H_), (F_,))) for v in GREFF}
    vanilla = 4 * H_ * (F_ + H_ + 1) + 3 * H_
    assert n["V"] == vanilla
    assert n["NIAF"] == n["NOAF"] == vanilla
    assert n["NP"] == vanilla - 3 * H_
    assert n["FGR"] == vanilla + 9 * H_**2
    one_gate_fewer = vanilla - H_ * (F_ + H_ + 1) - H_
    for v in ("NIG", "NFG", "NOG", "CIFG"):
        assert n[v] == one_gate_fewer, v
    # lowercase names are accepted
    assert recurrent.count_params(shapes(recurrent.lstm_variant("cifg", H_), (F_,))) == n["CIFG"]


def test_option_parameter_counts():
    count = lambda cell: recurrent.count_params(shapes(cell, (F,)))  # noqa: E731
    base = 4 * H * (F + H + 1)
    assert count(recurrent.lstm(H)) == base
    # LSTMP (Sak et al. 2014): the recurrent input has P units, plus the (H, P) projection
    assert count(recurrent.lstm(H, proj_size=P)) == 4 * H * (F + P + 1) + H * P
    # layer norm: two gains over the 4H pre-activations, a gain and an offset for c
    assert count(recurrent.lstm(H, layer_norm=True)) == base + 2 * 4 * H + 2 * H
    assert count(recurrent.lstm(H, cell_clip=1.0)) == base
    assert count(recurrent.gru(H, layer_norm=True)) == 3 * H * (F + H + 1) + H + 2 * 3 * H
    assert count(recurrent.gru(H, layer_norm=True, reset_after=False)) == 3 * H * (F + H + 1) + 2 * 3 * H


# --------------------------------------------------------------------------------------
# Bad input


def assert_clear_error(excinfo, *fragments):
    message = str(excinfo.value)
    for part in ("expected:", "got:", "fix:", *fragments):
        assert part in message, (part, message)


def test_unknown_variant_lists_the_allowed_names():
    with pytest.raises(ValueError) as excinfo:
        recurrent.lstm_variant("NXG", 4)
    assert_clear_error(excinfo, "'NXG'")
    for name in ("V", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR"):
        assert name in str(excinfo.value).split("expected:")[1]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: recurrent.lstm(4, coupled=True, forget_gate=False), "forget"),
        (lambda: recurrent.lstm(4, coupled=True, input_gate=False), "input_gate"),
        (lambda: recurrent.cifg_lstm(4, forget_gate=False), "forget"),
        (lambda: recurrent.lstm(4, proj_clip=1.0), "proj_size"),
        (lambda: recurrent.lstm(4, proj_size=0), "proj_size"),
        (lambda: recurrent.lstm_variant("NP", 4, peephole=True), "peephole"),
        (lambda: recurrent.lstm_variant("CIFG", 4, coupled=False), "coupled"),
        (lambda: recurrent.lstm_variant("NIAF", 4, input_activation=jnp.tanh), "input_activation"),
        (lambda: recurrent.lstm_variant("FGR", 4, gate_recurrence=False), "gate_recurrence"),
        (lambda: recurrent.lstm_variant("NOG", 4, output_gate=True), "output_gate"),
        (lambda: recurrent.cifg_lstm(4, coupled=False), "coupled"),
        (lambda: recurrent.peephole_lstm(4, peephole=False), "peephole"),
    ],
    ids=[
        "coupled_without_forget",
        "coupled_and_no_input_gate",
        "cifg_without_forget",
        "proj_clip_without_proj",
        "proj_size_zero",
        "NP_with_peephole",
        "CIFG_uncoupled",
        "NIAF_with_tanh",
        "FGR_without_recurrence",
        "NOG_with_output_gate",
        "cifg_preset_uncoupled",
        "peephole_preset_without_peephole",
    ],
)
def test_incompatible_options(make, fragment):
    with pytest.raises(ValueError) as excinfo:
        make()
    assert_clear_error(excinfo, fragment)


def test_agreeing_preset_options_are_accepted():
    recurrent.lstm_variant("V", 4, peephole=True)
    recurrent.lstm_variant("NIAF", 4, input_activation=None)
    recurrent.cifg_lstm(4, coupled=True)
    recurrent.peephole_lstm(4, peephole=True)


@pytest.mark.parametrize("clip", [0.0, -1.0, np.float32(-0.5)])
@pytest.mark.parametrize("name", ["cell_clip", "proj_clip"])
def test_non_positive_clip(name, clip):
    with pytest.raises(ValueError) as excinfo:
        recurrent.lstm(4, proj_size=2, **{name: clip})
    assert_clear_error(excinfo, name, "positive")


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
@pytest.mark.parametrize("name", ["input_dropout", "recurrent_dropout", "dropconnect", "zoneout", "zoneout_cell"])
def test_out_of_range_rates(name, rate):
    with pytest.raises(ValueError) as excinfo:
        recurrent.rnn(recurrent.lstm(4), **{name: rate})
    assert_clear_error(excinfo, name, "[0, 1)")


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_out_of_range_stacked_dropout(rate):
    with pytest.raises(ValueError) as excinfo:
        recurrent.stacked([recurrent.lstm(4), recurrent.lstm(4)], dropout=rate)
    assert_clear_error(excinfo, "dropout", "[0, 1)")
