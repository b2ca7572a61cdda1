"""Does quantizing collectives hurt training? Loss curves with and without them.

Trains the same model from the same seed on the embedded corpus without
quantized collectives (one run: unquantized zero3, zeropp and hier compute the
same numbers as ddp, which the tests check to 1e-5) and with them under `zeropp`
(int8 weight gathers, int4 gradient all-to-alls inside and across nodes) and
`hier` (int8 node-level gathers, int4 node-level gradients), and compares the
final loss (mean of the last 10 steps) against the unquantized run. Writes the
curves as a PNG and prints a table and one JSON line.

    python -m experiments.quantized_collectives [--quick] [--steps 300] [--model small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import meshes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 60 steps (a few minutes on 2 cores)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="small")
    parser.add_argument("--mesh", default="cpu8")
    parser.add_argument("--strategies", default="zeropp,hier")
    parser.add_argument("--png", type=Path, default=Path("experiments/results/quantized_collectives.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.steps = "tiny", 60
    topology = meshes.load_topology(args.mesh)
    meshes.ensure_host_device_count(topology.num_devices)

    import jax
    import numpy as np
    from jaxsys.config import get_preset
    from jaxsys.data import TokenDataset, load_documents, load_tokenizer
    from jaxsys.sharding.zero import ZeroOptions
    from jaxsys.train import TrainConfig, train

    mesh = meshes.build_mesh(topology)
    config = get_preset(args.model)
    base = TrainConfig(steps=args.steps, batch_size=8, seq_len=128, learning_rate=3e-3, warmup_steps=10,
                       log_every=50, ckpt_every=10**9)
    data = TokenDataset.from_documents(load_documents("corpus", seed=0), load_tokenizer("byte"),
                                       seq_len=base.seq_len, batch_size=base.batch_size, seed=0)
    curves, rows = {}, []
    runs = [("unquantized", "zeropp", False)] + [(s, s, True) for s in args.strategies.split(",")]
    for name, strategy, quantized in runs:
        tc = dataclasses.replace(base, strategy=strategy, zero=ZeroOptions(quantized_collectives=quantized))
        t = time.perf_counter()
        result = train(config, tc, mesh, data)
        curves[name] = result.losses
        rows.append({"run": name, "strategy": strategy, "quantized": quantized,
                     "final_loss": float(np.mean(result.losses[-10:])), "first_loss": result.losses[0],
                     "seconds": time.perf_counter() - t})
        print(f"  {name}: loss {result.losses[0]:.3f} -> {rows[-1]['final_loss']:.4f}", file=sys.stderr)
    for r in rows:
        r["relative_to_unquantized"] = r["final_loss"] / rows[0]["final_loss"] - 1

    print(f"{args.model} on {topology.name}, {args.steps} steps of {base.batch_size}x{base.seq_len} tokens, "
          f"same seed and data; final loss = mean of the last 10 steps ({jax.device_count()} devices)")
    print(f"{'run':<13}{'collectives':<14}{'first':>8}{'final':>9}{'vs unquantized':>16}{'time s':>8}")
    for r in rows:
        print(f"{r['run']:<13}{'int8/int4' if r['quantized'] else 'full precision':<14}{r['first_loss']:>8.3f}"
              f"{r['final_loss']:>9.4f}{r['relative_to_unquantized']:>+16.2%}{r['seconds']:>8.0f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name, linestyle="-" if name == "unquantized" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.set_title(f"{args.model} on {topology.name}: quantized vs unquantized collectives")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"curves: {args.png}")
    print(json.dumps({"experiment": "quantized_collectives", "model": args.model, "steps": args.steps,
                      "rows": rows, "curves": curves}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
