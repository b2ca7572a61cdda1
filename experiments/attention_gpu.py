"""Decode attention over paged KV on a GPU: bf16, int8 and int4 pages against JAX's paged attention.

One query token per sequence over Llama-3-8B-shaped pages (32 query heads, 8 KV heads,
head_dim 128, pages of 16 tokens), one layer, at 4K, 32K and 128K tokens of context and
batch 1 and 16. Methods, each on the same pages in the same process:

- ``ours_{bf16,int8,int4}``: `pallas_kernels.quant_attention.paged_decode_attention`
  (the split-K Pallas kernel, dequantizing pages in registers);
- ``jax_{bf16,int8}``: `jax.experimental.pallas.ops.gpu.paged_attention` (bf16 pages,
  and int8 pages with its per-token scales), where it runs;
- ``jnp_{bf16,int8,int4}``: the pure-jnp reference (pages gathered and dequantized to
  float32 first), where its float32 copy of the context fits in memory.

The HBM roofline fraction is the bytes a method must read (its pages for the valid
tokens, scales included, plus queries and outputs) per second over the copy bandwidth
measured in the same run. Small problems are timed over many distinct page pools so the
pages come from HBM, not L2. Each kernel is first checked against the reference on the
same pages (max |kernel - reference| / max |reference|).

    python -m experiments.attention_gpu [--quick] [--out experiments/results/attention_gpu.json]

GPU only: without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from experiments.gpu_timing import copy_bandwidth, time_per_call

CONTEXTS = (4096, 32768, 131072)
BATCHES = (1, 16)
HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
FORMATS = {"bf16": "float", "int8": "int8", "int4": "int4"}
SET_BYTES_TARGET = 512 << 20  # bytes of distinct pages per timed call
MAX_SETS = 16
REFERENCE_BYTES_LIMIT = 24 << 30  # the jnp reference materializes the context in float32


def make_problem(context: int, batch: int, fmt: str, seed: int):
    """(q, k_pages, v_pages, table, lengths, bytes read): every sequence `context` tokens, pages shuffled."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.quant_attention import quantize_kv

    fmt = FORMATS[fmt]
    slots = context // PAGE_SIZE
    num_pages = batch * slots
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
    make = jax.jit(lambda key: quantize_kv(jax.random.normal(key, shape, jnp.bfloat16), fmt))
    k, v = make(kk), make(kv)
    q = jax.random.normal(kq, (batch, HEADS, HEAD_DIM), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(seed).permutation(num_pages).reshape(batch, slots), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    read = sum(x.nbytes for x in (*k, *v)) + 2 * q.nbytes + table.nbytes
    return q, k, v, table, lengths, read


# (pages_per_block, num_warps, programs aimed at) tried by --sweep; None: the defaults
SWEEP = (None, (4, 4, 128), (8, 4, 2048), (16, 8, 2048), (8, 8, 512), (16, 4, 1024))


def tuning(candidate, batch: int, context: int):
    """kwargs of `paged_decode_attention` for a sweep candidate (None: its defaults)."""
    if candidate is None:
        return {}
    from pallas_kernels.quant_attention.kernel import BlockSizes, default_num_splits

    pages_per_block, num_warps, programs = candidate
    num_blocks = -(-context // PAGE_SIZE // pages_per_block)
    return {"block_sizes": BlockSizes(pages_per_block=pages_per_block, num_warps=num_warps),
            "num_splits": default_num_splits(batch, KV_HEADS, num_blocks, target=programs)}


def methods_for(fmt_name: str, tune: dict | None = None):
    """{method: fn(q, k, v, table, lengths) -> out} for one page format."""
    from pallas_kernels.quant_attention import paged_decode_attention
    from pallas_kernels.quant_attention.formats import SIDE_ARRAYS

    fmt = FORMATS[fmt_name]

    def ours(impl, extra=None):
        def fn(q, k, v, table, lengths):
            side = {f"{w}_{n}": arr for w, pages in (("k", k), ("v", v)) for n, arr in zip(SIDE_ARRAYS[fmt], pages[1:])}
            return paged_decode_attention(q, k[0], v[0], table, lengths, fmt=fmt, impl=impl, **side,
                                          **(extra or {}))[0]
        return fn

    out = {f"ours_{fmt_name}": ours("pallas", tune), f"jnp_{fmt_name}": ours("reference")}
    if fmt_name in ("bf16", "int8"):
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

        def jax_fn(q, k, v, table, lengths):
            scales = {} if fmt == "float" else {"k_scales_pages": k[1], "v_scales_pages": v[1]}
            q = (q * (1 / math.sqrt(q.shape[-1]))).astype(q.dtype)  # it leaves the softmax scale to the caller
            return jax_paged.paged_attention(q, k[0], v[0], table, lengths, **scales)
        out[f"jax_{fmt_name}"] = jax_fn
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4K and 32K only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="experiments/results/attention_gpu.json")
    parser.add_argument("--sweep", action="store_true",
                        help="first pick our kernel's block sizes and splits per (format, batch) at 32K")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new problems after this many seconds (what ran is reported)")
    args = parser.parse_args(argv)

    import time

    import jax
    import numpy as np

    if jax.default_backend() != "gpu":
        print(f"attention_gpu needs a GPU; the default backend here is {jax.default_backend()}, skipping")
        print(json.dumps({"experiment": "attention_gpu", "skipped": "no GPU"}))
        return 0

    device = jax.devices()[0].device_kind
    start = time.perf_counter()
    bandwidth = copy_bandwidth(args.repeats)
    contexts = CONTEXTS[:2] if args.quick else CONTEXTS
    chosen, sweep_rows = {}, []  # (format, batch) -> the fastest sweep candidate at 32K
    for batch in BATCHES if args.sweep else ():
        for fmt_name in FORMATS:
            problem = make_problem(32768, batch, fmt_name, seed=7)
            n_sets = max(1, min(MAX_SETS, SET_BYTES_TARGET // problem[5]))
            sets = [problem[:5]] + [make_problem(32768, batch, fmt_name, seed=7 + i)[:5] for i in range(1, n_sets)]
            best = (float("inf"), None)
            for candidate in SWEEP:
                fn = methods_for(fmt_name, tuning(candidate, batch, 32768))[f"ours_{fmt_name}"]
                try:
                    seconds = time_per_call(fn, sets, args.repeats)
                except Exception as e:  # noqa: BLE001 -- a candidate that does not compile is skipped
                    print(f"sweep {fmt_name} x {batch} {candidate}: {type(e).__name__}: {str(e)[:150]}",
                          file=sys.stderr)
                    continue
                sweep_rows.append({"format": fmt_name, "batch": batch, "candidate": candidate,
                                   "us": seconds * 1e6})
                print(f"sweep {fmt_name:<5} batch {batch:>2} {str(candidate):<16} {seconds * 1e6:9.1f} us",
                      file=sys.stderr)
                best = min(best, (seconds, candidate), key=lambda b: b[0])
            chosen[fmt_name, batch] = best[1]
            del sets, problem
    rows, checks, stopped = [], {}, False
    for context in contexts:
        for batch in BATCHES:
            for fmt_name in FORMATS:
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    stopped = True
                    break
                q, k, v, table, lengths, read = make_problem(context, batch, fmt_name, seed=context + batch)
                n_sets = max(1, min(MAX_SETS, SET_BYTES_TARGET // read))
                sets = [(q, k, v, table, lengths)] + [
                    make_problem(context, batch, fmt_name, seed=context + batch + i)[:5] for i in range(1, n_sets)]
                reference = None
                fits = batch * context * KV_HEADS * HEAD_DIM * 4 * 3 <= REFERENCE_BYTES_LIMIT
                tune = tuning(chosen.get((fmt_name, batch)), batch, context)
                for method, fn in methods_for(fmt_name, tune).items():
                    if method.startswith("jnp") and not fits:
                        continue
                    try:
                        if reference is None and fits:
                            reference = np.asarray(jax.jit(methods_for(fmt_name)[f"jnp_{fmt_name}"])(
                                q, k, v, table, lengths), np.float32)
                        got = np.asarray(jax.jit(fn)(q, k, v, table, lengths), np.float32)
                        error = (float(np.abs(got - reference).max() / np.abs(reference).max())
                                 if reference is not None else None)
                        seconds = time_per_call(fn, sets, args.repeats)
                    except Exception as e:  # noqa: BLE001 -- a method that does not run here is reported
                        print(f"{method} at {context} x {batch}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                        rows.append({"method": method, "context": context, "batch": batch, "error": str(e)[:300]})
                        continue
                    checks[f"{method}@{context}x{batch}"] = error
                    rows.append({"method": method, "format": fmt_name, "context": context, "batch": batch,
                                 "us": seconds * 1e6, "bytes": read, "gb_per_s": read / seconds / 1e9,
                                 "roofline": read / seconds / bandwidth, "max_rel_error": error})
                    print(f"{method:<12}{context:>8}{batch:>4}{seconds * 1e6:>12.1f} us"
                          f"{read / seconds / 1e9:>9.0f} GB/s{read / seconds / bandwidth:>7.0%}"
                          f"  err {error if error is None else f'{error:.1e}'}", file=sys.stderr)

    print(f"decode attention on {device} (copy bandwidth {bandwidth / 1e9:.0f} GB/s), "
          f"{HEADS} heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, pages of {PAGE_SIZE}")
    print(f"{'method':<12}{'context':>8}{'batch':>6}{'us':>11}{'GB/s':>8}{'roofline':>10}")
    for r in rows:
        if "us" in r:
            print(f"{r['method']:<12}{r['context']:>8}{r['batch']:>6}{r['us']:>11.1f}{r['gb_per_s']:>8.0f}"
                  f"{r['roofline']:>10.1%}")
        else:
            print(f"{r['method']:<12}{r['context']:>8}{r['batch']:>6}  did not run: {r['error'][:60]}")
    result = {"experiment": "attention_gpu", "device": device, "jax": jax.__version__,
              "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows, "checks": checks, "stopped_by_budget": stopped,
              "sweep": sweep_rows, "chosen": {f"{f}@{b}": c for (f, b), c in chosen.items()}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
