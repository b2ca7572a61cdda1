"""Low-bit GEMM on a GPU: the Pallas kernels against bf16 `jnp.dot` and XLA's int8 dot.

Decode (M = 1, 8, 16, 64) and prefill (M = 1024) shapes of Llama-3-8B's linear layers,
(N, K) in (4096, 4096), (14336, 4096), (4096, 14336). Every method of a shape runs in the
same process on the same card:

- ``bf16``: ``jnp.dot`` of bf16 activations and weights (the dense baseline);
- ``int8_xla``: XLA's int8 x int8 -> int32 dot (``preferred_element_type=int32``);
- the kernels of ``pallas_kernels.lowbit_matmul`` on pre-quantized activations (the
  per-token int8 quantization of A8 formats is not in the time, as in the papers).

Timing: each jitted call runs the method once on each of many distinct buffer sets
(weights and activations, together well over the 50-60 MB L2 of an H100/H200, so the
weights come from HBM), several calls are queued back to back, and the time per GEMM is
the median over repeats after a warm-up. The HBM roofline is the packed weight bytes
(scales included) over the copy bandwidth measured in the same run.

    python -m experiments.gemm_gpu [--quick] [--sweep] [--out experiments/results/gemm_gpu.json]

GPU only: without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from experiments.gpu_timing import copy_bandwidth, time_per_call

DECODE_M = (1, 8, 16, 64)
PREFILL_M = (1024,)
NK = ((4096, 4096), (14336, 4096), (4096, 14336))
DEFAULT_FORMATS = ("w8a8", "w4a16", "w4a8", "int2", "int3", "int4", "int4a8")
SET_BYTES_TARGET = 1 << 30  # bytes of distinct inputs per timed call
MIN_SETS, MAX_SETS = 8, 32  # more calls per jit would mean more Triton compiles


def _sweep_candidates(M: int):
    from pallas_kernels.lowbit_matmul import BlockSizes

    # (block_m, block_n, block_k, num_warps, num_stages[, split_k]); split-K candidates
    # only take effect for the formats that split (W4A16, W4A8, W8A8).
    if M <= 16:
        shapes = [(16, 16, 256, 2, 3), (16, 32, 256, 4, 3), (16, 64, 256, 4, 3),
                  (16, 32, 512, 4, 4), (16, 64, 128, 4, 4),
                  (16, 32, 256, 4, 3, 4), (16, 64, 256, 4, 3, 4), (16, 128, 128, 4, 3, 8),
                  (16, 64, 128, 4, 4, 8)]
    elif M <= 64:
        shapes = [(M, 32, 256, 4, 3), (M, 64, 128, 4, 3), (M, 128, 128, 4, 3), (M, 64, 256, 4, 4),
                  (M, 64, 128, 4, 3, 4)]
    else:
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 4),
                  (128, 64, 64, 4, 4), (64, 64, 128, 4, 3)]
    return [None] + [BlockSizes(*s) for s in shapes]


def make_method(method: str, M: int, N: int, K: int, seed: int):
    """(fn, one set of arguments, weight bytes) for a method at one shape."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from pallas_kernels.lowbit_matmul import FORMATS, packed_nbytes, quantize_activations_per_token, quantize_weight

    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, K), jnp.bfloat16)
    w = jax.random.normal(kw, (K, N), jnp.bfloat16) * 0.02
    if method == "bf16":
        return (lambda x, w: jnp.dot(x, w)), (x, w), w.nbytes
    x_q, x_scale = quantize_activations_per_token(x)
    if method == "int8_xla":
        w_q = quantize_weight(w, "w8a8").qweight
        return (lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32)), (x_q, w_q), w_q.nbytes
    fmt = FORMATS[method]
    weight = quantize_weight(w, method)
    if fmt.activation_bits == 8:
        return fmt.kernel, (x_q, x_scale, weight), packed_nbytes(weight)
    return fmt.kernel, (x, weight), packed_nbytes(weight)


def copies(args, n: int):
    """n physically distinct copies of a set of arguments."""
    import jax
    import jax.numpy as jnp

    duplicate = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
    return [args] + [duplicate(args) for _ in range(n - 1)]


