"""`jaxsys quantize`, and the hooks `jaxsys generate` uses for quantized weights.

`add_parser` needs no JAX. `jaxsys generate` calls `quantize_for_generate` for
`--weights FORMAT` and `load_quantized` for `--model DIR` when `is_quantized_checkpoint(DIR)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

METHODS = ("rtn", "awq-like")  # as jaxsys.quant.quantize.METHODS, without importing JAX
FORMAT_HELP = "w8a8, w4a16, w4a8, int1..int8 (float activations), int1a8..int8a8 (int8 activations)"
log = logging.getLogger("jaxsys.quant")


def group_size_arg(text: str) -> int | str | None:
    """--group-size: an integer, "auto" (128 where it divides every layer) or "none" (per-channel)."""
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--group-size takes an integer, 'auto' or 'none', got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `quantize` to the `jaxsys` sub-commands."""
    from jaxsys.loading import describe_model_arg
    p = subparsers.add_parser(
        "quantize", help="write a quantized checkpoint (low-bit linear layers) that generate loads",
        description="Quantizes every linear layer of the transformer blocks (embedding and lm_head stay "
                    "float) and writes a folder that `jaxsys generate --model DIR` loads directly.")
    p.add_argument("--model", required=True, help=describe_model_arg())
    p.add_argument("--format", required=True, help=f"weight format: {FORMAT_HELP}")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest; awq-like: activation-aware scales from calibration text "
                        "first (SmoothQuant for int8 activations, AWQ for weight-only); default rtn")
    p.add_argument("--calib-batches", type=int, default=4,
                   help="awq-like: calibration batches of 4 x 256 tokens of the embedded corpus (default 4)")
    p.add_argument("--group-size", type=group_size_arg, default="auto",
                   help="weights per scale group along K for grouped formats: an integer, 'none' "
                        "(per output channel) or 'auto' (128, or the largest power of two dividing every "
                        "layer; default)")
    p.add_argument("--float-dtype", default="bfloat16", choices=("bfloat16", "float32", "keep"),
                   help="storage of the embedding and lm_head, which stay unquantized (default bfloat16, "
                        "the serving dtype; keep: as the source stored them)")
    p.add_argument("--seed", type=int, default=0, help="weights of a bare preset (random; for trying it out)")
    p.add_argument("--json", action="store_true", help="print one line of JSON on stdout")
    return p


def run(args) -> int:
    from jaxsys.loading import load_model
    from jaxsys.model import ModelDef
    from jaxsys.quant.calibration import calibration_tokens
    from jaxsys.quant.checkpoint import check_target, is_quantized_checkpoint, save_quantized
    from jaxsys.quant.quantize import quantize_model, resolve_group_size
    from jaxsys.quant.weights import cast_embeddings, check_group_size, nbytes

    if is_quantized_checkpoint(args.model):
        raise ValueError(f"{args.model} is already quantized; quantize the float checkpoint it came from")
    out = Path(args.out)
    check_target(out)  # before any work
    loaded = load_model(args.model)
    config = loaded.config
    group_size = resolve_group_size(config, args.group_size)
    check_group_size(config, args.format, group_size)  # before loading calibration data
    params = loaded.params
    if params is None:
        log.warning("%s is a bare preset: quantizing random weights (seed %d)", args.model, args.seed)
        params = ModelDef(config).init(args.seed)
    tokens = None
    if args.method == "awq-like":
        tokens = calibration_tokens(loaded.tokenizer, batches=args.calib_batches)
    qparams = quantize_model(config, params, args.format, method=args.method, calib_tokens=tokens,
                             group_size=group_size)
    if args.float_dtype != "keep":
        qparams = cast_embeddings(qparams, args.float_dtype)
    tokenizer_dir = loaded.path if loaded.path is not None and loaded.path.is_dir() else None
    meta = {"format": args.format, "method": args.method, "group_size": group_size, "source": str(args.model),
            "float_dtype": args.float_dtype,
            "calib_batches": args.calib_batches if args.method == "awq-like" else 0}
    save_quantized(out, config, qparams, meta=meta, tokenizer_dir=tokenizer_dir)
    sizes = nbytes(qparams)
    file_bytes = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    summary = {"out": str(out), "format": args.format, "method": args.method, "group_size": group_size,
               "file_bytes": file_bytes, "bf16_bytes": sizes["total_bf16"],
               "ratio_vs_bf16": file_bytes / sizes["total_bf16"],
               "linear_bytes": sizes["quantized"], "linear_bf16_bytes": sizes["quantized_bf16"],
               "linear_ratio_vs_bf16": sizes["quantized"] / sizes["quantized_bf16"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out}: {args.format} ({args.method}, group size {group_size}), "
              f"{file_bytes / 2**20:.2f} MiB = {summary['ratio_vs_bf16']:.3f} of bf16 "
              f"({sizes['total_bf16'] / 2**20:.2f} MiB); linear layers {summary['linear_ratio_vs_bf16']:.3f} "
              "of bf16, embedding/norms/lm_head kept float")
    return 0


def quantize_for_generate(config, params, format: str, **options):
    """See `jaxsys.quant.quantize.quantize_for_generate`."""
    from jaxsys.quant.quantize import quantize_for_generate as quantize
    return quantize(config, params, format, **options)


def load_quantized(path):
    """(config, qparams, tokenizer) of a `jaxsys quantize` folder."""
    from jaxsys.quant.checkpoint import load_quantized as load
    return load(path)


def is_quantized_checkpoint(path) -> bool:
    """A folder `jaxsys quantize` wrote (checked without importing JAX)."""
    return (Path(path) / "quantized.json").is_file()


def quantized_config(path):
    """The ModelConfig of a quantized checkpoint, read without loading weights or importing JAX."""
    from jaxsys.config import ModelConfig
    try:
        return ModelConfig.from_dict(json.loads((Path(path) / "quantized.json").read_text())["model"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{Path(path) / 'quantized.json'} is missing or corrupt ({e}); "
                         "quantize the model again with `jaxsys quantize`") from e


def main(argv=None) -> int:
    """`python -m jaxsys.quant.cli ...`, until `jaxsys quantize` is wired into jaxsys.cli."""
    parser = argparse.ArgumentParser(prog="jaxsys")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"jaxsys quantize: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
