"""The Llama family in Flax NNX.

Numerically this follows Hugging Face `LlamaForCausalLM` (RMSNorm computed in
float32, RoPE in the rotate-half layout with optional Llama-3 frequency scaling,
grouped-query attention with softmax in float32, SwiGLU), so Hugging Face
weights load without permutation. What differs: weights are stored as
`[in, out]` (and attention projections as `[embed, heads, head_dim]`) and carry
logical axis names in their `logical_axes` metadata, which the sharding rules
map onto mesh levels; and the forward pass is functional in its KV cache
(`model(tokens, positions, cache) -> (logits, cache)`), so jitted decode steps
can donate it. Every linear layer of a block goes through `project`, so weights
quantized by `jaxsys.quant` run through this same code.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsys.config import ModelConfig
from jaxsys.sharding import constrain

INIT_STD = 0.02


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None):
    """A dense KV cache (slot == position) for `batch` sequences of up to `max_len` tokens."""
    from jaxsys.kvcache import dense_cache
    return dense_cache(config, batch, max_len, dtype)


def _param(rngs: nnx.Rngs, shape, logical_axes, dtype, std=INIT_STD) -> nnx.Param:
    value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float32, as Hugging Face computes them."""
    hd = config.resolved_head_dim
    exponents = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama-3: keep high frequencies, divide low ones by `factor`, blend between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def project(x: jax.Array, weight: nnx.Param, equation: str | None = None) -> jax.Array:
    """A linear projection: `x @ w`, or `einsum(equation, x, w)`, in x's dtype.

    A weight quantized by `jaxsys.quant` (a `QuantizedWeight`, recognised by its
    `quantized_matmul` method so that the model needs no import of the kernels)
    runs its own low-bit matmul over the same input and output axes instead.
    """
    w = weight.get_value()
    if hasattr(w, "quantized_matmul"):
        return w.quantized_matmul(x)
    w = w.astype(x.dtype)
    return x @ w if equation is None else jnp.einsum(equation, x, w)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, hd, pd = config.dim, config.resolved_head_dim, config.param_dtype
        self.config = config
        self.q = _param(rngs, (d, config.n_heads, hd), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, (d, config.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, (d, config.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, (config.n_heads, hd, d), ("heads", "head_dim", "embed"), pd)

    def __call__(self, x, positions, inv_freq, cache):
        c, dt = self.config, x.dtype
        q = project(x, self.q, "btd,dhk->bthk")
        k = project(x, self.k, "btd,dhk->bthk")
        v = project(x, self.v, "btd,dhk->bthk")
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        if hasattr(cache, "attend"):  # a cache that computes attention where its pages live
            out, cache = cache.attend(q, k, v, positions)  # [B, T, H, hd]
            return project(out.astype(dt), self.o, "bthk,hkd->btd"), cache
        if cache is None:
            k_pos = positions  # [B, S]
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, kvH, S, hd], as caches keep them
        else:
            # The cache stores the new keys/values by position (`jaxsys.kvcache`);
            # attention runs over every slot, masked by the slots' positions.
            cache = cache.write(k, v, positions, q)
            k, v, k_pos = cache.read()
            k, v = k.astype(dt), v.astype(dt)
        if k_pos.ndim == 2:
            k_pos = k_pos[:, None, :]  # [B, 1 or kvH, S]

        groups = c.n_heads // c.n_kv_heads
        b, t = q.shape[:2]
        q = q.reshape(b, t, c.n_kv_heads, groups, -1)  # [B, T, kvH, G, hd]
        causal = k_pos[:, :, None, None, :] <= positions[:, None, None, :, None]  # [B, kvH|1, 1, T, S]
        if t * groups <= MATVEC_QUERIES and jax.default_backend() == "cpu":
            out = _attention_matvecs(q, k, v, causal, dt)
        else:
            out = _attention(q, k, v, causal, dt)
        return project(out.reshape(b, t, c.n_heads, -1), self.o, "bthk,hkd->btd"), cache


# Decode steps and speculative verifies (few queries per KV head) on CPU: one
# matrix-vector product per query and group runs 2-5x faster there than XLA CPU's
# batched dot with a handful of rows ([6 x 16] x [16 x 4,296]: 1.5 vs 0.5 ms per layer).
MATVEC_QUERIES = 16


def _probs(scores, visible, head_dim: int, dt):
    """Scaled, masked softmax over the last axis (float32 math)."""
    scores = scores.astype(jnp.float32) / math.sqrt(head_dim)
    return jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(dt)


def _attention(q, k, v, causal, dt):
    """q [B, T, kvH, G, hd], k/v [B, kvH, S, hd], causal [B, kvH|1, 1, T, S] -> [B, T, kvH, G, hd]."""
    probs = _probs(jnp.einsum("btkgh,bksh->bkgts", q, k), causal, q.shape[-1], dt)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v)


def _attention_matvecs(q, k, v, causal, dt):
    """`_attention` as one [S, hd] matrix-vector product per query and group."""
    def one(i, g):
        probs = _probs(jnp.einsum("bkh,bksh->bks", q[:, i, :, g], k), causal[:, :, 0, i], q.shape[-1], dt)
        return jnp.einsum("bks,bksh->bkh", probs, v)
    return jnp.stack([jnp.stack([one(i, g) for g in range(q.shape[3])], axis=2) for i in range(q.shape[1])], axis=1)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = config.dim, config.ffn_dim, config.param_dtype
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x):
        h = jax.nn.silu(project(x, self.gate)) * project(x, self.up)
        return project(h, self.down)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, cache):
        h, cache = self.attn(self.attn_norm(x), positions, inv_freq, cache)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "act_seq", "act_embed")), cache


