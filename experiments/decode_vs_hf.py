"""Greedy decoding speed: jaxsys's one-program decode loop vs Hugging Face `generate`, same weights.

Builds one random-weight Llama in Hugging Face format (~46M parameters: 12 layers, hidden
512, GQA 8 query / 4 KV heads, intermediate 1536, vocab 8192), saves it with
`save_pretrained`, loads that folder into jaxsys, and decodes the same prompt greedily
at batch 1 with both, in float32 on the same number of CPU threads. Each side runs once to
warm up (jaxsys compiles; torch allocates), then `--repeats` timed runs of each, interleaved;
the figure is the median.
Time is prompt submitted -> all tokens on the host, prefill included, for both.

    python -m experiments.decode_vs_hf [--quick] [--new-tokens 128] [--prompt-len 32]

Last line of stdout: JSON with `jaxsys_tok_per_s`, `hf_tok_per_s`, `ratio` and
`tokens_agree` (plus the first differing index where they do not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time


def streaming_bandwidth(mbytes: int = 64, repeats: int = 20) -> float:
    """Bytes/s of a float32 matrix-vector product over a `mbytes` matrix, the way decoding reads weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = 2048
    w = jax.random.normal(jax.random.key(0), (mbytes * 2**20 // (4 * n), n), jnp.float32)
    x = jnp.ones((1, w.shape[0]), jnp.float32)
    gemv = jax.jit(lambda x, w: x @ w)
    gemv(x, w).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gemv(x, w).block_until_ready()
        times.append(time.perf_counter() - t0)
    return w.nbytes / float(np.median(times))


def build_hf_checkpoint(folder: str, *, layers: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                         pad_token_id=0, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits; a larger std makes greedy decoding
    # follow real preferences (ties between top logits would make agreement meaningless).
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.06)
    model.save_pretrained(folder, safe_serialization=True)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 32 new tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side, interleaved; the median counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for each side (XLA intra-op and torch); 1 keeps the comparison steady "
                             "on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers, new_tokens = (4, 32) if args.quick else (12, args.new_tokens)

    if args.threads == 1:  # before JAX starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import numpy as np
    import torch

    import jax

    from jaxsys.decode import Decoder
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    threads = args.threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        build_hf_checkpoint(folder, layers=layers, seed=args.seed)
        loaded = load_model(folder)
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    params_count = sum(p.numel() for p in hf.parameters())
    prompt = np.random.default_rng(args.seed).integers(3, 8192, args.prompt_len).tolist()

    model = ModelDef(loaded.config)
    decoder = Decoder(model, loaded.params, max_len=args.prompt_len + new_tokens, batch=1)

    def run_jaxsys():
        out = decoder.generate([prompt], max_new_tokens=new_tokens)
        return np.asarray(out.tokens[0]).tolist()

    ids = torch.tensor([prompt])

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=0)
        return out[0, len(prompt):].tolist()

    run_jaxsys(), run_hf()  # warm-up: compile / allocate
    runs = {"jaxsys": [], "hf": []}
    for _ in range(args.repeats):  # interleaved, so a busy moment of the machine hits both sides
        (t, jaxsys_tokens), (u, hf_tokens) = timed(run_jaxsys), timed(run_hf)
        runs["jaxsys"].append(t)
        runs["hf"].append(u)
    jaxsys_s, hf_s = float(np.median(runs["jaxsys"])), float(np.median(runs["hf"]))
    # The ceiling batch-1 decoding has here: every step reads every weight once (of the
    # embedding table only one row).
    stream = streaming_bandwidth()
    weight_bytes = sum(x.nbytes for k, x in loaded.params.items() if k != "embed" for x in jax.tree.leaves(x))
    bound = stream / weight_bytes
    agree = jaxsys_tokens == hf_tokens
    first_diff = None if agree else next(i for i, (a, b) in enumerate(zip(jaxsys_tokens, hf_tokens)) if a != b)
    result = {
        "experiment": "decode_vs_hf", "quick": args.quick, "params": params_count, "layers": layers,
        "prompt_tokens": args.prompt_len, "new_tokens": new_tokens, "batch": 1, "dtype": "float32",
        "jaxsys_s": jaxsys_s, "hf_s": hf_s, "runs_s": runs,
        "jaxsys_tok_per_s": new_tokens / jaxsys_s, "hf_tok_per_s": new_tokens / hf_s,
        "ratio": hf_s / jaxsys_s, "tokens_agree": agree, "first_difference": first_diff,
        "weight_bytes": weight_bytes, "streaming_gb_s": stream / 1e9, "bandwidth_bound_tok_per_s": bound,
        "bound_ratio_vs_hf": bound * hf_s / new_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {threads} thread(s) per side, "
                   f"{jax.devices()[0].platform}",
        "versions": {"jax": jax.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    print(f"greedy decoding, {params_count / 1e6:.1f}M-parameter Llama, batch 1, {args.prompt_len}-token prompt, "
          f"{new_tokens} new tokens, float32 ({result['machine']})")
    print(f"{'':10} {'seconds':>9} {'tokens/s':>9}")
    print(f"{'jaxsys':10} {jaxsys_s:9.3f} {result['jaxsys_tok_per_s']:9.1f}")
    print(f"{'hf':10} {hf_s:9.3f} {result['hf_tok_per_s']:9.1f}")
    print(f"jaxsys / hf: {result['ratio']:.2f}x; tokens agree: {agree}"
          + ("" if agree else f" (first difference at {first_diff})"))
    print(f"weights {weight_bytes / 1e6:.0f} MB (without the embedding table) read once per token at {stream / 1e9:.1f} GB/s (a float32 "
          f"matrix-vector product, timed here): at most {bound:.1f} tokens/s, {result['bound_ratio_vs_hf']:.2f}x hf")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
