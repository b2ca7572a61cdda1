"""Quantized checkpoints: one folder that `jaxsys generate --model DIR` loads as it is.

Layout::

    DIR/quantized.json       config, format, method, group size, sizes, and per quantized
                             layer its format, float shape and packed fields
    DIR/weights.safetensors  packed fields as "layers.0.attn.q.packed", "...scale", ...;
                             float tensors (embedding, norms, lm_head) under their own path
    DIR/tokenizer.json ...   tokenizer files of the source model, when it had any

safetensors stores the packed integer arrays (uint8 / int8) and their scales as they are,
so the folder's size is the packed size: about bits/16 of bf16 for the linear layers, plus
the scales and the tensors kept in float. There is deliberately no ``config.json``, so the
folder is never mistaken for a Hugging Face one. Everything is written into a temporary
sibling folder and renamed into place at the end; a non-empty target is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxsys.config import ModelConfig
from jaxsys.quant.weights import QuantizedWeight, is_quantized, nbytes
from pallas_kernels.lowbit_matmul import get_format

META_FILE = "quantized.json"
WEIGHTS_FILE = "weights.safetensors"
LAYOUT_VERSION = 1


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint could not be read or written; the message says what to do."""


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def save_quantized(folder: str | os.PathLike, config: ModelConfig, qparams: dict, *,
                   meta: dict[str, Any] | None = None, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `qparams` (from `quantize_model`) as a quantized checkpoint folder; returns its path."""
    folder = Path(folder)
    check_target(folder)
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]:
        name = _name(path)
        if is_quantized(leaf):
            fields = type(leaf.packed)._fields
            layers[name] = {"format": leaf.format, "shape": list(leaf.shape), "in_ndim": leaf.in_ndim,
                            "fields": list(fields)}
            for field in fields:
                tensors[f"{name}.{field}"] = np.asarray(jax.device_get(getattr(leaf.packed, field)))
        else:
            tensors[name] = np.asarray(jax.device_get(leaf))
    if not layers:
        raise QuantizedCheckpointError("these params hold no quantized layer; quantize them first "
                                       "(jaxsys.quant.quantize_model)")
    document = {"layout_version": LAYOUT_VERSION, "model": config.to_dict(), "layers": layers,
                "sizes": nbytes(qparams), **(meta or {})}

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.quantize-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "jaxsys-quantized"})
        if tokenizer_dir is not None:
            from jaxsys.hf import TOKENIZER_FILES
            for file in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file).is_file():
                    shutil.copy2(Path(tokenizer_dir) / file, staging / file)
        (staging / META_FILE).write_text(json.dumps(document, indent=2) + "\n")  # last: marks it complete
        check_target(folder)  # again: the folder may have filled while we wrote
        if folder.is_dir():
            folder.rmdir()
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; pick another --out")
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; pick a new --out folder (quantize never overwrites)")


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    try:
        document = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantizedCheckpointError(f"{folder / META_FILE} is missing or corrupt ({e}); "
                                       "quantize the model again with `jaxsys quantize`") from e
    if document.get("layout_version") != LAYOUT_VERSION:
        raise QuantizedCheckpointError(f"{folder} has quantized layout {document.get('layout_version')}, this "
                                       f"jaxsys reads {LAYOUT_VERSION}; quantize the model again")
    return document


def load_quantized_params(folder: str | os.PathLike) -> tuple[ModelConfig, dict, dict[str, Any]]:
    """(config, qparams, meta) of a quantized checkpoint folder, arrays on the default device."""
    from jaxsys.model import ModelDef

    folder = Path(folder)
    meta = read_meta(folder)
    config = ModelConfig.from_dict(meta["model"])
    layers = meta["layers"]
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as handle:
            names = set(handle.keys())

            def read(name: str) -> jax.Array:
                if name not in names:
                    raise QuantizedCheckpointError(f"{folder / WEIGHTS_FILE} lacks tensor {name}; the checkpoint "
                                                   "is incomplete, quantize the model again")
                return jnp.asarray(handle.get_tensor(name))

            def load(path, shape):
                name = _name(path)
                if name not in layers:
                    array = read(name)
                    if array.shape != shape.shape:
                        raise QuantizedCheckpointError(f"{name} has shape {list(array.shape)}, the config "
                                                       f"implies {list(shape.shape)}; the checkpoint is corrupt")
                    return array
                layer = layers[name]
                weight_type = get_format(layer["format"]).weight_type
                packed = weight_type(*(read(f"{name}.{field}") for field in weight_type._fields))
                if tuple(layer["shape"]) != shape.shape:
                    raise QuantizedCheckpointError(f"{name} stands for shape {layer['shape']}, the config "
                                                   f"implies {list(shape.shape)}; the checkpoint is corrupt")
                return QuantizedWeight(packed, layer["format"], tuple(layer["shape"]), layer["in_ndim"])

            qparams = jax.tree_util.tree_map_with_path(load, ModelDef(config).shapes)
    except (SafetensorError, OSError) as e:
        raise QuantizedCheckpointError(f"{folder / WEIGHTS_FILE} cannot be read ({e}); the file is missing, "
                                       "corrupt or truncated: quantize the model again") from e
    return config, qparams, meta


def load_quantized(path: str | os.PathLike):
    """(config, qparams, tokenizer) of a quantized checkpoint, for `Generator(ModelDef(config), qparams)`."""
    from jaxsys.loading import tokenizer_for

    config, qparams, _ = load_quantized_params(path)
    return config, qparams, tokenizer_for(config, Path(path))
