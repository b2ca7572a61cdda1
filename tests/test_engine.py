"""The batching engine: continuous batching gives the answers of plain decoding, and every page comes back."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import get_preset
from jaxsys.decode import Decoder
from jaxsys.engine import Engine, EngineBusy, EngineConfig, Request
from jaxsys.model import ModelDef
from jaxsys.nanobatch import CostModel, Lane, empty_pools, search_split, serving_step
from jaxsys.sampling import SamplingParams, warp

TINY = get_preset("tiny")
MAX_LEN = 64
NEW = 12


@pytest.fixture(scope="module")
def tiny():
    model = ModelDef(TINY)
    return model, model.init(0)


@pytest.fixture(scope="module")
def engine(tiny):
    """2 decode rows, 8-token pages, a pool of 9 pages: too few for two sequences of 31-52 tokens (preemption)."""
    model, params = tiny
    return Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, num_pages=9,
                                              prefill_chunk=16, max_queue=16))


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 259, n).tolist() for n in lengths]


def assert_same_or_near_tie(model, params, prompt, got, want, tie=1e-3):
    """Equal tokens, or a first difference where the reference's top-2 logits are within `tie`."""
    if got == want:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    logits = model.apply(params, jnp.asarray([prompt + want[:i]]))[0][0, -1]
    top2 = np.sort(np.asarray(logits))[-2:]
    assert top2[1] - top2[0] < tie and {got[i], want[i]} <= set(np.argsort(np.asarray(logits))[-2:].tolist()), \
        f"token {i} differs ({got[i]} vs {want[i]}) at a logit gap of {top2[1] - top2[0]:.2e}"


def test_continuous_batching_greedy_equals_decode_generate_and_frees_every_page(tiny, engine):
    model, params = tiny
    # Lengths 1..40: single-token prompts decode at once; 33 and 40 span three 16-token prefill chunks.
    prompts = random_prompts((1, 5, 19, 40, 7, 33))
    want = Decoder(model, params, max_len=MAX_LEN, batch=len(prompts)).generate(prompts, max_new_tokens=NEW)
    before = engine.counters["preemptions"]
    seqs = engine.generate([Request(p, max_tokens=NEW) for p in prompts])
    for p, s, row in zip(prompts, seqs, np.asarray(want.tokens)):
        assert s.finish_reason == "length" and len(s.generated) == NEW
        assert_same_or_near_tie(model, params, p, s.generated, row.tolist())
    assert engine.counters["preemptions"] > before  # 9 pages cannot hold two of them: some were recomputed
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert engine.snapshot()["running"] == 0 and engine.snapshot()["waiting"] == 0


def test_step_programs_choose_their_cpu_dots_and_answer_alike(tiny, engine):
    """On CPU the step programs compile without YNNPACK dot fusions unless `ynn_dots`; answers agree."""
    model, params = tiny
    prompts = random_prompts((3, 21), seed=4)
    ynn = Engine(model, params, dataclasses.replace(engine.config, ynn_dots=True))
    got = [s.generated for s in engine.generate([Request(p, max_tokens=NEW) for p in prompts])]
    alt = [s.generated for s in ynn.generate([Request(p, max_tokens=NEW) for p in prompts])]
    for p, a, b in zip(prompts, got, alt):
        assert_same_or_near_tie(model, params, p, a, b)
    if jax.default_backend() == "cpu":
        hlo = engine._program(1, False, False).lower(params, engine.pools, engine._lane(1, 1, []), None)
        assert "__ynn_fusion" not in hlo.compile().as_text()


def test_stop_tokens_limits_and_sampling_are_per_request(tiny, engine):
    model, params = tiny
    prompts = random_prompts((6, 9, 6), seed=1)
    free = engine.generate([Request(p, max_tokens=10) for p in prompts])
    stop = free[0].generated[3]
    sampled = Request(prompts[2], max_tokens=10, temperature=1.0, top_k=50, seed=8)
    seqs = engine.generate([Request(prompts[0], max_tokens=10, stop_ids=(stop,)),
                            Request(prompts[1], max_tokens=4), sampled])
    n0 = free[0].generated.index(stop) + 1
    assert seqs[0].generated == free[0].generated[:n0] and seqs[0].finish_reason == "stop"
    assert seqs[1].generated == free[1].generated[:4] and seqs[1].finish_reason == "length"
    alone = Decoder(model, params, max_len=MAX_LEN, batch=1).generate(
        [prompts[2]], max_new_tokens=10, sampling=SamplingParams.make(1, temperature=1.0, top_k=50, seed=8))
    assert seqs[2].generated == np.asarray(alone.tokens[0]).tolist()  # same seed, same draws, any batch
    assert seqs[2].generated != free[2].generated
    assert engine.allocator.num_free == engine.allocator.num_pages


