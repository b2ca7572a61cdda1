"""Token sampling with per-sequence parameters, as distributions.

`warp` turns logits into the distribution a sequence samples from: temperature,
then top-k, then top-p (the order Hugging Face applies them), and a one-hot on the
argmax where the temperature is 0. Speculative decoding compares these warped
distributions of draft and target, so greedy decoding is the same rule: with
one-hot p and q, "accept with probability min(1, p/q)" is "accept iff the draft's
token is the target's argmax", and the residual max(p - q, 0) is the argmax.

Every sequence carries its own temperature, top-k, top-p and seed (a batch may mix
greedy and sampled requests). Random draws are keyed by (seed, what is drawn, the
position drawn for), so a sequence's tokens do not depend on what else is in its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Streams of random draws, folded into each sequence's key.
TOKEN, ACCEPT, DRAFT, RESIDUAL = 0, 1, 2, 3


class SamplingParams(NamedTuple):
    temperature: jax.Array  # [batch] f32, 0 = greedy
    top_k: jax.Array  # [batch] int32, 0 = off
    top_p: jax.Array  # [batch] f32, 1 = off
    seed: jax.Array  # [batch] int32

    @classmethod
    def make(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> "SamplingParams":
        """Per-sequence parameters from scalars or length-`batch` sequences; checked on the host."""
        def column(value, dtype, name, low=None):
            try:
                arr = np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()
            except OverflowError:  # e.g. an int beyond int32 from a request
                info = np.iinfo(dtype)
                raise ValueError(f"{name} must be an integer in [{info.min if low is None else low}, {info.max}], "
                                 f"got {value!r}") from None
            if arr.shape != (batch,):
                raise ValueError(f"{name} must be a scalar or have {batch} values, got {np.shape(value)}")
            return arr
        t, k, p = column(temperature, np.float32, "temperature"), column(top_k, np.int32, "top_k", low=0), \
            column(top_p, np.float32, "top_p")
        if (t < 0).any() or not np.isfinite(t).all():
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {t.tolist()}")
        if (k < 0).any():
            raise ValueError(f"top_k must be >= 0 (0 = off), got {k.tolist()}")
        if ((p <= 0) | (p > 1)).any():
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {p.tolist()}")
        seed = column(seed, np.int64, "seed").astype(np.uint32).astype(np.int32)  # any int64, taken mod 2**32
        return cls(jnp.asarray(t), jnp.asarray(k), jnp.asarray(p), jnp.asarray(seed))

    def needs_filters(self) -> bool:
        """Whether any sequence uses top-k or top-p (on the host: a static switch for `warp`)."""
        return bool((np.asarray(self.top_k) > 0).any() or (np.asarray(self.top_p) < 1).any())


def _expand(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def warp(logits: jax.Array, sp: SamplingParams, *, filters: bool = True) -> jax.Array:
    """logits [batch, ..., vocab] -> probabilities (f32) after temperature, top-k, top-p.

    `filters=False` skips the top-k/top-p sort (valid when no sequence uses them).
    """
    logits = logits.astype(jnp.float32)
    nd = logits.ndim
    greedy = _expand(sp.temperature == 0, nd)
    scaled = logits / jnp.where(greedy, 1.0, _expand(sp.temperature, nd))
    if filters:
        vocab = logits.shape[-1]
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        k = _expand(sp.top_k, nd)
        kth = jnp.take_along_axis(sorted_desc, jnp.clip(k - 1, 0, vocab - 1), axis=-1)
        scaled = jnp.where((k > 0) & (scaled < kth), -jnp.inf, scaled)
        sorted_desc = jnp.where((k > 0) & (sorted_desc < kth), -jnp.inf, sorted_desc)
        # Keep the smallest prefix of the sorted tokens whose mass reaches top_p.
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
        cut = jnp.clip(jnp.sum(cumulative < _expand(sp.top_p, nd), axis=-1, keepdims=True), 0, vocab - 1)
        cutoff = jnp.take_along_axis(sorted_desc, cut, axis=-1)
        scaled = jnp.where((_expand(sp.top_p, nd) < 1) & (scaled < cutoff), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy, one_hot, probs)


def row_keys(sp: SamplingParams, stream: int, counter: jax.Array) -> jax.Array:
    """One key per sequence for draw `stream` at `counter` [batch] (e.g. a position)."""
    def one(seed, c):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), c)
    return jax.vmap(one)(sp.seed, counter)


def draw(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from probs [batch, vocab] with keys [batch]; exact for one-hot rows."""
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
    return jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp).astype(jnp.int32)


def sample(logits: jax.Array, sp: SamplingParams, counter: jax.Array, *, filters: bool = True) -> jax.Array:
    """logits [batch, vocab] -> token ids [batch]; greedy rows take the argmax."""
    probs = warp(logits, sp, filters=filters)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(sp.temperature == 0, greedy, draw(probs, row_keys(sp, TOKEN, counter)))
