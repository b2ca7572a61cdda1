"""The `jaxsys` command line: train, generate, serve, plan, quantize, mesh show.

Arguments are parsed before JAX is imported, so a command that needs N devices
can set the simulated CPU device count first. Results go to stdout (`--json`
prints exactly one line); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jaxsys import launch, planning
from jaxsys.loading import describe_model_arg


def _add_model(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help=f"{describe_model_arg()}" + (f" (default: {default})" if default else ""))


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); parameters keep theirs")


def _with_dtype(config, choice: str):
    import dataclasses

    import jax
    from jaxsys.config import default_compute_dtype
    dtype = default_compute_dtype(jax.default_backend()) if choice == "auto" else choice
    return dataclasses.replace(config, dtype=dtype)


def add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="fsdp", choices=("ddp", "fsdp", "zero3", "zeropp", "hier"),
                   help="ddp, fsdp (XLA-scheduled), zero3, zeropp (hpZ+qwZ+qgZ), hier (one stage per "
                        "level); default fsdp")
    p.add_argument("--tensor-parallel", default=None, metavar="LEVEL",
                   help="mesh level that splits attention heads and the MLP (ddp, fsdp)")
    p.add_argument("--no-quantized-collectives", action="store_true",
                   help="zeropp/hier: send weights and gradients unquantized")
    for name, what in (("hpz", "secondary weight partition inside the node"),
                       ("qwz", "int8 weight all-gather"), ("qgz", "int4 gradient all-to-all")):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"zeropp: {what} (default on)")
    p.add_argument("--secondary-partition-size", type=int, default=None,
                   help="zeropp/hier: devices holding one secondary copy (default: a whole node)")


def zero_options(args):
    from jaxsys.sharding.zero import ZeroOptions
    return ZeroOptions(hpz=args.hpz, qwz=args.qwz, qgz=args.qgz,
                       quantized_collectives=not args.no_quantized_collectives,
                       secondary_partition_size=args.secondary_partition_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxsys", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a mesh (embedded corpus by default)")
    _add_model(t, "small")
    t.add_argument("--data", default="corpus",
                   help="'corpus' (embedded arithmetic word problems), a .txt or a .jsonl file")
    t.add_argument("--mesh", default="cpu8", help="topology preset name or TOML path (default: cpu8)")
    add_strategy_arguments(t)
    t.add_argument("--steps", type=int, default=100, help="total optimizer steps of the run")
    t.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--grad-accum", type=int, default=1, help="microbatches per step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=10, help="warmup steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: runs/<model>)")
    t.add_argument("--ckpt-every", type=int, default=50)
    t.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    t.add_argument("--remat", action="store_true", help="recompute each block in the backward pass")
    planning.add_train_arguments(t)
    _add_dtype(t)
    t.add_argument("--json", action="store_true", help="print one line of JSON with the results")

    g = sub.add_parser("generate", help="generate tokens from a model")
    _add_model(g)
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a model with a tokenizer; BOS added)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, used verbatim (no BOS added)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--mesh", default=None,
                   help="topology preset or TOML: shard the weights over its devices (default: one device)")
    g.add_argument("--weights", default=None, metavar="FORMAT",
                   help="quantize the linear layers on load: w8a8, w4a16, w4a8, int2..int8, int2a8..int8a8")
    g.add_argument("--weights-method", default="rtn", choices=("rtn", "awq-like"),
                   help="with --weights: round-to-nearest, or activation-aware scales from corpus text")
    spec = g.add_argument_group("speculative decoding (lossless: same output distribution as plain decoding)")
    spec.add_argument("--speculative", default="none", choices=("none", "draft", "self", "triforce"),
                      help="draft: a small model drafts for the target; self: the target on a retrieval "
                           "sparse KV cache drafts for itself; triforce: draft -> retrieval target -> target")
    spec.add_argument("--draft", default=None, metavar="PATH", help="draft model (same vocabulary as --model)")
    spec.add_argument("--gamma", default="4", metavar="G[,G_OUTER]",
                      help="tokens drafted per round; for triforce 'inner,outer' (draft -> retrieval, "
                           "retrieval -> target), default 4,6")
    spec.add_argument("--retrieval-budget", type=int, default=256, help="tokens kept by the retrieval cache")
    spec.add_argument("--chunk-size", type=int, default=16, help="retrieval chunk size (divides the budget)")
    spec.add_argument("--draft-window", type=int, default=256, help="triforce: the draft's StreamingLLM window")
    kv = g.add_argument_group("KV cache (paged; quantized pages; pages offloaded beyond a device budget)")
    kv.add_argument("--kv-bits", type=int, default=None, choices=(16, 8, 4),
                    help="page format: 16 = the compute dtype, 8 = int8, 4 = int4 (per-token-per-head scales); "
                         "default: a dense cache")
    kv.add_argument("--smooth-attention", action="store_true",
                    help="fold SmoothAttention key scales into q/k first (calibrated on corpus text)")
    kv.add_argument("--kv-offload", default="none", choices=("none", "host", "disk"),
                    help="where pages beyond --device-kv-budget live")
    kv.add_argument("--device-kv-budget", default=None, metavar="SIZE",
                    help="device bytes for KV pages, e.g. 64MiB (needed for offloading to take effect)")
    kv.add_argument("--kv-attend", default="near-data", choices=("near-data", "fetch"),
                    help="offloaded pages: attend where they live and merge (near-data) or copy them to the "
                         "device first (fetch)")
    kv.add_argument("--kv-disk-path", default=None, metavar="DIR",
                    help="folder for --kv-offload disk (default: a temporary folder)")
    _add_dtype(g)

    e = sub.add_parser("export", help="write a model as a Hugging Face Llama folder")
    _add_model(e)
    e.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--json", action="store_true", help="print one line of JSON on stdout")

    m = sub.add_parser("mesh", help="topology presets and meshes")
    msub = m.add_subparsers(dest="mesh_command", required=True)
    show = msub.add_parser("show", help="print a topology's levels and device grid")
    show.add_argument("mesh", help="topology preset name or TOML path")
    msub.add_parser("list", help="list topology presets")

    from jaxsys import comm
    comm.add_parser(sub)
    launch.add_parser(sub)
    from jaxsys.quant import cli as quant_cli
    quant_cli.add_parser(sub)
    planning.add_parser(sub)
    from jaxsys import serve
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from jaxsys import comm
        from jaxsys.quant import cli as quant_cli
        commands = {"train": cmd_train, "generate": cmd_generate, "mesh": cmd_mesh, "export": cmd_export,
                    "comm": comm.run, "launch": launch.run, "quantize": quant_cli.run, "plan": planning.run,
                    "serve": _serve}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"jaxsys {args.command}: error: {e}", file=sys.stderr)
        return 1


def _serve(args) -> int:
    from jaxsys import serve
    return serve.run(args)


def cmd_mesh(args) -> int:
    import meshes
    if args.mesh_command == "list":
        print("\n".join(meshes.list_presets()))
        return 0
    print(meshes.describe(meshes.load_topology(args.mesh)))
    return 0


def cmd_train(args) -> int:
    import meshes
    topology = meshes.load_topology(args.mesh)
    # A rank of `jaxsys launch` (or a SLURM / Open MPI task) joins its job first; its
    # device count is its share of the mesh, which ensure_host_device_count must not raise.
    if not launch.initialize_from_env():
        meshes.ensure_host_device_count(topology.num_devices)  # before JAX starts

    import dataclasses

    import jax

    from jaxsys.data import TokenDataset, load_documents
    from jaxsys.loading import load_model, resolve_config, tokenizer_for
    from jaxsys.train import TrainConfig, train

    config, kind = resolve_config(args.model)
    if kind == "quantized":
        raise ValueError(f"{args.model} is a quantized checkpoint; train its float source instead")
    # Training keeps float32 master weights and Adam moments, whatever the source stored.
    config = dataclasses.replace(_with_dtype(config, args.dtype), remat=args.remat or config.remat,
                                 param_dtype="float32")
    if args.seq_len > config.max_seq_len:
        print(f"jaxsys train: warning: --seq-len {args.seq_len} is past the model's max_seq_len "
              f"{config.max_seq_len}; the checkpoint will still say {config.max_seq_len}, which `jaxsys serve` takes "
              "as its default context", file=sys.stderr)
    mesh, pipeline, pipeline_summary = None, None, None
    if args.pipeline_stages > 1 or args.microbatches is not None:
        mesh, pipeline, pipeline_summary = planning.training_pipeline(topology, config, args)
    strategy = "zero3" if pipeline is not None and args.strategy == "fsdp" else args.strategy
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     grad_accum=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup,
                     seed=args.seed, strategy=strategy, tensor_parallel=None if pipeline else args.tensor_parallel,
                     zero=zero_options(args), pipeline=pipeline,
                     log_every=args.log_every, ckpt_every=args.ckpt_every, keep_last=args.keep_last)
    mesh = mesh or meshes.build_mesh(topology)
    # A checkpoint or Hugging Face folder always supplies the starting weights; with
    # --resume they are used only when --ckpt-dir holds no checkpoint yet.
    loaded = load_model(args.model) if kind != "preset" else None
    init_params = None
    if loaded is not None:
        init_params = jax.tree.map(lambda x: x.astype("float32"), loaded.params)
    tokenizer = loaded.tokenizer if loaded else tokenizer_for(config)
    if tokenizer is None:
        raise ValueError(f"model {args.model} has no tokenizer, so text data cannot be encoded; "
                         "use a model folder with tokenizer.json or a preset trained with the byte tokenizer")
    docs = load_documents(args.data, seed=args.seed)
    data = TokenDataset.from_documents(docs, tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                       seed=tc.seed)
    ckpt_dir = Path(args.ckpt_dir or f"runs/{Path(args.model).name}")
    result = train(config, tc, mesh, data, ckpt_dir=ckpt_dir, resume=args.resume, init_params=init_params,
                   meta={"data": args.data, "strategy": args.strategy, "topology": topology.name})
    if loaded is not None and loaded.path is not None and jax.process_index() == 0:
        _copy_tokenizer_files(loaded.path, ckpt_dir)  # checkpoints of this run keep the model's tokenizer
    summary = {"first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None,
               "start_step": result.start_step, "end_step": result.end_step,
               "tokens_per_s": _finite_or_none(result.tokens_per_s), "ckpt_dir": str(result.ckpt_dir),
               "stopped_by_signal": result.stopped_by_signal,
               **({"pipeline": pipeline_summary} if pipeline_summary else {})}
    if args.json:
        print(json.dumps(summary, allow_nan=False))
    elif not result.losses:
        print(f"nothing to do: {ckpt_dir} is already at step {result.end_step} of --steps {tc.steps}")
    else:
        rate = f"{summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "one step, no rate"
        print(f"trained steps {result.start_step}->{result.end_step}: loss {summary['first_loss']:.4f} -> "
              f"{summary['last_loss']:.4f}, {rate}; checkpoints in {ckpt_dir}")
    return 0


def _finite_or_none(x):
    import math
    return x if x is not None and math.isfinite(x) else None


def _copy_tokenizer_files(source: Path, run_dir: Path) -> None:
    import shutil
    from jaxsys.hf import TOKENIZER_FILES
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (run_dir / name).exists():
            shutil.copy2(source / name, run_dir / name)


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty; give at least one token id")
    return ids


def cmd_generate(args) -> int:
    mesh = None
    if args.mesh is not None:
        import meshes
        topology = meshes.load_topology(args.mesh)
        meshes.ensure_host_device_count(topology.num_devices)
        mesh = meshes.build_mesh(topology)

    from jaxsys.generate import Generator, SamplingConfig
    from jaxsys.loading import load_model, resolve_config
    from jaxsys.model import ModelDef

    model_config, kind = resolve_config(args.model)
    if kind == "quantized" and (mesh is not None or args.weights):
        raise ValueError(f"{args.model} is already quantized; drop --weights and --mesh")
    shardings = None
    if mesh is not None:  # weights split over every device (FSDP layout); XLA gathers them per step
        from jaxsys.sharding import make_rules
        shardings = ModelDef(model_config).param_shardings(make_rules("fsdp", mesh))
    loaded = load_model(args.model, param_shardings=shardings)
    config = _with_dtype(loaded.config, args.dtype)
    if args.prompt is not None:
        if loaded.tokenizer is None:
            raise ValueError(f"model {args.model} has no tokenizer, so --prompt text cannot be encoded; "
                             "pass token ids with --prompt-ids 1,2,3")
        prompt_ids = loaded.tokenizer.encode(args.prompt, add_bos=True)
    else:
        prompt_ids = parse_prompt_ids(args.prompt_ids)
    if len(prompt_ids) + args.max_new_tokens > config.max_seq_len:
        print(f"jaxsys generate: warning: the prompt ({len(prompt_ids)} tokens) + --max-new-tokens "
              f"({args.max_new_tokens}) go past the model's max_seq_len {config.max_seq_len}, the positions it "
              "was made for; what it writes there may degrade", file=sys.stderr)
    model = ModelDef(config)
    params = loaded.params if loaded.params is not None else model.init(args.seed, shardings)
    if args.smooth_attention:  # before weight quantization: it folds into the float q/k weights
        if args.kv_bits not in (4, 8):
            raise ValueError("--smooth-attention prepares keys for quantized pages; add --kv-bits 4 or 8")
        params = _smooth_attention(config, params, loaded.tokenizer, quantized=kind == "quantized")
    if args.weights is not None:
        from jaxsys.quant.cli import quantize_for_generate
        params = quantize_for_generate(loaded.config, params, args.weights, method=args.weights_method,
                                       tokenizer=loaded.tokenizer)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    eos_ids = tuple(getattr(loaded.tokenizer, "eos_ids", ()) or config.eos_ids)
    extra = {}
    paged = args.kv_bits is not None or args.kv_offload != "none" or args.device_kv_budget is not None
    if args.speculative == "none":
        if args.draft is not None:
            raise ValueError("--draft needs --speculative draft or triforce")
        generator = Generator(model, params, max_len=len(prompt_ids) + args.max_new_tokens)
        cache = _kv_cache(args, config, generator.max_len) if paged else None
        out = generator.generate(prompt_ids, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                 eos_ids=eos_ids, ignore_eos=args.ignore_eos, cache=cache)
        if paged:
            extra = _kv_report(generator.last_cache, args)
    elif paged:
        raise ValueError("--speculative runs on dense caches (rejected drafts roll back by position); "
                         "drop the --kv-* options or --speculative")
    else:
        out, extra = _generate_speculative(args, model, params, prompt_ids, sampling, eos_ids)
    text = loaded.tokenizer.decode(out.token_ids) if loaded.tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": text, "decode_tok_per_s": out.decode_tok_per_s,
                          "prefill_s": out.prefill_s, "stopped_by": out.stopped_by,
                          "prompt_tokens": len(prompt_ids), **extra}, allow_nan=False))
    else:
        print(text if text is not None else ",".join(map(str, out.token_ids)))
        rate = f"{out.decode_tok_per_s:.1f} tok/s" if out.decode_tok_per_s else "one token"
        print(f"[{len(out.token_ids)} tokens, {rate}, stopped by {out.stopped_by}]", file=sys.stderr)
    return 0


def _smooth_attention(config, params, tokenizer, *, quantized: bool):
    from jaxsys.data import load_tokenizer
    from jaxsys.quant.calibration import calibration_tokens
    from jaxsys.quant.smooth_attention import smooth_attention

    if quantized:
        raise ValueError("--smooth-attention folds scales into float q/k weights; this checkpoint is already "
                         "quantized (smooth its float source, or use --weights on the float model)")
    tokens = calibration_tokens(tokenizer or load_tokenizer("byte"), batches=2)
    smoothed, _, alphas = smooth_attention(config, params, tokens)
    logging.getLogger("jaxsys").info("SmoothAttention alpha per layer: %s", alphas)
    return smoothed


def _kv_cache(args, config, max_len: int):
    from jaxsys.kvcache.offload import build_kv_cache, parse_bytes

    budget = parse_bytes(args.device_kv_budget) if args.device_kv_budget is not None else None
    if args.kv_offload != "none" and budget is None:
        raise ValueError(f"--kv-offload {args.kv_offload} moves pages beyond a device budget; "
                         "give --device-kv-budget SIZE (e.g. 64MiB)")
    disk = args.kv_disk_path
    if args.kv_offload == "disk" and disk is None:
        import tempfile
        disk = tempfile.mkdtemp(prefix="jaxsys-kv-")
    return build_kv_cache(config, 1, max_len, kv_bits=args.kv_bits or 16, offload=args.kv_offload,
                          device_budget_bytes=budget, mode=args.kv_attend.replace("-", "_"), disk_path=disk,
                          dtype=config.dtype)


def _kv_report(cache, args) -> dict:
    from jaxsys.kvcache.offload import device_kv_bytes, release, transfer_bytes
    from jaxsys.kvcache.paged import check_overflow

    if hasattr(cache[0], "overflow"):
        check_overflow(cache)
    report = {"kv": {"bits": args.kv_bits or 16, "offload": args.kv_offload, "device_bytes": device_kv_bytes(cache),
                     "transfer_bytes": transfer_bytes(cache)}}
    release(cache)
    return report


def parse_gamma(text: str, mode: str) -> tuple[int, int]:
    """--gamma 'G' or 'G,G_OUTER' -> (gamma, gamma_outer)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--gamma {text!r}: give integers, e.g. 4 or (triforce) 4,6") from None
    if len(values) > 2 or (len(values) == 2 and mode != "triforce"):
        raise ValueError(f"--gamma {text!r}: two values (inner,outer) are for --speculative triforce only")
    return values[0], values[1] if len(values) == 2 else 6


