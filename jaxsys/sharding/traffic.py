"""Analytic bytes per mesh level of one training step, per strategy.

The same accounting as `jaxsys.comm` applies to the compiled HLO, derived here
from the schedule (`jaxsys.sharding.zero`) and the parameter shapes alone, so it
projects configurations far larger than any machine at hand (`gpt-20b` on 384
Frontier GCDs). Conventions, shared with `jaxsys.comm`:

- bytes are per device per step, counted on the receiving side with ring
  volumes: all-gather (s-1)/s x result, reduce-scatter and all-to-all
  (s-1)/s x operand, all-reduce 2(s-1)/s x operand, for a group of s devices;
- a collective whose group spans several levels is charged to the outermost
  level it spans (its slowest link);
- weights travel in the compute dtype (int8 + one float32 scale per block when
  quantized), gradients in the compute dtype (int4 pairs + float32 scales when
  quantized);
- scalar reductions (loss, gradient norm) are a few bytes and are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import jax.numpy as jnp

from jaxsys.sharding.zero import GRAD_QUANT_BLOCK, QUANT_BLOCK, Schedule, Stage

MeshShape = Mapping[str, int]  # axis name -> size, outermost first


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    dim: int  # split dimension
    in_block: bool  # re-gathered in the backward pass (blocks are recomputed)

    @property
    def rest(self) -> int:
        """Elements per row once the split dimension is moved to the front."""
        return math.prod(self.shape) // self.shape[self.dim]


def charged_level(axes, mesh_shape: MeshShape) -> str:
    """Outermost mesh level among `axes` (mesh_shape lists levels outermost first)."""
    return next(a for a in mesh_shape if a in axes)


def _group(axes, mesh_shape) -> int:
    return math.prod(mesh_shape[a] for a in axes)


def _gather_bytes(rows_before: int, rest: int, stage: Stage, mesh_shape, itemsize: int) -> float:
    """Bytes received by one device in one all-gather stage of one parameter."""
    s = _group(stage.axes, mesh_shape)
    elements = rows_before * rest * (s - 1)
    if not stage.quantized:
        return elements * itemsize
    scales_per_row = rest // math.gcd(rest, QUANT_BLOCK)
    return elements + rows_before * (s - 1) * scales_per_row * 4  # int8 + float32 scales


def _scatter_bytes(rows_before: int, rest: int, stage: Stage, mesh_shape, itemsize: int) -> float:
    s = _group(stage.axes, mesh_shape)
    elements = rows_before * rest
    if not stage.quantized:
        return (s - 1) / s * elements * itemsize
    per_member = elements // s  # all-to-all rows are [group, elements / group]
    scales = per_member // math.gcd(per_member, GRAD_QUANT_BLOCK)
    return (s - 1) / s * s * (per_member / 2 + scales * 4)  # int4 pairs + float32 scales


def schedule_bytes(schedule: Schedule, mesh_shape: MeshShape, params: list[ParamInfo], *,
                   compute_dtype="float32", microbatches: int = 1) -> dict[str, float]:
    """Bytes per device per step on each level under an explicit schedule."""
    itemsize = jnp.dtype(compute_dtype).itemsize
    n = _group(schedule.primary, mesh_shape)
    totals = {level: 0.0 for level in mesh_shape}

    def gathers(p: ParamInfo, stages, held_axes):
        rows = p.shape[p.dim] // n * _group(held_axes, mesh_shape)
        for stage in stages:
            totals[charged_level(stage.axes, mesh_shape)] += _gather_bytes(rows, p.rest, stage, mesh_shape, itemsize)
            rows *= _group(stage.axes, mesh_shape)

    for p in params:
        gathers(p, schedule.forward, ())
        if p.in_block:
            if schedule.secondary is not None:
                gathers(p, schedule.backward, tuple(a for a in schedule.primary if a not in schedule.secondary))
            else:
                gathers(p, schedule.backward, ())
        rows = p.shape[p.dim]
        for stage in schedule.gradient:
            totals[charged_level(stage.axes, mesh_shape)] += _scatter_bytes(rows, p.rest, stage, mesh_shape, itemsize)
            rows //= _group(stage.axes, mesh_shape)
    return {level: b * microbatches for level, b in totals.items()}


def schedule_ring_steps(schedule: Schedule, mesh_shape: MeshShape, params: list[ParamInfo]) -> dict[str, float]:
    """Latency-bound ring steps per level: each collective over s devices takes s - 1 steps,
    each paced by its slowest (charged) link. One collective per parameter and stage (two
    when quantized: values and scales); the backward re-gathers only block parameters."""
    steps = {level: 0.0 for level in mesh_shape}
    for p in params:
        stages = list(schedule.forward) + list(schedule.gradient) + (list(schedule.backward) if p.in_block else [])
        for stage in stages:
            steps[charged_level(stage.axes, mesh_shape)] += (_group(stage.axes, mesh_shape) - 1) * \
                (2 if stage.quantized else 1)
    return steps


def allreduce_bytes(mesh_shape: MeshShape, num_params: int, itemsize: int) -> dict[str, float]:
    """Data parallelism: one all-reduce of every gradient over all devices, charged outermost.

    XLA reduces the gradients in the compute dtype (before the cast to the
    float32 master weights), so `itemsize` is the compute dtype's."""
    n = _group(tuple(mesh_shape), mesh_shape)
    totals = {level: 0.0 for level in mesh_shape}
    totals[next(iter(mesh_shape))] = 2 * (n - 1) / n * num_params * itemsize
    return totals


def param_infos(shapes, dims) -> list[ParamInfo]:
    """ParamInfo for each parameter of a ModelDef (`shapes`) under split dims (`dims`)."""
    import jax
    out = []
    for (path, s), d in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(dims)):
        in_block = any(getattr(k, "key", None) == "layers" for k in path)
        out.append(ParamInfo(tuple(s.shape), d, in_block))
    return out
