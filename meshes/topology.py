"""Cluster topologies as data: levels of links, innermost first, read from TOML.

The Frontier low-bandwidth-partitioning paper ("Scaling LLM Training on Frontier with
Low-Bandwidth Partitioning") treats a cluster as three nested levels of links whose
bandwidths differ by an order of magnitude: GCD-GCD inside one MI250X, GPU-GPU inside a
node, node-node over the network. A :class:`Topology` is exactly that list of levels,
each with a size (how many children one parent holds) and a link bandwidth. Everything
else in jaxsys (mesh building, sharding strategies, the communication cost model, the
placement planner) reads these numbers instead of hard-coding "8 GPUs per node".

This module must not import JAX: the CLI reads a preset to decide how many simulated
CPU devices to request *before* JAX starts (see :mod:`meshes.simulate`).

TOML format (levels innermost -> outermost)::

    name = "cpu8"                     # optional, defaults to the file stem
    description = "..."               # optional

    [[levels]]
    name = "gcd"                      # becomes a mesh axis name
    size = 2                          # children per parent at this level
    bandwidth_gbps = 200.0            # GB/s, one direction, per device (see Level)
    latency_us = 5.0                  # optional, per-message start-up cost

    [[nic_groups]]                    # optional, for heterogeneous clusters (Holmes)
    name = "ib-island"
    kind = "infiniband"               # infiniband | roce | ethernet
    nodes = 2                         # consecutive outermost-level entries in this group
    bandwidth_gbps = 25.0             # per device, between nodes of the same fabric
    latency_us = 8.0                  # optional
    fabric = "ib"                     # optional: groups on one fabric share its switches;
                                      # defaults to the kind (all InfiniBand nodes on one fabric)
    peak_bf16_tflops = 312.0          # optional: this group's GPUs, if not the [device]'s

    [[group_links]]                   # how different fabrics reach each other
    kind = "ethernet"
    bandwidth_gbps = 1.5              # per device, one direction, all devices busy
    latency_us = 30.0
    fabrics = ["ib", "roce"]          # optional: this pair only; omitted = any pair without its own

Fabrics that no group link joins reach each other over the outermost level's link.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

NIC_KINDS = ("infiniband", "roce", "ethernet")

_TOP_KEYS = {"name", "description", "levels", "nic_groups", "group_links", "device"}
_DEVICE_KEYS = {"name", "peak_bf16_tflops", "memory_gb"}
_LEVEL_KEYS = {"name", "size", "bandwidth_gbps", "latency_us"}
_NIC_KEYS = {"name", "kind", "nodes", "bandwidth_gbps", "latency_us", "fabric", "peak_bf16_tflops"}
_NIC_REQUIRED = ("bandwidth_gbps", "kind", "name", "nodes")
_LINK_KEYS = {"kind", "bandwidth_gbps", "latency_us", "fabrics"}


def _check_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"{what} name {name!r} must be a non-empty identifier (letters, digits, _), "
            "because it becomes a mesh axis name")


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_positive_number(what: str, value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Level:
    """One level of a cluster's link hierarchy, e.g. the GPUs inside one node.

    Attributes:
      name: the level's name; it is also the name of its jax mesh axis.
      size: how many children one parent holds at this level (e.g. 4 GPUs per node).
        The mesh axis for this level has this length.
      bandwidth_gbps: link bandwidth in GB/s (bytes, not bits), in one direction, that
        *one device* can count on when every device talks across this level at once,
        as in a collective over this mesh axis. For links shared by several devices
        (a node's NICs) that is the shared total divided by the devices sharing it:
        Frontier's 4 x 25 GB/s NICs serve 8 GCDs, so its node level is 12.5 GB/s.
      latency_us: per-message start-up cost in microseconds (the alpha term of an
        alpha-beta cost model). 0.0 means unknown; cost models then use bandwidth only.
    """

    name: str
    size: int
    bandwidth_gbps: float
    latency_us: float = 0.0

    def __post_init__(self):
        _check_name("level", self.name)
        _check_positive_int(f"level {self.name!r} size", self.size)
        _check_positive_number(f"level {self.name!r} bandwidth_gbps", self.bandwidth_gbps)
        if (isinstance(self.latency_us, bool) or not isinstance(self.latency_us, (int, float))
                or not math.isfinite(self.latency_us) or self.latency_us < 0):
            raise ValueError(
                f"level {self.name!r} latency_us must be a number >= 0, got {self.latency_us!r}")
        # TOML writes 200 and 200.0 alike; store floats so equality and printing agree.
        object.__setattr__(self, "bandwidth_gbps", float(self.bandwidth_gbps))
        object.__setattr__(self, "latency_us", float(self.latency_us))


@dataclass(frozen=True)
class NicGroup:
    """A group of nodes that share one kind of network card (Holmes-style clusters).

    The NIC-aware pipeline planner (:mod:`meshes.planner`) reads them: tensor- and
    data-parallel groups stay inside one fabric, only pipeline traffic crosses fabrics.

    Attributes:
      name: the group's name.
      kind: one of ``NIC_KINDS`` ("infiniband", "roce", "ethernet"). Traffic between
        groups of different kinds is slow, so only pipeline traffic should cross them.
      nodes: how many entries of the outermost level (nodes) belong to this group.
        Groups take consecutive node indices in the order they are listed.
      bandwidth_gbps: per-device GB/s, one direction, between nodes of this group's
        fabric (same convention as :attr:`Level.bandwidth_gbps`).
      latency_us: per-message start-up cost on this fabric (0.0: unknown).
      fabric: groups with the same fabric share one switched network; "" (the
        default) means the group's kind, so all InfiniBand groups form one fabric.
      peak_bf16_tflops: the dense bf16 peak of this group's devices; None means the
        topology's ``[device]``.
    """

    name: str
    kind: str
    nodes: int
    bandwidth_gbps: float
    latency_us: float = 0.0
    fabric: str = ""
    peak_bf16_tflops: float | None = None

    def __post_init__(self):
        _check_name("nic group", self.name)
        if self.kind not in NIC_KINDS:
            raise ValueError(
                f"nic group {self.name!r} kind {self.kind!r} is not one of {', '.join(NIC_KINDS)}")
        _check_positive_int(f"nic group {self.name!r} nodes", self.nodes)
        _check_positive_number(f"nic group {self.name!r} bandwidth_gbps", self.bandwidth_gbps)
        _check_latency(f"nic group {self.name!r}", self.latency_us)
        if not isinstance(self.fabric, str):
            raise ValueError(f"nic group {self.name!r} fabric must be a string, got {self.fabric!r}")
        if self.peak_bf16_tflops is not None:
            _check_positive_number(f"nic group {self.name!r} peak_bf16_tflops", self.peak_bf16_tflops)
            object.__setattr__(self, "peak_bf16_tflops", float(self.peak_bf16_tflops))
        object.__setattr__(self, "bandwidth_gbps", float(self.bandwidth_gbps))
        object.__setattr__(self, "latency_us", float(self.latency_us))
        object.__setattr__(self, "fabric", self.fabric or self.kind)


@dataclass(frozen=True)
class GroupLink:
    """The network between nodes of two different fabrics (e.g. Ethernet between IB and RoCE).

    ``fabrics`` names the pair it joins; empty means every pair without an entry of its own.
    Bandwidth and latency follow :class:`Level`'s per-device convention.
    """

    kind: str
    bandwidth_gbps: float
    latency_us: float = 0.0
    fabrics: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in NIC_KINDS:
            raise ValueError(f"group link kind {self.kind!r} is not one of {', '.join(NIC_KINDS)}")
        _check_positive_number("group link bandwidth_gbps", self.bandwidth_gbps)
        _check_latency("group link", self.latency_us)
        fabrics = tuple(self.fabrics)
        if fabrics and (len(fabrics) != 2 or fabrics[0] == fabrics[1]
                        or not all(isinstance(f, str) and f for f in fabrics)):
            raise ValueError(f"group link fabrics must name two different fabrics, got {list(fabrics)}")
        object.__setattr__(self, "fabrics", tuple(sorted(fabrics)))
        object.__setattr__(self, "bandwidth_gbps", float(self.bandwidth_gbps))
        object.__setattr__(self, "latency_us", float(self.latency_us))


def _check_latency(what: str, value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{what} latency_us must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Device:
    """What one device of the topology computes and holds (optional `[device]` table).

    ``peak_bf16_tflops`` is the dense bfloat16 matmul peak from the vendor's data
    sheet; cost models multiply it by an achieved-efficiency assumption.
    """

    name: str
    peak_bf16_tflops: float
    memory_gb: float

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"[device] name must be a non-empty string, got {self.name!r}")
        for key in ("peak_bf16_tflops", "memory_gb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"[device] {key} must be a positive number, got {value!r}")
            object.__setattr__(self, key, float(value))


@dataclass(frozen=True)
class Topology:
    """A cluster as nested levels of links, ``levels`` listed innermost first.

    The jax mesh built from it has one axis per level, ordered *outermost first*
    (``axis_names``), so that consecutive device ids share the innermost level:
    for cpu8 (node=2 x gpu=2 x gcd=2) devices 0 and 1 are the two GCDs of one GPU.
    """

    name: str
    levels: tuple[Level, ...]
    description: str = ""
    nic_groups: tuple[NicGroup, ...] = ()
    device: Device | None = None
    group_links: tuple[GroupLink, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "nic_groups", tuple(self.nic_groups))
        object.__setattr__(self, "group_links", tuple(self.group_links))
        if not self.levels:
            raise ValueError(f"topology {self.name!r} needs at least one level")
        names = [level.name for level in self.levels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"topology {self.name!r} has duplicate level names {duplicates}; "
                "each level becomes a mesh axis and needs its own name")
        group_names = [group.name for group in self.nic_groups]
        if len(set(group_names)) != len(group_names):
            raise ValueError(f"topology {self.name!r} has duplicate nic group names {group_names}")
        if self.nic_groups:
            outer = self.levels[-1]
            grouped = sum(group.nodes for group in self.nic_groups)
            if grouped != outer.size:
                raise ValueError(
                    f"topology {self.name!r}: nic groups cover {grouped} {outer.name}s but the "
                    f"outermost level {outer.name!r} has size {outer.size}; make them agree")
        fabrics = sorted({group.fabric for group in self.nic_groups})
        for link in self.group_links:
            unknown = [f for f in link.fabrics if f not in fabrics]
            if unknown:
                raise ValueError(f"topology {self.name!r}: group link names fabric(s) {unknown} that no nic "
                                 f"group uses; fabrics are {', '.join(fabrics) or 'none'}")

    def fabric_link(self, a: str, b: str) -> GroupLink | None:
        """The group link between fabrics ``a`` and ``b``: its own entry, else the default entry,
        else None (the outermost level's link then applies)."""
        pair = tuple(sorted((a, b)))
        for link in self.group_links:
            if link.fabrics == pair:
                return link
        return next((link for link in self.group_links if not link.fabrics), None)

    def node_group(self, node: int) -> NicGroup | None:
        """The nic group of outermost-level entry ``node`` (None without nic groups)."""
        first = 0
        for group in self.nic_groups:
            if first <= node < first + group.nodes:
                return group
            first += group.nodes
        return None
    @property
    def num_devices(self) -> int:
        return math.prod(level.size for level in self.levels)

    @property
    def level_names(self) -> tuple[str, ...]:
        """Level names, innermost first (the TOML order)."""
        return tuple(level.name for level in self.levels)

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Mesh axis names, outermost first (the jax Mesh order)."""
        return self.level_names[::-1]

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Mesh shape, outermost first, matching ``axis_names``."""
        return tuple(level.size for level in reversed(self.levels))

    def level(self, name: str) -> Level:
        for level in self.levels:
            if level.name == name:
                return level
        raise ValueError(
            f"topology {self.name!r} has no level {name!r}; its levels are "
            f"{', '.join(self.level_names)}")

    def with_size(self, level_name: str, size: int) -> Topology:
        """A copy with one level resized, e.g. ``frontier.with_size("node", 1024)``."""
        self.level(level_name)  # raises a clear error for unknown names
        if self.nic_groups and level_name == self.levels[-1].name:
            raise ValueError(
                f"topology {self.name!r} assigns its {level_name}s to nic groups; resize "
                "the groups in the TOML instead of the outermost level")
        levels = tuple(dataclasses.replace(level, size=size) if level.name == level_name else level
                       for level in self.levels)
        # The preset's description states its sizes; say that they no longer hold.
        note = f"[resized: {level_name}={size}]"
        description = f"{self.description} {note}" if self.description else note
        return dataclasses.replace(self, levels=levels, description=description)


def parse_topology(data: Mapping[str, Any], source: str, default_name: str = "") -> Topology:
    """Builds a Topology from parsed TOML (or any mapping); errors name ``source``."""
    try:
        return _parse(data, default_name)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _tables(data: Mapping[str, Any], key: str, allowed, required, cls) -> list:
    """The ``[[key]]`` blocks of ``data`` as ``cls`` instances (none when the key is absent)."""
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise ValueError(f"'{key}' must be an array of tables ([[{key}]] blocks)")
    out = []
    for index, entry in enumerate(entries):
        where = f"[[{key}]] #{index + 1}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a table")
        _check_keys(where, entry, allowed, required=required)
        out.append(cls(**entry))
    return out


def _parse(data: Mapping[str, Any], default_name: str) -> Topology:
    _check_keys("top-level", data, _TOP_KEYS, required=("levels",))
    if not isinstance(data["levels"], list) or not data["levels"]:
        raise ValueError("'levels' must be a non-empty array of tables ([[levels]] blocks), "
                         "innermost level first")
    levels = _tables(data, "levels", _LEVEL_KEYS, ("name", "size", "bandwidth_gbps"), Level)
    groups = _tables(data, "nic_groups", _NIC_KEYS, _NIC_REQUIRED, NicGroup)
    links = _tables(data, "group_links", _LINK_KEYS, ("bandwidth_gbps", "kind"), GroupLink)
    device = None
    if "device" in data:
        if not isinstance(data["device"], Mapping):
            raise ValueError("[device] must be a table")
        _check_keys("[device]", data["device"], _DEVICE_KEYS, required=tuple(sorted(_DEVICE_KEYS)))
        device = Device(**data["device"])
    name = data.get("name", default_name)
    description = data.get("description", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"'name' must be a non-empty string, got {name!r}")
    if not isinstance(description, str):
        raise ValueError(f"'description' must be a string, got {description!r}")
    return Topology(name=name, levels=tuple(levels), description=description,
                    nic_groups=tuple(groups), device=device, group_links=tuple(links))


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str],
                required: tuple[str, ...]) -> None:
    missing = [key for key in required if key not in table]
    if missing:
        raise ValueError(f"{where} is missing required key(s) {', '.join(missing)}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; "
                         f"allowed keys are {', '.join(sorted(allowed))}")


