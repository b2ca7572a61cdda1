"""Speculative decoding is lossless: greedy output equals plain greedy, samples follow plain sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsys.config import get_preset
from jaxsys.decode import Decoder
from jaxsys.model import ModelDef
from jaxsys.sampling import SamplingParams, warp
from jaxsys.speculative import SpecConfig, SpeculativeDecoder

TINY = get_preset("tiny")
RETRIEVAL = dict(retrieval_budget=16, chunk_size=4, rebuild_every=2)  # prompts below are longer than 16
TRIFORCE = dict(mode="triforce", draft_sink=2, draft_window=8, gamma_outer=4, **RETRIEVAL)


@pytest.fixture(scope="module")
def pair():
    target, draft = ModelDef(TINY), ModelDef(dataclasses.replace(TINY, n_layers=1, dim=32, n_heads=2, n_kv_heads=1))
    return target, target.init(0), draft, draft.init(1)


def prompts_of(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("config", [
    SpecConfig(mode="draft", gamma=1), SpecConfig(mode="draft", gamma=4),
    SpecConfig(mode="self", gamma=3, **RETRIEVAL), SpecConfig(gamma=2, **TRIFORCE)],
    ids=["draft-g1", "draft-g4", "self-g3", "triforce-g2x4"])
def test_speculative_greedy_equals_plain_greedy(pair, config):
    target, tp, draft, dp = pair
    prompts = prompts_of((40, 23, 2), TINY.vocab_size)
    plain = Decoder(target, tp, max_len=72, batch=3).generate(prompts, max_new_tokens=24)
    out, metrics = SpeculativeDecoder(target, tp, draft, dp, config=config, max_len=72, batch=3).generate(
        prompts, max_new_tokens=24)
    assert np.asarray(out.tokens).tolist() == np.asarray(plain.tokens).tolist()
    assert np.asarray(out.lengths).tolist() == [24, 24, 24]
    level = metrics["levels"]["target"]
    assert level["verifier_forwards"] >= 3 * 24 / (config.outer_gamma + 1)  # no more tokens than drafts allow
    assert 0 <= level["acceptance_rate"] <= 1 and metrics["target_forwards_per_token"] <= 1
    if config.uses_retrieval:
        assert metrics["retrieval_rebuilds"] >= 1 and level["acceptance_rate"] > 0  # the target drafts well


# Sampling: a small vocabulary and weights scaled up so that target and draft have peaked,
# different distributions (at init scale both are near uniform and any resampling rule passes).
SMALL_VOCAB = dataclasses.replace(TINY, vocab_size=12)
ROWS = 1500  # resampling from p instead of the residual then gives p < 1e-20 (threshold 1e-6)


def sharpen(params, factor):
    return jax.tree.map(lambda x: x * factor if x.ndim >= 2 else x, params)


@pytest.fixture(scope="module")
def peaked():
    target, draft = ModelDef(SMALL_VOCAB), ModelDef(dataclasses.replace(SMALL_VOCAB, n_layers=1))
    return target, sharpen(target.init(3), 12.0), draft, sharpen(draft.init(4), 12.0)


def exact_two_token_distributions(model, params, prompt, sp_one):
    """P(t1) and P(t2) = sum_t1 P(t1) P(t2 | t1) under the warped target, from full forwards."""
    vocab = model.config.vocab_size
    first = warp(model.apply(params, jnp.asarray([prompt]))[0][:, -1], sp_one)[0]
    pairs = jnp.asarray([prompt + [t] for t in range(vocab)])
    second = warp(model.apply(params, pairs)[0][:, -1], SamplingParams(*(jnp.repeat(x, vocab) for x in sp_one)))
    return np.asarray(first, np.float64), np.asarray(first @ second, np.float64)


def goodness_of_fit(samples, probs):
    """Chi-square p-value of samples against probs, pooling cells expected below 5."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    impossible = probs < 1e-12  # filtered out by top-k/top-p: never drawn
    if counts[impossible].any():
        return 0.0
    counts, probs = counts[~impossible], probs[~impossible]
    expected = probs * len(samples)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


@pytest.mark.parametrize("config,sampling", [
    (SpecConfig(mode="draft", gamma=2), dict(temperature=1.0)),
    (SpecConfig(mode="draft", gamma=2), dict(temperature=0.8, top_k=6, top_p=0.9)),
    # TriForce's two levels cover self-speculation's rule too (retrieval cache -> full target).
    (SpecConfig(gamma=2, **{**TRIFORCE, "retrieval_budget": 8, "gamma_outer": 3}), dict(temperature=1.0)),
], ids=["draft", "draft-topk-topp", "triforce"])
def test_speculative_sampling_draws_from_the_plain_distribution(peaked, config, sampling):
    target, tp, draft, dp = peaked
    prompt = prompts_of((14,), SMALL_VOCAB.vocab_size, seed=5)[0]
    p1, p2 = exact_two_token_distributions(target, tp, prompt, SamplingParams.make(1, **sampling))
    sp = SamplingParams.make(ROWS, seed=np.arange(ROWS), **sampling)

    def pvalues(cfg):
        out, _ = SpeculativeDecoder(target, tp, draft, dp, config=cfg, max_len=24, batch=ROWS).generate(
            [prompt] * ROWS, max_new_tokens=2, sampling=sp)
        tokens = np.asarray(out.tokens)
        return goodness_of_fit(tokens[:, 0], p1), goodness_of_fit(tokens[:, 1], p2)

    assert min(pvalues(config)) > 1e-3
    if config.mode == "triforce":
        # The check has power: resampling rejected tokens from p (not the residual) at both
        # levels is caught.
        assert min(pvalues(dataclasses.replace(config, residual=False))) < 1e-6


def test_bad_speculative_setups_get_clear_errors(pair):
    target, tp, draft, dp = pair
    other_vocab = ModelDef(dataclasses.replace(TINY, vocab_size=300))
    with pytest.raises(ValueError, match="vocabularies differ"):
        SpeculativeDecoder(target, tp, other_vocab, dp, config=SpecConfig(), max_len=32)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        SpecConfig(gamma=0)
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeDecoder(target, tp, config=SpecConfig(mode="triforce"), max_len=32)
    with pytest.raises(ValueError, match="multiple of chunk size"):
        SpecConfig(mode="self", retrieval_budget=30, chunk_size=8)
    decoder = SpeculativeDecoder(target, tp, draft, dp, config=SpecConfig(), max_len=32)
    with pytest.raises(ValueError, match="exceeds the cache length 32"):
        decoder.generate([list(range(30))], max_new_tokens=8)
