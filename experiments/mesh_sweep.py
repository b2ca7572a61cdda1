"""Mesh configuration sweep: projected step time, TFLOPS per device and scaling efficiency per strategy.

Everything here is an ESTIMATE from the analytic traffic model
(`jaxsys.sharding.traffic`, checked against compiled HLO on small meshes by the
tests) and a simple step-time model, printed with its assumptions:

    compute  = tokens per device x FLOPs per token x recompute / (peak x efficiency)
    comm     = sum over levels of bytes(level) / bandwidth(level) + latency(level) x ring steps(level)
    step     = compute + (1 - overlap) x comm
    TFLOPS   = tokens per device x FLOPs per token / step   (model FLOPs, recompute not counted)

The explicit schedules recompute each block in the backward pass (8/6 of the
model FLOPs); `ddp` does not. Memory per device counts float32 master weights,
Adam moments and gradients (sharded or not), the secondary partition and one
gathered block; activations are left out.

    python -m experiments.mesh_sweep [--quick] [--efficiency 0.45] [--overlap 0.0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import meshes

STRATEGIES = [("ddp", None), ("zero3", {}), ("zeropp", {}), ("hier", {}),
              ("zeropp-noquant", {"quantized_collectives": False}), ("hier-noquant", {"quantized_collectives": False})]
SWEEPS = [("frontier", "gpt-20b", [1, 2, 4, 8, 16, 32, 48]), ("dgx-h100", "llama3-8b", [1, 2, 4, 8, 16])]


@dataclass(frozen=True)
class Assumptions:
    tokens_per_device: int = 2048  # one 2048-token sequence per device per step
    efficiency: float = 0.45  # achieved fraction of the bf16 matmul peak
    overlap: float = 0.0  # fraction of communication hidden behind compute
    compute_dtype: str = "bfloat16"


def project(topology, model_name: str, strategy: str, options, a: Assumptions) -> dict:
    import jax
    import jax.numpy as jnp
    from jaxsys.config import get_preset
    from jaxsys.sharding.traffic import allreduce_bytes, param_infos, schedule_bytes, schedule_ring_steps
    from jaxsys.sharding.zero import ZeroOptions, make_schedule, param_dims

    config = get_preset(model_name)
    mesh_shape = dict(zip(topology.axis_names, topology.mesh_shape))
    n = topology.num_devices
    params = config.num_params
    device = topology.device
    abstract_mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    if options is None:  # ddp: one all-reduce of the gradients, in the compute dtype as XLA runs it
        per_level = allreduce_bytes(mesh_shape, params, jnp.dtype(a.compute_dtype).itemsize)
        ring_steps = {next(iter(mesh_shape)): 2 * (n - 1)}  # one bucketed ring all-reduce
        recompute, memory = 1.0, 16 * params
    else:
        schedule = make_schedule(strategy.split("-")[0], abstract_mesh, ZeroOptions(**options))
        shapes = _shapes(model_name)
        infos = param_infos(shapes, param_dims(shapes, n))
        per_level = schedule_bytes(schedule, mesh_shape, infos, compute_dtype=a.compute_dtype)
        ring_steps = schedule_ring_steps(schedule, mesh_shape, infos)
        recompute = 8 / 6
        block = sum(math.prod(i.shape) for i in infos if i.in_block) / config.n_layers  # params per block
        secondary = (sum(math.prod(i.shape) for i in infos if i.in_block) * 2 /
                     math.prod(mesh_shape[x] for x in schedule.secondary)) if schedule.secondary else 0
        memory = 12 * params / n + secondary + 2 * 2 * block  # master+moments+grads, secondary, one block + grad
    levels = {lvl.name: lvl for lvl in topology.levels}
    comm_s = {lvl: per_level[lvl] / (levels[lvl].bandwidth_gbps * 1e9) +
              ring_steps.get(lvl, 0) * levels[lvl].latency_us * 1e-6 for lvl in mesh_shape}
    flops = a.tokens_per_device * config.flops_per_token(a.tokens_per_device)
    compute_s = flops * recompute / (device.peak_bf16_tflops * 1e12 * a.efficiency)
    step_s = compute_s + (1 - a.overlap) * sum(comm_s.values())
    return {"topology": topology.name, "devices": n, "nodes": topology.mesh_shape[0], "model": model_name,
            "strategy": strategy, "bytes_per_level": per_level, "comm_s_per_level": comm_s,
            "compute_s": compute_s, "step_s": step_s, "tflops_per_device": flops / step_s / 1e12,
            "mem_gb_per_device": memory / 1e9, "fits": memory / 1e9 <= device.memory_gb}


_SHAPES: dict[str, object] = {}


def _shapes(model_name):
    if model_name not in _SHAPES:
        from jaxsys.config import get_preset
        from jaxsys.model import ModelDef
        _SHAPES[model_name] = ModelDef(get_preset(model_name)).shapes
    return _SHAPES[model_name]


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = sorted({(r["topology"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4), squeeze=False)
    for ax, (topo, model) in zip(axes[0], sweeps):
        for strategy, _ in STRATEGIES:
            pts = [(r["devices"], r["tflops_per_device"]) for r in rows
                   if (r["topology"], r["model"], r["strategy"]) == (topo, model, strategy)]
            ax.plot(*zip(*pts), marker="o", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel("estimated TFLOPS per device")
        ax.set_title(f"{model} on {topo} (estimate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer node counts")
    parser.add_argument("--tokens-per-device", type=int, default=Assumptions.tokens_per_device)
    parser.add_argument("--efficiency", type=float, default=Assumptions.efficiency)
    parser.add_argument("--overlap", type=float, default=Assumptions.overlap)
    parser.add_argument("--png", type=Path, default=Path("experiments/results/mesh_sweep.png"))
    args = parser.parse_args(argv)
    a = Assumptions(args.tokens_per_device, args.efficiency, args.overlap)

    rows = []
    for preset, model, node_counts in SWEEPS:
        base = meshes.load_topology(preset)
        for nodes in ([1, node_counts[-1]] if args.quick else node_counts):
            topology = base.with_size(base.levels[-1].name, nodes)
            rows += [project(topology, model, s, o, a) for s, o in STRATEGIES]
    for r in rows:  # weak scaling against the same strategy on one node
        one = next(x for x in rows if (x["topology"], x["model"], x["strategy"], x["nodes"]) ==
                   (r["topology"], r["model"], r["strategy"], 1))
        r["scaling_efficiency"] = r["tflops_per_device"] / one["tflops_per_device"]

    print("ESTIMATES from the analytic traffic model, not measurements. Assumptions:")
    print(f"  {a.tokens_per_device} tokens per device per step, {a.efficiency:.0%} of the bf16 peak achieved, "
          f"{a.overlap:.0%} of communication overlapped, weights/gradients sent in {a.compute_dtype}")
    for preset, _, _ in SWEEPS:
        t = meshes.load_topology(preset)
        links = ", ".join(f"{lvl.name} {lvl.bandwidth_gbps:g} GB/s {lvl.latency_us:g} us" for lvl in t.levels)
        print(f"  {preset}: {t.device.name} {t.device.peak_bf16_tflops:g} TFLOP/s, {t.device.memory_gb:g} GB; {links}")
    header = f"{'topology':<10}{'model':<10}{'devices':>8}  {'strategy':<16}{'node GB':>9}{'step s':>8}" \
             f"{'TFLOPS/dev':>11}{'scaling':>9}{'mem GB':>8}"
    print(header)
    for r in rows:
        node_gb = r["bytes_per_level"][next(iter(r["bytes_per_level"]))] / 1e9
        print(f"{r['topology']:<10}{r['model']:<10}{r['devices']:>8}  {r['strategy']:<16}{node_gb:>9.2f}"
              f"{r['step_s']:>8.2f}{r['tflops_per_device']:>11.1f}{r['scaling_efficiency']:>9.2f}"
              f"{r['mem_gb_per_device']:>8.1f}{'' if r['fits'] else '  (does not fit)'}")

    def at(topo, devices, strategy):
        return next(r for r in rows if (r["topology"], r["devices"], r["strategy"]) == (topo, devices, strategy))

    largest = max(r["devices"] for r in rows if r["topology"] == "frontier")
    ratio = at("frontier", largest, "hier")["tflops_per_device"] / at("frontier", largest, "zeropp")["tflops_per_device"]
    print(f"frontier gpt-20b at {largest} GCDs: hier / zeropp TFLOPS per GCD = {ratio:.2f} (estimate; paper measured 1.71)")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.png)
    print(f"plot: {args.png}")
    print(json.dumps({"experiment": "mesh_sweep", "estimate": True, "assumptions": a.__dict__,
                      "hier_over_zeropp_frontier": ratio, "frontier_devices": largest, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
