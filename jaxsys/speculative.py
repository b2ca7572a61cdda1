"""Lossless speculative decoding as functional loops: draft -> target, self-speculation, TriForce.

A *drafter* proposes gamma tokens with their distributions q; the *verifier* scores
them in one forward and keeps the longest accepted prefix (Leviathan et al., Chen et
al.): token d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); at the first
rejection a token is drawn from normalize(max(p - q, 0)); when all are accepted a bonus
token is drawn from p. p and q are the *warped* distributions (temperature, top-k,
top-p; one-hot at temperature 0, see `jaxsys.sampling`), so the output follows exactly
the distribution of plain sampling, and greedy output equals plain greedy output.

Modes:
- `draft`: a small model with a dense cache drafts for the target.
- `self`: the target itself on a retrieval sparse KV cache (TriForce's middle level,
  `jaxsys.kvcache.RetrievalCache`) drafts for the target on its full cache.
- `triforce`: TriForce (Sun et al., 2024): the small model on a StreamingLLM cache drafts
  for the retrieval target, whose speculative loop in turn drafts gamma_outer tokens for
  the full target. The q of the outer level is the retrieval target's distribution for
  every token it emits, resampled ones included: the inner loop is lossless, so each
  token it emits is distributed as the retrieval target's warped distribution. (The
  public TriForce code resamples from p at the middle level instead of the residual,
  which is not exact; here every level uses the residual.)

Static shapes throughout: every sequence drafts gamma tokens per round and accepts its
own number; caches are addressed by position, so a rejection rolls back by moving the
sequence's length, not by writing. Each drafting or verifying forward re-feeds the last
two committed tokens (positions n-2, n-1) ahead of the new ones: after a round some
model may not yet have seen them (the bonus token, a resampled token), and writing a
position twice writes the same values. The retrieval cache is rebuilt from the full
cache every `rebuild_every` target rounds, when a round's acceptance falls below
`rebuild_below`, or when its window of new tokens would overflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.decode import (STOP_LENGTH, STOP_TOKEN, Decoded, check_request, forward, pad_prompts,
                           prefill, prefill_chunk_for)
from jaxsys.kvcache import build_retrieval, dense_cache, retrieval_cache, streaming_cache
from jaxsys.model import ModelDef
from jaxsys.sampling import ACCEPT, DRAFT, RESIDUAL, SamplingParams, draw, row_keys, warp

MODES = ("draft", "self", "triforce")


@dataclass(frozen=True)
class SpecConfig:
    mode: str = "draft"
    gamma: int = 4  # tokens drafted per round: draft -> verifier (the inner level for triforce)
    gamma_outer: int = 6  # triforce: tokens the retrieval level drafts per full-target round
    retrieval_budget: int = 256  # tokens of the full cache kept by the retrieval cache
    chunk_size: int = 16  # retrieval chunk
    rebuild_every: int = 8  # full-target rounds between retrieval rebuilds
    rebuild_below: float = 0.5  # ... or sooner, when a round accepts less than this fraction
    draft_sink: int = 16  # triforce's draft: StreamingLLM attention sinks
    draft_window: int = 256  # ... and recent window
    # Testing only: resample rejected tokens from p instead of the residual (not lossless).
    residual: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"speculative mode {self.mode!r} is not one of {MODES}")
        if self.gamma < 1 or self.gamma_outer < 1:
            raise ValueError(f"gamma must be >= 1 at every level, got gamma={self.gamma} "
                             f"gamma_outer={self.gamma_outer}")
        if self.uses_retrieval:
            if self.chunk_size < 1 or self.retrieval_budget % self.chunk_size:
                raise ValueError(f"retrieval budget {self.retrieval_budget} must be a positive multiple of "
                                 f"chunk size {self.chunk_size}")
            if self.retrieval_budget < 2 * self.chunk_size:
                raise ValueError(f"retrieval budget {self.retrieval_budget} must hold at least two chunks of "
                                 f"{self.chunk_size} (the sink chunk and the most recent one)")

    @property
    def uses_retrieval(self) -> bool:
        return self.mode in ("self", "triforce")

    @property
    def outer_gamma(self) -> int:
        """Tokens the full target verifies per round."""
        return self.gamma_outer if self.mode == "triforce" else self.gamma

    @property
    def retrieval_window(self) -> int:
        """Window slots after the retrieved chunks: tokens written between rebuilds."""
        return self.rebuild_every * (self.outer_gamma + 1) + self.outer_gamma + self.gamma + 4


class Level(NamedTuple):
    """Acceptance counters of one drafter -> verifier level (summed over sequences)."""
    proposed: jax.Array  # [gamma] drafted tokens at each draft position
    accepted: jax.Array  # [gamma]
    rounds: jax.Array  # verifier forwards (one per sequence and round)
    emitted: jax.Array  # tokens the level produced (accepted + 1 per round)

    @classmethod
    def zeros(cls, gamma: int) -> "Level":
        z = jnp.zeros((), jnp.float32)
        return cls(jnp.zeros((gamma,), jnp.float32), jnp.zeros((gamma,), jnp.float32), z, z)

    def add(self, active, k, gamma) -> "Level":
        act = active.astype(jnp.float32)
        reached = (jnp.arange(gamma)[None, :] <= k[:, None]).astype(jnp.float32) * act[:, None]
        acc = (jnp.arange(gamma)[None, :] < k[:, None]).astype(jnp.float32) * act[:, None]
        return Level(self.proposed + reached.sum(0), self.accepted + acc.sum(0), self.rounds + act.sum(),
                     self.emitted + ((k + 1) * active).sum())


def _feed(model: ModelDef, params, cache, seq, end, width, active):
    """Run the `width` tokens of `seq` before position `end` [B]; logits [B, width, V]."""
    pos = end[:, None] - width + jnp.arange(width)[None, :]
    tokens = jnp.take_along_axis(seq, jnp.maximum(pos, 0), axis=1)
    pos = jnp.where(active[:, None] & (pos >= 0), pos, -1)
    return forward(model, params, cache, tokens, pos)


def _keys(sp, stream, position, round_, level):
    """Keys per sequence for a draw: stream, position, round and level keep every draw independent."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, round_), level))(
        row_keys(sp, stream, position))


