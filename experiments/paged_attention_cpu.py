"""Attention over KV pages on CPU: the C++ kernel against the jnp formulation it replaces.

Two levels, each timed alternately in the same run on fresh random inputs:

- one call, `jaxsys.kvcache.cpu_kernel.paged_attention` against `nanobatch.scan_attention`
  (`small`'s heads: 6 query heads over 2 KV heads, head_dim 64, 16-token pages), for rows
  of 1 to 16 query tokens (a decode row, speculative verifies) and for a 64-token prefill
  chunk, which the engine leaves to XLA;
- the engine's whole decode step (`Engine.time_decode`, `small` with random weights), with
  `attention_impl="auto"` (the kernel) against `"reference"` (jnp), for 1 and 16 rows.

    python -m experiments.paged_attention_cpu [--rounds 3]

Figures are medians over the rounds; `speedup` = jnp time / kernel time. The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsys.config import get_preset
    from jaxsys.engine import Engine, EngineConfig
    from jaxsys.kvcache import cpu_kernel
    from jaxsys.model import ModelDef
    from jaxsys.nanobatch import compiler_options, scan_attention, time_call

    if jax.default_backend() != "cpu" or not cpu_kernel.available():
        print(f"needs XLA:CPU and a built kernel (backend {jax.default_backend()})", file=sys.stderr)
        return 1
    config = get_preset("small")
    kv_heads, heads, hd, page_size, width = config.n_kv_heads, config.n_heads, config.resolved_head_dim, 16, 20
    rng = np.random.default_rng(0)
    num_pages = 32 * width
    pools = [jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, hd), np.float32)) for _ in range(2)]
    opts = compiler_options()
    kernel = jax.jit(cpu_kernel.paged_attention, compiler_options=opts)
    reference = jax.jit(scan_attention, compiler_options=opts)

    calls = []
    for rows, tokens in ((16, 1), (16, 6), (16, 10), (16, 16), (2, 64)):
        table = jnp.asarray(np.stack([rng.permutation(num_pages)[:width] for _ in range(rows)]).astype(np.int32))
        start = jnp.asarray(rng.integers(140, 260, rows).astype(np.int32))
        q = jnp.asarray(rng.standard_normal((rows, tokens, heads, hd), np.float32))
        args_ = (q, *pools, table, start)
        err = float(jnp.max(jnp.abs(kernel(*args_)[0] - reference(*args_)[0])))
        times = {"kernel": [], "jnp": []}
        for _ in range(args.rounds):
            times["kernel"].append(time_call(lambda: kernel(*args_), repeats=21))
            times["jnp"].append(time_call(lambda: reference(*args_), repeats=21))
        k, r = np.median(times["kernel"]), np.median(times["jnp"])
        calls.append({"rows": rows, "tokens": tokens, "queries_per_kv_head": tokens * heads // kv_heads,
                      "kernel_ms": k * 1e3, "jnp_ms": r * 1e3, "speedup": r / k, "max_abs_diff": err,
                      "engine_uses_kernel": tokens * heads // kv_heads <= cpu_kernel.MAX_QUERIES})

    model = ModelDef(config)
    params = model.init(0)
    engines = {impl: Engine(model, params, EngineConfig(max_batch=16, max_len=320, attention_impl=impl))
               for impl in ("auto", "reference")}
    steps = []
    for rows in (1, 16):
        for context in (200, 300):
            times = {impl: [] for impl in engines}
            for _ in range(args.rounds):
                for impl, engine in engines.items():
                    times[impl].append(engine.time_decode((rows,), context=context, repeats=9))
            k, r = np.median(times["auto"]), np.median(times["reference"])
            steps.append({"rows": rows, "context": context, "kernel_ms": k * 1e3, "jnp_ms": r * 1e3,
                          "speedup": r / k})

    machine = f"{platform.machine()}, {jax.local_devices()[0].device_kind}, jax {jax.__version__}"
    print(f"attention over KV pages on CPU ({machine}), medians of {args.rounds} alternating rounds")
    print(f"{'rows':>4} {'tokens':>6} {'q/kvH':>5} {'kernel ms':>9} {'jnp ms':>8} {'speedup':>7} {'engine':>7}")
    for c in calls:
        print(f"{c['rows']:>4} {c['tokens']:>6} {c['queries_per_kv_head']:>5} {c['kernel_ms']:>9.3f} "
              f"{c['jnp_ms']:>8.3f} {c['speedup']:>6.2f}x {'kernel' if c['engine_uses_kernel'] else 'jnp':>7}")
    print("decode step of `small` (Engine.time_decode)")
    print(f"{'rows':>4} {'context':>7} {'kernel ms':>9} {'jnp ms':>8} {'speedup':>7}")
    for s in steps:
        print(f"{s['rows']:>4} {s['context']:>7} {s['kernel_ms']:>9.2f} {s['jnp_ms']:>8.2f} {s['speedup']:>6.2f}x")
    print(json.dumps({"machine": machine, "rounds": args.rounds, "calls": calls, "decode_steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
