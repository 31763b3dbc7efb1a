"""A population of small LSTMs trained as one vmapped program, against one after another.

Run ``python -m benchmarks.population [--quick] [--out=PATH.json] [--members=64] [--torch_device=auto]``.
``--grid_members=4,16,64 --grid_hidden=16,64,256`` times the two JAX contenders over a grid of
population and hidden sizes instead (``--steps``, ``--batch``, ``--length`` set the rest): where the
vmapped program starts to pay on this machine.

The workload (the issue's): 64 LSTMs of hidden size 64, batch 32, sequences of 64 steps, 200 Adam
steps each, every member with its own learning rate (log-uniform in [1e-4, 1e-2]) and its own key.
The task is synthetic and generated on the device inside the training loop, so no host feeding is
timed: inputs ``x ~ N(0, 1)`` with 16 features, target ``y_t = x_{t-1}`` (recall the previous
input), squared error of a linear readout of every step's hidden state.

Three contenders, in one process, each compiled / warmed up before it is timed:

- ``vmapped``: ``jax.jit(jax.vmap(train))`` over the members' learning rates and keys, where
  ``train(lr, key)`` is the whole 200-step run (``lax.scan`` over the steps, ``recurrent.rnn``
  inside): one program for the population;
- ``sequential``: the same ``jax.jit(train)`` (compiled once) called for each member in turn;
- ``torch``: ``torch.nn.LSTM`` + ``nn.Linear`` with ``torch.optim.Adam``, the members one after
  another (on the GPU when there is one, else on the CPU with ``torch.set_num_threads(cores)``).

Timings are wall-clock seconds for all members (``block_until_ready`` / ``cuda.synchronize`` at the
end); compile time is reported apart. The final mean losses are printed as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import recurrent
from benchmarks._common import write_json

FULL = dict(members=64, hidden=64, batch=32, length=64, steps=200, features=16)
QUICK = dict(members=4, hidden=8, batch=4, length=8, steps=3, features=4)


def make_train(hidden: int, batch: int, length: int, steps: int, features: int):
    """``train(lr, key) -> losses (steps,)``: one member's whole run."""
    layer = recurrent.rnn(recurrent.lstm(hidden))

    def data(key):
        xs = jax.random.normal(key, (batch, length, features))
        ys = jnp.concatenate([jnp.zeros_like(xs[:, :1]), xs[:, :-1]], axis=1)
        return xs, ys

    def loss_fn(params, xs, ys):
        _, hs = layer.apply(params["rnn"], xs)
        pred = hs @ params["out"]["kernel"] + params["out"]["bias"]
        return jnp.mean((pred - ys) ** 2)

    def train(lr, key):
        k_rnn, k_out, k_data = jax.random.split(key, 3)
        params = {
            "rnn": layer.init(k_rnn, (features,)),
            "out": {
                "kernel": jax.nn.initializers.lecun_normal()(k_out, (hidden, features)),
                "bias": jnp.zeros((features,), jnp.float32),
            },
        }
        opt = optax.adam(lr)

        def step(carry, i):
            params, opt_state = carry
            xs, ys = data(jax.random.fold_in(k_data, i))
            loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        _, losses = lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
        return losses

    return train


