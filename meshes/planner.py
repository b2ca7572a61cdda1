"""NIC-aware pipeline planning (Holmes): device order, mesh axes, layers per stage, step time.

Holmes ("Towards Distributed Training Across Clusters with Heterogeneous NIC
Environment") trains on pools whose nodes carry different NICs (InfiniBand, RoCE)
or sit in different clusters joined only by Ethernet. Its two scheduling ideas are
what this module plans: (1) order devices so that tensor- and data-parallel groups,
whose collectives are large and frequent, stay inside one fabric, and only the
pipeline's point-to-point activations cross between fabrics; (2) a self-adapting
partition that gives a stage more layers when its devices and links make it faster.

What differs from Holmes: the plan is a jax mesh ``(stage, data, tensor)`` over a
device order (:class:`Plan.device_grid`), executed SPMD by :mod:`jaxsys.pipeline`;
the partition minimizes the step time of an explicit cost model instead of a
measured per-stage speed; and stage order is searched too, since the first stage
finishes its backward pass last and so should have the fastest gradient sync.

Cost model (per optimizer step, every assumption in :class:`Assumptions`):

* compute: training FLOPs (6 x matmul params + attention, as
  ``ModelConfig.flops_per_token``) split over the tensor group, at
  ``mfu`` x the stage's bf16 peak; forward is 1/3 of it, backward 2/3.
* tensor parallelism (Megatron): 2 all-reduces of the activations per block forward
  and 2 backward, ring volumes over the link the group spans; not overlapped.
* pipeline: GPipe / 1F1B timing, ``(M - 1) x slowest stage + every stage once`` for the
  forward and again for the backward; each boundary sends one activation (forward)
  and one gradient (backward) per microbatch, split over the tensor group.
* data parallelism: one all-reduce of each stage's gradients (bf16) over its data
  group after that stage's last backward; stage s finishes its backward while the
  stages before it still drain, so its sync overlaps their drain.
* a link is the slowest hop a group crosses: a mesh level inside a node, a fabric's
  NIC bandwidth between its nodes, the group link between fabrics.

This module is plain Python (no JAX), so ``jaxsys plan`` answers instantly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from meshes.topology import Topology

MESH_AXES = ("stage", "data", "tensor")


@dataclass(frozen=True)
class Assumptions:
    """What the cost model takes as given; reported next to every prediction."""

    mfu: float = 0.45  # achieved fraction of the dense bf16 peak in training matmuls
    default_peak_bf16_tflops: float = 312.0  # used when the topology has no [device] table
    bytes_per_value: int = 2  # bf16 activations and gradients on the wire
    seq_len: int = 2048
    global_batch: int = 64  # sequences per optimizer step
    microbatch_size: int = 1  # sequences per pipeline microbatch

    def __post_init__(self):
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu} must be in (0, 1]")
        for name in ("seq_len", "global_batch", "microbatch_size", "bytes_per_value"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


@dataclass(frozen=True)
class Workload:
    """The per-layer sizes the cost model needs, from any ``ModelConfig``-shaped object."""

    n_layers: int
    dim: int
    layer_params: int
    layer_flops_per_token: float
    head_params: int  # output projection (on the last stage)
    head_flops_per_token: float
    embed_params: int  # input embedding (on the first stage); 0 when tied to the head

    @classmethod
    def from_model(cls, config, seq_len: int) -> Workload:
        d, f, hd = config.dim, config.ffn_dim, config.resolved_head_dim
        attn = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
        matmul = attn + 3 * d * f
        head = d * config.vocab_size
        return cls(n_layers=config.n_layers, dim=d, layer_params=matmul + 2 * d,
                   layer_flops_per_token=6 * matmul + 12 * seq_len * config.n_heads * hd,
                   head_params=head + d, head_flops_per_token=6 * head,
                   embed_params=0 if config.tie_embeddings else head)


@dataclass(frozen=True)
class Link:
    """The slowest hop a group of devices crosses."""

    name: str  # a level name, "fabric:<name>", or "<fabric>/<fabric>"
    kind: str  # the level name, or a NIC kind
    bandwidth_gbps: float
    latency_us: float


@dataclass(frozen=True)
class Stage:
    index: int
    devices: tuple[tuple[int, ...], ...]  # [data][tensor] device indices
    layers: int
    nic_kinds: tuple[str, ...]  # NIC kinds of its nodes ("" without nic groups)
    peak_bf16_tflops: float
    forward_s: float  # one microbatch: compute + tensor-parallel all-reduces
    backward_s: float
    send_s: float  # one microbatch's activation to the next stage (0 for the last)
    grad_sync_s: float  # data-parallel all-reduce of its gradients, once per step
    tensor_link: str
    data_link: str
    send_link: str


@dataclass(frozen=True)
class Plan:
    topology: str
    tp: int
    pp: int
    dp: int
    microbatches: int
    stages: tuple[Stage, ...]
    pipeline_s: float
    step_s: float
    bubble_fraction: float

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(s.layers for s in self.stages)

    @property
    def device_grid(self) -> list[list[list[int]]]:
        """Device indices shaped [stage][data][tensor]: the order of the jax mesh's devices."""
        return [[list(row) for row in s.devices] for s in self.stages]

    def groups(self, axis: str) -> list[tuple[int, ...]]:
        """The device groups along one mesh axis ("stage", "data" or "tensor")."""
        if axis not in MESH_AXES:
            raise ValueError(f"unknown plan axis {axis!r}; axes are {', '.join(MESH_AXES)}")
        grid = self.device_grid
        if axis == "tensor":
            return [tuple(row) for stage in grid for row in stage]
        if axis == "data":
            return [tuple(stage[d][t] for d in range(self.dp)) for stage in grid for t in range(self.tp)]
        return [tuple(grid[s][d][t] for s in range(self.pp)) for d in range(self.dp) for t in range(self.tp)]

    def to_dict(self) -> dict:
        return {"topology": self.topology, "tp": self.tp, "pp": self.pp, "dp": self.dp,
                "microbatches": self.microbatches, "mesh_axes": list(MESH_AXES),
                "mesh_shape": [self.pp, self.dp, self.tp], "layers_per_stage": list(self.layers_per_stage),
                "stages": [{**asdict(s), "devices": [list(r) for r in s.devices],
                            "nic_kinds": list(s.nic_kinds)} for s in self.stages],
                "pipeline_s": self.pipeline_s, "step_s": self.step_s, "bubble_fraction": self.bubble_fraction}


