"""Sharded training: a jitted train step over any mesh and strategy, and the loop around it.

The step is a pure function of (state, batch) -> (state, metrics) with state =
{"params", "opt_state"}; the shardings of both come from the strategy's logical
axis rules (`jaxsys.sharding`), and XLA's SPMD partitioner inserts the
collectives. The loop adds what a long run needs: AdamW with warmup + cosine
decay, gradient clipping and accumulation, orbax checkpoints with exact resume
(the data order is a pure function of the step), a JSONL metrics log and a loss
curve, a stop on a non-finite loss that keeps the last good checkpoint, and a
clean checkpoint-and-exit on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsys.checkpoint import Checkpointer, abstract_tree
from jaxsys.config import ModelConfig
from jaxsys.model import ModelDef
from jaxsys.pipeline import DATA_STRATEGIES as PIPELINE_DATA_STRATEGIES, Pipeline, PipelineConfig
from jaxsys.sharding import ShardingRules, make_rules, use_rules
from jaxsys.sharding.zero import EXPLICIT_STRATEGIES, ExplicitStrategy, ZeroOptions, make_schedule

log = logging.getLogger("jaxsys.train")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global sequences per optimizer step
    seq_len: int = 128
    grad_accum: int = 1  # microbatches per step (batch_size must divide)
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    strategy: str = "fsdp"  # ddp | fsdp (XLA-scheduled) | zero3 | zeropp | hier (explicit schedules)
    tensor_parallel: str | None = None  # mesh level for heads / mlp (ddp, fsdp)
    zero: ZeroOptions = ZeroOptions()  # hpZ / qwZ / qgZ switches of the explicit schedules
    pipeline: PipelineConfig | None = None  # pipeline stages over a (stage, data, tensor) mesh
    log_every: int = 10
    ckpt_every: int = 50
    keep_last: int = 3

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 1 or self.grad_accum < 1:
            raise ValueError(f"steps, batch_size, seq_len and grad_accum must be positive: {self}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")
        # A negative or non-finite learning rate trains backwards or breaks at step 1: refuse it here.
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be a finite number > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1] (final lr / peak lr)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"Adam betas b1={self.b1}, b2={self.b2} must lie in [0, 1)")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 (the global gradient norm is clipped to it)")
        if self.log_every < 1 or self.ckpt_every < 1 or self.keep_last < 1:
            raise ValueError(f"log_every={self.log_every}, ckpt_every={self.ckpt_every} and keep_last="
                             f"{self.keep_last} must be >= 1")


class TrainingError(RuntimeError):
    """Training stopped; the message says why and where the last good checkpoint is."""


class Batches(Protocol):
    def batch(self, step: int) -> np.ndarray: ...  # [batch_size, seq_len + 1] int32


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(tc: TrainConfig, decay_mask: Callable = _matrices) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and clipping; `decay_mask` picks the decayed leaves (matrices)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.learning_rate * tc.min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def next_token_loss(model: ModelDef, params, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]."""
    logits, _ = model.apply(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


class Trainer:
    """Builds the sharded state and the jitted step for one model, strategy and mesh."""

    def __init__(self, model_config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh,
                 loss_fn: Callable = next_token_loss):
        self.config, self.tc, self.mesh = model_config, tc, mesh
        self.model = ModelDef(model_config)
        self.explicit: ExplicitStrategy | None = None
        self.pipeline: Pipeline | None = None
        self.param_shapes = self.model.shapes
        decay_mask = _matrices
        if tc.pipeline is not None:
            if tc.strategy not in PIPELINE_DATA_STRATEGIES or tc.tensor_parallel is not None:
                raise ValueError(f"pipeline stages combine with --strategy {' or '.join(PIPELINE_DATA_STRATEGIES)} "
                                 f"on the data axis (got {tc.strategy}) and take tensor parallelism as a degree "
                                 "of the plan, not a mesh level")
            if loss_fn is not next_token_loss:
                raise ValueError("the pipeline computes the next-token loss on its last stage; a custom loss_fn "
                                 "needs the non-pipelined trainer")
            self.pipeline = Pipeline(self.model, mesh, tc.pipeline, data_strategy=tc.strategy)
            self.rules = ShardingRules(mesh, {"batch": ("data",)})
            self.param_shardings = self.pipeline.param_shardings
            self.param_shapes = self.pipeline.shapes
            decay_mask = self.pipeline.decay_mask
        elif tc.strategy in EXPLICIT_STRATEGIES:
            if tc.tensor_parallel is not None:
                raise ValueError(f"--tensor-parallel combines with ddp or fsdp, not with {tc.strategy}")
            self.explicit = ExplicitStrategy(self.model, mesh, make_schedule(tc.strategy, mesh, tc.zero))
            self.rules: ShardingRules = make_rules("ddp", mesh)  # the batch over every level
            self.param_shardings = self.explicit.param_shardings
        else:
            self.rules = make_rules(tc.strategy, mesh, tensor_parallel=tc.tensor_parallel)
            self.param_shardings = self.model.param_shardings(self.rules)
        data_devices = math.prod(mesh.shape[a] for a in self.rules.mesh_axes("batch"))
        if self.pipeline is not None:
            data_devices *= tc.pipeline.microbatches
        if (tc.batch_size // tc.grad_accum) % data_devices:
            raise ValueError(f"batch_size={tc.batch_size} / grad_accum={tc.grad_accum} must divide over the "
                             f"{data_devices} data-parallel devices ({' x '.join(self.rules.mesh_axes('batch'))}); "
                             + (f" x {tc.pipeline.microbatches} pipeline microbatches" if self.pipeline else "")
                             + "; pick a multiple, or fewer microbatches")
        self.tx = make_optimizer(tc, decay_mask)
        self.loss_fn = loss_fn
        abstract_opt = jax.eval_shape(self.tx.init, self.param_shapes)
        self.opt_shardings = optax.tree_map_params(
            self.tx, lambda _, sh: sh, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: NamedSharding(mesh, P()),
            is_leaf=lambda x: isinstance(x, NamedSharding))
        self.abstract_opt = abstract_opt
        self.batch_sharding = (self.pipeline.batch_sharding if self.pipeline is not None else
                               self.rules.sharding(("batch", None), (tc.batch_size, tc.seq_len + 1)))
        state_sh = {"params": self.param_shardings, "opt_state": self.opt_shardings}
        self.step_fn = jax.jit(self._step, in_shardings=(state_sh, self.batch_sharding),
                               out_shardings=(state_sh, None), donate_argnums=0)
        self.grads_fn = jax.jit(self.loss_and_grads, in_shardings=(self.param_shardings, self.batch_sharding),
                                out_shardings=(None, self.param_shardings))

    def init_state(self, params=None) -> dict:
        if self.pipeline is not None:  # the same weights as the unpipelined model for this seed
            params = self.pipeline.to_pipeline(self.model.init(self.tc.seed) if params is None else params)
        elif params is None:
            params = self.model.init(self.tc.seed, self.param_shardings)
        else:
            if jax.process_count() > 1:  # device_put spreads host arrays over every process's devices
                params = jax.device_get(params)
            params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return {"params": params, "opt_state": opt_state}

    def put_batch(self, batch: np.ndarray) -> jax.Array:
        """A global batch onto the mesh; every process holds the same host batch."""
        batch = np.asarray(batch, np.int32)
        return jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda idx: batch[idx])

    def loss_and_grads(self, params, batch):
        """Loss and gradients (before the optimizer), averaged over microbatches."""
        with use_rules(self.rules):
            if self.pipeline is not None:
                grad_fn = self.pipeline.loss_and_grads
            elif self.explicit is not None:
                grad_fn = partial(self.explicit.loss_and_grads, self.loss_fn)
            else:
                grad_fn = jax.value_and_grad(lambda p, b: self.loss_fn(self.model, p, b))
            if self.tc.grad_accum == 1:
                return grad_fn(params, batch)
            micro = batch.reshape(self.tc.grad_accum, -1, batch.shape[-1])

            def accumulate(carry, mb):
                loss, grads = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            return jax.tree.map(lambda x: x / self.tc.grad_accum, (loss, grads))

    def _step(self, state, batch):
        loss, grads = self.loss_and_grads(state["params"], batch)
        # Elementwise square-and-sum keeps each gradient in its sharding (vdot would flatten
        # and so all-gather a gradient split along a minor dimension).
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite loss or gradient leaves the state as it was, so the run
        # can stop with its last good state and checkpoint intact.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {"params": jax.tree.map(keep, params, state["params"]),
                     "opt_state": jax.tree.map(keep, opt_state, state["opt_state"])}
        return new_state, {"loss": loss, "grad_norm": grad_norm}

    def restore(self, ckpt: Checkpointer, step: int) -> dict:
        param_shardings = self.param_shardings
        if self.pipeline is not None:  # checkpoints hold the model's own layout (see saved_params)
            param_shardings = jax.tree.map(lambda _: NamedSharding(self.mesh, P()), self.model.shapes)
        params, opt_state = ckpt.restore(
            step, abstract_tree(self.model.shapes, param_shardings),
            abstract_tree(self.abstract_opt, self.opt_shardings))
        if self.pipeline is not None:
            params = self.pipeline.to_pipeline(params)
        return {"params": params, "opt_state": opt_state}

    def saved_params(self, params):
        """Parameters as checkpoints store them: `ModelDef`'s layout, which generate and export read."""
        return params if self.pipeline is None else self.pipeline.from_pipeline(params)

    def meta(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {"step": step, "model": self.config.to_dict(), "train": dataclasses.asdict(self.tc),
                "strategy": self.tc.strategy,
                "mesh": dict(self.mesh.shape), **extra}


@dataclass
class TrainResult:
    state: dict
    losses: list[float]
    start_step: int
    end_step: int
    stopped_by_signal: bool
    tokens_per_s: float
    ckpt_dir: Path | None


def train(model_config: ModelConfig, tc: TrainConfig, mesh: jax.sharding.Mesh, data: Batches, *,
          ckpt_dir: str | Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
          init_params=None, stop_after: int | None = None,
          loss_fn: Callable = next_token_loss) -> TrainResult:
    """Trains to `tc.steps`, checkpointing into `ckpt_dir`; resumes from its latest step if asked.

    `init_params` starts from given weights (fine-tuning) instead of the seed;
    `stop_after` ends this run after that many steps (with a checkpoint), as a
    stop-and-resume would, without changing the schedule of the whole run.
    """
    trainer = Trainer(model_config, tc, mesh, loss_fn)
    ckpt = Checkpointer(ckpt_dir, keep_last=tc.keep_last) if ckpt_dir is not None else None
    run_dir = ckpt.directory if ckpt else None
    start = 0
    latest = ckpt.latest_step() if ckpt else None
    if latest is not None and not resume:
        raise TrainingError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); "
                            "pass --resume to continue that run, or pick an empty --ckpt-dir")
    if resume and latest is not None:
        saved = ckpt.read_meta(latest)
        if not ModelConfig.from_dict(saved["model"]).same_weights(model_config):
            raise TrainingError(f"checkpoint {ckpt.directory}/{latest} was trained with another model "
                                f"config ({saved.get('model')}); resume with --model {ckpt.directory}, "
                                "or pick an empty --ckpt-dir")
        check_resumable(saved, tc, meta or {}, ckpt.directory / str(latest))
        state, start = trainer.restore(ckpt, latest), latest
        log.info("resumed from %s step %d", ckpt.directory, latest)
    else:
        state = trainer.init_state(init_params)

    stop = {"signal": None}
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    writes_logs = run_dir is not None and jax.process_index() == 0  # one log per run, not one per process
    if writes_logs:
        _truncate_metrics(run_dir / "metrics.jsonl", after_step=start)  # rows of steps that will rerun
    metrics_file = open(run_dir / "metrics.jsonl", "a") if writes_logs else None
    losses: list[float] = []
    saved_step = latest
    step = start
    end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
    t_start, tokens = None, 0
    stopping = False
    try:
        while step < end:
            batch = trainer.put_batch(data.batch(step))
            state, metrics = trainer.step_fn(state, batch)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if t_start is None:  # the first step includes compilation; time the rest
                t_start = time.perf_counter()
            else:
                tokens += tc.batch_size * tc.seq_len
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                if ckpt:
                    ckpt.wait()
                where = f"step {saved_step} in {ckpt.directory}" if saved_step is not None else "none saved"
                raise TrainingError(f"loss became {loss} (grad norm {grad_norm}) at step {step}; stopped "
                                    f"without saving it; last good checkpoint: {where}. Lower the "
                                    "learning rate or check the data, then resume")
            step += 1
            losses.append(loss)
            if metrics_file:
                metrics_file.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm,
                                               "time": time.time()}) + "\n")
                metrics_file.flush()
            if step % tc.log_every == 0 or step == tc.steps:
                log.info("step %d/%d loss %.4f grad_norm %.3f", step, tc.steps, loss, grad_norm)
            stopping = _any_process(stop["signal"] is not None)
            if ckpt and (step % tc.ckpt_every == 0 or step == end or stopping):
                ckpt.save(step, trainer.saved_params(state["params"]), state["opt_state"],
                          trainer.meta(step, meta or {}))
                saved_step = step
            if stopping:
                log.warning("SIGTERM: saved step %d, exiting", step)
                break
        if ckpt:
            ckpt.wait()
    finally:
        if metrics_file:
            metrics_file.close()
        if ckpt:
            ckpt.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.perf_counter() - t_start if t_start else 0.0
    if writes_logs:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return TrainResult(state=state, losses=losses, start_step=start, end_step=step,
                       stopped_by_signal=stopping,
                       tokens_per_s=tokens / elapsed if elapsed > 0 else float("nan"), ckpt_dir=run_dir)


