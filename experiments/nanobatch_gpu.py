"""NanoFlow's nano-batching on a GPU: does splitting the decode batch buy throughput, and how close to optimal?

GPU only (exits cleanly, with a JSON line saying so, where no GPU is present). On a
~1B-parameter Llama-shaped model (random bf16 weights; speed does not depend on them),
one decode step of the serving engine (`jaxsys.nanobatch.serving_step`: `--rows` decode
rows at `--context` tokens, paged KV) is timed for each nano-batch split that the
automatic search (`Engine.search_splits`: a fitted cost model, then the best predicted
splits timed) visits, then the best multi-way split again with each nano-batch on its own
GPU stream (`compute_on("gpu_stream:N")`, where this JAX version offers it).

Figures: step time per split; `nanobatch_speedup` = one batch / best split (and with
streams); tokens/s = rows / step time; `fraction_of_optimal` = tokens/s over NanoFlow's
optimal (compute-bound) throughput = measured peak bf16 matmul FLOP/s / forward FLOPs per
decoded token (2 x matmul parameters + 4 x layers x context x heads x head_dim).

    python -m experiments.nanobatch_gpu [--rows 64] [--context 512] [--budget-s 200]

The last line of stdout is one JSON object (with the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="decode rows of the step")
    parser.add_argument("--context", type=int, default=512, help="tokens before each row's new one")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop measuring new splits after this")
    parser.add_argument("--quick", action="store_true", help="(same run; the study is already short)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU too (to check the script, small "
                                                                 "shapes advised)")
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    import jax
    if jax.default_backend() != "gpu" and not args.allow_cpu:
        print(f"nanobatch_gpu: no GPU here (JAX backend: {jax.default_backend()}); this study runs only on a GPU")
        print(json.dumps({"skipped": "no GPU", "backend": jax.default_backend()}))
        return 0

    import dataclasses

    from jaxsys.config import ModelConfig
    from jaxsys.engine import Engine, EngineConfig
    from jaxsys.model import ModelDef
    from jaxsys.nanobatch import even_split, optimal_tokens_per_s, peak_matmul_flops, search_split

    config = ModelConfig(vocab_size=32_000, dim=args.dim, n_layers=args.layers, n_heads=16, n_kv_heads=4,
                         ffn_dim=args.dim * 11 // 4, max_seq_len=args.context + 64, dtype="bfloat16",
                         param_dtype="bfloat16")
    model = ModelDef(config)
    params = model.init(0)
    engine_config = EngineConfig(max_batch=args.rows, max_len=args.context + 64, page_size=16)
    engine = Engine(model, params, engine_config)
    device = jax.devices()[0].device_kind
    print(f"{device}: {config.num_params / 1e9:.2f}B params (bf16), {args.rows} decode rows at context "
          f"{args.context}", flush=True)

    measured = {}

    def measure(split):
        if time.perf_counter() - t_start > args.budget_s and measured:
            return float("inf")  # out of time: never chosen
        t = engine.time_decode(split, context=args.context, repeats=10)
        measured[split] = t
        print(f"  split {split}: {t * 1e3:.3f} ms", flush=True)
        return t

    search = search_split(measure, args.rows, max_parts=4, multiple=8)
    one, best = search.measured[(args.rows,)], search.measured[search.best]

    streams = {}
    split = search.best if len(search.best) > 1 else even_split(args.rows, 2, 8)
    if time.perf_counter() - t_start < args.budget_s:
        try:
            streamed = Engine(model, params, dataclasses.replace(engine_config, streams=True))
            t = streamed.time_decode(split, context=args.context, repeats=10)
            streams = {"split": list(split), "step_ms": t * 1e3, "speedup": one / t}
            print(f"  split {split} on separate streams: {t * 1e3:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a JAX without stream annotations: report, do not fail
            streams = {"split": list(split), "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  streams: not available ({streams['error']})", flush=True)

    peak = peak_matmul_flops(8192 if jax.default_backend() == "gpu" else 1024, jax.numpy.bfloat16)
    optimal = optimal_tokens_per_s(config, args.context, peak)
    summary = {"device": device, "jax": jax.__version__, "params": config.num_params, "rows": args.rows,
               "context": args.context, "step_ms": {",".join(map(str, k)): v * 1e3 for k, v in measured.items()},
               "predicted_ms": {",".join(map(str, k)): v * 1e3 for k, v in search.predicted.items()},
               "cost_model": dataclasses.asdict(search.cost_model), "best_split": list(search.best),
               "nanobatch_speedup": one / best, "tokens_per_s_one_batch": args.rows / one,
               "tokens_per_s_best": args.rows / best, "peak_flops": peak, "optimal_tokens_per_s": optimal,
               "fraction_of_optimal": args.rows / best / optimal, "streams": streams,
               "wall_s": time.perf_counter() - t_start}
    print(f"best split {search.best}: {one / best:.3f}x one batch; {args.rows / best:,.0f} tok/s = "
          f"{summary['fraction_of_optimal']:.1%} of the optimal {optimal:,.0f} tok/s "
          f"(peak {peak / 1e12:.0f} TFLOP/s measured)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