@dataclass(frozen=True)
class PlanReport:
    plan: Plan
    naive: Plan
    assumptions: Assumptions
    model: str = ""
    crossings: dict = field(default_factory=dict)

    @property
    def speedup_vs_naive(self) -> float:
        return self.naive.step_s / self.plan.step_s

    def to_dict(self) -> dict:
        return {"model": self.model, "plan": self.plan.to_dict(), "predicted_step_s": self.plan.step_s,
                "naive": self.naive.to_dict(), "naive_step_s": self.naive.step_s,
                "speedup_vs_naive": self.speedup_vs_naive, "bubble_fraction": self.plan.bubble_fraction,
                "groups_crossing_nic_kinds": self.crossings, "assumptions": asdict(self.assumptions)}


# ---------------------------------------------------------------------------
# Links


def devices_per_node(topology: Topology) -> int:
    return math.prod(level.size for level in topology.levels[:-1])


def nic_kind(topology: Topology, device: int) -> str:
    group = topology.node_group(device // devices_per_node(topology))
    return group.kind if group else ""


def _fabric(topology: Topology, node: int) -> str:
    group = topology.node_group(node)
    return group.fabric if group else ""


def group_link(topology: Topology, devices) -> Link | None:
    """The slowest hop inside a group of device indices; None for a single device."""
    devices = sorted(set(devices))
    if len(devices) < 2:
        return None
    shape = topology.mesh_shape  # outermost first
    coords = [_unravel(d, shape) for d in devices]
    spanned = [a for a in range(len(shape)) if len({c[a] for c in coords}) > 1]
    outermost = spanned[0]
    if outermost > 0 or not topology.nic_groups:
        level = topology.levels[len(shape) - 1 - outermost]
        return Link(level.name, level.name, level.bandwidth_gbps, level.latency_us)
    nodes = sorted({c[0] for c in coords})
    groups = [topology.node_group(n) for n in nodes]
    fabrics = sorted({g.fabric for g in groups})
    if len(fabrics) == 1:
        slowest = min(groups, key=lambda g: g.bandwidth_gbps)
        return Link(f"fabric:{fabrics[0]}", slowest.kind, slowest.bandwidth_gbps,
                    max(g.latency_us for g in groups))
    outer = topology.levels[-1]
    links = []
    for a, b in itertools.combinations(fabrics, 2):
        link = topology.fabric_link(a, b)
        links.append(Link(f"{a}/{b}", link.kind, link.bandwidth_gbps, link.latency_us) if link else
                     Link(f"{a}/{b}", outer.name, outer.bandwidth_gbps, outer.latency_us))
    return min(links, key=_bw)


def _unravel(index: int, shape) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    return tuple(reversed(coords))


def _allreduce_s(nbytes: float, n: int, link: Link | None) -> float:
    if n <= 1 or link is None:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (link.bandwidth_gbps * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6


def _send_s(nbytes: float, link: Link | None) -> float:
    return 0.0 if link is None else nbytes / (link.bandwidth_gbps * 1e9) + link.latency_us * 1e-6


# ---------------------------------------------------------------------------
# The cost of one layout


@dataclass(frozen=True)
class _Slot:
    """A stage's devices and the per-layer costs that follow from them."""

    devices: tuple[tuple[int, ...], ...]
    nic_kinds: tuple[str, ...]
    peak: float
    tensor_link: Link | None
    data_link: Link | None


def _slot(topology: Topology, devices, assumptions: Assumptions) -> _Slot:
    per_node = devices_per_node(topology)
    flat = [d for row in devices for d in row]
    nodes = sorted({d // per_node for d in flat})
    groups = [topology.node_group(n) for n in nodes]
    default = topology.device.peak_bf16_tflops if topology.device else assumptions.default_peak_bf16_tflops
    # Tensor and data groups run in lockstep, so the slowest device sets the pace.
    peak = min((g.peak_bf16_tflops if g and g.peak_bf16_tflops else default) for g in groups)
    tensor = min((group_link(topology, row) for row in devices), key=_bw, default=None)
    data_groups = [[row[t] for row in devices] for t in range(len(devices[0]))]
    data = min((group_link(topology, g) for g in data_groups), key=_bw, default=None)
    return _Slot(tuple(tuple(r) for r in devices), tuple(sorted({g.kind if g else "" for g in groups})),
                 peak, tensor, data)


def _bw(link: Link | None) -> float:
    return math.inf if link is None else link.bandwidth_gbps


def _evaluate(topology: Topology, work: Workload, a: Assumptions, slots, layers, tp: int, dp: int,
              microbatches: int) -> Plan:
    tokens = a.microbatch_size * a.seq_len
    act_bytes = tokens * work.dim * a.bytes_per_value
    pp = len(slots)
    stages = []
    for s, (slot, n) in enumerate(zip(slots, layers)):
        flops = tokens * n * work.layer_flops_per_token
        params = n * work.layer_params
        if s == pp - 1:
            flops += tokens * work.head_flops_per_token
            params += work.head_params
        if s == 0:
            params += work.embed_params
        compute = flops / tp / (slot.peak * 1e12 * a.mfu)
        tensor_comm = 2 * n * _allreduce_s(act_bytes, tp, slot.tensor_link)  # per direction
        send_link = None
        if s + 1 < pp:
            pairs = zip((d for r in slot.devices for d in r), (d for r in slots[s + 1].devices for d in r))
            send_link = min((group_link(topology, pair) for pair in pairs), key=_bw)
        send = _send_s(act_bytes / tp, send_link)
        sync = _allreduce_s(params / tp * a.bytes_per_value, dp, slot.data_link)
        stages.append(Stage(index=s, devices=slot.devices, layers=n, nic_kinds=slot.nic_kinds,
                            peak_bf16_tflops=slot.peak, forward_s=compute / 3 + tensor_comm,
                            backward_s=2 * compute / 3 + tensor_comm, send_s=send, grad_sync_s=sync,
                            tensor_link=_name(slot.tensor_link), data_link=_name(slot.data_link),
                            send_link=_name(send_link)))
    m = microbatches
    # Each phase: the slowest stage (with its send) paces M - 1 microbatches; one microbatch
    # crosses every stage once. The backward sends the same bytes back over the same links.
    forward = (m - 1) * max(st.forward_s + st.send_s for st in stages) + sum(st.forward_s + st.send_s
                                                                            for st in stages)
    backward = (m - 1) * max(st.backward_s + st.send_s for st in stages) + sum(st.backward_s + st.send_s
                                                                              for st in stages)
    pipeline = forward + backward
    drain, step = 0.0, 0.0
    for st in stages:  # stage s ends its backward while stages 0..s-1 still drain
        step = max(step, pipeline - drain + st.grad_sync_s)
        drain += st.backward_s + st.send_s
    busy = sum(m * (st.forward_s + st.backward_s) for st in stages)
    return Plan(topology=topology.name, tp=tp, pp=pp, dp=dp, microbatches=m, stages=tuple(stages),
                pipeline_s=pipeline, step_s=step, bubble_fraction=1 - busy / (pp * pipeline))


def _name(link: Link | None) -> str:
    return "" if link is None else link.name


# ---------------------------------------------------------------------------
# Planning


def check_degrees(topology: Topology, n_layers: int, tp: int, pp: int, dp: int) -> None:
    """Raises ValueError when no plan with these degrees can exist."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if tp * pp * dp != topology.num_devices:
        raise ValueError(f"tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp}, but mesh preset {topology.name} has "
                         f"{topology.num_devices} devices; pick degrees whose product is {topology.num_devices}")
    if n_layers < pp:
        raise ValueError(f"a model with {n_layers} layers cannot fill {pp} pipeline stages (each needs at least "
                         "one layer); use fewer stages")
    per_node = devices_per_node(topology)
    if tp > per_node or per_node % tp:
        raise ValueError(f"a tensor-parallel group of {tp} devices does not fit a {topology.levels[-1].name} of "
                         f"{per_node} devices of {topology.name}; tensor parallelism needs the fast links inside one "
                         f"{topology.levels[-1].name}: use a divisor of {per_node}")


def microbatch_count(a: Assumptions, dp: int) -> int:
    per_replica, rest = divmod(a.global_batch, dp * a.microbatch_size)
    if rest or per_replica < 1:
        raise ValueError(f"global batch {a.global_batch} does not split into microbatches of {a.microbatch_size} "
                         f"over {dp} data-parallel replicas; pick a multiple of {dp * a.microbatch_size}")
    return per_replica


def naive_plan(topology: Topology, work: Workload, tp: int, pp: int, dp: int,
               assumptions: Assumptions = Assumptions()) -> Plan:
    """Devices in id order, tensor innermost, then data, then pipeline; equal layers per stage."""
    check_degrees(topology, work.n_layers, tp, pp, dp)
    m = microbatch_count(assumptions, dp)
    per_stage = tp * dp
    slots = [_slot(topology, [tuple(range(s * per_stage + d * tp, s * per_stage + (d + 1) * tp))
                              for d in range(dp)], assumptions) for s in range(pp)]
    return _evaluate(topology, work, assumptions, slots, equal_layers(work.n_layers, pp), tp, dp, m)


def equal_layers(n_layers: int, pp: int) -> list[int]:
    base, extra = divmod(n_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def nic_aware_slots(topology: Topology, tp: int, pp: int, dp: int, assumptions: Assumptions) -> list[_Slot]:
    """Stage-sized blocks of devices, each inside one fabric, tensor groups inside one node."""
    per_node = devices_per_node(topology)
    fabrics: dict[str, list[int]] = {}
    for node in range(topology.levels[-1].size):
        fabrics.setdefault(_fabric(topology, node), []).extend(range(node * per_node, (node + 1) * per_node))
    per_stage = tp * dp
    uneven = {f: len(d) for f, d in fabrics.items() if len(d) % per_stage}
    if uneven:
        raise ValueError(
            f"a stage of tp x dp = {per_stage} devices cannot stay inside one fabric of {topology.name}: fabric(s) "
            + ", ".join(f"{f or 'default'} ({n} devices)" for f, n in uneven.items())
            + f" do not split into stages of {per_stage}; use more pipeline stages or less data parallelism")
    slots = []
    for devices in fabrics.values():
        for start in range(0, len(devices), per_stage):
            block = devices[start:start + per_stage]
            slots.append(_slot(topology, [tuple(block[d * tp:(d + 1) * tp]) for d in range(dp)], assumptions))
    return slots


def partition_layers(evaluate, n_layers: int, pp: int, speeds) -> list[int]:
    """Layers per stage minimizing ``evaluate(layers).step_s``: start proportional to
    ``speeds`` (layers per second), then move one layer at a time while the step gets faster."""
    total = sum(speeds)
    layers = [max(1, int(n_layers * s / total)) for s in speeds]
    while sum(layers) > n_layers:
        layers[layers.index(max(layers))] -= 1
    while sum(layers) < n_layers:
        layers[min(range(pp), key=lambda i: layers[i] / speeds[i])] += 1
    best = evaluate(layers).step_s
    improved = True
    while improved:
        improved = False
        for i, j in itertools.permutations(range(pp), 2):
            if layers[i] <= 1:
                continue
            trial = list(layers)
            trial[i] -= 1
            trial[j] += 1
            cost = evaluate(trial).step_s
            if cost < best - 1e-12:
                layers, best, improved = trial, cost, True
    return layers


MAX_ORDERS = 256  # stage orders tried; beyond this, stages keep their fabric order


def plan_pipeline(topology: Topology, work: Workload, tp: int, pp: int, dp: int,
                  assumptions: Assumptions = Assumptions()) -> Plan:
    """The NIC-aware plan: stages inside fabrics, stage order and layers chosen by the cost model."""
    check_degrees(topology, work.n_layers, tp, pp, dp)
    m = microbatch_count(assumptions, dp)
    slots = nic_aware_slots(topology, tp, pp, dp, assumptions)
    orders = _distinct_orders(slots)
    best = None
    for order in orders:
        ordered = [slots[i] for i in order]

        def evaluate(layers, ordered=ordered):
            return _evaluate(topology, work, assumptions, ordered, layers, tp, dp, m)

        # A stage's speed alone (one layer, its compute and tensor all-reduces).
        one_layer = [evaluate([1] * pp).stages[s] for s in range(pp)]
        speeds = [1 / (st.forward_s + st.backward_s) for st in one_layer]
        plan = evaluate(partition_layers(evaluate, work.n_layers, pp, speeds))
        if best is None or plan.step_s < best.step_s:
            best = plan
    return best


def _distinct_orders(slots) -> list[tuple[int, ...]]:
    """Stage orders that differ in what sits where (slots with equal costs are interchangeable)."""
    signature = [(s.nic_kinds, s.peak, _name(s.tensor_link), _name(s.data_link)) for s in slots]
    seen, orders = set(), []
    for order in itertools.permutations(range(len(slots))):
        key = tuple(signature[i] for i in order)
        if key in seen:
            continue
        seen.add(key)
        orders.append(order)
        if len(orders) >= MAX_ORDERS:
            break
    return orders


def crossing_groups(topology: Topology, plan: Plan) -> dict[str, int]:
    """How many tensor / data / stage groups span more than one NIC kind."""
    return {axis: sum(len({nic_kind(topology, d) for d in g}) > 1 for g in plan.groups(axis))
            for axis in MESH_AXES}


def plan_report(topology: Topology, config, tp: int, pp: int, dp: int,
                assumptions: Assumptions = Assumptions(), model: str = "") -> PlanReport:
    """The NIC-aware plan and the naive one for a model config on a topology."""
    work = Workload.from_model(config, assumptions.seq_len)
    plan = plan_pipeline(topology, work, tp, pp, dp, assumptions)
    naive = naive_plan(topology, work, tp, pp, dp, assumptions)
    return PlanReport(plan, naive, assumptions, model,
                      {"plan": crossing_groups(topology, plan), "naive": crossing_groups(topology, naive)})


def format_report(report: PlanReport) -> str:
    """A readable summary of a plan against the naive one."""
    p, n, a = report.plan, report.naive, report.assumptions
    lines = [f"{report.model or 'model'} on {p.topology}: TP {p.tp} x PP {p.pp} x DP {p.dp}, "
             f"{p.microbatches} microbatches of {a.microbatch_size} x {a.seq_len} tokens per replica",
             "", "NIC-aware plan (mesh axes stage x data x tensor):"]
    rows = [["stage", "layers", "nic", "devices", "fwd+bwd ms/mb", "send ms", "grad sync ms", "links tp/dp/send"]]
    for st in p.stages:
        flat = [d for r in st.devices for d in r]
        rows.append([str(st.index), str(st.layers), "+".join(k or "-" for k in st.nic_kinds),
                     f"{min(flat)}-{max(flat)}" if flat == list(range(min(flat), max(flat) + 1)) else str(flat),
                     f"{(st.forward_s + st.backward_s) * 1e3:.1f}", f"{st.send_s * 1e3:.2f}",
                     f"{st.grad_sync_s * 1e3:.1f}",
                     "/".join(x or "-" for x in (st.tensor_link, st.data_link, st.send_link))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines += ["",
              f"predicted step {p.step_s:.3f} s (pipeline {p.pipeline_s:.3f} s, bubble {p.bubble_fraction:.1%}); "
              f"naive plan {n.step_s:.3f} s with layers {list(n.layers_per_stage)}, "
              f"grad sync over {'/'.join(sorted({s.data_link for s in n.stages}))}; "
              f"speedup {report.speedup_vs_naive:.2f}x",
              f"groups spanning NIC kinds (tensor/data/stage): plan "
              + "/".join(str(report.crossings['plan'][ax]) for ax in ('tensor', 'data', 'stage'))
              + ", naive " + "/".join(str(report.crossings['naive'][ax]) for ax in ('tensor', 'data', 'stage')),
              f"assumptions: {a.mfu:.0%} of bf16 peak, {a.bytes_per_value}-byte activations and gradients, "
              f"global batch {a.global_batch} x {a.seq_len} tokens, no overlap of communication with compute"]
    return "\n".join(lines)
