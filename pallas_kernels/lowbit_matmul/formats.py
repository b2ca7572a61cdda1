"""Low-bit weight formats: quantizers, packed layouts and the weight pytrees.

Every format quantizes a float weight matrix ``w`` of shape ``[K, N]`` (``y = x @ w``,
K the contraction axis) and packs it **along K**, so a K tile of a kernel reads whole
bytes and unpacks them in registers.

Formats and their packed layouts
--------------------------------

``w8a8`` (SmoothQuant-style W8A8) -- :class:`W8A8Weight`
    ``qweight`` int8 ``[K, N]``, symmetric per output channel: ``w ~ qweight * scale[N]``.
    Activations are quantized per token to int8 (:func:`quantize_activations_per_token`).

``w4a16`` (AWQ/GPTQ-style group-wise asymmetric uint4) -- :class:`W4A16Weight`
    ``packed`` uint8 ``[K/2, N]``: int4 codes two per byte along K, **low nibble first**
    (byte ``r`` holds ``k = 2r`` in bits 0..3 and ``k = 2r + 1`` in bits 4..7).
    ``scale``, ``zero`` float32 ``[K/G, N]`` (G = group size, 128 by default):
    ``w ~ (q - zero) * scale``; ``zero`` is integer-valued, in the uint4 domain.

``w4a8`` (QServe's QoQ progressive group quantization) -- :class:`W4A8Weight`
    Level 1: per-channel symmetric int8 inside the protective range [-119, 119]
    (``channel_scale`` float32 ``[N]``). Level 2: per-group (G = 128) asymmetric uint4 of
    those int8 values with an *integer* scale ``s2`` (``group_scale`` int8, 1..16) and
    the zero already multiplied into the int8 domain (``group_zero = z * s2``, int8,
    0..127). The int8 weight is ``q * s2 - group_zero`` ("subtraction after
    multiplication"), always in [-127, 127] thanks to the protective range, so the main
    loop is a pure int8 GEMM. ``packed`` is laid out as for ``w4a16``.

``int1`` .. ``int8`` (bipolar-INT bit planes, "Efficient Arbitrary Precision
Acceleration for LLMs on GPU Tensor Cores") -- :class:`BitplaneWeight`
    An n-bit bipolar-INT value is ``v = sum_i (2 b_i - 1) 2^i``: odd integers in
    ``+-(2^n - 1)``, symmetric, no redundant sign bit. A signed int ``x`` maps to it
    losslessly as ``v = 2x + 1``; the bits ``b_i`` are those of the offset-binary code
    ``u = (v + 2^n - 1) / 2``. ``planes`` uint8 ``[n, K/8, N]``: plane ``i`` holds bit
    ``b_i``, 8 per byte along K, bit ``j`` of byte ``r`` is ``k = 8r + j``.
    ``scale`` float32 ``[K/G, N]`` with ``w ~ v * scale``; one group (G = K) is
    per-output-channel scaling.

The pytrees are NamedTuples of arrays only (every static fact -- bits, group size --
follows from the shapes), so they pass through ``jax.jit``, ``jax.tree.map`` and orbax.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

QOQ_PROTECTIVE_RANGE = 119  # QServe: |int8| <= 119 keeps (q - z) * s2 inside int8


class W8A8Weight(NamedTuple):
    qweight: jax.Array  # int8 [K, N]
    scale: jax.Array  # float32 [N]


class W4A16Weight(NamedTuple):
    packed: jax.Array  # uint8 [K/2, N], int4 codes, low nibble first along K
    scale: jax.Array  # float32 [K/G, N]
    zero: jax.Array  # float32 [K/G, N], integer-valued zero point in 0..15


class W4A8Weight(NamedTuple):
    packed: jax.Array  # uint8 [K/2, N], uint4 codes, low nibble first along K
    group_scale: jax.Array  # int8 [K/G, N], integer scale s2 in 1..16
    group_zero: jax.Array  # int8 [K/G, N], z * s2 in 0..127 (zero in the int8 domain)
    channel_scale: jax.Array  # float32 [N], int8 -> float


class BitplaneWeight(NamedTuple):
    planes: jax.Array  # uint8 [bits, K/8, N], bit j of byte r is k = 8r + j
    scale: jax.Array  # float32 [K/G, N]

    @property
    def bits(self) -> int:
        return self.planes.shape[0]


def weight_shape(weight) -> tuple[int, int]:
    """(K, N) of the float matrix a packed weight stands for."""
    if isinstance(weight, W8A8Weight):
        return weight.qweight.shape
    if isinstance(weight, (W4A16Weight, W4A8Weight)):
        return 2 * weight.packed.shape[0], weight.packed.shape[1]
    if isinstance(weight, BitplaneWeight):
        return 8 * weight.planes.shape[1], weight.planes.shape[2]
    raise TypeError(f"not a packed low-bit weight: {type(weight).__name__}")


def group_size_of(weight) -> int:
    """Group size along K of a grouped format (K itself for per-channel scales)."""
    K, _ = weight_shape(weight)
    if isinstance(weight, W8A8Weight):
        return K
    groups = weight.scale if isinstance(weight, (W4A16Weight, BitplaneWeight)) else weight.group_scale
    if K % groups.shape[0]:
        raise ValueError(f"K={K} is not a multiple of the {groups.shape[0]} scale groups of "
                         f"this {type(weight).__name__}; requantize with a group size that divides K")
    return K // groups.shape[0]


def _check_groups(K: int, group_size: int | None, multiple_of: int) -> int:
    group_size = K if group_size is None else group_size
    if group_size <= 0 or K % group_size:
        raise ValueError(
            f"K={K} is not a multiple of group_size={group_size}; pick a group size that "
            f"divides the input dimension (or group_size=None for per-channel scales)")
    if group_size % multiple_of:
        raise ValueError(f"group_size={group_size} must be a multiple of {multiple_of}")
    return group_size


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
    K, N = w.shape
    return w.reshape(K // group_size, group_size, N)  # [groups, G, N]


def expand_groups(s: jax.Array, K: int) -> jax.Array:
    return jnp.repeat(s, K // s.shape[0], axis=0)  # [K/G, N] -> [K, N]


# --- int4 packing ------------------------------------------------------------------------


@jax.jit
def pack_int4(q: jax.Array) -> jax.Array:
    """[K, N] codes in 0..15 -> uint8 [K/2, N], two per byte along K, low nibble first."""
    K, N = q.shape
    if K % 2:
        raise ValueError(f"int4 packing needs an even K, got K={K}")
    pairs = q.astype(jnp.uint8).reshape(K // 2, 2, N)
    return pairs[:, 0] | (pairs[:, 1] << 4)


@jax.jit
def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [K/2, N] -> int32 [K, N] codes in 0..15."""
    p = packed.astype(jnp.int32)
    return jnp.stack([p & 0xF, p >> 4], axis=1).reshape(2 * p.shape[0], p.shape[1])


