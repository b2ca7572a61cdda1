"""A paged KV cache in float, int8 or int4 pages, written and read inside jitted steps.

vLLM's PagedAttention (Kwon et al.): each layer keeps one pool of fixed-size pages, and
every sequence a page table that maps its token slots onto pages, so sequences of any
length share one pool without fragmentation. Pages are stored in a format of
`pallas_kernels.quant_attention.formats`: float (bf16/f32), int8 (symmetric, one scale
per token and KV head) or int4 (two codes per byte, scale and zero per token and KV
head: QServe's KV4, without its per-channel key smoothing, which `jaxsys.quant.
smooth_attention` folds into the weights instead).

Layout per layer: keys and values each as ``(data, *side arrays)`` with data
``[kv_heads, num_pages, page_size, head_dim (or head_dim // 2 packed)]`` and side arrays
``[kv_heads, num_pages, page_size]``; the page table ``[batch, pages_per_sequence]``
int32 holds ``num_pages`` (no page) where a sequence has none. A token at position p of
sequence b lives in page ``page_table[b, p // page_size]`` at offset ``p % page_size``.

The cache plugs into the model through `attend(q, k, v, positions)`: it quantizes the
new tokens, writes them (positions -1 are stored nowhere) and attends over its pages
(new tokens included, in their stored format), a key being visible iff its position
<= the query's. A decode step (one token per sequence) runs
`pallas_kernels.quant_attention.paged_decode_attention` (the Pallas kernel on a GPU);
a prefill chunk dequantizes the sequence's pages and masks causally in jnp.

Pages are handed out on the host by `PageAllocator`, before the compiled program runs;
a write that lands on a slot without a page is dropped and raises the cache's
`overflow` flag (`check_overflow` turns it into an error), so an undersized page table
is never silent corruption.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quant_attention import paged_decode_attention, quantize_kv
from pallas_kernels.quant_attention.formats import check_format
from pallas_kernels.quant_attention.reference import gather_pages

KV_BITS = {16: "float", 8: "int8", 4: "int4"}
DEFAULT_PAGE_SIZE = 16
_HIGHEST = jax.lax.Precision.HIGHEST


class PagePoolExhausted(RuntimeError):
    """The page pool has fewer free pages than an allocation needs."""


class PageAllocator:
    """Host-side bookkeeping of which pages each sequence owns.

    `policy="error"` raises `PagePoolExhausted` when the free pages run out;
    `policy="evict_oldest"` frees the sequences that were allocated longest ago (never
    the one asking) until the request fits, and lists them in `evicted` so the caller
    can recompute or drop them.
    """

    POLICIES = ("error", "evict_oldest")

    def __init__(self, num_pages: int, page_size: int, *, policy: str = "error"):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages=} {page_size=}")
        if policy not in self.POLICIES:
            raise ValueError(f"unknown allocation policy {policy!r}; known: {', '.join(self.POLICIES)}")
        self.num_pages, self.page_size, self.policy = num_pages, page_size, policy
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: low page ids go first
        self._pages: dict[Hashable, list[int]] = {}  # insertion order is allocation age
        self.evicted: list[Hashable] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, seq: Hashable) -> list[int]:
        return list(self._pages.get(seq, ()))

    def allocate(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Grow `seq`'s pages to hold `num_tokens` tokens; returns all its pages in slot order."""
        owned = self._pages.get(seq, [])
        need = -(-num_tokens // self.page_size) - len(owned)
        if self.policy == "evict_oldest":
            for victim in [s for s in self._pages if s != seq]:
                if need <= len(self._free):
                    break
                self.free(victim)
                self.evicted.append(victim)
        if need > len(self._free):
            raise PagePoolExhausted(
                f"page pool exhausted: sequence {seq!r} needs {need} more page(s) of {self.page_size} tokens "
                f"for {num_tokens} tokens, {len(self._free)} of {self.num_pages} are free; free finished "
                "sequences, build the cache with more pages, or offload pages to the host (jaxsys.kvcache.offload)")
        owned = owned + [self._free.pop() for _ in range(max(need, 0))]
        self._pages.pop(seq, None)
        self._pages[seq] = owned  # now the most recently allocated
        return list(owned)

    def free(self, seq: Hashable) -> None:
        pages = self._pages.pop(seq, None)
        if pages is None:
            raise KeyError(f"sequence {seq!r} owns no pages")
        self._free.extend(reversed(pages))

    def page_table(self, seqs: list[Hashable], pages_per_sequence: int) -> np.ndarray:
        """int32 [len(seqs), pages_per_sequence]; slots without a page hold num_pages."""
        table = np.full((len(seqs), pages_per_sequence), self.num_pages, np.int32)
        for row, seq in enumerate(seqs):
            pages = self._pages.get(seq, [])[:pages_per_sequence]
            table[row, :len(pages)] = pages
        return table


def token_pages(page_table: jax.Array, positions: jax.Array, page_size: int, num_pages: int):
    """Pages [B, T] (num_pages where the token is stored nowhere) and offsets [B, T] of tokens at `positions`."""
    slots = positions // page_size
    in_table = (positions >= 0) & (slots < page_table.shape[1])
    pages = jnp.take_along_axis(page_table, jnp.clip(slots, 0, page_table.shape[1] - 1), axis=1)
    return jnp.where(in_table, pages, num_pages), positions % page_size


def write_tokens(pool: tuple, tokens: tuple, pages: jax.Array, offsets: jax.Array) -> tuple:
    """Scatter tokens (each part [B, T, kv_heads, ...]) into pool parts [kv_heads, num_pages, page_size, ...].

    Pages >= num_pages are dropped.
    """
    out = []
    for part, new in zip(pool, tokens):
        new = jnp.moveaxis(new, 2, 0).astype(part.dtype)  # [kv_heads, B, T, ...]
        out.append(part.at[:, pages, offsets].set(new, mode="drop"))
    return tuple(out)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_pos: jax.Array,
                     q_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q [B, T, H, hd] over k, v [B, kvH, S, hd] at key_pos [B, S]; key visible iff 0 <= key_pos <= q_pos.

    Returns (out [B, T, H, hd], lse [B, T, H]) in float32; a query without visible keys
    gets (0, -inf), so the result merges with other parts (`merge_partials`).
    """
    b, t, h, hd = q.shape
    kv_heads = k.shape[1]
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, hd)
    logits = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(jnp.float32), precision=_HIGHEST) / math.sqrt(hd)
    visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, kvH, G, T]
    weights = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("bkgts,bksd->btkgd", weights, v.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(b, t, h, hd), lse.transpose(0, 3, 1, 2).reshape(b, t, h)


def decode_partial(q, k_pool: tuple, v_pool: tuple, page_table, lengths, *, fmt: str, impl: str):
    """`paged_decode_attention` of q [B, H, hd] with the pools given as (data, *side) tuples."""
    side = {}
    for which, pool in (("k", k_pool), ("v", v_pool)):
        if fmt in ("int8", "int4"):
            side[f"{which}_scale"] = pool[1]
        if fmt == "int4":
            side[f"{which}_zero"] = pool[2]
    return paged_decode_attention(q, k_pool[0], v_pool[0], page_table, lengths, fmt=fmt, impl=impl, **side)


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "page_table", "overflow"],
         meta_fields=["fmt", "impl"])
@dataclasses.dataclass(frozen=True)
class PagedCache:
    """One layer's paged KV cache (see the module docstring for the layout)."""

    k: tuple  # (data, *side): [kv_heads, num_pages, page_size, ...]
    v: tuple
    page_table: jax.Array  # [batch, pages_per_sequence] int32, num_pages where no page
    overflow: jax.Array  # [batch] bool: a token was dropped because its slot has no page
    fmt: str = "float"
    impl: str = "auto"  # paged_decode_attention's implementation choice

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def with_page_table(self, page_table) -> "PagedCache":
        return dataclasses.replace(self, page_table=jnp.asarray(page_table, jnp.int32))

    def write(self, k, v, positions) -> "PagedCache":
        """Store new tokens k, v [B, T, kv_heads, head_dim] at positions [B, T] (-1: nowhere)."""
        pages, offsets = token_pages(self.page_table, positions, self.page_size, self.num_pages)
        lost = jnp.any((positions >= 0) & (pages == self.num_pages), axis=1)
        return dataclasses.replace(
            self, k=write_tokens(self.k, quantize_kv(k, self.fmt), pages, offsets),
            v=write_tokens(self.v, quantize_kv(v, self.fmt), pages, offsets), overflow=self.overflow | lost)

    def attend(self, q, k, v, positions) -> tuple[jax.Array, "PagedCache"]:
        """The model's cache protocol: q [B, T, H, hd], k, v [B, T, kvH, hd] -> (out [B, T, H, hd] f32, cache)."""
        cache = self.write(k, v, positions)
        table = jnp.minimum(cache.page_table, self.num_pages - 1)  # slots without a page are never visible
        if q.shape[1] == 1:
            lengths = jnp.maximum(positions[:, 0] + 1, 0)
            out, _ = decode_partial(q[:, 0], cache.k, cache.v, table, lengths, fmt=self.fmt, impl=self.impl)
            return out[:, None], cache
        keys = gather_pages(self.fmt, cache.k, table)  # [B, kvH, S, hd] float32
        values = gather_pages(self.fmt, cache.v, table)
        key_pos = jnp.broadcast_to(jnp.arange(keys.shape[2], dtype=jnp.int32), keys.shape[:1] + keys.shape[2:3])
        out, _ = causal_attention(q, keys, values, key_pos, positions)
        return out, cache


def empty_pool(config, num_pages: int, page_size: int, fmt: str, dtype) -> tuple[jax.Array, ...]:
    """Zeroed (data, *side) of one pool, built by quantizing a zero token (so dtypes match the format)."""
    check_format(fmt)
    hd = config.resolved_head_dim
    token = jax.eval_shape(lambda x: quantize_kv(x, fmt), jax.ShapeDtypeStruct((hd,), dtype))
    lead = (config.n_kv_heads, num_pages, page_size)
    return tuple(jnp.zeros(lead + part.shape, part.dtype) for part in token)


def pages_per_sequence(max_len: int, page_size: int) -> int:
    return -(-max_len // page_size)


def paged_cache(config, batch: int, max_len: int, *, fmt: str = "float", page_size: int = DEFAULT_PAGE_SIZE,
                num_pages: int | None = None, dtype=None, impl: str = "auto",
                allocator: PageAllocator | None = None) -> tuple[PagedCache, ...]:
    """A paged cache for `batch` sequences (ids 0..batch-1) of up to `max_len` tokens each.

    Pages for every sequence's `max_len` tokens are allocated up front from `allocator`
    (a fresh one over `num_pages` pages, by default exactly enough), since one compiled
    program generates the whole continuation. Float pages use `dtype` (the model's).
    """
    check_format(fmt)
    slots = pages_per_sequence(max_len, page_size)
    if allocator is None:
        allocator = PageAllocator(num_pages or batch * slots, page_size)
    elif allocator.page_size != page_size:
        raise ValueError(f"the allocator's page_size {allocator.page_size} differs from {page_size=}")
    for seq in range(batch):
        allocator.allocate(seq, max_len)
    table = allocator.page_table(list(range(batch)), slots)
    dtype = jnp.dtype(dtype or config.dtype)
    # Built by a compiled program, and one page table per layer: donation rejects shared buffers.
    pools = jax.jit(lambda: [(empty_pool(config, allocator.num_pages, page_size, fmt, dtype),
                              empty_pool(config, allocator.num_pages, page_size, fmt, dtype))
                             for _ in range(config.n_layers)])()
    return tuple(PagedCache(k, v, jax.device_put(table), jax.device_put(np.zeros(batch, bool)), fmt, impl)
                 for k, v in pools)


def check_overflow(cache) -> None:
    """Raise if any write of a generation fell on a slot without a page (its token was lost)."""
    for layer in cache:
        if not isinstance(layer, PagedCache):
            return  # an offloaded cache raises when it is written past its end
        lost = np.asarray(layer.overflow)
        if lost.any():
            raise PagePoolExhausted(f"sequences {np.flatnonzero(lost).tolist()} wrote past their pages; allocate "
                                    "pages for prompt + max_new_tokens tokens before generating")
        return  # every layer writes the same positions


def kv_nbytes(cache) -> int:
    """Bytes of every array the cache holds (pools, side arrays, page tables)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))


def bytes_per_token(cache) -> float:
    """Pool bytes (data and side arrays, keys and values, all layers) per token slot."""
    pools = sum(part.nbytes for layer in cache for part in (*layer.k, *layer.v))
    return pools / (cache[0].num_pages * cache[0].page_size)