def test_streams_carry_every_token_in_order_then_end(tiny, engine):
    """A step's tokens reach the streams once the next program is dispatched; none is lost and `done` comes
    after the last of them, whether `run_until_idle` or the engine thread drives the steps."""
    prompts = random_prompts((5, 12, 7), seed=6)
    lengths = (3, 9, 1)
    seqs = engine.generate([Request(p, max_tokens=n) for p, n in zip(prompts, lengths)])
    assert [list(s.stream()) for s in seqs] == [s.generated for s in seqs]
    assert [len(s.generated) for s in seqs] == list(lengths)
    engine.start()
    try:
        seqs = [engine.submit(Request(p, max_tokens=n)) for p, n in zip(prompts, lengths)]
        assert all(s.wait(30) for s in seqs)
        assert [list(s.stream(poll_s=0.01)) for s in seqs] == [s.generated for s in seqs]
        assert [len(s.generated) for s in seqs] == list(lengths)
    finally:
        engine.stop()


def test_cancel_and_timeout_end_requests_and_return_their_pages(tiny, engine):
    timed = engine.submit(Request(random_prompts((4,))[0], max_tokens=40, timeout_s=0.01))
    time.sleep(0.05)  # expired before the engine runs a step
    engine.start()
    try:
        long = engine.submit(Request(random_prompts((20,))[0], max_tokens=40))
        first = next(long.stream())  # it is running
        engine.cancel(long)
        assert long.wait(30) and timed.wait(30)
        assert long.finish_reason == "cancelled" and first == long.generated[0] and len(long.generated) < 40
        assert timed.finish_reason == "timeout" and timed.generated == []
        deadline = time.time() + 10
        while engine.allocator.num_free != engine.allocator.num_pages and time.time() < deadline:
            time.sleep(0.01)
        assert engine.allocator.num_free == engine.allocator.num_pages
    finally:
        engine.stop()


def test_bad_and_excess_requests_are_refused_with_reasons(tiny, engine):
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        engine.submit(Request(list(range(60)), max_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], max_tokens=5))
    with pytest.raises(ValueError, match="max_tokens=0"):
        engine.submit(Request([1], max_tokens=0))
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.submit(Request([1, 999], max_tokens=2))
    # Refused here: in a step, a seed or top_k beyond its integer type would fail every request of the batch.
    with pytest.raises(ValueError, match="seed must be an integer"):
        engine.submit(Request([1], max_tokens=2, seed=2 ** 64))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        engine.submit(Request([1], max_tokens=2, top_k=2 ** 31))
    model, params = tiny
    small = Engine(model, params, EngineConfig(max_batch=1, max_len=MAX_LEN, page_size=8, max_queue=2))
    small.submit(Request([1], max_tokens=2))
    small.submit(Request([2], max_tokens=2))
    with pytest.raises(EngineBusy, match="queue is full") as busy:
        small.submit(Request([3], max_tokens=2))
    assert busy.value.status == 429 and busy.value.retry_after_s > 0


def test_warmup_compiles_every_program_serving_then_uses(tiny):
    """Decode buckets x prefill lane counts (0..prefill_lanes): after warm-up, serving compiles nothing."""
    model, params = tiny
    engine = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, prefill_chunk=8,
                                                prefill_lanes=2))
    assert engine.warmup() == 3 * 3 - 1  # rows 0/1/2 x lanes 0/1/2, less the empty step
    compiled = sum(p._cache_size() for p in engine._programs.values())
    seqs = engine.generate([Request(p, max_tokens=4) for p in random_prompts((3, 20, 11), seed=5)])
    assert all(s.finish_reason == "length" for s in seqs)  # steps of 1-2 prefill lanes beside 0-1 decode rows
    assert sum(p._cache_size() for p in engine._programs.values()) == compiled
    one_bucket = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, prefill_chunk=8,
                                                    prefill_lanes=2, decode_buckets=(2,)))
    assert one_bucket.buckets == (2,) and one_bucket._bucket(1) == 2  # one decode row is padded to two
    with pytest.raises(ValueError, match="ending at max_batch"):
        EngineConfig(max_batch=4, decode_buckets=(1, 2))