# Settings that decide the data order and the update rule: a resumed run must keep them.
RESUME_KEEPS = ("batch_size", "seq_len", "grad_accum", "seed", "learning_rate", "min_lr_ratio", "warmup_steps",
                "weight_decay", "b1", "b2", "grad_clip")


def check_resumable(saved_meta: dict, tc: TrainConfig, meta: dict, where: Path) -> None:
    """Refuses a resume that would not continue the saved run exactly (steps may grow)."""
    saved = saved_meta.get("train", {})
    changed = [f"{k}: {saved[k]} -> {getattr(tc, k)}" for k in RESUME_KEEPS
               if k in saved and saved[k] != getattr(tc, k)]
    if "data" in meta and "data" in saved_meta and meta["data"] != saved_meta["data"]:
        changed.append(f"data: {saved_meta['data']} -> {meta['data']}")
    if changed:
        raise TrainingError(f"cannot resume {where} exactly: {'; '.join(changed)}; keep the saved settings "
                            "(they are in its meta), or start a new run in an empty --ckpt-dir")
    if saved.get("steps") not in (None, tc.steps):
        log.warning("resuming with --steps %s instead of %s: the cosine schedule is stretched from here on",
                    tc.steps, saved["steps"])


def _truncate_metrics(path: Path, after_step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= after_step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def _any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any one, so that all stop at the same step.

    A SIGTERM reaches the processes of a multi-process run at slightly different
    times; one that stopped alone would leave the others waiting forever in the
    next step's collectives, and itself in the checkpoint's barrier.
    """
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.array(flag)).any())


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Loss curve from the JSONL metrics log (all runs appended to it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("jaxsys training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
