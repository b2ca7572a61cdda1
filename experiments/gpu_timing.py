"""Timing helpers shared by the GPU benchmarks: copy bandwidth (the HBM roofline) and per-call time."""

from __future__ import annotations

import statistics
import time


def copy_bandwidth(repeats: int) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
    copy = jax.jit(lambda a: a * 2)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


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