def test_nano_batches_compute_what_one_batch_computes(tiny):
    model, params = tiny
    pools = empty_pools(TINY, 10, 8)
    rng = np.random.default_rng(3)
    rows, pps = 4, 2
    table = np.arange(rows * pps, dtype=np.int32).reshape(rows, pps)
    lane = Lane(jnp.asarray(rng.integers(0, 259, (rows, 1)), jnp.int32), jnp.asarray([[0], [3], [9], [-1]], jnp.int32),
                jnp.asarray(table), jnp.zeros(rows, jnp.int32), SamplingParams.make(rows))
    prefill = Lane(jnp.asarray(rng.integers(0, 259, (1, 8)), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None],
                   jnp.asarray([[8, 9]], jnp.int32), jnp.asarray([7], jnp.int32), SamplingParams.make(1))
    step = jax.jit(serving_step, static_argnums=0, static_argnames=("split", "filters"))
    one = step(model, params, pools, lane, prefill, split=(4,), filters=False)
    two = step(model, params, pools, lane, prefill, split=(1, 3), filters=False)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_split_search_fits_the_cost_model_and_keeps_the_fastest_measured():
    # A device where 2 and 3 nano-batches overlap well and 4 pay too much fixed cost.
    truth = {(16,): 10.0, (4,): 4.0, (8,): 6.0, (8, 8): 9.0, (6, 5, 5): 9.8, (4, 4, 4, 4): 11.0, (4, 12): 9.5}
    calls = []
    result = search_split(lambda s: calls.append(s) or truth[s], 16, top=3)
    assert result.best == (8, 8) and result.measured[result.best] == 9.0
    assert result.cost_model.fixed == pytest.approx(2.0) and result.cost_model.per_row == pytest.approx(0.5)
    assert 0 < result.cost_model.overlap < 1 and result.speedup() == pytest.approx(10 / 9)
    assert set(calls) <= set(truth) and len(calls) == len(set(calls))  # each split measured once
    assert CostModel(2.0, 0.5, overlap=1.0).predict((8, 8)) == pytest.approx(8.0)


# ----- speculative decoding in the engine -----

def perturbed(params, scale, seed):
    """The params plus noise: a draft model that agrees with the target only sometimes."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x
                              for x, k in zip(leaves, keys)])


def greedy_as_plain(spec, model, params):
    """Six prompts (1-40 tokens) through a speculative engine: greedy answers as plain decoding's; its metrics."""
    prompts = random_prompts((1, 2, 19, 40, 7, 33), seed=4)
    want = Decoder(model, params, max_len=MAX_LEN, batch=len(prompts)).generate(prompts, max_new_tokens=NEW)
    seqs = spec.generate([Request(p, max_tokens=NEW) for p in prompts])
    for p, s, row in zip(prompts, seqs, np.asarray(want.tokens)):
        assert s.finish_reason == "length" and len(s.generated) == NEW
        assert_same_or_near_tie(model, params, p, s.generated, row.tolist())
    return spec.speculative_metrics()


def test_speculative_greedy_equals_plain_greedy_and_survives_preemption(tiny):
    model, params = tiny
    # 9 pages of 8 tokens cannot hold two of these sequences and their drafts: some are recomputed.
    spec = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, num_pages=9,
                                              prefill_chunk=16, speculative="draft", gamma=3, decode_buckets=(2,)),
                  draft=model, draft_params=perturbed(params, 0.6, seed=1))
    metrics = greedy_as_plain(spec, model, params)
    assert 0 < metrics["acceptance"] < 1  # rounds that accept some drafts and reject others
    assert metrics["target_forwards_per_token"] < 1
    assert spec.counters["preemptions"] > 0  # recomputed sequences rebuild the draft model's pages too
    assert spec.allocator.num_free == spec.allocator.num_pages


