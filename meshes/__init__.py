"""Hardware as data: topology presets (TOML), simulated devices, mesh building.

Importing ``meshes`` does not import JAX, so the CLI can read a preset and set the
simulated device count first; the JAX-side names (``build_mesh`` and friends) load
``meshes.build`` on first use.
"""
from meshes.show import describe
from meshes.simulate import ensure_host_device_count
from meshes.topology import (NIC_KINDS, GroupLink, Level, NicGroup, Topology, list_presets,
                             load_topology, parse_topology)

_BUILD_NAMES = ("build_mesh", "default_devices", "mesh_for_shape", "single_device_mesh")

__all__ = ["NIC_KINDS", "GroupLink", "Level", "NicGroup", "Topology", "describe",
           "ensure_host_device_count", "list_presets", "load_topology", "parse_topology",
           *_BUILD_NAMES]


def __getattr__(name: str):
    if name in _BUILD_NAMES:
        from meshes import build
        return getattr(build, name)
    raise AttributeError(f"module 'meshes' has no attribute {name!r}")
