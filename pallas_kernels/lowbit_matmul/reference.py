"""Pure-jnp definitions of every low-bit matmul: what the Pallas kernels must compute.

Conventions shared with the kernels (``bitplane.py``, ``int4.py``, ``w8a8.py``):

- float-activation formats (``w4a16``, ``int1..int8``) take ``x`` in bf16/f32 and return
  ``x.dtype``; the product is formed in float32 from the dequantized weight.
- int8-activation formats (``w8a8``, ``w4a8``, bit planes with int8 activations) take
  per-token int8 ``x_q`` and its float32 ``x_scale [M]``. The integer product is exact in
  int32 and the scales are applied once, in the order
  ``(acc * weight_scale[None, :]) * x_scale[:, None]``, so the kernels match bit for bit.

The bit-serial functions follow "Efficient Arbitrary Precision Acceleration for LLMs on
GPU Tensor Cores": an n-bit by m-bit bipolar-INT product is n*m products of 1-bit planes,
each ``K - 2 * popcount(a_j XOR w_i)`` over 32-bit words, recombined with 2^(i+j). They are
slow by design and serve as an independent check of the packed layout and of the
integer identities the kernels use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.lowbit_matmul.formats import (
    BitplaneWeight, W4A8Weight, W4A16Weight, W8A8Weight, expand_groups, bit_planes,
    bitplane_values, dequantize, unpack_bitplanes, w4a8_int8_weight,
    weight_shape)

_HIGHEST = lax.Precision.HIGHEST


def _float_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    out = jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST)
    return out.astype(x.dtype)


def _int_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.dot(a.astype(jnp.int32), w.astype(jnp.int32), preferred_element_type=jnp.int32)


def _epilogue(acc: jax.Array, weight_scale: jax.Array, x_scale: jax.Array, out_dtype) -> jax.Array:
    return ((acc.astype(jnp.float32) * weight_scale[None, :]) * x_scale[:, None]).astype(out_dtype)


# --- formats ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def w8a8_matmul(x_q, x_scale, weight: W8A8Weight, *, out_dtype=jnp.bfloat16) -> jax.Array:
    return _epilogue(_int_matmul(x_q, weight.qweight), weight.scale, x_scale, out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def w4a8_matmul(x_q, x_scale, weight: W4A8Weight, *, out_dtype=jnp.bfloat16) -> jax.Array:
    acc = _int_matmul(x_q, w4a8_int8_weight(weight))  # the main loop is an int8 GEMM
    return _epilogue(acc, weight.channel_scale, x_scale, out_dtype)


@jax.jit
def w4a16_matmul(x, weight: W4A16Weight) -> jax.Array:
    return _float_matmul(x, dequantize(weight))


@jax.jit
def bitplane_matmul(x, weight: BitplaneWeight) -> jax.Array:
    return _float_matmul(x, dequantize(weight))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def bitplane_int8_matmul(x_q, x_scale, weight: BitplaneWeight, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """int8 activations x bipolar-INT weights; per-group int32 sums scaled, then summed."""
    K, N = weight_shape(weight)
    groups = weight.scale.shape[0]
    v = bitplane_values(weight).reshape(groups, K // groups, N)
    a = x_q.reshape(x_q.shape[0], groups, K // groups)
    acc = jnp.einsum("mgk,gkn->gmn", a.astype(jnp.int32), v, preferred_element_type=jnp.int32)
    scaled = acc.astype(jnp.float32) * weight.scale[:, None, :]  # [groups, M, N]
    total = scaled[0]
    for g in range(1, groups):  # sequential, in the kernel's order
        total = total + scaled[g]
    return (total * x_scale[:, None]).astype(out_dtype)


# --- bit-serial references -----------------------------------------------------------------


def _pack_words(bits: jax.Array) -> jax.Array:
    """0/1 [..., K] -> uint32 [..., ceil(K/32)]; zero padding adds no XOR mismatches."""
    K = bits.shape[-1]
    pad = -K % 32
    bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)]).astype(jnp.uint32)
    bits = bits.reshape(bits.shape[:-1] + ((K + pad) // 32, 32))
    return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


@jax.jit
def bitserial_bipolar_matmul(a_planes: jax.Array, w_planes: jax.Array) -> jax.Array:
    """m-bit x n-bit bipolar-INT matmul from its n*m plane products (exact, int32).

    a_planes: 0/1 [m, M, K], bit j of the activations' offset code (bit 1 means +1).
    w_planes: 0/1 [n, K, N], likewise for the weights.
    Returns sum_{i,j} 2^(i+j) (A_j @ W_i) with A_j, W_i the +-1 planes, each 1-bit
    product being K - 2 * popcount(A_j XOR W_i) over 32-bit words.
    """
    K = a_planes.shape[-1]
    a_words = _pack_words(a_planes)  # [m, M, W]
    w_words = _pack_words(jnp.swapaxes(w_planes, 1, 2))  # [n, N, W]
    xor = a_words[:, None, :, None, :] ^ w_words[None, :, None, :, :]  # [m, n, M, N, W]
    plane_products = K - 2 * jnp.sum(lax.population_count(xor).astype(jnp.int32), axis=-1)
    j = jnp.arange(a_planes.shape[0], dtype=jnp.int32)[:, None, None, None]
    i = jnp.arange(w_planes.shape[0], dtype=jnp.int32)[None, :, None, None]
    return jnp.sum(plane_products << (i + j), axis=(0, 1))  # [M, N]


@jax.jit
def bitserial_int8_matmul(x_q: jax.Array, weight: BitplaneWeight) -> jax.Array:
    """int8 [M, K] @ bipolar-INT weights, exactly, from 8 * n one-bit products.

    The int8 activations become 8-bit bipolar-INT through v_a = 2a + 1, so
    a @ v_w = (v_a @ v_w - 1 @ v_w) / 2, and 1 @ v_w is again a bit-serial product
    (against the all-ones plane).
    """
    K, N = weight_shape(weight)
    a_planes = bit_planes(x_q.astype(jnp.int32) + 128, 8)  # offset code of 2a + 1
    w_planes = unpack_bitplanes(weight.planes)
    product = bitserial_bipolar_matmul(a_planes, w_planes)
    column_sums = bitserial_bipolar_matmul(jnp.ones((1, 1, K), jnp.int32), w_planes)  # [1, N]
    return (product - column_sums) // 2


@jax.jit
def bitserial_float_matmul(x: jax.Array, weight: BitplaneWeight) -> jax.Array:
    """Float activations x bipolar-INT weights as n products with +-1 planes, float32.

    x @ (v * scale) = sum_i 2^i (x @ (2 b_i - 1)) per group, then scaled.
    """
    K, N = weight_shape(weight)
    signs = 2 * unpack_bitplanes(weight.planes) - 1  # [n, K, N], +-1
    scale = expand_groups(weight.scale, K)
    x32 = x.astype(jnp.float32)
    out = jnp.zeros((x.shape[0], N), jnp.float32)
    for i in range(weight.bits):
        out = out + (2.0**i) * jnp.dot(x32, signs[i] * scale, precision=_HIGHEST)
    return out


@jax.jit
def integer_matmul(x_q: jax.Array, weight: BitplaneWeight) -> jax.Array:
    """The direct int32 product x_q @ v that the bit-serial reference must equal."""
    return _int_matmul(x_q, bitplane_values(weight))


__all__ = [
    "w8a8_matmul", "w4a8_matmul", "w4a16_matmul", "bitplane_matmul", "bitplane_int8_matmul",
    "bitserial_bipolar_matmul", "bitserial_int8_matmul", "bitserial_float_matmul",
    "integer_matmul",
]