@pytest.mark.parametrize("mode", ["draft", "self", "triforce"])
def test_speculative_sampling_follows_plain_sampling(mode):
    """Second tokens (drafted and verified in a round) against the exact two-token marginal of the target.

    The rule itself (`jaxsys.speculative.accept`) is shared with `jaxsys generate`, whose test shows that
    this kind of check catches a wrong resampling rule; here it checks the engine's use of it. Self-speculation
    keeps 2 pages of 4 tokens of the 15-16 token contexts, so its drafts differ from the target's; TriForce puts
    the draft model (4-token window beside its sink page) under that, so both of its levels resample."""
    from scipy import stats
    config = dataclasses.replace(TINY, vocab_size=12)
    target, draft = ModelDef(config), ModelDef(dataclasses.replace(config, n_layers=1))
    sharpen = lambda p: jax.tree.map(lambda x: x * 12.0 if x.ndim >= 2 else x, p)  # noqa: E731 - peaked, unequal
    tp, dp = sharpen(target.init(3)), sharpen(draft.init(4))
    prompt, rows, sampling = random_prompts((14,), seed=5)[0], 600, dict(temperature=1.0, top_k=6)
    prompt = [t % 12 for t in prompt]
    setup = dict(speculative="draft", page_size=8) if mode == "draft" else \
        dict(speculative=mode, page_size=4, retrieval_budget=8, gamma_outer=2, draft_window=4)
    engine = Engine(target, tp, EngineConfig(max_batch=2, max_len=24, prefill_chunk=16, prefill_lanes=2,
                                             max_queue=rows, max_queued_pools=float(rows), gamma=2,
                                             decode_buckets=(2,), **setup),
                    **(dict(draft=draft, draft_params=dp) if mode != "self" else {}))
    seqs = engine.generate([Request(prompt, max_tokens=2, seed=i, **sampling) for i in range(rows)])
    second = np.asarray([s.generated[1] for s in seqs])
    one = SamplingParams.make(1, **sampling)
    first = warp(target.apply(tp, jnp.asarray([prompt]))[0][:, -1], one)[0]
    pairs = jnp.asarray([prompt + [t] for t in range(12)])
    after = warp(target.apply(tp, pairs)[0][:, -1], SamplingParams(*(jnp.repeat(x, 12) for x in one)))
    probs = np.asarray(first @ after, np.float64)
    counts = np.bincount(second, minlength=12).astype(np.float64)
    assert not counts[probs < 1e-12].any()  # nothing outside top-k
    keep = probs >= 5 / rows  # cells expected below 5 pooled into one
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(probs[keep], probs[~keep].sum()) * rows
    observed, expected = observed[expected > 0], expected[expected > 0]
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
    metrics = engine.speculative_metrics()
    assert 0 < metrics["acceptance"] < 1
    if mode == "triforce":
        assert 0 < metrics["draft_acceptance"] < 1


def test_speculative_engine_setups_are_checked(tiny):
    model, params = tiny
    other = ModelDef(dataclasses.replace(TINY, vocab_size=200))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, params, EngineConfig(speculative="draft"), draft=other, draft_params=other.init(1))
    with pytest.raises(ValueError, match="need a draft model"):
        Engine(model, params, EngineConfig(speculative="draft"))
    with pytest.raises(ValueError, match="gamma"):
        EngineConfig(speculative="draft", gamma=0)
    with pytest.raises(ValueError, match="serves"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="need a draft model"):
        Engine(model, params, EngineConfig(speculative="triforce"))
    with pytest.raises(ValueError, match="multiple of page_size"):
        EngineConfig(speculative="self", page_size=16, retrieval_budget=40)
    with pytest.raises(ValueError, match="exceeds the context length"):
        Engine(model, params, EngineConfig(speculative="self", max_len=64, page_size=8, retrieval_budget=128))
    with pytest.raises(ValueError, match="need a draft model"):  # self-speculation takes no draft model
        Engine(model, params, EngineConfig(speculative="self"), draft=model, draft_params=params)


# ----- self-speculation: the model over a retrieval selection of its own pages drafts -----

