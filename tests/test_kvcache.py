"""Paged, quantized and offloaded KV caches, and SmoothAttention.

Facts a user relies on: float pages generate exactly the dense cache's greedy tokens;
int8 and int4 pages predict the float pages' tokens at most positions; a pool that runs out says so (or
evicts, if asked) and freed pages serve the next sequence as if new; greedy tokens do
not depend on whether pages live on the device, in host memory or on disk, nor on
fetching them or attending near them, while near-data attention moves far fewer bytes;
a disk tier that cannot be written fails when it is built; SmoothAttention leaves the
float model's logits unchanged and lowers int4 attention error on outlier keys.
"""

import dataclasses
import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsys.config import get_preset
from jaxsys.decode import Decoder
from jaxsys.kvcache import offload
from jaxsys.kvcache.offload import (DiskTierError, TieredCache, build_kv_cache, device_kv_bytes, parse_bytes,
                                    release, tiered_cache, transfer_bytes)
from jaxsys.kvcache.paged import (PageAllocator, PagedCache, PagePoolExhausted, check_overflow, kv_nbytes,
                                  paged_cache)
from jaxsys.model import ModelDef
from jaxsys.quant import smooth_attention as sa

CONFIG = get_preset("tiny")
ONE_LAYER = dataclasses.replace(CONFIG, n_layers=1)
MAX_LEN, PAGE, NEW = 40, 4, 16
PROMPTS = [[257, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 73, 116], [257, 65, 66]]


@pytest.fixture(scope="module")
def model():
    m = ModelDef(CONFIG)
    return m, m.init(0)


@pytest.fixture(scope="module")
def decoder(model):
    return Decoder(model[0], model[1], max_len=MAX_LEN, batch=len(PROMPTS), prefill_chunk=8)


def _generate(decoder, cache):
    out = decoder.generate(PROMPTS, max_new_tokens=NEW, cache=cache)
    return np.asarray(out.tokens), out.cache


@pytest.fixture(scope="module")
def paged_tokens(decoder):
    """Greedy tokens per page format (and the dense cache's under "dense")."""
    tokens = {"dense": _generate(decoder, None)[0]}
    for fmt in ("float", "int8", "int4"):
        tokens[fmt], cache = _generate(decoder, paged_cache(CONFIG, len(PROMPTS), MAX_LEN, fmt=fmt, page_size=PAGE))
        check_overflow(cache)
    return tokens


def test_float_pages_generate_the_dense_cache_greedy_tokens(paged_tokens):
    np.testing.assert_array_equal(paged_tokens["float"], paged_tokens["dense"])


def test_int8_and_int4_pages_predict_the_float_tokens_at_most_positions(model, paged_tokens):
    """Teacher-forced: the prompt and the float pages' greedy tokens, top-1 with quantized pages."""
    m, params = model
    window = np.asarray(PROMPTS[0] + list(paged_tokens["float"][0]))[None, :-1]  # [1, 32]
    start = len(PROMPTS[0]) - 1  # the prediction of the first generated token
    forward = jax.jit(lambda c, t: m.apply(params, t, None, c)[0])
    for fmt, least in (("int8", 0.95), ("int4", 0.8)):
        logits = forward(paged_cache(CONFIG, 1, window.shape[1], fmt=fmt, page_size=PAGE), jnp.asarray(window))
        agree = np.mean(np.argmax(logits[0, start:], -1) == paged_tokens["float"][0])
        assert agree >= least, fmt
        assert paged_tokens[fmt][:, 0].tolist() == paged_tokens["float"][:, 0].tolist()  # the first token: prefill


def test_int4_pages_take_under_0_3x_of_bf16_per_token():
    config = dataclasses.replace(ONE_LAYER, head_dim=128, dtype="bfloat16")
    per_token = {fmt: kv_nbytes(paged_cache(config, 1, 16, fmt=fmt, page_size=16)) for fmt in ("float", "int4")}
    assert per_token["int4"] <= 0.30 * per_token["float"]


# --- allocation --------------------------------------------------------------------------------------


def test_an_exhausted_pool_raises_a_clear_error_and_keeps_its_pages():
    alloc = PageAllocator(num_pages=5, page_size=4)
    assert alloc.allocate("a", 9) == [0, 1, 2]
    with pytest.raises(PagePoolExhausted, match=r"needs 3 more page\(s\).*2 of 5 are free"):
        alloc.allocate("b", 12)
    assert alloc.num_free == 2 and alloc.pages("b") == []
    with pytest.raises(PagePoolExhausted):
        paged_cache(CONFIG, 2, 16, page_size=4, allocator=PageAllocator(num_pages=7, page_size=4))


