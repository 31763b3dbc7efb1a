"""The benchmark suite: our layers against PyTorch, Flax and Keras 3 (JAX backend), in one
process, interleaved.

Run ``python -m benchmarks.suite [--quick] [--cases=lstm,gru,...] [--out=DIR]``.

For every case (a cell and a shape) each contender is built on the same input shape and
timed **interleaved**: each repeat times every contender in turn, the order alternating
from one repeat to the next, so drifts of a shared machine hit all alike; the table gives
medians and each contender's ratio to ours. Figures:

- ``fwd_ms``: forward, ``xs (B, T, F) -> ys``;
- ``fwdbwd_ms``: forward and backward, the gradient of ``mean(ys)`` with respect to the
  parameters and ``xs``;
- ``compile_s``: ahead-of-time compile time of the jitted forward+backward (JAX contenders;
  PyTorch runs eagerly);
- ``peak_mb``: the compiled forward+backward program's memory (arguments, outputs and
  temporaries, from XLA's memory analysis; JAX contenders);
- ``mm_frac``: the fraction of this machine's dense float32 matmul throughput reached in
  forward+backward (counting the gate matmuls only), with the throughput measured in the
  same run (the best of JAX's and PyTorch's ``2048^3`` matmul).

The modern cells (``slstm``, ``mlstm``, ``min_gru``, ``min_lstm``) are timed against their
official PyTorch implementations on the same unit of work (see ``MODERN``); Flax and Keras
have none of them. Each official row also gets ``pair``, the form of ours that computes the same thing the
same way, and ``pair_over_it_*``, that form's time over the official one's.

Extra figures: the compile time of stacks of 1 and 8 equal layers, the compile time of
every ``rnn`` option combination, and the memory of training on 10,000-step sequences with
and without ``remat``. Results go to ``DIR/suite.json`` and ``DIR/suite.png``. ``--quick``
shrinks every shape (a smoke test; nothing about timings is asserted).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import recurrent  # noqa: E402
from benchmarks._common import calls_per_sample, interleaved, timed  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# name: (cell kind, batch, steps, features, hidden, layers)
CASES = {
    "lstm": ("lstm", 32, 128, 128, 256, 1),
    "gru": ("gru", 32, 128, 128, 256, 1),
    "peephole": ("peephole", 32, 128, 128, 256, 1),
    "cifg": ("cifg", 32, 128, 128, 256, 1),
    "convlstm": ("convlstm", 16, 10, 16, 64, 1),  # 16x16 images, 16 channels, 10 steps
    "bidirectional": ("bidirectional", 32, 128, 128, 256, 1),
    "stacked4": ("lstm", 32, 128, 128, 256, 4),
    "cudnn": ("lstm", 64, 100, 512, 512, 1),
    "cudnn4": ("lstm", 64, 100, 512, 512, 4),
    "small": ("lstm", 32, 64, 32, 64, 1),
    "long": ("lstm", 8, 2000, 256, 256, 1),
    # the modern cells (see MODERN): F = H where the official module reads x of width H
    "slstm": ("slstm", 32, 128, 128, 256, 1),
    "mlstm": ("mlstm", 32, 128, 256, 256, 1),
    "min_gru": ("min_gru", 32, 128, 256, 256, 1),
    "min_lstm": ("min_lstm", 32, 128, 256, 256, 1),
}
QUICK_SHAPE = dict(batch=2, steps=5, features=3, hidden=4)
GATES = {"lstm": 4, "peephole": 4, "cifg": 3, "gru": 3, "bidirectional": 4, "convlstm": 4}


def _input_shape(kind, B, T, F):
    return (B, T, 16, 16, F) if kind == "convlstm" else (B, T, F)


def case_names(parser, text: str) -> list[str]:
    """The case names of a comma-separated ``--cases`` value; an unknown or empty one ends the
    program with ``parser.error`` listing the cases."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        parser.error(f"--cases: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    return names


def contender_names(parser, text: str | None, cases: list[str], quick: bool = False) -> list[str] | None:
    """The contender labels of a comma-separated ``--contenders`` value (``None``: all); one that
    no chosen case has ends the program with ``parser.error`` listing those the cases have."""
    if text is None:
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    known = {label for case in cases for label in contenders_for(*_kind_layers(case), quick)}
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        parser.error(
            f"--contenders: {', '.join(unknown) or '(none given)'} not among the contenders of "
            f"{', '.join(cases)}: {', '.join(sorted(known))}"
        )
    return names


def _kind_layers(name: str):
    kind, _, _, _, _, layers = CASES[name]
    return kind, layers


def case_inputs(name: str, quick: bool = False):
    """``(kind, B, T, F, H, layers, xs)`` of a case (tiny shapes when ``quick``), with its input."""
    kind, B, T, F, H, layers = CASES[name]
    if quick:
        B, T, F, H = (QUICK_SHAPE[k] for k in ("batch", "steps", "features", "hidden"))
        F = H if kind in ("mlstm", "min_gru", "min_lstm") else F  # their official modules read x of width H
    return kind, B, T, F, H, layers, jax.random.normal(jax.random.key(1), _input_shape(kind, B, T, F))


