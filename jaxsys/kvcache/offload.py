"""KV pages off the device (host memory or disk), attended by fetching them or where they live.

Two published answers to a KV cache larger than device memory, behind one cache:

- **fetch** (FlexGen, Sheng et al.): copy the offloaded pages to the device for every
  attention, then attend there. The link carries the whole cold KV each step.
- **near-data** (InstInfer, Pan et al.): compute the partial attention of the offloaded
  pages where they live and send back only (out, lse) per query head, merged with the
  device part by log-sum-exp (`merge_partials`). The link carries the queries and
  the partial outputs. InstInfer computes inside computational SSDs; here the host CPU
  computes for host pages, and for disk pages it reads the memory map.

Placement: the device fills first. `build_kv_cache` keeps a sequence's pages on the
device when its whole reservation fits the device budget (a plain `PagedCache`); when
it does not, the device holds a ring of the newest `ring_pages` pages per sequence and
the older pages are served from the far tier. Every token is written through to the
far tier when it is produced (so a page leaving the ring needs no copy at eviction: the
same bytes cross, one token at a time instead of one page at a time), and a token is
read from exactly one place: the ring for slots in the window, the far tier below it.
Positions must move forward across pages (prefill, decode); a speculative rollback
into an older page would find the ring already reused (use `PagedCache` for that).

Host pages are numpy arrays in host RAM and disk pages `np.memmap` files, both in the
layout ``[batch, slots, page_size, kv_heads, ...]`` (a sequence's pages are contiguous
in the file), reached from the compiled program by ordered `jax.experimental.io_callback`
calls: write-through, fetch, near-data attention. The same numpy code serves both
tiers, so host and disk give bit-identical results. `jax.experimental.compute_on(
"device_host")` over `memory_kind="pinned_host"` arrays also runs a scatter and an
attention inside a `while_loop` on JAX 0.10.2's CPU backend; it is not used because a
disk tier needs a host function anyway, and one mechanism that runs on every backend
keeps the tiers identical. The compiled program names its store by an id operand, so
one program serves host and disk pages; `release(cache)` drops the store (and files).

On a CPU-only machine host and device are the same RAM: the byte counts are what a
GPU's PCIe link would carry, the times are not.

Bytes are counted from the arrays that cross each boundary: the operands and results
of every callback (`device_to_host`, `host_to_device`) and the pages read from or
written to the memory map (`disk_to_host`, `host_to_disk`), in `FarPages.bytes`.
Shapes are static, so a fetch returns every far slot the cache could hold; slots past a
sequence's far tokens cross as zeros (at full context there are none).
A disk tier reserves its files' blocks up front (`posix_fallocate`), so a full disk
fails when the cache is built, with a clear error, not with SIGBUS in the middle of a
generation.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import math
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxsys.kvcache.paged import (DEFAULT_PAGE_SIZE, KV_BITS, causal_attention, decode_partial, empty_pool,
                                  paged_cache, pages_per_sequence, write_tokens)
from pallas_kernels.quant_attention import merge_partials, quantize_kv
from pallas_kernels.quant_attention.formats import SIDE_ARRAYS, check_format
from pallas_kernels.quant_attention.reference import gather_pages

TIERS = ("host", "disk")
MODES = ("fetch", "near_data")
BOUNDARIES = ("device_to_host", "host_to_device", "disk_to_host", "host_to_disk")


class DiskTierError(OSError):
    """The disk tier cannot be created where it was asked to live."""


def _nbytes(*arrays) -> int:
    return sum(np.asarray(a).nbytes for a in arrays)


def dequantize_np(fmt: str, data: np.ndarray, *side: np.ndarray) -> np.ndarray:
    """numpy twin of `formats.dequantize_kv`: float32 [..., head_dim]."""
    if fmt == "float":
        return data.astype(np.float32)
    if fmt == "int8":
        return data.astype(np.float32) * side[0].astype(np.float32)[..., None]
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(*data.shape[:-1], 2 * data.shape[-1])
    return codes.astype(np.float32) * side[0].astype(np.float32)[..., None] + side[1].astype(np.float32)[..., None]


class FarPages:
    """Every layer's offloaded pages: numpy arrays (tier "host") or memory-mapped files (tier "disk").

    Sequence b's slot s (tokens ``s * page_size ...``) is ``[b, s]`` of each part.
    """

    def __init__(self, config, batch: int, max_len: int, *, fmt: str, page_size: int, dtype, tier: str = "host",
                 path: str | os.PathLike | None = None):
        if tier not in TIERS:
            raise ValueError(f"unknown offload tier {tier!r}; known: {', '.join(TIERS)}")
        if tier == "disk" and path is None:
            raise ValueError("the disk tier needs a directory for its page files (path=...)")
        check_format(fmt)
        self.fmt, self.tier, self.page_size = fmt, tier, page_size
        self.id: int | None = None  # set by `register`
        self.slots = pages_per_sequence(max_len, page_size)
        self.bytes = dict.fromkeys(BOUNDARIES, 0)
        self.files: list[str] = []
        token = jax.eval_shape(lambda x: quantize_kv(x, fmt),
                               jax.ShapeDtypeStruct((config.n_kv_heads, config.resolved_head_dim), dtype))
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        if tier == "disk":
            self._make_dir()
        names = ("data", *SIDE_ARRAYS[fmt])
        self.layers = [{which: tuple(self._array(f"layer{i}_{which}_{name}", (batch, self.slots, page_size) +
                                                 part.shape, part.dtype) for name, part in zip(names, token))
                        for which in ("k", "v")} for i in range(config.n_layers)]

    # --- storage ------------------------------------------------------------------------------

    def _make_dir(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise DiskTierError(e.errno, f"cannot create the disk KV tier's directory {self.path}: {e.strerror}; "
                                "give a writable directory") from e
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise DiskTierError(errno.EACCES, f"the disk KV tier's directory {self.path} is not writable; "
                                "give a writable directory")

    def _array(self, name: str, shape: tuple, dtype) -> np.ndarray:
        if self.tier == "host":
            return np.zeros(shape, dtype)
        file = os.path.join(self.path, f"{name}.kv")
        size = math.prod(shape) * np.dtype(dtype).itemsize
        try:
            with open(file, "wb") as f:
                _reserve(f.fileno(), size)
        except OSError as e:
            if os.path.exists(file):
                os.remove(file)
            self.close()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskTierError(e.errno, f"not enough space for the disk KV tier in {self.path}: a page file "
                                    f"needs {size} bytes ({e.strerror}); free space, pick another directory or "
                                    "lower the context length") from e
            raise DiskTierError(e.errno, f"cannot write the disk KV tier's file {file}: {e.strerror}; "
                                "give a writable directory") from e
        self.files.append(file)
        return np.memmap(file, dtype=dtype, mode="r+", shape=shape)

    def close(self) -> None:
        """Drop the arrays and delete the page files this store created."""
        self.layers = []
        for file in self.files:
            if os.path.exists(file):
                os.remove(file)
        self.files = []

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for layer in self.layers for pool in layer.values() for part in pool)

    def _read(self, part: np.ndarray, b: int, n_slots: int) -> np.ndarray:
        out = np.asarray(part[b, :n_slots])
        if self.tier == "disk":
            self.bytes["disk_to_host"] += out.nbytes
        return out

    # --- host functions the compiled program calls ----------------------------------------------

    def write(self, layer: int, positions, *parts) -> None:
        """Store tokens (parts [B, T, kv_heads, ...], keys then values) at positions [B, T] (-1: nowhere)."""
        self.bytes["device_to_host"] += _nbytes(positions, *parts)
        rows, cols = np.nonzero(positions >= 0)
        pos = positions[rows, cols]
        if pos.size and pos.max() >= self.slots * self.page_size:
            raise IndexError(f"position {pos.max()} is past the offloaded cache's {self.slots * self.page_size} "
                             "tokens; build the cache for prompt + max_new_tokens tokens")
        pools = (*self.layers[layer]["k"], *self.layers[layer]["v"])
        for pool, new in zip(pools, parts):
            pool[rows, pos // self.page_size, pos % self.page_size] = new[rows, cols]
            if self.tier == "disk":
                self.bytes["host_to_disk"] += new[rows, cols].nbytes

    def fetch(self, layer: int, far_len, slots: int) -> tuple[np.ndarray, ...]:
        """The first `slots` pages of every sequence, as stored (keys' parts, then values'), [B, slots, ...]."""
        self.bytes["device_to_host"] += _nbytes(far_len)
        out = []
        for pool in (*self.layers[layer]["k"], *self.layers[layer]["v"]):
            block = np.zeros((pool.shape[0], slots) + pool.shape[2:], pool.dtype)
            for b, length in enumerate(far_len):
                n = -(-int(length) // self.page_size)
                block[b, :n] = self._read(pool, b, n)
            out.append(block)
        self.bytes["host_to_device"] += _nbytes(*out)
        return tuple(out)

    def attend(self, layer: int, q, q_pos, far_len) -> tuple[np.ndarray, np.ndarray]:
        """Near-data partial attention: q [B, T, H, hd] over each sequence's first far_len[b] tokens.

        Returns (out [B, T, H, hd], lse [B, T, H]) float32, (0, -inf) where no key is visible.
        """
        self.bytes["device_to_host"] += _nbytes(q, q_pos, far_len)
        b_size, t, h, hd = q.shape
        out = np.zeros((b_size, t, h, hd), np.float32)
        lse = np.full((b_size, t, h), -np.inf, np.float32)
        k_pool, v_pool = self.layers[layer]["k"], self.layers[layer]["v"]
        for b, length in enumerate(far_len):
            n = -(-int(length) // self.page_size)
            if n == 0:
                continue
            keys, values = (dequantize_np(self.fmt, *(self._read(p, b, n) for p in pool)) for pool in (k_pool, v_pool))
            key_pos = np.arange(n * self.page_size)
            visible = (key_pos[None, :] < length) & (key_pos[None, :] <= q_pos[b][:, None])  # [T, S]
            out[b], lse[b] = _attention_np(q[b].astype(np.float32), keys.reshape(-1, *keys.shape[2:]),
                                           values.reshape(-1, *values.shape[2:]), visible)
        self.bytes["host_to_device"] += _nbytes(out, lse)
        return out, lse


def _attention_np(q, keys, values, visible) -> tuple[np.ndarray, np.ndarray]:
    """q [T, H, hd] over keys, values [S, kvH, hd] where visible [T, S]: (out [T, H, hd], lse [T, H])."""
    t, h, hd = q.shape
    kv_heads = keys.shape[1]
    groups = h // kv_heads
    qg = q.reshape(t, kv_heads, groups, hd).transpose(1, 0, 2, 3).reshape(kv_heads, t * groups, hd)
    logits = qg @ keys.transpose(1, 2, 0) / np.float32(math.sqrt(hd))  # [kvH, T * G, S] (BLAS)
    logits = logits.reshape(kv_heads, t, groups, -1)
    logits = np.where(visible[None, :, None, :], logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(logits - top)
    total = weights.sum(-1)  # [kvH, T, G]
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    out = (weights.reshape(kv_heads, t * groups, -1) @ values.transpose(1, 0, 2)).reshape(kv_heads, t, groups, hd)
    out = out / safe[..., None]
    lse = np.where(seen, top[..., 0] + np.log(safe), -np.inf)
    return out.transpose(1, 0, 2, 3).reshape(t, h, hd), lse.transpose(1, 0, 2).reshape(t, h)


def _reserve(fd: int, size: int) -> None:
    """Allocate `size` bytes of disk blocks for an open file (ENOSPC now, not on a later write)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        chunk = b"\0" * (1 << 20)  # a file system without fallocate: write the zeros
        for start in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), size - start)], start)


