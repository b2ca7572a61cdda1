"""Pallas kernels for the two int4 weight formats: W4A16 (group-wise asymmetric uint4,
float activations) and W4A8 (QServe's QoQ progressive format, int8 activations).

Both read the packed uint4 bytes once per (M tile, N tile), unpack a [block_k, block_n]
tile in registers and feed one tensor-core dot per K tile.

- W4A16 dequantizes the tile to the activation dtype, ``(q - zero) * scale`` per group,
  and accumulates in float32, as AWQ/Marlin-style kernels do.
- W4A8 follows QServe: the tile becomes int8 by "subtraction after multiplication",
  ``q * s2 - z * s2`` with the integer group scale ``s2`` and the pre-multiplied zero
  (exact, inside int8 thanks to the [-119, 119] protective range), the dot is
  int8 x int8 -> int32, and the float scales (per channel, per token) are applied once,
  in the epilogue. QServe does the int4 -> int8 step with register-level tricks
  (vadd4 on packed bytes); here Triton gets plain int32 arithmetic on the tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.lowbit_matmul.common import (
    BlockSizes, KTiles, Rows, check_activations, check_blocks, column_spec, default_interpret, group_rows,
    resolve_blocks, row_spec, row_vector_spec, tiled_call, unpack_int4_tile)
from pallas_kernels.lowbit_matmul.formats import W4A8Weight, W4A16Weight, group_size_of, weight_shape


def _k_slice(k, block_k: int):
    return pl.ds(pl.multiple_of(k * block_k, block_k), block_k)


def _packed_tile(packed_ref, k, block_k: int) -> jax.Array:
    rows = block_k // 2
    return unpack_int4_tile(packed_ref[pl.ds(pl.multiple_of(k * rows, rows), rows), :])


def _w4a16_kernel(x_ref, packed_ref, scale_ref, zero_ref, o_ref, *, block_k: int, group_size: int,
                  rows: Rows, ktiles: KTiles):
    rows, ktiles = rows.here(), ktiles.here()
    groups = functools.partial(group_rows, block_k=block_k, group_size=group_size)

    def body(k, acc):
        x = rows.load(x_ref.at[:, _k_slice(k, block_k)])  # [bm, bk]
        q = _packed_tile(packed_ref, k, block_k).astype(jnp.float32)  # [bk, bn]
        w = ((q - groups(zero_ref, k)) * groups(scale_ref, k)).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    rows.store(o_ref, lax.fori_loop(ktiles.start, ktiles.stop, body, jnp.zeros(o_ref.shape, jnp.float32)))


def _w4a8_kernel(x_ref, x_scale_ref, packed_ref, group_scale_ref, group_zero_ref,
                 channel_scale_ref, o_ref, *, block_k: int, group_size: int, rows: Rows,
                 ktiles: KTiles):
    rows, ktiles = rows.here(), ktiles.here()
    groups = functools.partial(group_rows, block_k=block_k, group_size=group_size)

    def body(k, acc):
        a = rows.load(x_ref.at[:, _k_slice(k, block_k)])  # int8 [bm, bk]
        q = _packed_tile(packed_ref, k, block_k)  # int32 [bk, bn], 0..15
        scale = groups(group_scale_ref, k).astype(jnp.int32)
        zero = groups(group_zero_ref, k).astype(jnp.int32)
        w = (q * scale - zero).astype(jnp.int8)  # subtraction after multiplication
        return acc + jnp.dot(a, w, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(ktiles.start, ktiles.stop, body, jnp.zeros(o_ref.shape, jnp.int32))
    rows.store(o_ref, (acc.astype(jnp.float32) * channel_scale_ref[...][None, :])
               * rows.load(x_scale_ref)[:, None])


def _blocks(M, weight, block_sizes) -> tuple[BlockSizes, int]:
    K, N = weight_shape(weight)
    group_size = group_size_of(weight)
    blocks = resolve_blocks(block_sizes, M=M, N=N, K=K, group_size=group_size)
    check_blocks(blocks, N=N, K=K, group_size=group_size, k_multiple=2)
    return blocks, group_size


def check_w4a16(x, weight: W4A16Weight, block_sizes: BlockSizes | None = None) -> None:
    check_activations(x, weight_shape(weight)[0], (jnp.bfloat16, jnp.float32, jnp.float16), "x")
    _blocks(x.shape[0], weight, block_sizes)


def check_w4a8(x_q, x_scale, weight: W4A8Weight, block_sizes: BlockSizes | None = None) -> None:
    check_activations(x_q, weight_shape(weight)[0], (jnp.int8,), "x_q")
    if x_scale.shape != (x_q.shape[0],):
        raise ValueError(f"x_scale must have shape ({x_q.shape[0]},), got {x_scale.shape}")
    _blocks(x_q.shape[0], weight, block_sizes)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def w4a16_matmul(x: jax.Array, weight: W4A16Weight, *, block_sizes: BlockSizes | None = None,
                 interpret: bool | None = None) -> jax.Array:
    """x [M, K] (bf16/f32) @ W4A16 weight -> [M, N] in x.dtype."""
    check_w4a16(x, weight, block_sizes)
    M, (K, N) = x.shape[0], weight_shape(weight)
    blocks, group_size = _blocks(M, weight, block_sizes)
    bn = blocks.block_n
    kernel = functools.partial(_w4a16_kernel, block_k=blocks.block_k, group_size=group_size)
    specs = [row_spec(blocks.block_m, K), column_spec(weight.packed.shape, bn),
             column_spec(weight.scale.shape, bn), column_spec(weight.zero.shape, bn)]
    return tiled_call(kernel, [x, *weight], specs, M=M, N=N, K=K, blocks=blocks, out_dtype=x.dtype,
                      interpret=default_interpret() if interpret is None else interpret,
                      name="w4a16_matmul")


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def w4a8_matmul(x_q: jax.Array, x_scale: jax.Array, weight: W4A8Weight, *,
                out_dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
                interpret: bool | None = None) -> jax.Array:
    """Per-token int8 x_q [M, K] (scales x_scale [M]) @ QoQ W4A8 weight -> [M, N] out_dtype."""
    check_w4a8(x_q, x_scale, weight, block_sizes)
    M, (K, N) = x_q.shape[0], weight_shape(weight)
    blocks, group_size = _blocks(M, weight, block_sizes)
    bm, bn = blocks.block_m, blocks.block_n
    kernel = functools.partial(_w4a8_kernel, block_k=blocks.block_k, group_size=group_size)
    specs = [row_spec(bm, K), row_vector_spec(bm), column_spec(weight.packed.shape, bn),
             column_spec(weight.group_scale.shape, bn), column_spec(weight.group_zero.shape, bn),
             column_spec(weight.channel_scale.shape, bn)]
    operands = [x_q, x_scale.astype(jnp.float32), *weight]
    return tiled_call(kernel, operands, specs, M=M, N=N, K=K, blocks=blocks, out_dtype=out_dtype,
                      interpret=default_interpret() if interpret is None else interpret,
                      name="w4a8_matmul")
