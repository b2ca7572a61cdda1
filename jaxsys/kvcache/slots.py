"""KV caches whose slots are addressed by token position: dense, StreamingLLM, retrieval.

Every cache here is a pytree of arrays per layer with two operations the model's
attention calls: `write(k, v, positions, q)` stores the new tokens' keys/values and
returns the new cache; `read()` returns (keys, values, key_positions) to attend
over, keys and values head-major ([batch, kv_heads, slots, head_dim], the order the
attention dots contract in, so no step copies the cache into it), where a key is
visible to a query iff its position <= the query's position.
Unused slots hold position `EMPTY` (larger than any real position), so causality
alone masks them. Because visibility is decided by positions, rolling a sequence
back (a rejected speculative draft) needs no write at all: the next tokens
overwrite the stale slots before any query at those positions can see them.

- `DenseCache`: slot == position ([batch, kv_heads, max_len, head_dim]); keeps the
  query of the first token of the last write (the retrieval cache is built from it).
- `StreamingCache`: StreamingLLM (Xiao et al.): `sink` attention-sink slots for the
  first positions, then a ring buffer over the most recent `window` positions. The
  draft model of TriForce runs on it; its cost does not grow with the context.
- `RetrievalCache`: TriForce's middle level. Built from a dense cache: keys split into
  chunks of `chunk_size`; per layer and KV head each chunk is scored by its mean key
  against the current query, chunk 0 (the sink) and the chunks holding the most recent
  tokens are always kept, the best others fill the budget. New tokens go to a window
  of slots after the retrieved ones. Positions are per KV head ([batch, kv_heads, slots])
  because each head keeps its own chunks.

Writes at a position < 0 are dropped (a padding token in a fixed-shape feed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY = jnp.iinfo(jnp.int32).max


def _scatter_tokens(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, S, ...] <- new [B, T, ...] at slots [B, T]; slots outside [0, S) are dropped."""
    b = jnp.arange(buf.shape[0])[:, None]
    slots = jnp.where(slots < 0, buf.shape[1], slots)  # negative indices would wrap, not drop
    return buf.at[b, slots].set(new.astype(buf.dtype), mode="drop")


