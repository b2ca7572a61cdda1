"""One entry point for decode attention over paged KV in any page format.

Like ``lowbit_matmul``'s API: ``impl="auto"`` runs the Pallas kernel on a GPU when the
shapes fit its tiles and the pure-jnp reference elsewhere (CPU, TPU, odd shapes);
``"pallas"`` insists on the kernel (interpreted on CPU unless ``interpret`` says
otherwise), ``"reference"`` on the reference.

    k, k_scale = quantize_kv_int8(keys)        # keys: [kv_heads, num_pages, page_size, head_dim]
    v, v_scale = quantize_kv_int8(values)
    out, lse = paged_decode_attention(q, k, v, page_table, lengths,
                                      k_scale=k_scale, v_scale=v_scale)

``lse`` lets a caller merge this result with attention over other keys (pages on the
host or on disk) through ``merge_partials``.
"""

from __future__ import annotations

import jax

from pallas_kernels.quant_attention import reference
from pallas_kernels.quant_attention.formats import SIDE_ARRAYS, format_of
from pallas_kernels.quant_attention.kernel import (
    BlockSizes, check_kernel, paged_decode_attention_kernel)

IMPLS = ("auto", "pallas", "reference")


def _pages(which: str, data, fmt: str, given: dict) -> tuple:
    names = SIDE_ARRAYS[fmt]
    extra = [name for name, array in given.items() if array is not None and name not in names]
    if extra:
        raise ValueError(f"{fmt} pages take no {which}_{extra[0]}; pass only "
                         f"{', '.join(f'{which}_{n}' for n in names) or 'the data'}")
    missing = [name for name in names if given[name] is None]
    if missing:
        raise ValueError(f"{fmt} pages need {which}_{missing[0]} (from quantize_kv_{fmt})")
    return (data, *(given[name] for name in names))


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, lengths: jax.Array, *, fmt: str | None = None,
                           k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                           k_zero: jax.Array | None = None, v_zero: jax.Array | None = None,
                           sm_scale: float | None = None, num_splits: int | None = None,
                           block_sizes: BlockSizes | None = None, impl: str = "auto",
                           interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of one query token per sequence over its paged keys and values.

    q ``[batch, n_heads, head_dim]``; pages ``[kv_heads, num_pages, page_size, ...]`` in
    format ``fmt`` ("float", "int8", "int4"; by default read off the data dtype) with the
    format's scales (and zeros) ``[kv_heads, num_pages, page_size]``; page_table
    ``[batch, max_pages_per_seq]`` int32; lengths ``[batch]`` int32. Returns (out
    ``[batch, n_heads, head_dim]``, lse ``[batch, n_heads]``), float32; a sequence of
    length 0 gives (0, -inf). ``num_splits`` splits each sequence's pages among that
    many programs (default: enough to fill a GPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    fmt = fmt or format_of(k_pages)
    if fmt not in SIDE_ARRAYS:
        raise ValueError(f"unknown KV page format {fmt!r}; known: {', '.join(SIDE_ARRAYS)}")
    k = _pages("k", k_pages, fmt, {"scale": k_scale, "zero": k_zero})
    v = _pages("v", v_pages, fmt, {"scale": v_scale, "zero": v_zero})
    args = (q, k, v, page_table, lengths)
    use_kernel = impl == "pallas"
    if impl == "auto" and jax.default_backend() == "gpu":
        try:
            check_kernel(*args, fmt=fmt, block_sizes=block_sizes, num_splits=num_splits)
            use_kernel = True
        except ValueError:
            pass  # shapes the kernel does not tile; the reference raises if they are wrong
    if use_kernel:
        return paged_decode_attention_kernel(*args, fmt=fmt, sm_scale=sm_scale,
                                             block_sizes=block_sizes, num_splits=num_splits,
                                             interpret=interpret)
    return reference.paged_decode_attention(*args, fmt=fmt, sm_scale=sm_scale)
