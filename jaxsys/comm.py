"""Per-level communication accounting: what a compiled step sends over which link.

ZeRO++ and the Frontier low-bandwidth-partitioning paper argue in bytes per level
("ZeRO-3 sends 3M across nodes per step, ZeRO++ 0.75M"); this module measures those
bytes instead of trusting the design. It reads the *optimized* HLO of a compiled program
(``jitted.lower(*args).compile().as_text()``), so it sees what XLA actually runs: the
collectives the SPMD partitioner inserted, the ones a ``shard_map`` asked for, after XLA
combined, split or re-typed them. Unlike profiler-based tools it needs no run and no
accelerator: abstract inputs and the CPU backend are enough.

Rules (each one a choice; the tests pin them):

* Collectives: all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute,
  their ``-start`` forms (the ``-done`` halves are not counted again) and collectives inside
  ``async-start`` wrappers. A collective inside a while loop counts ``known_trip_count``
  times (XLA writes it into the loop's backend_config for scans such as gradient
  accumulation); a loop without one counts once and the report says so in ``notes``.
  Collectives in both branches of a conditional are both counted (an upper bound).
* Device ids: in an SPMD program (``jax.jit`` over a mesh, ``shard_map``) replica groups
  and source-target pairs hold *partition ids*, which are positions in ``mesh.devices.flat``
  (not ``Device.id``). Empty groups ``{}`` mean all devices. The three group syntaxes XLA
  prints are read: explicit lists ``{{0,1},{2,3}}``, iota ``[G,S]<=[dims]T(perm)`` and the
  mesh-axes form ``mesh['a'=2,'b'=4], device_ids=([4,2]T(1,0)) {'b'}`` (sub-axes ``'b':(1)2``).
* Level charged: the mesh axes whose coordinate varies inside a group are the levels the
  group spans; the collective is charged to the OUTERMOST of them, its slowest link (a ring
  over node x gpu x gcd is only as fast as its inter-node hops). Groups of one device move
  nothing. A collective-permute is charged to the outermost level any of its pairs crosses.
* Bytes per device, ring volumes, at the dtype sent, with ``n`` devices per group:
  all-gather ``(n-1)/n * result``; reduce-scatter ``(n-1)/n * operand``; all-reduce
  ``2(n-1)/n * operand``; all-to-all ``(n-1)/n * operand``; collective-permute ``operand``
  (each device sends its buffer once). Tuple (variadic) forms sum their operands.
* The dtype sent: XLA:CPU runs bf16/f16 collectives in f32, between a convert up from bf16
  on the operand and converts back to bf16 on every use of the result. When the program
  runs on CPU (``narrow_cpu_upcasts``) such a collective is counted at bf16, which is what
  a GPU or TPU sends; an f32 collective whose result is used as f32 stays f32. Set it
  False (``jaxsys comm --as-compiled``) to count the f32 the CPU moves.
* Time per level: ``bytes / bandwidth + steps * latency`` with the topology's per-device
  one-direction bandwidth and ``latency_us`` per ring step ((n-1) steps, 2(n-1) for
  all-reduce, 1 for a permute), no overlap between collectives or with compute.
* Memory per device: arguments + outputs not aliased to them + temporaries, from
  ``compiled.memory_analysis()`` (or XLA's peak figure where a backend reports a larger one).

What runs is what XLA made of the program: it may merge a backward re-gather with the
forward gather of the same shards (CSE), hoist a loop-invariant gather out of a
gradient-accumulation loop, combine small all-reduces into one tuple, or add resharding
collectives of its own (printed in the mesh-axes form); the report counts all of them.

This module's HLO half is plain text processing and does not import JAX, so the CLI can
add its arguments before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import jax
    from meshes import Topology

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "token": 0, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}
_NARROW_FLOATS = ("bf16", "f16")
_SHAPE_ONLY_OPS = ("bitcast", "copy", "transpose", "reshape")


def dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}; add it to jaxsys.comm.DTYPE_BYTES")


# ---------------------------------------------------------------------------
# HLO text: instructions, shapes, computations


@dataclass(frozen=True)
class Array:
    """One array of an HLO shape, e.g. ``bf16[8,64]``."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    def nbytes(self, dtype: str | None = None) -> float:
        return self.elements * dtype_bytes(dtype or self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def parse_shape(text: str) -> list[Array]:
    """Leaf arrays of an HLO shape, tuples flattened: ``(f32[2]{0}, s8[4,4])`` -> 2 arrays."""
    text = re.sub(r"/\*.*?\*/", "", text)
    arrays = []
    for dtype, dims in _ARRAY.findall(text):
        sizes = tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip())
        arrays.append(Array(dtype, sizes))
    return arrays


@dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attributes: str
    computation: str
    args: str = ""  # the text between the opcode's parentheses, e.g. "1" of parameter(1)


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, closer = 0, pairs[text[start]]
    opener = text[start]
    for i in range(start, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {opener!r} in HLO line: {text[:200]}")


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclass
class Module:
    by_name: dict[str, Instruction]  # HLO names are unique across a module
    computations: dict[str, list[Instruction]]
    roots: dict[str, str]  # computation -> name of its ROOT instruction
    entry: str

    @property
    def users(self) -> dict[str, list[Instruction]]:
        if not hasattr(self, "_users"):
            self._users: dict[str, list[Instruction]] = {}
            for instruction in self.by_name.values():
                for operand in dict.fromkeys(instruction.operands):
                    self._users.setdefault(operand, []).append(instruction)
        return self._users


def parse_module(hlo_text: str) -> Module:
    """The instructions of an HLO module's text, grouped by computation."""
    by_name: dict[str, Instruction] = {}
    computations: dict[str, list[Instruction]] = {}
    roots: dict[str, str] = {}
    current, entry = None, ""
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        match = _DEF.match(line)
        if match is None or current is None:
            continue
        rest = line[match.end():]
        end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
        shape, rest = rest[:end], rest[end:].lstrip()
        opcode_match = re.match(r"([\w\-]+)\(", rest)
        if opcode_match is None:
            continue
        args_end = _closing(rest, opcode_match.end() - 1)
        operands = re.findall(r"%([\w.\-]+)", rest[opcode_match.end():args_end - 1])
        instruction = Instruction(match.group(1), shape, opcode_match.group(1), operands,
                                  rest[args_end:], current, rest[opcode_match.end():args_end - 1])
        by_name[instruction.name] = instruction
        computations[current].append(instruction)
        if line.lstrip().startswith("ROOT "):
            roots[current] = instruction.name
    if not entry and computations:
        entry = list(computations)[-1]
    return Module(by_name, computations, roots, entry)


_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _called(instruction: Instruction) -> list[tuple[str, int | None]]:
    """(computation, times per execution of ``instruction``; None = unknown loop count)."""
    attrs = instruction.attributes
    if instruction.opcode in ("async-update", "async-done"):
        return []  # the same wrapped computation as its async-start; count it once
    called: list[tuple[str, int | None]] = []
    if instruction.opcode == "while":
        trips = _TRIP_COUNT.search(attrs)
        body = re.search(r"body=%?([\w.\-]+)", attrs)
        if body:
            called.append((body.group(1), int(trips.group(1)) if trips else None))
        return called
    for key in ("calls", "to_apply", "true_computation", "false_computation"):
        for match in re.finditer(rf"\b{key}=%?([\w.\-]+)", attrs):
            called.append((match.group(1), 1))
    branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    if branches:
        called += [(name, 1) for name in re.findall(r"%?([\w.\-]+)", branches.group(1))]
    return called


def _multiplicities(computations: dict[str, list[Instruction]], entry: str) -> tuple[dict[str, int], set[str]]:
    """Executions per step of each computation reachable from ENTRY, and those under unknown loops."""
    callers: dict[str, list[tuple[str, int | None]]] = {}
    for name, instructions in computations.items():
        for instruction in instructions:
            for callee, times in _called(instruction):
                callers.setdefault(callee, []).append((name, times))
    counts: dict[str, int] = {entry: 1}
    unknown: set[str] = set()

    def count(name: str, seen: tuple[str, ...] = ()) -> int:
        if name in counts:
            return counts[name]
        total = 0
        for caller, times in callers.get(name, []):
            if caller in seen:
                continue
            total += count(caller, seen + (name,)) * (1 if times is None else times)
            if times is None or caller in unknown:
                unknown.add(name)
        counts[name] = total
        return total

    for name in computations:
        count(name)
    return counts, unknown


# ---------------------------------------------------------------------------
# Replica groups in the three syntaxes


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


# ---------------------------------------------------------------------------
# Collectives


@dataclass
class Collective:
    """One collective of the program; ``level`` and ``bytes_per_device`` are set by ``charge``."""

    kind: str  # one of KINDS (an async -start counts as its kind)
    name: str
    operand_shapes: list[str]  # e.g. ["f32[1,48,64]"]; tuple (variadic) forms list each
    result_shapes: list[str]
    sent_dtypes: list[str]  # per operand: the dtype on the wire (see narrow_cpu_upcasts)
    operand_bytes: float  # all operands, at the sent dtypes
    result_bytes: float
    replica_groups: list[list[int]] | None  # None: every device in one group
    source_target_pairs: list[tuple[int, int]] | None = None
    count: int = 1  # executions per step (loop trip counts)
    unknown_trip_count: bool = False
    computation: str = ""
    level: str | None = None
    group_size: int = 1
    bytes_per_device: float = 0.0  # per execution
    axes: tuple[str, ...] = ()  # mesh axes its groups span

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "level": self.level, "count": self.count,
                "group_size": self.group_size, "axes": list(self.axes), "operand_shapes": self.operand_shapes,
                "sent_dtypes": self.sent_dtypes, "bytes_per_device": self.bytes_per_device}


