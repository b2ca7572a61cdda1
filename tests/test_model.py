"""Model facts the rest of jaxsys relies on: cached decoding, remat, dtype policy, sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import get_preset
from jaxsys.generate import Generator
from jaxsys.model import ModelDef, init_cache
from jaxsys.sampling import SamplingParams, sample
from jaxsys.train import next_token_loss

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny():
    model = ModelDef(TINY)
    return model, model.init(0)


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 259, shape), jnp.int32)


def test_cached_prefill_and_decode_equal_the_full_forward(tiny):
    model, params = tiny
    seq = tokens((2, 12))
    full, _ = model.apply(params, seq)
    cache = init_cache(TINY, 2, 16)
    prefix, cache = model.apply(params, seq[:, :7], None, cache)
    np.testing.assert_allclose(prefix, full[:, :7], atol=1e-5)
    for t in range(7, 12):  # one token at a time, at its position
        step, cache = model.apply(params, seq[:, t:t + 1], jnp.full((2, 1), t), cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_remat_changes_nothing_but_memory(tiny):
    model, params = tiny
    remat = ModelDef(dataclasses.replace(TINY, remat=True))
    batch = tokens((2, 17), seed=1)
    grad = lambda m: jax.jit(jax.value_and_grad(lambda p: next_token_loss(m, p, batch)))(params)  # noqa: E731
    (loss, grads), (loss_r, grads_r) = grad(model), grad(remat)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads)


def test_bfloat16_compute_stays_close_to_float32(tiny):
    model, params = tiny
    bf16 = ModelDef(dataclasses.replace(TINY, dtype="bfloat16"))
    seq = tokens((2, 10), seed=2)
    ref, _ = model.apply(params, seq)
    out, _ = bf16.apply(params, seq)
    assert out.dtype == jnp.float32  # logits stay float32 for the loss and sampling
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
    assert TINY.same_weights(dataclasses.replace(TINY, dtype="bfloat16", remat=True))
    assert not TINY.same_weights(dataclasses.replace(TINY, n_layers=3))


def draw_counts(logits, n=2000, **sampling):
    """Token counts over n sequences (seeds 0..n-1) sampling from the same logits [1, vocab]."""
    sp = SamplingParams.make(n, seed=np.arange(n), **sampling)
    drawn = jax.jit(sample, static_argnames="filters")(jnp.broadcast_to(logits, (n, logits.shape[-1])), sp,
                                                      jnp.zeros((n,), jnp.int32), filters=sp.needs_filters())
    return np.bincount(np.asarray(drawn), minlength=logits.shape[-1])


def test_sampling_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    top_k = draw_counts(logits, temperature=1.0, top_k=2)
    top_p = draw_counts(logits, temperature=1.0, top_p=0.8)
    both = draw_counts(logits, temperature=1.0, top_k=2, top_p=0.6)
    free = draw_counts(logits, temperature=1.0)
    assert set(np.nonzero(top_k)[0]) == {0, 1}
    assert set(np.nonzero(top_p)[0]) == {0, 1, 2}  # smallest set with mass >= 0.8: .5+.25+.15
    assert set(np.nonzero(both)[0]) == {0}  # top-k first; then 2/3 of the renormalised mass >= 0.6
    assert free[4] > 0  # no restriction: the tail is reachable
    # Within the kept set, frequencies follow the renormalised probabilities.
    np.testing.assert_allclose(top_k[:2] / top_k.sum(), [2 / 3, 1 / 3], atol=0.04)
    np.testing.assert_allclose(free / free.sum(), [0.5, 0.25, 0.15, 0.06, 0.04], atol=0.04)
    assert sample(logits, SamplingParams.make(1), jnp.zeros((1,), jnp.int32)).tolist() == [0]  # greedy


def test_generator_rejects_bad_requests(tiny):
    model, params = tiny
    gen = Generator(model, params, max_len=8)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        gen.generate([1, 2, 3], max_new_tokens=6)
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        gen.generate([1, 999], max_new_tokens=2)
    out = gen.generate([257, 70], max_new_tokens=5, eos_ids=(), ignore_eos=True)
    assert len(out.token_ids) == 5 and out.stopped_by == "length"


def test_cpu_matvec_attention_equals_the_batched_form_and_float64():
    """The few-query path (one matrix-vector product per query and group) against the batched dots and numpy."""
    from jaxsys.model import _attention, _attention_matvecs

    rng = np.random.default_rng(7)
    b, t, kv_heads, groups, hd, s = 2, 3, 2, 2, 8, 40
    q = rng.standard_normal((b, t, kv_heads, groups, hd)).astype(np.float32)
    k = rng.standard_normal((b, kv_heads, s, hd)).astype(np.float32)
    v = rng.standard_normal((b, kv_heads, s, hd)).astype(np.float32)
    k_pos = np.arange(s)[None, None, :]
    q_pos = np.array([[20, 21, 22], [37, 38, 39]])
    causal = k_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None]
    fast = np.asarray(_attention_matvecs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(causal),
                                         jnp.float32))
    batched = np.asarray(_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(causal),
                                    jnp.float32))
    scores = np.einsum("btkgh,bksh->bkgts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(hd)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ref = np.einsum("bkgts,bksh->btkgh", probs, v.astype(np.float64))
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    np.testing.assert_allclose(batched, ref, atol=1e-5)
