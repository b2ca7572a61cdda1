"""Charging a collective to a mesh level: the outermost axis its groups span, ring bytes and steps.

The rules (which level, what volume each kind sends) are written out in `jaxsys.comm`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxsys.comm.extract import KINDS, Collective


def ring_bytes(kind: str, n: int, operand_bytes: float) -> float:
    """Bytes one device sends for one collective over a group of ``n`` (ring algorithms)."""
    if n <= 1:
        return 0.0
    if kind == "all-gather":
        return (n - 1) * operand_bytes  # = (n-1)/n * result bytes
    if kind in ("reduce-scatter", "all-to-all"):
        return (n - 1) / n * operand_bytes
    if kind == "all-reduce":
        return 2 * (n - 1) / n * operand_bytes
    if kind == "collective-permute":
        return float(operand_bytes)
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")


def ring_steps(kind: str, n: int) -> int:
    if n <= 1:
        return 0
    return {"all-reduce": 2 * (n - 1), "collective-permute": 1}.get(kind, n - 1)


def charge(collective: Collective, axis_names: Sequence[str], mesh_shape: Sequence[int]) -> Collective:
    """Sets level (outermost mesh axis a group spans), group size and bytes per device."""
    num = math.prod(mesh_shape)
    if collective.kind == "collective-permute":
        groups = [list(p) for p in collective.source_target_pairs or []]
    else:
        groups = collective.replica_groups or [list(range(num))]
    if not groups:  # a permute without pairs
        groups = [[0]]
    spanned: set[int] = set()
    for group in groups:
        if any(not 0 <= i < num for i in group):
            raise ValueError(f"{collective.kind} {collective.name} has device ids {group} outside the "
                             f"{num}-device mesh {dict(zip(axis_names, mesh_shape))}; analyze the program "
                             "with the mesh it was compiled for")
        coords = np.array(np.unravel_index(group, tuple(mesh_shape)))  # [axes, group]
        spanned |= {a for a in range(len(mesh_shape)) if len(set(coords[a])) > 1}
    axes = tuple(axis_names[a] for a in sorted(spanned))  # outermost first
    n = 2 if collective.kind == "collective-permute" else max(len(g) for g in groups)
    collective.axes = axes
    collective.level = axes[0] if axes else None
    collective.group_size = n if axes else 1
    collective.bytes_per_device = ring_bytes(collective.kind, n, collective.operand_bytes) if axes else 0.0
    return collective