def embed_tokens(embed: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    return embed.astype(dtype)[tokens]  # [batch, seq, dim]


def output_logits(config: ModelConfig, x: jax.Array, embed: jax.Array, lm_head: jax.Array | None) -> jax.Array:
    head = embed.T if config.tie_embeddings else lm_head  # [dim, vocab]
    return (x @ head.astype(x.dtype)).astype(jnp.float32)


def default_positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(rngs, (config.vocab_size, config.dim), ("vocab", "embed"), config.param_dtype)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps, config.param_dtype)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, (config.dim, config.vocab_size), ("embed", "vocab"),
                                  config.param_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: tuple | None = None, select: jax.Array | None = None):
        """tokens, positions: [batch, seq] -> (logits [batch, seq, vocab] f32, cache).

        `select` [batch, k] picks the sequence indices whose logits are computed
        (decoding needs only the last ones; the lm_head is the largest matmul then).
        """
        c = self.config
        if positions is None:
            positions = default_positions(tokens)
        inv_freq = jnp.asarray(rope_frequencies(c))
        x = constrain(embed_tokens(self.embed[...], tokens, c.dtype), ("batch", "act_seq", "act_embed"))

        def run_block(block, x, cache):
            return block(x, positions, inv_freq, cache)

        if c.remat and cache is None:
            run_block = nnx.remat(run_block)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, layer_cache = run_block(block, x, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        if select is not None:
            x = jnp.take_along_axis(x, select[..., None], axis=1)
        logits = output_logits(c, self.norm(x), self.embed[...], None if c.tie_embeddings else self.lm_head[...])
        return logits, (None if cache is None else tuple(new_cache))


def create_model(config: ModelConfig, seed: int = 0) -> Llama:
    return Llama(config, rngs=nnx.Rngs(params=seed))


class ModelDef:
    """The model as pure functions over a params pytree (nested dicts of arrays).

    Training, checkpoints and Hugging Face interchange work on that plain
    pytree; `apply` merges it into the NNX graph inside the traced function, so
    nothing is mutated and jit sees only arrays.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        abstract = nnx.eval_shape(lambda: create_model(config))
        self.graphdef, self._template = nnx.split(abstract, nnx.Param)
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        # Same structure as params, a tuple of logical axis names per leaf.
        self.logical_axes = nnx.to_pure_dict(
            jax.tree.map(lambda v: v.get_metadata()["logical_axes"], self._template, is_leaf=is_var))
        self.shapes = nnx.to_pure_dict(self._template)  # ShapeDtypeStructs
        self._block_graphdef, self._block_template = nnx.split(abstract.layers[0], nnx.Param)
        self._norm_graphdef, self._norm_template = nnx.split(abstract.norm, nnx.Param)

    def init(self, seed: int = 0, shardings=None) -> dict:
        """Random parameters for `seed`, created in one compiled program (placed on `shardings`).

        Always jitted: eager initialization is slow, and draws other values for the same seed.
        """
        make = lambda: nnx.to_pure_dict(nnx.split(create_model(self.config, seed), nnx.Param)[1])  # noqa: E731
        return jax.jit(make, out_shardings=shardings)()

    def merge(self, params: dict) -> Llama:
        state = jax.tree.map(lambda x: x, self._template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def apply(self, params: dict, tokens, positions=None, cache=None, select=None):
        return self.merge(params)(tokens, positions, cache, select)

    def block_fn(self, block_params: dict, x: jax.Array, positions: jax.Array) -> jax.Array:
        """One transformer block as a pure function of its params (no cache)."""
        state = jax.tree.map(lambda v: v, self._block_template)
        nnx.replace_by_pure_dict(state, block_params)
        inv_freq = jnp.asarray(rope_frequencies(self.config))
        return nnx.merge(self._block_graphdef, state)(x, positions, inv_freq, None)[0]

    def apply_blockwise(self, params: dict, tokens: jax.Array, *, fetch_outer, call_block) -> jax.Array:
        """The forward pass piece by piece, for explicit parameter-gathering schedules.

        `fetch_outer(outer)` returns the full embedding / final norm / lm_head from
        whatever `params` holds for them; `call_block(block_fn, block_params, x,
        positions)` runs one block (typically gather + `block_fn` under a custom_vjp).
        Computes the same function as `apply`.
        """
        c = self.config
        positions = default_positions(tokens)
        outer = fetch_outer({k: v for k, v in params.items() if k != "layers"})
        x = embed_tokens(outer["embed"], tokens, c.dtype)
        for i in range(c.n_layers):
            x = call_block(self.block_fn, params["layers"][i], x, positions)
        state = jax.tree.map(lambda v: v, self._norm_template)
        nnx.replace_by_pure_dict(state, outer["norm"])
        x = nnx.merge(self._norm_graphdef, state)(x)
        return output_logits(c, x, outer["embed"], outer.get("lm_head"))

    def param_specs(self, rules) -> dict:
        """PartitionSpecs of the params under sharding rules."""
        return jax.tree.map(lambda axes, s: rules.spec(axes, s.shape), self.logical_axes, self.shapes,
                            is_leaf=lambda x: isinstance(x, tuple))

    def param_shardings(self, rules) -> dict:
        return jax.tree.map(lambda spec: jax.sharding.NamedSharding(rules.mesh, spec),
                            self.param_specs(rules), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