def _draft(model, params, cache, seq, n, gamma, sp, active, round_, level, filters):
    """Autoregressive drafting of seq[n .. n+gamma) -> (seq, q [B, gamma, V], cache).

    The first step feeds the last two committed tokens, later steps only the previous draft.
    """
    b = seq.shape[0]
    rows = jnp.arange(b)

    def step(j, carry, width):
        seq, cache, qs = carry
        logits, cache = _feed(model, params, cache, seq, n + j, width, active)
        probs = warp(logits[:, -1], sp, filters=filters)
        token = draw(probs, _keys(sp, DRAFT, n + j, round_, level))
        seq = seq.at[rows, n + j].set(jnp.where(active, token, seq[rows, n + j]))
        return seq, cache, qs.at[:, j].set(probs)

    qs = jnp.zeros((b, gamma, model.config.vocab_size), jnp.float32)
    carry = step(0, (seq, cache, qs), 2)
    for j in range(1, gamma):  # unrolled: gamma is small
        carry = step(j, carry, 1)
    return carry


def _verify(model, params, cache, seq, n, q, gamma, sp, active, round_, level, filters, residual):
    """Score seq[n .. n+gamma) under the verifier -> (k accepted [B], next token [B], p [B, gamma+1, V], cache)."""
    logits, cache = _feed(model, params, cache, seq, n + gamma, gamma + 2, active)
    p = warp(logits[:, 1:], sp, filters=filters)  # p[:, j]: distribution of position n + j
    drafted = jnp.take_along_axis(seq, n[:, None] + jnp.arange(gamma)[None, :], axis=1)  # [B, gamma]
    u = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(sp, ACCEPT, n + j, round_, level)), out_axes=1)(
        jnp.arange(gamma))
    k, token = accept(p, q, drafted, u, lambda k: _keys(sp, RESIDUAL, n + k, round_, level), residual=residual)
    return k, token, p, cache


