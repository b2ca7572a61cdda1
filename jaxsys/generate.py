"""One prompt in, its tokens and timings out: what `jaxsys generate` runs.

`Generator` is a thin host wrapper over `jaxsys.decode`: a compiled prefill (which
samples the first token), then the whole decode as one `lax.while_loop` program.
Both are compiled before the clock starts, so the timings hold no compilation:
`prefill_s` is prompt -> first token on the host, `decode_tok_per_s` the tokens
after the first over the time from the first token to the last on the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.decode import STOP_TOKEN, Decoder, pad_prompts
from jaxsys.model import ModelDef
from jaxsys.sampling import SamplingParams


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")

    def params(self, batch: int = 1) -> SamplingParams:
        return SamplingParams.make(batch, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   seed=self.seed)


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, prompt excluded
    prefill_s: float  # prompt submitted -> first token on the host (compiled beforehand)
    # Tokens generated after the first, over the time from the first to the last
    # token reaching the host (None when only one token was generated).
    decode_tok_per_s: float | None
    stopped_by: str  # "eos" or "length"


class Generator:
    """Compiled prefill and decode loop for one model and cache length; reusable across prompts."""

    def __init__(self, model: ModelDef, params, *, max_len: int | None = None, prefill_chunk: int = 512):
        self.model, self.params = model, params
        self.max_len = max_len or model.config.max_seq_len
        self.decoder = Decoder(model, params, self.max_len, batch=1, prefill_chunk=prefill_chunk)
        self._compiled: dict = {}

    def _programs(self, prompt_width: int, chunk: int, max_new_tokens: int, stop_ids, sp: SamplingParams, cache):
        """Prefill and loop compiled ahead of time, so no compilation lands in a timed window."""
        cache = jax.eval_shape(lambda: cache)
        key = (prompt_width, chunk, max_new_tokens, stop_ids, sp.needs_filters(), jax.tree.structure(cache))
        if key not in self._compiled:
            d, filters = self.decoder, sp.needs_filters()
            ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
            prefill = d.program("prefill", max_new_tokens=max_new_tokens, stop_ids=stop_ids, chunk=chunk,
                                filters=filters).lower(self.params, cache, ints(1, prompt_width), ints(1), sp)
            loop = d.program("loop", max_new_tokens=max_new_tokens, stop_ids=stop_ids, chunk=chunk,
                             filters=filters).lower(self.params, cache, ints(1), ints(1), sp, ints(1))
            self._compiled[key] = (prefill.compile(), loop.compile())
        return self._compiled[key]

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 eos_ids: tuple[int, ...] = (), ignore_eos: bool = False, cache=None) -> Generation:
        """`cache`: any KV cache of this decoder's batch and length (paged, quantized, tiered);
        the default is a dense float cache. It is donated: the one in use is `self.last_cache`."""
        self.decoder.check([prompt_ids], max_new_tokens)
        chunk = self.decoder._chunk(max(len(prompt_ids), 1))
        tokens, lengths = pad_prompts([prompt_ids], chunk, vocab=self.model.config.vocab_size)
        stop_ids = () if ignore_eos else tuple(sorted(set(eos_ids)))
        sp = sampling.params(1)
        cache = self.decoder.new_cache() if cache is None else cache
        prefill, loop = self._programs(tokens.shape[1], chunk, max_new_tokens, stop_ids, sp, cache)
        tokens, lengths, limit = jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray([max_new_tokens], jnp.int32)
        t0 = time.perf_counter()
        first, cache = prefill(self.params, cache, tokens, lengths, sp)
        first.block_until_ready()
        t1 = time.perf_counter()
        out = loop(self.params, cache, first, lengths, sp, limit)
        ids = np.asarray(out.tokens[0])  # on the host: the last token has arrived
        self.last_cache = out.cache
        t2 = time.perf_counter()
        n = int(out.lengths[0])
        rate = (n - 1) / (t2 - t1) if n > 1 and t2 > t1 else None
        stopped_by = "eos" if int(out.stopped_by[0]) == STOP_TOKEN else "length"
        return Generation(ids[:n].tolist(), t1 - t0, rate, stopped_by)
