"""Hugging Face Llama interchange: `config.json` + safetensors <-> `ModelConfig` + params.

Maps a `LlamaForCausalLM` folder (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) onto the pure params dict of `ModelDef`, and
writes such a folder back, so that `transformers` loads it as the same model
(tests compare logits at 1e-4 and greedy tokens). What differs from Hugging Face:

- Linear weights: HF stores `[out, in]`; jaxsys stores `[in, out]`, with the
  attention projections split per head (`q/k/v: [dim, heads, head_dim]`,
  `o: [heads, head_dim, dim]`) and `lm_head: [dim, vocab]`. jaxsys RoPE is
  already the rotate-half layout HF uses, so q/k need no permutation.
- `config.json` is read in both the transformers-4 layout (`rope_theta`,
  `rope_scaling`) and the transformers-5 layout (`rope_parameters`), with
  transformers' own precedence and defaults. Exports write the transformers-5
  layout and mirror it in the legacy keys (`rope_theta`, `rope_scaling`,
  `torch_dtype`), so transformers 4 and 5 and other readers see one model.
- Dtypes: the checkpoint's `dtype` becomes `param_dtype` (a bf16 checkpoint is
  kept in bf16, losslessly and at half the memory of float32); the compute dtype
  is always float32 (`replace(config, dtype="bfloat16")` for accelerators). Pass
  `param_dtype="float32"` to `load_hf` to upcast, e.g. before training.
- Only what jaxsys computes is accepted: model_type llama, no biases, SiLU,
  RoPE "default" or "llama3". Anything else is a `ValueError` naming the field,
  never a silently different model. Stale `rotary_emb.inv_freq` buffers (old
  transformers) are ignored, since jaxsys derives the frequencies from config;
  a tied model's redundant `lm_head.weight` is accepted only if it equals the
  embeddings. `jaxsys_tokenizer` in config.json carries `ModelConfig.tokenizer`
  (e.g. "byte"), which Hugging Face has no name for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxsys.config import ModelConfig, RopeScaling
from jaxsys.model import ModelDef

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")
DTYPES = ("float32", "bfloat16", "float16")  # checkpoint dtypes jaxsys keeps as param_dtype
_SAFETENSORS_DTYPES = {"F32", "BF16", "F16", "F64"}
_IGNORED_SUFFIX = ".rotary_emb.inv_freq"


class HFFormatError(ValueError):
    """A Hugging Face folder (or a request to write one) that jaxsys cannot map exactly."""


# ---------------------------------------------------------------------------- config


def from_hf_config(hf: dict[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """A `ModelConfig` from the dict of a Llama `config.json` (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise HFFormatError(f"{source}: model_type={model_type!r} is not supported; jaxsys loads Llama "
                            "checkpoints (model_type 'llama', LlamaForCausalLM)")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise HFFormatError(f"{source}: {name}={hf[name]!r} is not supported; jaxsys Llama has no biases")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise HFFormatError(f"{source}: hidden_act={act!r} is not supported; jaxsys Llama uses silu (SwiGLU)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [name for name in required if hf.get(name) is None]
    if missing:
        raise HFFormatError(f"{source}: missing {', '.join(missing)}; is this a Llama config.json?")

    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and dim % n_heads == 0 and head_dim == dim // n_heads:
        head_dim = None  # the implied value; keeps configs canonical
    rope_theta, rope_scaling = _read_rope(hf, source)
    eos = hf.get("eos_token_id", 2)  # transformers' LlamaConfig defaults: bos 1, eos 2
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
            head_dim=head_dim, norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype="float32",
            param_dtype=_read_dtype(hf, source), bos_id=hf.get("bos_token_id", 1), eos_ids=eos_ids,
            tokenizer=hf.get("jaxsys_tokenizer"),
        )
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from None


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, Llama-3 scaling or None), with transformers 5's precedence rules."""
    # transformers: a legacy `rope_scaling` wins over `rope_parameters`; top-level `rope_theta`
    # fills in a theta the dict lacks; 10000 when neither has one.
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise HFFormatError(f"{source}: {field}={params!r} is not supported; jaxsys needs one flat RoPE setting "
                            "for all layers")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFFormatError(f"{source}: partial_rotary_factor={partial!r} is not supported; jaxsys rotates the "
                            "whole head_dim")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise HFFormatError(f"{source}: {field}.rope_type={rope_type!r} is not supported; jaxsys implements "
                            "RoPE types 'default' and 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise HFFormatError(f"{source}: {field} of rope_type 'llama3' lacks {', '.join(missing)}")
    # transformers: a top-level original_max_position_embeddings wins, then the dict's, then
    # max_position_embeddings.
    original = hf.get("original_max_position_embeddings",
                      params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048)))
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(original))