def time_jax(sizes: dict[str, int], lrs: np.ndarray, keys: np.ndarray) -> dict[str, Any]:
    train = make_train(**{k: sizes[k] for k in ("hidden", "batch", "length", "steps", "features")})
    wrap = lambda k: jax.random.wrap_key_data(k)  # noqa: E731
    population = jax.jit(jax.vmap(lambda lr, k: train(lr, wrap(k))))
    single = jax.jit(lambda lr, k: train(lr, wrap(k)))
    lrs_j, keys_j = jnp.asarray(lrs, jnp.float32), jnp.asarray(keys)

    t = time.perf_counter()
    population_c = population.lower(lrs_j, keys_j).compile()
    compile_pop = time.perf_counter() - t
    t = time.perf_counter()
    single_c = single.lower(lrs_j[0], keys_j[0]).compile()
    compile_single = time.perf_counter() - t

    t, cpu = time.perf_counter(), time.process_time()
    pop_losses = jax.block_until_ready(population_c(lrs_j, keys_j))
    vmapped_s, vmapped_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    t, cpu = time.perf_counter(), time.process_time()
    seq_losses = [single_c(lrs_j[m], keys_j[m]) for m in range(len(lrs))]
    seq_losses = jax.block_until_ready(seq_losses)
    sequential_s, sequential_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    pop_final = np.asarray(pop_losses)[:, -1]
    seq_final = np.array([np.asarray(s)[-1] for s in seq_losses])
    return {
        "vmapped_s": vmapped_s,
        "sequential_s": sequential_s,
        # the process's CPU time (all threads): what other jobs on a shared machine disturb least
        "vmapped_cpu_s": vmapped_cpu_s,
        "sequential_cpu_s": sequential_cpu_s,
        "vmapped_compile_s": compile_pop,
        "sequential_compile_s": compile_single,
        "vmapped_final_loss_mean": float(pop_final.mean()),
        "sequential_final_loss_mean": float(seq_final.mean()),
        "max_final_loss_diff_vmapped_vs_sequential": float(np.max(np.abs(pop_final - seq_final))),
    }


def time_torch(sizes: dict[str, int], lrs: np.ndarray, device: str) -> dict[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    H, B, T, S, F = (sizes[k] for k in ("hidden", "batch", "length", "steps", "features"))

    def run(lr: float, seed: int, steps: int) -> float:
        torch.manual_seed(seed)
        lstm = torch.nn.LSTM(F, H, batch_first=True).to(device)
        out = torch.nn.Linear(H, F).to(device)
        opt = torch.optim.Adam([*lstm.parameters(), *out.parameters()], lr=lr)
        gen = torch.Generator(device=device).manual_seed(seed)
        loss = torch.zeros(())
        for _ in range(steps):
            xs = torch.randn(B, T, F, device=device, generator=gen)
            ys = torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1)
            hs, _ = lstm(xs)
            loss = torch.mean((out(hs) - ys) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t = time.perf_counter()
    run(1e-3, 0, min(S, 5))  # warm-up (cuDNN / thread pools)
    sync()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    finals = [run(float(lr), m, S) for m, lr in enumerate(lrs)]
    sync()
    return {
        "torch_s": time.perf_counter() - t,
        "torch_warmup_s": warmup_s,
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "torch_final_loss_mean": float(np.mean([f.item() for f in finals])),
    }


def _ints(text: str, default: int, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()] if text else [default]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: {flag} must be comma-separated positive integers; got {text!r} (e.g. {flag}=4,16,64)")
    return values


def population_inputs(members: int) -> tuple[np.ndarray, np.ndarray]:
    """Each member's learning rate (log-uniform in [1e-4, 1e-2]) and key data, from seed 0."""
    rng = np.random.default_rng(0)
    lrs = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), members))
    root = jax.random.key(0)
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(root, m))) for m in range(members)])
    return lrs, keys


