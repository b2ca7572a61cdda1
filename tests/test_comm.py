"""Per-level communication accounting: HLO parsing, level attribution, ring volumes, strategies."""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import meshes
from jaxsys import comm
from jaxsys.config import get_preset
from jaxsys.sharding.zero import ZeroOptions
from jaxsys.train import TrainConfig

AXES = ("node", "gpu", "gcd")  # cpu8, outermost first
ALL = P(AXES)

# ---------------------------------------------------------------------------
# Replica groups in every syntax XLA prints


def test_explicit_and_empty_groups():
    assert comm.parse_replica_groups("replica_groups={{0,1},{2,3}}, dimensions={0}") == [[0, 1], [2, 3]]
    assert comm.parse_replica_groups("replica_groups={}, to_apply=%add") is None  # all devices
    assert comm.parse_replica_groups("channel_id=1, dimensions={0}") is None


def test_iota_groups_with_and_without_transpose():
    assert comm.parse_replica_groups("replica_groups=[4,2]<=[8], x") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # iota(8) as [4,2], transposed: the groups stride by 2
    assert comm.parse_replica_groups("replica_groups=[2,4]<=[4,2]T(1,0), x") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # iota(8) as [2,2,2] with the outer and inner dims swapped: groups pair devices 4 apart
    assert comm.parse_replica_groups("replica_groups=[4,2]<=[2,2,2]T(2,1,0), x") == [
        [0, 4], [2, 6], [1, 5], [3, 7]]


def test_mesh_axes_groups():
    # the form this JAX prints for collectives the SPMD partitioner inserts
    text = "replica_groups=mesh['axis_0'=1,'axis_1'=8,'axis_2'=1], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={1}"
    assert comm.parse_replica_groups(text) == [[0, 4, 1, 5, 2, 6, 3, 7]]
    assert comm.parse_replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b'}") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert comm.parse_replica_groups("replica_groups=mesh[a=2,b=4] {a}") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # an explicit device list, and the major 2-factor of b (stride 2 inside b)
    assert comm.parse_replica_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=(3,2,1,0) {'b'}") == [
        [3, 2], [1, 0]]
    assert comm.parse_replica_groups("replica_groups=mesh['a'=2,'b'=4] {'b':(1)2}") == [
        [0, 2], [1, 3], [4, 6], [5, 7]]


def test_source_target_pairs():
    attrs = "channel_id=1, source_target_pairs={{0,4},{4,0},{1,5}}, metadata={}"
    assert comm.parse_source_target_pairs(attrs) == [(0, 4), (4, 0), (1, 5)]


# ---------------------------------------------------------------------------
# A hand-written module: async pairs, loops, wrappers, tuples, XLA:CPU's bf16 upcast

MODULE = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%upcast (p: f32[4,16]) -> f32[4,16] {
  %p = f32[4,16]{1,0} parameter(0)
  %n = bf16[4,16]{1,0} convert(%p)
  ROOT %w = f32[4,16]{1,0} convert(%n)
}

%body (t: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %t = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%t), index=1
  %rs = f32[2,16]{1,0} reduce-scatter(%x), channel_id=3, replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, dimensions={0}, to_apply=%add
  ROOT %r = (s32[], f32[8,16]{1,0}) tuple(%i, %x)
}

