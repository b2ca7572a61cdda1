"""`jaxsys plan` and the plan behind `jaxsys train --pipeline-stages P`.

Both ask `meshes.planner` (Holmes-style NIC-aware stages) for a device order and a layer
partition; `plan` prints it against the naive order, `train` builds the `(stage, data,
tensor)` mesh from it and runs `jaxsys.pipeline`. Arguments are parsed, and plans made,
without JAX.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("jaxsys.plan")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="plan NIC-aware pipeline stages (Holmes) and compare with the naive device order",
        description="Choose the device order of a (stage, data, tensor) mesh so that tensor- and data-parallel "
                    "groups stay inside one NIC fabric and only pipeline traffic crosses fabrics, choose layers "
                    "per stage from each stage's speed and links, and predict the step time against the naive "
                    "plan (devices in id order: tensor innermost, then data, then pipeline; equal layers).")
    p.add_argument("--mesh", default="hetero-ib-roce", help="topology preset or TOML path (default: hetero-ib-roce)")
    p.add_argument("--model", default="llama3-8b", help="model preset or path (default: llama3-8b)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (inside one node)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: devices / (tp x pp))")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step (default 64)")
    p.add_argument("--microbatch-size", type=int, default=1, help="sequences per pipeline microbatch (default 1)")
    p.add_argument("--mfu", type=float, default=0.45,
                   help="achieved fraction of the bf16 peak assumed for compute (default 0.45)")
    p.add_argument("--json", action="store_true", help="print one line of JSON")


def run(args) -> int:
    import meshes
    from meshes.planner import Assumptions, format_report, plan_report
    from jaxsys.loading import resolve_config

    topology = meshes.load_topology(args.mesh)
    config, _ = resolve_config(args.model)
    dp = args.dp if args.dp is not None else _default_dp(topology.num_devices, args.tp, args.pp)
    assumptions = Assumptions(mfu=args.mfu, seq_len=args.seq_len, global_batch=args.global_batch,
                              microbatch_size=args.microbatch_size)
    report = plan_report(topology, config, args.tp, args.pp, dp, assumptions, model=args.model)
    if args.json:
        print(json.dumps(report.to_dict(), allow_nan=False))
    else:
        print(format_report(report))
    return 0


def _default_dp(devices: int, tp: int, pp: int) -> int:
    if tp < 1 or pp < 1 or devices % (tp * pp):
        raise ValueError(f"--tp {tp} x --pp {pp} does not divide the {devices} devices of the mesh; "
                         "pick degrees whose product divides it (or give --dp)")
    return devices // (tp * pp)


def training_pipeline(topology, config, args):
    """(mesh, PipelineConfig, summary) for `jaxsys train --pipeline-stages P [--tensor-parallel T]`."""
    from meshes.planner import Assumptions, Workload, plan_pipeline
    from jaxsys.pipeline import PipelineConfig, pipeline_mesh

    tensor = 1
    if args.tensor_parallel is not None:
        if not str(args.tensor_parallel).isdigit():
            raise ValueError(f"with --pipeline-stages, --tensor-parallel takes a degree (e.g. 2), not the mesh "
                             f"level {args.tensor_parallel!r}")
        tensor = int(args.tensor_parallel)
    stages = args.pipeline_stages
    data = _default_dp(topology.num_devices, tensor, stages)
    per_replica = args.batch_size // args.grad_accum // data
    if per_replica < 1 or (args.batch_size // args.grad_accum) % data:
        raise ValueError(f"--batch-size {args.batch_size} / --grad-accum {args.grad_accum} does not split over "
                         f"{data} data-parallel replicas ({topology.num_devices} devices / {stages} stages / "
                         f"tensor {tensor}); pick a multiple of {data}")
    microbatches = args.microbatches or per_replica
    if per_replica % microbatches:
        raise ValueError(f"--microbatches {microbatches} must divide the {per_replica} sequences of each "
                         "data-parallel replica")
    assumptions = Assumptions(seq_len=args.seq_len, global_batch=per_replica * data,
                              microbatch_size=per_replica // microbatches)
    plan = plan_pipeline(topology, Workload.from_model(config, args.seq_len), tensor, stages, data, assumptions)
    pipeline = PipelineConfig(plan.layers_per_stage, microbatches)
    summary = {"stages": stages, "data": data, "tensor": tensor, "microbatches": microbatches,
               "layers_per_stage": list(plan.layers_per_stage), "device_grid": plan.device_grid,
               "bubble_fraction": pipeline.bubble_fraction}
    log.info("pipeline plan on %s: layers per stage %s, devices [stage][data][tensor] %s, %d microbatches, "
             "GPipe bubble %.1f%%", topology.name, list(plan.layers_per_stage), plan.device_grid, microbatches,
             100 * pipeline.bubble_fraction)
    return pipeline_mesh(plan.device_grid), pipeline, summary


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--pipeline-stages", type=int, default=1,
                   help="pipeline stages (default 1: none); the plan of `jaxsys plan` picks devices and layers "
                        "per stage, --tensor-parallel then takes a degree, --strategy ddp or zero3 (fsdp runs as "
                        "zero3) runs on the data axis")
    t.add_argument("--microbatches", type=int, default=None,
                   help="pipeline microbatches per step (default: one sequence each)")

