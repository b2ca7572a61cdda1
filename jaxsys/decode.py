"""Functional decoding: chunked prefill, and generation as one `lax.while_loop` program.

Everything here is a pure function of (params, cache, tokens, ...) that returns the
new cache, so a caller can jit it with the cache donated. `Decoder` does that for a
model and a cache length, checks inputs on the host, and pads a batch of prompts of
different lengths to one shape: prompts are right-padded, and pad positions are
written nowhere (position -1), so every sequence continues from its own length.

One `generate` call is one compiled program: prefill, then a while_loop that
decodes one token per sequence per iteration until every sequence has met a stop
token or its own token limit (sequences that are done keep their outputs fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.kvcache import dense_cache
from jaxsys.model import ModelDef
from jaxsys.sampling import SamplingParams, sample

STOP_LENGTH, STOP_TOKEN = 0, 1


class Decoded(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32, `pad` after each sequence's end
    lengths: jax.Array  # [batch] generated tokens (a stop token included)
    stopped_by: jax.Array  # [batch] STOP_LENGTH or STOP_TOKEN
    cache: tuple


def forward(model: ModelDef, params, cache, tokens, positions, select=None):
    """One cached forward of tokens [B, T] at positions [B, T] (-1 = padding, stored nowhere)."""
    return model.apply(params, tokens, positions, cache, select)


def prefill(model: ModelDef, params, cache, prompts: jax.Array, lengths: jax.Array, *, chunk: int):
    """Prompts [B, P] (right-padded; P a multiple of `chunk`) -> (logits after each prompt [B, V], cache).

    The prompt runs through the model `chunk` tokens at a time (a scan, so long prompts
    neither unroll into the program nor build [P, P] attention scores).
    """
    b, p = prompts.shape
    n_chunks = p // chunk
    chunks = prompts.reshape(b, n_chunks, chunk).swapaxes(0, 1)  # [n_chunks, B, chunk]
    last = lengths - 1  # index of each prompt's last token

    def body(carry, xs):
        cache, logits = carry
        tokens, c = xs
        pos = c * chunk + jnp.arange(chunk)[None, :]
        pos = jnp.where(pos < lengths[:, None], pos, -1)
        local = jnp.clip(last - c * chunk, 0, chunk - 1)[:, None]
        out, cache = forward(model, params, cache, tokens, pos, select=local)
        here = (last >= c * chunk) & (last < (c + 1) * chunk)
        return (cache, jnp.where(here[:, None], out[:, 0], logits)), None

    init = jnp.zeros((b, model.config.vocab_size), jnp.float32)
    (cache, logits), _ = jax.lax.scan(body, (cache, init), (chunks, jnp.arange(n_chunks)))
    return logits, cache


class _Loop(NamedTuple):
    cache: tuple
    tokens: jax.Array  # [B, N]
    count: jax.Array  # [B]
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B]


def decode_loop(model: ModelDef, params, cache, first: jax.Array, prompt_lengths: jax.Array,
                sp: SamplingParams, max_new: jax.Array, *, max_new_tokens: int, stop_ids: tuple[int, ...],
                filters: bool, pad: int = 0) -> Decoded:
    """Generate after `first` [B] (sampled from the prefill's logits) until every sequence ends."""
    b = first.shape[0]
    stop_ids = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def record(state: _Loop, token) -> _Loop:
        active = ~state.done
        tokens = state.tokens.at[jnp.arange(b), state.count].set(
            jnp.where(active, token, state.tokens[jnp.arange(b), state.count]), mode="drop")
        count = state.count + active
        hit_stop = active & jnp.isin(token, stop_ids)
        stopped = jnp.where(hit_stop, STOP_TOKEN, state.stopped)
        return _Loop(state.cache, tokens, count, state.done | hit_stop | (count >= max_new), stopped)

    state = _Loop(cache, jnp.full((b, max_new_tokens), pad, jnp.int32), jnp.zeros((b,), jnp.int32),
                  max_new <= 0, jnp.full((b,), STOP_LENGTH, jnp.int32))
    state = record(state, first)

    def cond(state: _Loop):
        return ~jnp.all(state.done)

    def body(state: _Loop):
        last = state.tokens[jnp.arange(b), state.count - 1]
        position = prompt_lengths + state.count - 1  # position of `last`
        pos = jnp.where(state.done, -1, position)[:, None]
        logits, cache = forward(model, params, state.cache, last[:, None], pos)
        token = sample(logits[:, -1], sp, position + 1, filters=filters)
        return record(state._replace(cache=cache), token)

    state = jax.lax.while_loop(cond, body, state)
    return Decoded(state.tokens, state.count, state.stopped, state.cache)


def generate(model: ModelDef, params, cache, prompts, prompt_lengths, sp: SamplingParams, max_new, *,
             max_new_tokens: int, stop_ids: tuple[int, ...] = (), chunk: int, filters: bool,
             pad: int = 0) -> Decoded:
    """Prefill + decode loop: one program from prompts to generated tokens."""
    logits, cache = prefill(model, params, cache, prompts, prompt_lengths, chunk=chunk)
    first = sample(logits, sp, prompt_lengths, filters=filters)
    return decode_loop(model, params, cache, first, prompt_lengths, sp, max_new, max_new_tokens=max_new_tokens,
                       stop_ids=stop_ids, filters=filters, pad=pad)


def pad_prompts(prompts: list[list[int]], multiple: int, *, vocab: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to one length (a multiple of `multiple`); checks ids and emptiness."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) for this model")
    longest = max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple
    out = np.full((len(prompts), width), pad, np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out, np.asarray([len(p) for p in prompts], np.int32)


def check_request(prompts: list[list[int]], max_new_tokens: int, *, batch: int, max_len: int) -> None:
    """Host-side checks of a generation request against a compiled batch size and cache length."""
    if len(prompts) != batch:
        raise ValueError(f"this decoder was built for batch {batch}, got {len(prompts)} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > max_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                         f"length {max_len}; shorten one of them or build the decoder with a longer max_len")


def prefill_chunk_for(longest: int, limit: int) -> int:
    """Tokens per prefill forward: the longest prompt rounded up to a power of two, at most `limit`."""
    return min(limit, 1 << max(0, (max(longest, 1) - 1).bit_length()))


@dataclass
class Decoder:
    """Compiled generation for one model, batch size and cache length.

    `prefill_chunk` bounds the tokens per prefill forward; prompts are padded to a
    multiple of it (or of the longest prompt, rounded to a power of two, if shorter).
    """

    model: ModelDef
    params: dict
    max_len: int
    batch: int = 1
    prefill_chunk: int = 512

    def __post_init__(self):
        self._programs: dict = {}
        # Built by a compiled program (eager zeros may share one buffer, which donation
        # rejects), compiled once: each call returns fresh buffers.
        self._new_cache = jax.jit(partial(dense_cache, self.model.config, self.batch, self.max_len))

    def new_cache(self):
        return self._new_cache()

    def _chunk(self, longest: int) -> int:
        return prefill_chunk_for(longest, self.prefill_chunk)

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        check_request(prompts, max_new_tokens, batch=self.batch, max_len=self.max_len)

    def program(self, name: str, *, max_new_tokens: int, stop_ids: tuple[int, ...], chunk: int, filters: bool):
        key = (name, max_new_tokens, stop_ids, chunk, filters)
        if key not in self._programs:
            if name == "prefill":
                def fn(params, cache, prompts, lengths, sp):
                    logits, cache = prefill(self.model, params, cache, prompts, lengths, chunk=chunk)
                    return sample(logits, sp, lengths, filters=filters), cache
            elif name == "loop":
                def fn(params, cache, first, lengths, sp, max_new):
                    return decode_loop(self.model, params, cache, first, lengths, sp, max_new,
                                       max_new_tokens=max_new_tokens, stop_ids=stop_ids, filters=filters)
            else:
                fn = partial(generate, self.model, max_new_tokens=max_new_tokens, stop_ids=stop_ids, chunk=chunk,
                             filters=filters)
            self._programs[key] = jax.jit(fn, donate_argnums=(1,))
        return self._programs[key]

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, sampling: SamplingParams | None = None,
                 stop_ids: tuple[int, ...] = (), max_new: list[int] | None = None, cache=None) -> Decoded:
        """Generate for a batch of token-id prompts in one compiled program."""
        self.check(prompts, max_new_tokens)
        vocab = self.model.config.vocab_size
        sp = sampling or SamplingParams.make(self.batch)
        chunk = self._chunk(max(len(p) for p in prompts))
        tokens, lengths = pad_prompts(prompts, chunk, vocab=vocab)
        limit = np.full((self.batch,), max_new_tokens, np.int32) if max_new is None else np.asarray(max_new, np.int32)
        run = self.program("generate", max_new_tokens=max_new_tokens, stop_ids=tuple(sorted(set(stop_ids))),
                           chunk=chunk, filters=sp.needs_filters())
        return run(self.params, self.new_cache() if cache is None else cache, jnp.asarray(tokens),
                   jnp.asarray(lengths), sp, jnp.asarray(limit))
