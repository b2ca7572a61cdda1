"""How much perplexity do the low-bit formats cost a model jaxsys trained?

Trains `small` on the embedded corpus with `jaxsys.train.train` until its held-out
perplexity is at most half that of a unigram model of the same data (add-one smoothed
byte frequencies of the training split, scored on the same held-out targets), then
scores the held-out split again with every linear layer of the blocks quantized
(`jaxsys.quant`): f32, w8a8, w4a16 and w4a8 (group 128), int3 and int2 (bipolar-INT
bit planes, group 128), each by round-to-nearest and by the activation-aware step
(SmoothQuant scales for the int8-activation formats, AWQ's search for weight-only ones)
from a few calibration batches of training text. The held-out documents are the last
`--held-out` documents of the corpus, never trained on. Acceptance on `small`: w8a8
within 1% of f32, w4a16 within 5%, w4a8 within 8%. The size column is the quantized
checkpoint (`jaxsys quantize`: embedding and lm_head in bf16) over the bf16 one.

    python -m experiments.lowbit_accuracy [--quick] [--mesh single|cpu8] [--steps 200]

The full run trains `small` for 200 steps of 8 x 256 tokens (about 10 minutes on 2 idle
CPU cores at ~850 tokens/s, 20+ on busy ones), then spends a few minutes on the ten
quantized variants; `--quick` trains `tiny` and takes about a minute.

The last line of stdout is JSON: `ppl` (format -> perplexity with the better method),
`ppl_rtn`, `ppl_aware`, `ppl_unigram`, the training steps, the targets met and the sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time

import meshes

FORMATS = ("w8a8", "w4a16", "w4a8", "int3", "int2")
TARGETS = {"w8a8": 0.01, "w4a16": 0.05, "w4a8": 0.08}  # allowed perplexity increase over f32


def unigram_perplexity(train_tokens, targets, vocab: int) -> float:
    """Add-one smoothed unigram model of `train_tokens`, scored on `targets`."""
    import numpy as np
    counts = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[targets].mean()))


def make_scorer(model, windows, batch: int):
    """params -> held-out perplexity over `windows` [n, seq_len + 1] (one compile per params structure)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    @jax.jit
    def total_nll(params, chunk):
        logits, _ = model.apply(params, chunk[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:]).sum()

    chunks = [jnp.asarray(windows[i:i + batch]) for i in range(0, len(windows), batch)]

    def perplexity(params) -> float:
        nll = sum(float(total_nll(params, c)) for c in chunks)
        return float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))

    return perplexity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="`tiny`, few steps, small held-out set (minutes)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--mesh", default="single",
                        help="'single' (one device) or a topology preset such as cpu8 (default: single)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (extended until the target is met)")
    parser.add_argument("--max-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=400, help="held-out documents (the corpus's last)")
    parser.add_argument("--eval-windows", type=int, default=48, help="held-out windows of --seq-len scored")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches of 4 x --seq-len tokens")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.max_steps = "tiny", 150, 450
        args.held_out, args.eval_windows, args.calib_batches, args.seq_len = 200, 16, 2, 128
    if args.mesh != "single":
        meshes.ensure_host_device_count(meshes.load_topology(args.mesh).num_devices)  # before JAX starts
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("lowbit_accuracy")

    import jax
    import numpy as np

    from jaxsys.config import get_preset
    from jaxsys.data import TokenDataset, load_documents, load_tokenizer
    from jaxsys.model import ModelDef
    from jaxsys.quant import (
        check_group_size, collect_input_stats, default_group_size, nbytes, quantize_params, smooth_params)
    from jaxsys.quant.weights import cast_embeddings
    from jaxsys.train import TrainConfig, train

    config = dataclasses.replace(get_preset(args.model), dtype="float32")
    group_size = default_group_size(config, args.group_size)  # 64 for tiny (dim 64); the table says
    for fmt in FORMATS:
        check_group_size(config, fmt, group_size)
    topology = meshes.load_topology("cpu8" if args.mesh == "single" else args.mesh)
    mesh = (meshes.single_device_mesh(topology.axis_names) if args.mesh == "single"
            else meshes.build_mesh(topology))

    tokenizer = load_tokenizer("byte")
    docs = load_documents("corpus", seed=0)
    train_docs, held_docs = docs[:-args.held_out], docs[-args.held_out:]
    data = TokenDataset.from_documents(train_docs, tokenizer, seq_len=args.seq_len, batch_size=args.batch_size)
    held = TokenDataset.from_documents(held_docs, tokenizer, seq_len=args.seq_len, batch_size=1)
    n_windows = min(args.eval_windows, held.num_windows)
    starts = np.arange(n_windows) * args.seq_len
    windows = held.tokens[starts[:, None] + np.arange(args.seq_len + 1)]  # [n, seq_len + 1]
    ppl_unigram = unigram_perplexity(data.tokens, windows[:, 1:].reshape(-1), tokenizer.vocab_size)
    target = ppl_unigram / 2

    model = ModelDef(config)
    perplexity = make_scorer(model, windows, batch=8)
    t0 = time.perf_counter()
    steps, ppl_f32 = args.steps, float("inf")
    with tempfile.TemporaryDirectory(prefix="lowbit_accuracy-") as ckpt_dir:
        resume = False
        while True:
            tc = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=3e-3,
                             warmup_steps=20, strategy="fsdp", log_every=50, ckpt_every=10**9, keep_last=1)
            result = train(config, tc, mesh, data, ckpt_dir=ckpt_dir, resume=resume, meta={"data": "corpus"})
            params = jax.device_get(result.state["params"])
            ppl_f32 = perplexity(params)
            log.info("step %d: held-out perplexity %.3f (unigram %.3f, target <= %.3f)",
                     steps, ppl_f32, ppl_unigram, target)
            if ppl_f32 <= target or steps >= args.max_steps:
                break
            steps, resume = min(2 * steps, args.max_steps), True
    train_s = time.perf_counter() - t0

    calib_data = TokenDataset(data.tokens, seq_len=args.seq_len, batch_size=4, seed=1)
    calib = np.concatenate([calib_data.batch(i)[:, :args.seq_len] for i in range(args.calib_batches)])
    stats = collect_input_stats(config, params, calib)  # the float model's, shared by every format

    ppl_rtn, ppl_aware, size = {"f32": ppl_f32}, {"f32": ppl_f32}, {}
    for fmt in FORMATS:
        qparams = quantize_params(config, params, fmt, group_size=group_size)
        ppl_rtn[fmt] = perplexity(qparams)
        sizes = nbytes(cast_embeddings(qparams, "bfloat16"))  # as `jaxsys quantize` stores it
        size[fmt] = sizes["total"] / sizes["total_bf16"]
        smoothed, report = smooth_params(config, params, None, fmt, group_size=group_size, stats=stats)
        ppl_aware[fmt] = perplexity(quantize_params(config, smoothed, fmt, group_size=group_size))
        scaled = sum(r.alpha is not None for r in report)
        log.info("%s: rtn %.4f, aware %.4f (%d/%d layer groups rescaled)", fmt, ppl_rtn[fmt], ppl_aware[fmt],
                 scaled, len(report))
    ppl = {fmt: min(ppl_rtn[fmt], ppl_aware[fmt]) for fmt in ppl_rtn}
    increase = {fmt: ppl[fmt] / ppl_f32 - 1 for fmt in FORMATS}
    targets_met = {fmt: increase[fmt] <= limit for fmt, limit in TARGETS.items()}

    print(f"low-bit accuracy of {args.model} ({config.num_params / 1e6:.1f}M params) after {steps} steps "
          f"({train_s:.0f} s of training), {windows[:, 1:].size} held-out tokens")
    print(f"held-out perplexity: f32 {ppl_f32:.3f}, unigram {ppl_unigram:.3f} "
          f"(target <= {target:.3f}: {'met' if ppl_f32 <= target else 'NOT met'})")
    print(f"{'format':<8}{'group':>6}{'rtn':>10}{'aware':>10}{'best':>10}{'vs f32':>9}{'target':>9}"
          f"{'size/bf16':>11}")
    for fmt in FORMATS:
        group = "chan" if fmt == "w8a8" else str(group_size)
        limit = f"<={TARGETS[fmt]:.0%}" if fmt in TARGETS else "-"
        print(f"{fmt:<8}{group:>6}{ppl_rtn[fmt]:>10.4f}{ppl_aware[fmt]:>10.4f}{ppl[fmt]:>10.4f}"
              f"{increase[fmt]:>+9.2%}{limit:>9}{size[fmt]:>11.3f}")
    print(json.dumps({"experiment": "lowbit_accuracy", "model": args.model, "quick": args.quick,
                      "steps": steps, "train_s": train_s, "group_size": group_size,
                      "held_out_tokens": int(windows[:, 1:].size), "ppl_target": target,
                      "ppl_unigram": ppl_unigram, "ppl": ppl, "ppl_rtn": ppl_rtn, "ppl_aware": ppl_aware,
                      "increase": increase, "targets_met": targets_met, "size_vs_bf16": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
