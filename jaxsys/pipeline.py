"""SPMD pipeline parallelism over a `stage` mesh axis, with data and tensor parallelism.

Executes what `meshes.planner` plans (Holmes: NIC-aware stages, more layers on faster
stages) on a mesh `("stage", "data", "tensor")`:

* GPipe schedule as one `jax.shard_map`: every device runs the same program, a scan over
  `microbatches + stages - 1` ticks. At tick t stage s runs microbatch t - s through its
  layers and `lax.ppermute` hands the result to stage s + 1. The backward pass is the
  autodiff of that scan (ppermute transposes to the reverse permute), which is GPipe's
  backward: all forwards, then all backwards, activations of every microbatch kept (or
  recomputed per layer with `remat`). Bubble: (stages - 1) / (microbatches + stages - 1)
  of each device's ticks for equal stages (`bubble_fraction`).
* Uneven stages: per-stage parameters are stacked as `[stages, max_layers, ...]` and
  sharded over `stage`; a stage with fewer layers gets zero-filled slots past its count.
  A slot is active when `slot < layers of this stage` and the tick holds a microbatch.
  With `skip_idle` each slot runs under `lax.cond(active, block, identity)`: the predicate
  is the same on every device of a stage, so the devices of one tensor or data group take
  the same branch and the collectives inside agree; a short stage skips its empty slots and
  bubble ticks cost no compute. Without it the block always runs and `jnp.where(active, ...)`
  keeps its input, so every device runs the same collectives: the default on CPU, where
  simulated devices are threads of one process and idle slots save nothing. Either way
  padded slots get zero gradients and stay zero under AdamW. (On CPU, do not run these
  programs from the persistent compilation cache: XLA:CPU's in-process collectives meet by
  op id, executables read back from the cache can carry one id for all of them, and
  devices running independent collectives in different orders then deadlock.)
* Tensor parallelism (Megatron): heads, kv heads and the MLP hidden dimension are split
  over `tensor`; each block's input passes an identity whose backward sums over `tensor`
  (Megatron's f), and its attention / MLP outputs are summed over `tensor` with an identity
  backward (g). The block itself is the model's own `Attention` / `MLP` on the local heads,
  so numerics follow `jaxsys.model`.
* Data parallelism: the batch is split over `data`; gradients are summed over it (`ddp`),
  or parameters stay partitioned over `data` and each layer gathers its weights forward and
  backward and reduce-scatters its gradients (`zero3`, `jaxsys.sharding.zero`'s collectives).

The embedding, final norm and output head are replicated over `stage` (and `tensor`): the
first stage embeds, the last computes the loss under a `lax.cond`; their gradients are
summed over `stage`. What differs from Holmes (Megatron-based, 1F1B, per-process stages):
one compiled SPMD program, GPipe order, and the plan's device order becomes the mesh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsys.model import ModelDef, default_positions, embed_tokens, output_logits, rope_frequencies
from jaxsys.sharding import zero

AXES = ("stage", "data", "tensor")
DATA_STRATEGIES = ("ddp", "zero3")
TENSOR_LOGICAL = ("heads", "kv_heads", "mlp")  # split over `tensor` (Megatron)


@dataclass(frozen=True)
class PipelineConfig:
    layers_per_stage: tuple[int, ...]
    microbatches: int
    remat: bool = False  # recompute each layer in the backward pass (also on with ModelConfig.remat)
    skip_idle: bool | None = None  # lax.cond around idle layer slots; None: on except on CPU

    def __post_init__(self):
        object.__setattr__(self, "layers_per_stage", tuple(int(n) for n in self.layers_per_stage))
        if not self.layers_per_stage or min(self.layers_per_stage) < 1:
            raise ValueError(f"layers_per_stage={self.layers_per_stage} must give every stage at least one layer")
        if self.microbatches < 1:
            raise ValueError(f"microbatches={self.microbatches} must be positive")

    @property
    def stages(self) -> int:
        return len(self.layers_per_stage)

    @property
    def bubble_fraction(self) -> float:
        """Share of each device's ticks that hold no microbatch (GPipe, equal stages)."""
        return (self.stages - 1) / (self.microbatches + self.stages - 1)


def pipeline_mesh(device_grid, devices=None) -> Mesh:
    """The `(stage, data, tensor)` mesh over device indices shaped [stage][data][tensor]
    (`meshes.planner.Plan.device_grid`), indexing `devices` (default: the sorted device list)."""
    from jax.sharding import AxisType

    from meshes.build import default_devices
    grid = np.asarray(device_grid)
    if grid.ndim != 3:
        raise ValueError(f"device grid must be [stage][data][tensor], got shape {grid.shape}")
    devices = default_devices() if devices is None else list(devices)
    if grid.max() >= len(devices):
        raise ValueError(f"the plan uses device {grid.max()} but only {len(devices)} devices exist; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={grid.size} on CPU")
    array = np.empty(grid.shape, dtype=object)
    for index in np.ndindex(grid.shape):
        array[index] = devices[grid[index]]
    return Mesh(array, AXES, axis_types=(AxisType.Auto,) * 3)