def accept(p, q, drafted, u, residual_keys, *, residual: bool = True):
    """The verifier's rule -> (k accepted [B], next token [B]).

    p [B, gamma+1, V]: the verifier's warped distributions at the drafted positions and one
    more; q [B, gamma, V]: the drafter's; drafted [B, gamma]; u [B, gamma] uniforms;
    `residual_keys(k)` the keys [B] of the draw at index k. Token j is accepted while
    u_j q_j(d_j) < p_j(d_j); then a token from normalize(max(p_k - q_k, 0)) (from p_k
    after all gamma, or with `residual=False`, which is not exact: for the power test).
    """
    b, gamma = drafted.shape
    rows = jnp.arange(b)
    p_d = jnp.take_along_axis(p[:, :gamma], drafted[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
    accepted = u * q_d < p_d  # u < p/q without dividing by q (q_d > 0: d was drawn from q)
    k = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    p_k = p[rows, k]
    q_k = jnp.where((k < gamma)[:, None], q[rows, jnp.minimum(k, gamma - 1)], 0.0)
    resid = jnp.maximum(p_k - q_k, 0.0) if residual else p_k
    mass = resid.sum(-1, keepdims=True)
    resid = jnp.where(mass > 0, resid / jnp.where(mass > 0, mass, 1.0), p_k)
    return k, draw(resid, residual_keys(k))


class _State(NamedTuple):
    seq: jax.Array  # [B, L] prompt, committed tokens, then the current drafts
    n: jax.Array  # [B] committed length (prompt included)
    count: jax.Array  # [B] generated tokens
    done: jax.Array
    stopped: jax.Array
    target: tuple  # the full target's dense cache
    draft: tuple | None  # the draft model's cache (dense or streaming)
    retrieval: tuple | None  # the target's retrieval cache
    base: jax.Array  # [B] retrieval: committed length at the last rebuild
    outer: Level
    inner: Level | None
    round: jax.Array
    since_rebuild: jax.Array
    rebuilds: jax.Array


def speculative_prefill(target: ModelDef, target_params, draft: ModelDef | None, draft_params, caches, prompts,
                        prompt_lengths, *, config: SpecConfig, chunk: int, draft_chunk: int):
    """Prompts into every level's cache: target (full), draft, and the retrieval cache built from the target's."""
    target_cache, draft_cache, retr_cache = caches
    _, target_cache = prefill(target, target_params, target_cache, prompts, prompt_lengths, chunk=chunk)
    if draft_cache is not None:
        _, draft_cache = prefill(draft, draft_params, draft_cache, prompts, prompt_lengths, chunk=draft_chunk)
    if retr_cache is not None:
        retr_cache = build_retrieval(target_cache, prompt_lengths, retr_cache, chunk_size=config.chunk_size)
    return target_cache, draft_cache, retr_cache


def speculative_loop(target: ModelDef, target_params, draft: ModelDef | None, draft_params, caches, prompts,
                     prompt_lengths, sp: SamplingParams, max_new, *, config: SpecConfig, max_new_tokens: int,
                     stop_ids: tuple[int, ...], filters: bool, pad: int = 0):
    """Rounds of draft + verify until every sequence ends -> (Decoded, metrics pytree)."""
    cfg = config
    b = prompts.shape[0]
    rows = jnp.arange(b)
    seq_len = prompts.shape[1] + max_new_tokens + cfg.outer_gamma + cfg.gamma + 4
    seq = jnp.zeros((b, seq_len), jnp.int32).at[:, :prompts.shape[1]].set(prompts)
    target_cache, draft_cache, retr_cache = caches
    stop_arr = jnp.asarray(stop_ids or (-1,), jnp.int32)
    gamma = cfg.outer_gamma

    def outer_draft(state: _State, active):
        """gamma tokens at seq[n ..] with their distributions q, from the mode's drafter."""
        if cfg.mode == "draft":
            seq, dc, q = _draft(draft, draft_params, state.draft, state.seq, state.n, gamma, sp, active,
                                state.round, 0, filters)
            return state._replace(seq=seq, draft=dc), q
        if cfg.mode == "self":
            seq, rc, q = _draft(target, target_params, state.retrieval, state.seq, state.n, gamma, sp, active,
                                state.round, 0, filters)
            return state._replace(seq=seq, retrieval=rc), q
        return _triforce_draft(state, active)

    def _triforce_draft(state: _State, active):
        """The retrieval target's own speculative loop (drafted by the streaming draft model)."""
        g = cfg.gamma
        qbuf = jnp.zeros((b, gamma + g + 1, target.config.vocab_size), jnp.float32)

        def cond(c):
            seq, m, dc, rc, qbuf, level, it = c
            return jnp.any(active & (m - state.n < gamma))

        def body(c):
            seq, m, dc, rc, qbuf, level, it = c
            act = active & (m - state.n < gamma)
            key_round = state.round * 4096 + it
            seq, dc, q = _draft(draft, draft_params, dc, seq, m, g, sp, act, key_round, 1, filters)
            k, token, p, rc = _verify(target, target_params, rc, seq, m, q, g, sp, act, key_round, 1, filters,
                                      cfg.residual)
            seq = seq.at[rows, m + k].set(jnp.where(act, token, seq[rows, m + k]))
            # Distribution of each emitted token under the retrieval target: p[:, j], j <= k.
            offset = m - state.n
            j = jnp.arange(g + 1)
            slot = jnp.where(act[:, None] & (j[None, :] <= k[:, None]), offset[:, None] + j[None, :], qbuf.shape[1])
            qbuf = qbuf.at[rows[:, None], slot].set(p, mode="drop")
            return seq, m + jnp.where(act, k + 1, 0), dc, rc, qbuf, level.add(act, k, g), it + 1

        seq, m, dc, rc, qbuf, level, _ = jax.lax.while_loop(
            cond, body, (state.seq, state.n, state.draft, state.retrieval, qbuf, state.inner, jnp.int32(0)))
        return state._replace(seq=seq, draft=dc, retrieval=rc, inner=level), qbuf[:, :gamma]

    def body(state: _State) -> _State:
        active = ~state.done
        state, q = outer_draft(state, active)
        k, token, _, target_cache = _verify(target, target_params, state.target, state.seq, state.n, q, gamma, sp,
                                            active, state.round, 0, filters, cfg.residual)
        seq = state.seq.at[rows, state.n + k].set(jnp.where(active, token, state.seq[rows, state.n + k]))
        # The round's new tokens: seq[n .. n+k]; cut at a stop token and at each sequence's limit.
        j = jnp.arange(gamma + 1)
        new = jnp.take_along_axis(seq, state.n[:, None] + j[None, :], axis=1)
        is_stop = jnp.isin(new, stop_arr) & (j[None, :] <= k[:, None])
        first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, axis=1), gamma + 1)
        take = jnp.minimum(jnp.minimum(k + 1, first_stop + 1), max_new - state.count)
        take = jnp.where(active, take, 0)
        count = state.count + take
        hit_stop = active & (first_stop < take)
        done = state.done | hit_stop | (count >= max_new)
        stopped = jnp.where(hit_stop, STOP_TOKEN, state.stopped)
        outer = state.outer.add(active, k, gamma)
        state = state._replace(seq=seq, n=state.n + take, count=count, done=done, stopped=stopped,
                               target=target_cache, outer=outer, round=state.round + 1,
                               since_rebuild=state.since_rebuild + 1)
        if cfg.uses_retrieval:
            rate = jnp.sum(jnp.where(active, k, 0)) / jnp.maximum(jnp.sum(active) * gamma, 1)
            overflow = jnp.any(state.n - state.base + gamma + cfg.gamma + 4 > cfg.retrieval_window)
            need = (state.since_rebuild >= cfg.rebuild_every) | (rate < cfg.rebuild_below) | overflow
            need = need & ~jnp.all(done)
            # The full cache is right below n - 1 (position n - 1 is a resampled or bonus token).
            # Only the small retrieval cache passes through the cond: a large carried operand
            # (the full cache) would be copied on every round.
            valid = jnp.maximum(state.n - 1, 1)
            retrieval, base = jax.lax.cond(
                need, lambda: (build_retrieval(state.target, valid, state.retrieval, chunk_size=cfg.chunk_size),
                               valid),
                lambda: (state.retrieval, state.base))
            state = state._replace(retrieval=retrieval, base=base,
                                   since_rebuild=jnp.where(need, 0, state.since_rebuild),
                                   rebuilds=state.rebuilds + need)
        return state

    state = _State(seq, prompt_lengths, jnp.zeros((b,), jnp.int32), max_new <= 0,
                   jnp.full((b,), STOP_LENGTH, jnp.int32), target_cache, draft_cache, retr_cache, prompt_lengths,
                   Level.zeros(gamma), Level.zeros(cfg.gamma) if cfg.mode == "triforce" else None,
                   jnp.int32(0), jnp.int32(0), jnp.int32(0))
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
    idx = prompt_lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.take_along_axis(state.seq, jnp.minimum(idx, seq_len - 1), axis=1)
    tokens = jnp.where(jnp.arange(max_new_tokens)[None, :] < state.count[:, None], tokens, pad)
    metrics = {"outer": state.outer, "inner": state.inner, "rebuilds": state.rebuilds, "rounds": state.round}
    return Decoded(tokens, state.count, state.stopped, state.target), metrics