def check_against_reference(method: str, M: int, N: int, K: int) -> float:
    """Max |kernel - reference| / max |reference| on the GPU (the kernels' first real run)."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.lowbit_matmul import FORMATS

    fmt = FORMATS[method]
    _, args, _ = make_method(method, M, N, K, seed=123)
    extra = {"out_dtype": jnp.float32} if fmt.activation_bits == 8 else {}
    got = np.asarray(fmt.kernel(*args, **extra), np.float32)
    want = np.asarray(fmt.reference(*args, **extra), np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def run_shape(method, M, N, K, *, repeats, sweep):
    import functools

    import jax

    fn, args, weight_bytes = make_method(method, M, N, K, seed=M + N + K)
    set_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(args))
    n_sets = min(MAX_SETS, max(MIN_SETS, math.ceil(SET_BYTES_TARGET / set_bytes)))
    arg_sets = copies(args, n_sets)
    best = (float("inf"), None)
    for blocks in (_sweep_candidates(M) if sweep and method not in ("bf16", "int8_xla") else [None]):
        call = fn if blocks is None else functools.partial(fn, block_sizes=blocks)
        try:
            seconds = time_per_call(call, arg_sets, repeats)
        except Exception as error:  # a tile that does not fit this shape: skip it
            print(f"  {method} M={M} N={N} K={K} blocks={blocks}: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120]}", file=sys.stderr)
            continue
        best = min(best, (seconds, blocks), key=lambda b: b[0])
    del arg_sets
    return best[0], best[1], weight_bytes, n_sets * set_bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in (1, 16, 1024), two (N, K)")
    parser.add_argument("--sweep", action="store_true", help="try a few tile shapes per kernel")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="experiments/results/gemm_gpu.json")
    parser.add_argument("--m", default=None, help="comma-separated M values (default: all, or --quick's)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new shapes after this many seconds (what ran is reported)")
    args = parser.parse_args(argv)

    import time

    import jax

    if jax.default_backend() != "gpu":
        print(f"gemm_gpu needs a GPU; the default backend here is {jax.default_backend()}, skipping")
        print(json.dumps({"experiment": "gemm_gpu", "skipped": "no GPU"}))
        return 0

    device = jax.devices()[0].device_kind
    methods = ["bf16", "int8_xla", *[f for f in args.formats.split(",") if f]]
    ms = (1, 16, 1024) if args.quick else DECODE_M + PREFILL_M
    if args.m:
        ms = tuple(int(m) for m in args.m.split(","))
    nks = NK[:2] if args.quick else NK
    start = time.perf_counter()
    bandwidth = copy_bandwidth(args.repeats)
    checks, failures = {}, []
    for m in methods[2:]:
        try:
            checks[m] = check_against_reference(m, 16, 4096, 4096)
        except Exception as error:  # noqa: BLE001 -- a kernel that fails here is reported, the rest still run
            failures.append({"method": m, "stage": "check", "error": f"{type(error).__name__}: {str(error)[:300]}"})
            print(f"{m} check: {failures[-1]['error']}", file=sys.stderr)
    requested, methods = methods, ["bf16", "int8_xla", *checks]

    rows, stopped = [], False
    for N, K in nks:
        for M in ms:
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                stopped = True
                break
            shape_rows = []
            for method in methods:
                try:
                    seconds, blocks, weight_bytes, rotated = run_shape(method, M, N, K, repeats=args.repeats,
                                                                       sweep=args.sweep)
                except Exception as error:  # noqa: BLE001
                    failures.append({"method": method, "M": M, "N": N, "K": K,
                                     "error": f"{type(error).__name__}: {str(error)[:300]}"})
                    print(f"{method} M={M} N={N} K={K}: {failures[-1]['error']}", file=sys.stderr)
                    continue
                if not math.isfinite(seconds):
                    continue
                shape_rows.append({"method": method, "M": M, "N": N, "K": K, "us": seconds * 1e6,
                                   "tflops": 2 * M * N * K / seconds / 1e12, "weight_bytes": weight_bytes,
                                   "roofline_fraction": weight_bytes / bandwidth / seconds,
                                   "rotated_bytes": rotated,
                                   "blocks": None if blocks is None else dataclasses.asdict(blocks)})
                print(f"{method} M={M} N={N} K={K}: {seconds * 1e6:.1f} us", file=sys.stderr)
            if {"bf16", "int8_xla"} <= {r["method"] for r in shape_rows}:
                rows += shape_rows
        if stopped:
            break
    for row in rows:
        base = {r["method"]: r["us"] for r in rows if (r["M"], r["N"], r["K"]) == (row["M"], row["N"], row["K"])}
        row["speedup_vs_bf16"] = base["bf16"] / row["us"]
        row["speedup_vs_int8_xla"] = base["int8_xla"] / row["us"]

    def select(method, cond):
        chosen = [r for r in rows if r["method"] == method and cond(r["M"])]
        return chosen or [{"speedup_vs_bf16": 0.0, "roofline_fraction": 0.0}]  # not measured: not met

    acceptance = {
        f"{m}_decode_2.5x_bf16": all(r["speedup_vs_bf16"] >= 2.5 for r in select(m, lambda M: M <= 16))
        for m in ("w4a16", "w4a8") if m in requested}
    acceptance.update({
        f"{m}_decode_60pct_roofline": all(r["roofline_fraction"] >= 0.6 for r in select(m, lambda M: M <= 16))
        for m in ("w4a16", "w4a8") if m in requested})
    if "w4a8" in requested and 1024 in ms:
        acceptance["w4a8_prefill_faster_than_bf16"] = all(
            r["speedup_vs_bf16"] > 1 for r in select("w4a8", lambda M: M == 1024))

    print(f"low-bit GEMM on {device}, jax {jax.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("kernel vs reference (max rel. error, M=16, N=K=4096): "
          + ", ".join(f"{m} {e:.1e}" for m, e in checks.items()))
    print(f"{'N':>6}{'K':>7}{'M':>6} {'method':<10}{'us':>9}{'TFLOP/s':>9}{'roofline':>9}"
          f"{'vs bf16':>9}{'vs int8':>9}")
    for r in rows:
        print(f"{r['N']:>6}{r['K']:>7}{r['M']:>6} {r['method']:<10}{r['us']:>9.1f}{r['tflops']:>9.1f}"
              f"{r['roofline_fraction']:>9.0%}{r['speedup_vs_bf16']:>9.2f}{r['speedup_vs_int8_xla']:>9.2f}")
    print("acceptance: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in acceptance.items()))

    result = {"experiment": "gemm_gpu", "device": device, "jax": jax.__version__, "quick": args.quick,
              "sweep": args.sweep, "copy_bandwidth_GBps": bandwidth / 1e9, "checks": checks,
              "acceptance": acceptance, "results": rows, "failures": failures,
              "stopped_by_budget": stopped}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
