"""The collectives of an optimized HLO module: kind, groups, executions per step, bytes sent.

Which ops count and how loops multiply them are the rules of `jaxsys.comm`. The bytes are
at the dtype sent: XLA:CPU runs a bf16/f16 collective in f32 between converts, and with
``narrow_cpu_upcasts`` such a collective is counted at the narrow dtype a GPU or TPU sends.
Nothing is charged to a mesh level here (that needs the mesh): see `jaxsys.comm.levels`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jaxsys.comm.hlo import Instruction, Module, _multiplicities, parse_module, parse_shape
from jaxsys.comm.replica_groups import parse_replica_groups, parse_source_target_pairs

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_NARROW_FLOATS = ("bf16", "f16")
_SHAPE_ONLY_OPS = ("bitcast", "copy", "transpose", "reshape")


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
