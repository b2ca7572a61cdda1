"""Activation-aware scaling: per-input-channel scales folded into the float model before rounding.

A linear layer ``y = X W`` computes the same function as ``y = (X / s) (s W)`` for any
positive per-input-channel ``s``; quantizing ``s W`` instead of ``W`` changes which
errors the rounding makes. Two scale families, both from a small calibration batch
(`jaxsys.quant.calibration`):

- int8-activation formats (w8a8, w4a8, intNa8): SmoothQuant's migration
  ``s_j = max|X_j|^alpha / max_n |W_jn|^(1 - alpha)``, which flattens the outlier channels
  that per-token int8 activations cannot represent and moves their range into the weights.
  SmoothQuant fixes alpha per model (0.5, 0.8 for Llama); like QServe's QoQ we pick it per
  layer from a grid.
- weight-only formats (w4a16, intN): AWQ's ``s_j = mean|X_j|^alpha`` (normalised to
  ``sqrt(max s * min s) = 1``), which protects the weights of salient input channels.

For every group of layers that share an input, each alpha of the grid is scored by the
mean squared error of the quantized layers' outputs against the float ones on the
calibration rows (int8 activation rounding included), and the best kept. ``s = 1``
(round-to-nearest) is always a candidate, so on the calibration data the result is never
worse than RTN. AWQ also searches weight clipping; the bit-plane quantizer already does.

Where the scales fold, exactly (the float function is unchanged up to float rounding):

- q/k/v and gate/up: ``1 / s`` into the preceding RMSNorm weight, ``s`` into the weight rows.
- down: ``1 / s`` into the output columns of up (``h = silu(x W_gate) * (x W_up)`` is linear
  in ``W_up``'s columns), ``s`` into down's rows.
- o: ``1 / s`` into the output columns of v (attention mixes tokens, not channels, so the
  attention output is linear in v's columns), ``s`` into o's rows. With grouped-query
  attention all heads of a kv group read the same v channel, so their scales are tied (the
  geometric mean over the group's heads).

Folded tensors become float32 whatever the checkpoint stored: a norm weight rounded back
to bfloat16 would no longer cancel its scale exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.config import ModelConfig
from jaxsys.quant.calibration import InputStats, collect_input_stats
from jaxsys.quant.weights import PREFERRED_GROUP_SIZE, check_group_size, is_grouped
from pallas_kernels.lowbit_matmul import get_format, lowbit_matmul, quantize_weight

ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GroupScale:
    """The scale chosen for one group of layers sharing an input."""

    layer: int
    group: str  # "o", "down", "qkv", "gate_up"
    alpha: float | None  # None: s = 1 (round-to-nearest) was best
    error: float  # output mean squared error on the calibration rows, with the scale
    rtn_error: float  # the same without it


def scale_family(format: str) -> str:
    """"smoothquant" for int8-activation formats, "awq" for weight-only ones."""
    return "smoothquant" if get_format(format).activation_bits == 8 else "awq"


def candidate_scales(stats: InputStats, w: jax.Array, family: str,
                     alphas=ALPHAS) -> list[tuple[float | None, np.ndarray]]:
    """(alpha, s [K]) for each alpha, after s = 1."""
    candidates = [(None, np.ones_like(stats.max_abs))]
    if family == "smoothquant":
        x_max = np.maximum(stats.max_abs, 1e-5).astype(np.float64)
        w_max = np.maximum(np.abs(np.asarray(w)).max(axis=1), 1e-5).astype(np.float64)
        for alpha in alphas:
            candidates.append((alpha, (x_max**alpha / w_max**(1 - alpha)).astype(np.float32)))
    elif family == "awq":
        x_mean = np.maximum(stats.mean_abs, 1e-4).astype(np.float64)
        for alpha in alphas:
            s = np.maximum(x_mean**alpha, 1e-4)
            candidates.append((alpha, (s / np.sqrt(s.max() * s.min())).astype(np.float32)))
    else:
        raise ValueError(f"unknown scale family {family!r}; use 'smoothquant' or 'awq'")
    return candidates


@functools.partial(jax.jit, static_argnames=("format", "group_size"))
def scaled_error(x: jax.Array, w: jax.Array, target: jax.Array, s: jax.Array, *, format: str,
                 group_size: int | None) -> jax.Array:
    """Mean squared error of (x / s) @ quantize(s * w) against the float target x @ w."""
    opts = {"group_size": group_size} if is_grouped(format) else {}
    packed = quantize_weight(w * s[:, None], format, **opts)
    y = lowbit_matmul(x / s, packed, format=format, impl="reference")
    return jnp.mean(jnp.square(y - target))


def search_scale(stats: InputStats, w: jax.Array, format: str, *, group_size: int | None,
                 tie=None, family: str | None = None) -> tuple[np.ndarray, float | None, float, float]:
    """(s, alpha, error, rtn_error): the candidate with the least output error on `stats.sample`.

    `tie(s)` maps a scale onto the subspace where it can be folded (GQA for o).
    """
    x = jnp.asarray(stats.sample)
    w = jnp.asarray(w, jnp.float32)
    target = jnp.dot(x, w, precision=_HIGHEST)
    best = None
    rtn_error = math.inf
    for alpha, s in candidate_scales(stats, w, family or scale_family(format)):
        s = tie(s) if tie is not None else s
        error = float(scaled_error(x, w, target, jnp.asarray(s), format=format, group_size=group_size))
        if alpha is None:
            rtn_error = error
        if best is None or error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2], rtn_error


def _gqa_tie(config: ModelConfig):
    """Scales of o's input channels [heads * head_dim] shared by the heads of each kv group."""
    kv, groups, hd = config.n_kv_heads, config.n_heads // config.n_kv_heads, config.resolved_head_dim

    def tie(s: np.ndarray) -> np.ndarray:
        log_s = np.log(s.astype(np.float64)).reshape(kv, groups, hd).mean(axis=1, keepdims=True)
        return np.broadcast_to(np.exp(log_s), (kv, groups, hd)).reshape(-1).astype(np.float32)

    return tie


