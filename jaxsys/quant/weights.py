"""Quantized linear layers of a model: the weight pytree the model runs, and round-to-nearest.

A `QuantizedWeight` wraps one packed matrix of `pallas_kernels.lowbit_matmul` together
with what the model needs to use it in place of its float weight: the format name (a
bit-plane matrix runs as ``int4`` with float activations or as ``int4a8`` with int8
ones, so the packed arrays alone do not say which) and the float weight's shape, so the
projections of attention, stored as ``[dim, heads, head_dim]`` and ``[heads, head_dim,
dim]``, are quantized as 2-D ``[in, out]`` matrices and reshaped back around the matmul.
`jaxsys.model.project` calls its `quantized_matmul` wherever the float path does
``x @ w``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from jaxsys.config import ModelConfig
from pallas_kernels.lowbit_matmul import (
    W8A8Weight, dequantize, get_format, lowbit_matmul, packed_nbytes, quantize_weight)

# (module, name, leading axes of the float weight that the input contracts with)
LINEAR_LAYERS: tuple[tuple[str, str, int], ...] = (
    ("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1), ("attn", "o", 2),
    ("mlp", "gate", 1), ("mlp", "up", 1), ("mlp", "down", 1),
)
PREFERRED_GROUP_SIZE = 128  # AWQ / QServe


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A float weight of shape `shape` (x contracts with its first `in_ndim` axes), quantized."""

    packed: Any  # the format's NamedTuple (W8A8Weight, W4A16Weight, W4A8Weight, BitplaneWeight)
    format: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    in_ndim: int = dataclasses.field(default=1, metadata={"static": True})

    @property
    def in_features(self) -> int:
        return math.prod(self.shape[:self.in_ndim])

    def quantized_matmul(self, x: jax.Array) -> jax.Array:
        """x [..., *shape[:in_ndim]] -> [..., *shape[in_ndim:]] in x.dtype."""
        lead = x.shape[:x.ndim - self.in_ndim]
        y = lowbit_matmul(x.reshape(*lead, self.in_features), self.packed, format=self.format)
        return y.reshape(*lead, *self.shape[self.in_ndim:])

    def dequantize(self) -> jax.Array:
        """The float32 weight, in its original shape, that the packed one stands for."""
        return dequantize(self.packed).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.packed)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QuantizedWeight)


def linear_paths(config: ModelConfig) -> Iterator[tuple[int, str, str, int]]:
    """(layer, module, name, in_ndim) of every linear layer of the transformer blocks."""
    for layer in range(config.n_layers):
        for module, name, in_ndim in LINEAR_LAYERS:
            yield layer, module, name, in_ndim


def in_features(config: ModelConfig) -> dict[str, int]:
    """The contraction size K of each linear layer kind."""
    heads = config.n_heads * config.resolved_head_dim
    return {"q": config.dim, "k": config.dim, "v": config.dim, "o": heads,
            "gate": config.dim, "up": config.dim, "down": config.ffn_dim}


def is_grouped(format: str) -> bool:
    """Whether the format takes a group size along K (all but per-channel w8a8)."""
    return get_format(format).weight_type is not W8A8Weight


def check_group_size(config: ModelConfig, format: str, group_size: int | None) -> None:
    """A clear error, before any work, when the group size does not fit every layer."""
    get_format(format)  # unknown format -> the list of formats
    if not is_grouped(format) or group_size is None:
        return
    if group_size <= 0:
        raise ValueError(f"group_size={group_size} must be positive (or None for per-channel scales)")
    by_k: dict[int, list[str]] = {}
    for name, k in in_features(config).items():
        by_k.setdefault(k, []).append(name)
    bad = {k: names for k, names in by_k.items() if k % group_size}
    if bad:
        where = " and ".join(f"K={k} ({', '.join(names)})" for k, names in sorted(bad.items()))
        raise ValueError(f"group_size={group_size} does not divide the input dimension {where}; pick a "
                         f"group size dividing {math.gcd(*by_k)}, or None for per-channel scales")


def default_group_size(config: ModelConfig, preferred: int = PREFERRED_GROUP_SIZE) -> int | None:
    """`preferred` (128) when it divides every K, else the largest power of two below it that does."""
    ks = in_features(config).values()
    size = preferred
    while size >= 8:
        if all(k % size == 0 for k in ks):
            return size
        size //= 2
    return None


def _format_options(format: str, group_size: int | None) -> dict:
    return {"group_size": group_size} if is_grouped(format) else {}


def quantize_linear(w: jax.Array, format: str, *, in_ndim: int = 1,
                    group_size: int | None = PREFERRED_GROUP_SIZE) -> QuantizedWeight:
    """Round-to-nearest quantization of one float weight (any shape; x contracts with `in_ndim` axes)."""
    shape = tuple(w.shape)
    k = math.prod(shape[:in_ndim])
    packed = quantize_weight(jnp.asarray(w, jnp.float32).reshape(k, -1), format,
                             **_format_options(format, group_size))
    return QuantizedWeight(packed, format, shape, in_ndim)


def quantize_params(config: ModelConfig, params: dict, format: str, *,
                    group_size: int | None = PREFERRED_GROUP_SIZE) -> dict:
    """Every linear layer of the blocks rounded to the nearest level of `format`; the rest as is.

    The embedding, the final norm, the block norms and lm_head keep their float values
    (see the `jaxsys.quant` docstring for why).
    """
    check_group_size(config, format, group_size)
    out = jax.tree.map(lambda x: x, params)  # new containers, same arrays
    for layer, module, name, in_ndim in linear_paths(config):
        w = params["layers"][layer][module][name]
        if is_quantized(w):
            raise ValueError(f"layers.{layer}.{module}.{name} is already quantized ({w.format}); "
                             "quantize the float checkpoint instead")
        out["layers"][layer][module][name] = quantize_linear(w, format, in_ndim=in_ndim, group_size=group_size)
    return out


def cast_embeddings(params: dict, dtype) -> dict:
    """The embedding and lm_head (the float matrices outside the blocks) stored in `dtype`.

    Norm weights keep their float32: they hold the activation-aware scales, which a
    rounding to bfloat16 would no longer cancel exactly.
    """
    out = dict(params)
    for name in ("embed", "lm_head"):
        if name in out:
            out[name] = jnp.asarray(out[name], dtype)
    return out


def quantized_format(params: dict) -> str | None:
    """The format of the first quantized layer of `params`, None for a float model."""
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            return leaf.format
    return None


def nbytes(params: dict) -> dict[str, int]:
    """Bytes of the quantized linear layers and of the float tensors, each with its bf16 baseline.

    `*_bf16` is what the same tensors take stored in bfloat16.
    """
    sizes = {"quantized": 0, "quantized_bf16": 0, "float": 0, "float_bf16": 0}
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            sizes["quantized"] += leaf.nbytes
            sizes["quantized_bf16"] += 2 * math.prod(leaf.shape)
        else:
            sizes["float"] += leaf.size * leaf.dtype.itemsize
            sizes["float_bf16"] += 2 * leaf.size
    sizes["total"] = sizes["quantized"] + sizes["float"]
    sizes["total_bf16"] = sizes["quantized_bf16"] + sizes["float_bf16"]
    return sizes