def _scatter_heads(buf: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """buf [B, kvH, S, ...] <- new [B, T, kvH, ...] at slots [B, T]; slots outside [0, S) are dropped."""
    slots = jnp.broadcast_to(slots[:, None, :], buf.shape[:2] + slots.shape[1:])
    slots = jnp.where(slots < 0, buf.shape[2], slots)
    b = jnp.arange(buf.shape[0])[:, None, None]
    h = jnp.arange(buf.shape[1])[None, :, None]
    return buf.at[b, h, slots].set(jnp.swapaxes(new, 1, 2).astype(buf.dtype), mode="drop")


class DenseCache(NamedTuple):
    k: jax.Array  # [batch, kv_heads, max_len, head_dim]
    v: jax.Array  # [batch, kv_heads, max_len, head_dim]
    query: jax.Array  # [batch, n_heads, head_dim], the first query of the last write

    def write(self, k, v, positions, q) -> "DenseCache":
        slots = jnp.where(positions < 0, -1, positions)
        return DenseCache(_scatter_heads(self.k, k, slots), _scatter_heads(self.v, v, slots),
                          q[:, 0].astype(self.query.dtype))

    def read(self):
        b, s = self.k.shape[0], self.k.shape[2]
        return self.k, self.v, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class StreamingCache(NamedTuple):
    k: jax.Array  # [batch, kv_heads, sink + window, head_dim]
    v: jax.Array
    pos: jax.Array  # [batch, sink + window] int32, EMPTY where unused
    sink: int  # static (a pytree leaf that is a Python int stays static under jit only as aux)

    def write(self, k, v, positions, q) -> "StreamingCache":
        window = self.k.shape[2] - self.sink
        ring = self.sink + (positions - self.sink) % window
        slots = jnp.where(positions < self.sink, positions, ring)
        # Of two positions in one write that share a ring slot only the later may land
        # (a scatter with duplicate indices keeps an unspecified one).
        overwritten = (positions >= self.sink) & (positions <= positions.max(axis=1, keepdims=True) - window)
        slots = jnp.where((positions < 0) | overwritten, -1, slots)
        return StreamingCache(_scatter_heads(self.k, k, slots), _scatter_heads(self.v, v, slots),
                              _scatter_tokens(self.pos, positions, slots), self.sink)

    def read(self):
        return self.k, self.v, self.pos


class RetrievalCache(NamedTuple):
    k: jax.Array  # [batch, kv_heads, budget + window, head_dim]
    v: jax.Array
    pos: jax.Array  # [batch, kv_heads, budget + window] int32, EMPTY where unused
    base: jax.Array  # [batch] int32: position that maps to the first window slot
    budget: int

    def write(self, k, v, positions, q) -> "RetrievalCache":
        # Positions before `base` are already covered by retrieved chunks (or were dropped
        # by the selection); they are never rewritten here.
        slots = self.budget + positions - self.base[:, None]
        slots = jnp.where(positions < self.base[:, None], -1, slots)
        new_pos = jnp.broadcast_to(positions[..., None], positions.shape + (self.pos.shape[1],))  # [B, T, kvH]
        pos = _scatter_heads(self.pos[..., None], new_pos[..., None], slots)[..., 0]
        return RetrievalCache(_scatter_heads(self.k, k, slots), _scatter_heads(self.v, v, slots),
                              pos, self.base, self.budget)

    def read(self):
        return self.k, self.v, self.pos


def _register_static(cls, static_field: str):
    """NamedTuple caches with one static int field: flatten only the arrays."""
    fields = [f for f in cls._fields if f != static_field]

    def flatten(c):
        return [getattr(c, f) for f in fields], getattr(c, static_field)

    def unflatten(static, children):
        return cls(**dict(zip(fields, children)), **{static_field: static})

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)


_register_static(StreamingCache, "sink")
_register_static(RetrievalCache, "budget")


def dense_cache(config, batch: int, max_len: int, dtype=None) -> tuple[DenseCache, ...]:
    dtype = dtype or config.dtype
    shape = (batch, config.n_kv_heads, max_len, config.resolved_head_dim)
    query = jnp.zeros((batch, config.n_heads, config.resolved_head_dim), jnp.float32)
    return tuple(DenseCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), query) for _ in range(config.n_layers))


def streaming_cache(config, batch: int, *, sink: int, window: int, dtype=None) -> tuple[StreamingCache, ...]:
    if sink < 0 or window < 1:
        raise ValueError(f"a streaming cache needs sink >= 0 and window >= 1, got {sink=} {window=}")
    dtype = dtype or config.dtype
    shape = (batch, config.n_kv_heads, sink + window, config.resolved_head_dim)
    pos = jnp.full((batch, sink + window), EMPTY, jnp.int32)
    return tuple(StreamingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos, sink)
                 for _ in range(config.n_layers))


def retrieval_cache(config, batch: int, *, budget: int, window: int, dtype=None) -> tuple[RetrievalCache, ...]:
    """An empty retrieval cache (filled by `build_retrieval`)."""
    dtype = dtype or config.dtype
    shape = (batch, config.n_kv_heads, budget + window, config.resolved_head_dim)
    pos = jnp.full((batch, config.n_kv_heads, budget + window), EMPTY, jnp.int32)
    base = jnp.zeros((batch,), jnp.int32)
    return tuple(RetrievalCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pos, base, budget)
                 for _ in range(config.n_layers))


