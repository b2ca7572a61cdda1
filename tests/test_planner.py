"""NIC-aware pipeline planner: groups inside fabrics, adaptive layers, predictions, errors. No JAX."""

import dataclasses
import json
import textwrap

import pytest

import meshes
from jaxsys import cli
from jaxsys.config import get_preset
from meshes import planner
from meshes.planner import Assumptions, Workload

HETERO = meshes.load_topology("hetero-ib-roce")
LLAMA = get_preset("llama3-8b")


def kinds_of(topology, group):
    """NIC kinds of a group's nodes, read from the TOML's node order (not via the planner)."""
    per_node = topology.levels[0].size
    kinds = [g.kind for g in topology.nic_groups for _ in range(g.nodes)]
    return {kinds[d // per_node] for d in group}


@pytest.fixture(scope="module")
def llama_report():
    return planner.plan_report(HETERO, LLAMA, tp=8, pp=2, dp=2, model="llama3-8b")


def test_hetero_ib_roce_preset_alternates_nic_kinds():
    assert HETERO.num_devices == 32 and HETERO.mesh_shape == (4, 8)
    assert [HETERO.node_group(n).kind for n in range(4)] == ["infiniband", "roce", "infiniband", "roce"]
    assert HETERO.fabric_link("infiniband", "roce").kind == "ethernet"
    clusters = meshes.load_topology("two-clusters")
    assert [g.fabric for g in clusters.nic_groups] == ["cluster_a", "cluster_b"]
    assert "links between fabrics" in meshes.describe(clusters)


def test_plan_keeps_tensor_and_data_groups_inside_one_nic_kind(llama_report):
    plan, naive = llama_report.plan, llama_report.naive
    grid = plan.device_grid
    assert sorted(d for stage in grid for row in stage for d in row) == list(range(32))  # every device once
    assert [len(g) for g in plan.groups("tensor")] == [8] * 4
    assert [len(g) for g in plan.groups("data")] == [2] * 16
    for axis in ("tensor", "data"):
        assert all(len(kinds_of(HETERO, g)) == 1 for g in plan.groups(axis)), axis
    # Only the pipeline axis crosses kinds; the naive order sends data-parallel traffic over Ethernet.
    assert all(len(kinds_of(HETERO, g)) == 2 for g in plan.groups("stage"))
    assert any(len(kinds_of(HETERO, g)) == 2 for g in naive.groups("data"))
    assert llama_report.crossings["plan"]["data"] == 0 and llama_report.crossings["naive"]["data"] == 16


def test_plan_beats_the_naive_order_by_a_quarter(llama_report):
    assert llama_report.plan.step_s <= 0.75 * llama_report.naive.step_s
    assert sum(llama_report.plan.layers_per_stage) == LLAMA.n_layers
    assert llama_report.naive.layers_per_stage == (16, 16)
    # The naive data-parallel all-reduce runs over the Ethernet link between the fabrics.
    assert {s.data_link for s in llama_report.naive.stages} == {"infiniband/roce"}


def test_faster_stages_get_more_layers():
    """two-clusters: H100 stages outrun A100 ones, so they hold more layers (self-adapting partition)."""
    clusters = meshes.load_topology("two-clusters")
    plan = planner.plan_pipeline(clusters, Workload.from_model(LLAMA, 2048), 8, 2, 2)
    fast = [s.layers for s in plan.stages if s.peak_bf16_tflops == 989.0]
    slow = [s.layers for s in plan.stages if s.peak_bf16_tflops == 312.0]
    assert len(fast) == len(slow) == 1 and fast[0] > 2 * slow[0]
    per_layer = [(s.forward_s + s.backward_s) / s.layers for s in plan.stages]
    assert max(per_layer) / min(per_layer) > 2  # the speeds really differ
    # On a homogeneous cluster with no output head to carry, the split is equal.
    flat = dataclasses.replace(Workload.from_model(LLAMA, 2048), head_params=0, head_flops_per_token=0,
                               embed_params=0)
    dgx = meshes.load_topology("dgx-h100")
    assert planner.plan_pipeline(dgx, flat, 8, 4, 1).layers_per_stage == (8, 8, 8, 8)


def test_equal_stages_have_gpipes_bubble():
    """With free links and no output head, stages are equal and idle (P-1)/(M+P-1) of the time."""
    flat = dataclasses.replace(Workload.from_model(LLAMA, 2048), head_params=0, head_flops_per_token=0,
                               embed_params=0)
    free = meshes.Topology("free", (meshes.Level("gpu", 8, 1e9), meshes.Level("node", 4, 1e9)))
    for pp, tp, batch in ((2, 8, 8), (4, 8, 32), (4, 2, 16)):
        plan = planner.naive_plan(free, flat, tp, pp, 32 // (tp * pp), Assumptions(global_batch=batch))
        m = plan.microbatches
        assert plan.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), rel=1e-6)
        per_tick = plan.stages[0].forward_s + plan.stages[0].backward_s
        assert plan.pipeline_s == pytest.approx((m + pp - 1) * per_tick, rel=1e-6)


def test_links_follow_the_topology():
    assert planner.group_link(HETERO, range(8)).name == "gpu"
    ib = planner.group_link(HETERO, [0, 16])
    assert (ib.name, ib.bandwidth_gbps) == ("fabric:infiniband", 25.0)
    across = planner.group_link(HETERO, [0, 8])
    assert (across.kind, across.bandwidth_gbps) == ("ethernet", 0.78)
    assert planner.group_link(HETERO, [3]) is None


@pytest.mark.parametrize("degrees, message", [
    ((8, 2, 4), r"tp x pp x dp = 8 x 2 x 4 = 64, but mesh preset hetero-ib-roce has 32 devices"),
    ((16, 2, 1), r"tensor-parallel group of 16 devices does not fit a node of 8 devices"),
    ((8, 1, 4), r"stage of tp x dp = 32 devices cannot stay inside one fabric"),
    ((0, 4, 8), r"tp=0 must be a positive integer"),
])
def test_impossible_plans_are_clear_errors(degrees, message):
    with pytest.raises(ValueError, match=message):
        planner.plan_report(HETERO, LLAMA, *degrees)


def test_too_few_layers_and_batches_are_clear_errors():
    with pytest.raises(ValueError, match=r"2 layers cannot fill 4 pipeline stages"):
        planner.plan_report(HETERO, get_preset("tiny"), 8, 4, 1)
    with pytest.raises(ValueError, match=r"global batch 6 does not split into microbatches of 1 over 4"):
        planner.plan_report(HETERO, LLAMA, 4, 2, 4, Assumptions(global_batch=6))


def test_plan_command_prints_json_and_errors(capsys, tmp_path):
    assert cli.main(["plan", "--mesh", "hetero-ib-roce", "--model", "llama3-8b", "--tp", "8", "--pp", "2",
                     "--dp", "2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert result["speedup_vs_naive"] == pytest.approx(result["naive_step_s"] / result["predicted_step_s"])
    assert sum(result["plan"]["layers_per_stage"]) == 32 and len(result["plan"]["stages"]) == 2
    assert result["plan"]["stages"][0]["devices"] and result["assumptions"]["mfu"] == 0.45
    assert cli.main(["plan", "--mesh", "hetero-ib-roce", "--tp", "16", "--pp", "2"]) == 1
    assert "does not fit a node" in capsys.readouterr().err
    # A TOML whose fabrics no group link joins: they meet over the outermost level.
    path = tmp_path / "pair.toml"
    path.write_text(textwrap.dedent("""
        [[levels]]
        name = "gpu"
        size = 2
        bandwidth_gbps = 100
        [[levels]]
        name = "node"
        size = 2
        bandwidth_gbps = 0.5
        [[nic_groups]]
        name = "a"
        kind = "infiniband"
        nodes = 1
        bandwidth_gbps = 20
        [[nic_groups]]
        name = "b"
        kind = "roce"
        nodes = 1
        bandwidth_gbps = 10
    """))
    assert planner.group_link(meshes.load_topology(str(path)), [0, 2]).bandwidth_gbps == 0.5


def test_bad_group_links_say_what_is_wrong(tmp_path):
    path = tmp_path / "bad.toml"
    base = ('[[levels]]\nname = "node"\nsize = 2\nbandwidth_gbps = 1.0\n'
            '[[nic_groups]]\nname = "a"\nkind = "roce"\nnodes = 2\nbandwidth_gbps = 1.0\n')
    for extra, message in (
            ('[[group_links]]\nkind = "ethernet"\nbandwidth_gbps = 1.0\nfabrics = ["roce", "x"]\n',
             r"names fabric\(s\) \['x'\] that no nic group uses"),
            ('[[group_links]]\nkind = "carrier-pigeon"\nbandwidth_gbps = 1.0\n', "kind 'carrier-pigeon'"),
            ('[[group_links]]\nkind = "ethernet"\nbandwidth_gbps = 1.0\nfabrics = ["roce"]\n',
             "must name two different fabrics")):
        path.write_text(base + extra)
        with pytest.raises(ValueError, match=message):
            meshes.load_topology(str(path))
