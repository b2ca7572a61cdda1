"""One entry point for every low-bit format: quantize a weight, multiply by it.

Like tokamax's ``ops/*/api.py``: ``impl="auto"`` runs the Pallas kernel on a GPU when the
shapes fit its tiles and the pure-jnp reference elsewhere (CPU, TPU, odd shapes);
``"pallas"`` insists on the kernel (interpreted on CPU), ``"reference"`` on the reference.

    qw = quantize_weight(w, "w4a8")            # w: float [K, N]
    y = lowbit_matmul(x, qw)                    # x: [..., K] bf16/f32 -> [..., N], x.dtype

A8 formats quantize ``x`` per token to int8 inside ``lowbit_matmul``; bit-plane weights
run with float activations as ``intN`` and with int8 activations as ``intNa8``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from pallas_kernels.lowbit_matmul import reference
from pallas_kernels.lowbit_matmul.bitplane import bitplane_matmul, check_bitplane
from pallas_kernels.lowbit_matmul.common import BlockSizes
from pallas_kernels.lowbit_matmul.formats import (
    BitplaneWeight, W4A8Weight, W4A16Weight, W8A8Weight, quantize_activations_per_token,
    quantize_bitplane, quantize_w4a8, quantize_w4a16, quantize_w8a8, weight_shape)
from pallas_kernels.lowbit_matmul.int4 import check_w4a8, check_w4a16, w4a8_matmul, w4a16_matmul
from pallas_kernels.lowbit_matmul.w8a8 import check_w8a8, w8a8_matmul

IMPLS = ("auto", "pallas", "reference")


@dataclasses.dataclass(frozen=True)
class Format:
    """A registered weight format.

    ``activation_bits`` is 8 for per-token int8 activations and 16 for float ones.
    ``kernel``/``reference``/``check`` take ``(x, weight)`` for float activations and
    ``(x_q, x_scale, weight)`` for int8 ones.
    """

    name: str
    weight_type: type
    weight_bits: int
    activation_bits: int
    quantize: Callable[..., Any]
    kernel: Callable[..., jax.Array]
    reference: Callable[..., jax.Array]
    check: Callable[..., None]
    description: str


def _bitplane_format(bits: int, int8_activations: bool) -> Format:
    def quantize(w, **opts):
        return quantize_bitplane(w, bits=bits, **opts)

    if int8_activations:
        return Format(
            f"int{bits}a8", BitplaneWeight, bits, 8, quantize,
            kernel=lambda x_q, x_scale, w, **kw: bitplane_matmul(x_q, w, x_scale, **kw),
            reference=reference.bitplane_int8_matmul,
            check=lambda x_q, x_scale, w, blocks=None: check_bitplane(x_q, w, blocks, x_scale),
            description=f"{bits}-bit bipolar-INT bit-plane weights, per-token int8 activations")
    return Format(
        f"int{bits}", BitplaneWeight, bits, 16, quantize, kernel=bitplane_matmul,
        reference=reference.bitplane_matmul, check=check_bitplane,
        description=f"{bits}-bit bipolar-INT bit-plane weights, float activations")


FORMATS: dict[str, Format] = {
    "w8a8": Format("w8a8", W8A8Weight, 8, 8, quantize_w8a8, w8a8_matmul,
                   reference.w8a8_matmul, check_w8a8,
                   "per-channel int8 weights, per-token int8 activations (SmoothQuant)"),
    "w4a16": Format("w4a16", W4A16Weight, 4, 16, quantize_w4a16, w4a16_matmul,
                    reference.w4a16_matmul, check_w4a16,
                    "group-wise (128) asymmetric uint4 weights, float activations (AWQ)"),
    "w4a8": Format("w4a8", W4A8Weight, 4, 8, quantize_w4a8, w4a8_matmul,
                   reference.w4a8_matmul, check_w4a8,
                   "QoQ progressive int8 -> group uint4 weights, per-token int8 activations (QServe)"),
    **{f"int{b}": _bitplane_format(b, False) for b in range(1, 9)},
    **{f"int{b}a8": _bitplane_format(b, True) for b in range(1, 9)},
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown low-bit format {name!r}; known: {', '.join(FORMATS)}") from None


def quantize_weight(w: jax.Array, format: str, **opts):
    """Quantize a float weight [K, N] (y = x @ w) into ``format``'s packed pytree.

    Options: ``group_size`` for w4a16/w4a8 (default 128) and bit-plane formats
    (default None: per output channel).
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_weight takes a 2-D [K, N] weight, got shape {w.shape}")
    return get_format(format).quantize(w, **opts)


def default_format(weight) -> str:
    """The format a packed weight runs in when lowbit_matmul is given no format."""
    if isinstance(weight, BitplaneWeight):
        return f"int{weight.bits}"
    for name in ("w8a8", "w4a16", "w4a8"):
        if isinstance(weight, FORMATS[name].weight_type):
            return name
    raise TypeError(f"not a packed low-bit weight: {type(weight).__name__}")


def packed_nbytes(weight) -> int:
    """Bytes of a packed weight, scales included."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(weight))


def _kernel_fits(fmt: Format, args, block_sizes) -> bool:
    try:
        fmt.check(*args, block_sizes)
    except ValueError:
        return False
    return True


def lowbit_matmul(x: jax.Array, weight, *, format: str | None = None, impl: str = "auto",
                  block_sizes: BlockSizes | None = None) -> jax.Array:
    """x [..., K] (bf16/f32) @ packed weight -> [..., N] in x.dtype."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    fmt = get_format(format or default_format(weight))
    if not isinstance(weight, fmt.weight_type):
        raise TypeError(f"format {fmt.name!r} needs a {fmt.weight_type.__name__}, "
                        f"got {type(weight).__name__}")
    K, N = weight_shape(weight)
    if x.shape[-1] != K:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # [M, K]
    if fmt.activation_bits == 8:
        x_q, x_scale = quantize_activations_per_token(x2)
        args, extra = (x_q, x_scale, weight), {"out_dtype": x.dtype}
    else:
        args, extra = (x2, weight), {}
    use_kernel = impl == "pallas" or (
        impl == "auto" and jax.default_backend() == "gpu" and _kernel_fits(fmt, args, block_sizes))
    if use_kernel:
        out = fmt.kernel(*args, block_sizes=block_sizes, **extra)
    else:
        out = fmt.reference(*args, **extra)
    return out.astype(x.dtype).reshape(*lead, N)
