"""NIC-aware pipeline plans (Holmes) on heterogeneous presets: predicted step time against the naive order.

Everything here is an ESTIMATE from `meshes.planner`'s cost model (compute at a
fraction of the bf16 peak, ring collectives per link, GPipe timing, no overlap of
communication with compute), printed with its assumptions. For each preset, model and
(TP, PP, DP) it prints the NIC-aware plan (layers per stage, step time, bubble) next to
the naive plan (devices in id order, tensor innermost, then data, then pipeline, equal
layers). Then Holmes's 4-node example (TP 8 x PP 2 on a 48-layer GPT, which Holmes split
26 layers on InfiniBand / 22 on RoCE), once with the RoCE bandwidth swept and once with
the RoCE nodes' compute speed swept, to show what moves layers between the stages.

    python -m experiments.pipeline_hetero [--quick] [--mfu 0.45] [--global-batch 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import meshes
from jaxsys.config import get_preset
from meshes.planner import Assumptions, plan_report

PRESETS = ("hetero-ib-roce", "two-clusters")
MODELS = ("llama3-8b", "gpt-20b", "gpt-39b")
DEGREES = ((8, 2, 2), (8, 4, 1), (4, 4, 2), (4, 2, 4), (8, 1, 4))  # (tp, pp, dp); the last cannot stay in a fabric
HOLMES_SPLIT = (26, 22)
ROCE_GBPS = (12.5, 6.25, 3.125, 1.56, 0.78)  # down to the Ethernet between the fabrics
ROCE_SPEED = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)  # RoCE nodes' achieved speed relative to the InfiniBand nodes'


def sweep(models, degrees, assumptions):
    rows = []
    for preset in PRESETS:
        topology = meshes.load_topology(preset)
        for model in models:
            for tp, pp, dp in degrees:
                row = {"topology": preset, "model": model, "tp": tp, "pp": pp, "dp": dp}
                try:
                    report = plan_report(topology, get_preset(model), tp, pp, dp, assumptions, model)
                except ValueError as error:
                    rows.append({**row, "impossible": str(error)})
                    continue
                rows.append({**row, "layers_per_stage": list(report.plan.layers_per_stage),
                             "stage_nic_kinds": ["+".join(s.nic_kinds) for s in report.plan.stages],
                             "predicted_step_s": report.plan.step_s, "naive_step_s": report.naive.step_s,
                             "speedup_vs_naive": report.speedup_vs_naive,
                             "bubble_fraction": report.plan.bubble_fraction,
                             "naive_data_groups_crossing_kinds": report.crossings["naive"]["data"],
                             "plan_groups_crossing_kinds": report.crossings["plan"]})
    return rows


def holmes_example(assumptions, field):
    """gpt-39b (48 layers) on hetero-ib-roce, TP 8 x PP 2 x DP 2, one property of the RoCE nodes swept:
    "roce_gbps_per_gpu" (their NIC bandwidth) or "roce_relative_speed" (their achieved compute)."""
    base = meshes.load_topology("hetero-ib-roce")
    rows = []
    for value in ROCE_GBPS if field == "roce_gbps_per_gpu" else ROCE_SPEED:
        change = ({"bandwidth_gbps": value} if field == "roce_gbps_per_gpu" else
                  {"peak_bf16_tflops": value * base.device.peak_bf16_tflops})
        groups = tuple(dataclasses.replace(g, **change) if g.kind == "roce" else g for g in base.nic_groups)
        topology = dataclasses.replace(base, nic_groups=groups)
        report = plan_report(topology, get_preset("gpt-39b"), 8, 2, 2, assumptions, "gpt-39b")
        by_kind = {"+".join(s.nic_kinds): s.layers for s in report.plan.stages}
        rows.append({field: value, "infiniband_layers": by_kind["infiniband"],
                     "roce_layers": by_kind["roce"], "stage_order": ["+".join(s.nic_kinds) for s in report.plan.stages],
                     "predicted_step_s": report.plan.step_s, "naive_step_s": report.naive.step_s,
                     "speedup_vs_naive": report.speedup_vs_naive, "bubble_fraction": report.plan.bubble_fraction})
    return rows


def plot(rows, speed, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "impossible" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    labels = [f"{r['topology'].split('-')[0]}\n{r['model'].removeprefix('llama3-')}\n{r['tp']}x{r['pp']}x{r['dp']}"
              for r in ok]
    xs = range(len(ok))
    left.bar([x - 0.2 for x in xs], [r["naive_step_s"] for r in ok], 0.4, label="naive order, equal layers")
    left.bar([x + 0.2 for x in xs], [r["predicted_step_s"] for r in ok], 0.4, label="NIC-aware plan")
    left.set_xticks(list(xs), labels, fontsize=6)
    left.set_yscale("log")
    left.set_ylabel("predicted step time, s (estimate)")
    left.set_title("TP x PP x DP on heterogeneous presets")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, axis="y")
    relative = [h["roce_relative_speed"] for h in speed]
    right.plot(relative, [h["infiniband_layers"] for h in speed], marker="o", label="InfiniBand stage")
    right.plot(relative, [h["roce_layers"] for h in speed], marker="o", label="RoCE stage")
    right.axhline(HOLMES_SPLIT[0], ls="--", lw=0.8, color="C0")
    right.axhline(HOLMES_SPLIT[1], ls="--", lw=0.8, color="C1")
    right.invert_xaxis()
    right.set_xlabel("RoCE nodes' speed / InfiniBand nodes' speed")
    right.set_ylabel("layers per stage")
    right.set_title("48-layer GPT, TP8 x PP2 x DP2\n(dashed: Holmes's 26 / 22)", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models, three degree triples")
    parser.add_argument("--mfu", type=float, default=Assumptions.mfu)
    parser.add_argument("--global-batch", type=int, default=Assumptions.global_batch)
    parser.add_argument("--png", type=Path, default=Path("experiments/results/pipeline_hetero.png"))
    args = parser.parse_args(argv)
    a = Assumptions(mfu=args.mfu, global_batch=args.global_batch)
    models = MODELS[::2] if args.quick else MODELS
    degrees = DEGREES[:2] + DEGREES[-1:] if args.quick else DEGREES
    rows = sweep(models, degrees, a)
    bandwidth = holmes_example(a, "roce_gbps_per_gpu")
    speed = holmes_example(a, "roce_relative_speed")

    print("ESTIMATES from the planner's cost model, not measurements. Assumptions:")
    print(f"  {a.mfu:.0%} of the bf16 peak, global batch {a.global_batch} x {a.seq_len} tokens, microbatches of "
          f"{a.microbatch_size} sequence, bf16 activations and gradients, GPipe timing, no overlap")
    for preset in PRESETS:
        t = meshes.load_topology(preset)
        groups = ", ".join(f"{g.name} {g.kind} {g.bandwidth_gbps:g} GB/s" for g in t.nic_groups)
        links = ", ".join(f"{'/'.join(k.fabrics) or 'between fabrics'} {k.kind} {k.bandwidth_gbps:g} GB/s"
                          for k in t.group_links)
        print(f"  {preset}: {t.description}; {groups}; {links}")
    print(f"{'topology':<16}{'model':<11}{'TPxPPxDP':>9}  {'layers (stage nic)':<34}{'plan s':>8}{'naive s':>9}"
          f"{'speedup':>9}{'bubble':>8}")
    for r in rows:
        degrees_text = f"{r['tp']}x{r['pp']}x{r['dp']}"
        if "impossible" in r:
            print(f"{r['topology']:<16}{r['model']:<11}{degrees_text:>9}  impossible: {r['impossible'][:70]}...")
            continue
        layers = " ".join(f"{n}({k[:4]})" for n, k in zip(r["layers_per_stage"], r["stage_nic_kinds"]))
        print(f"{r['topology']:<16}{r['model']:<11}{degrees_text:>9}  {layers:<34}{r['predicted_step_s']:>8.2f}"
              f"{r['naive_step_s']:>9.2f}{r['speedup_vs_naive']:>8.2f}x{r['bubble_fraction']:>8.1%}")
    print()
    print("Holmes's 4-node example: gpt-39b (48 layers), TP 8 x PP 2 x DP 2 on hetero-ib-roce, RoCE bandwidth "
          f"swept (Holmes: {HOLMES_SPLIT[0]} InfiniBand / {HOLMES_SPLIT[1]} RoCE)")
    for field, label, sweep_rows in (("roce_gbps_per_gpu", "RoCE GB/s", bandwidth),
                                     ("roce_relative_speed", "RoCE speed", speed)):
        print(f"{label:>11}{'IB layers':>10}{'RoCE layers':>12}{'plan s':>8}{'naive s':>9}{'speedup':>9}")
        for h in sweep_rows:
            print(f"{h[field]:>11g}{h['infiniband_layers']:>10}{h['roce_layers']:>12}"
                  f"{h['predicted_step_s']:>8.2f}{h['naive_step_s']:>9.2f}{h['speedup_vs_naive']:>8.2f}x")
    preset_split = bandwidth[0]
    holmes_like = [h["roce_relative_speed"] for h in speed if h["infiniband_layers"] >= HOLMES_SPLIT[0]]
    print(f"preset split {preset_split['infiniband_layers']}/{preset_split['roce_layers']} (Holmes "
          f"{HOLMES_SPLIT[0]}/{HOLMES_SPLIT[1]}); the planner reaches {HOLMES_SPLIT[0]}+ layers on InfiniBand once the "
          f"RoCE nodes run at {max(holmes_like) if holmes_like else 'below ' + str(min(ROCE_SPEED))} of its speed")
    acceptance = next(r for r in rows if (r["topology"], r["model"], r["tp"], r["pp"], r["dp"]) ==
                      ("hetero-ib-roce", "llama3-8b", 8, 2, 2))
    print(f"hetero-ib-roce llama3-8b TP8 PP2 DP2: plan {acceptance['predicted_step_s']:.3f} s vs naive "
          f"{acceptance['naive_step_s']:.3f} s = {acceptance['predicted_step_s'] / acceptance['naive_step_s']:.2f}x "
          f"the naive step time")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, speed, args.png)
    print(f"plot: {args.png}")
    print(json.dumps({"experiment": "pipeline_hetero", "estimate": True, "assumptions": dataclasses.asdict(a),
                      "holmes_example": {"model": "gpt-39b", "preset_split": [preset_split["infiniband_layers"],
                                                                              preset_split["roce_layers"]],
                                         "holmes_split": list(HOLMES_SPLIT), "roce_bandwidth_sweep": bandwidth,
                                         "roce_speed_sweep": speed},
                      "acceptance": {k: acceptance[k] for k in ("predicted_step_s", "naive_step_s",
                                                                "speedup_vs_naive", "bubble_fraction")},
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
