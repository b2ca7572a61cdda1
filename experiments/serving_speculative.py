"""Speculative decoding served by the batching engine: plain vs draft, self (retrieval) and TriForce.

Uses the pair of `experiments.spec_models` (trained once, cached outside git; see
`experiments.speculative`). `--requests` held-out documents cut to `--context` tokens are
submitted together to one `jaxsys.engine.Engine` per mode, greedy, `--new-tokens` each;
there is a prefill lane per prompt, so all prompts are prefilled in the first steps and
the sequences then decode side by side. Every step program is compiled beforehand
(`Engine.warmup`). Decode throughput is the tokens generated after each sequence's first
one, over the time from the last first token to the last finished sequence; the modes
run in turn, `--repeats` times, and the median is kept, as a ratio to the plain engine
measured in the same run. `lossless`: every mode's answers equal the plain engine's
(compared token for token; a difference would be reported with its position).
Acceptance is accepted / drafted tokens of the level the full target verifies (for
TriForce the retrieval level; `draft_acceptance` is its draft model's, to the retrieval
level); `experiments.speculative` reports acceptance per reached draft position instead.

    python -m experiments.serving_speculative [--context 2048] [--requests 4] [--new-tokens 96]

The last line of stdout is JSON: `decode_tok_s`, `speedup`, `acceptance`,
`target_forwards_per_token`, `retrieval_rebuilds` (mode -> value) and `lossless`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

MODES = ("plain", "draft", "self", "triforce")
SPEC = MODES[1:]


def run_once(engine, prompts, new_tokens):
    """(answers, decode tokens/s, speculative metrics of this run) for one batch of requests."""
    from jaxsys.engine import Request

    engine.counters.clear()
    engine.spec_accepted_at[:] = 0
    seqs = engine.generate([Request(p, max_tokens=new_tokens) for p in prompts])
    if any(s.finish_reason != "length" for s in seqs):
        raise RuntimeError(f"requests ended early: {[s.finish_reason for s in seqs]}")
    start = max(s.first_token_at for s in seqs)
    end = max(s.finished_at for s in seqs)
    decoded = sum(len(s.generated) - 1 for s in seqs)
    metrics = engine.speculative_metrics() if engine.config.speculative != "none" else {}
    return [s.generated for s in seqs], decoded / (end - start), metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(".cache/spec_models"))
    parser.add_argument("--quick", action="store_true", help="the tiny pair (trained in about a minute)")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens per request")
    parser.add_argument("--requests", type=int, default=4, help="requests served together")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gamma", type=int, default=4, help="draft and self: tokens drafted per round")
    parser.add_argument("--gamma-inner", type=int, default=3, help="triforce: draft model -> retrieval level")
    parser.add_argument("--gamma-outer", type=int, default=8, help="triforce: retrieval level -> full target")
    parser.add_argument("--draft-window", type=int, default=256, help="triforce: the draft model's recent window")
    parser.add_argument("--budget", type=int, default=256, help="self: retrieval budget (tokens, whole pages)")
    parser.add_argument("--rebuild-every", type=int, default=8)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    import jax
    import numpy as np

    from experiments.spec_models import DATA_SEED, ensure_pair
    from jaxsys.data.longctx import heldout_documents
    from jaxsys.engine import Engine, EngineConfig
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    if args.quick:
        args.context, args.budget, args.new_tokens = min(args.context, 256), min(args.budget, 64), 32
    target_path, draft_path = ensure_pair(args.folder, quick=args.quick, log=log)
    target_loaded, draft_loaded = load_model(str(target_path)), load_model(str(draft_path))
    target, draft = ModelDef(target_loaded.config), ModelDef(draft_loaded.config)
    tp, dp = target_loaded.params, draft_loaded.params
    docs = [d for d in heldout_documents(64, seed=DATA_SEED)
            if len(d.token_ids()) >= args.context][:args.requests]
    if len(docs) < args.requests:
        raise SystemExit(f"only {len(docs)} held-out documents reach {args.context} tokens")
    prompts = [d.token_ids()[:args.context].tolist() for d in docs]

    max_len = args.context + args.new_tokens + max(args.gamma, args.gamma_outer) + 2
    base = EngineConfig(max_batch=args.requests, max_len=max_len, page_size=args.page_size,
                        prefill_chunk=min(args.context, 512), prefill_lanes=args.requests, max_queue=args.requests,
                        gamma=args.gamma, retrieval_budget=args.budget, rebuild_every=args.rebuild_every,
                        gamma_outer=args.gamma_outer, draft_window=args.draft_window)

    def config(**changes):
        return EngineConfig(**{**vars(base), **changes})
    engines = {
        "plain": Engine(target, tp, base),
        "draft": Engine(target, tp, config(speculative="draft"), draft=draft, draft_params=dp),
        "self": Engine(target, tp, config(speculative="self")),
        "triforce": Engine(target, tp, config(speculative="triforce", gamma=args.gamma_inner), draft=draft,
                           draft_params=dp),
    }
    for mode, engine in engines.items():
        t0 = time.perf_counter()
        programs = engine.warmup()
        log(f"{mode}: compiled {programs} step programs in {time.perf_counter() - t0:.1f} s")

    rates = {m: [] for m in MODES}
    answers, metrics = {}, {}
    for r in range(args.repeats):
        for mode in MODES:
            out, rate, m = run_once(engines[mode], prompts, args.new_tokens)
            rates[mode].append(rate)
            answers[mode], metrics[mode] = out, m
            log(f"repeat {r}: {mode} {rate:.1f} decode tok/s")
    lossless, differences = True, {}
    for mode in SPEC:
        for i, (got, want) in enumerate(zip(answers[mode], answers["plain"])):
            if got != want:
                lossless = False
                differences.setdefault(mode, []).append(
                    {"request": i, "position": next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)})

    tok_s = {m: float(np.median(r)) for m, r in rates.items()}
    result = {
        "experiment": "serving_speculative", "quick": args.quick, "context": args.context,
        "requests": args.requests, "new_tokens": args.new_tokens, "decode_tok_s": tok_s,
        "speedup": {m: tok_s[m] / tok_s["plain"] for m in SPEC},
        "acceptance": {m: metrics[m]["acceptance"] for m in SPEC},
        "draft_acceptance": {"triforce": metrics["triforce"]["draft_acceptance"]},
        "target_forwards_per_token": {m: metrics[m]["target_forwards_per_token"] for m in SPEC},
        "retrieval_rebuilds": {m: metrics[m]["retrieval_rebuilds"] for m in ("self", "triforce")},
        "lossless": lossless, "differences": differences,
        "config": {"gamma": args.gamma, "gamma_inner": args.gamma_inner, "gamma_outer": args.gamma_outer,
                   "retrieval_budget": args.budget, "rebuild_every": args.rebuild_every,
                   "draft_window": args.draft_window, "page_size": args.page_size},
        "target_params": target.config.num_params, "draft_params": draft.config.num_params,
        "machine": f"{platform.machine()}, {jax.devices()[0].platform}, {jax.device_count()} device(s)",
    }
    print(f"speculative serving, greedy, {args.requests} requests of {args.context} prompt tokens served together, "
          f"{args.new_tokens} new tokens each; target {result['target_params'] / 1e6:.2f}M params, "
          f"draft {result['draft_params'] / 1e6:.2f}M; median of {args.repeats}")
    print(f"{'mode':>8} {'decode tok/s':>13} {'vs plain':>9} {'accept':>7} {'fwd/tok':>8}")
    for m in MODES:
        acc = f"{result['acceptance'][m]:7.3f}" if m != "plain" else f"{'-':>7}"
        fpt = result["target_forwards_per_token"].get(m, 1.0)
        print(f"{m:>8} {tok_s[m]:13.1f} {tok_s[m] / tok_s['plain']:9.2f} {acc} {fpt:8.3f}")
    print(f"lossless (answers equal the plain engine's): {lossless}; triforce draft -> retrieval acceptance "
          f"{result['draft_acceptance']['triforce']:.3f}; retrieval selections {result['retrieval_rebuilds']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
