"""What the low-bit Pallas kernels share: block sizes, shape checks, tile helpers, the call.

Every kernel tiles the output over a (M tiles, N tiles) grid and runs the K loop inside
the kernel (``lax.fori_loop`` over K tiles): a K grid axis would need a cross-program
reduction that races on a GPU. At decode sizes that grid has few programs, each walking
all of K, so W4A16, W4A8 and W8A8 can also split K (``BlockSizes.split_k``, Split-K as
in FlashDecoding and cuBLAS's split-K GEMV): a third grid axis gives each program a
contiguous range of K tiles, each writes its own float32 partial output (its epilogue
scales are per row and per column, so they apply to each partial alike), and one sum
over the splits follows the kernel. Weights are unpacked per tile in registers, so HBM traffic
is the packed bytes. The Triton path wants power-of-two tiles, signed integer dots with
equal operand dtypes, and at least 16 rows per dot, so an M tile may stick out of M:
its missing rows are masked on load and store (no padding copy, which would cost a
kernel launch of its own at decode sizes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@functools.cache
def _triton_module():
    # Masked load/store live in pallas.triton (JAX 0.10+); older releases called it pallas.gpu.
    try:
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
        pltriton.load, pltriton.store  # noqa: B018
        return pltriton
    except (ImportError, AttributeError):
        from jax.experimental.pallas import gpu as plgpu  # noqa: PLC0415
        return plgpu


@functools.cache
def _triton_params_class():
    # JAX 0.10 has pallas.triton.CompilerParams; later versions also name it
    # pallas.gpu.TritonCompilerParams and deprecate the first. Prefer the newer name.
    try:
        from jax.experimental.pallas import gpu as plgpu  # noqa: PLC0415
        return plgpu.TritonCompilerParams
    except (ImportError, AttributeError):
        from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
        return pltriton.CompilerParams


def triton_compiler_params(num_warps: int, num_stages: int):
    return _triton_params_class()(num_warps=num_warps, num_stages=num_stages)


def default_interpret() -> bool:
    """Interpret the kernels (run them through XLA) unless a GPU is the default backend."""
    return jax.default_backend() == "cpu"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two) and Triton launch parameters of a low-bit GEMM.

    ``for_shape`` picks them from the problem. Decode-sized M is a weight stream: narrow N
    tiles (but >= 32 bytes per row segment, a full DRAM sector) so the grid covers the SMs,
    and long K tiles over 4 pipeline stages so each SM keeps loads in flight (a longer tile
    would spill the unpacked int32 weights out of registers). Prefill gets square 128 x 128
    tiles for tensor-core reuse. ``split_k`` stays 1 unless asked for. Untuned on hardware:
    ``experiments/gemm_gpu.py --sweep`` (split-K tiles included).
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs per output tile along K (W4A16, W4A8, W8A8); must divide K / block_k

    @classmethod
    def for_shape(cls, M: int, N: int, K: int, *, group_size: int | None = None) -> BlockSizes:
        if M > 64:
            return cls._fit(cls(block_m=128, block_n=128, block_k=64, num_warps=8), N, K, group_size)
        block_m, block_k, stages = (16, 256, 4) if M <= 16 else (_pow2_at_least(M), 128, 3)
        block_n = 128
        while block_n > 32 and (N // block_n) * pl.cdiv(M, block_m) < 128:
            block_n //= 2
        blocks = cls(block_m=block_m, block_n=block_n, block_k=block_k, num_stages=stages)
        return cls._fit(blocks, N, K, group_size)

    @classmethod
    def _fit(cls, blocks: BlockSizes, N: int, K: int, group_size: int | None) -> BlockSizes:
        block_n, block_k = blocks.block_n, blocks.block_k
        while block_n > 16 and N % block_n:
            block_n //= 2
        while block_k > 32 and (K % block_k or (group_size and group_size % block_k
                                                   and block_k % group_size)):
            block_k //= 2
        return dataclasses.replace(blocks, block_n=block_n, block_k=block_k)


def resolve_blocks(block_sizes: BlockSizes | None, *, M: int, N: int, K: int,
                   group_size: int | None = None) -> BlockSizes:
    """The given tiles (or ``for_shape``'s), with the M tile no taller than M needs."""
    blocks = block_sizes or BlockSizes.for_shape(M, N, K, group_size=group_size)
    return dataclasses.replace(blocks, block_m=min(blocks.block_m, max(16, _pow2_at_least(M))))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_blocks(blocks: BlockSizes, *, N: int, K: int, group_size: int | None = None,
                 k_multiple: int = 1) -> None:
    """Raise ValueError when the tiles do not fit the problem (the API then falls back)."""
    block_n, block_k = blocks.block_n, blocks.block_k
    for name, value in (("block_m", blocks.block_m), ("block_n", block_n), ("block_k", block_k)):
        if not _is_pow2(value) or value < 16:
            raise ValueError(f"{name}={value} must be a power of two >= 16 (Triton dot tiles)")
    if N % block_n:
        raise ValueError(f"{block_n=} must divide {N=}")
    if K % block_k:
        raise ValueError(f"{block_k=} must divide {K=}")
    if block_k % k_multiple:
        raise ValueError(f"{block_k=} must be a multiple of {k_multiple} (bytes of packed weights)")
    if group_size is not None and group_size % block_k and block_k % group_size:
        raise ValueError(f"{block_k=} and {group_size=} must divide one another")
    if group_size is not None and block_k > group_size and not _is_pow2(block_k // group_size):
        raise ValueError(f"{block_k=} // {group_size=} must be a power of two")
    if blocks.split_k < 1 or (K // block_k) % blocks.split_k:
        raise ValueError(f"split_k={blocks.split_k} must be >= 1 and divide the {K // block_k} K tiles "
                         f"(K={K} / {block_k=})")


def check_activations(x: jax.Array, K: int, dtypes: tuple, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D [M, K], got shape {x.shape}")
    if x.shape[1] != K:
        raise ValueError(f"{what} has K={x.shape[1]} but the weight has K={K}")
    if x.dtype not in [jnp.dtype(d) for d in dtypes]:
        raise ValueError(f"{what} must be one of {[jnp.dtype(d).name for d in dtypes]}, got {x.dtype}")


# --- tile helpers (run inside kernels) ----------------------------------------------------


def unpack_int4_tile(packed: jax.Array) -> jax.Array:
    """uint8 [bk/2, bn] -> int32 [bk, bn] codes, low nibble first along K."""
    rows, cols = packed.shape
    shifts = 4 * lax.broadcasted_iota(jnp.int32, (1, 2, 1), 1)
    nibbles = (packed.astype(jnp.int32)[:, None, :] >> shifts) & 0xF  # [bk/2, 2, bn]
    return nibbles.reshape(2 * rows, cols)


def group_rows(ref, k_tile, *, block_k: int, group_size: int) -> jax.Array:
    """Per-group rows for K tile ``k_tile`` of a [K/G, bn] ref, broadcastable to [bk, bn]."""
    rows = max(1, block_k // group_size)
    start = lax.div(k_tile * block_k, group_size)
    tile = ref[pl.ds(start, rows), :]  # [rows, bn]
    if rows == 1:
        return tile
    cols = tile.shape[1]
    expanded = jnp.broadcast_to(tile[:, None, :], (rows, group_size, cols))
    return expanded.reshape(block_k, cols)


@dataclasses.dataclass(frozen=True)
class Rows:
    """The rows of M that this M tile holds: the last tile may stick out of M.

    Kernels call ``rows.here()`` once at their top level (program ids are not available
    inside loop bodies in interpret mode) and use its ``load``/``store`` for row operands.
    """

    M: int
    block_m: int
    first_row: Any = None

    def here(self) -> Rows:
        return dataclasses.replace(self, first_row=pl.program_id(0) * self.block_m)

    def _mask(self, shape: tuple[int, ...]) -> jax.Array:
        return self.first_row + lax.broadcasted_iota(jnp.int32, shape, 0) < self.M

    def load(self, ref):
        """ref[...] of a row operand ([bm] or [bm, cols]); missing rows read as 0."""
        if self.M % self.block_m == 0:
            return ref[...]
        return _triton_module().load(ref, mask=self._mask(ref.shape), other=0)

    def store(self, o_ref, value: jax.Array) -> None:
        value = value.astype(o_ref.dtype)
        if self.M % self.block_m == 0:
            o_ref[...] = value
        else:
            _triton_module().store(o_ref, value, mask=self._mask(value.shape))


@dataclasses.dataclass(frozen=True)
class KTiles:
    """The K tiles this program walks: all of them, or its split's contiguous range.

    Like ``Rows``, kernels call ``ktiles.here()`` once at their top level.
    """

    total: int
    split: int = 1
    start: Any = 0

    def here(self) -> KTiles:
        if self.split == 1:
            return self
        return dataclasses.replace(self, start=pl.program_id(2) * (self.total // self.split))

    @property
    def stop(self):
        return self.start + self.total // self.split


# --- the call ------------------------------------------------------------------------------


def row_spec(block_m: int, K: int) -> pl.BlockSpec:
    """An activation operand [M, K]: the whole K row of tile i (the kernel loops over K)."""
    return pl.BlockSpec((block_m, K), lambda i, j, *_: (i, 0))


def row_vector_spec(block_m: int) -> pl.BlockSpec:
    return pl.BlockSpec((block_m,), lambda i, j, *_: (i,))


def column_spec(shape: tuple[int, ...], block_n: int) -> pl.BlockSpec:
    """A weight operand [..., N]: all leading dims, N tile j."""
    lead = len(shape) - 1
    return pl.BlockSpec(tuple(shape[:-1]) + (block_n,), lambda i, j, *_: (0,) * lead + (j,))


def tiled_call(kernel, operands, in_specs, *, M: int, N: int, K: int, blocks: BlockSizes, out_dtype,
               interpret: bool, name: str) -> jax.Array:
    """Run ``kernel(*refs, rows=Rows(...), ktiles=KTiles(...))`` over the (M tiles, N tiles)
    grid, or (M tiles, N tiles, splits) with float32 partials summed after the kernel."""
    block_m, block_n, split = blocks.block_m, blocks.block_n, blocks.split_k
    grid = (pl.cdiv(M, block_m), N // block_n)
    if split == 1:
        out_spec, out_shape = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)), (M, N)
    else:
        grid += (split,)
        out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
        out_shape = (split, M, N)
    out = pl.pallas_call(
        functools.partial(kernel, rows=Rows(M, block_m), ktiles=KTiles(K // blocks.block_k, split)),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype if split == 1 else jnp.float32),
        compiler_params=triton_compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)
    return out if split == 1 else out.sum(0).astype(out_dtype)