def _called_computation(instruction: Instruction) -> str | None:
    called = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
    return called.group(1) if called else None


def _widened_from(module: Module, name: str, depth: int = 0) -> str | None:
    """The narrow float a value was converted up from (``convert(convert(x, bf16), f32)``), if any."""
    instruction = module.by_name.get(name)
    if instruction is None or depth > 12 or not instruction.operands:
        return None
    if instruction.opcode in _SHAPE_ONLY_OPS:
        return _widened_from(module, instruction.operands[0], depth + 1)
    if instruction.opcode == "convert":
        source = module.by_name.get(instruction.operands[0])
        arrays = parse_shape(source.shape) if source else []
        return arrays[0].dtype if len(arrays) == 1 and arrays[0].dtype in _NARROW_FLOATS else None
    if instruction.opcode == "fusion":
        root = module.roots.get(_called_computation(instruction) or "")
        return _widened_from(module, root, depth + 1) if root else None
    return None


def _narrowed_by_all_users(module: Module, name: str, dtype: str, index: int | None = None,
                           depth: int = 0) -> bool:
    """Whether every use of value ``name`` (element ``index`` of a tuple) first converts it to ``dtype``."""
    users = module.users.get(name, [])
    if not users or depth > 12:
        return False
    for user in users:
        if index is not None:  # a tuple: follow the get-tuple-element of our element only
            if user.opcode != "get-tuple-element":
                return False
            if re.search(r"index=(\d+)", user.attributes).group(1) != str(index):
                continue
            ok = _narrowed_by_all_users(module, user.name, dtype, None, depth + 1)
        elif user.opcode == "convert":
            ok = [a.dtype for a in parse_shape(user.shape)] == [dtype]
        elif user.opcode in _SHAPE_ONLY_OPS or user.opcode.endswith("-done"):
            ok = _narrowed_by_all_users(module, user.name, dtype, None, depth + 1)
        elif user.opcode == "fusion":
            inside = module.computations.get(_called_computation(user) or "", [])
            positions = {str(k) for k, operand in enumerate(user.operands) if operand == name}
            params = [i for i in inside if i.opcode == "parameter" and i.args.strip() in positions]
            ok = bool(params) and all(_narrowed_by_all_users(module, p.name, dtype, None, depth + 1)
                                      for p in params)
        else:
            ok = False
        if not ok:
            return False
    return True


