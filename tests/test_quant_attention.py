"""Decode attention over a quantized paged KV cache: formats, reference, merge, kernel.

Facts a user relies on: quantized tokens come back within half a quantization step;
int4 pages cost under 0.3x of bf16; attention merged from disjoint page sets equals
attention over all of them (how device, host and disk parts combine); int8 pages change
attention by a few percent at most; the kernel (interpreted on CPU) equals the reference
over the same pages; it lowers for CUDA (Triton); bad inputs say what is wrong.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_attention import (
    BlockSizes, bytes_per_token, dequantize_kv_int4, dequantize_kv_int8, merge_partials,
    pack_int4, paged_decode_attention, paged_decode_attention_kernel, quantize_kv,
    quantize_kv_int4, quantize_kv_int8, unpack_int4)
from pallas_kernels.quant_attention import reference

KV_HEADS, PAGE_SIZE, HEAD_DIM, SLOTS = 2, 8, 32, 6
LENGTHS = (45, 1, 0, 21)  # not multiples of PAGE_SIZE; 1 key; no key at all


# Inputs come from numpy: eager jax.random calls would each compile a program.
def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _problem(seed, fmt, groups, lengths=LENGTHS, head_dim=HEAD_DIM, q_dtype=jnp.float32):
    """Random pages in ``fmt`` and a page table giving each sequence scattered, disjoint pages."""
    batch = len(lengths)
    num_pages = batch * SLOTS + 3
    shape = (KV_HEADS, num_pages, PAGE_SIZE, head_dim)
    k = quantize_kv(_normal(seed, shape), fmt)
    v = quantize_kv(_normal(seed + 1, shape), fmt)
    pages = np.random.default_rng(seed + 2).permutation(num_pages)
    table = jnp.asarray(pages[:batch * SLOTS].reshape(batch, SLOTS), jnp.int32)
    q = _normal(seed + 3, (batch, KV_HEADS * groups, head_dim), q_dtype)
    return q, k, v, table, jnp.asarray(lengths, jnp.int32)


# --- formats ---------------------------------------------------------------------------------


def test_int8_tokens_come_back_within_half_a_step_for_any_leading_shape():
    x = 3 * np.asarray(_normal(0, (2, 5, 7, 64)))
    x[1, 2, 3] = 0  # one all-zero token
    data, scale = quantize_kv_int8(x)
    assert data.dtype == jnp.int8 and data.shape == x.shape and scale.shape == (2, 5, 7)
    error = np.abs(np.asarray(dequantize_kv_int8(data, scale)) - x)
    assert np.all(error <= np.asarray(scale)[..., None] / 2 + 1e-6)
    assert float(scale[1, 2, 3]) == 0 and not np.any(error[1, 2, 3])


def test_int4_packs_two_per_byte_low_nibble_first_and_round_trips():
    codes = jnp.asarray(np.random.default_rng(1).integers(0, 16, (3, 4, 16)), jnp.int32)
    packed = pack_int4(codes)
    assert packed.shape == (3, 4, 8) and packed.dtype == jnp.uint8
    assert int(packed[2, 1, 5]) == int(codes[2, 1, 10]) | int(codes[2, 1, 11]) << 4
    np.testing.assert_array_equal(unpack_int4(packed), codes)


def test_int4_tokens_come_back_within_half_a_step():
    x = 2 * np.asarray(_normal(2, (4, 9, 128))) + 1
    packed, scale, zero = quantize_kv_int4(x)
    assert packed.shape == (4, 9, 64) and scale.shape == zero.shape == (4, 9)
    step = np.asarray(scale, np.float32)[..., None]
    error = np.abs(np.asarray(dequantize_kv_int4(packed, scale, zero)) - x)
    # bf16 scale and zero move the grid by a few thousandths of a step.
    assert np.all(error <= step * 0.51)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_int4_pages_cost_under_0_3x_of_bf16(head_dim):
    bf16 = bytes_per_token("float", head_dim)
    assert bf16 == 2 * head_dim
    assert bytes_per_token("int4", head_dim) <= 0.30 * bf16
    assert bytes_per_token("int8", head_dim) <= 0.54 * bf16


# --- reference and merge ----------------------------------------------------------------------


def test_merge_of_disjoint_page_sets_equals_attention_over_all():
    q, k, v, table, lengths = _problem(10, "int8", groups=2)
    attend = functools.partial(reference.paged_decode_attention, fmt="int8")
    whole = attend(q, k, v, table, lengths)
    # Keys split by page: the first two slots, and the rest (empty for short sequences),
    # whose table starts at slot 2 (the slots rolled past its length are never read).
    head_keys = 2 * PAGE_SIZE
    first = attend(q, k, v, table, np.minimum(lengths, head_keys))
    rest = attend(q, k, v, np.roll(table, -2, axis=1), np.maximum(lengths - head_keys, 0))
    assert np.all(np.isneginf(rest[1][1:3]))  # lengths 1 and 0: nothing past slot 2
    for parts in ([first, rest], [rest, first]):
        out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        np.testing.assert_allclose(out, whole[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse, whole[1], rtol=1e-6)


def test_a_sequence_without_keys_gives_zero_output_and_minus_inf_lse():
    q, k, v, table, _ = _problem(11, "float", groups=1, lengths=(0, 5))
    out, lse = reference.paged_decode_attention(q, k, v, table, jnp.array([0, 5]), fmt="float")
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.isfinite(out[1])) and np.all(np.isfinite(lse[1]))
    merged_out, merged_lse = merge_partials(np.stack([out, out]), np.stack([lse, lse]))
    assert not np.any(np.isnan(merged_out))
    assert np.all(np.isneginf(merged_lse[0]))
    np.testing.assert_allclose(merged_lse[1], lse[1] + np.log(2), rtol=1e-6)
    np.testing.assert_allclose(merged_out[1], out[1], rtol=1e-6, atol=1e-7)


# Mean relative L2 error of the output against float32 pages, Gaussian keys and values:
# bounds a little above what this test measures (int8 0.009, int4 0.125).
QUANTIZED_ERROR_BOUNDS = {"int8": 0.05, "int4": 0.15}


@pytest.mark.parametrize("fmt", QUANTIZED_ERROR_BOUNDS)
def test_quantized_attention_stays_close_to_full_precision(fmt):
    lengths = (48, 33, 17, 40)
    x = _problem(12, "float", groups=4, lengths=lengths, head_dim=64)
    q, (k,), (v,), table, lengths = x
    exact, _ = reference.paged_decode_attention(q, (k,), (v,), table, lengths, fmt="float")
    quantized, _ = reference.paged_decode_attention(
        q, quantize_kv(k, fmt), quantize_kv(v, fmt), table, lengths, fmt=fmt)
    quantized, exact = np.asarray(quantized), np.asarray(exact)
    relative = np.linalg.norm(quantized - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    assert relative.mean() <= QUANTIZED_ERROR_BOUNDS[fmt], relative.mean()


# --- the kernel (interpret mode) ---------------------------------------------------------------

# Two splits of two-page blocks: the 45-token sequence fills both splits, the 21-token
# one leaves the second split empty, the 1-token one reads one key of one page.
SMALL_BLOCKS = BlockSizes(pages_per_block=2)
KERNEL_CASES = [("float", 1), ("float", 4), ("int8", 1), ("int8", 4), ("int4", 1), ("int4", 4)]


@pytest.mark.parametrize("fmt,groups", KERNEL_CASES,
                         ids=[f"{fmt}-groups{groups}" for fmt, groups in KERNEL_CASES])
def test_kernel_matches_reference_over_the_same_pages(fmt, groups):
    q, k, v, table, lengths = _problem(20 + groups, fmt, groups)
    got = paged_decode_attention_kernel(q, k, v, table, lengths, fmt=fmt, num_splits=2,
                                        block_sizes=SMALL_BLOCKS, interpret=True)
    want = reference.paged_decode_attention(q, k, v, table, lengths, fmt=fmt)
    assert got[0].shape == q.shape and got[1].shape == q.shape[:2]
    scale = float(np.abs(want[0]).max())
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)  # -inf where length 0


def test_api_runs_the_reference_on_cpu_and_the_kernel_agrees_with_bf16_queries():
    q, (k, k_scale, k_zero), (v, v_scale, v_zero), table, lengths = _problem(
        30, "int4", groups=4, q_dtype=jnp.bfloat16)
    scales = {"k_scale": k_scale, "k_zero": k_zero, "v_scale": v_scale, "v_zero": v_zero}
    auto = paged_decode_attention(q, k, v, table, lengths, **scales)
    want = reference.paged_decode_attention(q, (k, k_scale, k_zero), (v, v_scale, v_zero),
                                            table, lengths, fmt="int4")
    np.testing.assert_array_equal(auto[0], want[0])
    # Default block sizes and splits; bf16 dots round the probabilities to bf16.
    out, lse = paged_decode_attention(q, k, v, table, lengths, impl="pallas", **scales)
    np.testing.assert_allclose(out, want[0], rtol=0, atol=2e-2 * float(np.abs(want[0]).max()))
    np.testing.assert_allclose(lse, want[1], rtol=1e-2, atol=1e-2)


# --- lowering for CUDA -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt,q_dtype", [("float", jnp.bfloat16), ("float", jnp.float32),
                                         ("int8", jnp.bfloat16), ("int4", jnp.bfloat16),
                                         ("int4", jnp.float32)])
def test_kernel_lowers_for_cuda(fmt, q_dtype):
    S = jax.ShapeDtypeStruct
    batch, kv_heads, groups, head_dim = 4, 8, 4, 128
    # Neither the pool (1000 pages) nor the table (37 slots) is a power of two.
    pool = jax.eval_shape(lambda x: quantize_kv(x, fmt), S((kv_heads, 1000, 16, head_dim), q_dtype))
    exported = jax.export.export(
        jax.jit(functools.partial(paged_decode_attention_kernel, fmt=fmt, interpret=False)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(S((batch, kv_heads * groups, head_dim), q_dtype), pool, pool,
      S((batch, 37), jnp.int32), S((batch,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


# --- errors ----------------------------------------------------------------------------------


def test_bad_inputs_say_what_is_wrong():
    problem = jax.tree.map(np.asarray, _problem(40, "int8", groups=2))  # numpy slices: no compiles
    q, (k, k_scale), (v, v_scale), table, lengths = problem
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    with pytest.raises(ValueError, match=r"head_dim must be even, got 31"):
        quantize_kv_int4(np.ones((4, 31), np.float32))
    with pytest.raises(ValueError, match=r"int4 pages need an even head_dim, got 31"):
        x = np.ones((KV_HEADS, 4, PAGE_SIZE, 16), np.uint8)
        side = np.ones(x.shape[:3], np.float32)
        paged_decode_attention(q[..., :31], x, x, table, lengths, k_scale=side, v_scale=side,
                               k_zero=side, v_zero=side)
    with pytest.raises(ValueError, match=r"n_heads=3 must be a multiple of kv_heads=2"):
        paged_decode_attention(q[:, :3], k, v, table, lengths, **scales)
    with pytest.raises(ValueError, match=r"k and v pages must have the same shape"):
        paged_decode_attention(q, k, v[:, :5], table, lengths, k_scale=k_scale,
                               v_scale=v_scale[:, :5])
    with pytest.raises(ValueError, match=r"v_scale must have shape \(2, 27, 8\)"):
        paged_decode_attention(q, k, v, table, lengths, k_scale=k_scale, v_scale=v_scale[..., :4])
    with pytest.raises(ValueError, match=r"int8 pages need v_scale"):
        paged_decode_attention(q, k, v, table, lengths, k_scale=k_scale)
    with pytest.raises(ValueError, match=r"lengths must have shape \(4,\)"):
        paged_decode_attention(q, k, v, table, lengths[:2], **scales)
    with pytest.raises(ValueError, match=r"page_size=6 must be a power of two"):
        paged_decode_attention(q, k[:, :, :6], v[:, :, :6], table, lengths, impl="pallas",
                               k_scale=k_scale[..., :6], v_scale=v_scale[..., :6])
    with pytest.raises(ValueError, match=r"pages_per_block=1 x page_size=8 must be at least 16"):
        paged_decode_attention(q, k, v, table, lengths, impl="pallas",
                               block_sizes=BlockSizes(pages_per_block=1), **scales)
