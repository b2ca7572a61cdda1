"""What do quantized KV pages and offload tiers cost and buy? (QServe KV4/KV8, SmoothAttention, InstInfer)

Figures, on a `small` model that jaxsys trains on the embedded corpus (cached under
`runs/kv_cache/`; `--quick` trains `tiny` instead):

- `kv_bytes_per_token`: bytes per token and KV head of keys + values in a real page pool
  (data and scales, `jaxsys.kvcache.paged`), at head_dim 128, for bf16, int8, int4 pages.
- `attention_error`: mean relative L2 error of causal attention with int8 / int4 /
  int4 + SmoothAttention K/V against float K/V, on the trained model's post-RoPE q/k/v
  over held-out text (SmoothAttention calibrated on training text, alpha searched per
  layer); also with int4 keys and float values (the error SmoothAttention acts on), and
  `attention_error_outlier_keys`: the same on the model rewritten to the same function
  with two key channels per head `--outlier-factor`x larger, as Llama-class models' keys
  are (a small model trained for minutes grows no such channels; see `key_outlier_ratio`).
- `greedy_agreement`: teacher-forced top-1 agreement of the model with quantized KV pages
  against full-precision KV over 128 held-out positions (the last 32 positions of 4
  held-out windows of 256 tokens; each query attends the pages of all earlier tokens),
  and `first_divergence`: the first generated position where free-running greedy output
  with quantized pages differs from float pages (the earliest of 4 held-out prompts of
  128 tokens, 128 new tokens; 128 = never).
- `boundary_bytes_per_step`: bytes crossing the device/host boundary per decode step at
  `--context` tokens (8K), pages beyond the device budget in host memory, attended by
  fetching them (FlexGen) or near the data (InstInfer), counted from the arrays moved.
- `max_context`: the longest context under one device KV budget, device-only vs with the
  host tier; each proven by generating at that context while the device-resident KV
  (`device_kv_bytes`) stays within the budget.

    python -m experiments.kv_cache [--quick] [--steps 200] [--context 8192]

On a CPU-only machine host and device share RAM: bytes are what a GPU's link would carry.
The last line of stdout is one JSON object with these figures and the targets met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

TARGETS = {"int8_error": 0.05, "int4_smooth_error": 0.15, "int4_bytes_vs_bf16": 0.30, "near_vs_fetch": 0.02,
           "context_growth": 8, "agreement_int8": 0.98, "agreement_int4_smooth": 0.90}
CLEARLY_BETTER = 0.9  # "clearly better": at least 10% lower error
log = logging.getLogger("kv_cache")


def trained_model(name: str, steps: int, *, seq_len: int = 256, batch_size: int = 8, held_out: int = 400):
    """(config, params, train tokens, held-out tokens): `name` trained for `steps` steps, cached under runs/."""
    import jax
    import meshes
    from jaxsys.config import get_preset
    from jaxsys.data import TokenDataset, load_documents, load_tokenizer
    from jaxsys.train import TrainConfig, train

    config = dataclasses.replace(get_preset(name), dtype="float32")
    tokenizer = load_tokenizer("byte")
    docs = load_documents("corpus", seed=0)
    data = TokenDataset.from_documents(docs[:-held_out], tokenizer, seq_len=seq_len, batch_size=batch_size)
    held = TokenDataset.from_documents(docs[-held_out:], tokenizer, seq_len=seq_len, batch_size=1)
    ckpt_dir = Path("runs") / "kv_cache" / f"{name}-{steps}"
    topology = meshes.load_topology("cpu8")
    mesh = meshes.single_device_mesh(topology.axis_names)
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, learning_rate=3e-3, warmup_steps=20,
                     strategy="fsdp", log_every=50, ckpt_every=50, keep_last=1)
    t0 = time.perf_counter()
    result = train(config, tc, mesh, data, ckpt_dir=ckpt_dir, resume=True, meta={"data": "corpus"})
    log.info("%s: %d steps in %s (%.0f s)", name, steps, ckpt_dir, time.perf_counter() - t0)
    return config, jax.device_get(result.state["params"]), data.tokens, held.tokens


def bytes_per_token_at_128() -> dict[str, float]:
    """Keys + values bytes per token and KV head of a real page pool, head_dim 128, bf16 compute dtype."""
    from jaxsys.config import get_preset
    from jaxsys.kvcache.paged import bytes_per_token, paged_cache

    config = dataclasses.replace(get_preset("small"), head_dim=128, n_layers=1, n_kv_heads=1, dtype="bfloat16")
    return {name: bytes_per_token(paged_cache(config, 1, 64, fmt=fmt))
            for name, fmt in (("bf16", "float"), ("int8", "int8"), ("int4", "int4"))}


def windows_of(tokens, count: int, length: int, offset: int = 0):
    import numpy as np
    starts = offset + np.arange(count) * length
    return tokens[starts[:, None] + np.arange(length)]


def attention_errors(config, params, smoothed, windows) -> dict[str, float]:
    """Mean over layers of the relative L2 attention error of each KV format on held-out q/k/v.

    `*_keys_only` keep the values in float: the part of the error SmoothAttention acts on.
    `key_outlier_ratio`: max over channels / median over channels of max|K|, mean over layers
    and KV heads (Llama-class models have channels far above the rest).
    """
    import numpy as np
    from jaxsys.quant import smooth_attention as sa

    plain = sa.capture_attention_inputs(config, params, windows)
    smooth = sa.capture_attention_inputs(config, smoothed, windows)
    per_layer = {
        "int8": [sa.kv_attention_error(c["q"], c["k"], c["v"], "int8") for c in plain],
        "int4": [sa.kv_attention_error(c["q"], c["k"], c["v"], "int4") for c in plain],
        "int4_smooth": [sa.kv_attention_error(c["q"], c["k"], c["v"], "int4") for c in smooth],
        "int4_keys_only": [sa.kv_attention_error(c["q"], c["k"], c["v"], "int4", value_fmt="float") for c in plain],
        "int4_smooth_keys_only": [sa.kv_attention_error(c["q"], c["k"], c["v"], "int4", value_fmt="float")
                                  for c in smooth]}
    for name, errors in per_layer.items():
        log.info("attention error %s per layer: %s", name, " ".join(f"{e:.4f}" for e in errors))
    out = {name: float(np.mean(errors)) for name, errors in per_layer.items()}
    key_max = [sa.tied_key_max(c["k"]) for c in plain]
    out["key_outlier_ratio"] = float(np.mean([m.max(-1) / np.median(m, -1) for m in key_max]))
    return out


def with_outlier_keys(config, params, factor: float):
    """The same function with key channels 0 and head_dim/2 of every layer `factor`x larger (q's divided).

    Trained Llama-class models have such channels; a small model trained for minutes does not.
    """
    import jax.numpy as jnp

    hd = config.resolved_head_dim
    channels = jnp.ones(hd).at[jnp.asarray([0, hd // 2])].set(factor)
    layers = {}
    for i in range(config.n_layers):
        attn = params["layers"][i]["attn"]
        layers[i] = {**params["layers"][i], "attn": {**attn, "k": attn["k"] * channels, "q": attn["q"] / channels}}
    return {**params, "layers": layers}


def teacher_forced(config, params_by_variant: dict, windows, scored: int) -> dict[str, float]:
    """Top-1 agreement over the last `scored` positions of each window: quantized pages vs float KV."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxsys.kvcache.paged import paged_cache
    from jaxsys.model import ModelDef

    model = ModelDef(config)
    forward = jax.jit(lambda p, t, c: model.apply(p, t, None, c)[0][:, -scored:].argmax(-1))
    tokens = jnp.asarray(windows)
    reference = np.asarray(jax.jit(lambda p, t: model.apply(p, t)[0][:, -scored:].argmax(-1))(
        params_by_variant["float"][0], tokens))
    out = {}
    for name, (params, fmt) in params_by_variant.items():
        if name == "float":
            continue
        top1 = np.asarray(forward(params, tokens, paged_cache(config, len(windows), windows.shape[1], fmt=fmt)))
        out[name] = float(np.mean(top1 == reference))
    return out


def first_divergences(config, params_by_variant: dict, prompts, new_tokens: int) -> dict[str, list[int]]:
    """Per prompt, the first generated position where greedy tokens with quantized pages differ from float pages."""
    import numpy as np
    from jaxsys.decode import Decoder
    from jaxsys.kvcache.paged import paged_cache
    from jaxsys.model import ModelDef

    batch, length = prompts.shape
    decoder = Decoder(ModelDef(config), None, max_len=length + new_tokens, batch=batch, prefill_chunk=length)
    tokens = {}
    for name, (params, fmt) in params_by_variant.items():
        decoder.params = params  # same shapes: the compiled program per page format is reused
        out = decoder.generate(prompts.tolist(), max_new_tokens=new_tokens,
                               cache=paged_cache(config, batch, length + new_tokens, fmt=fmt))
        tokens[name] = np.asarray(out.tokens)
    result = {}
    for name, toks in tokens.items():
        if name != "float":
            differ = toks != tokens["float"]
            result[name] = [int(np.argmax(row)) if row.any() else new_tokens for row in differ]
    return result


def offload_study(config, params, prompt, *, device_context: int, decode_steps: int, page_size: int) -> dict:
    """Bytes per decode step (near-data vs fetch) at len(prompt) tokens, and the max context under one budget."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxsys.decode import decode_loop, prefill
    from jaxsys.kvcache.offload import build_kv_cache, device_kv_bytes, release, transfer_bytes
    from jaxsys.kvcache.paged import check_overflow, kv_nbytes
    from jaxsys.model import ModelDef
    from jaxsys.sampling import SamplingParams

    model = ModelDef(config)
    sp = SamplingParams.make(1)
    budget = kv_nbytes(build_kv_cache(config, 1, device_context, page_size=page_size))
    chunk = 512

    def run(cache, tokens, length):
        """Prefill `tokens` (padded to the chunk): (cache, first generated token, lengths)."""
        padded = np.zeros((1, -(-len(tokens) // chunk) * chunk), np.int32)
        padded[0, :len(tokens)] = tokens
        lengths = jnp.asarray([length], jnp.int32)
        logits, cache = jax.jit(lambda p, c, t: prefill(model, p, c, t, lengths, chunk=chunk), donate_argnums=1)(
            params, cache, jnp.asarray(padded))
        first = jnp.argmax(logits, -1).astype(jnp.int32)
        return cache, first, lengths

    def loop(cache, first, lengths, new):
        out = jax.jit(lambda p, c, f: decode_loop(model, p, c, f, lengths, sp, jnp.asarray([new]),
                                                  max_new_tokens=new, stop_ids=(), filters=False),
                      donate_argnums=1)(params, cache, first)
        return out.cache, np.asarray(out.tokens)[0]

    # Device only: the longest context whose pages fit the budget, generated at that length.
    cache = build_kv_cache(config, 1, device_context, page_size=page_size, device_budget_bytes=budget)
    assert kv_nbytes(cache) <= budget
    cache, first, lengths = run(cache, prompt[:device_context - decode_steps], device_context - decode_steps)
    cache, _ = loop(cache, first, lengths, decode_steps + 1)  # stores tokens up to position device_context - 1
    check_overflow(cache)
    try:
        build_kv_cache(config, 1, device_context + page_size, page_size=page_size, device_budget_bytes=budget)
        raise AssertionError("a longer device-only cache fit the budget")
    except ValueError:
        pass

    # With the host tier: the same budget, the whole prompt; decode near the data, then by fetching.
    context = len(prompt) + 2 * decode_steps  # tokens stored when the last step runs
    cache = build_kv_cache(config, 1, context, page_size=page_size, offload="host",
                           device_budget_bytes=budget, mode="near_data")
    device_bytes = device_kv_bytes(cache)
    assert device_bytes <= budget, (device_bytes, budget)
    cache, first, lengths = run(cache, prompt, len(prompt))
    per_step = {}
    for mode in ("near_data", "fetch"):
        cache = tuple(dataclasses.replace(layer, mode=mode) for layer in cache)
        before = transfer_bytes(cache)
        cache, tokens = loop(cache, first, lengths, decode_steps + 1)  # decode_steps forwards after `first`
        after = transfer_bytes(cache)
        per_step[mode] = {k: (after[k] - before[k]) / decode_steps for k in after}
        first, lengths = jnp.asarray(tokens[-1:]), lengths + decode_steps
    assert device_kv_bytes(cache) <= budget
    release(cache)
    crossing = {mode: b["device_to_host"] + b["host_to_device"] for mode, b in per_step.items()}
    return {"budget_bytes": budget, "device_kv_bytes_with_host": device_bytes, "context": context,
            "per_step": per_step, "boundary": crossing,
            "max_context": {"device_only": device_context, "with_host": context}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="`tiny` trained 150 steps, fewer tokens (minutes)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the model (cached in runs/)")
    parser.add_argument("--context", type=int, default=8192, help="context of the offload study")
    parser.add_argument("--device-context", type=int, default=512,
                        help="tokens of float KV the device budget holds (device-only max context)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows (agreement, attention error)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--scored", type=int, default=32, help="scored positions per window (x windows = 128)")
    parser.add_argument("--new-tokens", type=int, default=128, help="free-running tokens for first_divergence")
    parser.add_argument("--outlier-factor", type=float, default=16.0,
                        help="scale of the injected key outlier channels of the second attention-error study")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the model and stop")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.new_tokens = "tiny", 150, 64
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import numpy as np
    from jaxsys.quant import smooth_attention as sa

    t_start = time.perf_counter()
    config, params, train_tokens, held_tokens = trained_model(args.model, args.steps)
    if args.train_only:
        return 0
    per_token = bytes_per_token_at_128()

    calib = windows_of(train_tokens, 4, args.window, offset=12345)
    smoothed, _, alphas = sa.smooth_attention(config, params, calib)
    log.info("SmoothAttention alpha per layer: %s", alphas)
    windows = windows_of(held_tokens, args.windows, args.window)
    errors = attention_errors(config, params, smoothed, windows)
    outlier = with_outlier_keys(config, params, args.outlier_factor)
    errors_outlier = attention_errors(config, outlier, sa.smooth_attention(config, outlier, calib)[0], windows)

    variants = {"float": (params, "float"), "int8": (params, "int8"), "int4": (params, "int4"),
                "int4_smooth": (smoothed, "int4")}
    agreement = teacher_forced(config, variants, windows, args.scored)
    prompts = windows_of(held_tokens, args.windows, 128, offset=args.windows * args.window)
    divergence = first_divergences(config, variants, prompts, args.new_tokens)

    prompt = held_tokens[len(held_tokens) // 3:][:args.context - 2 * args.decode_steps]
    offload = offload_study(config, params, np.asarray(prompt, np.int32), device_context=args.device_context,
                            decode_steps=args.decode_steps, page_size=args.page_size)
    ratio = offload["boundary"]["near_data"] / offload["boundary"]["fetch"]
    growth = offload["max_context"]["with_host"] / offload["max_context"]["device_only"]

    met = {"int8_error": errors["int8"] <= TARGETS["int8_error"],
           "int4_smooth_error": errors["int4_smooth"] <= TARGETS["int4_smooth_error"],
           "int4_smooth_clearly_better": errors["int4_smooth"] <= CLEARLY_BETTER * errors["int4"],
           "int4_bytes_vs_bf16": per_token["int4"] / per_token["bf16"] <= TARGETS["int4_bytes_vs_bf16"],
           "near_vs_fetch": ratio <= TARGETS["near_vs_fetch"], "context_growth": growth >= TARGETS["context_growth"],
           "agreement_int8": agreement["int8"] >= TARGETS["agreement_int8"],
           "agreement_int4_smooth": agreement["int4_smooth"] >= TARGETS["agreement_int4_smooth"]}

    print(f"KV cache study of {args.model} ({config.num_params / 1e6:.1f}M params, {args.steps} training steps); "
          f"{time.perf_counter() - t_start:.0f} s")
    print(f"{'format':<12}{'B/token/head':>13}{'vs bf16':>9}{'attn error':>12}{'agreement':>11}{'1st diverge':>13}")
    for name, bytes_name in (("bf16", "bf16"), ("int8", "int8"), ("int4", "int4"), ("int4_smooth", "int4")):
        err = f"{errors[name]:.4f}" if name in errors else "-"
        agree = f"{agreement[name]:.3f}" if name in agreement else "-"
        div = str(min(divergence[name])) if name in divergence else "-"
        print(f"{name:<12}{per_token[bytes_name]:>13.0f}{per_token[bytes_name] / per_token['bf16']:>9.3f}"
              f"{err:>12}{agree:>11}{div:>13}")
    print(f"int4 attention error, keys only (values float): {errors['int4_keys_only']:.4f}, with SmoothAttention "
          f"{errors['int4_smooth_keys_only']:.4f}; key outlier ratio (max/median channel) "
          f"{errors['key_outlier_ratio']:.1f}")
    print(f"same model with key channels 0 and {config.resolved_head_dim // 2} x{args.outlier_factor:g} (same "
          f"function, outlier ratio {errors_outlier['key_outlier_ratio']:.1f}): int4 {errors_outlier['int4']:.4f}, "
          f"int4 + SmoothAttention {errors_outlier['int4_smooth']:.4f}")
    print(f"offload at {offload['context']} tokens, device budget {offload['budget_bytes']} bytes "
          f"(device-resident KV {offload['device_kv_bytes_with_host']} bytes):")
    for mode in ("near_data", "fetch"):
        b = offload["per_step"][mode]
        print(f"  {mode:<10} per decode step: device->host {b['device_to_host']:>10.0f} B, host->device "
              f"{b['host_to_device']:>10.0f} B")
    print(f"  near-data / fetch bytes: {ratio:.4f} (target <= {TARGETS['near_vs_fetch']}); max context "
          f"device-only {offload['max_context']['device_only']}, with host {offload['max_context']['with_host']} "
          f"({growth:.1f}x, target >= {TARGETS['context_growth']}x)")
    print(f"targets met: {met}")
    print(json.dumps({
        "experiment": "kv_cache", "model": args.model, "quick": args.quick, "steps": args.steps,
        "kv_bytes_per_token": per_token,
        "kv_bytes_vs_bf16": {k: v / per_token["bf16"] for k, v in per_token.items()},
        "attention_error": errors, "attention_error_outlier_keys": errors_outlier,
        "outlier_factor": args.outlier_factor, "smooth_attention_alpha": alphas,
        "boundary_bytes_per_step": offload["boundary"], "boundary_bytes_detail": offload["per_step"],
        "near_data_vs_fetch": ratio, "offload_context": offload["context"],
        "device_budget_bytes": offload["budget_bytes"],
        "device_kv_bytes_with_host": offload["device_kv_bytes_with_host"],
        "max_context": offload["max_context"], "context_growth": growth,
        "greedy_agreement": agreement, "agreement_positions": int(args.windows * args.scored),
        "first_divergence": {k: min(v) for k, v in divergence.items()},
        "first_divergence_per_prompt": divergence, "new_tokens": args.new_tokens,
        "targets": TARGETS, "targets_met": met, "seconds": time.perf_counter() - t_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