def _enter_tensor(x):
    """Megatron's f: identity forward, sum of the tensor ranks' input gradients backward."""
    @jax.custom_vjp
    def f(x):
        return x

    f.defvjp(lambda x: (x, None), lambda _, g: (lax.psum(g, "tensor"),))
    return f(x)


def _leave_tensor(x):
    """Megatron's g: sum of the tensor ranks' partial outputs forward, identity backward."""
    @jax.custom_vjp
    def g(x):
        return lax.psum(x, "tensor")

    g.defvjp(lambda x: (lax.psum(x, "tensor"), None), lambda _, d: (d,))
    return g(x)


class Pipeline:
    """Loss and gradients of `next_token_loss` through a pipelined, tensor- and data-parallel model.

    Parameters live in the pipeline layout (`to_pipeline` / `from_pipeline` convert from and
    to `ModelDef`'s): `{"embed", "norm", "lm_head", "blocks"}` where every `blocks` leaf is
    one block's leaf stacked `[stages, max_layers, ...]`.
    """

    def __init__(self, model: ModelDef, mesh: Mesh, config: PipelineConfig, data_strategy: str = "ddp"):
        if data_strategy not in DATA_STRATEGIES:
            raise ValueError(f"the pipeline's data axis runs {' or '.join(DATA_STRATEGIES)}, not {data_strategy!r}")
        if tuple(mesh.axis_names) != AXES:
            raise ValueError(f"the pipeline needs a mesh with axes {AXES}, got {tuple(mesh.axis_names)}")
        c = model.config
        stages, data, tensor = (mesh.shape[a] for a in AXES)
        if config.stages != stages:
            raise ValueError(f"{config.stages} stages of layers {config.layers_per_stage} for a mesh with "
                             f"stage={stages}")
        if sum(config.layers_per_stage) != c.n_layers:
            raise ValueError(f"layers per stage {config.layers_per_stage} sum to {sum(config.layers_per_stage)}, "
                             f"but the model has {c.n_layers} layers")
        for name in ("n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(c, name) % tensor:
                raise ValueError(f"tensor parallelism {tensor} must divide {name}={getattr(c, name)}")
        self.model, self.mesh, self.config = model, mesh, config
        self.stages, self.data, self.tensor = stages, data, tensor
        self.max_layers = max(config.layers_per_stage)
        # The model's block on this device's share of heads and MLP columns.
        local = dataclasses.replace(c, n_heads=c.n_heads // tensor, n_kv_heads=c.n_kv_heads // tensor,
                                    ffn_dim=c.ffn_dim // tensor, head_dim=c.resolved_head_dim)
        self._local = ModelDef(local)
        block_axes = model.logical_axes["layers"][0]
        block_shapes = model.shapes["layers"][0]
        outer_axes = {k: v for k, v in model.logical_axes.items() if k != "layers"}
        outer_shapes = {k: v for k, v in model.shapes.items() if k != "layers"}
        is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
        tp_spec = lambda axes: tuple("tensor" if a in TENSOR_LOGICAL and tensor > 1 else None  # noqa: E731
                                     for a in axes)
        self.zero_schedule = None
        if data_strategy == "zero3" and data > 1:
            self.zero_schedule = zero.Schedule("zero3", ("data",), ("data",), (zero.Stage(("data",)),), None,
                                               (zero.Stage(("data",)),), (zero.Stage(("data",)),))

        def data_dim(name, axes, shape):
            """The dimension split over `data` under zero3 (-1: none, for ddp)."""
            if self.zero_schedule is None:
                return -1
            for dim, (size, split) in enumerate(zip(shape, tp_spec(axes))):
                if split is None and size % data == 0:
                    return dim
            raise ValueError(f"zero3 over {data} data-parallel devices: a {name} parameter of shape {tuple(shape)} "
                             f"(logical axes {axes}) has no dimension outside tensor parallelism that {data} "
                             "divides; use ddp on the data axis or another data degree")

        def spec(axes, dim, stacked):
            entries = list(tp_spec(axes))
            if dim >= 0:
                entries[dim] = "data"
            return P("stage", None, *entries) if stacked else P(*entries)

        self.block_dims = jax.tree.map(lambda axes, s: data_dim("block", axes, s.shape), block_axes, block_shapes,
                                       is_leaf=is_axes)
        self.outer_dims = jax.tree.map(lambda axes, s: data_dim("outer", axes, s.shape), outer_axes, outer_shapes,
                                       is_leaf=is_axes)
        block_specs = jax.tree.map(lambda axes, d: spec(axes, d, True), block_axes, self.block_dims,
                                   is_leaf=is_axes)
        outer_specs = jax.tree.map(lambda axes, d: spec(axes, d, False), outer_axes, self.outer_dims,
                                   is_leaf=is_axes)
        self.param_specs = {**outer_specs, "blocks": block_specs}
        self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.param_specs,
                                            is_leaf=lambda x: isinstance(x, P))
        stacked = lambda s: jax.ShapeDtypeStruct((stages, self.max_layers, *s.shape), s.dtype)  # noqa: E731
        self.shapes = {**outer_shapes, "blocks": jax.tree.map(stacked, block_shapes)}
        self.batch_spec = P("data", None)
        self.batch_sharding = NamedSharding(mesh, self.batch_spec)
        starts = np.cumsum((0,) + config.layers_per_stage[:-1])
        self._starts = tuple(int(s) for s in starts)

    # -- layouts ------------------------------------------------------------------------

    def to_pipeline(self, params: dict) -> dict:
        """`ModelDef` params -> the pipeline layout, placed on `param_shardings`."""
        def stack(*layers):
            rows = []
            for start, count in zip(self._starts, self.config.layers_per_stage):
                stage = jnp.stack(layers[start:start + count])
                pad = jnp.zeros((self.max_layers - count, *stage.shape[1:]), stage.dtype)
                rows.append(jnp.concatenate([stage, pad]))
            return jnp.stack(rows)

        def convert(params):
            layers = [params["layers"][i] for i in range(self.model.config.n_layers)]
            outer = {k: v for k, v in params.items() if k != "layers"}
            return {**outer, "blocks": jax.tree.map(stack, *layers)}

        return jax.jit(convert, out_shardings=self.param_shardings)(params)

    def from_pipeline(self, params: dict) -> dict:
        """The pipeline layout -> `ModelDef` params (padded slots dropped)."""
        def convert(params):
            layers = {}
            for s, (start, count) in enumerate(zip(self._starts, self.config.layers_per_stage)):
                for i in range(count):
                    layers[start + i] = jax.tree.map(lambda x: x[s, i], params["blocks"])
            return {**{k: v for k, v in params.items() if k != "blocks"}, "layers": layers}

        return jax.jit(convert)(params)

    def decay_mask(self, params) -> dict:
        """AdamW decay on matrices only, judged by each leaf's rank in `ModelDef` (not stacked)."""
        outer = {k: jax.tree.map(lambda p: p.ndim > 1, v) for k, v in params.items() if k != "blocks"}
        return {**outer, "blocks": jax.tree.map(lambda p: p.ndim > 3, params["blocks"])}

    # -- the pipelined step -------------------------------------------------------------

    def _block(self, block_params, x, positions, inv_freq):
        """One transformer block on this device's heads and MLP columns, summed over `tensor`."""
        state = jax.tree.map(lambda v: v, self._local._block_template)
        nnx.replace_by_pure_dict(state, block_params)
        block = nnx.merge(self._local._block_graphdef, state)
        h, _ = block.attn(_enter_tensor(block.attn_norm(x)), positions, inv_freq, None)
        x = x + _leave_tensor(h)
        return x + _leave_tensor(block.mlp(_enter_tensor(block.mlp_norm(x))))

    def _gathered_block(self):
        """The block with zero3's gather-forward / re-gather-backward / reduce-scatter around it."""
        schedule, dtype = self.zero_schedule, jnp.dtype(self.model.config.dtype)
        dims = self.block_dims
        run = self._block
        if schedule is None:
            return run

        def gather(shards, for_backward):
            return jax.tree.map(lambda x, d: zero.gather_param(x, d, schedule, dtype, for_backward=for_backward)[0],
                                shards, dims)

        @jax.custom_vjp
        def block(shards, x, positions, inv_freq):
            return run(gather(shards, False), x, positions, inv_freq)

        def block_fwd(shards, x, positions, inv_freq):
            return block(shards, x, positions, inv_freq), (shards, x, positions, inv_freq)

        def block_bwd(res, dy):
            shards, x, positions, inv_freq = res
            full = gather(shards, True)  # re-gather, then recompute the block
            _, vjp = jax.vjp(lambda p, h: run(p, h, positions, inv_freq), full, x)
            d_full, dx = vjp(dy)
            grads = jax.tree.map(lambda g, d, p: zero.reduce_scatter_param(g, d, schedule, p.dtype),
                                 d_full, dims, shards)
            return grads, dx, None, None

        block.defvjp(block_fwd, block_bwd)
        return block

    def _fetch_outer(self, outer):
        schedule, dtype = self.zero_schedule, jnp.dtype(self.model.config.dtype)
        if schedule is None:
            return outer
        dims = {k: self.outer_dims[k] for k in outer}

        @jax.custom_vjp
        def fetch(shards):
            return jax.tree.map(lambda x, d: zero.gather_param(x, d, schedule, dtype, for_backward=False)[0],
                                shards, dims)

        def fetch_bwd(shards, d_full):
            return (jax.tree.map(lambda g, d, p: zero.reduce_scatter_param(g, d, schedule, p.dtype),
                                 d_full, dims, shards),)

        fetch.defvjp(lambda shards: (fetch(shards), shards), fetch_bwd)
        return fetch(outer)

    def _local_loss(self, params, tokens):
        """This device's share of the loss. tokens: [local batch, seq + 1]."""
        c, cfg = self.model.config, self.config
        n_stages, m = self.stages, cfg.microbatches
        stage = lax.axis_index("stage")
        if tokens.shape[0] % m:
            raise ValueError(f"the per-replica batch of {tokens.shape[0]} sequences does not split into "
                             f"{m} microbatches; pick a batch size that is a multiple of data x microbatches")
        micro = tokens.reshape(m, tokens.shape[0] // m, tokens.shape[1])  # [M, mb, S + 1]
        inputs, targets = micro[:, :, :-1], micro[:, :, 1:]
        positions = default_positions(inputs[0])
        inv_freq = jnp.asarray(rope_frequencies(c))
        outer = self._fetch_outer({k: v for k, v in params.items() if k != "blocks"})
        blocks = jax.tree.map(lambda x: x[0], params["blocks"])  # [max_layers, ...] of this stage
        layers_here = jnp.asarray(cfg.layers_per_stage)[stage]
        block = self._gathered_block()
        if cfg.remat or c.remat:
            block = jax.checkpoint(block)

        skip = cfg.skip_idle if cfg.skip_idle is not None else jax.default_backend() != "cpu"

        def run_stage(x, busy):
            def layer(x, slot):
                layer_params, index = slot
                active = busy & (index < layers_here)
                if skip:
                    return lax.cond(active, lambda: block(layer_params, x, positions, inv_freq), lambda: x), None
                return jnp.where(active, block(layer_params, x, positions, inv_freq), x), None
            return lax.scan(layer, x, (blocks, jnp.arange(self.max_layers)))[0]

        def tick(carry, t):
            received, outputs = carry
            first = embed_tokens(outer["embed"], inputs[jnp.clip(t, 0, m - 1)], c.dtype)  # [mb, S, D]
            x = jnp.where(stage == 0, first, received)
            busy = (t - stage >= 0) & (t - stage < m)  # this tick holds a microbatch here
            y = run_stage(x, busy)
            done = t - (n_stages - 1)  # the microbatch the last stage finishes now
            outputs = lax.dynamic_update_index_in_dim(
                outputs, jnp.where((stage == n_stages - 1) & (done >= 0), y, outputs[jnp.clip(done, 0, m - 1)]),
                jnp.clip(done, 0, m - 1), axis=0)
            received = lax.ppermute(y, "stage", [(s, s + 1) for s in range(n_stages - 1)])
            return (received, outputs), None

        shape = (*inputs.shape[1:], c.dim)
        empty = jnp.zeros(shape, jnp.dtype(c.dtype))
        (_, outputs), _ = lax.scan(tick, (empty, jnp.zeros((m, *shape), empty.dtype)),
                                   jnp.arange(m + n_stages - 1))

        def loss():
            state = jax.tree.map(lambda v: v, self.model._norm_template)
            nnx.replace_by_pure_dict(state, outer["norm"])
            x = nnx.merge(self.model._norm_graphdef, state)(outputs.reshape(-1, *shape[1:]))
            logits = output_logits(c, x, outer["embed"], outer.get("lm_head"))
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1, shape[1])).mean()

        return lax.cond(stage == n_stages - 1, loss, lambda: jnp.zeros((), jnp.float32)) / self.data

    def loss_and_grads(self, params, batch):
        """(mean next-token loss, gradients in the pipeline layout) for a global batch [B, S + 1]."""
        def local(params, batch):
            loss, grads = jax.value_and_grad(self._local_loss)(params, batch)
            outer = {k: v for k, v in grads.items() if k != "blocks"}
            blocks = grads["blocks"]
            if self.zero_schedule is None:  # zero3 reduce-scattered over `data` already
                outer = lax.psum(outer, "data")
                blocks = lax.psum(blocks, "data")
            outer = lax.psum(outer, "stage")  # only the first / last stage touch them
            return lax.psum(loss, ("stage", "data")), {**outer, "blocks": blocks}

        return jax.shard_map(local, mesh=self.mesh, in_specs=(self.param_specs, self.batch_spec),
                             out_specs=(P(), self.param_specs), check_vma=False)(params, batch)


__all__ = ["AXES", "DATA_STRATEGIES", "Pipeline", "PipelineConfig", "pipeline_mesh"]
