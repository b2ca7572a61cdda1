"""`CommReport`: bytes, estimated seconds and collectives per mesh level, and memory per device.

`analyze` compiles a program on abstract inputs and runs the HLO half of the package on
its text; `analyze_train_step` does it for one `Trainer` step. JAX is imported inside
them only, so importing this module does not start it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from jaxsys.comm.extract import Collective, collectives
from jaxsys.comm.levels import charge, ring_steps

if TYPE_CHECKING:
    import jax
    from meshes import Topology


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
