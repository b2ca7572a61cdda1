"""Explicit ZeRO-3 schedules over multi-level meshes: `zero3`, `zeropp`, `hier`.

Sources: ZeRO-3 (params, grads and optimizer state partitioned over all
devices; each block all-gathers its weights in the forward pass and again in
the backward pass, then reduce-scatters its gradients: about 3x the model size
per step over the slowest links); ZeRO++ (hpZ: a secondary copy of the weight
shards inside each node, so the backward all-gather stays intra-node; qwZ: int8
block-quantized forward all-gather; qgZ: int4 block-quantized gradients reduced
by all-to-all, first inside the node, then across nodes); and the Frontier
paper's 3-level partitioning (one stage per level, matched to GCD-GCD, GPU-GPU
and inter-node bandwidths).

What runs is what is written here: `loss_and_grads` is one `jax.shard_map`, and
each transformer block is a `custom_vjp` whose forward gathers the block's
weights (stage by stage), whose backward gathers them again from the secondary
partition and recomputes the block (so activations inside a block are not
stored), and reduce-scatters the weight gradients stage by stage. The optimizer
update stays elementwise on the sharded arrays (shared with `ddp`/`fsdp`).

Layout. A parameter is split along one dimension (the first one the device
count divides) into the *primary partition* ordered by the mesh's inner levels,
outer to inner, with the outermost level as the minor factor: on (node, gpu,
gcd) the spec is `P(("gpu", "gcd", "node"))`. Then gathering the outermost level
first yields exactly the contiguous rows that the devices of one node share, the
secondary partition, and gradients reduced inside the node first land on the
right rows. Every stage below reshapes the split dimension into one factor per
mesh axis, so any stage order produces the same layout.

`hier`, this module's 3-level design: forward gathers run outermost level first
(node, then gpu, then gcd), so each level moves more bytes than the one outside
it and the slowest link carries the least; the node stage is int8-quantized.
The secondary partition is what the node stage produced (sharded over the levels
inside a node), so the backward gathers never leave the node, and they run gpu
then gcd. Gradients reduce-scatter innermost first (gcd, gpu, node) so the
volume shrinks before each slower level; the node stage is int4 all-to-all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

EXPLICIT_STRATEGIES = ("zero3", "zeropp", "hier")
QUANT_BLOCK = 256  # elements per float32 scale of int8 weights
GRAD_QUANT_BLOCK = 64  # elements per float32 scale of int4 gradients (coarser blocks cost accuracy)

Axes = tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    axes: Axes  # mesh axes this collective spans (one group per combination of the others)
    quantized: bool = False  # int8 (gathers) or int4 (gradient all-to-all)


@dataclass(frozen=True)
class ZeroOptions:
    """Switches; None means the strategy's default (ZeRO++: all on; hier: quantized node stages)."""

    hpz: bool | None = None
    qwz: bool | None = None
    qgz: bool | None = None
    quantized_collectives: bool = True  # False turns every quantization off
    secondary_partition_size: int | None = None  # devices holding one secondary copy


@dataclass(frozen=True)
class Schedule:
    strategy: str
    mesh_axes: Axes  # outermost first
    primary: Axes  # split order of a parameter's sharded dimension, major to minor
    forward: tuple[Stage, ...]
    secondary: Axes | None  # axes the secondary partition is sharded over (None: no secondary)
    backward: tuple[Stage, ...]  # gathers from the secondary (or primary) partition
    gradient: tuple[Stage, ...]  # reduce-scatter stages


def primary_order(mesh_axes: Axes) -> Axes:
    """Inner levels outer to inner, outermost level last: ("node","gpu","gcd") -> ("gpu","gcd","node")."""
    return tuple(mesh_axes[1:]) + (mesh_axes[0],)


