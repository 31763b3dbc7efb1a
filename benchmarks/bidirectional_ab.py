"""Bidirectional LSTM(256), batch 32 x 128 steps x 128 inputs: both directions in one scan vs two
scans, interleaved (9 repeats). Run ``python -m benchmarks.bidirectional_ab``."""
import time, statistics, jax, jax.numpy as jnp, recurrent
xs = jax.random.normal(jax.random.key(1), (32,128,128))
fns = {}
for name, one in (("one", True), ("two", False)):
    layer = recurrent.bidirectional(recurrent.lstm(256), one_scan=one)
    p = layer.init(jax.random.key(0), (128,))
    f = jax.jit(lambda p, x, layer=layer: layer.apply(p, x)[1]).lower(p, xs).compile()
    g = jax.jit(jax.grad(lambda p, x, layer=layer: jnp.mean(layer.apply(p, x)[1]))).lower(p, xs).compile()
    fns[name] = (f, g, p)
s = {(n,w): [] for n in fns for w in (0,1)}
for r in range(9):
    for n in (("one","two") if r%2==0 else ("two","one")):
        for w in (0,1):
            f, g, p = fns[n]; fn = (f,g)[w]
            jax.block_until_ready(fn(p, xs))
            t0=time.perf_counter(); jax.block_until_ready(fn(p, xs)); s[n,w].append(time.perf_counter()-t0)
for w in (0,1):
    a, b = statistics.median(s["one",w]), statistics.median(s["two",w])
    print(("fwd","fwd+bwd")[w], f"one {a*1e3:.1f} ms two {b*1e3:.1f} ms two/one {b/a:.2f}")
