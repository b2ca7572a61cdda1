"""`make demo`: the main job on embedded defaults, in a few minutes on 2 CPU cores.

Trains the `small` preset on the embedded arithmetic corpus across the 8
simulated devices of `cpu8` (2 node x 2 gpu x 2 gcd, FSDP), checkpoints it,
reloads the checkpoint the way `jaxsys generate --model runs/demo` does, answers
held-out problems greedily, and prints a summary.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import meshes

DEMO_DIR = Path("runs/demo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--mesh", default="cpu8")
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="run folder (replaced each time)")
    args = parser.parse_args(argv)

    topology = meshes.load_topology(args.mesh)
    meshes.ensure_host_device_count(topology.num_devices)
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from jaxsys.config import get_preset
    from jaxsys.data import TokenDataset, corpus, load_documents, load_tokenizer
    from jaxsys.generate import Generator
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef
    from jaxsys.train import TrainConfig, train

    t0 = time.perf_counter()
    config = get_preset("small")
    tokenizer = load_tokenizer("byte")
    tc = TrainConfig(steps=args.steps, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=8,
                     strategy="fsdp", ckpt_every=args.steps, log_every=10)
    docs = load_documents("corpus", seed=0)
    data = TokenDataset.from_documents(docs, tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=0)
    if args.out.exists():
        own = {"metrics.jsonl", "loss.png"}
        strangers = [p.name for p in args.out.iterdir() if not (p.name in own or p.name.isdigit())]
        if strangers:
            raise SystemExit(f"{args.out} holds files the demo did not write ({', '.join(strangers[:3])}); "
                             "pick another --out")
        shutil.rmtree(args.out)  # a previous demo run
    mesh = meshes.build_mesh(topology)
    result = train(config, tc, mesh, data, ckpt_dir=args.out,
                   meta={"data": "corpus", "strategy": tc.strategy, "topology": topology.name})
    t_train = time.perf_counter() - t0

    loaded = load_model(str(args.out))  # the checkpoint, as `jaxsys generate` loads it
    generator = Generator(ModelDef(loaded.config), loaded.params, max_len=256)
    held_out = corpus.generate_problems(3, seed=12345, min_steps=1, max_steps=1)
    samples, plain_ids = [], []
    for problem in held_out:
        prompt = tokenizer.encode(corpus.format_prompt(problem.question), add_bos=True)
        out = generator.generate(prompt, max_new_tokens=96, eos_ids=(tokenizer.eos_id,))
        plain_ids.append(out.token_ids)
        text = tokenizer.decode(out.token_ids)
        samples.append((problem, text, corpus.extract_answer(text), out.decode_tok_per_s))

    spec = speculative_line(loaded, plain_ids[0], tokenizer, corpus, held_out[0])
    prompts = [tokenizer.encode(corpus.format_prompt(p.question), add_bos=True) for p in held_out]
    serving = serving_line(loaded, prompts, plain_ids, tokenizer.eos_id)

    print()
    print("jaxsys demo")
    print(f"  model       small: {config.num_params / 1e6:.1f}M params, {config.n_layers} layers, "
          f"GQA {config.n_heads}/{config.n_kv_heads} heads, byte tokenizer")
    print(f"  mesh        {topology.name}: {' x '.join(f'{n}={s}' for n, s in mesh.shape.items())} "
          f"({mesh.size} devices), strategy {tc.strategy}")
    print(f"  training    {result.end_step} steps x {tc.batch_size * tc.seq_len} tokens: loss "
          f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}, {result.tokens_per_s:,.0f} tokens/s, {t_train:.0f} s")
    print(f"  checkpoint  {args.out}/{result.end_step} (loss curve: {args.out}/loss.png)")
    for problem, text, answer, rate in samples:
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        print(f"  generate    Q: {problem.question}")
        print(f"              A: {first_line[:100]!r} ... answer {answer} "
              f"(exact {problem.answer}) [{rate:.0f} tok/s]")
    correct = sum(answer == p.answer for p, _, answer, _ in samples)
    print(f"  held-out    {correct}/{len(samples)} one-step problems answered exactly")
    print(f"  speculate   {spec}")
    print(f"  serve       {serving}")
    print(f"  ZeRO bytes  {traffic_line(config, mesh)}")
    print(f"  pipeline    {pipeline_line()}")
    print(f"  total       {time.perf_counter() - t0:.0f} s")
    return 0


def speculative_line(loaded, plain_ids, tokenizer, corpus, problem) -> str:
    """Self-speculation (the model on a retrieval sparse KV cache drafts for itself) on a held-out
    prompt: the same tokens as plain greedy decoding (`plain_ids`), fewer full forwards."""
    import numpy as np

    from jaxsys.model import ModelDef
    from jaxsys.speculative import SpecConfig, SpeculativeDecoder

    prompt = tokenizer.encode(corpus.format_prompt(problem.question), add_bos=True)
    config = SpecConfig(mode="self", gamma=4, retrieval_budget=32, chunk_size=8)
    decoder = SpeculativeDecoder(ModelDef(loaded.config), loaded.params, config=config, max_len=len(prompt) + 96)
    out, metrics = decoder.generate([prompt], max_new_tokens=96, stop_ids=(tokenizer.eos_id,))
    tokens = np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist()
    return (f"self-speculative decoding (32-token retrieval cache drafts 4): {len(tokens)} tokens, equal to "
            f"plain greedy: {tokens == plain_ids}; acceptance {metrics['levels']['target']['acceptance_rate']:.2f}, "
            f"{metrics['target_forwards_per_token']:.2f} full forwards per token")


def pipeline_line() -> str:
    """The NIC-aware pipeline plan for llama3-8b on the mixed IB/RoCE preset, against the naive order."""
    from jaxsys.config import get_preset
    from meshes.planner import plan_report

    report = plan_report(meshes.load_topology("hetero-ib-roce"), get_preset("llama3-8b"), 8, 2, 2)
    return (f"hetero-ib-roce llama3-8b TP8 x PP2 x DP2 (estimate): NIC-aware plan {report.plan.step_s:.2f} s/step "
            f"vs naive device order {report.naive.step_s:.2f} s ({report.speedup_vs_naive:.2f}x), layers "
            f"{'/'.join(map(str, report.plan.layers_per_stage))}, bubble {report.plan.bubble_fraction:.1%}")


def serving_line(loaded, prompts, plain_ids, eos_id) -> str:
    """The held-out prompts as concurrent requests to the batching engine (paged KV, continuous
    batching), served with self-speculation (the model over a 32-token retrieval view of its own
    pages drafts 4 tokens per round): the same tokens as one-by-one greedy decoding, every page back."""
    from jaxsys.engine import Engine, EngineConfig, Request
    from jaxsys.model import ModelDef

    engine = Engine(ModelDef(loaded.config), loaded.params,
                    EngineConfig(max_batch=4, max_len=256, page_size=8, prefill_chunk=64, speculative="self",
                                 gamma=4, retrieval_budget=32, decode_buckets=(4,)))  # one program to compile
    start = time.perf_counter()
    seqs = engine.generate([Request(p, max_tokens=96, stop_ids=(eos_id,)) for p in prompts])
    seconds = time.perf_counter() - start
    same = all(s.generated == list(ids) for s, ids in zip(seqs, plain_ids))
    state, spec = engine.snapshot(), engine.speculative_metrics()
    return (f"{len(seqs)} concurrent requests through the batching engine, self-speculative over a 32-token "
            f"retrieval view of their pages: equal to one-by-one greedy {same}, acceptance {spec['acceptance']:.2f}, "
            f"{sum(len(s.generated) for s in seqs)} tokens in {seconds:.1f} s (compiles included), "
            f"KV pages in use afterwards {state['pages_in_use']}/{state['pages_total']}; its verify attends over "
            f"the pages with {verify_attention(engine)}")


def verify_attention(engine) -> str:
    """What computes a self-speculative verify's attention over the pages (gamma + 2 tokens per row)."""
    from jaxsys.nanobatch import page_attention_path
    c = engine.model.config
    path = page_attention_path(engine.config.gamma + 2, c.n_heads // c.n_kv_heads, c.dtype,
                               engine.pools[0][0][0].dtype, engine.config.attention_impl)
    return {"pallas": "the Pallas paged-decode kernel", "cpu_kernel": "the C++ XLA:CPU kernel",
            "jnp": "jnp (scan_attention)"}[path]


def traffic_line(config, mesh) -> str:
    """MB per device per step on each level for zero3 / zeropp / hier (bf16), from the analytic model."""
    from jaxsys.model import ModelDef
    from jaxsys.sharding.traffic import param_infos, schedule_bytes
    from jaxsys.sharding.zero import make_schedule, param_dims

    shapes = ModelDef(config).shapes
    infos = param_infos(shapes, param_dims(shapes, mesh.size))
    parts = []
    for strategy in ("zero3", "zeropp", "hier"):
        per_level = schedule_bytes(make_schedule(strategy, mesh), dict(mesh.shape), infos, compute_dtype="bfloat16")
        parts.append(f"{strategy} " + "/".join(f"{per_level[a] / 1e6:.1f}" for a in mesh.axis_names))
    return f"MB per device per step over {'/'.join(mesh.axis_names)} (bf16): " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
