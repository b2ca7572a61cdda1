"""Pallas kernel for bipolar-INT bit-plane weights (1..8 bits), float or int8 activations.

"Efficient Arbitrary Precision Acceleration for LLMs on GPU Tensor Cores" stores n-bit
weights as n bit planes and multiplies plane by plane on the 1-bit tensor cores (XOR +
popcount), recombining the n*m partial products with powers of two. Triton exposes no
1-bit MMA, so this kernel keeps the paper's storage (n/8 bytes per weight, read once) and
its bipolar algebra but recombines the planes *before* the dot: a K tile of the planes
becomes the offset code ``u = sum_i b_i 2^i`` in registers, and

- float activations: ``v = 2u - (2^n - 1)`` is an exact integer in bf16 (|v| <= 255), one
  bf16/f32 dot per tile;
- int8 activations: ``w = u - 2^(n-1)`` fits int8 for every n <= 8 and ``v = 2w + 1``, so
  ``a @ v = 2 (a @ w) + rowsum(a) 1^T``: one int8 dot plus an exact rank-1 correction,
  all in int32.

The bit-serial form itself lives in ``reference.py`` (``bitserial_*``) as the check.
Scales are per group (G = K is per channel): each group's partial product is scaled once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.lowbit_matmul.common import (
    BlockSizes, KTiles, Rows, check_activations, check_blocks, column_spec, default_interpret, resolve_blocks,
    row_spec, row_vector_spec, tiled_call)
from pallas_kernels.lowbit_matmul.formats import BitplaneWeight, group_size_of, weight_shape


def _offset_code_tile(planes_ref, k, *, bits: int, block_k: int) -> jax.Array:
    """Planes [bits, K/8, bn] -> offset codes int32 [bk, bn] of K tile k."""
    rows = block_k // 8
    k_rows = pl.ds(pl.multiple_of(k * rows, rows), rows)
    shifts = lax.broadcasted_iota(jnp.int32, (1, 8, 1), 1)
    code = None
    for i in range(bits):  # static: one byte tile per plane
        plane = planes_ref[i, k_rows, :].astype(jnp.int32)  # [bk/8, bn]
        bit = (plane[:, None, :] >> shifts) & 1  # [bk/8, 8, bn], k = 8r + j
        code = bit if code is None else code | (bit << i)
    return code.reshape(block_k, code.shape[-1])


def _grouped_loop(num_groups: int, tiles_per_group: int, *, tile, init, finish, acc_shape,
                  scale_ref):
    """sum_g finish(product of group g) * scale[g]; a group's product runs over its K tiles."""

    def group_body(g, acc):
        part = lax.fori_loop(0, tiles_per_group,
                             lambda t, carry: tile(g * tiles_per_group + t, carry), init())
        return acc + finish(part).astype(jnp.float32) * scale_ref[pl.ds(g, 1), :]

    return lax.fori_loop(0, num_groups, group_body, jnp.zeros(acc_shape, jnp.float32))


def _bitplane_float_kernel(x_ref, planes_ref, scale_ref, o_ref, *, bits: int, block_k: int,
                           group_size: int, rows: Rows, ktiles: KTiles):
    rows = rows.here()
    K = x_ref.shape[1]

    def tile(k, part):
        x = rows.load(x_ref.at[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)])  # [bm, bk]
        u = _offset_code_tile(planes_ref, k, bits=bits, block_k=block_k)
        v = (2 * u - (2**bits - 1)).astype(x.dtype)  # bipolar-INT, exact in bf16
        return part + jnp.dot(x, v, preferred_element_type=jnp.float32)

    acc = _grouped_loop(K // group_size, group_size // block_k, tile=tile,
                        init=lambda: jnp.zeros(o_ref.shape, jnp.float32), finish=lambda part: part,
                        acc_shape=o_ref.shape, scale_ref=scale_ref)
    rows.store(o_ref, acc)