def speculative_generate(target, target_params, draft, draft_params, caches, prompts, prompt_lengths, sp, max_new, *,
                         config: SpecConfig, max_new_tokens: int, stop_ids: tuple[int, ...], chunk: int,
                         draft_chunk: int, filters: bool, pad: int = 0):
    """Prefill and loop as one program -> (Decoded, metrics pytree)."""
    caches = speculative_prefill(target, target_params, draft, draft_params, caches, prompts, prompt_lengths,
                                 config=config, chunk=chunk, draft_chunk=draft_chunk)
    return speculative_loop(target, target_params, draft, draft_params, caches, prompts, prompt_lengths, sp,
                            max_new, config=config, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            filters=filters, pad=pad)


def summarize(metrics, generated: int) -> dict:
    """Host-side figures per level from the counters of `speculative_generate`."""
    def level(lv: Level) -> dict:
        proposed, accepted = np.asarray(lv.proposed), np.asarray(lv.accepted)
        rounds = float(lv.rounds)
        return {"acceptance_rate": float(accepted.sum() / max(proposed.sum(), 1)),
                "per_position_acceptance": [round(float(a / p), 4) if p else None
                                            for a, p in zip(accepted, proposed)],
                "mean_accepted_length": float(accepted.sum() / max(rounds, 1)),
                "tokens_per_round": float(lv.emitted) / max(rounds, 1),
                "verifier_forwards": int(rounds)}
    out = {"levels": {"target": level(metrics["outer"])}}
    if metrics["inner"] is not None:
        out["levels"]["retrieval"] = level(metrics["inner"])
    out["target_forwards_per_token"] = float(metrics["outer"].rounds) / max(generated, 1)
    out["retrieval_rebuilds"] = int(metrics["rebuilds"])
    return out


