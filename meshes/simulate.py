"""Simulated CPU devices, so that multi-device meshes run on a laptop or a CI box.

XLA's CPU client makes as many devices as ``--xla_force_host_platform_device_count``
asks for, but it reads the flag only once, when JAX initializes its backends. So a
command that needs N devices calls :func:`ensure_host_device_count` before running
anything in JAX. The flag only affects the CPU platform, so this is harmless on GPU
machines. This module does not import JAX.
"""
from __future__ import annotations

import os
import re
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"
_COUNT_PATTERN = re.compile(re.escape(_COUNT_FLAG) + r"=(\d+)")


def _with_device_count_flag(xla_flags: str, count: int) -> str:
    """``xla_flags`` asking for at least ``count`` CPU devices; other flags kept."""
    match = _COUNT_PATTERN.search(xla_flags)
    if match is None:
        return f"{xla_flags} {_COUNT_FLAG}={count}".strip()
    if int(match.group(1)) >= count:
        return xla_flags
    return _COUNT_PATTERN.sub(f"{_COUNT_FLAG}={count}", xla_flags)


def _jax_backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: assume too late
        return True


def ensure_host_device_count(count: int) -> bool:
    """Asks XLA for at least ``count`` simulated CPU devices, if it is not too late.

    Appends (or raises) ``--xla_force_host_platform_device_count`` in
    ``os.environ["XLA_FLAGS"]``, keeping the other flags and never lowering a larger
    count already set. ``JAX_NUM_CPU_DEVICES``, which overrides the flag, is raised too
    when set. Works until JAX initializes its backends (importing jax is fine, running
    anything is not); after that it does nothing and :func:`meshes.build_mesh` reports
    the shortfall with instructions.

    Returns:
      True when the next JAX backend start will see at least ``count`` CPU devices;
      False when the backends have already started.
    """
    if count < 1:
        raise ValueError(f"device count must be positive, got {count=}")
    if _jax_backends_started():
        return False
    os.environ["XLA_FLAGS"] = _with_device_count_flag(os.environ.get("XLA_FLAGS", ""), count)
    try:
        cpu_devices = int(os.environ["JAX_NUM_CPU_DEVICES"])
    except (KeyError, ValueError):  # unset (the usual case) or not a number
        cpu_devices = None
    if cpu_devices is not None and 0 <= cpu_devices < count:  # -1 means "use the flag"
        os.environ["JAX_NUM_CPU_DEVICES"] = str(count)
    return True