def test_evicting_policy_frees_the_oldest_other_sequences():
    alloc = PageAllocator(num_pages=6, page_size=4, policy="evict_oldest")
    alloc.allocate("a", 8)
    alloc.allocate("b", 8)
    alloc.allocate("a", 12)  # a grows: now the most recently allocated
    alloc.allocate("c", 8)
    assert alloc.evicted == ["b"] and alloc.pages("b") == []
    assert sorted(alloc.pages("a") + alloc.pages("c")) == list(range(5)) and alloc.num_free == 1


def test_freed_pages_serve_the_next_sequence_as_fresh_ones():
    alloc = PageAllocator(num_pages=3, page_size=4)
    alloc.allocate("old", 12)
    (layer,) = paged_cache(ONE_LAYER, 1, 12, fmt="int8", page_size=4)
    rng = np.random.default_rng(0)
    hd, kv, h = CONFIG.resolved_head_dim, CONFIG.n_kv_heads, CONFIG.n_heads
    kv_old, kv_new = (jnp.asarray(rng.standard_normal((2, 1, 12, kv, hd)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((1, 5, h, hd)), jnp.float32)
    pos = jnp.arange(12)[None]
    attend = jax.jit(lambda c, q, k, v, p: c.attend(q, k, v, p))
    old = jax.jit(lambda c: c.write(kv_old[0], kv_old[1], pos))(layer.with_page_table(alloc.page_table(["old"], 3)))
    alloc.free("old")
    assert alloc.allocate("new", 12) == [0, 1, 2]  # the same pages, holding the old tokens
    reused, _ = attend(old.with_page_table(alloc.page_table(["new"], 3)), q, kv_new[0][:, :5], kv_new[1][:, :5],
                       pos[:, :5])
    fresh, _ = attend(layer, q, kv_new[0][:, :5], kv_new[1][:, :5], pos[:, :5])
    np.testing.assert_array_equal(np.asarray(reused), np.asarray(fresh))


def test_a_write_past_the_pages_is_flagged_not_lost_silently():
    (layer,) = paged_cache(ONE_LAYER, 1, 8, page_size=4)
    k = jnp.ones((1, 1, CONFIG.n_kv_heads, CONFIG.resolved_head_dim))
    written = jax.jit(lambda c, p: c.write(k, k, p))(layer, jnp.asarray([[8]]))
    with pytest.raises(PagePoolExhausted, match="wrote past their pages"):
        check_overflow([written])


# --- offload tiers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offload_runs(decoder, tmp_path_factory):
    """(tokens, bytes, device bytes) per (mode, tier): int4 pages, 2 of 10 pages per sequence on the device."""
    runs = {}
    for mode in ("near_data", "fetch"):  # one compiled program per mode serves both tiers
        for tier in ("host", "disk"):
            cache = tiered_cache(CONFIG, len(PROMPTS), MAX_LEN, ring_pages=2, fmt="int4", tier=tier, mode=mode,
                                 page_size=PAGE, path=tmp_path_factory.mktemp(f"{mode}-{tier}"))
            tokens, cache = _generate(decoder, cache)
            runs[mode, tier] = tokens, transfer_bytes(cache), device_kv_bytes(cache)
            release(cache)
    return runs


def test_greedy_tokens_do_not_depend_on_where_pages_live(paged_tokens, offload_runs):
    for (mode, tier), (tokens, _, _) in offload_runs.items():
        np.testing.assert_array_equal(tokens, paged_tokens["int4"], err_msg=f"{tier} pages, {mode}")


def test_near_data_attention_moves_far_fewer_bytes_than_fetching(offload_runs):
    near, fetch = offload_runs["near_data", "host"][1], offload_runs["fetch", "host"][1]
    # (out, lse) per query head against int4 pages of at most 40 tokens; at 8K tokens it is < 2%
    assert near["host_to_device"] < 0.5 * fetch["host_to_device"]
    assert near["disk_to_host"] == fetch["disk_to_host"] == 0  # host pages touch no disk
    disk = offload_runs["near_data", "disk"][1]
    assert disk["host_to_disk"] > 0 and disk["disk_to_host"] > 0
    assert disk["device_to_host"] == near["device_to_host"]  # the same program moved the same arrays
    # the device keeps only its ring: 2 of each sequence's 10 pages (and a store id per layer)
    device = offload_runs["near_data", "host"][2]
    assert device < kv_nbytes(paged_cache(CONFIG, len(PROMPTS), MAX_LEN, fmt="int4", page_size=PAGE)) / 4


def test_build_kv_cache_fills_the_device_first_and_offloads_past_the_budget(tmp_path):
    full = build_kv_cache(CONFIG, 1, 64, kv_bits=8, page_size=4)
    assert isinstance(full[0], PagedCache)
    budget = kv_nbytes(full)
    assert isinstance(build_kv_cache(CONFIG, 1, 64, kv_bits=8, offload="host", device_budget_bytes=budget,
                                     page_size=4)[0], PagedCache)
    with pytest.raises(ValueError, match="over the .*-byte budget.*--kv-offload"):
        build_kv_cache(CONFIG, 1, 64, kv_bits=8, device_budget_bytes=budget // 2, page_size=4)
    cache = build_kv_cache(CONFIG, 1, 64, kv_bits=8, offload="disk", device_budget_bytes=budget // 2, page_size=4,
                           disk_path=tmp_path / "kv")
    assert isinstance(cache[0], TieredCache) and device_kv_bytes(cache) <= budget // 2
    assert len(os.listdir(tmp_path / "kv")) == 2 * 2 * CONFIG.n_layers  # data and scales, k and v
    release(cache)
    assert os.listdir(tmp_path / "kv") == []
    assert parse_bytes("64MiB") == 64 << 20 and parse_bytes("1.5k") == 1500
    with pytest.raises(ValueError, match="as a size"):
        parse_bytes("lots")


def test_a_disk_tier_under_a_regular_file_fails_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DiskTierError, match="cannot create the disk KV tier's directory"):
        tiered_cache(CONFIG, 1, 32, ring_pages=1, tier="disk", page_size=4, path=blocker / "kv")


def test_a_disk_tier_on_a_full_disk_fails_clearly_and_leaves_no_files(tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(offload.os, "posix_fallocate", full)
    with pytest.raises(DiskTierError, match="not enough space for the disk KV tier") as info:
        tiered_cache(CONFIG, 1, 32, ring_pages=1, tier="disk", page_size=4, path=tmp_path / "kv")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "kv") == []


# --- SmoothAttention ----------------------------------------------------------------------------------


def _outlier_params(params, scale=20.0):
    """The same function with key channel 3 (and its RoPE pair) `scale`x larger: trained-model-like keys."""
    half = CONFIG.resolved_head_dim // 2
    attn = params["layers"][0]["attn"]
    channels = jnp.ones(CONFIG.resolved_head_dim).at[jnp.asarray([3, 3 + half])].set(scale)
    layers = dict(params["layers"])
    layers[0] = {**layers[0], "attn": {**attn, "k": attn["k"] * channels, "q": attn["q"] / channels}}
    return {**params, "layers": layers}


def test_smooth_attention_leaves_the_float_logits_unchanged(model):
    m, params = model
    params = _outlier_params(params)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 24))
    smoothed, scales, alphas = sa.smooth_attention(CONFIG, params, tokens, alpha=0.5)
    assert alphas == [0.5, 0.5]
    half = CONFIG.resolved_head_dim // 2
    np.testing.assert_array_equal(scales[..., :half], scales[..., half:])  # tied across RoPE pairs
    assert scales[0, :, 3].min() > 3 * np.median(scales[0])  # the outlier channel is divided the most
    apply = jax.jit(m.apply)
    before, after = apply(params, jnp.asarray(tokens))[0], apply(smoothed, jnp.asarray(tokens))[0]
    assert float(jnp.max(jnp.abs(after - before)) / jnp.max(jnp.abs(before))) < 1e-4


def test_smooth_attention_lowers_int4_attention_error_on_outlier_keys():
    rng = np.random.default_rng(2)
    b, t, kv, groups, hd = 2, 48, 2, 2, 32
    k = rng.standard_normal((b, t, kv, hd)).astype(np.float32)
    k[..., [5, 5 + hd // 2]] *= 25  # outlier channels, as trained models' keys have
    q = 2 * rng.standard_normal((b, t, kv * groups, hd)).astype(np.float32)
    v = rng.standard_normal((b, t, kv, hd)).astype(np.float32)
    plain = sa.kv_attention_error(q, k, v, "int4")
    smoothed = sa.kv_attention_error(q, k, v, "int4", sa.scales_for(sa.tied_key_max(k), 0.5))
    assert smoothed < 0.7 * plain
    assert sa.kv_attention_error(q, k, v, "int8") < 0.05
