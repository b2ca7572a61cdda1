"""Draft-model speculative decoding inside the batching engine, over paged KV.

The rule is `jaxsys.speculative`'s (Leviathan et al., Chen et al.; `accept`): each
running sequence drafts gamma tokens with the small model, the target scores them in
one forward, and the sequence keeps its own number of accepted tokens plus one from the
target (the residual or the bonus), so greedy output equals plain greedy and sampled
output follows the plain sampling distribution.

Paged form: the draft model has its own page pools with the geometry of the target's,
indexed by the same page tables, so one allocation serves both models and freeing a
sequence frees both. A round reads every page before the last two committed tokens
(positions n-2, n-1, with n the committed length) and re-feeds those two, as
`jaxsys.speculative` does: after a round in which every draft was accepted, the draft
model has not seen its own last token, and re-writing a position writes the same
values. Drafted keys/values are written into the draft pools as the drafting goes (the
draft pools are donated to the program); the target's keys/values for all gamma + 2
fed positions are written afterwards by the engine's write program. Rejected positions
hold stale values that no round reads: a round reads only positions below n - 2, and
those are committed.

Random draws are keyed by (seed, stream, position, round), with the sequence's round
counter folded in, so no two rounds of one sequence reuse a draw.

Self-speculation (`self_decode_step`) drafts with the target itself over a retrieval
view of its own pages (`RetrievalStepCache`): TriForce's chunks are pages here, selected
per layer and KV head by `select_pages`. The drafted tokens' keys/values stay beside the
pages for the rest of the round (the pools are only read); the verify is the same
forward and rule as the draft-model round, and it also returns the query of the new
position n - 2, which scores the pages at the sequence's next selection.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxsys.kvcache.paged import causal_attention, token_pages, write_tokens
from jaxsys.model import ModelDef
from jaxsys.nanobatch import Lane, StepCache, lane_forward, serving_step
from jaxsys.sampling import ACCEPT, DRAFT, RESIDUAL, SamplingParams, draw, row_keys, warp
from pallas_kernels.quant_attention.reference import merge_partials

_HIGHEST = jax.lax.Precision.HIGHEST
from jaxsys.speculative import accept


def _keys(sp: SamplingParams, stream: int, position: jax.Array, rounds: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in)(row_keys(sp, stream, position), rounds)


def forward_and_write(model: ModelDef, params, pools, tokens, positions, table, select):
    """`model` on tokens [b, T] at positions [b, T] over its pages, whose new keys/values it then writes.

    Returns (logits at `select` [b, S, V], updated pools). Positions -1 are padding (written nowhere).
    """
    caches = tuple(StepCache(k, v, table) for k, v in pools)
    logits, caches = model.apply(params, tokens, positions, caches, select)
    num_pages, page_size = pools[0][0][0].shape[1:3]
    pages, offsets = token_pages(table, positions, page_size, num_pages)
    new_pools = tuple((write_tokens(k, (c.new_k,), pages, offsets), write_tokens(v, (c.new_v,), pages, offsets))
                      for (k, v), c in zip(pools, caches))
    return logits, new_pools


def spec_decode_step(target: ModelDef, draft: ModelDef, target_params, draft_params, target_pools, draft_pools,
                     lane: Lane, rounds: jax.Array, *, gamma: int, max_len: int, filters: bool):
    """One speculative round for every decode row.

    lane.tokens/positions [b, 2]: the last two committed tokens (position -1 where there is
    none; a padding row has both -1). rounds [b]: each sequence's round counter.
    Returns (drafted [b, gamma], accepted k [b], next token [b], target writes, draft pools):
    the sequence's new tokens are drafted[:k] + [next].
    """
    sp = lane.sampling
    b = lane.tokens.shape[0]
    valid = lane.positions[:, 1] >= 0
    n = lane.positions[:, 1] + 1  # position of the first drafted token

    def where_valid(pos):
        return jnp.where(valid[:, None] & (pos >= 0) & (pos < max_len), pos, -1)

    tokens, positions = lane.tokens, where_valid(lane.positions)
    drafted, qs = [], []
    last = jnp.full((b, 1), 1, jnp.int32)
    for j in range(gamma):
        logits, draft_pools = forward_and_write(draft, draft_params, draft_pools, tokens, positions,
                                                lane.page_table, last if j == 0 else jnp.zeros((b, 1), jnp.int32))
        q = warp(logits[:, 0], sp, filters=filters)
        token = draw(q, _keys(sp, DRAFT, n + j, rounds))
        drafted.append(token)
        qs.append(q)
        tokens, positions = token[:, None], where_valid((n + j)[:, None])
    drafted = jnp.stack(drafted, axis=1)  # [b, gamma]
    q = jnp.stack(qs, axis=1)  # [b, gamma, V]

    k, token, writes, _ = _verify(target, target_params, target_pools, lane, drafted, q, rounds, max_len=max_len,
                                  filters=filters)
    return drafted, k, token, writes, draft_pools


def _verify(target: ModelDef, params, pools, lane: Lane, drafted, q, rounds, *, max_len: int, filters: bool):
    """The target's forward over the last two committed tokens and the drafts, then the acceptance rule.

    Returns (accepted k [b], next token [b], the target's writes, per-layer queries [b, gamma + 2, H, hd]).
    """
    sp = lane.sampling
    b, gamma = drafted.shape
    valid = lane.positions[:, 1] >= 0
    n = lane.positions[:, 1] + 1
    fed = jnp.concatenate([lane.tokens, drafted], axis=1)  # [b, gamma + 2] at positions n-2 .. n+gamma-1
    fed_pos = lane.positions[:, :1] + jnp.arange(gamma + 2)[None, :]
    fed_pos = jnp.where(valid[:, None] & (fed_pos >= 0) & (fed_pos < max_len), fed_pos, -1)
    caches = tuple(StepCache(k, v, lane.page_table) for k, v in pools)
    select = jnp.broadcast_to(jnp.arange(1, gamma + 2)[None, :], (b, gamma + 1))
    logits, caches = target.apply(params, fed, fed_pos, caches, select)
    p = warp(logits, sp, filters=filters)  # p[:, j]: distribution of position n + j
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(sp, ACCEPT, n + j, rounds)), out_axes=1)(
        jnp.arange(gamma))
    k, token = accept(p, q, drafted, u, lambda k: _keys(sp, RESIDUAL, n + k, rounds))
    num_pages, page_size = pools[0][0][0].shape[1:3]
    pages, offsets = token_pages(lane.page_table, fed_pos, page_size, num_pages)
    writes = (tuple((c.new_k, c.new_v) for c in caches), pages, offsets)
    return k, token, writes, [c.query for c in caches]


def spec_prefill_step(target: ModelDef, draft: ModelDef, target_params, draft_params, target_pools, draft_pools,
                      prefill: Lane, *, filters: bool):
    """Prefill lanes through the target (as `serving_step`) and the draft model (its pools written here).

    Returns (target's next tokens [P], target writes, draft pools).
    """
    _, tokens, writes = serving_step(target, target_params, target_pools, None, prefill, split=(), filters=filters)
    _, draft_pools = forward_and_write(draft, draft_params, draft_pools, prefill.tokens, prefill.positions,
                                       prefill.page_table, prefill.select[:, None])
    return tokens, writes, draft_pools


# ----- self-speculation: the target on a retrieval selection of its own pages drafts for itself -----

@partial(jax.tree_util.register_dataclass,
         data_fields=["k", "v", "page_table", "chunks", "base", "limit", "extra_k", "extra_v", "extra_pos",
                      "new_k", "new_v"], meta_fields=["window_pages"])
@dataclasses.dataclass(frozen=True)
class RetrievalStepCache:
    """One layer's retrieval view of each sequence's pages, for drafting (TriForce's middle level, paged).

    A query sees: the selected pages (`chunks`, page slots per KV head) below `base`; every page
    from `base` up to `limit` (the window: tokens committed since the selection was made); the
    round's own earlier tokens (`extra_*`, kept aside, not in pages, those before the step's
    first position); and the step's new tokens, causally. Pages are only read. With the sink
    page as the selection and `base` a fixed distance below `limit`, it is StreamingLLM's
    cache (attention sinks and a recent window): TriForce's draft model.
    """

    k: tuple  # (data,) [kv_heads, num_pages, page_size, hd]
    v: tuple
    page_table: jax.Array  # [b, pages_per_sequence]
    chunks: jax.Array  # [b, kv_heads, kept] page slots (indices into the page table)
    base: jax.Array  # [b] positions below it are read through the selection
    limit: jax.Array  # [b] positions at and above it are not read from pages
    extra_k: jax.Array  # [b, E, kv_heads, hd] the round's earlier tokens
    extra_v: jax.Array
    extra_pos: jax.Array  # [b, E], -1 where empty
    new_k: jax.Array | None = None
    new_v: jax.Array | None = None
    window_pages: int = 1

    def page_keys(self):
        """Keys, values [b, kv_heads, S, hd] and visibility [b, kv_heads, S] of the selected and window pages."""
        k_pool, v_pool = self.k[0], self.v[0]
        kv_heads, num_pages, page_size, hd = k_pool.shape
        b, width = self.page_table.shape
        kept = self.chunks.shape[-1]
        slots = jnp.clip(self.chunks, 0, width - 1)
        table = jnp.broadcast_to(self.page_table[:, None, :], (b, kv_heads, width))
        pages = jnp.minimum(jnp.take_along_axis(table, slots, axis=2), num_pages - 1)  # [b, kvH, kept]
        heads = jnp.arange(kv_heads)[None, :, None]
        sel_k = k_pool[heads, pages].reshape(b, kv_heads, kept * page_size, hd)
        sel_v = v_pool[heads, pages].reshape(b, kv_heads, kept * page_size, hd)
        sel_pos = (slots[..., None] * page_size + jnp.arange(page_size)).reshape(b, kv_heads, kept * page_size)
        sel_seen = (sel_pos < jnp.minimum(self.base, self.limit)[:, None, None])
        sel_seen &= jnp.repeat(self.chunks >= 0, page_size, axis=-1)

        win_slots = self.base[:, None] // page_size + jnp.arange(self.window_pages)[None, :]  # [b, W]
        win_pages = jnp.minimum(jnp.take_along_axis(self.page_table, jnp.clip(win_slots, 0, width - 1), axis=1),
                                num_pages - 1)
        w = self.window_pages * page_size
        win_k = k_pool[:, win_pages].reshape(kv_heads, b, w, hd).swapaxes(0, 1)
        win_v = v_pool[:, win_pages].reshape(kv_heads, b, w, hd).swapaxes(0, 1)
        win_pos = (win_slots[..., None] * page_size + jnp.arange(page_size)).reshape(b, w)
        win_seen = (win_pos >= self.base[:, None]) & (win_pos < self.limit[:, None])
        win_seen &= jnp.repeat(win_slots < width, page_size, axis=-1)
        keys = jnp.concatenate([sel_k, win_k], axis=2)
        values = jnp.concatenate([sel_v, win_v], axis=2)
        seen = jnp.concatenate([sel_seen, jnp.broadcast_to(win_seen[:, None], (b, kv_heads, w))], axis=2)
        return keys, values, seen

    def attend(self, q, k, v, positions):
        """q [b, T, H, hd], k, v [b, T, kvH, hd] at positions [b, T] (-1 = padding) -> (out f32, cache)."""
        b, t, h, hd = q.shape
        keys, values, seen = self.page_keys()
        kv_heads = keys.shape[1]
        qg = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, hd)
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, keys.astype(jnp.float32), precision=_HIGHEST) / math.sqrt(hd)
        logits = jnp.where(seen[:, :, None, None, :], logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [b, kvH, G, T]
        weights = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
        page_out = jnp.einsum("bkgts,bksd->btkgd", weights, values.astype(jnp.float32), precision=_HIGHEST)
        page_out, page_lse = page_out.reshape(b, t, h, hd), lse.transpose(0, 3, 1, 2).reshape(b, t, h)
        # Slots at or after the step's first position may hold an earlier inner round's rejected drafts.
        extra_pos = jnp.where(self.extra_pos < positions[:, :1], self.extra_pos, -1)
        extra_out, extra_lse = causal_attention(q, self.extra_k.swapaxes(1, 2), self.extra_v.swapaxes(1, 2),
                                                extra_pos, positions)
        new_out, new_lse = causal_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), positions, positions)
        out, _ = merge_partials([page_out, extra_out, new_out], [page_lse, extra_lse, new_lse])
        return out, dataclasses.replace(self, new_k=k, new_v=v)


def select_pages(k_pool, page_table, limit, query, kept: int):
    """TriForce's chunk selection with chunk = page: page slots [b, kvH, kept] for positions below `limit` [b].

    Each page's mean key is scored against the query [b, H, hd] (averaged over the KV head's
    query group); page 0 (attention sinks) and the page holding position limit - 1 are always kept.
    """
    kv_heads, num_pages, page_size, hd = k_pool.shape
    b, width = page_table.shape
    pages = jnp.minimum(page_table, num_pages - 1)
    mean_key = k_pool[:, pages].astype(jnp.float32).mean(axis=3)  # [kvH, b, width, hd]
    query = query.astype(jnp.float32).reshape(b, kv_heads, -1, hd).mean(2)  # [b, kvH, hd]
    score = jnp.einsum("kbsd,bkd->bks", mean_key, query, precision=_HIGHEST)
    slot = jnp.arange(width)[None, None, :]
    last = (jnp.maximum(limit, 1) - 1)[:, None, None] // page_size
    score = jnp.where((slot == 0) | (slot == last), jnp.inf, score)
    score = jnp.where(slot * page_size < limit[:, None, None], score, -jnp.inf)  # pages holding no token last
    return jnp.sort(jax.lax.top_k(score, kept)[1], axis=-1).astype(jnp.int32)


def self_decode_step(target: ModelDef, params, pools, lane: Lane, rounds, chunks, base, query, rebuild, *,
                     gamma: int, max_len: int, filters: bool, window_pages: int):
    """One self-speculative round per decode row: the target over a retrieval selection of its pages drafts
    `gamma` tokens, the target over all its pages verifies them (`spec_decode_step`'s rule and keys).

    chunks [b, L, kvH, kept], base [b]: each row's selection; rows with `rebuild` first get a new one,
    scored with query [b, L, H, hd] (the query of position n - 2, from the last verify or prefill).
    Returns (drafted, k, token, writes, queries [b, L, H, hd] of the new position n - 2, chunks, base).
    """
    sp = lane.sampling
    b = lane.tokens.shape[0]
    valid = lane.positions[:, 1] >= 0
    n = lane.positions[:, 1] + 1
    origin = n - 2  # the round's fed tokens start here: pages are read below it
    limit = jnp.maximum(origin, 0)
    chunks, base = _reselect(pools, lane.page_table, limit, query, chunks, base, rebuild)

    def where_valid(pos):
        return jnp.where(valid[:, None] & (pos >= 0) & (pos < max_len), pos, -1)

    extra, extra_pos = _empty_extra(target.config, b, gamma + 1)  # slot s: position origin + s
    rows = jnp.arange(b)[:, None]
    tokens, positions = lane.tokens, where_valid(lane.positions)
    drafted, qs = [], []
    select = jnp.ones((b, 1), jnp.int32)
    for j in range(gamma):
        logits, new = _round_forward(target, params, pools, lane.page_table, chunks, base, limit, extra, extra_pos,
                                     tokens, positions, select, window_pages)
        q = warp(logits[:, 0], sp, filters=filters)
        token = draw(q, _keys(sp, DRAFT, n + j, rounds))
        drafted.append(token)
        qs.append(q)
        extra, extra_pos = _keep(extra, extra_pos, new, positions, origin, rows)
        tokens, positions, select = token[:, None], where_valid((n + j)[:, None]), jnp.zeros_like(select)
    drafted = jnp.stack(drafted, axis=1)
    k, token, writes, queries = _verify(target, params, pools, lane, drafted, jnp.stack(qs, axis=1), rounds,
                                        max_len=max_len, filters=filters)
    return drafted, k, token, writes, _next_query(queries, k), chunks, base


def _reselect(pools, table, limit, query, chunks, base, rebuild):
    """New selections (`select_pages`, every layer) for the rows flagged `rebuild`; the others keep theirs."""
    def rebuilt():
        new = jnp.stack([select_pages(k[0], table, limit, query[:, i], chunks.shape[-1])
                         for i, (k, _) in enumerate(pools)], axis=1)
        return jnp.where(rebuild[:, None, None, None], new, chunks), jnp.where(rebuild, limit, base)

    return jax.lax.cond(jnp.any(rebuild), rebuilt, lambda: (chunks, base))


def _next_query(queries, k):
    """Per-layer queries [b, L, H, hd] of the new position n - 2 = n + k - 1: the verify's fed index k + 1
    (the target's own token is not fed yet)."""
    at = (k + 1)[:, None, None, None]
    return jnp.stack([jnp.take_along_axis(qy, at, axis=1)[:, 0] for qy in queries], axis=1)


def self_prefill_step(target: ModelDef, params, pools, prefill: Lane, *, filters: bool):
    """Prefill lanes through the target; also returns each lane's query at `select` [P, L, H, hd]
    (the last prompt token's, which scores the first retrieval selection)."""
    token, new_kv, queries = lane_forward(target, params, pools, prefill, filters=filters, impl="auto")
    num_pages, page_size = pools[0][0][0].shape[1:3]
    pages, offsets = token_pages(prefill.page_table, prefill.positions, page_size, num_pages)
    return token, (tuple(new_kv), pages, offsets), jnp.stack(queries, axis=1)


def _round_forward(model: ModelDef, params, pools, table, chunks, base, limit, extra, extra_pos, tokens, positions,
                   select, window_pages):
    """`model` on tokens [b, T] over a `RetrievalStepCache` view; returns (logits, new keys/values per layer)."""
    caches = tuple(RetrievalStepCache(k, v, table, chunks[:, i], base, limit, ek, ev, extra_pos,
                                      window_pages=window_pages)
                   for i, ((k, v), (ek, ev)) in enumerate(zip(pools, extra)))
    logits, caches = model.apply(params, tokens, positions, caches, select)
    return logits, [(c.new_k, c.new_v) for c in caches]


def _keep(extra, extra_pos, new, positions, origin, rows):
    """Store a forward's new keys/values in the round's slots (slot = position - origin; padding nowhere)."""
    slots = jnp.where(positions >= 0, positions - origin[:, None], extra_pos.shape[1])
    extra = [(ek.at[rows, slots].set(nk.astype(ek.dtype), mode="drop"),
              ev.at[rows, slots].set(nv.astype(ev.dtype), mode="drop")) for (ek, ev), (nk, nv) in zip(extra, new)]
    return extra, extra_pos.at[rows, slots].set(positions, mode="drop")


def _empty_extra(config, b: int, slots: int):
    hd = config.resolved_head_dim
    return [(jnp.zeros((b, slots, config.n_kv_heads, hd), jnp.float32),) * 2 for _ in range(config.n_layers)], \
        jnp.full((b, slots), -1, jnp.int32)


# ----- TriForce: draft model (StreamingLLM view) -> target on the retrieval view -> target on every page -----

def triforce_decode_step(target: ModelDef, draft: ModelDef, params, draft_params, pools, draft_pools, lane: Lane,
                         rounds, chunks, base, query, rebuild, *, gamma: int, gamma_outer: int, max_len: int,
                         filters: bool, window_pages: int, draft_window: int, draft_window_pages: int):
    """One TriForce round per decode row, lossless at both levels.

    Inner level, repeated until every row has `gamma_outer` tokens: the draft model, over its
    own pages as a StreamingLLM cache (the sink page and the last `draft_window` tokens),
    drafts `gamma` tokens; the target over its retrieval view verifies them (the rule of
    `accept`, draws keyed by the inner round too) and the row keeps its accepted drafts plus
    one. Outer level: the target over every page verifies the first `gamma_outer` of them,
    with the retrieval view's distributions as q (the inner loop's output follows them).
    Selection inputs as `self_decode_step`. Returns (drafted [b, gamma_outer], k, token,
    target writes, draft writes, queries, chunks, base, inner (drafted, accepted) counts [b, 2]).
    """
    sp = lane.sampling
    b = lane.tokens.shape[0]
    vocab = target.config.vocab_size
    valid = lane.positions[:, 1] >= 0
    n = lane.positions[:, 1] + 1
    origin = n - 2  # round slot s holds position origin + s; slots 0, 1: the last two committed tokens
    limit = jnp.maximum(origin, 0)
    rows = jnp.arange(b)[:, None]
    chunks, base = _reselect(pools, lane.page_table, limit, query, chunks, base, rebuild)
    d_kv = draft.config.n_kv_heads
    sink = jnp.zeros((b, draft.config.n_layers, d_kv, 1), jnp.int32)  # page 0: the attention sinks
    page_size = pools[0][0][0].shape[2]
    d_base = jnp.maximum(limit - draft_window, page_size)  # the sink page below, the recent window above

    slots = gamma_outer + gamma + 2
    seq = jnp.zeros((b, slots), jnp.int32).at[:, :2].set(lane.tokens)
    qbuf = jnp.zeros((b, gamma_outer + gamma + 1, vocab), jnp.float32)  # retrieval distribution of token i
    t_extra, t_pos = _empty_extra(target.config, b, slots)
    d_extra, d_pos = _empty_extra(draft.config, b, slots)

    def fed(seq, active, m, width):
        """Tokens and positions of round slots m .. m + width - 1 (padding where inactive)."""
        at = m[:, None] + jnp.arange(width)[None, :]
        tokens = jnp.take_along_axis(seq, jnp.minimum(at, slots - 1), axis=1)
        pos = origin[:, None] + at
        return tokens, jnp.where(active[:, None] & (pos >= 0) & (pos < max_len) & (at < slots), pos, -1)

    def inner(carry):
        seq, qbuf, m, t_extra, t_pos, d_extra, d_pos, r, counts = carry
        active = valid & (m < gamma_outer)
        key_round = r + 1  # inner draws: keyed by the inner round as well (outer draws are not)

        def keys(stream, pos):
            return jax.vmap(jax.random.fold_in)(_keys(sp, stream, pos, rounds), jnp.broadcast_to(key_round, (b,)))

        drafted, qs = [], []
        tokens, positions = fed(seq, active, m, 2)
        select = jnp.ones((b, 1), jnp.int32)
        for j in range(gamma + 1):  # the last forward only stores the last draft's keys/values
            logits, new = _round_forward(draft, draft_params, draft_pools, lane.page_table, sink, d_base, limit,
                                         d_extra, d_pos, tokens, positions, select, draft_window_pages)
            d_extra, d_pos = _keep(d_extra, d_pos, new, positions, origin, rows)
            if j == gamma:
                break
            q = warp(logits[:, 0], sp, filters=filters)
            token = draw(q, keys(DRAFT, n + m + j))
            drafted.append(token)
            qs.append(q)
            seq = seq.at[rows[:, 0], jnp.where(active, m + 2 + j, slots)].set(token, mode="drop")
            tokens, positions = token[:, None], fed(seq, active, m + 2 + j, 1)[1]
            select = jnp.zeros((b, 1), jnp.int32)
        drafted, q = jnp.stack(drafted, axis=1), jnp.stack(qs, axis=1)

        tokens, positions = fed(seq, active, m, gamma + 2)
        pick = jnp.broadcast_to(jnp.arange(1, gamma + 2)[None, :], (b, gamma + 1))
        logits, new = _round_forward(target, params, pools, lane.page_table, chunks, base, limit, t_extra, t_pos,
                                     tokens, positions, pick, window_pages)
        t_extra, t_pos = _keep(t_extra, t_pos, new, positions, origin, rows)
        p = warp(logits, sp, filters=filters)  # p[:, j]: the retrieval view's distribution of slot m + 2 + j
        u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(keys(ACCEPT, n + m + j)), out_axes=1)(jnp.arange(gamma))
        k, token = accept(p, q, drafted, u, lambda k: keys(RESIDUAL, n + m + k))
        # Slots m + 2 .. m + 2 + k: the accepted drafts, then the retrieval view's own token.
        j = jnp.arange(gamma + 1)[None, :]
        out = jnp.where(j < k[:, None], jnp.pad(drafted, ((0, 0), (0, 1))), token[:, None])
        keep = active[:, None] & (j <= k[:, None])
        at = jnp.where(keep, m[:, None] + 2 + j, slots)
        seq = seq.at[rows, at].set(out, mode="drop")
        qbuf = qbuf.at[rows, jnp.where(keep, m[:, None] + j, qbuf.shape[1])].set(p, mode="drop")
        counts = counts + jnp.where(active[:, None], jnp.stack([jnp.full((b,), gamma), k], axis=1), 0)
        m = jnp.where(active, m + k + 1, m)
        return seq, qbuf, m, t_extra, t_pos, d_extra, d_pos, r + 1, counts

    def more(carry):
        return jnp.any(valid & (carry[2] < gamma_outer))

    carry = (seq, qbuf, jnp.zeros((b,), jnp.int32), t_extra, t_pos, d_extra, d_pos, jnp.int32(0),
             jnp.zeros((b, 2), jnp.int32))
    seq, qbuf, _, _, _, d_extra, d_pos, _, counts = jax.lax.while_loop(more, inner, carry)

    drafted = seq[:, 2:2 + gamma_outer]
    k, token, writes, queries = _verify(target, params, pools, lane, drafted, qbuf[:, :gamma_outer], rounds,
                                        max_len=max_len, filters=filters)
    num_pages = pools[0][0][0].shape[1]
    pages, offsets = token_pages(lane.page_table, d_pos, page_size, num_pages)
    draft_writes = (tuple((ek, ev) for ek, ev in d_extra), pages, offsets)
    return drafted, k, token, writes, draft_writes, _next_query(queries, k), chunks, base, counts


def triforce_prefill_step(target: ModelDef, draft: ModelDef, params, draft_params, pools, draft_pools,
                          prefill: Lane, *, filters: bool):
    """`self_prefill_step` for the target, and the draft model's keys/values (written into its pools here)."""
    token, writes, query = self_prefill_step(target, params, pools, prefill, filters=filters)
    _, draft_pools = forward_and_write(draft, draft_params, draft_pools, prefill.tokens, prefill.positions,
                                       prefill.page_table, prefill.select[:, None])
    return token, writes, query, draft_pools
