"""Low-bit GEMM: bipolar-INT bit planes (1..8 bits), W4A8 (QoQ), W4A16, W8A8.

``formats`` quantizes and packs (layouts documented there), ``reference`` defines the
products in pure jnp (with a bit-serial check), ``bitplane``/``int4``/``w8a8`` hold the
Pallas kernels, and ``api`` picks one: ``lowbit_matmul(x, quantize_weight(w, "w4a8"))``.
"""

from pallas_kernels.lowbit_matmul.api import (
    FORMATS, Format, default_format, get_format, lowbit_matmul, packed_nbytes, quantize_weight)
from pallas_kernels.lowbit_matmul.bitplane import bitplane_matmul
from pallas_kernels.lowbit_matmul.common import BlockSizes
from pallas_kernels.lowbit_matmul.formats import (
    BitplaneWeight, W4A8Weight, W4A16Weight, W8A8Weight, dequantize,
    quantize_activations_per_token)
from pallas_kernels.lowbit_matmul.int4 import w4a8_matmul, w4a16_matmul
from pallas_kernels.lowbit_matmul.w8a8 import w8a8_matmul

__all__ = [
    "FORMATS", "Format", "BlockSizes", "BitplaneWeight", "W4A8Weight", "W4A16Weight",
    "W8A8Weight", "bitplane_matmul", "default_format", "dequantize", "get_format",
    "lowbit_matmul", "packed_nbytes", "quantize_activations_per_token", "quantize_weight",
    "w4a8_matmul", "w4a16_matmul", "w8a8_matmul",
]