def make_schedule(strategy: str, mesh: Mesh, options: ZeroOptions = ZeroOptions()) -> Schedule:
    axes = tuple(mesh.axis_names)
    if strategy not in EXPLICIT_STRATEGIES:
        raise ValueError(f"unknown explicit strategy {strategy!r}; choose one of {', '.join(EXPLICIT_STRATEGIES)}")
    primary = primary_order(axes)
    if strategy == "zero3":
        flat = (Stage(primary),)
        return Schedule(strategy, axes, primary, flat, None, flat, flat)
    if len(axes) < 2:
        raise ValueError(f"strategy {strategy} needs a mesh with at least two levels (e.g. node and gpu); "
                         f"mesh has {axes}; use zero3 or a multi-level topology such as cpu8")
    quant = options.quantized_collectives
    secondary = _secondary_axes(axes, mesh, options.secondary_partition_size)
    outer = tuple(a for a in primary if a not in secondary)  # levels the secondary copy spans across
    if strategy == "zeropp":
        hpz = True if options.hpz is None else options.hpz
        qwz = quant and (True if options.qwz is None else options.qwz)
        qgz = quant and (True if options.qgz is None else options.qgz)
        forward = (Stage(primary, qwz),)
        backward = (Stage(secondary),) if hpz else (Stage(primary, qwz),)
        gradient = (Stage(secondary, True), Stage(outer, True)) if qgz else (Stage(primary),)
        return Schedule(strategy, axes, primary, forward, secondary if hpz else None, backward, gradient)
    # hier: one stage per level; outer levels first for gathers, inner levels first for gradients.
    by_level_outer_first = list(axes)
    forward = tuple(Stage((a,), quant and a in outer) for a in by_level_outer_first if a in outer) + \
        tuple(Stage((a,)) for a in by_level_outer_first if a in secondary)
    backward = tuple(Stage((a,)) for a in by_level_outer_first if a in secondary)
    gradient = tuple(Stage((a,), quant and a in outer) for a in reversed(by_level_outer_first))
    return Schedule(strategy, axes, primary, forward, secondary, backward, gradient)


def _secondary_axes(axes: Axes, mesh: Mesh, size: int | None) -> Axes:
    """The inner levels that hold one secondary copy: all levels inside the outermost by default."""
    inner = axes[1:]
    if size is None:
        return inner
    options = {math.prod(mesh.shape[a] for a in inner[i:]): inner[i:] for i in range(len(inner))}
    if size not in options:
        per_node = math.prod(mesh.shape[a] for a in inner)
        raise ValueError(f"secondary partition size {size} does not match the levels inside a {axes[0]} "
                         f"({' x '.join(f'{a}={mesh.shape[a]}' for a in inner)}, {per_node} devices); "
                         f"use one of {sorted(options)}")
    return options[size]


# ---------------------------------------------------------------------------
# Parameter layout


def shard_dim(name: str, shape: Sequence[int], devices: int) -> int:
    for d, size in enumerate(shape):
        if size % devices == 0:
            return d
    raise ValueError(f"parameter {name} with shape {tuple(shape)} has no dimension divisible by the {devices} "
                     "devices of the mesh; pick a mesh whose size divides the model dimensions "
                     "(or a model whose dims are multiples of the device count)")


def param_dims(shapes, devices: int):
    """Per-parameter split dimension (a pytree of ints shaped like the params)."""
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    return jax.tree_util.tree_unflatten(
        tree, [shard_dim(jax.tree_util.keystr(path), s.shape, devices) for path, s in flat])


def param_spec(dim: int, ndim: int, primary: Axes) -> P:
    return P(*[primary if d == dim else None for d in range(ndim)])


# ---------------------------------------------------------------------------
# Collectives on the split dimension, which is factored as [*held axes, chunk].


def _sizes(axes: Sequence[str]) -> list[int]:
    return [lax.axis_size(a) for a in axes]


def _factor(x: jax.Array, held: Sequence[str]) -> jax.Array:
    """[rows, rest] -> [*sizes(held), chunk, rest] (held in primary order)."""
    return x.reshape(*_sizes(held), -1, x.shape[-1])


