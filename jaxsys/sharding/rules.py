"""Logical-axis sharding rules: which mesh axes each logical tensor axis uses.

Parameters carry logical axis names (`"vocab"`, `"embed"`, `"heads"`, `"kv_heads"`,
`"head_dim"`, `"mlp"`, `"norm"`); activations are constrained at block boundaries
with their own names (`"batch"`, `"act_seq"`, `"act_embed"`), since a strategy
may shard a parameter's `embed` dimension but not the activations'. A strategy is one small table from those names
to mesh axes (as in jax-llm-examples' llama3 `ShardingRules` and flax gemma's
`MeshRules`); `ShardingRules.spec` turns a tensor's logical axes into a
`PartitionSpec`, checking that no mesh axis is claimed twice in one tensor and
leaving a dimension replicated when the mesh axes do not divide it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = tuple[str, ...]
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class ShardingRules:
    mesh: Mesh
    table: Mapping[str, MeshAxes] = field(default_factory=dict)

    def __post_init__(self):
        for logical, axes in self.table.items():
            missing = [a for a in axes if a not in self.mesh.axis_names]
            if missing:
                raise ValueError(f"rule {logical!r} -> {axes} names mesh axes {missing} "
                                 f"that mesh {self.mesh.axis_names} lacks")

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        return tuple(self.table.get(logical, ())) if logical else ()

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
        """PartitionSpec for a tensor with these logical axes (and, if given, shape)."""
        used: dict[str, str] = {}
        entries = []
        for i, logical in enumerate(logical_axes):
            axes = self.mesh_axes(logical)
            for a in axes:
                if a in used:
                    raise ValueError(f"logical axes {used[a]!r} and {logical!r} both claim mesh axis "
                                     f"{a!r} in {tuple(logical_axes)}; fix the sharding table")
                used[a] = logical
            size = math.prod(self.mesh.shape[a] for a in axes)
            if not axes or (shape is not None and shape[i] % size):
                entries.append(None)  # replicated: nothing to shard, or not divisible
            else:
                entries.append(axes[0] if len(axes) == 1 else axes)
        return P(*entries)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))


def make_rules(strategy: str, mesh: Mesh, *, tensor_parallel: str | None = None) -> ShardingRules:
    """The table of a strategy on a mesh.

    `ddp`: parameters replicated, batch over every mesh axis. `fsdp`: parameters
    and optimizer state sharded along `embed` over every mesh axis (ZeRO-3 as
    XLA's SPMD partitioner schedules it). `tensor_parallel` names one mesh level
    that instead splits attention heads and the MLP hidden dimension (Megatron
    style); the batch and `embed` then use the remaining levels.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    axes = tuple(mesh.axis_names)
    if tensor_parallel is not None and tensor_parallel not in axes:
        raise ValueError(f"tensor-parallel level {tensor_parallel!r} is not a mesh level {axes}")
    data_axes = tuple(a for a in axes if a != tensor_parallel)
    table: dict[str, MeshAxes] = {"batch": data_axes}
    if strategy == "fsdp":
        table["embed"] = data_axes
    if tensor_parallel is not None:
        tp = (tensor_parallel,)
        table.update(heads=tp, kv_heads=tp, mlp=tp)
    return ShardingRules(mesh, table)


# The rules in force while a step function is traced; `constrain` reads them so
# the model needs no sharding arguments and runs unchanged without a mesh.
_ACTIVE: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar("rules", default=None)


@contextlib.contextmanager
def use_rules(rules: ShardingRules | None):
    token = _ACTIVE.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op without rules."""
    rules = _ACTIVE.get()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(logical_axes, x.shape))