def _gate_flops(kind, B, T, F, H, layers):
    """Multiply-adds x 2 of the gate matmuls (convolutions: 3x3 windows) of a forward pass."""
    if kind in MODERN:
        return _modern_flops(kind, B, T, F, H)
    G, per_step = GATES[kind], 0
    for layer in range(layers):
        fin = F if layer == 0 else H
        per_step += 2 * B * G * H * (fin + H) * (9 * 16 * 16 if kind == "convlstm" else 1)
    return per_step * T * (2 if kind == "bidirectional" else 1)


# ----------------------------------------------------------------------------- contenders
# Each builder returns (forward, forward_backward, compile_s, peak_bytes): two callables of
# no arguments that block until done, and figures (None where they do not apply).


def _jax_contender(forward: Callable, params, xs, argnums=(0, 1)):
    """Compiled ``(forward, forward_backward, compile seconds, peak bytes)``; the backward's gradient
    w.r.t. ``argnums`` (the parameters and ``xs``; ``0``: the parameters only, ``xs`` data)."""
    grad = jax.grad(lambda p, x: jnp.mean(forward(p, x)), argnums=argnums)
    fwd = jax.jit(forward).lower(params, xs).compile()
    t0 = time.perf_counter()
    bwd = jax.jit(grad).lower(params, xs).compile()
    compile_s = time.perf_counter() - t0
    m = bwd.memory_analysis()
    peak = None if m is None else m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return (
        lambda: jax.block_until_ready(fwd(params, xs)),
        lambda: jax.block_until_ready(bwd(params, xs)),
        compile_s,
        peak,
    )


def _our_cell(kind, H, **options):
    return {
        "lstm": recurrent.lstm,
        "bidirectional": recurrent.lstm,
        "peephole": recurrent.peephole_lstm,
        "cifg": recurrent.cifg_lstm,
        "gru": recurrent.gru,
        "convlstm": lambda H, **o: recurrent.conv_lstm(H, (3, 3), **o),
    }[kind](H, **options)


def ours(kind, B, T, F, H, layers, xs, **rnn_options):
    one_scan = rnn_options.pop("one_scan", "auto")
    layerwise = rnn_options.pop("layerwise", False)
    scan_layers = rnn_options.pop("scan_layers", False)
    cell_options = {"dtype": rnn_options.pop("dtype")} if "dtype" in rnn_options else {}
    if kind == "bidirectional":
        layer = recurrent.bidirectional(
            recurrent.rnn(_our_cell(kind, H, **cell_options), **rnn_options), one_scan=one_scan
        )
    elif layers > 1 and layerwise:  # one scan per layer, each over the whole sequence
        layer = recurrent.stacked(
            [recurrent.rnn(_our_cell(kind, H, **cell_options), **rnn_options) for _ in range(layers)],
            scan_layers=scan_layers,
        )
    elif layers > 1:
        layer = recurrent.rnn(
            recurrent.stacked([_our_cell(kind, H, **cell_options) for _ in range(layers)]), **rnn_options
        )
    else:
        layer = recurrent.rnn(_our_cell(kind, H, **cell_options), **rnn_options)
    params = layer.init(jax.random.key(0), xs.shape[2:])
    return _jax_contender(lambda p, x: layer.apply(p, x)[1], params, xs)


def ours_native(kind, B, T, F, H, layers, xs, **options):
    """Ours with ``implementation="native"`` (the optional oneDNN kernels, :mod:`recurrent.native`):
    skipped with the reason where they cannot run, and never timed as a silent fallback to the
    scan (a :class:`~recurrent.FallbackWarning` skips the contender)."""
    import warnings

    from recurrent import native

    why = native.reason()
    if why is not None:
        raise RuntimeError(why)
    with warnings.catch_warnings():
        warnings.simplefilter("error", recurrent.FallbackWarning)
        if layers > 1:
            options["layerwise"] = True
        return ours(kind, B, T, F, H, layers, xs, implementation="native", **options)


def flax_rnn(kind, B, T, F, H, layers, xs):
    import flax.linen as nn

    make = {
        "lstm": lambda: nn.OptimizedLSTMCell(H),
        "gru": lambda: nn.GRUCell(H),
        "bidirectional": lambda: nn.OptimizedLSTMCell(H),
        "convlstm": lambda: nn.ConvLSTMCell(H, (3, 3)),
    }[kind]
    if kind == "bidirectional":
        model = nn.Bidirectional(nn.RNN(make()), nn.RNN(make()))
    else:
        model = nn.Sequential([nn.RNN(make()) for _ in range(layers)]) if layers > 1 else nn.RNN(make())
    variables = model.init(jax.random.key(0), xs)
    return _jax_contender(model.apply, variables, xs)


