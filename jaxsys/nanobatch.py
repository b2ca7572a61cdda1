"""One serving step over paged KV, split into nano-batches that do not depend on each other.

NanoFlow (Zhu et al.) splits a running batch into nano-batches so that the compute-,
memory- and network-bound operations of different nano-batches overlap on one device,
and picks the split by a parameter search over a cost model. Here a step is one jitted
program: each nano-batch (a slice of the decode rows, or the prefill lanes) runs the
whole model on its own rows, reading the KV pools as they were before the step, and
only at the end are every nano-batch's new keys and values scattered into the pools.
The nano-batches therefore share nothing but read-only inputs, and XLA is free to
schedule them concurrently (on the CPU runtime, independent thunks run in parallel;
on a GPU, stream annotations where `jax.experimental.compute_on` offers them). What
differs from NanoFlow: the split is per program, not per operation with hand-partitioned
SMs; the overlap is whatever XLA's scheduler finds.

Attention of a nano-batch's tokens is the merge (log-sum-exp, `merge_partials`) of two
disjoint parts: the sequence's earlier tokens, read from its pages, and its new tokens
(causal among themselves). That is why nothing needs the pools written mid-step.

`search_split` is the automatic search: a cost model t(rows) = fixed + per_row * rows
fitted from timed single-batch steps gives every candidate split a predicted time
(serial sum, and the overlapped bound), and the best few are then timed for real.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.kvcache import cpu_kernel
from jaxsys.kvcache.paged import decode_partial, causal_attention, token_pages, write_tokens
from jaxsys.model import MATVEC_QUERIES, ModelDef
from jaxsys.sampling import SamplingParams, sample
from pallas_kernels.quant_attention.reference import merge_partials

_HIGHEST = jax.lax.Precision.HIGHEST


@partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "page_table", "new_k", "new_v", "query"],
         meta_fields=["impl"])
@dataclasses.dataclass(frozen=True)
class StepCache:
    """One layer's view of the pools for one nano-batch: reads pages, keeps its new keys/values aside."""

    k: tuple  # (data,) [kv_heads, num_pages, page_size, head_dim], read-only in the step
    v: tuple
    page_table: jax.Array  # [b, pages_per_sequence], num_pages where no page
    new_k: jax.Array | None = None  # [b, T, kv_heads, head_dim] after `attend`
    new_v: jax.Array | None = None
    query: jax.Array | None = None  # [b, T, H, hd] after `attend` (what a retrieval selection scores pages by)
    impl: str = "auto"

    def attend(self, q, k, v, positions):
        """q [b, T, H, hd], k, v [b, T, kvH, hd] at positions [b, T] (-1 = padding) -> (out f32, cache)."""
        num_pages = self.k[0].shape[1]
        table = jnp.minimum(self.page_table, num_pages - 1)
        start = jnp.maximum(positions[:, 0], 0)  # tokens before the step live in pages
        path = page_attention_path(q.shape[1], q.shape[2] // self.k[0].shape[0], q.dtype, self.k[0].dtype, self.impl)
        if path == "pallas":
            old_out, old_lse = decode_partial(q[:, 0], self.k, self.v, table, start, fmt="float", impl=self.impl)
            old_out, old_lse = old_out[:, None], old_lse[:, None]  # [b, 1, H, hd], [b, 1, H]
        elif path == "cpu_kernel":
            old_out, old_lse = cpu_kernel.paged_attention(q, self.k[0], self.v[0], table, start)
        else:
            old_out, old_lse = scan_attention(q, self.k[0], self.v[0], table, start)
        new_out, new_lse = causal_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), positions, positions)
        out, _ = merge_partials([old_out, new_out], [old_lse, new_lse])
        return out, dataclasses.replace(self, new_k=k, new_v=v, query=q)


