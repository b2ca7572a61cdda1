"""Model configuration: one frozen dataclass and named presets as small deltas.

The shapes follow the Llama family as Hugging Face `LlamaConfig` describes it
(RMSNorm, RoPE with an optional Llama-3 frequency scaling, grouped-query
attention, SwiGLU MLP, tied or untied embeddings), so a Hugging Face folder maps
onto exactly one `ModelConfig` and back (`jaxsys.hf`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from typing import Any

# Presets `tiny` and `small` are trained with the byte tokenizer (ids 0..258);
# 384 leaves room for it and divides evenly over 8 devices and 128-wide tiles.
BYTE_VOCAB_PADDED = 384


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (`rope_type: "llama3"` in Hugging Face)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: bool = False  # recompute each block in the backward pass
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    tokenizer: str | None = None  # "byte", or None (token ids only)

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"dim={self.dim} must divide by n_heads={self.n_heads} (or set head_dim)")
        if self.resolved_head_dim % 2:
            problems.append(f"head_dim={self.resolved_head_dim} must be even for RoPE")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // max(self.n_heads, 1)

    @property
    def num_params(self) -> int:
        d, f, hd = self.dim, self.ffn_dim, self.resolved_head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM accounting): 6 x matmul params + 12 x layers x seq x heads x head_dim.

        Matmul parameters exclude the embedding lookup but include the output head.
        """
        norms = self.dim * (2 * self.n_layers + 1)
        lookup = 0 if self.tie_embeddings else self.vocab_size * self.dim  # tied: the table is the head
        matmul_params = self.num_params - norms - lookup
        return 6 * matmul_params + 12 * self.n_layers * seq_len * self.n_heads * self.resolved_head_dim

    def same_weights(self, other: "ModelConfig") -> bool:
        """Equal up to runtime choices (compute dtype, remat): the same checkpoint fits both."""
        runtime = {"dtype": "float32", "remat": False}
        return replace(self, **runtime) == replace(other, **runtime)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        if "eos_ids" in data:
            data["eos_ids"] = tuple(data["eos_ids"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


TINY = ModelConfig(
    vocab_size=BYTE_VOCAB_PADDED, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
    max_seq_len=256, bos_id=257, eos_ids=(258,), tokenizer="byte",
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    # ~12.6M parameters: the CPU experiments' model.
    "small": replace(TINY, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=1024),
    # Published shapes, for planning and communication accounting.
    "llama3-8b": ModelConfig(
        vocab_size=128_256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14_336,
        rope_theta=500_000.0, rope_scaling=RopeScaling(), max_seq_len=8192,
        bos_id=128_000, eos_ids=(128_001, 128_009), dtype="bfloat16",
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32_000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11_008,
        max_seq_len=4096, bos_id=1, eos_ids=(2,), dtype="bfloat16",
    ),
    # The Frontier paper's 20B GPT shape (GPT-NeoX-20B dims) in Llama form.
    "gpt-20b": ModelConfig(
        vocab_size=50_432, dim=6144, n_layers=44, n_heads=64, n_kv_heads=64, ffn_dim=16_384,
        max_seq_len=2048, dtype="bfloat16",
    ),
    # Megatron-LM's 39.1B GPT shape (48 layers, hidden 8192, 64 heads), the size of Holmes's
    # 4-node TP 8 x PP 2 example, in Llama form: SwiGLU at 8/3 x hidden keeps the MLP's parameters.
    "gpt-39b": ModelConfig(
        vocab_size=51_200, dim=8192, n_layers=48, n_heads=64, n_kv_heads=64, ffn_dim=21_888,
        max_seq_len=2048, dtype="bfloat16",
    ),
}


def default_compute_dtype(backend: str) -> str:
    """The dtype policy: bfloat16 matmuls on accelerators, float32 on CPU (and in tests)."""
    return "float32" if backend == "cpu" else "bfloat16"


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}, "
                         "or pass a checkpoint / Hugging Face folder path") from None
