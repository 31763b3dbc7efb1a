"""Exact whole-layer implementations that cells declare in their :class:`~recurrent.CellSpec`:
the hand-written backward pass (``"vjp"``: :mod:`recurrent._fastlstm`, :mod:`recurrent._fastgru`)
and cuDNN (``"cudnn"``: :mod:`recurrent._cudnn`), chosen with ``rnn(..., implementation=...)``.

A factory attaches a :class:`~recurrent.SequenceKernel` under a name only where it computes
exactly what the scanned step computes; otherwise it records, under the same name, why not
(a string), which the driver's :class:`FallbackWarning` repeats. The driver asks the spec, never
the cell's name or options.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from recurrent import _core
from recurrent._core import SequenceKernel

IMPLEMENTATIONS = ("scan", "cudnn", "vjp", "parallel", "native", "auto")

#: The kernels ``rnn(..., implementation="auto")`` tries on each backend, in order, before the scan:
#: the first one the cell declares and that applies runs, silently. Measured with
#: ``python -m benchmarks.auto`` (forward and training of an LSTM and a GRU layer, from tiny to the
#: suite's shape): on a CPU the native kernels (where built) are faster than the scan at every shape;
#: on GPUs the scan trains faster than cuDNN (benchmarks/README.md), so it runs there.
AUTO = {"cpu": ("native",)}


def auto_order(backend: str | None = None) -> tuple[str, ...]:
    """The kernel names ``implementation="auto"`` tries on ``backend`` (default: JAX's)."""
    return AUTO.get(backend or jax.default_backend(), ())


def candidates(spec: _core.CellSpec, name: str, implementation: str) -> list[tuple[str, SequenceKernel | str, bool]]:
    """The kernels ``rnn(..., implementation=...)`` tries, in order, before its scan, as ``(name,
    kernel or why there is none, quiet)``: none for ``"scan"``; for ``"auto"`` those of
    :func:`auto_order` that the cell declares, whose fallback is silent; else the named one, whose
    fallback warns."""
    if implementation == "scan":
        return []
    if implementation == "auto":
        return [(n, k, True) for n in auto_order() if isinstance(k := spec.kernels.get(n), SequenceKernel)]
    return [(implementation, declared(spec, name, implementation), False)]


#: Which of the library's cells declare each kernel (for the messages of cells that do not).
COVERED = {
    "vjp": "the LSTM (plain, peephole, CIFG) and the GRU only",
    "cudnn": "the plain LSTM only",
    "native": "the plain LSTM and the GRU (float32 parameters, float32 or bfloat16 compute) on CPU only "
    "(recurrent.native)",
}


class FallbackWarning(UserWarning):
    """A requested fast path (``rnn(..., implementation="cudnn")``) does not apply, and the
    portable ``lax.scan`` implementation runs instead; the message says why."""


def warn(reason: str, implementation: str) -> None:
    warnings.warn(
        f'rnn(..., implementation="{implementation}") fell back to the lax.scan implementation: {reason}. '
        "The results are the same; only the speed differs.",
        FallbackWarning,
        stacklevel=4,
    )


def what(implementation: str) -> str:
    return "cuDNN runs" if implementation == "cudnn" else f'implementation="{implementation}" covers'


def declared(spec: _core.CellSpec, name: str, implementation: str) -> SequenceKernel | str:
    """The kernel a cell's spec declares for ``implementation``, or why there is none."""
    kernel = spec.kernels.get(implementation)
    if kernel is None:
        covered = COVERED.get(implementation, "the cells that declare it in their spec")
        return f"{what(implementation)} {covered}, and {name!r} declares no such kernel"
    return kernel


# --------------------------------------------------------------------------------------
# What the factories attach.

# The options of a plain LSTM: any other value changes the step's maths.
_PLAIN_LSTM = {
    "peephole": False,
    "coupled": False,
    "input_gate": True,
    "forget_gate": True,
    "output_gate": True,
    "gate_recurrence": False,
    "proj_size": None,
    "layer_norm": False,
    "cell_clip": None,
    "proj_clip": None,
}
# The LSTM options implementation="vjp" computes too (the peephole and CIFG LSTMs).
_VJP_EXTRA = ("peephole", "coupled")


def _odd(options: Mapping[str, Any], plain: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k, v in plain.items() if options[k] is not v and options[k] != v}


def lstm_kernels(options: Mapping[str, Any], params_type: type) -> dict[str, SequenceKernel | str]:
    """The kernels of an LSTM-family cell built with ``options``: ``"vjp"`` for the plain,
    peephole and CIFG LSTMs with tanh activations (any compute dtype), ``"cudnn"`` for the plain
    float32 LSTM; for other options, why not."""
    tanh = options["input_activation"] is jnp.tanh and options["output_activation"] is jnp.tanh
    vjp_odd = _odd(options, {k: v for k, v in _PLAIN_LSTM.items() if k not in _VJP_EXTRA})
    cudnn_odd = _odd(options, _PLAIN_LSTM)
    if not tanh:
        vjp_odd["activations"] = cudnn_odd["activations"] = "not tanh"
    if options["dtype"] not in (None, jnp.float32) or options["param_dtype"] not in (jnp.float32, "float32"):
        cudnn_odd["dtype"] = f"{options['dtype']}/{options['param_dtype']}"
    dtype, coupled = options["dtype"], options["coupled"]
    kernels: dict[str, SequenceKernel | str] = {}
    if vjp_odd:
        kernels["vjp"] = f"{what('vjp')} the plain, peephole and CIFG LSTMs only; this cell has {vjp_odd}"
    else:

        def vjp(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
            from recurrent import _fastlstm

            cdt = _core.compute_dtype(dtype, params.input_kernel)
            return _fastlstm.apply(params, xs_BTF, lengths_B, carry_B, hoist, cdt, unroll, coupled=coupled)

        kernels["vjp"] = SequenceKernel(vjp, _vjp_reason(params_type), remat=False)
    # the native kernel also runs bfloat16 compute over float32 parameters (bfloat16 GEMMs, float32 state)
    bf16_compute = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    native_odd = {k: v for k, v in cudnn_odd.items() if not (k == "dtype" and bf16_compute)}
    if options["param_dtype"] not in (jnp.float32, "float32"):
        native_odd["dtype"] = cudnn_odd["dtype"]
    if cudnn_odd:
        kernels["cudnn"] = f"{what('cudnn')} the plain float32 LSTM only; this cell has {cudnn_odd}"
    else:
        kernels["cudnn"] = cudnn_kernel(params_type)
    if native_odd:
        kernels["native"] = (
            f"{what('native')} the plain LSTM with float32 parameters (float32 or bfloat16 compute) only; "
            f"this cell has {native_odd}"
        )
    else:
        from recurrent import native  # Python only: the compiled library loads at the first call

        kernels["native"] = native.kernel(jnp.bfloat16 if bf16_compute else None)
    return kernels


def gru_kernels(options: Mapping[str, Any], params_type: type) -> dict[str, SequenceKernel | str]:
    """The kernels of a GRU built with ``options``: ``"vjp"`` with ``reset_after=True`` and no
    layer norm; ``"native"`` for those with float32 parameters and float32 or bfloat16 compute; no
    cuDNN kernel."""
    odd = _odd(options, {"reset_after": True, "layer_norm": False})
    dtype = options["dtype"]
    native_odd = dict(odd)
    compute = jnp.dtype(jnp.float32 if dtype is None else dtype)
    if compute not in (jnp.float32, jnp.bfloat16) or jnp.dtype(options["param_dtype"]) != jnp.float32:
        native_odd["dtype"] = f"{dtype}/{options['param_dtype']}"
    if native_odd:
        native_kernel: SequenceKernel | str = (
            f"{what('native')} the GRU with reset_after=True, no layer norm and float32 parameters "
            f"(float32 or bfloat16 compute) only; this cell has {native_odd}"
        )
    else:
        from recurrent.native import _gru as native_gru  # Python only: the library loads at the first call

        native_kernel = native_gru.kernel(jnp.bfloat16 if compute == jnp.bfloat16 else None)
    if odd:
        return {
            "vjp": f"{what('vjp')} the GRU with reset_after=True and no layer norm only; this cell has {odd}",
            "native": native_kernel,
        }

    def vjp(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        from recurrent import _fastgru

        cdt = _core.compute_dtype(dtype, params.input_kernel)
        return _fastgru.apply(params, xs_BTF, lengths_B, carry_B, hoist, cdt, unroll)

    return {"vjp": SequenceKernel(vjp, _vjp_reason(params_type), remat=False), "native": native_kernel}


def _vjp_reason(params_type: type):
    def reason(params, xs):
        if not isinstance(params, params_type):
            return f"the parameters are a {type(params).__name__}"
        if xs.dtype != params.input_kernel.dtype:
            return f"inputs {xs.dtype} and parameters {params.input_kernel.dtype} differ"
        return None

    return reason


def cudnn_kernel(params_type: type) -> SequenceKernel:
    """One plain float32 LSTM layer as one cuDNN call (:mod:`recurrent._cudnn`)."""

    def apply(params, xs_BTF, lengths_B, carry_B, *, hoist, unroll):
        from recurrent import _cudnn

        return _cudnn.apply(params, xs_BTF, lengths_B, carry_B)

    def reason(params, xs):
        from recurrent import _cudnn

        why = _cudnn.backend_reason()
        if why is None and not isinstance(params, params_type):
            why = f"the parameters are a {type(params).__name__}"
        if why is None and (xs.dtype != jnp.float32 or params.input_kernel.dtype != jnp.float32):
            why = f"cuDNN runs float32 here, got inputs {xs.dtype}, parameters {params.input_kernel.dtype}"
        return why

    return SequenceKernel(apply, reason, batchable=False)


def within(kernels: Mapping[str, SequenceKernel | str], part: Any) -> dict[str, SequenceKernel | str]:
    """The kernels of a wrapped cell for a wrapper whose parameters hold the wrapped cell's at
    ``part(params)`` (e.g. :func:`~recurrent.learned_initial_carry`)."""
    out: dict[str, SequenceKernel | str] = {}
    for name, kernel in kernels.items():
        if isinstance(kernel, str):
            out[name] = kernel
            continue
        out[name] = SequenceKernel(
            lambda params, *args, _k=kernel, **kwargs: _k.apply(part(params), *args, **kwargs),
            lambda params, xs, _k=kernel: _k.reason(part(params), xs),
            kernel.batchable,
            kernel.remat,
        )
    return out


# --------------------------------------------------------------------------------------
# The diagonal of a step's derivative by its carry (CellSpec.jacobian_diagonal), for the
# quasi-Newton solvers of rnn(..., implementation="parallel"): through the written-out derivatives
# of the elementwise halves, with each gate's recurrent input reduced to the unit's own weight.


def _self_weights(kernel: jax.Array, blocks: int) -> jax.Array:
    """``(G, H)``: each unit's recurrent weight onto its own entry of every gate block of a
    ``(H, G*H)`` recurrent kernel."""
    H = kernel.shape[0]
    return jnp.diagonal(kernel.reshape(H, blocks, H), axis1=0, axis2=2)


def _zoned(noise: Any, field: str | None, own: jax.Array) -> jax.Array:
    """Zoneout's mix ``d * old + (1 - d) * new`` differentiated by ``old``'s own entry."""
    if noise is None or noise.zoneout is None:
        return own
    d = noise.zoneout if field is None else getattr(noise.zoneout, field)
    return (d + (1 - d) * own).astype(own.dtype)


def _recurrent_mask(noise: Any, h: jax.Array) -> jax.Array:
    return jnp.ones_like(h) if noise is None or noise.recurrent is None else noise.recurrent.astype(h.dtype)


def lstm_jacobian_diagonal(options: Mapping[str, Any], params_type: type):
    """The diagonal of an LSTM step's derivative by ``(h, c)`` for the plain, peephole and CIFG
    LSTMs with tanh activations (no projection, layer norm, clipping or gate recurrence: each unit's
    ``h`` and ``c`` feed back only through the recurrent kernel and the peepholes); ``None`` for
    other options (the solver then differentiates the step itself)."""
    tanh = options["input_activation"] is jnp.tanh and options["output_activation"] is jnp.tanh
    if _odd(options, {k: v for k, v in _PLAIN_LSTM.items() if k not in _VJP_EXTRA}) or not tanh:
        return None
    coupled, peephole, dtype = options["coupled"], options["peephole"], options["dtype"]

    def diagonal(params, carry, xp, noise=None):
        from recurrent._lstm import CIFG_GATES, LSTM_GATES, dtypes, lstm_pointwise

        if not isinstance(params, params_type) or not hasattr(carry, "c"):
            return None
        gates = CIFG_GATES if coupled else LSTM_GATES
        cdt, sdt = dtypes(dtype, params)
        mask = _recurrent_mask(noise, carry.h)
        rec = _core.matmul((carry.h * mask).astype(cdt), params.recurrent_kernel.astype(cdt), sdt)
        z = dict(zip(gates, jnp.split(xp.astype(sdt) + rec, len(gates), axis=-1)))
        w = dict(zip(gates, _self_weights(params.recurrent_kernel.astype(sdt), len(gates))))
        c = carry.c
        peep = {g: getattr(params, f"peephole_{g}") for g in ("input", "forget", "output")} if peephole else {}
        peep = {g: None if p is None else p.astype(sdt) for g, p in peep.items()}

        def with_peephole(g):
            return z[g] if peep.get(g) is None else z[g] + peep[g] * c

        zi = None if coupled else with_peephole("input")
        primals = (with_peephole("forget"), zi, z["cell"], z["output"], c, peep.get("output"))

        def pointwise(zf, zi, zg, zo, c_prev):
            return lstm_pointwise(coupled, zf, zi, zg, zo, c_prev, primals[5])

        m = mask.astype(sdt)
        zero = jnp.zeros_like(c)
        by_h = (w["forget"] * m, None if coupled else w["input"] * m, w["cell"] * m, w["output"] * m, zero)
        ones = jnp.ones_like(c)

        def peep_or_zero(g):
            return zero if peep.get(g) is None else peep[g] * ones

        by_c = (peep_or_zero("forget"), None if coupled else peep_or_zero("input"), zero, zero, ones)
        _, (dh, _) = jax.jvp(pointwise, primals[:5], by_h)
        _, (_, dc) = jax.jvp(pointwise, primals[:5], by_c)
        return type(carry)(_zoned(noise, "h", dh.astype(sdt)), _zoned(noise, "c", dc.astype(sdt)))

    return diagonal


def gru_jacobian_diagonal(options: Mapping[str, Any], params_type: type):
    """The diagonal of a GRU step's derivative by ``h`` with ``reset_after=True`` and no layer norm;
    ``None`` for other options."""
    if _odd(options, {"reset_after": True, "layer_norm": False}):
        return None
    dtype = options["dtype"]

    def diagonal(params, h_prev, xp, noise=None):
        from recurrent._gru import gru_pointwise
        from recurrent._lstm import dtypes

        if not isinstance(params, params_type) or not hasattr(h_prev, "shape"):
            return None
        cdt, sdt = dtypes(dtype, params)
        mask = _recurrent_mask(noise, h_prev)
        rec = _core.matmul((h_prev * mask).astype(cdt), params.recurrent_kernel.astype(cdt), sdt)
        x_r, x_z, x_n = jnp.split(xp.astype(sdt), 3, axis=-1)
        h_r, h_z, h_n = jnp.split(rec, 3, axis=-1)
        w_r, w_z, w_n = _self_weights(params.recurrent_kernel.astype(sdt), 3)
        m = mask.astype(sdt)
        primals = (x_r + h_r, x_z + h_z, x_n, h_n + params.recurrent_bias.astype(sdt), h_prev.astype(sdt))
        tangents = (w_r * m, w_z * m, jnp.zeros_like(x_n), w_n * m, jnp.ones_like(x_n))
        _, dh = jax.jvp(gru_pointwise, primals, tangents)
        return _zoned(noise, None, dh.astype(h_prev.dtype))

    return diagonal
