"""Pure-jnp decode attention over paged KV: what the Pallas kernel must compute.

One query token per sequence attends to the first ``lengths[b]`` tokens of its pages.
Pages are dequantized to float32 first, and the products use float32 at HIGHEST
precision, so this is the definition the kernel is compared with.

Both return the log-sum-exp of the (scaled) logits next to the output. Attention over a
union of disjoint key sets is a log-sum-exp-weighted mean of the attention over each set
(the split-K step of FlashDecoding), which is what ``merge_partials`` computes: parts
can come from different places (GPU pages, host pages, disk) and merge exactly. A part
with no keys has ``lse = -inf`` and output 0, and drops out of the merge.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_attention.formats import check_inputs, dequantize_kv

_HIGHEST = lax.Precision.HIGHEST


def gather_pages(fmt: str, pages: tuple, page_table: jax.Array) -> jax.Array:
    """float32 ``[batch, kv_heads, max_pages_per_seq * page_size, head_dim]`` of each sequence."""
    data, *side = (p[:, page_table] for p in pages)  # [kv_heads, batch, slots, page_size, ...]
    x = dequantize_kv(fmt, data, *side)
    kv_heads, batch, slots, page_size, head_dim = x.shape
    return x.reshape(kv_heads, batch, slots * page_size, head_dim).transpose(1, 0, 2, 3)


@functools.partial(jax.jit, static_argnames=("fmt", "sm_scale"))
def paged_decode_attention(q: jax.Array, k_pages: tuple, v_pages: tuple, page_table: jax.Array,
                           lengths: jax.Array, *, fmt: str, sm_scale: float | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """Attention of q ``[batch, n_heads, head_dim]`` over each sequence's first ``lengths`` keys.

    Returns (out ``[batch, n_heads, head_dim]``, lse ``[batch, n_heads]``).
    ``k_pages``/``v_pages`` are ``(data, *side arrays)`` in format ``fmt`` (see
    ``formats``); both results are float32. ``sm_scale`` defaults to ``1/sqrt(head_dim)``.
    """
    check_inputs(q, k_pages, v_pages, page_table, lengths, fmt)
    batch, n_heads, head_dim = q.shape
    kv_heads = k_pages[0].shape[0]
    sm_scale = 1 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    k = gather_pages(fmt, k_pages, page_table)  # [batch, kv_heads, seq, head_dim]
    v = gather_pages(fmt, v_pages, page_table)
    qg = q.astype(jnp.float32).reshape(batch, kv_heads, n_heads // kv_heads, head_dim)
    logits = jnp.einsum("bhgd,bhsd->bhgs", qg, k, precision=_HIGHEST) * sm_scale
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [batch, seq]
    out, lse = attend(logits, v, valid[:, None, None, :])
    return out.reshape(batch, n_heads, head_dim), lse.reshape(batch, n_heads)


def attend(logits: jax.Array, v: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the valid keys: logits ``[b, h, g, s]``, v ``[b, h, s, d]`` -> (out, lse)."""
    logits = jnp.where(valid, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # -inf where no key is valid
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    return jnp.einsum("bhgs,bhsd->bhgd", weights, v, precision=_HIGHEST), lse


@jax.jit
def merge_partials(outs, lses) -> tuple[jax.Array, jax.Array]:
    """Merge attention over disjoint key sets: (outs ``[parts, ..., d]``, lses ``[parts, ...]``).

    ``outs`` and ``lses`` are stacked along axis 0 (or sequences of equal shapes); each
    part's output is normalized over its own keys. Returns (out ``[..., d]``, lse ``[...]``)
    in float32; parts with ``lse = -inf`` contribute nothing, all-empty gives (0, -inf).
    """
    outs = jnp.asarray(jnp.stack(outs) if isinstance(outs, (list, tuple)) else outs, jnp.float32)
    lses = jnp.asarray(jnp.stack(lses) if isinstance(lses, (list, tuple)) else lses, jnp.float32)
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"outs {outs.shape} must be lses {lses.shape} plus a head_dim axis")
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # every part empty: weights are exp(-inf) = 0
    weights = jnp.exp(lses - top)  # [parts, ...]
    total = jnp.sum(weights, axis=0)
    has_keys = total > 0
    out = jnp.sum(weights[..., None] * outs, axis=0) / jnp.where(has_keys, total, 1.0)[..., None]
    lse = jnp.where(has_keys, top + jnp.log(jnp.where(has_keys, total, 1.0)), -jnp.inf)
    return out, lse