def _bitplane_int8_kernel(x_ref, x_scale_ref, planes_ref, scale_ref, o_ref, *, bits: int,
                          block_k: int, group_size: int, rows: Rows, ktiles: KTiles):
    rows = rows.here()
    K = x_ref.shape[1]
    block_m = o_ref.shape[0]

    def tile(k, carry):
        part, rowsum = carry
        a = rows.load(x_ref.at[:, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)])  # int8
        u = _offset_code_tile(planes_ref, k, bits=bits, block_k=block_k)
        w = (u - 2 ** (bits - 1)).astype(jnp.int8)  # v = 2w + 1
        part = part + jnp.dot(a, w, preferred_element_type=jnp.int32)
        return part, rowsum + jnp.sum(a.astype(jnp.int32), axis=1)

    def init():
        return jnp.zeros(o_ref.shape, jnp.int32), jnp.zeros((block_m,), jnp.int32)

    def finish(carry):  # a @ v = 2 (a @ w) + rowsum(a) 1^T, exact in int32
        part, rowsum = carry
        return 2 * part + rowsum[:, None]

    acc = _grouped_loop(K // group_size, group_size // block_k, tile=tile, init=init,
                        finish=finish, acc_shape=o_ref.shape, scale_ref=scale_ref)
    rows.store(o_ref, acc * rows.load(x_scale_ref)[:, None])


def _blocks(M: int, weight: BitplaneWeight, block_sizes: BlockSizes | None) -> tuple[BlockSizes, int]:
    K, N = weight_shape(weight)
    group_size = group_size_of(weight)
    blocks = resolve_blocks(block_sizes, M=M, N=N, K=K, group_size=group_size)
    if block_sizes is None and blocks.block_k > group_size:
        blocks = dataclasses.replace(blocks, block_k=group_size)
    check_blocks(blocks, N=N, K=K, group_size=group_size, k_multiple=8)
    if blocks.split_k != 1:
        raise ValueError(f"bit-plane kernels do not split K (split_k={blocks.split_k}); use split_k=1")
    if group_size % blocks.block_k:
        raise ValueError(f"block_k={blocks.block_k} must divide group_size={group_size}")
    return blocks, group_size


def check_bitplane(x, weight: BitplaneWeight, block_sizes: BlockSizes | None = None,
                   x_scale=None) -> None:
    K = weight_shape(weight)[0]
    if x_scale is None:
        check_activations(x, K, (jnp.bfloat16, jnp.float32, jnp.float16), "x")
    else:
        check_activations(x, K, (jnp.int8,), "x_q")
        if x_scale.shape != (x.shape[0],):
            raise ValueError(f"x_scale must have shape ({x.shape[0]},), got {x_scale.shape}")
    _blocks(x.shape[0], weight, block_sizes)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def bitplane_matmul(x: jax.Array, weight: BitplaneWeight, x_scale: jax.Array | None = None, *,
                    out_dtype=None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ bipolar-INT bit-plane weight -> [M, N].

    Float x (bf16/f32): the result is in x.dtype. int8 x: pass its per-token ``x_scale``
    [M]; the result is in ``out_dtype`` (bf16 by default).
    """
    check_bitplane(x, weight, block_sizes, x_scale)
    M, (K, N) = x.shape[0], weight_shape(weight)
    blocks, group_size = _blocks(M, weight, block_sizes)
    bm, bn = blocks.block_m, blocks.block_n
    static = dict(bits=weight.bits, block_k=blocks.block_k, group_size=group_size)
    weight_specs = [column_spec(weight.planes.shape, bn), column_spec(weight.scale.shape, bn)]
    if x_scale is None:
        kernel, out_dtype = functools.partial(_bitplane_float_kernel, **static), x.dtype
        operands, specs = [x, *weight], [row_spec(bm, K), *weight_specs]
    else:
        kernel, out_dtype = functools.partial(_bitplane_int8_kernel, **static), out_dtype or jnp.bfloat16
        operands = [x, x_scale.astype(jnp.float32), *weight]
        specs = [row_spec(bm, K), row_vector_spec(bm), *weight_specs]
    return tiled_call(kernel, operands, specs, M=M, N=N, K=K, blocks=blocks, out_dtype=out_dtype,
                      interpret=default_interpret() if interpret is None else interpret,
                      name=f"bitplane{weight.bits}_matmul")