# --- bipolar-INT bit planes -------------------------------------------------------------


def signed_to_bipolar(x: jax.Array) -> jax.Array:
    """Signed int in [-2^(n-1), 2^(n-1)) -> n-bit bipolar-INT (odd, in +-(2^n - 1))."""
    return 2 * x.astype(jnp.int32) + 1


def bipolar_to_signed(v: jax.Array) -> jax.Array:
    return (v - 1) // 2


def bipolar_to_offset(v: jax.Array, bits: int) -> jax.Array:
    """Bipolar value -> offset-binary code u whose bits are the planes b_i."""
    return (v.astype(jnp.int32) + (2**bits - 1)) // 2


def offset_to_bipolar(u: jax.Array, bits: int) -> jax.Array:
    return 2 * u.astype(jnp.int32) - (2**bits - 1)


def bit_planes(u: jax.Array, bits: int) -> jax.Array:
    """Unpacked planes: int32 [bits, *u.shape] of 0/1, plane i = bit i of u."""
    shifts = jnp.arange(bits, dtype=jnp.int32).reshape((bits,) + (1,) * u.ndim)
    return (u.astype(jnp.int32)[None] >> shifts) & 1


@functools.partial(jax.jit, static_argnames=("bits",))
def pack_bitplanes(v: jax.Array, bits: int) -> jax.Array:
    """Bipolar values [K, N] -> uint8 planes [bits, K/8, N] (bit j of byte r is k = 8r + j)."""
    K, N = v.shape
    if K % 8:
        raise ValueError(f"bit-plane packing needs K to be a multiple of 8, got K={K}")
    planes = bit_planes(bipolar_to_offset(v, bits), bits).reshape(bits, K // 8, 8, N)
    weights = (1 << jnp.arange(8, dtype=jnp.int32))[None, None, :, None]
    return jnp.sum(planes * weights, axis=2).astype(jnp.uint8)


@jax.jit
def unpack_bitplanes(planes: jax.Array) -> jax.Array:
    """uint8 planes [bits, K/8, N] -> 0/1 int32 [bits, K, N]."""
    bits, K8, N = planes.shape
    shifts = jnp.arange(8, dtype=jnp.int32)[None, None, :, None]
    return ((planes.astype(jnp.int32)[:, :, None, :] >> shifts) & 1).reshape(bits, 8 * K8, N)


@jax.jit
def bitplane_values(weight: BitplaneWeight) -> jax.Array:
    """The bipolar integers int32 [K, N] a BitplaneWeight stores."""
    planes = unpack_bitplanes(weight.planes)
    powers = (1 << jnp.arange(weight.bits, dtype=jnp.int32))[:, None, None]
    return jnp.sum((2 * planes - 1) * powers, axis=0)


# --- quantizers ---------------------------------------------------------------------------


@jax.jit
def quantize_activations_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token (per-row) int8: x ~ q * scale[:, None]; scale float32 [M]."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def _symmetric_int8(w: jax.Array, qmax: int) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(w), axis=0)  # [N]
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return jnp.clip(jnp.round(w / scale), -qmax, qmax).astype(jnp.int8), scale


@jax.jit
def quantize_w8a8(w: jax.Array) -> W8A8Weight:
    qweight, scale = _symmetric_int8(w.astype(jnp.float32), 127)
    return W8A8Weight(qweight, scale)


@functools.partial(jax.jit, static_argnames=("group_size",))
def quantize_w4a16(w: jax.Array, *, group_size: int = 128) -> W4A16Weight:
    K, N = w.shape
    group_size = _check_groups(K, group_size, 2)
    g = _grouped(w.astype(jnp.float32), group_size)  # [groups, G, N]
    # The range always holds 0 (as GPTQ does), so a zero weight stays exactly zero.
    lo = jnp.minimum(g.min(axis=1), 0.0)
    hi = jnp.maximum(g.max(axis=1), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)  # [groups, N]
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(g / scale[:, None]) + zero[:, None], 0, 15).reshape(K, N)
    return W4A16Weight(pack_int4(q), scale, zero)


