"""Pallas kernel for W8A8: per-channel int8 weights x per-token int8 activations.

The SmoothQuant serving GEMM: int8 x int8 -> int32 tiles on the tensor cores, both scales
applied once in the epilogue. It is the baseline the packed formats are measured against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.lowbit_matmul.common import (
    BlockSizes, KTiles, Rows, check_activations, check_blocks, column_spec, default_interpret, resolve_blocks,
    row_spec, row_vector_spec, tiled_call)
from pallas_kernels.lowbit_matmul.formats import W8A8Weight


def _w8a8_kernel(x_ref, x_scale_ref, w_ref, w_scale_ref, o_ref, *, block_k: int, rows: Rows,
                 ktiles: KTiles):
    rows, ktiles = rows.here(), ktiles.here()
    def body(k, acc):
        k_slice = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        a = rows.load(x_ref.at[:, k_slice])  # int8 [bm, bk]
        w = w_ref[k_slice, :]  # int8 [bk, bn]
        return acc + jnp.dot(a, w, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(ktiles.start, ktiles.stop, body, jnp.zeros(o_ref.shape, jnp.int32))
    rows.store(o_ref, (acc.astype(jnp.float32) * w_scale_ref[...][None, :])
               * rows.load(x_scale_ref)[:, None])


def check_w8a8(x_q, x_scale, weight: W8A8Weight, block_sizes: BlockSizes | None = None) -> BlockSizes:
    K, N = weight.qweight.shape
    check_activations(x_q, K, (jnp.int8,), "x_q")
    if x_scale.shape != (x_q.shape[0],):
        raise ValueError(f"x_scale must have shape ({x_q.shape[0]},), got {x_scale.shape}")
    blocks = resolve_blocks(block_sizes, M=x_q.shape[0], N=N, K=K)
    check_blocks(blocks, N=N, K=K)
    return blocks


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def w8a8_matmul(x_q: jax.Array, x_scale: jax.Array, weight: W8A8Weight, *,
                out_dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
                interpret: bool | None = None) -> jax.Array:
    """Per-token int8 x_q [M, K] (scales x_scale [M]) @ W8A8 weight -> [M, N] out_dtype."""
    blocks = check_w8a8(x_q, x_scale, weight, block_sizes)
    M, (K, N) = x_q.shape[0], weight.qweight.shape
    bm, bn = blocks.block_m, blocks.block_n
    specs = [row_spec(bm, K), row_vector_spec(bm), column_spec(weight.qweight.shape, bn),
             column_spec(weight.scale.shape, bn)]
    return tiled_call(functools.partial(_w8a8_kernel, block_k=blocks.block_k),
                      [x_q, x_scale.astype(jnp.float32), *weight], specs, M=M, N=N, K=K,
                      blocks=blocks, out_dtype=out_dtype,
                      interpret=default_interpret() if interpret is None else interpret,
                      name="w8a8_matmul")
