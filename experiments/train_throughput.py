"""Training throughput of `small`: tokens/s and the fraction of the machine's matmul peak.

The peak is measured in the same run: a large jitted float32 matmul, once on one
device and once sharded over every device of the mesh (on a CPU the simulated
devices share the same cores, so the better of the two is the machine's peak).
Model FLOPs per token follow the PaLM accounting, 6 * params (non-embedding
matmuls, forward and backward) + 12 * layers * seq_len * dim (attention scores
and values), so the fraction is a model-FLOPs utilisation (MFU).

    python -m experiments.train_throughput [--quick] [--mesh cpu8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import meshes


def matmul_peak(mesh, n: int, repeats: int) -> dict[str, float]:
    """Measured float32 matmul FLOP/s on one device and sharded over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    def timed(fn, *args):
        fn(*args).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    single = timed(jax.jit(jnp.dot), a, b)
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names), None))
    a_sharded, b_rep = jax.device_put(a, rows), jax.device_put(b, NamedSharding(mesh, P()))
    sharded = timed(jax.jit(jnp.dot, out_shardings=rows), a_sharded, b_rep)
    return {"single_device": single, "sharded": sharded, "peak": max(single, sharded)}


def measure(config, tc, mesh, steps: int) -> float:
    """Steady-state tokens/s of the jitted train step (compile and first step excluded)."""
    import numpy as np
    from jaxsys.train import Trainer

    trainer = Trainer(config, tc, mesh)
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batches = [trainer.put_batch(rng.integers(0, 259, (tc.batch_size, tc.seq_len + 1), dtype=np.int32))
               for _ in range(2)]
    state, metrics = trainer.step_fn(state, batches[0])
    float(metrics["loss"])
    t = time.perf_counter()
    for step in range(steps):
        state, metrics = trainer.step_fn(state, batches[step % 2])
    float(metrics["loss"])  # waits for the last step
    return steps * tc.batch_size * tc.seq_len / (time.perf_counter() - t)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute on 2 cores)")
    parser.add_argument("--mesh", default="cpu8")
    parser.add_argument("--model", default="small")
    args = parser.parse_args(argv)
    topology = meshes.load_topology(args.mesh)
    meshes.ensure_host_device_count(topology.num_devices)

    import jax
    from jaxsys.config import default_compute_dtype, get_preset
    from jaxsys.train import TrainConfig

    config = dataclasses.replace(get_preset(args.model), dtype=default_compute_dtype(jax.default_backend()))
    steps = 3 if args.quick else 10
    mesh = meshes.build_mesh(topology)
    one = meshes.mesh_for_shape(topology.axis_names, (1,) * len(topology.axis_names), devices=jax.devices()[:1])
    peak = matmul_peak(mesh, n=1024 if args.quick else 2048, repeats=3 if args.quick else 5)
    flops_per_token = config.flops_per_token(128)

    runs = [("1 device", "fsdp", one), (f"{topology.name} ddp", "ddp", mesh), (f"{topology.name} fsdp", "fsdp", mesh)]
    rows = []
    for name, strategy, m in runs:
        tc = TrainConfig(steps=steps + 1, batch_size=8, seq_len=128, strategy=strategy)
        tokens_per_s = measure(config, tc, m, steps)
        rows.append({"run": name, "devices": m.size, "strategy": strategy, "tokens_per_s": tokens_per_s,
                     "model_tflops": tokens_per_s * flops_per_token / 1e12,
                     "mfu": tokens_per_s * flops_per_token / peak["peak"]})
    base = rows[0]["tokens_per_s"]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}")

    print(f"train throughput of {args.model} ({config.num_params / 1e6:.1f}M params), batch 8 x 128 tokens")
    print(f"machine: {machine}")
    print(f"matmul peak (float32): {peak['single_device'] / 1e9:.1f} GFLOP/s one device, "
          f"{peak['sharded'] / 1e9:.1f} GFLOP/s sharded over {mesh.size}")
    print(f"{'run':<14}{'devices':>8}{'tokens/s':>11}{'vs 1 dev':>10}{'TFLOP/s':>10}{'MFU':>8}")
    for r in rows:
        print(f"{r['run']:<14}{r['devices']:>8}{r['tokens_per_s']:>11.0f}{r['tokens_per_s'] / base:>10.2f}"
              f"{r['model_tflops']:>10.4f}{r['mfu']:>8.1%}")
    print(json.dumps({"experiment": "train_throughput", "model": args.model, "machine": machine,
                      "quick": args.quick, "flops_per_token": flops_per_token,
                      "matmul_peak_flops": peak, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