_STORES: dict[int, FarPages] = {}  # store id -> store; a compiled program names its store by an id operand
_next_id = itertools.count()


def register(store: FarPages) -> int:
    store_id = next(_next_id)
    _STORES[store_id] = store
    store.id = store_id
    return store_id


def store_of(cache) -> FarPages | None:
    """The far tier behind a cache (None for a device-only cache)."""
    layer = cache[0]
    return _STORES.get(int(layer.store_id)) if isinstance(layer, TieredCache) else None


def release(cache) -> None:
    """Forget a cache's far tier and delete its page files (the device arrays go with the cache)."""
    store = store_of(cache)
    if store is not None:
        _STORES.pop(store.id, None)
        store.close()


def _call(method: str, layer: int, store_id, *args, **kwargs):
    store = _STORES[int(store_id)]
    store.bytes["device_to_host"] += store_id.nbytes
    return getattr(store, method)(layer, *args, **kwargs)


@partial(jax.tree_util.register_dataclass, data_fields=["ring_k", "ring_v", "store_id"],
         meta_fields=["layer", "fmt", "mode", "far_slots", "impl"])
@dataclasses.dataclass(frozen=True)
class TieredCache:
    """One layer: a device ring of each sequence's newest pages over a `FarPages` store.

    Ring pools ``[kv_heads, batch * ring_pages, page_size, ...]``: sequence b's slot s,
    while in the window, lives in ring page ``b * ring_pages + s % ring_pages``. The
    store is named by `store_id`, an array: where the far pages live (host or disk) is
    data to the compiled program, so one program serves every tier.
    """

    ring_k: tuple
    ring_v: tuple
    store_id: jax.Array  # int32 scalar
    layer: int
    fmt: str
    mode: str  # "near_data" or "fetch"
    far_slots: int  # pages per sequence the far tier can serve (its slots minus the ring's)
    impl: str = "auto"

    @property
    def page_size(self) -> int:
        return self.ring_k[0].shape[2]

    def attend(self, q, k, v, positions) -> tuple[jax.Array, "TieredCache"]:
        """The model's cache protocol: q [B, T, H, hd], k, v [B, T, kvH, hd] -> (out [B, T, H, hd] f32, cache)."""
        batch, t = positions.shape
        ps = self.page_size
        ring_pages = self.ring_k[0].shape[1] // batch
        k_new, v_new = quantize_kv(k, self.fmt), quantize_kv(v, self.fmt)
        io_callback(partial(_call, "write", self.layer), None, self.store_id, positions, *k_new, *v_new,
                    ordered=True)

        last = jnp.max(positions, axis=1)  # [B], -1 for a row of padding
        first_slot = jnp.maximum(last // ps - ring_pages + 1, 0)  # oldest slot in the device window
        far_len = jnp.where(last >= 0, first_slot * ps, 0)  # tokens served by the far tier
        slots = positions // ps
        rows = jnp.arange(batch)[:, None]
        in_window = (positions >= 0) & (slots >= first_slot[:, None])
        pages = jnp.where(in_window, rows * ring_pages + slots % ring_pages, batch * ring_pages)
        ring_k = write_tokens(self.ring_k, k_new, pages, positions % ps)
        ring_v = write_tokens(self.ring_v, v_new, pages, positions % ps)
        window = rows * ring_pages + (first_slot[:, None] + jnp.arange(ring_pages)) % ring_pages  # [B, ring]

        if t == 1:
            lengths = jnp.where(last >= 0, last + 1 - far_len, 0)
            out, lse = decode_partial(q[:, 0], ring_k, ring_v, window, lengths, fmt=self.fmt, impl=self.impl)
            near = out[:, None], lse[:, None]
        else:
            keys, values = gather_pages(self.fmt, ring_k, window), gather_pages(self.fmt, ring_v, window)
            near = causal_attention(q, keys, values, far_len[:, None] + jnp.arange(keys.shape[2]), positions)
        empty = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
        far = jax.lax.cond(jnp.any(far_len > 0), self._far_partial, lambda *_: empty, q, positions, far_len)
        out, _ = merge_partials([near[0], far[0]], [near[1], far[1]])
        return out, dataclasses.replace(self, ring_k=ring_k, ring_v=ring_v)

    def _far_partial(self, q, positions, far_len):
        """(out, lse) of q over each sequence's first far_len tokens, which live in the far tier."""
        batch, t = positions.shape
        if self.mode == "near_data":
            shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
            return io_callback(partial(_call, "attend", self.layer), shapes, self.store_id, q, positions, far_len,
                               ordered=True)
        slots = self.far_slots
        shapes = tuple(jax.ShapeDtypeStruct((batch, slots, part.shape[2], part.shape[0], *part.shape[3:]), part.dtype)
                       for part in (*self.ring_k, *self.ring_v))
        parts = io_callback(partial(_call, "fetch", self.layer, slots=slots), shapes, self.store_id, far_len,
                            ordered=True)
        # [B, slots, page_size, kvH, ...] -> pool layout [kvH, B * slots, page_size, ...]
        pools = [jnp.moveaxis(p, 3, 0).reshape(p.shape[3], batch * slots, p.shape[2], *p.shape[4:]) for p in parts]
        k_pool, v_pool = tuple(pools[:len(pools) // 2]), tuple(pools[len(pools) // 2:])
        table = jnp.arange(batch)[:, None] * slots + jnp.arange(slots)
        if t == 1:
            out, lse = decode_partial(q[:, 0], k_pool, v_pool, table, far_len, fmt=self.fmt, impl=self.impl)
            return out[:, None], lse[:, None]
        keys, values = gather_pages(self.fmt, k_pool, table), gather_pages(self.fmt, v_pool, table)
        key_pos = jnp.arange(keys.shape[2])[None, :]
        return causal_attention(q, keys, values, jnp.where(key_pos < far_len[:, None], key_pos, -1), positions)


def tiered_cache(config, batch: int, max_len: int, *, ring_pages: int, fmt: str = "float", tier: str = "host",
                 mode: str = "near_data", page_size: int = DEFAULT_PAGE_SIZE, path=None, dtype=None,
                 impl: str = "auto") -> tuple[TieredCache, ...]:
    """A cache whose newest `ring_pages` pages per sequence stay on the device, the rest in `tier`.

    Call `release(cache)` when done with it: the far tier (and a disk tier's files) lives
    until then.
    """
    if mode not in MODES:
        raise ValueError(f"unknown offload attention mode {mode!r}; known: {', '.join(MODES)}")
    slots = pages_per_sequence(max_len, page_size)
    if not 1 <= ring_pages < slots:
        raise ValueError(f"ring_pages={ring_pages} must be at least 1 and below the {slots} pages of a "
                         f"{max_len}-token sequence (a cache that fits the device needs no offload)")
    dtype = jnp.dtype(dtype or config.dtype)
    store_id = register(FarPages(config, batch, max_len, fmt=fmt, page_size=page_size, dtype=dtype, tier=tier,
                                 path=path))
    rings = jax.jit(lambda: [(empty_pool(config, batch * ring_pages, page_size, fmt, dtype),
                              empty_pool(config, batch * ring_pages, page_size, fmt, dtype))
                             for _ in range(config.n_layers)])()
    return tuple(TieredCache(k, v, jax.device_put(np.int32(store_id)), i, fmt, mode, slots - ring_pages, impl)
                 for i, (k, v) in enumerate(rings))


def page_bytes(config, page_size: int, fmt: str, dtype) -> int:
    """Device bytes of one page of keys and values for one sequence and layer (side arrays included)."""
    pool = jax.eval_shape(lambda: empty_pool(config, 1, page_size, fmt, jnp.dtype(dtype)))
    return 2 * sum(part.size * part.dtype.itemsize for part in pool)


def build_kv_cache(config, batch: int, max_len: int, *, kv_bits: int = 16, offload: str = "none",
                   device_budget_bytes: int | None = None, mode: str = "near_data",
                   page_size: int = DEFAULT_PAGE_SIZE, disk_path=None, dtype=None, impl: str = "auto") -> tuple:
    """The KV cache `jaxsys generate` asks for: pass it to `Decoder.generate(..., cache=...)`.

    kv_bits 16 (float pages in `dtype`, the model's by default), 8 or 4. `offload`
    "none" keeps every page on the device (an error if they exceed the budget); "host"
    or "disk" keep all pages on the device while they fit `device_budget_bytes`, and
    otherwise the newest pages that fit it, the rest in host memory or in files under
    `disk_path`, attended by `mode` ("near_data" or "fetch").
    """
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {sorted(KV_BITS)}, got {kv_bits}")
    if offload not in ("none", *TIERS):
        raise ValueError(f"unknown KV offload {offload!r}; known: none, {', '.join(TIERS)}")
    fmt = KV_BITS[kv_bits]
    dtype = jnp.dtype(dtype or config.dtype)
    slots = pages_per_sequence(max_len, page_size)
    per_page = config.n_layers * batch * page_bytes(config, page_size, fmt, dtype)
    table_bytes = config.n_layers * (batch * slots * 4 + batch)  # page tables and overflow flags
    if device_budget_bytes is None or slots * per_page + table_bytes <= device_budget_bytes:
        return paged_cache(config, batch, max_len, fmt=fmt, page_size=page_size, dtype=dtype, impl=impl)
    need = f"{max_len} tokens x {batch} sequence(s) of {fmt} KV need {slots * per_page + table_bytes} bytes"
    if offload == "none":
        raise ValueError(f"{need} on the device, over the {device_budget_bytes}-byte budget; raise the budget, "
                         "shorten the context, use fewer KV bits or offload pages (--kv-offload host|disk)")
    ring_pages = (device_budget_bytes - 4 * config.n_layers) // per_page  # each layer also holds its store id
    if ring_pages < 1:
        raise ValueError(f"a {device_budget_bytes}-byte device budget holds no page of {page_size} tokens per "
                         f"sequence and layer ({per_page} bytes for all layers); raise it or lower page_size")
    return tiered_cache(config, batch, max_len, ring_pages=ring_pages, fmt=fmt, tier=offload, mode=mode,
                        page_size=page_size, path=disk_path, dtype=dtype, impl=impl)


def device_kv_bytes(cache) -> int:
    """Bytes of the cache's device arrays (a far tier's pages are not among them)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))


def transfer_bytes(cache) -> dict[str, int]:
    """Bytes that crossed each tier boundary so far (all zero for a device-only cache)."""
    store = store_of(cache)
    return dict(store.bytes) if store is not None else dict.fromkeys(BOUNDARIES, 0)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '2GB', '1.5g', '4096' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 4096, 64MiB, 512MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
