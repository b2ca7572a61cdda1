"""Human-readable view of a topology, printed by ``jaxsys mesh show PRESET``.

Shows the link levels (innermost first), the mesh axes (outermost first) and where each
device index lands in the logical grid, so a reader can check that e.g. devices 0 and 1
are the two GCDs of one MI250X. Pure text, no JAX.
"""
from __future__ import annotations

import itertools
import math

from meshes.topology import Topology

# Past these sizes the grid shows a prefix and says how much it left out.
_MAX_BLOCKS, _SHOWN_BLOCKS = 4, 2
_MAX_ROWS, _SHOWN_ROWS = 16, 8
_MAX_COLUMNS = 16


def _table(rows: list[list[str]], indent: str) -> list[str]:
    """Right-aligned columns (the first left-aligned), one string per row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _levels_table(topology: Topology) -> list[str]:
    rows = [["level", "size", "GB/s per device", "latency us"]]
    for level in topology.levels:
        latency = f"{level.latency_us:g}" if level.latency_us > 0 else "-"
        rows.append([level.name, str(level.size), f"{level.bandwidth_gbps:g}", latency])
    return _table(rows, "  ")


def _grid(topology: Topology) -> list[str]:
    """Device indices laid out row-major over ``axis_names``: blocks x rows x columns."""
    names, shape = topology.axis_names, topology.mesh_shape
    column_name, columns = names[-1], shape[-1]
    row_name, rows = (names[-2], shape[-2]) if len(names) > 1 else ("", 1)
    block_names, block_shape = names[:-2], shape[:-2]
    block_size = rows * columns
    num_blocks = math.prod(block_shape)

    shown_columns = min(columns, _MAX_COLUMNS)
    shown_rows = rows if rows <= _MAX_ROWS else _SHOWN_ROWS
    shown_blocks = num_blocks if num_blocks <= _MAX_BLOCKS else _SHOWN_BLOCKS

    lines = []
    blocks = itertools.product(*(range(size) for size in block_shape))
    for block, block_index in enumerate(itertools.islice(blocks, shown_blocks)):
        indent = "  "
        if block_names:
            lines.append("  " + ", ".join(f"{n} {i}" for n, i in zip(block_names, block_index)) + ":")
            indent = "    "
        header = [""] + [f"{column_name} {c}" for c in range(shown_columns)]
        if shown_columns < columns:
            header.append(f"... {columns - shown_columns} more")
        table = [header]
        for row in range(shown_rows):
            first = block * block_size + row * columns
            cells = [str(first + c) for c in range(shown_columns)]
            table.append([f"{row_name} {row}" if row_name else ""] + cells
                         + ([""] if shown_columns < columns else []))
        lines += _table(table, indent)
        if shown_rows < rows:
            lines.append(f"{indent}... {rows - shown_rows} more {row_name} rows")
    if shown_blocks < num_blocks:
        first_hidden = shown_blocks * block_size
        lines.append(f"  ... {num_blocks - shown_blocks} more {block_names[-1]} blocks "
                     f"(devices {first_hidden}-{topology.num_devices - 1}), laid out the same way")
    return lines


def describe(topology: Topology) -> str:
    """A multi-line description of ``topology``: levels, axes and the device grid."""
    axes = " x ".join(f"{n}={s}" for n, s in zip(topology.axis_names, topology.mesh_shape))
    lines = [f"mesh preset {topology.name}" + (f": {topology.description}" if topology.description else ""),
             "",
             "levels, innermost first (GB/s: one direction, per device, all devices busy):"]
    lines += _levels_table(topology)
    if topology.nic_groups:
        lines += ["", f"nic groups (consecutive {topology.levels[-1].name}s):"]
        rows = [["group", "kind", "fabric", topology.levels[-1].name + "s", "GB/s per device"]]
        rows += [[g.name, g.kind, g.fabric, str(g.nodes), f"{g.bandwidth_gbps:g}"] for g in topology.nic_groups]
        lines += _table(rows, "  ")
    if topology.group_links:
        lines += ["", "links between fabrics:"]
        rows = [["fabrics", "kind", "GB/s per device"]]
        rows += [["/".join(link.fabrics) or "any other pair", link.kind, f"{link.bandwidth_gbps:g}"]
                 for link in topology.group_links]
        lines += _table(rows, "  ")
    lines += ["",
              f"total devices: {topology.num_devices}",
              f"mesh axes, outermost first: {axes}",
              "",
              f"device grid (device index = row-major over {', '.join(topology.axis_names)}):"]
    lines += _grid(topology)
    return "\n".join(lines)