def _cpu_upcast(module: Module, collective: Instruction, operand_index: int, operand: str,
                tuple_result: bool) -> str | None:
    """The narrow dtype of a collective that XLA:CPU widened to f32, else None.

    XLA:CPU runs a bf16 collective as convert-to-f32, f32 collective, convert-back: the
    operand comes from a convert out of bf16 and every use of the result converts it to
    bf16 first. A program's own f32 collective of bf16-valued data lacks the second half.
    """
    narrow = _widened_from(module, operand)
    if narrow is None:
        return None
    index = operand_index if tuple_result else None
    return narrow if _narrowed_by_all_users(module, collective.name, narrow, index) else None


def collectives(hlo_text: str, *, narrow_cpu_upcasts: bool = False) -> list[Collective]:
    """Every collective of an optimized HLO module (``compiled.as_text()``), in program order.

    ``count`` is how often it runs per execution of ENTRY. With ``narrow_cpu_upcasts``,
    f32 operands that XLA:CPU widened from bf16/f16 are counted at the narrow dtype.
    Bytes are not charged here (that needs the mesh): see :func:`charge`.
    """
    module = parse_module(hlo_text)
    counts, unknown = _multiplicities(module.computations, module.entry)
    found = []
    for comp_name, instructions in module.computations.items():
        for ins in instructions:
            kind = ins.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            operand_arrays, sent = [], []
            tuple_result = ins.shape.startswith("(") and not ins.opcode.endswith("-start")
            for index, operand in enumerate(ins.operands):
                source = module.by_name.get(operand)
                for array in parse_shape(source.shape) if source else []:
                    narrow = (_cpu_upcast(module, ins, index, operand, tuple_result)
                              if narrow_cpu_upcasts and array.dtype == "f32" else None)
                    operand_arrays.append(array)
                    sent.append(narrow or array.dtype)
            results = parse_shape(ins.shape)
            if ins.opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
                # all-gather-start: (operands, results); collective-permute-start: (in, out, ctx...)
                results = results[len(results) // 2:] if kind == "all-gather" else results[1:2]
            if not operand_arrays:  # operands not defined in this text: infer from the result
                operand_arrays, sent = results, [r.dtype for r in results]
            # Results pair up with operands (the all-to-all tuple form aside): same sent dtype.
            result_sent = sent if len(sent) == len(results) else [r.dtype for r in results]
            found.append(Collective(
                kind=kind, name=ins.name, operand_shapes=[str(a) for a in operand_arrays],
                result_shapes=[str(r) for r in results], sent_dtypes=sent,
                operand_bytes=sum(a.nbytes(d) for a, d in zip(operand_arrays, sent)),
                result_bytes=sum(r.nbytes(d) for r, d in zip(results, result_sent)),
                replica_groups=parse_replica_groups(ins.attributes),
                source_target_pairs=parse_source_target_pairs(ins.attributes),
                count=counts.get(comp_name, 0), unknown_trip_count=comp_name in unknown,
                computation=comp_name))
    return [c for c in found if c.count > 0]


# ---------------------------------------------------------------------------
# Charging bytes to mesh levels


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


# ---------------------------------------------------------------------------
# Reports


@dataclass
class CommReport:
    """Bytes per device per step on each level (innermost first), and what they cost."""

    collectives: list[Collective]
    bytes_per_level: dict[str, float]
    est_comm_s_per_level: dict[str, float]
    collectives_per_level: dict[str, int]  # executions per step
    bytes_by_kind: dict[str, dict[str, float]]  # level -> kind -> bytes
    bandwidth_gbps: dict[str, float | None]
    mem_bytes_per_device: int
    memory: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_collectives: bool = False) -> dict[str, Any]:
        out = {**self.meta, "bytes_per_level": self.bytes_per_level,
               "est_comm_s_per_level": self.est_comm_s_per_level,
               "collectives_per_level": self.collectives_per_level, "bytes_by_kind": self.bytes_by_kind,
               "bandwidth_gbps": self.bandwidth_gbps, "mem_bytes_per_device": self.mem_bytes_per_device,
               "memory": self.memory, "notes": self.notes}
        if with_collectives:
            out["collectives"] = [c.summary() for c in self.collectives]
        return out

    def to_json(self, with_collectives: bool = False) -> str:
        return json.dumps(self.to_dict(with_collectives))


