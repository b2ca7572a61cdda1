"""`jaxsys comm`: the report of one train step for a model, mesh preset and strategy.

`add_parser` needs no JAX; `report_for_args` sets the simulated device count before JAX
starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from jaxsys.comm.report import CommReport, analyze_train_step


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