def _presets_dir():
    return resources.files(__package__).joinpath("presets")


def list_presets() -> list[str]:
    """Names of the bundled presets (``meshes/presets/<name>.toml``), sorted."""
    return sorted(entry.name.removesuffix(".toml") for entry in _presets_dir().iterdir()
                  if entry.name.endswith(".toml"))


def _looks_like_path(name_or_path: str | os.PathLike) -> bool:
    if isinstance(name_or_path, os.PathLike):
        return True
    return name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path


def load_topology(name_or_path: str | os.PathLike) -> Topology:
    """Loads a bundled preset by name (``"cpu8"``) or a TOML file by path.

    A string ending in ``.toml`` or containing a path separator is a path; anything
    else is a preset name. All problems raise ``ValueError`` naming the file.
    """
    if _looks_like_path(name_or_path):
        path = os.fspath(name_or_path)
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except OSError as error:
            raise ValueError(f"cannot read topology file {path}: {error.strerror}; "
                             f"pass an existing TOML file or one of the presets "
                             f"{', '.join(list_presets())}") from None
        default_name = os.path.splitext(os.path.basename(path))[0]
        source = path
    else:
        resource = _presets_dir().joinpath(f"{name_or_path}.toml")
        if not resource.is_file():
            raise ValueError(f"unknown mesh preset {name_or_path!r}; available presets: "
                             f"{', '.join(list_presets())} (or pass a path to a .toml file)")
        raw = resource.read_bytes()
        default_name = name_or_path
        source = str(resource)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: not valid TOML ({error}); "
                         "see meshes/topology.py for the format") from None
    return parse_topology(data, source, default_name=default_name)