def summarize(found: list[Collective], levels: Sequence[str], topology: Topology | None = None) -> CommReport:
    """Sums charged collectives per level (``levels`` innermost first) and estimates seconds."""
    bytes_per_level = {name: 0.0 for name in levels}
    counts = {name: 0 for name in levels}
    by_kind: dict[str, dict[str, float]] = {name: {} for name in levels}
    bandwidth = {name: getattr(_topology_level(topology, name), "bandwidth_gbps", None) for name in levels}
    seconds = {name: 0.0 if bandwidth[name] else float("nan") for name in levels}  # NaN: level not in topology
    for c in found:
        if c.level is None:
            continue
        volume = c.bytes_per_device * c.count
        bytes_per_level[c.level] += volume
        counts[c.level] += c.count
        by_kind[c.level][c.kind] = by_kind[c.level].get(c.kind, 0.0) + volume
        level = _topology_level(topology, c.level)
        if level is not None:
            seconds[c.level] += (volume / (level.bandwidth_gbps * 1e9)
                                 + c.count * ring_steps(c.kind, c.group_size) * level.latency_us * 1e-6)
    notes = []
    loops = sorted({c.computation for c in found if c.unknown_trip_count})
    if loops:
        notes.append(f"collectives in loops without a known trip count were counted once: {loops}")
    return CommReport(found, bytes_per_level, seconds, counts, by_kind, bandwidth, 0, notes=notes)


def _topology_level(topology, name):
    if topology is None:
        return None
    return next((level for level in topology.levels if level.name == name), None)


