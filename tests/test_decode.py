"""Functional decoding: one while_loop program equals a token-by-token full-forward reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import get_preset
from jaxsys.decode import STOP_LENGTH, STOP_TOKEN, Decoder
from jaxsys.generate import Generator, SamplingConfig
from jaxsys.model import ModelDef
from jaxsys.sampling import SamplingParams

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny():
    model = ModelDef(TINY)
    return model, model.init(0)


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.vocab_size, n).tolist() for n in lengths]


def greedy_reference(model, params, prompt, n):
    """Argmax of a full (uncached) forward over the whole sequence, one token at a time."""
    width = 32  # one fixed shape, so one compile: causal attention ignores the padding after the end
    step = jax.jit(lambda toks, last: model.apply(params, toks)[0][0, last])
    tokens = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(step(jnp.asarray(padded), len(tokens) - 1))))
    return tokens[len(prompt):]


def test_batched_greedy_equals_the_uncached_reference(tiny):
    model, params = tiny
    prompts = random_prompts((19, 5, 1))  # different lengths; 19 spans three prefill chunks of 8
    out = Decoder(model, params, max_len=48, batch=3, prefill_chunk=8).generate(prompts, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        assert np.asarray(out.tokens[i]).tolist() == greedy_reference(model, params, prompt, 12)
    assert np.asarray(out.lengths).tolist() == [12, 12, 12]
    assert np.asarray(out.stopped_by).tolist() == [STOP_LENGTH] * 3


def test_stop_tokens_and_per_sequence_limits_end_each_sequence_on_its_own(tiny):
    model, params = tiny
    prompts = random_prompts((7, 9), seed=1)
    decoder = Decoder(model, params, max_len=32, batch=2)
    free = np.asarray(decoder.generate(prompts, max_new_tokens=10).tokens)
    stop = int(free[0, 3])
    first_stop = [int(np.argmax(row == stop)) if (row == stop).any() else None for row in free]
    out = decoder.generate(prompts, max_new_tokens=10, stop_ids=(stop,), max_new=[10, 6])
    n0 = first_stop[0] + 1
    assert int(out.lengths[0]) == n0 and int(out.stopped_by[0]) == STOP_TOKEN
    assert np.asarray(out.tokens[0, :n0]).tolist() == free[0, :n0].tolist()
    assert (np.asarray(out.tokens[0, n0:]) == 0).all()  # padding after the end
    n1 = 6 if first_stop[1] is None or first_stop[1] >= 6 else first_stop[1] + 1
    assert int(out.lengths[1]) == n1
    assert np.asarray(out.tokens[1, :n1]).tolist() == free[1, :n1].tolist()


def test_sampling_is_seeded_per_sequence_and_independent_of_the_batch(tiny):
    model, params = tiny
    prompts = random_prompts((6, 6, 6), seed=2)
    sp = SamplingParams.make(3, temperature=1.0, top_k=50, seed=[7, 7, 8])
    out = Decoder(model, params, max_len=24, batch=3).generate(prompts, max_new_tokens=10, sampling=sp)
    tokens = np.asarray(out.tokens)
    alone = Decoder(model, params, max_len=24, batch=1).generate(
        prompts[2:], max_new_tokens=10, sampling=SamplingParams.make(1, temperature=1.0, top_k=50, seed=8))
    assert tokens[2].tolist() == np.asarray(alone.tokens[0]).tolist()
    if prompts[0] == prompts[1]:
        assert tokens[0].tolist() == tokens[1].tolist()
    assert tokens[1].tolist() != tokens[2].tolist()  # another seed, another draw (384 tokens)


def test_generator_runs_the_same_program_and_donates_the_cache(tiny):
    model, params = tiny
    prompt = random_prompts((5,), seed=3)[0]
    gen = Generator(model, params, max_len=24).generate(prompt, max_new_tokens=8, sampling=SamplingConfig())
    assert gen.token_ids == greedy_reference(model, params, prompt, 8)
    assert gen.decode_tok_per_s > 0 and gen.stopped_by == "length"
    decoder = Decoder(model, params, max_len=24)
    cache = decoder.new_cache()
    out = decoder.generate([prompt], max_new_tokens=8, cache=cache)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(cache))  # donated to the program
    assert np.asarray(out.tokens[0]).tolist() == gen.token_ids
    # Fresh caches come from one compiled program (a recompile per request cost ~80 ms of
    # a 1.6 s generation), each call with buffers of its own.
    again = decoder.new_cache()
    assert decoder._new_cache._cache_size() == 1
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(again))


def test_bad_requests_get_clear_errors(tiny):
    model, params = tiny
    decoder = Decoder(model, params, max_len=16, batch=1)
    with pytest.raises(ValueError, match="exceeds the cache length 16"):
        decoder.generate([list(range(10))], max_new_tokens=7)
    with pytest.raises(ValueError, match="empty"):
        decoder.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="batch 1, got 2"):
        decoder.generate([[1], [2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.make(1, top_p=0.0)
