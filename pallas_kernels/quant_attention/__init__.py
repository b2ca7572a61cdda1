"""Decode attention over a quantized paged KV cache (float, int8, int4 pages).

``formats`` quantizes tokens into pages (layouts documented there), ``reference`` defines
the attention and the log-sum-exp merge of partial results in pure jnp, ``kernel`` holds
the split-K Pallas kernel that dequantizes pages in registers, and ``api`` picks one:
``paged_decode_attention(q, k, v, page_table, lengths, k_scale=..., v_scale=...)``.
"""

from pallas_kernels.quant_attention.api import paged_decode_attention
from pallas_kernels.quant_attention.formats import (
    FORMATS, bytes_per_token, dequantize_kv, dequantize_kv_int4, dequantize_kv_int8, pack_int4,
    quantize_kv, quantize_kv_int4, quantize_kv_int8, unpack_int4)
from pallas_kernels.quant_attention.kernel import BlockSizes, paged_decode_attention_kernel
from pallas_kernels.quant_attention.reference import merge_partials

__all__ = [
    "FORMATS", "BlockSizes", "bytes_per_token", "dequantize_kv", "dequantize_kv_int4",
    "dequantize_kv_int8", "merge_partials", "pack_int4", "paged_decode_attention",
    "paged_decode_attention_kernel", "quantize_kv", "quantize_kv_int4", "quantize_kv_int8",
    "unpack_int4",
]