def test_self_speculation_greedy_equals_plain_greedy_and_survives_preemption(tiny):
    """Two pages of eight tokens kept: drafts that sometimes miss, answers that may not. (With every page kept the
    view is exact: the TriForce test below checks that its retrieval level then proposes only accepted tokens.)"""
    model, params = tiny
    spec = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, num_pages=9,
                                              prefill_chunk=16, speculative="self", gamma=3, retrieval_budget=16,
                                              rebuild_every=2, decode_buckets=(2,)))
    metrics = greedy_as_plain(spec, model, params)
    assert 0 < metrics["acceptance"] < 1
    assert spec.counters["preemptions"] > 0  # recomputed sequences get a new selection from their prefill
    assert metrics["retrieval_rebuilds"] >= 6  # one per prompt at least, then every 2 rounds
    assert metrics["target_forwards_per_token"] < 1
    assert spec.allocator.num_free == spec.allocator.num_pages


def test_triforce_greedy_equals_plain_greedy_and_survives_preemption(tiny):
    """The retrieval level keeps every page (64 tokens = the context), so it proposes what the target decodes
    whenever its own inner loop (a perturbed draft model over a 16-token window and the sink page, rejected often)
    is lossless: every proposal of the retrieval level must be accepted."""
    model, params = tiny
    spec = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, page_size=8, num_pages=9,
                                              prefill_chunk=16, speculative="triforce", gamma=2, gamma_outer=4,
                                              draft_window=16, retrieval_budget=MAX_LEN, rebuild_every=2,
                                              decode_buckets=(2,)),
                  draft=model, draft_params=perturbed(params, 0.6, seed=1))
    metrics = greedy_as_plain(spec, model, params)
    assert 0 < metrics["draft_acceptance"] < 1
    assert metrics["acceptance"] == 1.0 and metrics["target_forwards_per_token"] == 1 / 5  # 4 proposed + 1 own
    assert spec.counters["preemptions"] > 0  # recomputed sequences rebuild the draft model's pages too
    assert spec.allocator.num_free == spec.allocator.num_pages


