"""SmoothAttention: per-channel key scales folded into the q/k projections before KV quantization.

QServe (Lin et al., "QServe: W4A8KV4 Quantization and System Co-design", 2024): trained
models' keys have a few outlier channels, which per-token int4 scales cannot represent
without crushing every other channel of the token. Dividing key channel c by
``lambda_c = max|K_c| ** alpha`` and multiplying the query's channel c by the same
number leaves every logit ``q . k`` unchanged and flattens the keys (values have no such
outliers and are left alone). For the division to commute with RoPE, lambda is tied
across each rotate-half pair (channels c and c + head_dim / 2, which RoPE mixes); with
grouped-query attention all query heads of a group take their KV head's lambda.

The scales fold offline into the projection weights (``params["layers"][i]["attn"]["k"]``
``[dim, kv_heads, head_dim]`` divided by lambda, ``"q"`` ``[dim, heads, head_dim]``
multiplied by it), so the float model computes the same function and decoding needs no
change. Calibration runs the float model on a few batches of text, capturing each
layer's post-RoPE keys through the KV-cache protocol of `jaxsys.model` (a cache whose
`attend` records q, k, v). QServe fixes alpha = 0.5; here `alpha=None` picks it per
layer from a small grid by the error of int4-KV attention on the calibration batches
(alpha = 0, no smoothing, is a candidate, so the result is never worse there).
Apply it before weight quantization: folding changes the float weights.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import ModelConfig
from jaxsys.kvcache.paged import causal_attention
from jaxsys.model import ModelDef
from pallas_kernels.quant_attention import dequantize_kv, quantize_kv

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_ALPHA = 0.5


@partial(jax.tree_util.register_dataclass, data_fields=["q", "k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class CaptureCache:
    """A cache that records one forward's post-RoPE q [B, T, H, hd], k, v [B, T, kvH, hd] and attends exactly."""

    q: jax.Array | None = None
    k: jax.Array | None = None
    v: jax.Array | None = None

    def attend(self, q, k, v, positions):
        out, _ = causal_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), positions, positions)
        return out, CaptureCache(q, k, v)


def capture_attention_inputs(config: ModelConfig, params: dict, tokens, *, batch_size: int = 4) -> list[dict]:
    """Per layer {"q", "k", "v"} (numpy float32, post-RoPE) of the float model on tokens [N, T]."""
    model = ModelDef(config)
    run = jax.jit(lambda p, t: model.apply(p, t, None, tuple(CaptureCache() for _ in range(config.n_layers)))[1])
    tokens = np.asarray(tokens)
    parts = [run(params, jnp.asarray(tokens[i:i + batch_size])) for i in range(0, len(tokens), batch_size)]
    return [{name: np.concatenate([np.asarray(getattr(p[i], name), np.float32) for p in parts])
             for name in ("q", "k", "v")} for i in range(config.n_layers)]


def tied_key_max(keys: np.ndarray) -> np.ndarray:
    """max|K| over tokens [..., kv_heads, head_dim] -> [kv_heads, head_dim], tied over rotate-half pairs."""
    m = np.abs(keys).reshape(-1, *keys.shape[-2:]).max(0)
    half = m.shape[-1] // 2
    pair = np.maximum(m[:, :half], m[:, half:])
    return np.concatenate([pair, pair], axis=-1)


def scales_for(key_max: np.ndarray, alpha: float) -> np.ndarray:
    """lambda = max|K| ** alpha (key_max already tied over pairs), float32."""
    return (np.maximum(key_max, 1e-5).astype(np.float64) ** alpha).astype(np.float32)


def kv_attention_error(q, k, v, fmt: str, scale: np.ndarray | None = None, *, value_fmt: str | None = None) -> float:
    """Mean relative L2 error of causal attention with K/V in page format `fmt` vs float.

    q [B, T, H, hd], k, v [B, T, kvH, hd] (float32, post-RoPE); `scale` [kvH, hd] smooths
    the keys first (q times it, k divided by it), as folding it into the weights would.
    `value_fmt` stores the values in another format ("float": the keys' error alone).
    """
    scale = np.ones(np.shape(k)[-2:], np.float32) if scale is None else scale
    return float(_attention_error(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, scale)), key_fmt=fmt,
                                  value_fmt=value_fmt or fmt))


@partial(jax.jit, static_argnames=("key_fmt", "value_fmt"))
def _attention_error(q, k, v, scale, *, key_fmt: str, value_fmt: str):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    exact, _ = causal_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos, pos)
    q, k = q * jnp.repeat(scale, q.shape[2] // k.shape[2], axis=0), k / scale
    kq, vq = dequantize_kv(key_fmt, *quantize_kv(k, key_fmt)), dequantize_kv(value_fmt, *quantize_kv(v, value_fmt))
    approx, _ = causal_attention(q, jnp.swapaxes(kq, 1, 2), jnp.swapaxes(vq, 1, 2), pos, pos)
    num = jnp.linalg.norm(approx - exact, axis=-1)
    return jnp.mean(num / jnp.maximum(jnp.linalg.norm(exact, axis=-1), 1e-12))


def calibrate(config: ModelConfig, params: dict, tokens, *, alpha: float | None = None, fmt: str = "int4",
              captured: list[dict] | None = None) -> tuple[np.ndarray, list[float]]:
    """lambda [n_layers, kv_heads, head_dim] and the alpha chosen per layer, from calibration tokens [N, T]."""
    captured = captured or capture_attention_inputs(config, params, tokens)
    scales, alphas = [], []
    for layer in captured:
        key_max = tied_key_max(layer["k"])
        if alpha is not None:
            best = alpha
        else:  # the alpha whose int4-KV attention is closest to float on the calibration text
            best = min(ALPHAS, key=lambda a: kv_attention_error(layer["q"], layer["k"], layer["v"], fmt,
                                                                 scales_for(key_max, a)))
        scales.append(scales_for(key_max, best))
        alphas.append(best)
    return np.stack(scales), alphas


def fold(config: ModelConfig, params: dict, scales: np.ndarray) -> dict:
    """Params with lambda folded in: k's output channels divided by it, q's (per KV group) multiplied.

    The folded q and k weights become float32 (a rounded weight would not cancel its scale).
    """
    groups = config.n_heads // config.n_kv_heads
    layers = dict(params["layers"])  # {index: block params}, as `ModelDef` stores them
    for i in range(config.n_layers):
        attn = dict(layers[i]["attn"])
        for name in ("q", "k"):
            if hasattr(attn[name], "quantized_matmul"):
                raise ValueError("SmoothAttention folds into float q/k weights; apply it before quantizing weights")
        lam = jnp.asarray(scales[i], jnp.float32)  # [kvH, hd]
        attn["k"] = jnp.asarray(attn["k"], jnp.float32) / lam[None]
        attn["q"] = jnp.asarray(attn["q"], jnp.float32) * jnp.repeat(lam, groups, axis=0)[None]
        layers[i] = {**layers[i], "attn": attn}
    return {**params, "layers": layers}


def smooth_attention(config: ModelConfig, params: dict, calib_tokens, *, alpha: float | None = None,
                     fmt: str = "int4") -> tuple[dict, np.ndarray, list[float]]:
    """Calibrate on tokens [N, T] and fold: (params, lambda [n_layers, kv_heads, head_dim], alpha per layer)."""
    scales, alphas = calibrate(config, params, calib_tokens, alpha=alpha, fmt=fmt)
    return fold(config, params, scales), scales, alphas