def _read_dtype(hf: dict[str, Any], source: str) -> str:
    field = "dtype" if hf.get("dtype") is not None else "torch_dtype"
    value = hf.get(field)
    if value is None or value == "auto":
        return "float32"
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise HFFormatError(f"{source}: {field}={value!r} is not supported; jaxsys keeps parameters in one of "
                            f"{', '.join(DTYPES)}")
    return name


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict that transformers (4 and 5) loads as the same `LlamaForCausalLM`."""
    if config.param_dtype not in DTYPES:
        raise HFFormatError(f"param_dtype={config.param_dtype!r} cannot be exported; use one of {', '.join(DTYPES)}")
    s = config.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    eos = list(config.eos_ids)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": config.bos_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "pad_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta} if scaling is None
        else {**scaling, "rope_theta": config.rope_theta},
        "dtype": config.param_dtype,
        # The transformers-4 names of the same settings, for older readers.
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "torch_dtype": config.param_dtype,
    }
    if config.tokenizer is not None:
        hf["jaxsys_tokenizer"] = config.tokenizer  # HF has no byte tokenizer; lets load_hf restore it
    return hf


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face Llama folder (its `config.json`)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}; a Hugging Face model folder has config.json "
                                "next to its *.safetensors")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from None
    return from_hf_config(hf, source=str(path))


# ---------------------------------------------------------------------------- tensor names and layouts


@dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the params leaf it becomes."""

    hf_name: str
    path: tuple  # keys into the params dict
    hf_shape: tuple[int, ...]
    linear: bool  # HF [out, in] <-> jaxsys [in..., out...]: a transpose and a reshape


def _tensor_table(config: ModelConfig) -> list[_Tensor]:
    d, f, v, hd = config.dim, config.ffn_dim, config.vocab_size, config.resolved_head_dim
    q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
    table = [_Tensor("model.embed_tokens.weight", ("embed",), (v, d), False)]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        table += [
            _Tensor(p + "self_attn.q_proj.weight", ("layers", i, "attn", "q"), (q_out, d), True),
            _Tensor(p + "self_attn.k_proj.weight", ("layers", i, "attn", "k"), (kv_out, d), True),
            _Tensor(p + "self_attn.v_proj.weight", ("layers", i, "attn", "v"), (kv_out, d), True),
            _Tensor(p + "self_attn.o_proj.weight", ("layers", i, "attn", "o"), (d, q_out), True),
            _Tensor(p + "mlp.gate_proj.weight", ("layers", i, "mlp", "gate"), (f, d), True),
            _Tensor(p + "mlp.up_proj.weight", ("layers", i, "mlp", "up"), (f, d), True),
            _Tensor(p + "mlp.down_proj.weight", ("layers", i, "mlp", "down"), (d, f), True),
            _Tensor(p + "input_layernorm.weight", ("layers", i, "attn_norm", "weight"), (d,), False),
            _Tensor(p + "post_attention_layernorm.weight", ("layers", i, "mlp_norm", "weight"), (d,), False),
        ]
    table.append(_Tensor("model.norm.weight", ("norm", "weight"), (d,), False))
    if not config.tie_embeddings:
        table.append(_Tensor("lm_head.weight", ("lm_head",), (v, d), True))
    return table


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _model_shapes(config: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    """params path -> jaxsys shape, checked against the table so a model change cannot go unnoticed."""
    leaves = jax.tree_util.tree_flatten_with_path(ModelDef(config).shapes)[0]
    shapes = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}
    table_paths = {t.path for t in _tensor_table(config)}
    if set(shapes) != table_paths:
        unmapped = sorted(map(str, set(shapes) ^ table_paths))
        raise RuntimeError(f"jaxsys.hf is out of date with jaxsys.model: params {unmapped} have no Hugging Face name")
    return shapes


