"""Building ``jax.sharding.Mesh`` objects from topologies: one named axis per level.

Axes are ordered outermost first (``Topology.axis_names``) and devices are laid out
row-major, so consecutive devices share the innermost level (the two GCDs of one
MI250X, the GPUs of one node) and, in a multi-process run, the outermost level spans
processes. Axes are ``AxisType.Auto`` (pjit-style sharding, where XLA propagates
shardings), not the ``Explicit`` default of ``jax.make_mesh``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshes.topology import Topology, load_topology


def default_devices() -> list[jax.Device]:
    """All devices, sorted by ``(process_index, id)`` so processes own contiguous blocks."""
    return sorted(jax.devices(), key=lambda device: (device.process_index, device.id))


def build_mesh(topology: Topology | str | os.PathLike,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh for ``topology`` (a Topology, preset name or TOML path).

    Args:
      topology: levels become axes named ``topology.axis_names`` (outermost first) with
        shape ``topology.mesh_shape``.
      devices: devices to lay out row-major; defaults to :func:`default_devices`. If
        there are more than ``topology.num_devices``, the first ones are used (so an
        8-device preset runs on a 16-device host); fewer raise ``ValueError``.
    """
    if not isinstance(topology, Topology):
        topology = load_topology(topology)
    devices = default_devices() if devices is None else list(devices)
    needed = topology.num_devices
    if len(devices) < needed:
        platform = devices[0].platform if devices else "none"
        simulate = (f"set XLA_FLAGS=--xla_force_host_platform_device_count={needed}" if platform == "cpu" else
                    f"run on simulated CPU devices with JAX_PLATFORMS=cpu XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={needed}")
        raise ValueError(
            f"mesh preset {topology.name} needs {needed} devices, found {len(devices)} {platform} device(s); "
            f"{simulate}, or pick a preset or TOML that matches this machine")
    return mesh_for_shape(topology.axis_names, topology.mesh_shape, devices)


def mesh_for_shape(axis_names: Sequence[str], shape: Sequence[int],
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
    """An ad-hoc Auto-typed mesh: the first ``prod(shape)`` devices laid out row-major.

    E.g. ``mesh_for_shape(("node", "gpu", "gcd"), (1, 1, 1))`` is a one-device mesh with
    the same axis names as cpu8, for comparing a sharded run against an unsharded one.
    """
    axis_names, shape = tuple(axis_names), tuple(shape)
    if len(axis_names) != len(shape):
        raise ValueError(f"{axis_names=} and {shape=} must have the same length")
    if any(size < 1 for size in shape):
        raise ValueError(f"mesh {shape=} must be all positive")
    devices = default_devices() if devices is None else list(devices)
    needed = int(np.prod(shape))
    if len(devices) < needed:
        raise ValueError(
            f"mesh of shape {shape} needs {needed} devices, found {len(devices)}; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} (CPU) or use a "
            "smaller shape")
    grid = np.empty(needed, dtype=object)
    grid[:] = devices[:needed]  # object array: np.array(devices) would try to iterate them
    return Mesh(grid.reshape(shape), axis_names, axis_types=(AxisType.Auto,) * len(shape))


def single_device_mesh(axis_names: Sequence[str], device: jax.Device | None = None) -> Mesh:
    """A mesh with every axis of size 1 on one device (the unsharded reference run)."""
    device = default_devices()[0] if device is None else device
    return mesh_for_shape(axis_names, (1,) * len(tuple(axis_names)), [device])