def page_attention_path(tokens: int, groups: int, q_dtype, pool_dtype, impl: str = "auto") -> str:
    """What `StepCache.attend` computes rows of `tokens` queries over their pages with: "pallas" (the paged
    decode kernel: GPU, one token), "cpu_kernel" (`jaxsys.kvcache.cpu_kernel`) or "jnp" (`scan_attention`)."""
    if tokens == 1 and jax.default_backend() == "gpu":
        return "pallas"
    if impl != "reference" and cpu_kernel.usable(tokens * groups, q_dtype, pool_dtype):
        return "cpu_kernel"
    return "jnp"


def scan_attention(q, k_pool, v_pool, table, start, pages_per_step: int = 8):
    """Attention of q [b, T, H, hd] over each sequence's keys at positions < start [b], pages at a time.

    An online softmax over blocks of `pages_per_step` pages (FlashDecoding's split-K: a loop
    that stops after the longest sequence's last block), so no sequence's whole context is
    gathered into one array and the work follows the real context, not the table's width.
    Blocks of several pages keep the loop short (8 pages: about 20% faster than one page
    per step for 16 rows at 200 tokens on XLA:CPU). Everything is KV-head-major, as the
    pools and their gathered pages are, so the dots need no transposed copy of the pages.
    With few queries per KV head on CPU (decode rows), the scores are one matrix-vector
    product per query and group (`jaxsys.model.MATVEC_QUERIES`): 16 rows at 150-300 tokens,
    0.6-0.7 ms per layer against 1.0-1.1 for a batched dot of 3 rows (and the batch-major
    layout) before. Pools [kv_heads, num_pages, page_size, hd]. Returns (out [b, T, H, hd],
    lse [b, T, H]) f32. On CPU, `StepCache` hands rows of few queries (decode, verifies) to
    `jaxsys.kvcache.cpu_kernel` instead, which reads the pages in place; this is its reference
    and the prefill lanes' path.
    """
    b, t, h, hd = q.shape
    kv_heads, _, page_size, _ = k_pool.shape
    groups = h // kv_heads
    n = t * groups  # queries per (row, KV head)
    qg = (q.astype(jnp.float32) / math.sqrt(hd)).reshape(b, t, kv_heads, groups, hd)
    qg = qg.transpose(2, 0, 1, 3, 4).reshape(kv_heads, b, n, hd)
    matvecs = n <= MATVEC_QUERIES and jax.default_backend() == "cpu"
    step = min(pages_per_step, table.shape[1])
    table = jnp.pad(table, ((0, 0), (0, -table.shape[1] % step)))  # padding pages are masked below
    width = step * page_size

    def body(i, carry):
        top, total, acc = carry  # [kvH, b, n], [kvH, b, n], [kvH, b, n, hd]
        pages = jax.lax.dynamic_slice_in_dim(table, i * step, step, axis=1)  # [b, step]
        k = k_pool[:, pages].astype(jnp.float32).reshape(kv_heads, b, width, hd)
        v = v_pool[:, pages].astype(jnp.float32).reshape(kv_heads, b, width, hd)
        if matvecs:
            scores = jnp.stack([jnp.einsum("kbd,kbsd->kbs", qg[:, :, j], k, precision=_HIGHEST) for j in range(n)],
                               axis=2)
        else:
            scores = jnp.einsum("kbnd,kbsd->kbns", qg, k, precision=_HIGHEST)
        visible = i * width + jnp.arange(width)[None, :] < start[:, None]  # [b, width]
        scores = jnp.where(visible[None, :, None, :], scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        weights = jnp.exp(scores - safe[..., None])
        rescale = jnp.exp(top - safe)
        acc = acc * rescale[..., None] + jnp.einsum("kbns,kbsd->kbnd", weights, v, precision=_HIGHEST)
        return new_top, total * rescale + jnp.sum(weights, axis=-1), acc

    shape = (kv_heads, b, n)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (hd,)))
    blocks = jnp.minimum((jnp.max(start) + width - 1) // width, table.shape[1] // step)
    top, total, acc = jax.lax.fori_loop(0, blocks, body, init)
    has_keys = total > 0
    out = acc / jnp.where(has_keys, total, 1.0)[..., None]
    lse = jnp.where(has_keys, jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(jnp.where(has_keys, total, 1.0)),
                    -jnp.inf)
    out = out.reshape(kv_heads, b, t, groups, hd).transpose(1, 2, 0, 3, 4).reshape(b, t, h, hd)
    return out, lse.reshape(kv_heads, b, t, groups).transpose(1, 2, 0, 3).reshape(b, t, h)


class Lane(NamedTuple):
    """Rows of one step: tokens [b, T] at positions [b, T] (-1 = padding), sampled at index `select` [b]."""

    tokens: jax.Array
    positions: jax.Array
    page_table: jax.Array  # [b, pages_per_sequence]
    select: jax.Array  # [b] index into T of the token whose next token is sampled
    sampling: SamplingParams


def _slice(lane: Lane, start: int, stop: int) -> Lane:
    return jax.tree.map(lambda x: x[start:stop], lane)


def lane_forward(model: ModelDef, params, pools, lane: Lane, *, filters: bool, impl: str):
    """One nano-batch: the model on its rows -> (next tokens [b], per-layer (new_k, new_v), per-layer queries
    [b, H, hd] of the sampled token, which a retrieval selection scores pages by; unused ones cost nothing)."""
    caches = tuple(StepCache(k, v, lane.page_table, impl=impl) for k, v in pools)
    logits, caches = model.apply(params, lane.tokens, lane.positions, caches, lane.select[:, None])
    position = jnp.take_along_axis(lane.positions, lane.select[:, None], axis=1)[:, 0]
    token = sample(logits[:, 0], lane.sampling, position + 1, filters=filters)
    at = lane.select[:, None, None, None]
    queries = [jnp.take_along_axis(c.query, at, axis=1)[:, 0] for c in caches]
    return token, [(c.new_k, c.new_v) for c in caches], queries


def serving_step(model: ModelDef, params, pools, decode: Lane | None, prefill: Lane | None, *,
                 split: tuple[int, ...], filters: bool, impl: str = "auto", streams: bool = False):
    """Decode rows (cut into nano-batches of sizes `split`) and prefill lanes (one more nano-batch).

    pools: per layer (k, v), each a 1-tuple of float pages, only read. Returns (decode tokens
    [B] or None, prefill tokens [P] or None, writes), `writes` being what `write_step` stores.
    """
    pieces, lanes = [], []
    if decode is not None:
        if sum(split) != decode.tokens.shape[0]:
            raise ValueError(f"nano-batch split {split} must add up to the decode rows {decode.tokens.shape[0]}")
        edges = np.cumsum((0, *split))
        lanes += [_slice(decode, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if prefill is not None:
        lanes.append(prefill)
    for i, lane in enumerate(lanes):
        run = partial(lane_forward, model, params, pools, lane, filters=filters, impl=impl)
        pieces.append(_on_stream(run, i) if streams else run())
    # Every nano-batch's new tokens, flattened to rows of one token, for one scatter per layer.
    positions = jnp.concatenate([lane.positions.reshape(-1, 1) for lane in lanes])
    tables = jnp.concatenate([jnp.repeat(lane.page_table, lane.tokens.shape[1], axis=0) for lane in lanes])
    num_pages, page_size = pools[0][0][0].shape[1:3]
    pages, offsets = token_pages(tables, positions, page_size, num_pages)
    new_kv = []
    for layer in range(len(pools)):
        new_kv.append(tuple(jnp.concatenate([p[1][layer][i].reshape(-1, 1, *p[1][layer][i].shape[2:])
                                             for p in pieces]) for i in (0, 1)))
    tokens = [p[0] for p in pieces]
    decode_tokens = jnp.concatenate(tokens[:len(split)]) if decode is not None else None
    prefill_tokens = tokens[-1] if prefill is not None else None
    return decode_tokens, prefill_tokens, (tuple(new_kv), pages, offsets)


def write_step(pools, writes):
    """Scatter a step's new keys/values into the pools: its own program, so the pools (donated) update in
    place (a program that also reads them would copy every pool)."""
    new_kv, pages, offsets = writes
    return tuple((write_tokens(k, (nk,), pages, offsets), write_tokens(v, (nv,), pages, offsets))
                 for (k, v), (nk, nv) in zip(pools, new_kv))


# XLA:CPU (jax 0.10) hands dots to YNNPACK fusions by default. For the serving step's
# matmuls of 1-32 rows (and the prefill lanes' 128) its Eigen dots ran faster on 2 AVX2
# cores: the `small` model's 16-row decode step 21-25 -> 14-18 ms, 128-token prefill
# 41-54 -> 36-37 ms, 1-row step about the same (each timed alone, alternating runs).
# Batch-1 decoding (`jaxsys.decode`) saw no difference, so only the engine's programs opt out.
_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(ynn_dots: bool = False) -> dict | None:
    """XLA compile options of the engine's step programs: on CPU, YNNPACK dot fusions only if `ynn_dots`.

    None (XLA's defaults) where this XLA has no such option.
    """
    if ynn_dots or jax.default_backend() != "cpu" or not _option_known():
        return None
    return dict(_NO_YNN)


@cache
def _option_known() -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=_NO_YNN)(jnp.zeros(1)).block_until_ready()
        return True
    except jax.errors.JaxRuntimeError:  # "No such compile option" in an XLA without YNNPACK fusions
        return False


def _on_stream(run, index: int):
    """Run a nano-batch on GPU stream `index + 1` where this JAX version offers stream annotations."""
    from jax.experimental.compute_on import compute_on
    with compute_on(f"gpu_stream:{index + 1}"):
        return jax.jit(run)()


def empty_pools(config, num_pages: int, page_size: int, dtype=None) -> tuple:
    """Zeroed float page pools, one (k, v) per layer, built by one compiled program (donation needs it)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.n_kv_heads, num_pages, page_size, config.resolved_head_dim)
    # Committed to the device, as the pools every write step returns: one compiled step serves both.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.jit(lambda: tuple(((jnp.zeros(shape, dtype),), (jnp.zeros(shape, dtype),))
                                 for _ in range(config.n_layers)), out_shardings=device)()


def even_split(rows: int, parts: int, multiple: int = 1) -> tuple[int, ...]:
    """`rows` cut into `parts` near-equal nano-batches, each a multiple of `multiple` where possible."""
    units = rows // multiple
    if parts > units:
        return (rows,)
    sizes = [(units // parts + (i < units % parts)) * multiple for i in range(parts)]
    sizes[-1] += rows - sum(sizes)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Step time of one forward over `rows` decode rows: fixed + per_row * rows (seconds).

    `fixed` is what every forward pays whatever its rows (reading the weights: memory-bound);
    `per_row` what grows with them (matmul work, KV reads). n nano-batches run serially cost
    n * fixed + per_row * rows; perfectly overlapped, max(n * fixed, per_row * rows) plus the
    smaller part scaled by (1 - overlap).
    """

    fixed: float
    per_row: float
    overlap: float = 0.5

    @classmethod
    def fit(cls, rows: list[int], seconds: list[float], overlap: float = 0.5) -> "CostModel":
        slope, intercept = np.polyfit(np.asarray(rows, float), np.asarray(seconds, float), 1)
        return cls(max(float(intercept), 0.0), max(float(slope), 1e-12), overlap)

    def predict(self, split: tuple[int, ...]) -> float:
        memory, compute = len(split) * self.fixed, self.per_row * sum(split)
        return max(memory, compute) + (1 - self.overlap) * min(memory, compute)


def candidate_splits(rows: int, max_parts: int = 4, multiple: int = 1) -> list[tuple[int, ...]]:
    """Even splits into 1..max_parts nano-batches, and two-way uneven ones (1/4 + 3/4)."""
    out = {even_split(rows, n, multiple) for n in range(1, max_parts + 1)}
    quarter = max(multiple, (rows // 4) // multiple * multiple)
    if 0 < quarter < rows:
        out.add((quarter, rows - quarter))
    return sorted(out, key=lambda s: (len(s), s))


def time_call(fn, *, repeats: int = 5) -> float:
    """Median wall seconds of fn() (its result synchronized), after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclasses.dataclass
class SplitSearch:
    """Result of `search_split`: the chosen split, the model, and what was predicted and measured."""

    rows: int
    best: tuple[int, ...]
    cost_model: CostModel
    predicted: dict
    measured: dict

    def speedup(self) -> float:
        return self.measured[(self.rows,)] / self.measured[self.best]


def search_split(measure, rows: int, *, max_parts: int = 4, multiple: int = 1, top: int = 3,
                 fit_rows: tuple[int, ...] | None = None) -> SplitSearch:
    """Pick the nano-batch split of `rows` decode rows.

    `measure(split)` returns the seconds of one step with that split. The cost model is
    fitted from single-batch steps at a few sizes (`fit_rows`), its overlap factor from one
    measured two-way split; the `top` best predicted candidates (and one batch) are then
    measured, and the fastest measured wins.
    """
    fit_rows = fit_rows or tuple(sorted({max(1, rows // 4), max(1, rows // 2), rows}))
    singles = {(r,): measure((r,)) for r in fit_rows}
    model = CostModel.fit([s[0] for s in singles], list(singles.values()))
    measured = {k: v for k, v in singles.items() if k[0] == rows}
    two = even_split(rows, 2, multiple)
    if len(two) == 2:
        measured[two] = measure(two)
        serial = 2 * model.fixed + model.per_row * rows
        best_case = max(2 * model.fixed, model.per_row * rows)
        gap = serial - best_case
        overlap = (serial - measured[two]) / gap if gap > 0 else 0.0
        model = dataclasses.replace(model, overlap=float(np.clip(overlap, 0.0, 1.0)))
    candidates = candidate_splits(rows, max_parts, multiple)
    predicted = {s: model.predict(s) for s in candidates}
    for split in sorted(candidates, key=predicted.get)[:top]:
        if split not in measured:
            measured[split] = measure(split)
    best = min(measured, key=measured.get)
    return SplitSearch(rows, best, model, predicted, measured)


def peak_matmul_flops(size: int = 1024, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large square matmul on the default device (the compute roof)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    mm = jax.jit(lambda x: x @ x)
    seconds = time_call(lambda: mm(a), repeats=5)
    return 2 * size ** 3 / seconds


def decode_flops_per_token(config, context: int) -> float:
    """Forward FLOPs of one decoded token: 2 x matmul params + 4 x layers x context x heads x head_dim."""
    lookup = 0 if config.tie_embeddings else config.vocab_size * config.dim
    norms = config.dim * (2 * config.n_layers + 1)
    matmul_params = config.num_params - norms - lookup
    return 2 * matmul_params + 4 * config.n_layers * context * config.n_heads * config.resolved_head_dim


def optimal_tokens_per_s(config, context: int, peak_flops: float) -> float:
    """NanoFlow's optimal (compute-bound) throughput: peak FLOP/s / FLOPs per decoded token."""
    return peak_flops / decode_flops_per_token(config, context)


def lane_shapes(rows: int, width: int, pages_per_sequence: int) -> Lane:
    """Abstract Lane for compilation ahead of time."""
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    return Lane(i32(rows, width), i32(rows, width), i32(rows, pages_per_sequence), i32(rows),
                SamplingParams(f32(rows), i32(rows), f32(rows), i32(rows)))