def keras_rnn(kind, B, T, F, H, layers, xs):
    import keras

    make = {
        "lstm": lambda: keras.layers.LSTM(H, return_sequences=True),
        "gru": lambda: keras.layers.GRU(H, return_sequences=True),
        "bidirectional": lambda: keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True)),
        "convlstm": lambda: keras.layers.ConvLSTM2D(H, 3, padding="same", return_sequences=True),
    }[kind]
    model = keras.Sequential([keras.Input(xs.shape[1:])] + [make() for _ in range(layers)])
    trainable = [v.value for v in model.trainable_variables]
    other = [v.value for v in model.non_trainable_variables]
    return _jax_contender(lambda tv, x: model.stateless_call(tv, other, x)[0], trainable, xs)


def _on_gpu():
    return jax.default_backend() == "gpu"


def torch_rnn(kind, B, T, F, H, layers, xs, threads=CORES, dtype="float32", input_grad=True):
    """PyTorch's ``nn.LSTM``/``nn.GRU``: oneDNN on CPU, cuDNN when JAX runs on a GPU; in
    ``dtype`` (module and input; ``"bfloat16"`` is the peer of our bfloat16 compute); the input
    requires a gradient unless ``input_grad`` is false (data)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if _on_gpu() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = {"lstm": torch.nn.LSTM, "bidirectional": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    tdt = getattr(torch, dtype)
    model = module(F, H, num_layers=layers, batch_first=True, bidirectional=kind == "bidirectional")
    model = model.to(device=device, dtype=tdt)
    x = torch.from_numpy(np.array(xs)).to(device=device, dtype=tdt).requires_grad_(input_grad)

    def forward():
        torch.set_num_threads(threads)
        with torch.no_grad():
            model(x)
        sync()

    def forward_backward():
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x)[0].float().mean().backward()
        sync()

    return forward, forward_backward, None, None


# ----------------------------------------------------------------------------- modern cells
# Each against its official PyTorch code, on one unit of work that both sides compute exactly,
# with the same weights (``run_case`` compares the outputs of every contender before timing), the
# official code with threads = cores and, on a CPU of several cores, with 1 thread too:
#
# - slstm: x (B, T, F) -> the input projection W x (no bias) -> the sLSTM recurrence with its bias
#   -> h (B, T, H). Official: ``torch.nn.Linear(F, 4H, bias=False)`` followed by ``xlstm``'s
#   ``sLSTMCell`` with ``backend="vanilla"`` (its unit takes the projected gate inputs, so the
#   same projection is put in front of it). 4 heads.
# - mlstm: ``xlstm.xlstm_large``'s ``mLSTMLayer`` (fused q|k|v|o and i|f projections with biases,
#   gates soft-capped at 15, multi-head layer norm, output gate) without its output projection,
#   which is ``mlstm(H, layer_norm=True, layer_norm_epsilon=1e-6, gate_soft_cap=15.0)``; 4 heads.
#   The official layer runs with each of ``mlstm_kernels``' CPU kernels: the native chunkwise
#   kernel with autograd (the layer's default for training, the counterpart of our
#   ``"chunkwise"``; chunks of 64), the same with its hand-written backward, the native parallel
#   kernel (the math of ``xlstm``'s ``parallel_stabilized_simple``; the counterpart of our
#   ``"parallel"``) and the native step loop (``native_sequence__native``, of our ``"scan"``).
# - min_gru, min_lstm: ``minGRU_pytorch``'s ``minGRU`` / ``minLSTM`` (lucidrains), whose forward
#   over a sequence is a log-space parallel scan (cumulative sums and ``logcumsumexp``): the
#   counterpart of our ``"parallel"``. They have no bias; ours adds one (2H / 3H numbers a step).

MODERN = ("slstm", "mlstm", "min_gru", "min_lstm")
MODERN_HEADS = 4
#: (kind, official contender) -> our contender computing the same unit the same way
PAIRS = {
    ("slstm", "xlstm_vanilla"): "ours",
    ("mlstm", "xlstm_sequence"): "ours",
    ("mlstm", "xlstm_parallel"): "ours_parallel",
    ("mlstm", "xlstm_chunkwise"): "ours_chunkwise",
    ("mlstm", "xlstm_chunkwise_custbw"): "ours_chunkwise",
    ("min_gru", "mingru_pytorch"): "ours_parallel",
    ("min_lstm", "minlstm_pytorch"): "ours_parallel",
}
PAIRS |= {(kind, f"{label}_1thread"): ours for (kind, label), ours in PAIRS.items()}
ABSENT = {kind: {"flax": f"Flax has no {kind} cell", "keras": f"Keras has no {kind} layer"} for kind in MODERN}


def _heads(H):
    """Heads of the sLSTM and mLSTM cases: 4, or 1 where H is too small to split."""
    return MODERN_HEADS if H % MODERN_HEADS == 0 and H >= 2 * MODERN_HEADS else 1


def _chunk(T):
    """The mLSTM chunk size of both sides: 64 (both defaults), or T where 64 does not divide it (the
    official native kernel needs chunks that divide T)."""
    return 64 if T >= 64 and T % 64 == 0 else T


def _modern_flops(kind, B, T, F, H):
    """Multiply-adds x 2 of the matmuls with weights: the input projections, and the sLSTM's
    block-diagonal recurrent matmul (the mLSTM's memory products depend on the form: left out)."""
    if kind == "slstm":
        return 2 * B * T * (F * 4 * H + H * 4 * (H // _heads(H)))
    if kind == "mlstm":
        return 2 * B * T * F * (4 * H + 2 * _heads(H))
    return 2 * B * T * F * {"min_gru": 2, "min_lstm": 3}[kind] * H


def modern_cell(kind, H, T):
    """Our cell of a modern case (the unit described above)."""
    if kind == "slstm":
        return recurrent.slstm(H, num_heads=_heads(H))
    if kind == "mlstm":
        return recurrent.mlstm(
            H, num_heads=_heads(H), layer_norm=True, layer_norm_epsilon=1e-6, gate_soft_cap=15.0, chunk_size=_chunk(T)
        )
    return {"min_gru": recurrent.min_gru, "min_lstm": recurrent.min_lstm}[kind](H)


def ours_modern(kind, B, T, F, H, layers, xs, implementation="scan"):
    """Our layer of a modern case, with the official module's weights (``seeded_official``) where
    the official package is installed, so that every contender computes the same function."""
    layer = recurrent.rnn(modern_cell(kind, H, T), implementation=implementation)
    try:
        params = ours_params_from_official(kind, seeded_official(kind, F, H, T))
    except ImportError:
        params = layer.init(jax.random.key(0), xs.shape[2:])
    return _jax_contender(lambda p, x: layer.apply(p, x)[1], params, xs)


def seeded_official(kind, F, H, T, variant="chunkwise"):
    """``official_modern`` with the same weights at every call: drawn from ``N(0, 0.1^2)`` under a
    fixed seed (the official defaults set some blocks to zeros, which would leave parts of the
    comparison of outputs unchecked), the mLSTM layer norm's offset zero (ours has none)."""
    import torch

    saved = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        module = official_modern(kind, F, H, T, variant)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(torch.zeros_like(p) if name == "multihead_norm.bias" else 0.1 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(saved)
    return module


def outputs_BTH(out):
    """A contender's forward result as a NumPy ``(B, T, H)`` array: ours as is, the official
    modules' first output, the sLSTM's ``(B, heads, T, H / heads)`` reordered."""
    import numpy as np

    out = out[0] if isinstance(out, tuple) else out
    out = np.asarray(out.detach().cpu()) if hasattr(out, "detach") else np.asarray(out)
    if out.ndim == 4:
        B, K, T, D = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, T, K * D)
    return out


def official_modern(kind, F, H, T, variant="chunkwise"):
    """The official PyTorch module of a modern case (float32, on the CPU): called on ``x (B, T, F)``
    it returns the outputs (the sLSTM: ``(B, heads, T, H / heads)``; the others ``(B, T, H)``) or
    a tuple whose first element they are. ``variant`` picks the mLSTM kernel: ``"chunkwise"``,
    ``"chunkwise_custbw"``, ``"parallel"`` or ``"sequence"``."""
    import torch

    if kind == "slstm":
        from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig

        config = sLSTMCellConfig(hidden_size=H, num_heads=_heads(H), backend="vanilla", dtype="float32")
        return torch.nn.Sequential(torch.nn.Linear(F, 4 * H, bias=False), sLSTMCell(config))
    if kind == "mlstm":
        from xlstm.xlstm_large.model import mLSTMBackendConfig, mLSTMLayer, mLSTMLayerConfig

        chunkwise = {"chunkwise": "chunkwise--native_autograd", "chunkwise_custbw": "chunkwise--native_custbw"}
        backend = mLSTMBackendConfig(
            chunkwise_kernel=chunkwise.get(variant, chunkwise["chunkwise"]),
            chunk_size=_chunk(T),
            return_last_states=True,  # ours returns the final state too
            autocast_kernel_dtype="float32",
        )
        config = mLSTMLayerConfig(
            embedding_dim=H, num_heads=_heads(H), use_bias=True, norm_eps=1e-6, qk_dim_factor=1.0, v_dim_factor=1.0,
            gate_soft_cap=15.0, weight_mode="fused", mlstm_backend=backend,
        )  # fmt: skip
        layer = mLSTMLayer(config)
        layer.out_proj = torch.nn.Identity()  # ours has no output projection
        if variant in ("parallel", "sequence"):
            layer.mlstm_backend = _mlstm_kernel_module(variant)
        elif variant not in chunkwise:
            raise ValueError(f"unknown mLSTM variant {variant!r}")
        return layer
    if F != H:
        raise ValueError(f"{kind}: the official module reads inputs of width H={H}, got F={F}")
    if kind == "min_gru":
        from minGRU_pytorch import minGRU

        return minGRU(H)
    from minGRU_pytorch.minLSTM import minLSTM

    return minLSTM(H)


def _mlstm_kernel_module(variant):
    import torch

    class MLSTMKernel(torch.nn.Module):
        """``mlstm_kernels``' native parallel kernel or step loop in the place of the official
        layer's backend (which runs the chunkwise kernels only): ``(h, state or None)``."""

        def forward(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None):
            if variant == "parallel":
                from mlstm_kernels.torch.parallel.native import mlstm_parallel__native_autograd

                return mlstm_parallel__native_autograd(q=q, k=k, v=v, i=i, f=f, eps=1e-6), None
            from mlstm_kernels.torch.recurrent import mlstm_recurrent_sequence__native_fw

            return mlstm_recurrent_sequence__native_fw(q=q, k=k, v=v, i=i, f=f, return_last_states=True, eps=1e-6)

    return MLSTMKernel()


def ours_params_from_official(kind, module):
    """Our parameters of ``modern_cell(kind, ...)`` holding the official module's weights, so that
    both compute the same outputs (``run_case`` checks it before timing). Rearranged in NumPy (no
    small XLA programs to compile): the layouts are those of ``recurrent.interop.from_xlstm``."""
    import numpy as np

    from recurrent._minrnn import MinGRUParams, MinLSTMParams
    from recurrent._mlstm import MLSTMParams
    from recurrent._slstm import SLSTMParams

    n = lambda w: w.detach().cpu().float().numpy()  # noqa: E731
    if kind == "slstm":
        projection, cell = module
        R, bias = n(cell.recurrent_kernel[:]), n(cell.bias[:])  # (K, D, 4, D) and (K, 4, D), gates i, f, z, o
        K, D, G, _ = R.shape
        params = SLSTMParams(n(projection.weight).T, R.reshape(K, D, G * D), bias.swapaxes(0, 1).reshape(G * K * D))
    elif kind == "mlstm":
        params = MLSTMParams(
            input_kernel=n(module.qkv_opreact.weight).T,
            input_bias=n(module.qkv_opreact.bias),
            gate_kernel=n(module.ifgate_preact.weight).T,
            gate_bias=n(module.ifgate_preact.bias),
            norm_scale=n(module.multihead_norm.weight),
        )
    elif kind == "min_gru":  # theirs: hidden | gate; ours: update | candidate; no bias
        hidden, gate = np.split(n(module.to_hidden_and_gate.weight).T, 2, axis=1)
        params = MinGRUParams(np.concatenate([gate, hidden], 1), np.zeros(gate.shape[1] * 2, np.float32))
    else:  # theirs: hidden | f | i; ours: f | i | candidate
        hidden, f, i = np.split(n(module.to_hidden_and_f_i_gate.weight).T, 3, axis=1)
        params = MinLSTMParams(np.concatenate([f, i, hidden], 1), np.zeros(f.shape[1] * 3, np.float32))
    return jax.tree.map(jnp.asarray, params)


def torch_modern(kind, B, T, F, H, layers, xs, variant="chunkwise", threads=CORES):
    """The official module of a modern case (``official_modern``), eagerly, on the GPU when JAX
    runs on one."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if _on_gpu() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = seeded_official(kind, F, H, T, variant).to(device)
    x = torch.from_numpy(np.array(xs)).to(device).requires_grad_(True)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731

    def forward():
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = module(x)
        sync()
        return out

    def forward_backward():
        torch.set_num_threads(threads)
        module.zero_grad(set_to_none=True)
        x.grad = None
        first(module(x)).mean().backward()
        sync()

    return forward, forward_backward, None, None


def modern_contenders(kind, quick=False):
    """Ours in every form, the official code (see above), and PyTorch with 1 thread as well where
    the machine has more (as for ``nn.LSTM``; not in ``--quick``)."""
    c = {"ours": ours_modern}
    if kind == "slstm":
        c["xlstm_vanilla"] = torch_modern
        if CORES > 1 and not _on_gpu() and not quick:
            c["xlstm_vanilla_1thread"] = lambda *a: torch_modern(*a, threads=1)
        return c
    c["ours_parallel"] = lambda *a: ours_modern(*a, implementation="parallel")
    if kind == "mlstm":
        c["ours_chunkwise"] = lambda *a: ours_modern(*a, implementation="chunkwise")
        for variant in ("sequence", "parallel", "chunkwise", "chunkwise_custbw"):
            c[f"xlstm_{variant}"] = lambda *a, v=variant: torch_modern(*a, variant=v)
        if CORES > 1 and not _on_gpu() and not quick:
            for variant in ("sequence", "parallel", "chunkwise", "chunkwise_custbw"):
                c[f"xlstm_{variant}_1thread"] = lambda *a, v=variant: torch_modern(*a, variant=v, threads=1)
        return c
    name = {"min_gru": "mingru_pytorch", "min_lstm": "minlstm_pytorch"}[kind]
    c[name] = torch_modern
    if CORES > 1 and not _on_gpu() and not quick:
        c[f"{name}_1thread"] = lambda *a: torch_modern(*a, threads=1)
    return c


def contenders_for(kind, layers, quick):
    if kind in MODERN:
        return modern_contenders(kind, quick)
    c = {"ours": ours}
    if kind in ("lstm", "gru", "bidirectional"):
        c["torch"] = torch_rnn
        if CORES > 1 and not _on_gpu():  # on a shared machine OpenMP's spinning threads can suffer
            c["torch_1thread"] = lambda *a: torch_rnn(*a, threads=1)
    if layers > 1:  # the stack layer by layer: one scan per layer; equal layers scanned over stacked parameters
        c["ours_layerwise"] = lambda *a: ours(*a, layerwise=True)
        c["ours_scan_layers"] = lambda *a: ours(*a, layerwise=True, scan_layers=True)
        c["ours_layerwise_vjp"] = lambda *a: ours(*a, layerwise=True, implementation="vjp")
    if kind in ("lstm", "gru", "peephole", "cifg", "bidirectional") and layers == 1:  # hand-written backward
        c["ours_vjp"] = lambda *a: ours(*a, implementation="vjp")
    if kind in ("lstm", "gru") and layers == 1:  # bfloat16 compute, float32 state, and PyTorch in bfloat16
        c["ours_bf16"] = lambda *a: ours(*a, dtype=jnp.bfloat16)
        c["torch_bf16"] = lambda *a: torch_rnn(*a, dtype="bfloat16")
    if kind == "lstm" and layers == 1:
        c["ours_vjp_bf16"] = lambda *a: ours(*a, dtype=jnp.bfloat16, implementation="vjp")
    if kind == "lstm" and _on_gpu():  # the optional cuDNN path (jax.experimental.rnn)
        if layers == 1:
            c["ours_cudnn"] = lambda *a: ours(*a, implementation="cudnn")
        else:
            c["ours_layerwise_cudnn"] = lambda *a: ours(*a, layerwise=True, implementation="cudnn")
    if kind in ("lstm", "gru", "bidirectional") and not _on_gpu():  # the optional native kernels (CPU)
        c["ours_native"] = ours_native
        c["ours_native_bf16"] = lambda *a: ours_native(*a, dtype=jnp.bfloat16)
        c.setdefault("torch_bf16", lambda *a: torch_rnn(*a, dtype="bfloat16"))
    if kind in ("lstm", "gru", "bidirectional", "convlstm"):
        c["flax"], c["keras"] = flax_rnn, keras_rnn
    if kind in ("lstm", "convlstm") and layers == 1:  # diagnostic: the projection before the loop
        c["ours_hoisted"] = lambda *a: ours(*a, projection="hoisted")
    if kind == "bidirectional":  # both directions in one (batched) scan, and in two
        c["ours_one_scan"] = lambda *a: ours(*a, one_scan=True)
        c["ours_two_scans"] = lambda *a: ours(*a, one_scan=False)
    return c


# ----------------------------------------------------------------------------- measuring


def matmul_throughput(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one ``(n, n) @ (n, n)`` float32 matmul, by JAX and by PyTorch."""
    out = {}
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(jnp.dot).lower(a, a).compile()
    jax.block_until_ready(f(a, a))
    out["jax"] = 2 * n**3 / min(timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeats)) / 1e9
    try:
        import torch

        torch.set_num_threads(CORES)
        gpu = _on_gpu() and torch.cuda.is_available()
        t = torch.randn(n, n, device="cuda" if gpu else "cpu")
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        torch.mm(t, t)
        sync()
        out["torch"] = 2 * n**3 / min(timed(lambda: (torch.mm(t, t), sync())) for _ in range(repeats)) / 1e9
    except ImportError:
        pass
    return out


def run_case(name, kind, B, T, F, H, layers, xs, *, repeats, peak_gflops, quick, only=None):
    """One case's contenders timed interleaved (``only``: the labels to run, where given)."""
    built, skipped = {}, {}
    available = contenders_for(kind, layers, quick)
    for label in only or ():
        if label not in available:
            skipped[label] = "not a contender of this case"
    for label, build in available.items():
        if only and label not in only:
            continue
        try:
            contender = build(kind, B, T, F, H, layers, xs)
            for fn in contender[:2]:  # warm up: a peer may fail only when it runs (PyTorch's
                fn()  # bfloat16 LSTM on a CPU without AVX-512, say)
            built[label] = contender
        except Exception as e:  # a missing or failing peer is reported, not fatal
            skipped[label] = f"{type(e).__name__}: {e}"[:200]
    labels = list(built)
    agreement = {}
    if kind in MODERN and "ours" in built:  # the same weights everywhere: check the outputs before timing
        reference = outputs_BTH(built["ours"][0]())
        agreement = {label: float(abs(outputs_BTH(built[label][0]()) - reference).max()) for label in labels}
    calls = {(label, w): built[label][w] for label in labels for w in (0, 1)}
    # calls per sample so that each takes >= ~50 ms
    samples = interleaved(calls, repeats, {key: calls_per_sample(fn) for key, fn in calls.items()})
    flops = _gate_flops(kind, B, T, F, H, layers)
    rows = []
    base = {w: statistics.median(samples["ours", w]) for w in (0, 1)} if "ours" in built else None
    torch_ms = {w: statistics.median(samples["torch", w]) for w in (0, 1)} if "torch" in built else None
    for label in labels:
        fwd, fwdbwd = (statistics.median(samples[label, w]) for w in (0, 1))
        _, _, compile_s, peak = built[label]
        rows.append(
            {
                "case": name,
                "contender": label,
                "fwd_ms": fwd,
                "fwdbwd_ms": fwdbwd,
                "ours_over_it_fwd": base[0] / fwd if base else None,
                "ours_over_it_fwdbwd": base[1] / fwdbwd if base else None,
                "it_over_torch_fwd": fwd / torch_ms[0] if torch_ms else None,
                "it_over_torch_fwdbwd": fwdbwd / torch_ms[1] if torch_ms else None,
                "compile_s": compile_s,
                "peak_mb": None if peak is None else peak / 2**20,
                "mm_frac": 3 * flops / (fwdbwd / 1e3) / (peak_gflops * 1e9),
                "samples_fwd_ms": samples[label, 0],
                "samples_fwdbwd_ms": samples[label, 1],
            }
        )
        if label in agreement:
            rows[-1]["max_abs_diff_to_ours"] = agreement[label]
        pair = PAIRS.get((kind, label))
        if pair in built:  # our form that computes the same unit the same way, over this contender
            rows[-1]["pair"] = pair
            for w, key in ((0, "fwd"), (1, "fwdbwd")):
                rows[-1][f"pair_over_it_{key}"] = statistics.median(samples[pair, w]) / rows[-1][f"{key}_ms"]
    return {
        "case": name,
        "kind": kind,
        "shape": dict(batch=B, steps=T, features=F, hidden=H, layers=layers),
        "rows": rows,
        "skipped": skipped,
        **({"absent": ABSENT[kind]} if kind in ABSENT else {}),
    }


def compile_depth(depths, B, T, F, H, repeats=3):
    """Seconds to compile forward+backward of a stack of ``depth`` LSTM(H) layers, as one loop
    over all layers (``rnn(stacked(cells))``), layer by layer (``stacked(rnn layers)``), and
    layer by layer with equal layers as one scan over stacked parameters (``scan_layers=True``):
    the least of ``repeats`` compiles of a freshly built stack (one compile varies by 20-50 %)."""
    out = {}
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    forms = {
        "one loop": {},
        "layer by layer": {"layerwise": True},
        "scanned layers": {"layerwise": True, "scan_layers": True},
    }
    for depth in depths:
        for form, options in forms.items():
            out[f"{form}, depth {depth}"] = min(
                ours("lstm", B, T, F, H, depth, xs, **options)[2] for _ in range(repeats)
            )
    return out


def compile_options(B, T, F, H):
    """Forward+backward compile seconds of every combination of the driver's speed options."""
    out = {}
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    for projection, unroll, remat in itertools.product(("hoisted", "fused"), (1, 4), (False, True)):
        key = f"projection={projection},unroll={unroll},remat={remat}"
        out[key] = ours("lstm", B, T, F, H, 1, xs, projection=projection, unroll=unroll, remat=remat)[2]
    xs = jax.random.normal(jax.random.key(1), (B, T, F))
    out["bidirectional one scan"] = ours("bidirectional", B, T, F, H, 1, xs)[2]
    out["stacked 8"] = ours("lstm", B, T, F, H, 8, xs)[2]
    return out


def remat_memory(B, T, F, H):
    """Compiled forward+backward memory (MB) of an LSTM layer over ``T`` steps, with and
    without ``remat`` (XLA's memory analysis: arguments + outputs + temporaries)."""
    xs = jax.ShapeDtypeStruct((B, T, F), jnp.float32)
    out = {}
    for remat in (False, True):
        layer = recurrent.rnn(recurrent.lstm(H), remat=remat)
        params = layer.init(jax.random.key(0), (F,))
        grad = jax.grad(lambda p, x: jnp.mean(layer.apply(p, x)[1]), argnums=(0, 1))
        m = jax.jit(grad).lower(params, xs).compile().memory_analysis()
        out[f"remat={remat}"] = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20
    return out


# ----------------------------------------------------------------------------- reporting


def speed_environment() -> dict[str, str]:
    """The environment variables of this process that change CPU timings: XLA's flags, glibc's
    allocator settings (whether large buffers go back to the system after each call, which
    ``benchmarks/allocator_ab.py`` measures for us and PyTorch), a preloaded allocator, OpenMP's."""
    prefixes = ("XLA_", "MALLOC_", "OMP_", "KMP_", "MKL_", "GOMP_")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes) or k == "LD_PRELOAD"}


