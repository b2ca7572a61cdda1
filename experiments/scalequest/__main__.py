"""`python -m experiments.scalequest [--quick] [--out DIR]`: the pipeline, a table, a JSON line.

The full run uses the `small` preset (13M parameters) for the solver, the question models
and the five students: 1,000 seeds of 1-3 operations (harder tests: 4-6), 600 training steps
of 16 x 256 tokens per model, 16,384 questions per question model, k=4 solver samples each
(`PipelineConfig`'s defaults). Its solver and each student train for ~37 min on 2 CPU cores;
the whole run took 4 h 48 min.
At learning rate 3e-3 its solver was too weak to keep more than a few questions (README); it
now trains at 1e-3. `--quick` fits 2 CPU cores and half an hour: 0.9M-parameter models (128
wide, 4 layers; `tiny` is 64 wide with 2), 600 seeds of one operation (harder tests: 2-3),
solver and students trained for 600 steps each, 4,096 questions per question model at
temperature 1 and k=8 solver samples each. Text is in word tokens
(`jaxsys.data.tokenizer.WordTokenizer`, fit on the seeds: a one-operation example is ~60
tokens against ~210 bytes), and every training window starts at an example
(`models.DocumentWindows`), so a window of 128 holds two whole ones.
Rerunning with the same --out skips every finished stage (delete a stage's files to redo it).
SIGTERM stops a run cleanly (a training stage at a checkpoint): each process appends its
time to `sittings.jsonl`, and a run resumed after a cut reports its time over all sittings.
The last line of stdout is JSON with `counts` (stage -> counts) and `accuracy`
(student -> test set -> greedy exact-answer accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path


def configs(quick: bool):
    from jaxsys.config import get_preset
    from jaxsys.train import TrainConfig

    from experiments.scalequest.filters import FilterConfig
    from experiments.scalequest.pipeline import PipelineConfig
    from experiments.scalequest.qpo import QPOConfig

    if not quick:
        return PipelineConfig(model=get_preset("small"))
    # Between `tiny` (64 wide, 2 layers) and `small`: 128 wide, 4 layers, 0.9M parameters.
    model = dataclasses.replace(get_preset("tiny"), dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                                max_seq_len=1024)
    # One-operation examples are ~60 word tokens: a window of 128 holds two whole ones.
    return PipelineConfig(
        model=model, seeds=600, seed_steps=(1, 1), harder_steps=(2, 3), tests=256, questions=4096, k=8,
        question_temperature=1.0, solve_temperature=0.7, question_len=96, solution_len=256, solution_tokens=128,
        attempt_tokens=64,  # one-operation solutions are at most ~55 word tokens (2-3 operations: ~115)
        filters=FilterConfig(min_steps=1),  # one-operation seeds: every question has one step
        solver=TrainConfig(steps=600, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=25,
                           log_every=50, ckpt_every=200, keep_last=1),
        student=TrainConfig(steps=600, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=25,
                            log_every=50, ckpt_every=200, keep_last=1),
        qft=TrainConfig(steps=100, batch_size=16, seq_len=128, learning_rate=1e-3, warmup_steps=10,
                        log_every=20, ckpt_every=100, keep_last=1),
        qpo=QPOConfig(steps=20, pairs_per_step=8, learning_rate=2e-4, beta=0.1, nll_weight=1.0, seq_len=96))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and samples (<= 30 min on 2 cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder (default runs/scalequest or runs/scalequest-quick); reused to resume")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / ("scalequest-quick" if args.quick else "scalequest")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src.xla_bridge", "matplotlib", "jaxsys.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import meshes
    from experiments.scalequest.pipeline import STUDENTS, TEST_SETS, run
    from experiments.scalequest.stages import Stages

    t0, cpu0 = time.perf_counter(), time.process_time()
    pc = configs(args.quick)
    mesh = meshes.single_device_mesh(meshes.load_topology("cpu8").axis_names)
    stages, finished = Stages(out), False

    def on_sigterm(signum, frame):  # outside training (which stops at a checkpoint by itself)
        raise SystemExit("stopped by SIGTERM; rerun the same command to resume from the finished stages")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        accuracy = run(pc, stages, mesh)
        finished = True
    finally:  # every sitting is logged: a run cut off by SIGTERM and resumed later has several
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stages.log_sitting(wall_s=wall, cpu_s=cpu, finished=finished)
    sittings = stages.run_sittings()
    total_wall, total_cpu = sum(s["wall_s"] for s in sittings), sum(s["cpu_s"] for s in sittings)

    print(f"ScaleQuest-style synthesis ({'quick' if args.quick else 'full'}): {pc.model.num_params / 1e6:.2f}M-param "
          f"models, {pc.seeds} seeds, {pc.questions} questions per question model, k={pc.k}; run folder {out}")
    print(f"{'stage':<30}counts")
    for name, counts in stages.counts.items():
        print(f"{name:<30}" + ", ".join(f"{k}={_fmt(v)}" for k, v in counts.items()))
    tc = pc.student_tc()
    print(f"\nstudents: {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens each; greedy exact-answer accuracy")
    print(f"{'student':<22}" + "".join(f"{t:>10}" for t in TEST_SETS))
    for name in STUDENTS:
        if name in accuracy:
            print(f"{name:<22}" + "".join(f"{accuracy[name][t]:>10.3f}" for t in TEST_SETS))
    kept = stages.counts.get("responses_qpo", {}).get("kept", 0)
    if kept == 0:
        print("the full pipeline kept no question, so every synthetic set is empty and every student "
              "trains on the seeds alone; the counts show which stage emptied it")
    gain = accuracy["full"]["in_dist"] - accuracy["seeds_only"]["in_dist"]
    print(f"full - seeds_only on in_dist: {100 * gain:+.1f} points (goal +10)")
    print(f"wall {wall:.0f} s, process CPU {cpu:.0f} s (user+system), "
          f"stages read back from an earlier run: {len(stages.skipped)}")
    if len(sittings) > 1:
        print(f"the run took {len(sittings)} sittings (cut off by SIGTERM, then resumed): wall {total_wall} s, "
              f"process CPU {total_cpu} s in all")
    print(json.dumps({"experiment": "scalequest", "quick": args.quick, "counts": stages.counts, "accuracy": accuracy,
                      "full_minus_seeds_in_dist": gain, "wall_s": wall, "cpu_s": cpu,
                      "sittings": len(sittings), "wall_s_all_sittings": total_wall, "cpu_s_all_sittings": total_cpu,
                      "stages_skipped": stages.skipped}))
    return 0


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
