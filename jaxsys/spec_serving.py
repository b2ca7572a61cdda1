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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsys.kvcache.paged import token_pages, write_tokens
from jaxsys.model import ModelDef
from jaxsys.nanobatch import Lane, StepCache, serving_step
from jaxsys.sampling import ACCEPT, DRAFT, RESIDUAL, SamplingParams, draw, row_keys, warp
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

    fed = jnp.concatenate([lane.tokens, drafted], axis=1)  # [b, gamma + 2] at positions n-2 .. n+gamma-1
    fed_pos = where_valid(lane.positions[:, :1] + jnp.arange(gamma + 2)[None, :])
    caches = tuple(StepCache(k, v, lane.page_table) for k, v in target_pools)
    select = jnp.broadcast_to(jnp.arange(1, gamma + 2)[None, :], (b, gamma + 1))
    logits, caches = target.apply(target_params, fed, fed_pos, caches, select)
    p = warp(logits, sp, filters=filters)  # p[:, j]: distribution of position n + j
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(sp, ACCEPT, n + j, rounds)), out_axes=1)(
        jnp.arange(gamma))
    k, token = accept(p, q, drafted, u, lambda k: _keys(sp, RESIDUAL, n + k, rounds))
    num_pages, page_size = target_pools[0][0][0].shape[1:3]
    pages, offsets = token_pages(lane.page_table, fed_pos, page_size, num_pages)
    writes = (tuple((c.new_k, c.new_v) for c in caches), pages, offsets)
    return drafted, k, token, writes, draft_pools


def spec_prefill_step(target: ModelDef, draft: ModelDef, target_params, draft_params, target_pools, draft_pools,
                      prefill: Lane, *, filters: bool):
    """Prefill lanes through the target (as `serving_step`) and the draft model (its pools written here).

    Returns (target's next tokens [P], target writes, draft pools).
    """
    _, tokens, writes = serving_step(target, target_params, target_pools, None, prefill, split=(), filters=filters)
    _, draft_pools = forward_and_write(draft, draft_params, draft_pools, prefill.tokens, prefill.positions,
                                       prefill.page_table, prefill.select[:, None])
    return tokens, writes, draft_pools
