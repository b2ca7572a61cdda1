"""Timing helpers shared by the GPU benchmarks: copy bandwidth (the HBM roofline) and per-call time."""

from __future__ import annotations

import statistics
import time


def copy_bandwidth(repeats: int) -> float:
    """Achievable HBM bytes/s: the better of a 1 GiB copy (bytes read + written) and a
    1 GiB reduction (bytes read), each the median of `repeats` timed runs on random data."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (1 << 29,), jnp.bfloat16)  # 1 GiB
    best = 0.0
    for fn, moved in ((lambda a: a * 2, 2 * x.nbytes), (lambda a: jnp.sum(a, dtype=jnp.float32), x.nbytes)):
        fn = jax.jit(fn)
        fn(x).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x).block_until_ready()
            times.append(time.perf_counter() - start)
        best = max(best, moved / statistics.median(times))
    return best


def time_per_call(fn, arg_sets, repeats: int, queued: int = 5) -> float:
    """Median seconds per call of fn: one jitted program runs fn on every (distinct) argument set,
    so inputs rotate through buffers larger than the L2 cache."""
    import jax

    run_all = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(run_all(arg_sets))  # compile
    jax.block_until_ready(run_all(arg_sets))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(queued):
            out = run_all(arg_sets)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / (queued * len(arg_sets)))
    return statistics.median(times)
