"""Replica groups and source-target pairs in the syntaxes XLA prints.

In an SPMD program (``jax.jit`` over a mesh, ``shard_map``) they hold *partition ids*,
positions in ``mesh.devices.flat`` (not ``Device.id``); empty groups ``{}`` mean all
devices. Read: explicit lists ``{{0,1},{2,3}}``, iota ``[G,S]<=[dims]T(perm)`` and the
mesh-axes form ``mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'b'}`` (sub-axes ``'b':(1)2``).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from jaxsys.comm.hlo import _closing


def iota_groups(num_groups: int, group_size: int, dims: Sequence[int],
                perm: Sequence[int] | None = None) -> list[list[int]]:
    """``[G,S]<=[dims]T(perm)``: iota over prod(dims), reshaped to dims, transposed, cut into G rows."""
    ids = np.arange(math.prod(dims)).reshape(tuple(dims))
    if perm is not None:
        ids = ids.transpose(tuple(perm))
    return ids.reshape(num_groups, group_size).tolist()


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _device_array(text: str | None, count: int) -> np.ndarray:
    """``device_ids=(...)`` of the mesh-axes form: absent (iota), ``[dims]T(perm)`` or a list."""
    if text is None:
        return np.arange(count)
    iota = re.fullmatch(r"\s*\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?\s*", text)
    if iota:
        ids = np.arange(count).reshape(tuple(_ints(iota.group(1))))
        if iota.group(2):
            ids = ids.transpose(tuple(_ints(iota.group(2))))
        return ids.reshape(-1)
    return np.array(_ints(text))


def mesh_axes_groups(text: str) -> list[list[int]]:
    """Groups of the mesh-axes form: ``mesh['x'=2,'y'=4], device_ids=(...) {'y'}``.

    The device array (iota or ``device_ids``) has the mesh's shape; each group fixes the
    coordinates of the axes not named and runs over the named (sub-)axes in the order
    named. A sub-axis ``'y':(p)s`` is the factor of size s with p before it inside y.
    """
    mesh = re.match(r"\s*mesh\[([^\]]*)\]", text)
    rest = text[mesh.end():] if mesh else ""
    device_ids = None
    ids = re.match(r"\s*,\s*device_ids=", rest)
    if ids:
        end = _closing(rest, ids.end())
        device_ids, rest = rest[ids.end() + 1:end - 1], rest[end:]
    axes = re.match(r"\s*\{([^}]*)\}", rest)
    if mesh is None or axes is None:
        raise ValueError(f"cannot read mesh-axes replica groups {text[:120]!r}")
    names, sizes = [], []
    for item in mesh.group(1).split(","):
        name, size = item.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    devices = _device_array(device_ids, math.prod(sizes)).reshape(sizes)
    refs: list[tuple[int, int | None, int | None]] = []  # (mesh dim, pre_size, size)
    for item in re.finditer(r"['\"]?([\w.\-]+)['\"]?(?::\((\d+)\)(\d+))?", axes.group(1)):
        if item.group(1) not in names:
            raise ValueError(f"replica group axis {item.group(1)!r} is not in mesh {names}")
        dim = names.index(item.group(1))
        refs.append((dim, int(item.group(2)) if item.group(2) else None,
                     int(item.group(3)) if item.group(3) else None))
    # Split each mesh dim into factors so that every (sub-)axis named is one factor.
    factor_dims: list[int] = []
    where: dict[tuple[int, int | None], int] = {}
    for dim, size in enumerate(sizes):
        subs = sorted(pre for d, pre, _ in refs if d == dim and pre is not None)
        if not subs:
            where[(dim, None)] = len(factor_dims)
            factor_dims.append(size)
            continue
        done = 1
        for pre in subs:
            sub_size = next(s for d, p, s in refs if d == dim and p == pre)
            if pre != done:
                factor_dims.append(pre // done)
            where[(dim, pre)] = len(factor_dims)
            factor_dims.append(sub_size)
            done = pre * sub_size
        if done != size:
            factor_dims.append(size // done)
    grouped = [where[(dim, pre)] for dim, pre, _ in refs]
    order = [i for i in range(len(factor_dims)) if i not in grouped] + grouped
    group_size = math.prod(factor_dims[i] for i in grouped)
    return devices.reshape(factor_dims).transpose(order).reshape(-1, group_size).tolist()


def parse_replica_groups(attributes: str) -> list[list[int]] | None:
    """The groups of one instruction's attributes; None for ``{}`` or no groups (all devices)."""
    start = attributes.find("replica_groups=")
    if start < 0:
        return None
    text = attributes[start + len("replica_groups="):]
    if text.startswith("{"):
        body = text[:_closing(text, 0)]
        groups = [_ints(g) for g in re.findall(r"\{([^{}]*)\}", body[1:-1])]
        return groups or None
    iota = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        perm = _ints(iota.group(4)) if iota.group(4) else None
        return iota_groups(int(iota.group(1)), int(iota.group(2)), _ints(iota.group(3)), perm)
    if text.startswith("mesh["):
        return mesh_axes_groups(text)
    raise ValueError(f"unrecognized replica_groups syntax {text[:120]!r}")


def parse_source_target_pairs(attributes: str) -> list[tuple[int, int]] | None:
    match = re.search(r"source_target_pairs=\{((?:\{[^{}]*\},?)*)\}", attributes)
    if match is None:
        return None
    return [tuple(_ints(pair)) for pair in re.findall(r"\{([^{}]*)\}", match.group(1))]
