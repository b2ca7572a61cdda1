"""Pallas kernel: split-K decode attention over paged KV, dequantizing pages in the kernel.

FlashDecoding's split along the sequence, over vLLM-style pages. The grid is
``(batch, kv_heads, num_splits)``: a program takes the query heads that share one KV
head (GQA), walks its split's pages in blocks of ``pages_per_block`` with an online
softmax inside the kernel (``lax.fori_loop``; no grid axis accumulates into one output,
which would race on a GPU), and writes a partial (out, lse). The splits are merged
after the kernel with ``reference.merge_partials``.

The page table is an ordinary input: a program reads its split's slice, and gathers
pages from the KV head's whole pool by index (``pool_ref[page_ids]``), as JAX's
``pallas/ops/gpu/paged_attention.py`` does; this lowers to Triton and runs interpreted
on CPU, where scalar prefetch does not exist on the Triton path. Only the pages a
sequence has are read: the loop stops at ``ceil(length / page_size)``, and slots past
it are redirected to page 0 before the gather, so stale table entries are harmless.

Pages stay quantized in HBM; a block's codes convert to the compute dtype in registers
(bf16/f16 queries: that dtype, exact for int8 and int4 codes; f32 queries: f32, with
IEEE dots), so every dot has equal float operands, and the per-token scales and zeros
are applied to the [heads, block_k] logits and probabilities rather than to the
[block_k, head_dim] tiles (QServe's trick: head_dim times fewer multiplies). int4 codes are never interleaved in registers: the low
nibbles hold the even head dims and the high nibbles the odd ones, so the query is
passed with its even dims first (``[even | odd]``), logits are the sum of two dots,
the output comes back in the same order and is put back in place after the merge.

A Triton dot needs at least 16 rows: the group of query heads is padded to
``block_h = max(16, next power of two)`` rows (a few bytes per sequence).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.lowbit_matmul.common import default_interpret, triton_compiler_params
from pallas_kernels.quant_attention.formats import check_inputs
from pallas_kernels.quant_attention.reference import merge_partials

# Programs to aim for when picking num_splits: many per SM of a current GPU (132 on an
# H100/H200), so that page loads of some hide the latency of others; a decode program
# does little arithmetic per byte. (JAX's paged attention splits each sequence 16 ways.)
TARGET_PROGRAMS = 2048
MIN_BLOCKS_PER_SPLIT = 4  # fewer, and launching programs and merging partials costs more than it hides
MIN_DOT = 16  # Triton's smallest dot tile edge


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Pages per loop step (a power of two) and Triton launch parameters.

    ``pages_per_block * page_size`` keys are dequantized and multiplied per step; the
    default aims at 128 (a [128, head_dim] tile of K and of V), and at least 16; the
    defaults come from ``experiments/attention_gpu.py --sweep`` on an H200.
    """

    pages_per_block: int = 8
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_shape(cls, page_size: int, pages_per_seq: int) -> BlockSizes:
        pages = max(1, 128 // page_size)
        while pages > 1 and pages // 2 * page_size >= MIN_DOT and pages // 2 >= pages_per_seq:
            pages //= 2  # short page tables: do not load (masked) pages no sequence has
        return cls(pages_per_block=pages)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_num_splits(batch: int, kv_heads: int, num_blocks: int, target: int = TARGET_PROGRAMS) -> int:
    """Enough splits to give about `target` programs, each with a few blocks of pages."""
    return max(1, min(num_blocks // MIN_BLOCKS_PER_SPLIT, pl.cdiv(target, batch * kv_heads)))


def check_kernel(q, k_pages: tuple, v_pages: tuple, page_table, lengths, *, fmt: str,
                 block_sizes: BlockSizes | None = None,
                 num_splits: int | None = None) -> BlockSizes:
    """Raise ValueError unless the kernel handles these inputs; return the block sizes."""
    check_inputs(q, k_pages, v_pages, page_table, lengths, fmt)
    _, _, page_size, _ = k_pages[0].shape
    head_dim = q.shape[2]
    width = head_dim // 2 if fmt == "int4" else head_dim  # columns per dot
    blocks = block_sizes or BlockSizes.for_shape(page_size, page_table.shape[1])
    if not _is_pow2(page_size):
        raise ValueError(f"page_size={page_size} must be a power of two (Triton tiles)")
    if not _is_pow2(width) or width < MIN_DOT:
        raise ValueError(f"{fmt} pages need head_dim a power of two >= "
                         f"{MIN_DOT * (2 if fmt == 'int4' else 1)} for Triton dots, got {head_dim}")
    if not _is_pow2(blocks.pages_per_block):
        raise ValueError(f"pages_per_block={blocks.pages_per_block} must be a power of two")
    if blocks.pages_per_block * page_size < MIN_DOT:
        raise ValueError(f"pages_per_block={blocks.pages_per_block} x {page_size=} must be at "
                         f"least {MIN_DOT} keys (Triton dot tiles); raise pages_per_block")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{num_splits=} must be at least 1")
    return blocks


def _code_block(refs, page_ids, *, fmt: str, dtype):
    """Pages ``page_ids`` of keys (or values): (column parts ``[block_k, width]`` of codes in
    ``dtype``, per-token scale ``[block_k]`` or None, per-token zero ``[block_k]`` or None).

    Codes convert to bf16/f16 exactly (|code| <= 128); the scales and zeros are applied to
    the logits and probabilities instead of the tile, ``block_k`` products instead of
    ``block_k * head_dim``.
    """
    data = refs[0][page_ids]  # [pages, page_size, width]
    pages, page_size, width = data.shape
    data = data.reshape(pages * page_size, width)
    if fmt == "float":
        return (data.astype(dtype),), None, None

    def per_token(ref):  # [block_k]
        return ref[page_ids].reshape(pages * page_size).astype(jnp.float32)

    if fmt == "int8":
        return (data.astype(dtype),), per_token(refs[1]), None
    codes = data.astype(jnp.int32)
    parts = tuple(((codes >> shift) & 0xF).astype(dtype) for shift in (0, 4))  # even dims, odd dims
    return parts, per_token(refs[1]), per_token(refs[2])


def _decode_kernel(lengths_ref, table_ref, q_ref, *refs, fmt: str, pages_per_block: int,
                   sm_scale: float, dtype, precision):
    side = {"float": 0, "int8": 1, "int4": 2}[fmt]
    k_refs, v_refs = refs[:side + 1], refs[side + 1:2 * side + 2]
    o_ref, lse_ref = refs[2 * side + 2:]
    page_size = k_refs[0].shape[1]
    pages_per_split = table_ref.shape[0]
    block_k = pages_per_block * page_size
    block_h, head_dim = q_ref.shape
    parts = 2 if fmt == "int4" else 1
    width = head_dim // parts

    length = lengths_ref[0]
    first_page = pl.program_id(2) * pages_per_split
    pages_here = jnp.clip(lax.div(length + page_size - 1, page_size) - first_page, 0,
                          pages_per_split)
    q_parts = [q_ref[:, pl.ds(p * width, width)].astype(dtype) for p in range(parts)]
    # q . (code * scale + zero) = scale * (q . code) + zero * sum(q), per key
    q_sum = sum(jnp.sum(qp.astype(jnp.float32), axis=1) for qp in q_parts)  # [bh]

    def dot(a, b, contract_b: int):
        dims = (((1,), (contract_b,)), ((), ()))
        return lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.float32)

    def body(i, carry):
        accs, m_prev, l_prev = carry
        slot = i * pages_per_block + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
        page_ids = table_ref[pl.ds(i * pages_per_block, pages_per_block)]
        page_ids = jnp.where(slot < pages_here, page_ids, 0)  # slots past the length: page 0
        keys, k_scale, k_zero = _code_block(k_refs, page_ids, fmt=fmt, dtype=dtype)
        logits = sum(dot(qp, kp, 1) for qp, kp in zip(q_parts, keys))  # [bh, bk]
        if k_scale is not None:
            logits = logits * k_scale[None, :]
        if k_zero is not None:
            logits = logits + q_sum[:, None] * k_zero[None, :]
        logits = logits * sm_scale
        token = ((first_page + i * pages_per_block) * page_size
                 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1))
        # The block's first key is always valid, so m_next is finite.
        logits = jnp.where(token < length, logits, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(logits - m_next[:, None])
        l_next = l_prev * correction + jnp.sum(p, axis=1)
        # p . (code * scale + zero) = (p * scale) . code + (p . zero), per query row
        values, v_scale, v_zero = _code_block(v_refs, page_ids, fmt=fmt, dtype=dtype)
        weights = p if v_scale is None else p * v_scale[None, :]
        shift = 0.0 if v_zero is None else jnp.sum(p * v_zero[None, :], axis=1)[:, None]
        accs = tuple(acc * correction[:, None] + dot(weights.astype(dtype), vp, 0) + shift
                     for acc, vp in zip(accs, values))
        return accs, m_next, l_next

    init = (tuple(jnp.zeros((block_h, width), jnp.float32) for _ in range(parts)),
            jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32))
    num_steps = lax.div(pages_here + pages_per_block - 1, pages_per_block)
    accs, m, l = lax.fori_loop(0, num_steps, body, init)
    has_keys = l > 0  # a split past the sequence's end has none
    safe_l = jnp.where(has_keys, l, 1.0)
    for p, acc in enumerate(accs):
        o_ref[:, pl.ds(p * width, width)] = acc / safe_l[:, None]
    lse_ref[...] = jnp.where(has_keys, m + jnp.log(safe_l), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("fmt", "sm_scale", "block_sizes", "num_splits",
                                             "interpret"))
def paged_decode_attention_kernel(q: jax.Array, k_pages: tuple, v_pages: tuple,
                                  page_table: jax.Array, lengths: jax.Array, *, fmt: str,
                                  sm_scale: float | None = None,
                                  block_sizes: BlockSizes | None = None,
                                  num_splits: int | None = None,
                                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The kernel behind ``api.paged_decode_attention``: (out, lse) in float32.

    ``k_pages``/``v_pages`` are ``(data, *side arrays)`` in format ``fmt`` (see ``formats``).
    Table entries past a sequence's pages are never read; the others must be < num_pages.
    """
    blocks = check_kernel(q, k_pages, v_pages, page_table, lengths, fmt=fmt,
                          block_sizes=block_sizes, num_splits=num_splits)
    batch, n_heads, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages[0].shape
    groups = n_heads // kv_heads
    block_h = max(MIN_DOT, _pow2_at_least(groups))
    pages_per_block = blocks.pages_per_block
    num_blocks = pl.cdiv(page_table.shape[1], pages_per_block)
    splits = num_splits or default_num_splits(batch, kv_heads, num_blocks)
    pages_per_split = pl.cdiv(num_blocks, splits) * pages_per_block
    sm_scale = 1 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    dtype = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT

    # Slots past the table are never read (the loop stops at the length), only addressed.
    table = jnp.pad(page_table.astype(jnp.int32),
                    ((0, 0), (0, splits * pages_per_split - page_table.shape[1])))
    table = table.reshape(batch, splits, pages_per_split)
    qg = q.reshape(batch, kv_heads, groups, head_dim)
    if fmt == "int4":  # [even dims | odd dims], to meet the low and high nibbles
        qg = qg.reshape(batch, kv_heads, groups, head_dim // 2, 2).swapaxes(-1, -2)
        qg = qg.reshape(batch, kv_heads, groups, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, block_h - groups), (0, 0)))

    def pool_spec(array):  # the KV head's whole pool; pages are gathered in the kernel
        return pl.BlockSpec((None, *array.shape[1:]),
                            lambda b, h, s: (h,) + (0,) * (array.ndim - 1))

    pages = (*k_pages, *v_pages)
    kernel = functools.partial(_decode_kernel, fmt=fmt, pages_per_block=pages_per_block,
                               sm_scale=sm_scale, dtype=dtype, precision=precision)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, pages_per_split), lambda b, h, s: (b, s, 0)),
            pl.BlockSpec((None, None, block_h, head_dim), lambda b, h, s: (b, h, 0, 0)),
            *(pool_spec(array) for array in pages),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, batch, kv_heads, block_h, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, block_h), jnp.float32),
        ],
        compiler_params=triton_compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=default_interpret() if interpret is None else interpret,
        name=f"paged_decode_attention_{fmt}",
    )(lengths.astype(jnp.int32), table, qg, *pages)

    out, lse = merge_partials(out[:, :, :, :groups], lse[:, :, :, :groups])
    if fmt == "int4":  # back from [even | odd] to interleaved dims
        out = out.reshape(batch, kv_heads, groups, 2, head_dim // 2).swapaxes(-1, -2)
    return out.reshape(batch, n_heads, head_dim), lse.reshape(batch, n_heads)
