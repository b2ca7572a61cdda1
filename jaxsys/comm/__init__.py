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

The package, in the order a program flows through it: `hlo` (shapes, instructions,
computations, loop counts), `replica_groups` (the three group syntaxes), `extract` (the
collectives of a module and the dtype each sends), `levels` (charging a collective to a mesh
level: ring bytes and steps), `report` (`CommReport`, `analyze`, `analyze_train_step`) and
`cli` (`jaxsys comm`). Everything public is re-exported here.

The HLO half is plain text processing and does not import JAX (`report` and `cli` import it
inside their functions only), so the CLI can add its arguments before JAX starts.
"""

from jaxsys.comm.cli import add_parser, format_report, report_for_args, run
from jaxsys.comm.extract import KINDS, Collective, collectives
from jaxsys.comm.hlo import (
    DTYPE_BYTES,
    Array,
    Instruction,
    Module,
    dtype_bytes,
    parse_module,
    parse_shape,
)
from jaxsys.comm.levels import charge, ring_bytes, ring_steps
from jaxsys.comm.replica_groups import (
    iota_groups,
    mesh_axes_groups,
    parse_replica_groups,
    parse_source_target_pairs,
)
from jaxsys.comm.report import CommReport, analyze, analyze_train_step, memory_figures, summarize

__all__ = ["KINDS", "Collective", "CommReport", "add_parser", "analyze", "analyze_train_step", "charge",
           "collectives", "format_report", "iota_groups", "mesh_axes_groups", "parse_replica_groups",
           "parse_source_target_pairs", "report_for_args", "ring_bytes", "run", "summarize",
           "DTYPE_BYTES", "Array", "Instruction", "Module", "dtype_bytes", "memory_figures",
           "parse_module", "parse_shape", "ring_steps"]