@functools.partial(jax.jit, static_argnames=("group_size",))
def quantize_w4a8(w: jax.Array, *, group_size: int = 128) -> W4A8Weight:
    """QoQ progressive quantization: per-channel int8 in [-119, 119], then per-group uint4."""
    K, N = w.shape
    group_size = _check_groups(K, group_size, 2)
    q8, channel_scale = _symmetric_int8(w.astype(jnp.float32), QOQ_PROTECTIVE_RANGE)
    g = _grouped(q8.astype(jnp.int32), group_size)  # [groups, G, N]
    lo = jnp.minimum(g.min(axis=1), 0)
    hi = jnp.maximum(g.max(axis=1), 0)
    s2 = jnp.maximum(-((lo - hi) // 15), 1)  # ceil(range / 15) in 1..16
    z = jnp.clip(jnp.round(-lo / s2), 0, 15).astype(jnp.int32)
    q = jnp.clip(jnp.round(g / s2[:, None]).astype(jnp.int32) + z[:, None], 0, 15).reshape(K, N)
    return W4A8Weight(pack_int4(q), s2.astype(jnp.int8), (z * s2).astype(jnp.int8), channel_scale)


def _nearest_bipolar(t: jax.Array, top: int) -> jax.Array:
    return jnp.clip(2 * jnp.floor(t / 2) + 1, -top, top)  # nearest odd integer, clipped


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "clip_ratios"))
def quantize_bitplane(w: jax.Array, *, bits: int, group_size: int | None = None,
                      clip_ratios: int = 16) -> BitplaneWeight:
    """Round to the nearest n-bit bipolar-INT value, per output channel or per group.

    bits = 1 scales by the mean magnitude (XNOR-Net's optimum for +-1). More bits search
    ``clip_ratios`` clipping ratios (1.0, 0.95, ...) of the largest magnitude per group
    and keep the one with the least squared error: with no level at zero, scaling the
    maximum onto 2^n - 1 wastes the few levels of 2-3 bits on the tails.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bipolar-INT weights take 1..8 bits, got bits={bits}")
    K, N = w.shape
    group_size = _check_groups(K, group_size, 8)
    g = _grouped(w.astype(jnp.float32), group_size)  # [groups, G, N]
    top = 2**bits - 1
    if bits == 1:
        magnitude = jnp.mean(jnp.abs(g), axis=1)
        scale = jnp.where(magnitude > 0, magnitude, 1.0)  # [groups, N]
    else:
        amax = jnp.max(jnp.abs(g), axis=1)  # [groups, N]

        def try_ratio(i, carry):
            scale, best = carry
            candidate = jnp.where(amax > 0, (1.0 - 0.05 * i) * amax / top, 1.0)
            error = jnp.sum((_nearest_bipolar(g / candidate[:, None], top) * candidate[:, None]
                             - g) ** 2, axis=1)
            better = error < best
            return jnp.where(better, candidate, scale), jnp.where(better, error, best)

        scale, _ = lax.fori_loop(0, max(1, clip_ratios), try_ratio,
                                 (jnp.ones_like(amax), jnp.full_like(amax, jnp.inf)))
    v = _nearest_bipolar(g / scale[:, None], top).astype(jnp.int32)
    return BitplaneWeight(pack_bitplanes(v.reshape(K, N), bits), scale)


# --- dequantizers (float32 [K, N]) -----------------------------------------------------


@jax.jit
def w4a8_int8_weight(weight: W4A8Weight) -> jax.Array:
    """The int8-domain weight int32 [K, N] of QoQ: q * s2 - z * s2."""
    K, _ = weight_shape(weight)
    q = unpack_int4(weight.packed)
    s2 = expand_groups(weight.group_scale.astype(jnp.int32), K)
    zs = expand_groups(weight.group_zero.astype(jnp.int32), K)
    return q * s2 - zs


@jax.jit
def dequantize(weight) -> jax.Array:
    """The float32 [K, N] matrix a packed weight stands for."""
    K, _ = weight_shape(weight)
    if isinstance(weight, W8A8Weight):
        return weight.qweight.astype(jnp.float32) * weight.scale
    if isinstance(weight, W4A16Weight):
        q = unpack_int4(weight.packed).astype(jnp.float32)
        return (q - expand_groups(weight.zero, K)) * expand_groups(weight.scale, K)
    if isinstance(weight, W4A8Weight):
        return w4a8_int8_weight(weight).astype(jnp.float32) * weight.channel_scale
    if isinstance(weight, BitplaneWeight):
        return bitplane_values(weight).astype(jnp.float32) * expand_groups(weight.scale, K)
    raise TypeError(f"not a packed low-bit weight: {type(weight).__name__}")