def _generate_speculative(args, model, params, prompt_ids, sampling, eos_ids):
    import numpy as np

    from jaxsys.decode import STOP_TOKEN
    from jaxsys.generate import Generation
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef
    from jaxsys.speculative import SpecConfig, SpeculativeDecoder

    gamma, gamma_outer = parse_gamma(args.gamma, args.speculative)
    config = SpecConfig(mode=args.speculative, gamma=gamma, gamma_outer=gamma_outer,
                        retrieval_budget=args.retrieval_budget, chunk_size=args.chunk_size,
                        draft_window=args.draft_window)
    draft, draft_params = None, None
    if args.speculative in ("draft", "triforce"):
        if args.draft is None:
            raise ValueError(f"--speculative {args.speculative} needs --draft PATH (a smaller model with the "
                             "same vocabulary)")
        loaded = load_model(args.draft)
        draft = ModelDef(_with_dtype(loaded.config, args.dtype))
        draft_params = loaded.params if loaded.params is not None else draft.init(args.seed + 1)
    elif args.draft is not None:
        raise ValueError(f"--speculative {args.speculative} uses no draft model; drop --draft")
    max_len = len(prompt_ids) + args.max_new_tokens
    if config.uses_retrieval:
        max_len = max(max_len, config.retrieval_budget)
    decoder = SpeculativeDecoder(model, params, draft, draft_params, config=config, max_len=max_len)
    out, metrics = decoder.generate([prompt_ids], max_new_tokens=args.max_new_tokens, sampling=sampling.params(1),
                                    stop_ids=() if args.ignore_eos else eos_ids, timed=True)
    n = int(out.lengths[0])
    stopped_by = "eos" if int(out.stopped_by[0]) == STOP_TOKEN else "length"
    # All tokens come out of the loop program: its rate is tokens over its wall time.
    rate = n / metrics["loop_s"] if metrics["loop_s"] > 0 else None
    gen = Generation(np.asarray(out.tokens[0, :n]).tolist(), metrics.pop("prefill_s"), rate, stopped_by)
    metrics.pop("loop_s")
    return gen, {"speculative": {"mode": args.speculative, "gamma": gamma,
                                 **({"gamma_outer": gamma_outer} if args.speculative == "triforce" else {}),
                                 **metrics}}


def cmd_export(args) -> int:
    from jaxsys.hf import export_hf
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef

    loaded = load_model(args.model)
    if loaded.source == "quantized":
        raise ValueError(f"{args.model} is a quantized checkpoint; export its float source instead")
    params = loaded.params if loaded.params is not None else ModelDef(loaded.config).init(0)
    tokenizer_dir = loaded.path if loaded.path is not None and (loaded.path / "tokenizer.json").exists() else None
    out = export_hf(args.out, loaded.config, params, tokenizer_dir=tokenizer_dir, overwrite=args.overwrite)
    print(f"wrote {out} (Hugging Face Llama: config.json + safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
