"""How does `jaxsys serve` hold up under concurrent load? (continuous batching, NanoFlow nano-batches)

Starts `jaxsys serve` on 127.0.0.1 with a `small` model that jaxsys trains on the embedded
corpus (cached under `runs/serving_load/`), and sends a bounded closed-loop load: at each
concurrency (1, 4, 16, 32) that many clients each send streamed greedy requests one after
another (prompts: held-out corpus problems, fixed seed; a fixed number of new tokens, EOS
ignored, so every level does the same work per request). Figures per concurrency:

- `throughput_tok_s`: generated tokens / wall time of the level (its median round, below);
- `p50_latency_s`, `p99_latency_s`: request submitted -> last event; `p50_ttft_s`, `p99_ttft_s`:
  -> first token event;
- `speedup_vs_sequential`: throughput at 16 over throughput at 1 (same server). The levels
  run in turn for `--rounds` rounds (default 3) and each level's throughput is its median
  round, so a slow spell of the shared cores does not land on one level alone;
  `speedup_by_round` gives each round's ratio;
- `lost`: requests without a complete 200 answer (429/503 are retried after Retry-After);
  `wrong`: answers that differ from `jaxsys generate` (the in-process `Generator`) for the
  same prompt at a logit gap above 1e-3, `near_tie`: those that differ only where the top
  two logits are within 1e-3; `pages_in_use_after`: KV pages held once the load is over.

Nano-batching, measured on the engine in this process (the server's step program): one
decode step of `max_batch` rows at half the context, each candidate split timed by the
automatic search (`Engine.search_splits`); `nanobatch_speedup` = one batch / best split,
and `fraction_of_optimal` = the best split's tokens/s over the optimal (compute-bound)
throughput: measured peak matmul FLOP/s / forward FLOPs per decoded token
(2 x matmul parameters + 4 x layers x context x heads x head_dim).

    python -m experiments.serving_load [--quick] [--steps 100]

On 2 shared CPU cores the client, the server and other work share the cores: ratios
within one run are the figures to read. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TARGETS = {"speedup_vs_sequential": 4.0}
log = logging.getLogger("serving_load")
ROOT = Path(__file__).resolve().parent.parent


def trained_small(steps: int) -> Path:
    """A `small` jaxsys checkpoint trained for `steps` steps on the corpus (cached under runs/serving_load/)."""
    import meshes
    from jaxsys.config import get_preset
    from jaxsys.data import TokenDataset, load_documents, load_tokenizer
    from jaxsys.train import TrainConfig, train

    ckpt_dir = Path("runs") / "serving_load" / f"small-{steps}"
    config = get_preset("small")
    tc = TrainConfig(steps=steps, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=8, strategy="fsdp",
                     log_every=10, ckpt_every=steps, keep_last=1)
    data = TokenDataset.from_documents(load_documents("corpus", seed=0), load_tokenizer("byte"),
                                       seq_len=tc.seq_len, batch_size=tc.batch_size)
    mesh = meshes.single_device_mesh(meshes.load_topology("cpu8").axis_names)
    train(config, tc, mesh, data, ckpt_dir=ckpt_dir, resume=True, meta={"data": "corpus"})
    return ckpt_dir


def prompts(count: int, tokenizer) -> list[list[int]]:
    from jaxsys.data import corpus
    problems = corpus.generate_problems(count, seed=2024, min_steps=1, max_steps=2)
    return [tokenizer.encode(corpus.format_prompt(p.question), add_bos=True) for p in problems]


def start_server(model: Path, args) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "jaxsys.cli", "serve", "--model", str(model), "--port", "0", "--warmup",
           "--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--prefill-chunk", "64",
           "--prefill-lanes", "2",
           "--max-queue", "512", "--served-model-name", "small", "--nano-batches", args.nano_batches]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, cwd=ROOT, env=env)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split()[-1]


def one_request(address: tuple[str, int], ids: list[int], max_tokens: int, retries: int = 20) -> dict | None:
    """One streamed greedy request -> {tokens, latency_s, ttft_s}, or None if it never got a full answer.

    The standard library's `http.client` reads the event stream: the load shares the two cores with the
    server, and a lean client takes less from it (per concurrency-16 level, httpx used 1.3 s of CPU,
    `http.client` 0.4 s).
    """
    import http.client
    body = json.dumps({"model": "small", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    for _ in range(retries):
        t0 = time.perf_counter()
        tokens, ttft, finish = [], None, None
        conn = http.client.HTTPConnection(*address, timeout=600)
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status in (429, 503):
                r.read()
                time.sleep(float(r.getheader("Retry-After", 1)))
                continue
            if r.status != 200:
                return None
            while line := r.readline():
                if not line.startswith(b"data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice["token_ids"] and ttft is None:
                    ttft = time.perf_counter() - t0
                tokens += choice["token_ids"]
                finish = choice["finish_reason"] or finish
        except (OSError, http.client.HTTPException) as e:
            log.warning("request failed: %s", e)
            return None
        finally:
            conn.close()
        if finish != "length" or len(tokens) != max_tokens:
            return None
        return {"tokens": tokens, "latency_s": time.perf_counter() - t0, "ttft_s": ttft}
    return None


def run_level(url: str, pool: list[list[int]], concurrency: int, requests: int, max_tokens: int) -> dict:
    import numpy as np
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    address = (parts.hostname, parts.port)
    results, lock, next_index = [], threading.Lock(), iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            out = one_request(address, pool[i % len(pool)], max_tokens)
            with lock:
                results.append((i % len(pool), out))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [out for _, out in results if out is not None]
    return {"concurrency": concurrency, "requests": requests, "lost": requests - len(done),
            "throughput_tok_s": sum(len(o["tokens"]) for o in done) / wall, "wall_s": wall, "answers": results}


def merge_rounds(runs: list[dict]) -> dict:
    """One concurrency's rounds -> its row: the median round's throughput, latencies over every request."""
    import numpy as np
    done = [out for run in runs for _, out in run["answers"] if out is not None]
    lat = np.asarray([o["latency_s"] for o in done]) if done else np.zeros(1)
    ttft = np.asarray([o["ttft_s"] for o in done]) if done else np.zeros(1)
    by_round = [run["throughput_tok_s"] for run in runs]
    return {"concurrency": runs[0]["concurrency"], "requests": sum(run["requests"] for run in runs),
            "lost": sum(run["lost"] for run in runs), "throughput_tok_s": float(np.median(by_round)),
            "throughput_by_round": by_round, "wall_s": sum(run["wall_s"] for run in runs),
            "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99)),
            "p50_ttft_s": float(np.percentile(ttft, 50)), "p99_ttft_s": float(np.percentile(ttft, 99)),
            "answers": [a for run in runs for a in run["answers"]]}


def check_answers(model, params, pool, references, answers, tie: float = 1e-3) -> tuple[int, int]:
    """(wrong, near_tie) among the answers, against the references of their prompts."""
    import jax.numpy as jnp
    import numpy as np
    wrong = near_tie = 0
    for index, out in answers:
        if out is None or out["tokens"] == references[index]:
            continue
        got, want = out["tokens"], references[index]
        i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = np.asarray(model.apply(params, jnp.asarray([pool[index] + want[:i]]))[0][0, -1])
        top2 = np.sort(logits)[-2:]
        if top2[1] - top2[0] < tie:
            near_tie += 1
        else:
            wrong += 1
    return wrong, near_tie


def nanobatch_study(model, params, args) -> dict:
    from jaxsys.engine import Engine, EngineConfig
    from jaxsys.nanobatch import optimal_tokens_per_s, peak_matmul_flops
    engine = Engine(model, params, EngineConfig(max_batch=args.max_batch, max_len=args.max_len, prefill_lanes=2,
                                                prefill_chunk=64))
    context = args.max_len // 2
    search = engine.search_splits(context=context)
    one = search.measured[(args.max_batch,)]
    best = search.measured[search.best]
    peak = peak_matmul_flops()
    optimal = optimal_tokens_per_s(model.config, context, peak)
    # What the device step alone allows at concurrency 16: 16 rows per step against 1 row per step.
    t1, t16 = engine.time_decode((1,), context=context), engine.time_decode((16,), context=context)
    return {"rows": args.max_batch, "context": context, "best_split": list(search.best),
            "decode_step_ms_1_row": t1 * 1e3, "decode_step_ms_16_rows": t16 * 1e3,
            "step_bound_speedup_16_vs_1": 16 * t1 / t16,
            "step_ms": {",".join(map(str, k)): round(v * 1e3, 3) for k, v in search.measured.items()},
            "predicted_ms": {",".join(map(str, k)): round(v * 1e3, 3) for k, v in search.predicted.items()},
            "cost_model": {"fixed_ms": search.cost_model.fixed * 1e3, "per_row_ms": search.cost_model.per_row * 1e3,
                           "overlap": search.cost_model.overlap},
            "nanobatch_speedup": one / best, "tokens_per_s_one_batch": args.max_batch / one,
            "tokens_per_s_best": args.max_batch / best, "peak_flops": peak, "optimal_tokens_per_s": optimal,
            "fraction_of_optimal": args.max_batch / best / optimal,
            "fraction_of_optimal_one_batch": args.max_batch / one / optimal}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens, concurrency up to 16")
    parser.add_argument("--steps", type=int, default=None, help="training steps of the small model")
    parser.add_argument("--model", default=None, help="serve this checkpoint instead of training `small`")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None, help="context per request (default: longest "
                                                                    "prompt + max tokens, rounded up to 64)")
    parser.add_argument("--nano-batches", default="1", metavar="N|auto", help="the server's nano-batches (1 = off)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times every level is run, in turn; a level's throughput is its median round "
                             "(default 3, --quick 1)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    steps = args.steps or (30 if args.quick else 80)
    args.max_tokens = args.max_tokens or (64 if args.quick else 128)
    levels = (1, 4, 16) if args.quick else (1, 4, 16, 32)
    args.max_batch = args.max_batch or max(levels)
    requests = {1: 8, 4: 16, 16: 48, 32: 64} if args.quick else {1: 16, 4: 32, 16: 64, 32: 96}
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from jaxsys.data import load_tokenizer
    from jaxsys.generate import Generator
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    ckpt = Path(args.model) if args.model else trained_small(steps)
    loaded = load_model(str(ckpt))
    model = ModelDef(loaded.config)
    pool = prompts(16, load_tokenizer("byte"))
    args.max_len = args.max_len or -(-(max(map(len, pool)) + args.max_tokens) // 64) * 64
    proc, url = start_server(ckpt, args)
    try:
        runs = {c: [] for c in levels}
        for r in range(args.rounds):  # every level once per round: drift of the shared cores hits them alike
            for c in levels:
                level = run_level(url, pool, c, requests[c], args.max_tokens)
                runs[c].append(level)
                log.info("round %d, concurrency %d: %.1f tok/s, lost %d", r + 1, c, level["throughput_tok_s"],
                         level["lost"])
        rows = [merge_rounds(runs[c]) for c in levels]
        import httpx2 as httpx
        metrics = httpx.get(url + "/metrics").text
        pages_after = int(next(line.split()[-1] for line in metrics.splitlines()
                               if line.startswith("jaxsys_kv_pages_in_use ")))
    finally:
        proc.terminate()
        proc.wait(120)
    generator = Generator(model, loaded.params, max_len=max(len(p) for p in pool) + args.max_tokens)
    references = [generator.generate(p, max_new_tokens=args.max_tokens, ignore_eos=True).token_ids for p in pool]
    wrong = near_tie = 0
    for level in rows:
        w, n = check_answers(model, loaded.params, pool, references, level.pop("answers"))
        wrong, near_tie = wrong + w, near_tie + n
    nano = nanobatch_study(model, loaded.params, args)

    print(f"jaxsys serve under load: small ({loaded.config.num_params / 1e6:.1f}M params), {args.max_tokens} new "
          f"tokens per request, greedy, max batch {args.max_batch}, nano-batches {args.nano_batches}; "
          f"{args.rounds} round(s) of every level, tok/s = median round")
    print(f"{'concurrency':>11} {'requests':>8} {'tok/s':>8} {'p50 lat s':>9} {'p99 lat s':>9} {'p50 ttft':>9} "
          f"{'p99 ttft':>9} {'lost':>5}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['throughput_tok_s']:>8.1f} {r['p50_latency_s']:>9.3f} "
              f"{r['p99_latency_s']:>9.3f} {r['p50_ttft_s']:>9.3f} {r['p99_ttft_s']:>9.3f} {r['lost']:>5}")
    by_c = {r["concurrency"]: r for r in rows}
    speedup = by_c[16]["throughput_tok_s"] / by_c[1]["throughput_tok_s"]
    by_round = [a / b for a, b in zip(by_c[16]["throughput_by_round"], by_c[1]["throughput_by_round"])]
    lost = sum(r["lost"] for r in rows)
    print(f"speedup 16 vs 1: {speedup:.2f}x (target >= {TARGETS['speedup_vs_sequential']}x; by round "
          f"{', '.join(f'{x:.2f}x' for x in by_round)}); lost {lost}, wrong "
          f"{wrong}, near-tie differences {near_tie}, KV pages in use afterwards {pages_after}")
    print(f"decode step alone: 1 row {nano['decode_step_ms_1_row']:.2f} ms, 16 rows {nano['decode_step_ms_16_rows']:.2f} "
          f"ms: at most {nano['step_bound_speedup_16_vs_1']:.2f}x from batching 16 with no host or HTTP time")
    print(f"nano-batches ({nano['rows']} decode rows at context {nano['context']}): step ms by split "
          f"{nano['step_ms']}; best {nano['best_split']}, {nano['nanobatch_speedup']:.3f}x one batch; "
          f"{nano['tokens_per_s_best']:.0f} tok/s = {nano['fraction_of_optimal']:.1%} of the optimal "
          f"{nano['optimal_tokens_per_s']:.0f} tok/s (peak {nano['peak_flops'] / 1e9:.1f} GFLOP/s measured)")
    summary = {"model": "small", "train_steps": steps, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
               "server_nano_batches": args.nano_batches,
               "throughput_tok_s": {str(r["concurrency"]): r["throughput_tok_s"] for r in rows},
               "levels": rows, "speedup_vs_sequential": speedup, "speedup_by_round": by_round, "lost": lost,
               "wrong": wrong, "near_tie": near_tie, "pages_in_use_after": pages_after,
               "nanobatch_speedup": nano["nanobatch_speedup"], "fraction_of_optimal": nano["fraction_of_optimal"],
               "step_bound_speedup_16_vs_1": nano["step_bound_speedup_16_vs_1"],
               "nanobatch": nano, "device": "cpu",
               "targets_met": {"speedup_vs_sequential": speedup >= TARGETS["speedup_vs_sequential"],
                               "no_loss": lost == 0 and wrong == 0 and pages_after == 0}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
