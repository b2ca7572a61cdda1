"""KV page formats: quantizers, packed layouts, and the checks every implementation shares.

A layer's page pool is kept per KV head. Keys and values each have their own pool:
``data [kv_heads, num_pages, page_size, ...]`` plus, for quantized formats, per-token
side arrays ``[kv_heads, num_pages, page_size]`` (one number per token and KV head).
A token's position inside its sequence is ``slot * page_size + offset``, where
``page_table[b, slot]`` names the page.

Formats
-------

``float`` -- data bf16/f16/f32 ``[kv_heads, num_pages, page_size, head_dim]``, no side arrays.

``int8`` -- symmetric, per token and head (as in KVQuant/QServe's KV4/8 caches):
    data int8 ``[kv_heads, num_pages, page_size, head_dim]`` and ``scale`` (float32 by
    default, bf16 also works) with ``x ~ data * scale``, ``scale = max|x| / 127``.

``int4`` -- asymmetric, per token and head, the layout of KIVI's per-token value cache:
    data uint8 ``[kv_heads, num_pages, page_size, head_dim // 2]``, two codes per byte
    along head_dim, **low nibble first** (byte ``j`` holds dim ``2j`` in bits 0..3 and dim
    ``2j + 1`` in bits 4..7); ``scale`` and ``zero`` (bf16 by default) with
    ``x ~ code * scale + zero``: ``zero`` is the value that code 0 stands for (the
    token's minimum), not an integer zero point as in the ``lowbit_matmul`` formats. With
    2-byte scale and zero a token costs ``head_dim / 2 + 4`` bytes per head, 0.28x of bf16
    at head_dim 64 and 0.27x at 128; float32 side arrays would cost 0.31x at 64.

The quantizers take any leading shape ``[..., head_dim]`` (a whole pool, or the tokens
a decode step writes) and return side arrays of shape ``[...]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FORMATS = ("float", "int8", "int4")
SIDE_ARRAYS = {"float": (), "int8": ("scale",), "int4": ("scale", "zero")}

INT8_MAX = 127
INT4_MAX = 15


def format_of(data: jax.Array) -> str:
    """The page format that a data array's dtype stands for."""
    if data.dtype == jnp.int8:
        return "int8"
    if data.dtype == jnp.uint8:
        return "int4"
    if jnp.issubdtype(data.dtype, jnp.floating):
        return "float"
    raise ValueError(f"pages of dtype {data.dtype} are no KV page format; use a float dtype, "
                     "int8 (quantize_kv_int8) or packed uint8 (quantize_kv_int4)")


# --- int8 -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="scale_dtype")
def quantize_kv_int8(x: jax.Array, *, scale_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Float ``[..., head_dim]`` -> (int8 ``[..., head_dim]``, scale ``[...]``).

    Every element comes back within ``scale / 2`` of ``x`` (an all-zero vector gets scale 0).
    """
    x = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / INT8_MAX).astype(scale_dtype)
    # Round with the stored scale, so the error bound holds for what dequantize sees.
    stored = scale.astype(jnp.float32)[..., None]
    q = jnp.round(x / jnp.where(stored > 0, stored, 1.0))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


@jax.jit
def dequantize_kv_int8(data: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 ``[..., head_dim]`` and scale ``[...]`` -> float32 ``[..., head_dim]``."""
    return data.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]


# --- int4 -----------------------------------------------------------------------------------


def _even_head_dim(x: jax.Array) -> int:
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"int4 pages pack two codes per byte along head_dim, so head_dim "
                         f"must be even, got {head_dim}; keep such heads in int8 or float")
    return head_dim


@jax.jit
def pack_int4(codes: jax.Array) -> jax.Array:
    """Codes in 0..15 ``[..., head_dim]`` -> uint8 ``[..., head_dim // 2]``, low nibble first."""
    head_dim = _even_head_dim(codes)
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], head_dim // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