def test_retrieval_view_equals_float64_attention_over_the_selected_pages():
    """Selected pages (per KV head) below `base`, every page from `base` to `limit`, the round's earlier tokens
    and the new ones: against float64 attention over exactly those keys, listed one by one."""
    from jaxsys.spec_serving import RetrievalStepCache, select_pages
    rng = np.random.default_rng(7)
    kv_heads, heads, hd, page_size, num_pages, width, b, t, e = 2, 4, 8, 4, 20, 8, 3, 2, 3
    k_pool, v_pool = (rng.normal(size=(kv_heads, num_pages, page_size, hd)).astype(np.float32) for _ in range(2))
    table = np.stack([rng.permutation(num_pages)[:width] for _ in range(b)]).astype(np.int32)
    limit = np.array([2, 17, 30], np.int32)  # keys in pages below it
    base = np.array([0, 9, 21], np.int32)  # ... through the selection below this, in full from here
    query = rng.normal(size=(b, heads, hd)).astype(np.float32)
    chunks = np.asarray(select_pages(jnp.asarray(k_pool), jnp.asarray(table), jnp.asarray(base), jnp.asarray(query),
                                     3))  # [b, kvH, 3]
    for row in range(b):  # page 0 and the page of base - 1 always, then the best-scoring pages below base
        for g in range(kv_heads):
            pages = range(-(-base[row] // page_size))
            scores = {p: k_pool[g, table[row, p]].astype(np.float64).mean(0)
                      @ query[row, g * 2:g * 2 + 2].astype(np.float64).mean(0) for p in pages}
            forced = {0, max(base[row] - 1, 0) // page_size} & set(pages)
            rest = sorted(set(pages) - forced, key=lambda p: -scores[p])[:3 - len(forced)]
            assert set(chunks[row, g]) >= forced | set(rest)
    extra_pos = np.array([[-1, -1, -1], [17, 18, -1], [30, 31, 32]], np.int32)
    positions = np.array([[2, 3], [19, 20], [33, -1]], np.int32)
    extra_k, extra_v = (rng.normal(size=(b, e, kv_heads, hd)).astype(np.float32) for _ in range(2))
    new_k, new_v = (rng.normal(size=(b, t, kv_heads, hd)).astype(np.float32) for _ in range(2))
    q = rng.normal(size=(b, t, heads, hd)).astype(np.float32)
    view = RetrievalStepCache((jnp.asarray(k_pool),), (jnp.asarray(v_pool),), jnp.asarray(table),
                              jnp.asarray(chunks), jnp.asarray(base), jnp.asarray(limit), jnp.asarray(extra_k),
                              jnp.asarray(extra_v), jnp.asarray(extra_pos), window_pages=4)
    out, _ = view.attend(jnp.asarray(q), jnp.asarray(new_k), jnp.asarray(new_v), jnp.asarray(positions))
    for row in range(b):
        for i in range(t):
            if positions[row, i] < 0:
                continue
            for h in range(heads):
                g = h // 2
                keys, values = [], []
                for pos in range(limit[row]):  # from pages
                    if pos >= base[row] or pos // page_size in chunks[row, g]:
                        page = table[row, pos // page_size]
                        keys.append(k_pool[g, page, pos % page_size])
                        values.append(v_pool[g, page, pos % page_size])
                for j in range(e):
                    if 0 <= extra_pos[row, j] <= positions[row, i]:
                        keys.append(extra_k[row, j, g])
                        values.append(extra_v[row, j, g])
                for j in range(t):
                    if 0 <= positions[row, j] <= positions[row, i]:
                        keys.append(new_k[row, j, g])
                        values.append(new_v[row, j, g])
                logits = np.asarray(keys, np.float64) @ q[row, i, h].astype(np.float64) / np.sqrt(hd)
                w = np.exp(logits - logits.max())
                np.testing.assert_allclose(np.asarray(out[row, i, h]), w @ np.asarray(values, np.float64) / w.sum(),
                                           atol=1e-5)


def random_pages(seed, *, kv_heads=2, heads=4, hd=8, page_size=4, num_pages=12, width=5, queries=2):
    """Fresh random pools [kvH, pages, page, hd], page tables, queries, and starts: none, part of a page,
    several pages, the whole table."""
    rng = np.random.default_rng(seed)
    k_pool, v_pool = (rng.normal(size=(kv_heads, num_pages, page_size, hd)).astype(np.float32) for _ in range(2))
    table = np.stack([rng.permutation(num_pages)[:width] for _ in range(4)]).astype(np.int32)
    start = np.array([0, 3, 13, width * page_size], np.int32)
    q = rng.normal(size=(4, queries, heads, hd)).astype(np.float32)
    return q, k_pool, v_pool, table, start


def assert_float64_attention_over_the_pages(out, lse, q, k_pool, v_pool, table, start):
    """(out, lse) are each row's queries over its keys at positions < start, read through its page table."""
    kv_heads, heads, hd = k_pool.shape[0], q.shape[2], q.shape[3]
    for row in range(q.shape[0]):
        n = start[row]
        keys = k_pool[:, table[row]].reshape(kv_heads, -1, hd)[:, :n].astype(np.float64)
        values = v_pool[:, table[row]].reshape(kv_heads, -1, hd)[:, :n].astype(np.float64)
        for h in range(heads):
            logits = q[row, :, h].astype(np.float64) @ keys[h * kv_heads // heads].T / np.sqrt(hd)  # [T, n]
            if n == 0:
                assert np.all(np.asarray(out[row, :, h]) == 0) and np.all(np.isneginf(np.asarray(lse[row, :, h])))
                continue
            m = logits.max(-1, keepdims=True)
            w = np.exp(logits - m)
            np.testing.assert_allclose(np.asarray(out[row, :, h]), (w @ values[h * kv_heads // heads]) / w.sum(-1,
                                       keepdims=True), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(lse[row, :, h]), (m + np.log(w.sum(-1, keepdims=True)))[:, 0],
                                       rtol=1e-5, atol=1e-5)


# 2 queries x 2 groups per KV head: one matrix-vector product each (decode rows on CPU); 9 x 2: one batched dot.
@pytest.mark.parametrize("pages_per_step,queries", [(1, 2), (3, 2), (8, 2), (3, 9)])
def test_scan_attention_equals_float64_attention_over_the_pages(pages_per_step, queries):
    from jaxsys.model import MATVEC_QUERIES
    from jaxsys.nanobatch import scan_attention
    assert (queries * 2 <= MATVEC_QUERIES) == (queries == 2)
    q, k_pool, v_pool, table, start = random_pages(pages_per_step + queries, queries=queries)
    out, lse = scan_attention(*map(jnp.asarray, (q, k_pool, v_pool, table, start)), pages_per_step=pages_per_step)
    assert_float64_attention_over_the_pages(out, lse, q, k_pool, v_pool, table, start)


# head_dim 64 and 128 take the kernel's fixed-size loops, 8 its general one; 6 x 3 queries per KV head is a
# speculative verify of 4 drafts.
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a kernel for XLA:CPU")
@pytest.mark.parametrize("hd,heads,queries", [(64, 6, 1), (128, 4, 1), (8, 6, 6)])
def test_cpu_kernel_equals_float64_attention_over_the_pages(hd, heads, queries):
    from jaxsys.kvcache import cpu_kernel
    assert cpu_kernel.available(), "the CPU kernel did not build: see the warning logged by cpu_kernel.available()"
    q, k_pool, v_pool, table, start = random_pages(hd + queries, heads=heads, hd=hd, page_size=16, num_pages=30,
                                                   width=7, queries=queries)
    out, lse = jax.jit(cpu_kernel.paged_attention)(*map(jnp.asarray, (q, k_pool, v_pool, table, start)))
    assert_float64_attention_over_the_pages(out, lse, q, k_pool, v_pool, table, start)
    # A start past the table reads the whole table, and page ids out of range are clamped, never read past the pool.
    wild = np.where(np.arange(table.shape[1]) % 2, table, 10**6).astype(np.int32)
    out, lse = cpu_kernel.paged_attention(*map(jnp.asarray, (q, k_pool, v_pool, wild, start + 1000)))
    clamped = np.minimum(wild, k_pool.shape[1] - 1)
    assert_float64_attention_over_the_pages(out, lse, q, k_pool, v_pool, clamped,
                                            np.full_like(start, table.shape[1] * 16))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a kernel for XLA:CPU")
def test_decode_steps_use_the_cpu_kernel_unless_the_reference_is_asked_for(tiny):
    model, params = tiny
    texts = {}
    for impl in ("auto", "reference"):
        engine = Engine(model, params, EngineConfig(max_batch=2, max_len=MAX_LEN, attention_impl=impl))
        lowered = engine._program(2, True, False).lower(params, engine.pools, engine._lane(2, 1, []),
                                                        engine._lane(1, engine.config.prefill_chunk, []))
        texts[impl] = lowered.as_text()
    from jaxsys.kvcache.cpu_kernel import TARGET
    from jaxsys.nanobatch import page_attention_path
    # Decode rows (1 query x 2 groups per KV head) take the kernel; the prefill lane (32 x 2) XLA's dots.
    assert texts["auto"].count(TARGET) == TINY.n_layers and TARGET not in texts["reference"]
    groups = TINY.n_heads // TINY.n_kv_heads
    assert page_attention_path(1, groups, jnp.float32, jnp.float32) == "cpu_kernel"
    assert page_attention_path(engine.config.prefill_chunk, groups, jnp.float32, jnp.float32) == "jnp"
    assert page_attention_path(1, groups, jnp.float32, jnp.float32, impl="reference") == "jnp"


def test_cpu_kernel_build_failure_is_a_clear_error(tmp_path, monkeypatch):
    from jaxsys.kvcache import cpu_kernel
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C[+][+] compiler"):
        cpu_kernel.build(tmp_path)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a kernel for XLA:CPU")
def test_cpu_kernel_builds_in_the_temporary_directory_when_its_cache_cannot_be_made(tmp_path, monkeypatch):
    from jaxsys.kvcache import cpu_kernel
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cpu_kernel.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = cpu_kernel.build(blocker / "cache")  # cannot be a directory: a file is in the way
    assert path.is_file() and path.parent.parent == tmp_path / "tmp"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a kernel for XLA:CPU")
def test_cpu_kernel_refuses_pools_it_cannot_read():
    from jaxsys.kvcache import cpu_kernel
    q = jnp.ones((1, 1, 4, 8))
    table, start = jnp.zeros((1, 2), jnp.int32), jnp.full((1,), 5, jnp.int32)
    for shape, message in [((2, 3, 0, 8), "pages of no tokens"), ((2, 3, 4, 16), "head_dim"),
                           ((3, 3, 4, 8), "head groups")]:
        pool = jnp.ones(shape)
        with pytest.raises(jax.errors.JaxRuntimeError, match=message):
            jax.block_until_ready(cpu_kernel.paged_attention(q, pool, pool, table, start))