def gather_stage(x: jax.Array, held: Axes, stage_axes: Axes, primary: Axes) -> tuple[jax.Array, Axes]:
    """All-gather rows over `stage_axes`; x: [rows, rest] holding `held`."""
    new_held = tuple(a for a in primary if a in held or a in stage_axes)
    g = lax.all_gather(_factor(x, held), stage_axes, axis=0, tiled=False)  # [prod(stage), *held, chunk, rest]
    g = g.reshape(*_sizes(stage_axes), *g.shape[1:])
    order = list(stage_axes) + list(held)
    g = jnp.transpose(g, [order.index(a) for a in new_held] + list(range(len(order), g.ndim)))
    return g.reshape(-1, x.shape[-1]), new_held


def scatter_stage(x: jax.Array, held: Axes, stage: Stage, block: int) -> tuple[jax.Array, Axes]:
    """Reduce-scatter (sum) rows over `stage.axes`; int4 all-to-all when quantized."""
    rest_held = tuple(a for a in held if a not in stage.axes)
    f = _factor(x, held)
    order = list(held)
    perm = [order.index(a) for a in stage.axes] + [order.index(a) for a in rest_held]
    f = jnp.transpose(f, perm + list(range(len(held), f.ndim)))
    f = f.reshape(math.prod(_sizes(stage.axes)), -1)  # [group, everything else]
    if stage.quantized:
        q, scale = quantize_int4(f, block, stochastic=True)
        q = lax.all_to_all(q, stage.axes, 0, 0, tiled=True)
        scale = lax.all_to_all(scale, stage.axes, 0, 0, tiled=True)
        reduced = dequantize_int4(q, scale, f.dtype).sum(axis=0)
    else:
        reduced = lax.psum_scatter(f, stage.axes, scatter_dimension=0, tiled=False)
    return reduced.reshape(-1, x.shape[-1]), rest_held


def take_rows(x: jax.Array, held: Axes, index_axes: Axes) -> jax.Array:
    """This device's rows along `index_axes` (x holds `held`, which includes them)."""
    f = _factor(x, held)
    for pos, a in reversed(list(enumerate(held))):
        if a in index_axes:
            f = lax.dynamic_index_in_dim(f, lax.axis_index(a), axis=pos, keepdims=False)
    return f.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------