GROUPS = ("o", "down", "qkv", "gate_up")  # in search order: o and down rescale v's and up's columns


def fold_scales(config: ModelConfig, params: dict, scales: list[dict[str, np.ndarray]]) -> dict:
    """Float params computing the same function with per-input-channel scales folded in.

    `scales[layer][group]` is s [K] for any subset of `GROUPS`: the group's weight rows
    are multiplied by s and 1/s goes into the norm or the columns that feed the group.
    o's scales are first tied over each kv group (see the module docstring).
    """
    out = jax.tree.map(lambda x: x, params)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    kv, hd = config.n_kv_heads, config.resolved_head_dim
    tie = _gqa_tie(config)
    for i, layer_scales in enumerate(scales):
        block = out["layers"][i]
        attn, mlp = dict(block["attn"]), dict(block["mlp"])
        norms = {"attn_norm": block["attn_norm"], "mlp_norm": block["mlp_norm"]}
        if "o" in layer_scales:
            s = tie(np.asarray(layer_scales["o"], np.float32))
            attn["v"] = f32(attn["v"]) / s.reshape(kv, -1, hd)[:, 0][None]  # [dim, kv_heads, hd]
            attn["o"] = f32(attn["o"]) * s.reshape(config.n_heads, hd, 1)  # [heads, hd, dim]
        if "down" in layer_scales:
            s = np.asarray(layer_scales["down"], np.float32)
            mlp["up"], mlp["down"] = f32(mlp["up"]) / s[None], f32(mlp["down"]) * s[:, None]
        if "qkv" in layer_scales:
            s = np.asarray(layer_scales["qkv"], np.float32)
            for name in ("q", "k", "v"):
                attn[name] = f32(attn[name]) * s[:, None, None]
            norms["attn_norm"] = {"weight": f32(block["attn_norm"]["weight"]) / s}
        if "gate_up" in layer_scales:
            s = np.asarray(layer_scales["gate_up"], np.float32)
            mlp["gate"], mlp["up"] = f32(mlp["gate"]) * s[:, None], f32(mlp["up"]) * s[:, None]
            norms["mlp_norm"] = {"weight": f32(block["mlp_norm"]["weight"]) / s}
        out["layers"][i] = {**block, "attn": attn, "mlp": mlp, **norms}
    return out


def _group_weight(config: ModelConfig, block: dict, group: str) -> jax.Array:
    """The group's weights as one 2-D [K, N] matrix (columns are independent in every format)."""
    d = config.dim
    attn, mlp = block["attn"], block["mlp"]
    if group == "o":
        return jnp.asarray(attn["o"], jnp.float32).reshape(-1, d)
    if group == "down":
        return jnp.asarray(mlp["down"], jnp.float32)
    names = (attn["q"], attn["k"], attn["v"]) if group == "qkv" else (mlp["gate"], mlp["up"])
    return jnp.concatenate([jnp.asarray(w, jnp.float32).reshape(d, -1) for w in names], axis=1)


_SITE_OF = {"o": "o_in", "down": "down_in", "qkv": "attn_in", "gate_up": "mlp_in"}


def smooth_params(config: ModelConfig, params: dict, calib_tokens: np.ndarray | None, format: str, *,
                  group_size: int | None = PREFERRED_GROUP_SIZE, stats=None,
                  family: str | None = None) -> tuple[dict, list[GroupScale]]:
    """Float params with activation-aware scales folded in, and the scale chosen per group.

    The returned params compute the same function as `params`; quantize them with
    `quantize_params`. `stats` reuses `collect_input_stats` output (it depends only on the
    float model and the calibration tokens, not on the format).
    """
    check_group_size(config, format, group_size)
    if stats is None:
        stats = collect_input_stats(config, params, calib_tokens)
    search = functools.partial(search_scale, format=format, group_size=group_size, family=family)
    report = []
    for stage in (("o", "down"), ("qkv", "gate_up")):  # v and up change in the first stage
        scales = []
        for i in range(config.n_layers):
            scales.append({})
            for group in stage:
                tie = _gqa_tie(config) if group == "o" else None
                s, alpha, error, rtn_error = search(stats[i][_SITE_OF[group]],
                                                    _group_weight(config, params["layers"][i], group), tie=tie)
                scales[i][group] = s
                report.append(GroupScale(i, group, alpha, error, rtn_error))
        params = fold_scales(config, params, scales)
    return params, sorted(report, key=lambda r: (r.layer, GROUPS.index(r.group)))
