"""Bytes per mesh level of one training step, per strategy, measured from the compiled HLO.

Every strategy and ZeRO++ component on the same model and mesh (default `small`
on `cpu8`, bf16 compute, 8 x 128 tokens per step), counted by `jaxsys.comm`:
ring volumes per device, each collective charged to the outermost level it
spans. Also prints the analytic model's figures beside them and the acceptance
ratios. Prints a markdown table and one JSON line.

    python -m experiments.comm_table [--model small] [--mesh cpu8] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import meshes

VARIANTS = [
    ("ddp", "ddp", {}), ("fsdp (XLA)", "fsdp", {}), ("zero3", "zero3", {}),
    ("zeropp", "zeropp", {}), ("zeropp, no quantization", "zeropp", {"quantized_collectives": False}),
    ("zeropp, hpZ alone", "zeropp", {"hpz": True, "qwz": False, "qgz": False}),
    ("zeropp, qwZ alone", "zeropp", {"hpz": False, "qwz": True, "qgz": False}),
    ("zeropp, qgZ alone", "zeropp", {"hpz": False, "qwz": False, "qgz": True}),
    ("hier", "hier", {}), ("hier, no quantization", "hier", {"quantized_collectives": False}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--mesh", default="cpu8")
    parser.add_argument("--quick", action="store_true", help="the tiny model")
    args = parser.parse_args(argv)
    topology = meshes.load_topology(args.mesh)
    meshes.ensure_host_device_count(topology.num_devices)

    import jax.numpy as jnp

    from jaxsys import comm
    from jaxsys.config import get_preset
    from jaxsys.model import ModelDef
    from jaxsys.sharding.traffic import allreduce_bytes, param_infos, schedule_bytes
    from jaxsys.sharding.zero import ZeroOptions, make_schedule, param_dims
    from jaxsys.train import TrainConfig

    model_name = "tiny" if args.quick else args.model
    config = dataclasses.replace(get_preset(model_name), dtype="bfloat16")
    mesh = meshes.build_mesh(topology)
    shapes = ModelDef(config).shapes
    levels = list(mesh.axis_names)  # outermost first
    rows = []
    for name, strategy, options in VARIANTS:
        tc = TrainConfig(steps=10, batch_size=8, seq_len=128, strategy=strategy, zero=ZeroOptions(**options))
        report = comm.analyze_train_step(config, tc, mesh, topology)
        if strategy in ("zero3", "zeropp", "hier"):
            model = schedule_bytes(make_schedule(strategy, mesh, tc.zero), dict(mesh.shape),
                                   param_infos(shapes, param_dims(shapes, mesh.size)), compute_dtype=config.dtype)
        elif strategy == "ddp":
            model = allreduce_bytes(dict(mesh.shape), config.num_params, jnp.dtype(config.dtype).itemsize)
        else:
            model = None
        rows.append({"variant": name, "strategy": strategy, "options": options,
                     "bytes_per_level": report.bytes_per_level, "analytic_bytes_per_level": model,
                     "mem_bytes_per_device": report.mem_bytes_per_device})
        print(f"  {name}: done", file=sys.stderr)

    by = {r["variant"]: r["bytes_per_level"] for r in rows}
    checks = {
        "zeropp_node_over_zero3": by["zeropp"][levels[0]] / by["zero3"][levels[0]],
        "hier_node_le_zeropp": by["hier"][levels[0]] <= by["zeropp"][levels[0]],
        "hier_gpu_lt_zeropp": by["hier"][levels[1]] < by["zeropp"][levels[1]],
    }
    print(f"{model_name} ({config.num_params / 1e6:.1f}M params) on {topology.name}, bf16 compute, "
          f"8 x 128 tokens per step: MB per device per step, measured from the compiled HLO "
          f"(analytic model in parentheses)")
    print("| strategy | " + " | ".join(levels) + " | memory MB/device |")
    print("|---|" + "---:|" * (len(levels) + 1))
    for r in rows:
        cells = []
        for lvl in levels:
            cell = f"{r['bytes_per_level'][lvl] / 1e6:.2f}"
            if r["analytic_bytes_per_level"] is not None:
                cell += f" ({r['analytic_bytes_per_level'][lvl] / 1e6:.2f})"
            cells.append(cell)
        print(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['mem_bytes_per_device'] / 1e6:.0f} |")
    print(f"zeropp node bytes / zero3 node bytes = {checks['zeropp_node_over_zero3']:.3f}; "
          f"hier node <= zeropp: {checks['hier_node_le_zeropp']}; hier gpu < zeropp: {checks['hier_gpu_lt_zeropp']}")
    print(json.dumps({"experiment": "comm_table", "model": model_name, "mesh": topology.name, "rows": rows,
                      "checks": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