def memory_figures(compiled) -> tuple[int, dict[str, int]]:
    """Bytes per device: arguments + outputs not aliased to them + temporaries, or XLA's peak if larger.

    XLA:CPU's ``peak_memory_in_bytes`` leaves out the temporaries (it is about arguments
    + outputs), so the sum is the figure there; the temporaries are the buffer-assigned
    temp allocation, with buffer reuse already in it.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = None
    if stats is None:
        return 0, {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
    figures = {k.removesuffix("_size_in_bytes").removesuffix("_in_bytes"): int(getattr(stats, k, 0) or 0)
               for k in keys}
    live = figures["argument"] + figures["output"] - figures["alias"] + figures["temp"]
    return max(figures["peak_memory"], live), figures


# Compiling only to read the HLO: skip the expensive LLVM work on CPU (it halves compile
# time and leaves the optimized HLO and its memory figures unchanged).
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def analyze(jitted_fn, args: Sequence[Any], mesh: jax.sharding.Mesh, topology: Topology | None = None, *,
            narrow_cpu_upcasts: bool | None = None, compiler_options: dict | None = None) -> CommReport:
    """Compiles ``jitted_fn(*args)`` (arrays or ``jax.ShapeDtypeStruct`` with shardings) and accounts its traffic.

    Levels are the mesh axes (named after the topology's levels); without a topology,
    seconds are NaN. ``narrow_cpu_upcasts`` defaults to True when the mesh is on CPU.
    """
    import jax
    if not hasattr(jitted_fn, "lower"):
        jitted_fn = jax.jit(jitted_fn)
    platform = mesh.devices.flat[0].platform
    if compiler_options is None:
        compiler_options = _CPU_COMPILER_OPTIONS if platform == "cpu" else {}
    compiled = jitted_fn.lower(*args).compile(compiler_options=compiler_options or None)
    if narrow_cpu_upcasts is None:
        narrow_cpu_upcasts = platform == "cpu"
    found = collectives(compiled.as_text(), narrow_cpu_upcasts=narrow_cpu_upcasts)
    axis_names, shape = tuple(mesh.axis_names), tuple(mesh.devices.shape)
    for c in found:
        charge(c, axis_names, shape)
    report = summarize(found, axis_names[::-1], topology)
    report.mem_bytes_per_device, report.memory = memory_figures(compiled)
    report.meta = {"mesh": dict(zip(axis_names, shape)), "platform": platform,
                   "narrow_cpu_upcasts": narrow_cpu_upcasts}
    return report


def analyze_train_step(model_config, train_config, mesh: jax.sharding.Mesh,
                       topology: Topology | None = None, **options) -> CommReport:
    """The report of ``Trainer(model_config, train_config, mesh).step_fn`` on abstract inputs (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from jaxsys.train import Trainer

    trainer = Trainer(model_config, train_config, mesh)

    def abstract(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    state = {"params": abstract(trainer.model.shapes, trainer.param_shardings),
             "opt_state": abstract(trainer.abstract_opt, trainer.opt_shardings)}
    batch = jax.ShapeDtypeStruct((train_config.batch_size, train_config.seq_len + 1), jnp.int32,
                                 sharding=trainer.batch_sharding)
    report = analyze(trainer.step_fn, (state, batch), mesh, topology, **options)
    zero = train_config.zero
    report.meta = {"strategy": train_config.strategy, "dtype": model_config.dtype,
                   "param_dtype": model_config.param_dtype, "num_params": model_config.num_params,
                   "batch_size": train_config.batch_size, "seq_len": train_config.seq_len,
                   "grad_accum": train_config.grad_accum,
                   "quantized_collectives": zero.quantized_collectives,
                   "hpz": zero.hpz, "qwz": zero.qwz, "qgz": zero.qgz, **report.meta}
    return report


# ---------------------------------------------------------------------------
# CLI: `jaxsys comm`


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `comm` to the `jaxsys` sub-commands."""
    from jaxsys.loading import describe_model_arg
    p = subparsers.add_parser("comm", help="bytes per device per step on each mesh level, from the compiled HLO",
                              description="Compiles one train step on abstract inputs and sums the bytes "
                                          "each device sends per step on each level of the mesh.")
    p.add_argument("--model", default="small", help=f"{describe_model_arg()} (default: small)")
    p.add_argument("--mesh", default="cpu8", help="topology preset name or TOML path (default: cpu8)")
    p.add_argument("--strategy", default="fsdp", choices=("ddp", "fsdp", "zero3", "zeropp", "hier"),
                   help="ddp | fsdp (XLA-scheduled) | zero3 | zeropp | hier (explicit schedules); default: fsdp")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: the model's); the dtype the gathers send")
    p.add_argument("--tensor-parallel", default=None, metavar="LEVEL",
                   help="ddp/fsdp only: the level that splits heads and the MLP")
    p.add_argument("--no-quantized-collectives", action="store_true",
                   help="turn every quantized collective of zeropp/hier off")
    for flag, what in (("hpz", "secondary partition inside the node"), ("qwz", "int8 weight all-gather"),
                       ("qgz", "int4 gradient reduce-scatter")):
        p.add_argument(f"--{flag}", default=None, action=argparse.BooleanOptionalAction,
                       help=f"ZeRO++ {what} (default: the strategy's)")
    p.add_argument("--secondary-partition-size", type=int, default=None, metavar="N",
                   help="devices holding one secondary copy (zeropp/hier)")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="microbatches per step")
    p.add_argument("--as-compiled", action="store_true",
                   help="count bf16 collectives that XLA:CPU widens at f32, as the CPU sends them")
    p.add_argument("--collectives", action="store_true", help="also list every collective (stderr, or in --json)")
    p.add_argument("--json", action="store_true", help="print one line of JSON on stdout")
    return p


def report_for_args(args) -> CommReport:
    """The report for parsed `jaxsys comm` arguments (sets the simulated device count first)."""
    import meshes
    topology = meshes.load_topology(args.mesh)
    meshes.ensure_host_device_count(topology.num_devices)  # before JAX starts

    from jaxsys.loading import resolve_config
    from jaxsys.sharding.zero import ZeroOptions
    from jaxsys.train import TrainConfig

    config, _ = resolve_config(args.model)
    if args.dtype:
        config = dataclasses.replace(config, dtype=args.dtype)
    zero = ZeroOptions(hpz=args.hpz, qwz=args.qwz, qgz=args.qgz,
                       quantized_collectives=not args.no_quantized_collectives,
                       secondary_partition_size=args.secondary_partition_size)
    tc = TrainConfig(strategy=args.strategy, batch_size=args.batch_size, seq_len=args.seq_len,
                     grad_accum=args.grad_accum, tensor_parallel=args.tensor_parallel, zero=zero)
    mesh = meshes.build_mesh(topology)
    report = analyze_train_step(config, tc, mesh, topology,
                                narrow_cpu_upcasts=False if args.as_compiled else None)
    report.meta = {"model": args.model, "mesh_preset": topology.name, **report.meta}
    return report


def format_report(report: CommReport) -> str:
    m = report.meta
    lines = [f"{m.get('model', '')} {m.get('strategy', '')} on {m.get('mesh_preset', '')} {m.get('mesh', '')}, "
             f"dtype {m.get('dtype', '?')}: bytes each device sends per step, ring volumes, "
             "each collective charged to the outermost level it spans",
             f"{'level':<8} {'GB/s':>8} {'MB/device/step':>15} {'est. ms':>9} {'collectives':>12}  by kind (MB)"]
    for level, volume in report.bytes_per_level.items():
        bw = report.bandwidth_gbps.get(level)
        kinds = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in sorted(report.bytes_by_kind[level].items()))
        lines.append(f"{level:<8} {bw if bw is not None else float('nan'):>8.1f} {volume / 1e6:>15.3f} "
                     f"{report.est_comm_s_per_level[level] * 1e3:>9.3f} {report.collectives_per_level[level]:>12}"
                     f"  {kinds}")
    lines.append(f"total {sum(report.bytes_per_level.values()) / 1e6:.3f} MB/device/step, est. "
                 f"{sum(report.est_comm_s_per_level.values()) * 1e3:.3f} ms without overlap; "
                 f"memory {report.mem_bytes_per_device / 2**20:.1f} MiB/device")
    if m.get("narrow_cpu_upcasts"):
        lines.append("(bf16 collectives that XLA:CPU widens to f32 are counted at bf16, as a GPU sends them)")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def run(args) -> int:
    """`jaxsys comm`: prints the report (one JSON line with --json)."""
    report = report_for_args(args)
    if args.json:
        print(report.to_json(with_collectives=args.collectives))
        return 0
    print(format_report(report))
    if args.collectives:
        for c in report.collectives:
            print(json.dumps(c.summary()), file=sys.stderr)
    return 0


__all__ = ["KINDS", "Collective", "CommReport", "add_parser", "analyze", "analyze_train_step", "charge",
           "collectives", "format_report", "iota_groups", "mesh_axes_groups", "parse_replica_groups",
           "parse_source_target_pairs", "report_for_args", "ring_bytes", "run", "summarize"]