def _select_chunks(layer: DenseCache, lengths: jax.Array, *, n_chunks_kept: int, chunk_size: int,
                   recent_chunks: int) -> jax.Array:
    """Chunk indices [B, kvH, n_chunks_kept] to keep for one layer (sorted ascending)."""
    b, kv_heads, s, hd = layer.k.shape
    n_chunks = s // chunk_size
    keys = layer.k[:, :, :n_chunks * chunk_size].reshape(b, kv_heads, n_chunks, chunk_size, hd)
    # Unmasked means: every chunk that is scored lies wholly below `lengths` (the chunk holding
    # the last token is always kept, later ones are never kept), so stale slots never count.
    mean_key = keys.astype(jnp.float32).sum(3) / chunk_size  # [B, kvH, C, hd]
    count = jnp.clip(lengths[:, None] - jnp.arange(n_chunks)[None, :] * chunk_size, 0, chunk_size)  # [B, C]
    groups = layer.query.shape[1] // kv_heads
    query = layer.query.reshape(b, kv_heads, groups, hd).mean(2)  # [B, kvH, hd]
    score = jnp.einsum("bkch,bkh->bkc", mean_key, query)
    last_chunk = (jnp.maximum(lengths, 1) - 1) // chunk_size  # [B]
    chunk = jnp.arange(n_chunks)[None, None, :]
    forced = (chunk == 0) | ((chunk <= last_chunk[:, None, None]) & (chunk > last_chunk[:, None, None] - recent_chunks))
    score = jnp.where(forced, jnp.inf, score)
    score = jnp.where(count[:, None, :] > 0, score, -jnp.inf)  # chunks without tokens come last
    top = jax.lax.top_k(score, n_chunks_kept)[1]
    return jnp.sort(top, axis=-1)


def build_retrieval(full: tuple[DenseCache, ...], lengths: jax.Array, empty: tuple[RetrievalCache, ...], *,
                    chunk_size: int, recent_chunks: int = 1) -> tuple[RetrievalCache, ...]:
    """Fill a retrieval cache from the full cache of the same model, sequences of `lengths` tokens.

    The kept chunks cover every position below `base`; the tokens of the last, partial chunk
    are in it (it is always kept), so the window starts at `lengths` (rounded up to the chunk
    boundary after the last kept chunk, whichever is later is covered by the chunk copy).
    """
    out = []
    for layer, rc in zip(full, empty):
        b, kv_heads, s, hd = layer.k.shape
        budget = rc.budget
        if budget % chunk_size:
            raise ValueError(f"retrieval budget {budget} must be a multiple of chunk_size {chunk_size}")
        n_kept = budget // chunk_size
        if n_kept > s // chunk_size:
            raise ValueError(f"retrieval budget {budget} exceeds the full cache length {s}")
        if n_kept < 1 + recent_chunks:
            raise ValueError(f"retrieval budget {budget} must hold the sink chunk and {recent_chunks} recent "
                             f"chunk(s) of {chunk_size} tokens; raise the budget or lower chunk_size")
        chunks = _select_chunks(layer, lengths, n_chunks_kept=n_kept, chunk_size=chunk_size,
                                recent_chunks=recent_chunks)  # [B, kvH, n_kept]
        token = (chunks[..., None] * chunk_size + jnp.arange(chunk_size)).reshape(b, kv_heads, budget)
        index = token[..., None]  # [B, kvH, budget, 1]
        k_sel = jnp.take_along_axis(layer.k, index, axis=2)  # [B, kvH, budget, hd]
        v_sel = jnp.take_along_axis(layer.v, index, axis=2)
        pos = jnp.where(token < lengths[:, None, None], token, EMPTY).astype(jnp.int32)
        window_pos = jnp.full((b, kv_heads, rc.k.shape[2] - budget), EMPTY, jnp.int32)
        out.append(RetrievalCache(rc.k.at[:, :, :budget].set(k_sel.astype(rc.k.dtype)),
                                  rc.v.at[:, :, :budget].set(v_sel.astype(rc.v.dtype)),
                                  jnp.concatenate([pos, window_pos], axis=-1), lengths.astype(jnp.int32), budget))
    return tuple(out)