def grid(sizes: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Vmapped against sequential over members x hidden: the ratio sequential / vmapped of each cell."""
    members = _ints(args.grid_members, sizes["members"], "--grid_members")
    hiddens = _ints(args.grid_hidden, sizes["hidden"], "--grid_hidden")
    result: dict[str, Any] = {
        "sizes": {k: v for k, v in sizes.items() if k not in ("members", "hidden")},
        "jax_backend": jax.default_backend(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "load_average": list(os.getloadavg()),
        "cells": [],
    }
    print(f"batch {sizes['batch']}, {sizes['length']} steps, {sizes['steps']} training steps; jax on "
          f"{result['jax_backend']}; seconds for the whole population (ratio: sequential / vmapped)")  # fmt: skip
    print("| members | hidden | vmapped s | sequential s | sequential / vmapped | the same in CPU time |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for hidden in hiddens:
        for m in members:
            cell_sizes = {**sizes, "members": m, "hidden": hidden}
            timed = time_jax(cell_sizes, *population_inputs(m))
            ratio = timed["sequential_s"] / timed["vmapped_s"]
            result["cells"].append({"members": m, "hidden": hidden, **timed, "ratio_sequential_over_vmapped": ratio})
            cpu_ratio = timed["sequential_cpu_s"] / timed["vmapped_cpu_s"]
            result["cells"][-1]["cpu_ratio_sequential_over_vmapped"] = cpu_ratio
            print(f"| {m} | {hidden} | {timed['vmapped_s']:.2f} | {timed['sequential_s']:.2f} | {ratio:.2f}x | "
                  f"{cpu_ratio:.2f}x |", flush=True)  # fmt: skip
    result["load_average_after"] = list(os.getloadavg())
    if args.out:
        write_json(args.out, result)
    return result


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.population", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test; timings mean nothing)")
    parser.add_argument("--out", default="", help="write the results as JSON to this path")
    parser.add_argument("--members", type=int, default=0, help="population size (default 64; quick 4)")
    parser.add_argument("--torch_device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch contender")
    for name in ("hidden", "batch", "length", "steps"):
        parser.add_argument(
            f"--{name}", type=int, default=0, help=f"{name} (default {FULL[name]}; quick {QUICK[name]})"
        )
    parser.add_argument("--grid_members", default="", help="comma-separated population sizes of a grid (JAX only)")
    parser.add_argument("--grid_hidden", default="", help="comma-separated hidden sizes of a grid (JAX only)")
    args = parser.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    for name in ("members", "hidden", "batch", "length", "steps"):
        if getattr(args, name):
            sizes[name] = getattr(args, name)
    if args.grid_members or args.grid_hidden:
        return grid(sizes, args)
    lrs, keys = population_inputs(sizes["members"])

    result: dict[str, Any] = {
        "sizes": sizes,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "load_average": list(os.getloadavg()),
    }
    result.update(time_jax(sizes, lrs, keys))
    if not args.no_torch:
        result.update(time_torch(sizes, lrs, args.torch_device))
        result["ratio_torch_over_vmapped"] = result["torch_s"] / result["vmapped_s"]
    result["ratio_sequential_over_vmapped"] = result["sequential_s"] / result["vmapped_s"]
    result["load_average_after"] = list(os.getloadavg())

    m = sizes["members"]
    print(f"population of {m} LSTMs (hidden {sizes['hidden']}, batch {sizes['batch']}, {sizes['length']} steps, "
          f"{sizes['steps']} training steps); jax on {result['jax_backend']}")  # fmt: skip
    print(f"  vmapped (one program)      {result['vmapped_s']:8.2f} s   (compile {result['vmapped_compile_s']:.1f} s)")
    seq, compile_s = result["sequential_s"], result["sequential_compile_s"]
    print(
        f"  sequential, ours           {seq:8.2f} s   (compile {compile_s:.1f} s)"
        f"   ratio {result['ratio_sequential_over_vmapped']:.1f}x"
    )
    if "torch_s" in result:
        where = f"{result['torch_device']}, {result['torch_threads']} threads"
        print(
            f"  sequential, torch ({where}) {result['torch_s']:8.2f} s"
            f"   ratio {result['ratio_torch_over_vmapped']:.1f}x"
        )
    print(
        f"  final mean loss: vmapped {result['vmapped_final_loss_mean']:.4f}, sequential "
        f"{result['sequential_final_loss_mean']:.4f}" + (
            f", torch {result['torch_final_loss_mean']:.4f}" if "torch_s" in result else "")
    )  # fmt: skip
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
