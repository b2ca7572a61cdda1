"""Calibration: what the inputs of every linear layer look like on a small batch of text.

One float forward pass over the calibration tokens, run eagerly, with each input site's
weight swapped for a probe that records its input before doing the float matmul. Four
sites per block cover all seven linear layers: q/k/v share the attention input, gate/up
the MLP input, and o and down have their own. Per site and input channel j the pass
keeps max|X_j| (SmoothQuant's statistic), mean|X_j| (AWQ's) and a random sample of
token rows on which the scale search measures the quantized layers' output error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import ModelConfig

# site -> (module, the weight probed, leading axes of that weight the input contracts with)
SITES: dict[str, tuple[str, str, int]] = {
    "attn_in": ("attn", "q", 1), "o_in": ("attn", "o", 2),
    "mlp_in": ("mlp", "gate", 1), "down_in": ("mlp", "down", 1),
}
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 4


@dataclasses.dataclass(frozen=True)
class InputStats:
    max_abs: np.ndarray  # float32 [K]
    mean_abs: np.ndarray  # float32 [K]
    sample: np.ndarray  # float32 [rows, K], token rows for the error search


class _Accumulator:
    def __init__(self, rows_per_batch: int, rng: np.random.Generator):
        self.rows_per_batch, self.rng = rows_per_batch, rng
        self.max_abs = self.sum_abs = None
        self.count = 0
        self.rows: list[np.ndarray] = []

    def add(self, x: np.ndarray) -> None:  # x: [tokens, K]
        a = np.abs(x)
        self.max_abs = a.max(0) if self.max_abs is None else np.maximum(self.max_abs, a.max(0))
        self.sum_abs = a.sum(0, dtype=np.float64) + (0 if self.sum_abs is None else self.sum_abs)
        self.count += x.shape[0]
        keep = self.rng.choice(x.shape[0], min(self.rows_per_batch, x.shape[0]), replace=False)
        self.rows.append(x[np.sort(keep)])

    def stats(self) -> InputStats:
        return InputStats(self.max_abs, (self.sum_abs / self.count).astype(np.float32),
                          np.concatenate(self.rows))


@dataclasses.dataclass(frozen=True)
class _Probe:
    """Stands in for a float weight: records the input, then multiplies as the model would."""

    weight: jax.Array
    in_ndim: int
    record: Callable[[np.ndarray], None]

    def quantized_matmul(self, x: jax.Array) -> jax.Array:
        k = math.prod(self.weight.shape[:self.in_ndim])
        lead = x.shape[:x.ndim - self.in_ndim]
        x2 = x.reshape(-1, k)
        self.record(np.asarray(x2, np.float32))
        w = self.weight.reshape(k, -1).astype(x.dtype)
        return (x2 @ w).reshape(*lead, *self.weight.shape[self.in_ndim:])


def collect_input_stats(config: ModelConfig, params: dict, tokens: np.ndarray, *,
                        batch_size: int = DEFAULT_BATCH_SIZE, sample_rows: int = 2048,
                        seed: int = 0) -> list[dict[str, InputStats]]:
    """Per block, the `InputStats` of each site (`SITES`) over `tokens` [sequences, seq_len]."""
    from jaxsys.model import ModelDef  # jaxsys.model recognises quantized weights; no import cycle

    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"calibration tokens must be a non-empty [sequences, seq_len] array, got {tokens.shape}")
    # Eager float32 without remat: the probes' Python side effects need concrete values.
    model = ModelDef(dataclasses.replace(config, dtype="float32", remat=False))
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    rng = np.random.default_rng(seed)
    accumulators = [{site: _Accumulator(math.ceil(sample_rows / len(batches)), rng) for site in SITES}
                    for _ in range(config.n_layers)]
    probed = jax.tree.map(lambda x: x, params)
    for layer in range(config.n_layers):
        for site, (module, name, in_ndim) in SITES.items():
            weight = jnp.asarray(params["layers"][layer][module][name], jnp.float32)
            probed["layers"][layer][module][name] = _Probe(weight, in_ndim, accumulators[layer][site].add)
    for batch in batches:
        model.apply(probed, jnp.asarray(batch))
    return [{site: acc.stats() for site, acc in layer.items()} for layer in accumulators]


def calibration_tokens(tokenizer, *, batches: int, batch_size: int = DEFAULT_BATCH_SIZE,
                       seq_len: int = DEFAULT_SEQ_LEN, data: str = "corpus", seed: int = 1,
                       num_problems: int = 2000) -> np.ndarray:
    """`batches * batch_size` windows of `seq_len` tokens from `data` (the embedded corpus by default)."""
    from jaxsys.data import TokenDataset, load_documents

    if tokenizer is None:
        raise ValueError("activation-aware quantization needs calibration text, and this model has no "
                         "tokenizer; use --method rtn, or a model folder with tokenizer.json")
    if batches < 1:
        raise ValueError(f"calibration needs at least one batch, got {batches}")
    docs = load_documents(data, seed=seed, num_problems=num_problems) if data == "corpus" else load_documents(data)
    dataset = TokenDataset.from_documents(docs, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed)
    return np.concatenate([dataset.batch(step)[:, :seq_len] for step in range(batches)])
