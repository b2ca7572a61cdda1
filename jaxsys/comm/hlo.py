"""HLO text: the shapes, instructions and computations of an optimized module, and loop counts.

Plain text processing of ``compiled.as_text()``, no JAX. A computation inside a while loop
runs ``known_trip_count`` times per execution of ENTRY (XLA writes it into the loop's
backend_config for scans such as gradient accumulation); under a loop without one it counts
once and is marked unknown, so that the report can say so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "token": 0, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}


def dtype_bytes(dtype: str) -> float:
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    if dtype.startswith("f8"):
        return 1
    raise ValueError(f"unknown HLO element type {dtype!r}; add it to jaxsys.comm.DTYPE_BYTES")


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