%cond (c: (s32[], f32[8,16])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

%wrapped (q: s8[8,32]) -> s8[8,32] {
  %q = s8[8,32]{1,0} parameter(0)
  ROOT %a2a = s8[8,32]{1,0} all-to-all(%q), channel_id=4, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
}

ENTRY %main (p0: f32[4,16], p1: f32[8,16], p2: s8[8,32], p3: f32[], p4: f32[]) -> (bf16[32,16], f32[32,16]) {
  %p0 = f32[4,16]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  %p2 = s8[8,32]{1,0} parameter(2)
  %p3 = f32[] parameter(3)
  %p4 = f32[] parameter(4)
  %up = f32[4,16]{1,0} fusion(%p0), kind=kLoop, calls=%upcast
  %ags = (f32[4,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%up), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %agd = f32[32,16]{1,0} all-gather-done(%ags)
  %back = bf16[32,16]{1,0} convert(%agd)
  %ag32 = f32[32,16]{1,0} all-gather(%up), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %ar = (f32[], f32[]) all-reduce(%p3, %p4), channel_id=2, replica_groups={}, use_global_device_ids=true, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %p1)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %as = ((s8[8,32]{1,0}), s8[8,32]{1,0}, s32[]) async-start(%p2), calls=%wrapped
  %ad = s8[8,32]{1,0} async-done(%as), calls=%wrapped
  %cp = f32[8,16]{1,0} collective-permute(%p1), channel_id=5, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  ROOT %out = (bf16[32,16]{1,0}, f32[32,16]{1,0}) tuple(%back, %ag32)
}
"""


def _charged(hlo, **kwargs):
    found = comm.collectives(hlo, **kwargs)
    return {c.name: comm.charge(c, AXES, (2, 2, 2)) for c in found}


def test_hand_written_module_counts_and_bytes():
    found = _charged(MODULE)
    # the -done half and the async-done wrapper are not counted again
    assert sorted(found) == ["a2a", "ag32", "ags", "ar", "cp", "rs"]
    ag, ar, rs, a2a, cp = (found[n] for n in ("ags", "ar", "rs", "a2a", "cp"))
    assert (ag.kind, ag.result_shapes, ag.level, ag.group_size) == ("all-gather", ["f32[32,16]"], "node", 8)
    assert ag.bytes_per_device == 7 / 8 * 32 * 16 * 4  # (n-1)/n of the result
    assert ar.operand_shapes == ["f32[]", "f32[]"] and ar.bytes_per_device == 2 * 7 / 8 * 8
    # [[0,2,4,6],[1,3,5,7]]: node and gpu vary, gcd is fixed -> node, the outermost spanned
    assert (rs.count, rs.axes, rs.level, rs.bytes_per_device) == (4, ("node", "gpu"), "node", 3 / 4 * 8 * 16 * 4)
    assert (a2a.kind, a2a.level, a2a.count, a2a.bytes_per_device) == ("all-to-all", "node", 1, 1 / 2 * 8 * 32)
    assert (cp.level, cp.bytes_per_device) == ("gcd", 8 * 16 * 4)
    report = comm.summarize(list(found.values()), AXES[::-1])
    assert report.bytes_per_level == {"gcd": 512.0, "gpu": 0.0, "node": 2 * 1792 + 14 + 4 * 384 + 128}
    assert report.collectives_per_level == {"gcd": 1, "gpu": 0, "node": 8}


def test_cpu_bf16_upcast_is_counted_at_bf16():
    found = _charged(MODULE, narrow_cpu_upcasts=True)
    # bf16 in, converted to f32 for the CPU's collective, converted back to bf16 by its user
    assert found["ags"].sent_dtypes == ["bf16"] and found["ags"].bytes_per_device == 7 / 8 * 32 * 16 * 2
    # the same operand, but the program uses the f32 result: an f32 collective
    assert found["ag32"].sent_dtypes == ["f32"] and found["ag32"].bytes_per_device == 7 / 8 * 32 * 16 * 4
    assert found["cp"].sent_dtypes == ["f32"]
    assert _charged(MODULE)["ags"].sent_dtypes == ["f32"]  # as compiled


def test_device_ids_outside_the_mesh_are_an_error():
    found = comm.collectives(MODULE)
    with pytest.raises(ValueError, match="outside the 4-device mesh"):
        comm.charge(found[0], ("gpu", "gcd"), (2, 2))


# ---------------------------------------------------------------------------
# Real compiled shard_map programs on cpu8


@pytest.fixture(scope="module")
def cpu8():
    topology = meshes.load_topology("cpu8")
    return topology, meshes.build_mesh(topology)


def _shard_map_report(fn, mesh, topology, in_spec=ALL, out_spec=ALL, shape=(16, 32), dtype=jnp.float32):
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False))
    return comm.analyze(f, (jax.ShapeDtypeStruct(shape, dtype),), mesh, topology)


@pytest.mark.parametrize("axes,level", [("gcd", "gcd"), ("gpu", "gpu"), ("node", "node"),
                                        (("gpu", "gcd"), "gpu"), (("node", "gcd"), "node")])
def test_psum_is_charged_to_the_outermost_level_it_spans(cpu8, axes, level):
    topology, mesh = cpu8
    report = _shard_map_report(lambda x: lax.psum(x, axes), mesh, topology)
    n = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    local = 16 // 8 * 32 * 4  # bytes of one device's block
    assert report.bytes_per_level == {name: (2 * (n - 1) / n * local if name == level else 0.0)
                                      for name in ("gcd", "gpu", "node")}
    assert report.collectives_per_level[level] == 1
    link = topology.level(level)
    assert report.est_comm_s_per_level[level] == pytest.approx(
        2 * (n - 1) / n * local / (link.bandwidth_gbps * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6)


def test_groups_are_mesh_positions_not_device_ids(cpu8):
    topology, _ = cpu8
    # device ids no longer follow mesh order: positions 0,1 (one GPU's GCDs) hold devices 0 and 4
    devices = [jax.devices()[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    mesh = meshes.mesh_for_shape(AXES, (2, 2, 2), devices)
    for axis in AXES:
        report = _shard_map_report(lambda x: lax.psum(x, axis), mesh, topology)
        assert [c.level for c in report.collectives] == [axis]


def test_all_gather_over_every_level_is_charged_to_node_with_ring_volume(cpu8):
    topology, mesh = cpu8
    report = _shard_map_report(lambda x: lax.all_gather(x, AXES, tiled=True), mesh, topology,
                               out_spec=P(), shape=(64, 32), dtype=jnp.bfloat16)
    (ag,) = report.collectives
    result = 64 * 32 * 2  # the gathered bf16 array
    assert (ag.kind, ag.group_size, ag.axes, ag.level) == ("all-gather", 8, AXES, "node")
    assert report.bytes_per_level == {"gcd": 0.0, "gpu": 0.0, "node": 7 / 8 * result}


def test_collectives_in_a_scan_count_once_per_iteration(cpu8):
    topology, mesh = cpu8

    def fn(x):  # x: [3, local] -> psum over gpu in each of 3 steps
        total, _ = lax.scan(lambda c, row: (c + lax.psum(row, "gpu"), None), jnp.zeros_like(x[0]), x)
        return total

    report = _shard_map_report(fn, mesh, topology, in_spec=P(None, AXES), shape=(3, 64))
    (ar,) = report.collectives
    assert (ar.count, ar.level, report.notes) == (3, "gpu", [])
    assert report.bytes_per_level["gpu"] == 3 * 2 * (1 / 2) * 8 * 4


# ---------------------------------------------------------------------------
# Train steps of the strategies (tiny, bf16): where ZeRO's bytes go


ZERO3_ARGS = ["comm", "--model", "tiny", "--mesh", "cpu8", "--strategy", "zero3", "--dtype", "bfloat16",
              "--no-quantized-collectives", "--seq-len", "32"]


def _cli_args(argv):
    parser = argparse.ArgumentParser()
    comm.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_reports(cpu8):
    topology, mesh = cpu8
    config = dataclasses.replace(get_preset("tiny"), dtype="bfloat16")

    def report(strategy, quantized):
        tc = TrainConfig(strategy=strategy, batch_size=8, seq_len=32,
                         zero=ZeroOptions(quantized_collectives=quantized))
        return comm.analyze_train_step(config, tc, mesh, topology)

    return config, {"zero3": comm.report_for_args(_cli_args(ZERO3_ARGS)),
                    "hier": report("hier", False), "zeropp": report("zeropp", True)}


def test_zero3_sends_everything_over_node(tiny_reports):
    config, reports = tiny_reports
    zero3 = reports["zero3"]
    # flat groups over all 8 devices: nothing stays inside a node
    assert zero3.bytes_per_level["gcd"] == zero3.bytes_per_level["gpu"] == 0
    assert zero3.collectives_per_level["node"] > 0 and zero3.est_comm_s_per_level["node"] > 0
    # every gradient is reduce-scattered once over all 8 devices, in bf16; weights gathered at least once
    param_bytes = 2 * config.num_params
    assert zero3.bytes_by_kind["node"]["reduce-scatter"] == pytest.approx(7 / 8 * param_bytes)
    assert zero3.bytes_by_kind["node"]["all-gather"] >= 7 / 8 * param_bytes


def test_hier_stages_gradients_innermost_first(tiny_reports):
    config, reports = tiny_reports
    hier = reports["hier"].bytes_by_kind
    param_bytes = 2 * config.num_params
    # each level halves the volume before the next, slower one
    assert hier["gcd"]["reduce-scatter"] == pytest.approx(param_bytes / 2)
    assert hier["gpu"]["reduce-scatter"] == pytest.approx(param_bytes / 4)
    assert hier["node"]["reduce-scatter"] == pytest.approx(param_bytes / 8)
    levels = reports["hier"].bytes_per_level
    assert levels["gcd"] > levels["gpu"] > levels["node"] > 0


def test_zeropp_and_hier_send_less_over_node_than_zero3(tiny_reports):
    _, reports = tiny_reports
    zero3_node = reports["zero3"].bytes_per_level["node"]
    assert reports["zeropp"].bytes_per_level["node"] < 0.5 * zero3_node
    assert reports["hier"].bytes_per_level["node"] < 0.5 * zero3_node


def test_cli_json_is_one_line(tiny_reports, capsys):
    # the same program as the fixture's zero3 report: a persistent-cache hit
    assert comm.run(_cli_args(ZERO3_ARGS + ["--json"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["strategy"] == "zero3" and out["mem_bytes_per_device"] > 0
    assert out["bytes_per_level"] == tiny_reports[1]["zero3"].bytes_per_level
    assert set(out["collectives_per_level"]) == set(out["est_comm_s_per_level"]) == {"gcd", "gpu", "node"}