# Block quantization (symmetric, one float32 scale per block of a row)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    b = math.gcd(x.shape[-1], block)
    return x.reshape(*x.shape[:-1], x.shape[-1] // b, b)


def quantize_int8(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    xb = _blocks(x.astype(jnp.float32), block)
    scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 127.0
    q = jnp.round(xb / jnp.where(scale == 0, 1, scale)).astype(jnp.int8)
    return q.reshape(x.shape), scale[..., 0]


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    b = q.shape[-1] // scale.shape[-1]
    return (q.reshape(*scale.shape, b).astype(jnp.float32) * scale[..., None]).reshape(q.shape).astype(dtype)


def quantize_int4(x: jax.Array, block: int, *, stochastic: bool = False) -> tuple[jax.Array, jax.Array]:
    """Two signed 4-bit values per int8 byte (low nibble first) and a scale per block.

    With `stochastic`, values round up with probability equal to their fraction
    (unbiased: E[dequantized] = x), which gradients need; round-to-nearest sends
    every value under half a step to zero, a bias that accumulates over steps.
    The dither is seeded from the tensor itself, so runs stay reproducible.
    """
    xb = _blocks(x.astype(jnp.float32), block)
    scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 7.0
    scaled = xb / jnp.where(scale == 0, 1, scale)
    if stochastic:
        seed = lax.bitcast_convert_type(jnp.sum(xb), jnp.uint32)
        noise = jax.random.uniform(jax.random.fold_in(jax.random.key(0x5EED), seed), scaled.shape)
        rounded = jnp.floor(scaled + noise)
    else:
        rounded = jnp.round(scaled)
    q = jnp.clip(rounded, -8, 7).astype(jnp.int8).reshape(x.shape)
    pairs = q.reshape(*x.shape[:-1], -1, 2)
    packed = (pairs[..., 0] & 0xF) | (pairs[..., 1] << 4)
    return packed.astype(jnp.int8), scale[..., 0]


def dequantize_int4(packed: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    low = (packed << 4) >> 4  # arithmetic shifts sign-extend the nibbles
    high = packed >> 4
    q = jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)
    return dequantize_int8(q, scale, dtype)


# ---------------------------------------------------------------------------
# Gathers and reduce-scatters of one parameter (x moved to [rows, rest])


def _to_rows(x: jax.Array, dim: int) -> tuple[jax.Array, tuple[int, ...]]:
    moved = jnp.moveaxis(x, dim, 0)
    return moved.reshape(moved.shape[0], -1), moved.shape


def _from_rows(rows: jax.Array, moved_shape, dim: int) -> jax.Array:
    return jnp.moveaxis(rows.reshape(-1, *moved_shape[1:]), 0, dim)


def run_gathers(rows: jax.Array, held: Axes, stages: Sequence[Stage], schedule: Schedule,
                keep_secondary: bool) -> tuple[jax.Array, jax.Array | None]:
    """Gathers stage by stage; with `keep_secondary`, also returns this device's secondary partition.

    The secondary partition holds every level outside `schedule.secondary` and is
    sharded over the levels inside: a staged gather meets it on the way, a flat
    gather passes it and slices it out of the full rows.
    """
    secondary = None
    outside = set(schedule.primary) - set(schedule.secondary or ())
    for stage in stages:
        if stage.quantized:
            q, scale = quantize_int8(rows, QUANT_BLOCK)
            q, _ = gather_stage(q, held, stage.axes, schedule.primary)
            scale, held = gather_stage(scale, held, stage.axes, schedule.primary)
            rows = dequantize_int8(q, scale, rows.dtype)
        else:
            rows, held = gather_stage(rows, held, stage.axes, schedule.primary)
        if keep_secondary and secondary is None and set(held) == outside:
            secondary = rows
    if keep_secondary and secondary is None:
        secondary = take_rows(rows, held, schedule.secondary)
    return rows, secondary


def gather_param(x: jax.Array, dim: int, schedule: Schedule, dtype, *, for_backward: bool):
    """Full parameter (and, in the forward pass of a schedule with one, its secondary partition)."""
    rows, moved_shape = _to_rows(x.astype(dtype), dim)
    n = math.prod(lax.axis_size(a) for a in schedule.primary)
    if for_backward and schedule.secondary is not None:  # x is the secondary partition
        held = tuple(a for a in schedule.primary if a not in schedule.secondary)
        n = math.prod(lax.axis_size(a) for a in schedule.secondary)
        full, secondary = run_gathers(rows, held, schedule.backward, schedule, False)
    else:
        stages = schedule.backward if for_backward else schedule.forward
        keep = not for_backward and schedule.secondary is not None
        full, secondary = run_gathers(rows, (), stages, schedule, keep)
    if secondary is not None:
        secondary = _from_rows(secondary, (secondary.shape[0], *moved_shape[1:]), dim)
    return _from_rows(full, (moved_shape[0] * n, *moved_shape[1:]), dim), secondary


def reduce_scatter_param(g: jax.Array, dim: int, schedule: Schedule, out_dtype) -> jax.Array:
    rows, moved_shape = _to_rows(g, dim)
    held = schedule.primary
    for stage in schedule.gradient:
        rows, held = scatter_stage(rows, held, stage, GRAD_QUANT_BLOCK)
    n = math.prod(lax.axis_size(a) for a in schedule.primary)
    return _from_rows(rows, (moved_shape[0] // n, *moved_shape[1:]), dim).astype(out_dtype)


# ---------------------------------------------------------------------------
# The model under a schedule


class ZeroModel:
    """Duck-types `ModelDef.apply` inside the shard_map, gathering weights per block."""

    def __init__(self, model, schedule: Schedule, dims):
        self.model, self.schedule, self.dims, self.config = model, schedule, dims, model.config
        dtype = jnp.dtype(model.config.dtype)
        s = schedule

        def gather_tree(shards, dims, for_backward):
            pairs = jax.tree.map(lambda x, d: gather_param(x, d, s, dtype, for_backward=for_backward), shards, dims)
            is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
            return (jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair),
                    jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair))

        def scatter_tree(grads, dims, like):
            return jax.tree.map(lambda g, d, p: reduce_scatter_param(g, d, s, p.dtype), grads, dims, like)

        outer_dims = {k: v for k, v in dims.items() if k != "layers"}
        block_dims = dims["layers"][0]  # every block has the same shapes, so the same split dims

        @jax.custom_vjp
        def fetch(shards):
            return gather_tree(shards, outer_dims, False)[0]

        def fetch_fwd(shards):
            return fetch(shards), shards

        def fetch_bwd(shards, d_full):
            return (scatter_tree(d_full, outer_dims, shards),)

        fetch.defvjp(fetch_fwd, fetch_bwd)

        @partial(jax.custom_vjp, nondiff_argnums=(0,))
        def block(block_fn, shards, x, positions):
            return block_fn(gather_tree(shards, block_dims, False)[0], x, positions)

        def block_fwd(block_fn, shards, x, positions):
            full, secondary = gather_tree(shards, block_dims, False)
            saved = secondary if s.secondary is not None else shards
            return block_fn(full, x, positions), (saved, shards, x, positions)

        def block_bwd(block_fn, res, dy):
            saved, shards, x, positions = res
            # Tie the re-gather to the incoming gradient: XLA then cannot merge it with the
            # forward gather (which would keep every block's full weights alive through the
            # backward pass) nor hoist it out of the backward pass. `0 * dy` is not folded for
            # floats (NaN semantics), and an optimization barrier does not survive XLA:CPU.
            tie = 0 * dy.reshape(-1)[0]
            saved = jax.tree.map(lambda t: t + tie.astype(t.dtype), saved)
            full, _ = gather_tree(saved, block_dims, True)  # re-gather, then recompute the block
            _, vjp = jax.vjp(lambda p, h: block_fn(p, h, positions), full, x)
            d_full, dx = vjp(dy)
            return scatter_tree(d_full, block_dims, shards), dx, None

        block.defvjp(block_fwd, block_bwd)
        self._fetch, self._block = fetch, block

    def apply(self, params, tokens, positions=None, cache=None):
        if positions is not None or cache is not None:
            raise ValueError("explicit ZeRO schedules are for training; decode with ModelDef.apply")
        logits = self.model.apply_blockwise(params, tokens, fetch_outer=self._fetch, call_block=self._block)
        return logits, None


class ExplicitStrategy:
    """`loss_and_grads` for zero3/zeropp/hier as one shard_map over the whole mesh."""

    def __init__(self, model, mesh: Mesh, schedule: Schedule):
        self.model, self.mesh, self.schedule = model, mesh, schedule
        devices = mesh.size
        self.dims = param_dims(model.shapes, devices)
        self.param_specs = jax.tree.map(lambda s, d: param_spec(d, len(s.shape), schedule.primary),
                                        model.shapes, self.dims)
        self.param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), self.param_specs,
                                            is_leaf=lambda x: isinstance(x, P))
        self.batch_spec = P(tuple(mesh.axis_names), None)
        self.zero_model = ZeroModel(model, schedule, self.dims)

    def loss_and_grads(self, loss_fn: Callable, params, batch):
        axes = tuple(self.mesh.axis_names)
        n = self.mesh.size

        def local(params, batch):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(self.zero_model, p, batch) / n)(params)
            return lax.psum(loss, axes), grads

        return jax.shard_map(local, mesh=self.mesh, in_specs=(self.param_specs, self.batch_spec),
                             out_specs=(P(), self.param_specs), check_vma=False)(params, batch)


__all__ = ["EXPLICIT_STRATEGIES", "ExplicitStrategy", "Schedule", "Stage", "ZeroOptions", "make_schedule"]