@jax.jit
def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 ``[..., head_dim // 2]`` -> int32 codes ``[..., head_dim]``."""
    p = packed.astype(jnp.int32)
    return jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


@functools.partial(jax.jit, static_argnames="scale_dtype")
def quantize_kv_int4(x: jax.Array, *, scale_dtype=jnp.bfloat16
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Float ``[..., head_dim]`` -> (packed uint8 ``[..., head_dim // 2]``, scale, zero ``[...]``).

    ``x ~ code * scale + zero``. Elements come back within ``scale / 2`` of ``x``, up to
    the rounding of scale and zero to ``scale_dtype`` (a few thousandths of a step in bf16).
    """
    _even_head_dim(x)
    x = x.astype(jnp.float32)
    low, high = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
    scale = ((high - low) / INT4_MAX).astype(scale_dtype)
    zero = low.astype(scale_dtype)
    stored_scale = scale.astype(jnp.float32)[..., None]
    stored_zero = zero.astype(jnp.float32)[..., None]
    codes = jnp.round((x - stored_zero) / jnp.where(stored_scale > 0, stored_scale, 1.0))
    return pack_int4(jnp.clip(codes, 0, INT4_MAX)), scale, zero


@jax.jit
def dequantize_kv_int4(packed: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """Packed uint8 ``[..., head_dim // 2]``, scale, zero ``[...]`` -> float32 ``[..., head_dim]``."""
    codes = unpack_int4(packed).astype(jnp.float32)
    return codes * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]


# --- any format -----------------------------------------------------------------------------


def quantize_kv(x: jax.Array, fmt: str) -> tuple[jax.Array, ...]:
    """``(data, *side arrays)`` of ``x [..., head_dim]`` in page format ``fmt``."""
    check_format(fmt)
    if fmt == "int8":
        return quantize_kv_int8(x)
    if fmt == "int4":
        return quantize_kv_int4(x)
    return (x,)


def dequantize_kv(fmt: str, data: jax.Array, *side: jax.Array) -> jax.Array:
    """float32 ``[..., head_dim]`` of pages (or tokens) stored in format ``fmt``."""
    check_format(fmt)
    if fmt == "int8":
        return dequantize_kv_int8(data, *side)
    if fmt == "int4":
        return dequantize_kv_int4(data, *side)
    return data.astype(jnp.float32)


def bytes_per_token(fmt: str, head_dim: int, *, float_dtype=jnp.bfloat16) -> int:
    """Bytes one token of one KV head takes in a key (or value) pool: data and side arrays."""
    token = jax.ShapeDtypeStruct((head_dim,), float_dtype)
    parts = jax.eval_shape(lambda x: quantize_kv(x, fmt), token)
    return sum(part.size * part.dtype.itemsize for part in parts)


def head_dim_of(fmt: str, data: jax.Array) -> int:
    return 2 * data.shape[-1] if fmt == "int4" else data.shape[-1]


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown KV page format {fmt!r}; known: {', '.join(FORMATS)}")


def check_inputs(q, k_pages: tuple, v_pages: tuple, page_table, lengths, fmt: str) -> None:
    """Raise ValueError unless the arguments form one decode-attention problem.

    ``k_pages`` and ``v_pages`` are ``(data, *side arrays)`` in format ``fmt``.
    """
    check_format(fmt)
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, n_heads, head_dim], got shape {q.shape}")
    batch, n_heads, head_dim = q.shape
    names = ("data", *SIDE_ARRAYS[fmt])
    for which, pages in (("k", k_pages), ("v", v_pages)):
        if len(pages) != len(names):
            raise ValueError(f"{fmt} pages take {', '.join(f'{which}_{n}' for n in names[1:])}"
                             f" besides the data; got {len(pages) - 1} side arrays")
        if format_of(pages[0]) != fmt:
            raise ValueError(f"{which} pages of dtype {pages[0].dtype} are not in format "
                             f"{fmt!r} (which stores {_DATA_DTYPES[fmt]})")
        if pages[0].ndim != 4:
            raise ValueError(f"{which} pages must be [kv_heads, num_pages, page_size, ...], "
                             f"got shape {pages[0].shape}")
        for name, side in zip(names[1:], pages[1:]):
            if side is None or side.shape != pages[0].shape[:3]:
                raise ValueError(f"{which}_{name} must have shape {pages[0].shape[:3]} "
                                 f"(one per token and KV head), got "
                                 f"{None if side is None else side.shape}")
    if k_pages[0].shape != v_pages[0].shape:
        raise ValueError(f"k and v pages must have the same shape, got {k_pages[0].shape} "
                         f"and {v_pages[0].shape}")
    kv_heads = k_pages[0].shape[0]
    if fmt == "int4" and head_dim % 2:
        raise ValueError(f"int4 pages need an even head_dim, got {head_dim}; "
                         "keep such heads in int8 or float pages")
    if head_dim_of(fmt, k_pages[0]) != head_dim:
        raise ValueError(f"q has head_dim={head_dim} but the {fmt} pages of shape "
                         f"{k_pages[0].shape} hold head_dim={head_dim_of(fmt, k_pages[0])}")
    if n_heads % kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of kv_heads={kv_heads} "
                         "(grouped-query attention shares each KV head among n_heads // kv_heads)")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [batch={batch}, max_pages_per_seq], "
                         f"got shape {page_table.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    for name, array in (("page_table", page_table), ("lengths", lengths)):
        if not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{name} must be int32, got {array.dtype}")


_DATA_DTYPES = {"float": "bf16/f16/f32", "int8": "int8", "int4": "packed uint8"}
