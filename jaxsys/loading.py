"""`--model` resolution: a preset name, a jaxsys checkpoint, or a Hugging Face folder.

Every command takes the same `--model` argument; this module turns it into a
config, parameters (None for a preset: the caller initializes them) and a
tokenizer (None when the model has none, so text prompts are refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxsys.config import PRESETS, ModelConfig, get_preset


@dataclass
class LoadedModel:
    config: ModelConfig
    params: Any | None  # pure-dict pytree, or None for a bare preset
    tokenizer: Any | None  # jaxsys.data.Tokenizer, or None (token ids only)
    source: str  # "preset", "checkpoint", "huggingface" or "quantized"
    path: Path | None = None
    step: int | None = None


def describe_model_arg() -> str:
    return f"a preset ({', '.join(PRESETS)}), a jaxsys checkpoint folder, or a Hugging Face folder"


def resolve_config(spec: str) -> tuple[ModelConfig, str]:
    """Config and kind of a `--model` value without loading any weights."""
    path = Path(spec)
    if spec in PRESETS and not path.exists():
        return get_preset(spec), "preset"
    if not path.exists():
        raise ValueError(f"--model {spec!r} is neither a preset nor an existing path; give "
                         + describe_model_arg())
    from jaxsys.quant.cli import is_quantized_checkpoint, quantized_config
    if is_quantized_checkpoint(path):
        return quantized_config(path), "quantized"
    from jaxsys import checkpoint, hf
    if hf.is_hf_folder(path):
        return hf.load_hf_config(path), "huggingface"
    root, step = checkpoint.resolve(path)
    return ModelConfig.from_dict(checkpoint.read_meta(root / str(step))["model"]), "checkpoint"


def tokenizer_for(config: ModelConfig, folder: Path | None = None):
    from jaxsys.data import load_tokenizer
    if folder is not None and (folder / "tokenizer.json").exists():
        return load_tokenizer(str(folder))
    return load_tokenizer(config.tokenizer) if config.tokenizer else None


def load_model(spec: str, *, param_shardings=None) -> LoadedModel:
    """Loads a `--model` value; params land on `param_shardings` when given."""
    config, kind = resolve_config(spec)
    if kind == "preset":
        return LoadedModel(config, None, tokenizer_for(config), kind)
    path = Path(spec)
    if kind == "quantized":
        if param_shardings is not None:
            raise ValueError(f"{spec} is a quantized checkpoint; it loads onto one device (drop --mesh)")
        from jaxsys.quant.cli import load_quantized
        config, params, tokenizer = load_quantized(path)
        return LoadedModel(config, params, tokenizer, kind, path)
    if kind == "huggingface":
        import jax
        from jaxsys import hf
        params = hf.load_hf_params(path, config)
        if param_shardings is not None:
            params = jax.device_put(params, param_shardings)
        return LoadedModel(config, params, tokenizer_for(config, path), kind, path)

    from jaxsys.checkpoint import Checkpointer, abstract_tree
    from jaxsys.model import ModelDef
    from jaxsys import checkpoint
    root, step = checkpoint.resolve(path)
    model = ModelDef(config)
    if param_shardings is None:
        import jax
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # addressable in every process
        param_shardings = jax.tree.map(lambda _: device, model.shapes)
    ckpt = Checkpointer(root, read_only=True)
    try:
        params, _ = ckpt.restore(step, abstract_tree(model.shapes, param_shardings))
    finally:
        ckpt.close()
    return LoadedModel(config, params, tokenizer_for(config, root), kind, root, step)

