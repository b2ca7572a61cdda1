"""Token generation: a jitted prefill and a jitted one-token decode step over a dense KV cache.

A simple host loop drives the decode step (one compiled program per step,
the cache donated each call); it checks EOS on the host after every token.
Sampling: greedy at temperature 0, else softmax(logits / T) restricted by
top-k and top-p, with a seeded key per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.model import ModelDef, init_cache


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


def sample(logits: jax.Array, key: jax.Array, sc: SamplingConfig) -> jax.Array:
    """logits [batch, vocab] f32 -> token ids [batch]."""
    if sc.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sc.temperature
    if sc.top_k:
        kth = jax.lax.top_k(logits, sc.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sc.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        cutoff_index = jnp.sum(cumulative < sc.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, prompt excluded
    prefill_s: float  # prompt submitted -> first token on the host (compiled beforehand)
    # Tokens generated after the first, over the time from the first to the last
    # token reaching the host (None when only one token was generated).
    decode_tok_per_s: float | None
    stopped_by: str  # "eos" or "length"
    timings: list[float] = field(default_factory=list, repr=False)


class Generator:
    """Compiles prefill and decode for one model and cache length; reusable across prompts."""

    def __init__(self, model: ModelDef, params, *, max_len: int | None = None):
        self.model, self.params = model, params
        self.max_len = max_len or model.config.max_seq_len

        @partial(jax.jit, static_argnames=("sc",))
        def prefill(params, tokens, key, *, sc):
            cache = init_cache(model.config, tokens.shape[0], self.max_len)
            logits, cache = model.apply(params, tokens, None, cache)
            return sample(logits[:, -1], key, sc), cache

        @partial(jax.jit, static_argnames=("sc",), donate_argnames=("cache",))
        def decode_step(params, token, position, cache, key, *, sc):
            logits, cache = model.apply(params, token[:, None], position[:, None], cache)
            return sample(logits[:, -1], key, sc), cache

        self._prefill, self._decode = prefill, decode_step
        self._compiled: dict = {}

    def _programs(self, prompt_len: int, key, sc: SamplingConfig):
        """Prefill and decode compiled ahead of time, so no compilation lands in a timed window."""
        if (prompt_len, sc) not in self._compiled:
            spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
            cache = jax.eval_shape(lambda: init_cache(self.model.config, 1, self.max_len))
            self._compiled[(prompt_len, sc)] = (
                self._prefill.lower(self.params, spec((1, prompt_len)), key, sc=sc).compile(),
                self._decode.lower(self.params, spec((1,)), spec((1,)), cache, key, sc=sc).compile())
        return self._compiled[(prompt_len, sc)]

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 eos_ids: tuple[int, ...] = (), ignore_eos: bool = False) -> Generation:
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model")
        if len(prompt_ids) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the cache length {self.max_len}; shorten one of them")
        key = jax.random.key(sampling.seed)
        tokens = jnp.asarray([prompt_ids], jnp.int32)
        prefill, decode = self._programs(len(prompt_ids), key, sampling)
        t0 = time.perf_counter()
        token, cache = prefill(self.params, tokens, jax.random.fold_in(key, 0))
        out = [int(token[0])]
        timings = [time.perf_counter()]
        stopped_by = "length"
        position = len(prompt_ids)
        while True:
            if not ignore_eos and out[-1] in eos_ids:
                stopped_by = "eos"
                break
            if len(out) >= max_new_tokens:
                break
            token, cache = decode(self.params, token, jnp.asarray([position], jnp.int32), cache,
                                  jax.random.fold_in(key, len(out)))
            out.append(int(token[0]))  # host sync: the token is on the host
            timings.append(time.perf_counter())
            position += 1
        span = timings[-1] - timings[0]
        rate = (len(out) - 1) / span if len(out) > 1 and span > 0 else None
        return Generation(np.asarray(out).tolist(), timings[0] - t0, rate, stopped_by, timings)