def _to_jaxsys(hf_array: np.ndarray, t: _Tensor, shape: tuple[int, ...]) -> np.ndarray:
    # [out, in] -> [in, out] -> e.g. [dim, heads, head_dim] for q.
    return np.ascontiguousarray(hf_array.T).reshape(shape) if t.linear else hf_array


def _to_hf(array: np.ndarray, t: _Tensor) -> np.ndarray:
    # e.g. o [heads, head_dim, dim] -> [heads * head_dim, dim] -> [dim, heads * head_dim].
    return np.ascontiguousarray(array.reshape(t.hf_shape[::-1]).T) if t.linear else np.ascontiguousarray(array)


# ---------------------------------------------------------------------------- loading


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read (transformers' order: single file, then index) and the index's map."""
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.is_file():
        return [single], None
    if not index.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {folder}; jaxsys reads Hugging Face weights "
                                "in safetensors format (convert .bin checkpoints with transformers first)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFFormatError(f"{index} is not a safetensors index (expected a JSON 'weight_map'): {e!r}") from None
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {', '.join(missing[:5])}")
    return files, weight_map


def _corrupt(path: Path, error: Exception) -> HFFormatError:
    return HFFormatError(f"{path}: cannot read safetensors ({error}); the file is corrupt or truncated, "
                         "download or export it again")


def load_hf_params(folder: str | os.PathLike, config: ModelConfig, *, shardings=None) -> dict:
    """The params dict (structure of `ModelDef(config).shapes`) from a folder's safetensors.

    Names, shapes and dtypes of every tensor are checked from the file headers
    before any data is read, and nothing outside the returned dict is touched,
    so a mismatch raises without leaving partial state. Tensors are converted
    one at a time to `config.param_dtype` and placed with `shardings` (a matching
    pytree of shardings, e.g. `ModelDef(config).param_shardings(rules)`) or on
    the default device.
    """
    folder = Path(folder)
    shapes = _model_shapes(config)
    files, weight_map = _weight_files(folder)
    table = _tensor_table(config)
    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}  # tensor name -> its open file
        file_of: dict[str, Path] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="numpy"))
                names = list(handle.keys())
            except SafetensorError as e:
                raise _corrupt(path, e) from None
            for name in names:
                if name in handles:
                    raise HFFormatError(f"tensor {name} is in both {file_of[name].name} and {path.name}")
                handles[name], file_of[name] = handle, path
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if n not in file_of or file_of[n].name != f]
            if wrong:
                raise HFFormatError(f"{folder / INDEX_FILE} does not match its shards for "
                                    f"{', '.join(wrong[:5])}; export or download the checkpoint again")
        _check_names(folder, config, table, set(handles))
        for t in table:
            header = handles[t.hf_name].get_slice(t.hf_name)
            shape, dtype = tuple(header.get_shape()), header.get_dtype()
            if shape != t.hf_shape:
                raise HFFormatError(
                    f"{folder}: config.json and the weights disagree: tensor {t.hf_name} has shape {list(shape)}, "
                    f"config.json implies {list(t.hf_shape)}; fix config.json or use the weights it came with")
            if dtype not in _SAFETENSORS_DTYPES:
                raise HFFormatError(f"{file_of[t.hf_name]}: tensor {t.hf_name} has dtype {dtype}; jaxsys loads "
                                    f"float weights ({', '.join(sorted(_SAFETENSORS_DTYPES))})")

        params: dict = {}
        target = jnp.dtype(config.param_dtype)
        for t in table:
            array = _read(handles, file_of, t.hf_name)
            array = _to_jaxsys(array, t, shapes[t.path]).astype(target)
            sharding = None if shardings is None else _get(shardings, t.path)
            _set(params, t.path, jax.device_put(array, sharding))
        if config.tie_embeddings and "lm_head.weight" in handles:
            # Some exports write a copy of the tied head; accept it only if it is that copy.
            head = _read(handles, file_of, "lm_head.weight").astype(target)
            if not np.array_equal(head, np.asarray(params["embed"])):
                raise HFFormatError(f"{folder}: config.json says tie_word_embeddings=true but lm_head.weight differs "
                                    "from model.embed_tokens.weight; set tie_word_embeddings to false")
    return params


def _check_names(folder: Path, config: ModelConfig, table: list[_Tensor], names: set[str]) -> None:
    expected = {t.hf_name for t in table}
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(expected - names)
    extra = sorted(n for n in names - expected - optional if not n.endswith(_IGNORED_SUFFIX))
    if missing:
        hint = ("; if the model ties lm_head to the embeddings, set tie_word_embeddings: true in config.json"
                if missing == ["lm_head.weight"] else "")
        raise HFFormatError(f"{folder}: {len(missing)} tensors that config.json implies are missing from the weights, "
                            f"e.g. {', '.join(missing[:4])}{hint}")
    if extra:
        raise HFFormatError(f"{folder}: {len(extra)} tensors jaxsys Llama has no place for (biases? another "
                            f"architecture? more layers than config.json says?), e.g. {', '.join(extra[:4])}")


def _read(handles: dict, file_of: dict, name: str) -> np.ndarray:
    try:
        return handles[name].get_tensor(name)
    except SafetensorError as e:
        raise _corrupt(file_of[name], e) from None


def load_hf(folder: str | os.PathLike, *, param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) of a Hugging Face Llama folder; `param_dtype` overrides the checkpoint's dtype."""
    config = load_hf_config(folder)
    if param_dtype is not None:
        config = replace(config, param_dtype=param_dtype)
    return config, load_hf_params(folder, config)


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with config.json and safetensors weights (what `--model PATH` accepts as HF)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


# ---------------------------------------------------------------------------- export


def export_hf(folder: str | os.PathLike, config: ModelConfig, params: dict, *,
              tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama folder that `LlamaForCausalLM.from_pretrained` loads as this model.

    Tensors are written in `config.param_dtype`, as `model.safetensors` or, past
    `max_shard_bytes`, as shards with `model.safetensors.index.json`; tokenizer
    files from `tokenizer_dir` are copied. Everything is written into a
    temporary sibling folder that is renamed into place at the end, so a failure
    (or a full disk) never leaves a half-written export; an existing non-empty
    `folder` is refused unless `overwrite=True`.
    """
    folder = Path(folder)
    _check_target(folder, overwrite)
    hf_config = to_hf_config(config)
    shapes, table = _model_shapes(config), _tensor_table(config)
    for t in table:
        where = "/".join(map(str, t.path))
        try:
            shape = tuple(np.shape(_get(params, t.path)))
        except (KeyError, TypeError):
            raise HFFormatError(f"params lack {where}; pass the params of ModelDef(config)") from None
        if shape != shapes[t.path]:
            raise HFFormatError(f"params {where} has shape {list(shape)}, the config implies "
                                f"{list(shapes[t.path])}; pass the config the params were made with")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_weights(staging, config, params, table, max_shard_bytes)
        for path in tokenizer_files:
            shutil.copy2(path, staging / path.name)
        _move_into_place(staging, folder, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; pick another export path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; pick a new folder, or replace it (`jaxsys export "
                              "--overwrite`, `export_hf(..., overwrite=True)`)")


def _tokenizer_files(tokenizer_dir) -> list[Path]:
    tokenizer_dir = Path(tokenizer_dir)
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...) in {tokenizer_dir}")
    return files


def _write_weights(staging: Path, config: ModelConfig, params: dict, table: list[_Tensor],
                   max_shard_bytes: int) -> None:
    dtype = jnp.dtype(config.param_dtype)
    itemsize = dtype.itemsize
    # Greedy shards in table order (a tensor larger than the limit gets a shard of its own).
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in table:
        nbytes = math.prod(t.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        # One shard on the host at a time; device_get gathers sharded arrays.
        tensors = {t.hf_name: _to_hf(np.asarray(jax.device_get(_get(params, t.path))).astype(dtype), t)
                   for t in shard}
        save_file(tensors, str(staging / name), metadata={"format": "pt"})
        weight_map.update({t.hf_name: name for t in shard})
        total += sum(a.nbytes for a in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _move_into_place(staging: Path, folder: Path, overwrite: bool) -> None:
    """Rename the finished export onto `folder`; an old export is removed only after the new one is in place."""
    _check_target(folder, overwrite)  # again: the folder may have filled while we wrote
    old = None
    if folder.is_dir():
        if any(folder.iterdir()):
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
        else:
            folder.rmdir()
    try:
        staging.rename(folder)
    except BaseException:
        if old is not None:
            old.rename(folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