class SpeculativeDecoder:
    """Compiled speculative generation for a target (and a draft), a batch size and a cache length."""

    def __init__(self, target: ModelDef, target_params, draft: ModelDef | None = None, draft_params=None, *,
                 config: SpecConfig, max_len: int, batch: int = 1, prefill_chunk: int = 512):
        if config.mode in ("draft", "triforce"):
            if draft is None or draft_params is None:
                raise ValueError(f"speculative mode {config.mode!r} needs a draft model (--draft PATH)")
            if draft.config.vocab_size != target.config.vocab_size:
                raise ValueError(f"draft and target vocabularies differ ({draft.config.vocab_size} vs "
                                 f"{target.config.vocab_size} tokens); a draft must share the target's tokenizer")
        else:
            draft, draft_params = None, None
        if config.uses_retrieval and config.retrieval_budget > max_len:
            raise ValueError(f"retrieval budget {config.retrieval_budget} exceeds the cache length {max_len}")
        self.target, self.target_params, self.draft, self.draft_params = target, target_params, draft, draft_params
        self.config, self.max_len, self.batch, self.prefill_chunk = config, max_len, batch, prefill_chunk
        self._programs: dict = {}
        self._cache_builders: dict = {}

    @property
    def cache_len(self) -> int:
        """Full-cache slots: the longest sequence plus one round of drafts past it."""
        c = self.config
        return self.max_len + c.outer_gamma + c.gamma + 4

    def new_caches(self, prompt_width: int):
        length = max(self.cache_len, prompt_width)
        if length not in self._cache_builders:  # compiled once per length; each call gives fresh buffers
            self._cache_builders[length] = jax.jit(self._cache_builder(length))
        return self._cache_builders[length]()

    def _cache_builder(self, length: int):
        c, b = self.config, self.batch

        def make():
            target = dense_cache(self.target.config, b, length)
            draft = None
            if c.mode == "draft":
                draft = dense_cache(self.draft.config, b, length)
            elif c.mode == "triforce":
                draft = streaming_cache(self.draft.config, b, sink=c.draft_sink, window=c.draft_window)
            retr = None
            if c.uses_retrieval:
                retr = retrieval_cache(self.target.config, b, budget=c.retrieval_budget, window=c.retrieval_window)
            return target, draft, retr
        return make

    def programs(self, *, max_new_tokens, stop_ids, chunk, draft_chunk, filters):
        """(prefill, loop): jitted, the prefill donating the caches it fills."""
        key = (max_new_tokens, stop_ids, chunk, draft_chunk, filters)
        if key not in self._programs:
            def run_prefill(target_params, draft_params, caches, prompts, lengths):
                return speculative_prefill(self.target, target_params, self.draft, draft_params, caches, prompts,
                                           lengths, config=self.config, chunk=chunk, draft_chunk=draft_chunk)

            def run_loop(target_params, draft_params, caches, prompts, lengths, sp, max_new):
                return speculative_loop(self.target, target_params, self.draft, draft_params, caches, prompts,
                                        lengths, sp, max_new, config=self.config, max_new_tokens=max_new_tokens,
                                        stop_ids=stop_ids, filters=filters)
            self._programs[key] = (jax.jit(run_prefill, donate_argnums=(2,)), jax.jit(run_loop))
        return self._programs[key]

    def prepare(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams | None = None,
                stop_ids: tuple[int, ...] = (), max_new: list[int] | None = None):
        """(prefill, loop, caches, prompt arrays, sampling, limits) for a batch of prompts, inputs checked."""
        check_request(prompts, max_new_tokens, batch=self.batch, max_len=self.max_len)
        chunk = prefill_chunk_for(max(len(p) for p in prompts), self.prefill_chunk)
        draft_chunk = chunk
        if self.config.mode == "triforce":  # a prefill chunk must fit the draft's ring window
            draft_chunk = min(chunk, 1 << (self.config.draft_window.bit_length() - 1))
        tokens, lengths = pad_prompts(prompts, chunk, vocab=self.target.config.vocab_size)
        sp = sampling or SamplingParams.make(self.batch)
        limit = np.full((self.batch,), max_new_tokens, np.int32) if max_new is None else np.asarray(max_new, np.int32)
        prefill_fn, loop_fn = self.programs(max_new_tokens=max_new_tokens, stop_ids=tuple(sorted(set(stop_ids))),
                                            chunk=chunk, draft_chunk=draft_chunk, filters=sp.needs_filters())
        return prefill_fn, loop_fn, self.new_caches(tokens.shape[1]), jnp.asarray(tokens), jnp.asarray(lengths), \
            sp, jnp.asarray(limit)

    def generate(self, prompts: list[list[int]], *, timed: bool = False, **kwargs):
        """-> (Decoded, metrics summary dict); with `timed`, compiled first and the summary gains
        `prefill_s` and `loop_s` (wall times of the two programs, results on the host)."""
        prefill_fn, loop_fn, caches, tokens, lengths, sp, limit = self.prepare(prompts, **kwargs)
        if timed:
            caches_shape = jax.eval_shape(lambda: caches)
            prefill_fn = prefill_fn.lower(self.target_params, self.draft_params, caches_shape, tokens, lengths).compile()
            loop_fn = loop_fn.lower(self.target_params, self.draft_params, caches_shape, tokens, lengths, sp,
                                    limit).compile()
        t0 = time.perf_counter()
        caches = prefill_fn(self.target_params, self.draft_params, caches, tokens, lengths)
        jax.block_until_ready(caches)
        t1 = time.perf_counter()
        out, metrics = loop_fn(self.target_params, self.draft_params, caches, tokens, lengths, sp, limit)
        lengths_host = np.asarray(out.lengths)
        np.asarray(out.tokens)
        t2 = time.perf_counter()
        summary = summarize(metrics, int(lengths_host.sum()))
        if timed:
            summary.update(prefill_s=t1 - t0, loop_s=t2 - t1)
        return out, summary