def format_tables(result) -> str:
    env = result.get("environment")
    lines = [
        f"machine: {result['machine']}; matmul GFLOP/s {result['matmul_gflops']}; "
        f"{result['repeats']} interleaved repeats; load average {result['load_average']}",
        *([f"environment: {' '.join(f'{k}={v}' for k, v in env.items())}"] if env else []),
        "",
    ]
    lines += [
        "| case | contender | fwd ms | fwd+bwd ms | ours/it fwd | ours/it fwd+bwd | it/torch fwd "
        "| it/torch fwd+bwd | compile s | peak MB | matmul frac |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for case in result["cases"]:
        for r in case["rows"]:
            lines.append(
                f"| {r['case']} | {r['contender']} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} "
                f"| {fmt(r['ours_over_it_fwd'], '.2f')} | {fmt(r['ours_over_it_fwdbwd'], '.2f')} "
                f"| {fmt(r.get('it_over_torch_fwd'), '.2f')} | {fmt(r.get('it_over_torch_fwdbwd'), '.2f')} "
                f"| {fmt(r['compile_s'], '.2f')} | {fmt(r['peak_mb'], '.0f')} | {r['mm_frac']:.3f} |"
            )
        for label, why in case["skipped"].items():
            lines.append(f"| {case['case']} | {label} | skipped: {why} | | | | | | | | |")
        for label, why in case.get("absent", {}).items():
            lines.append(f"| {case['case']} | {label} | none: {why} | | | | | | | | |")
    pairs = [r for case in result["cases"] for r in case["rows"] if "pair" in r]
    if pairs:
        lines += [
            "",
            "| case | official | ours, the same form | ours/official fwd | ours/official fwd+bwd |",
            "|---|---|---|--:|--:|",
        ]
        lines += [
            f"| {r['case']} | {r['contender']} | {r['pair']} | {r['pair_over_it_fwd']:.2f} "
            f"| {r['pair_over_it_fwdbwd']:.2f} |"
            for r in pairs
        ]
    for key in ("compile_depth_s", "compile_options_s", "remat_memory_mb"):
        if result.get(key):
            lines += ["", f"{key}: " + ", ".join(f"{k}: {v:.2f}" for k, v in result[key].items())]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 + 0.45 * sum(len(c["rows"]) for c in cases)))
    labels = [f"{r['case']}: {r['contender']}" for c in cases for r in c["rows"]]
    for ax, key, title in zip(axes, ("fwd_ms", "fwdbwd_ms"), ("forward", "forward+backward")):
        values = [r[key] for c in cases for r in c["rows"]]
        colors = ["C0" if r["contender"].startswith("ours") else "C7" for c in cases for r in c["rows"]]
        ax.barh(range(len(values)), values, color=colors)
        ax.set_yticks(range(len(values)), labels if ax is axes[0] else [""] * len(values), fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms (median, log scale)")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats: a smoke test")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--extras", default="depth,options,remat", help="extra figures (or 'none')")
    parser.add_argument(
        "--contenders",
        default=None,
        help="comma-separated contenders to run (default: every one of each case), e.g. torch,ours_native",
    )
    parser.add_argument("--out", default="runs/benchmarks", help="directory for suite.json and suite.png")
    args = parser.parse_args(argv)
    names = case_names(parser, args.cases)  # before any timing: a typo ends the run at once
    only = contender_names(parser, args.contenders, names, args.quick)
    repeats = args.repeats or (2 if args.quick else 5)
    gflops = matmul_throughput(256 if args.quick else 2048, 2 if args.quick else 5)
    peak = max(gflops.values())
    result = {
        "machine": f"{platform.machine()}, {CORES} CPU cores, {jax.devices()[0]}",
        "environment": speed_environment(),
        "repeats": repeats,
        "versions": {"jax": jax.__version__},
        "matmul_gflops": {k: round(v, 1) for k, v in gflops.items()},
        "command": "python -m benchmarks.suite " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "cases": [],
    }
    for name in names:
        kind, B, T, F, H, layers, xs = case_inputs(name, args.quick)
        result["cases"].append(
            run_case(name, kind, B, T, F, H, layers, xs, repeats=repeats, peak_gflops=peak, quick=args.quick, only=only)
        )
        print(format_tables({**result, "cases": result["cases"][-1:], "load_average": os.getloadavg()[0]}), flush=True)
    extras = args.extras.split(",")
    small = (2, 5, 3, 4) if args.quick else (32, 128, 128, 256)
    if "depth" in extras:
        result["compile_depth_s"] = compile_depth((1, 2, 8), *small, repeats=1 if args.quick else 3)
    if "options" in extras:
        result["compile_options_s"] = compile_options(*small)
    if "remat" in extras:
        result["remat_memory_mb"] = remat_memory(*((2, 50, 3, 4) if args.quick else (32, 10_000, 256, 256)))
    result["load_average"] = os.getloadavg()[0]
    try:
        import torch

        result["versions"]["torch"] = torch.__version__
    except ImportError:
        pass
    if any(case["kind"] in MODERN for case in result["cases"]):
        from importlib import metadata

        for package in ("xlstm", "mlstm_kernels", "minGRU-pytorch"):
            try:
                result["versions"][package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
    table = format_tables(result)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "suite.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(args.out, "suite.png"))
    print(f"\nwrote {args.out}/suite.json and suite.png")
    return result


if __name__ == "__main__":
    main()
