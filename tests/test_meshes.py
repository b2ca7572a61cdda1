"""meshes/: topology presets, TOML errors, mesh layout, collectives per level, multi-process."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import meshes
from meshes.simulate import _with_device_count_flag

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 120


def _run_python(code: str, env_updates: dict[str, str], timeout: float = SUBPROCESS_TIMEOUT_S):
    """Runs ``code`` in a fresh interpreter (jax not imported yet) with the repo importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu", **env_updates}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


# --- topologies, no JAX ---------------------------------------------------------------------

@pytest.mark.parametrize("name, axes, shape, bandwidths", [
    ("cpu8", ("node", "gpu", "gcd"), (2, 2, 2), (200.0, 50.0, 12.5)),
    ("frontier", ("node", "gpu", "gcd"), (48, 4, 2), (200.0, 50.0, 12.5)),
    ("dgx-h100", ("node", "gpu"), (4, 8), (450.0, 50.0)),
])
def test_presets_load_with_their_sizes_and_axes(name, axes, shape, bandwidths):
    topology = meshes.load_topology(name)
    assert name in meshes.list_presets()
    assert topology.name == name
    assert topology.axis_names == axes
    assert topology.level_names == axes[::-1]
    assert topology.mesh_shape == shape
    assert topology.num_devices == int(np.prod(shape))
    assert tuple(level.bandwidth_gbps for level in topology.levels) == bandwidths
    assert topology.nic_groups == ()


def test_frontier_is_the_papers_384_gcds_and_rescales_for_planning():
    frontier = meshes.load_topology("frontier")
    assert frontier.num_devices == 384
    assert frontier.level("gpu").size == 4
    bigger = frontier.with_size("node", 1024)
    assert bigger.num_devices == 1024 * 8 and frontier.level("node").size == 48
    with pytest.raises(ValueError, match="no level 'rack'; its levels are gcd, gpu, node"):
        frontier.with_size("rack", 2)


def test_a_toml_path_loads_and_nic_groups_parse(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text(textwrap.dedent("""
        [[levels]]
        name = "gpu"
        size = 4
        bandwidth_gbps = 300
        [[levels]]
        name = "node"
        size = 3
        bandwidth_gbps = 25.0
        latency_us = 4
        [[nic_groups]]
        name = "ib"
        kind = "infiniband"
        nodes = 2
        bandwidth_gbps = 25.0
        [[nic_groups]]
        name = "eth"
        kind = "ethernet"
        nodes = 1
        bandwidth_gbps = 3.0
    """))
    topology = meshes.load_topology(str(path))
    assert topology == meshes.load_topology(path)  # str and Path alike
    assert topology.name == "mixed" and topology.mesh_shape == (3, 4)
    assert topology.level("gpu") == meshes.Level("gpu", 4, 300.0, 0.0)
    assert [(g.name, g.kind, g.nodes) for g in topology.nic_groups] == [
        ("ib", "infiniband", 2), ("eth", "ethernet", 1)]
    assert "nic groups" in meshes.describe(topology)


LEVEL = '[[levels]]\nname = "gpu"\nsize = 2\nbandwidth_gbps = 10.0\n'


@pytest.mark.parametrize("text, message", [
    ("levels = [", "not valid TOML"),
    ('name = "x"\n', "missing required key(s) levels"),
    ('[[levels]]\nname = "gpu"\nsize = 2\n', "#1 is missing required key(s) bandwidth_gbps"),
    (LEVEL.replace("size = 2", "size = 0"), "level 'gpu' size must be a positive integer, got 0"),
    (LEVEL.replace("size = 2", "size = 2.5"), "size must be a positive integer, got 2.5"),
    (LEVEL.replace("10.0", "-1.0"), "bandwidth_gbps must be a positive number"),
    (LEVEL + LEVEL, "duplicate level names ['gpu']"),
    (LEVEL + "bandwith_gbps = 3\n", "unknown key(s) bandwith_gbps"),
    (LEVEL.replace('"gpu"', '"my gpu"'), "must be a non-empty identifier"),
    (LEVEL + '[[nic_groups]]\nname = "a"\nkind = "token-ring"\nnodes = 2\nbandwidth_gbps = 1.0\n',
     "kind 'token-ring' is not one of infiniband, roce, ethernet"),
    (LEVEL + '[[nic_groups]]\nname = "a"\nkind = "roce"\nnodes = 3\nbandwidth_gbps = 1.0\n',
     "nic groups cover 3 gpus but the outermost level 'gpu' has size 2"),
])
def test_bad_toml_says_which_file_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        meshes.load_topology(str(path))
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_unknown_preset_and_missing_file_say_what_exists():
    with pytest.raises(ValueError, match=r"unknown mesh preset 'frontear'; available presets: "
                                         r"cpu8, dgx-h100, frontier"):
        meshes.load_topology("frontear")
    with pytest.raises(ValueError, match=r"cannot read topology file /nonexistent/x.toml"):
        meshes.load_topology("/nonexistent/x.toml")


def test_describe_shows_levels_axes_and_device_grid():
    text = meshes.describe(meshes.load_topology("cpu8"))
    assert "mesh axes, outermost first: node=2 x gpu=2 x gcd=2" in text
    assert "total devices: 8" in text
    grid = text.split("device grid")[1].splitlines()
    # node 1, gpu 1 holds devices 6 and 7: gcd is the innermost (fastest-varying) axis.
    assert grid[-1].split() == ["gpu", "1", "6", "7"]
    big = meshes.describe(meshes.load_topology("frontier"))
    assert "... 46 more node blocks (devices 16-383)" in big
    assert len(big.splitlines()) < 40


def test_importing_meshes_and_reading_presets_does_not_start_jax():
    result = _run_python(
        "import sys, meshes; meshes.describe(meshes.load_topology('frontier')); "
        "assert 'jax' not in sys.modules, 'meshes imported jax'", {})
    assert result.returncode == 0, result.stderr


# --- simulated devices ----------------------------------------------------------------------

def test_device_count_flag_keeps_other_flags_and_never_lowers():
    flag = "--xla_force_host_platform_device_count"
    assert _with_device_count_flag("", 8) == f"{flag}=8"
    assert _with_device_count_flag("--xla_foo=1", 8) == f"--xla_foo=1 {flag}=8"
    assert _with_device_count_flag(f"--xla_foo=1 {flag}=2 --xla_bar", 8) == \
        f"--xla_foo=1 {flag}=8 --xla_bar"
    assert _with_device_count_flag(f"{flag}=16", 8) == f"{flag}=16"


def test_ensure_host_device_count_sets_the_count_before_jax_starts():
    code = textwrap.dedent("""
        from meshes.simulate import ensure_host_device_count
        assert ensure_host_device_count(5)          # before import jax: raises 2 -> 5
        import jax
        assert ensure_host_device_count(3)          # imported, not started: 5 >= 3 kept
        print(jax.device_count())
        assert not ensure_host_device_count(7)      # backends started: too late
    """)
    result = _run_python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5"]


# --- meshes on the 8 simulated devices ------------------------------------------------------

@pytest.fixture(scope="module")
def cpu8_mesh():
    return meshes.build_mesh("cpu8")


def test_cpu8_mesh_puts_gcd_innermost(cpu8_mesh):
    assert cpu8_mesh.axis_names == ("node", "gpu", "gcd")
    assert cpu8_mesh.devices.shape == (2, 2, 2)
    assert cpu8_mesh.axis_types == (AxisType.Auto,) * 3
    ids = np.vectorize(lambda device: device.id)(cpu8_mesh.devices)
    np.testing.assert_array_equal(ids, np.arange(8).reshape(2, 2, 2))


def test_too_few_devices_says_how_to_get_more():
    with pytest.raises(ValueError, match=r"mesh preset cpu8 needs 8 devices, found 1 cpu device\(s\); set "
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=8"):
        meshes.build_mesh("cpu8", devices=jax.devices()[:1])


def test_more_devices_than_needed_uses_the_first_ones():
    mesh = meshes.build_mesh(meshes.load_topology("cpu8").with_size("node", 1))
    assert [d.id for d in mesh.devices.flat] == [0, 1, 2, 3]


def test_single_device_mesh_keeps_the_axis_names():
    mesh = meshes.single_device_mesh(("node", "gpu", "gcd"))
    assert mesh.axis_names == ("node", "gpu", "gcd") and mesh.devices.shape == (1, 1, 1)


def test_psum_over_a_level_sums_exactly_that_levels_devices(cpu8_mesh):
    values = np.arange(8, dtype=np.float32).reshape(2, 2, 2) ** 2  # [node, gpu, gcd], distinct
    spec = P("node", "gpu", "gcd")
    x = jax.device_put(values, NamedSharding(cpu8_mesh, spec))

    @jax.jit
    def level_sums(x):
        def per_device(block):  # block: [1, 1, 1], this device's value
            return lax.psum(block, "gcd"), lax.psum(block, "node")
        return jax.shard_map(per_device, mesh=cpu8_mesh, in_specs=spec, out_specs=(spec, spec))(x)

    over_gcd, over_node = level_sums(x)
    # Each device holds the sum over its own level group, broadcast back along that axis.
    np.testing.assert_array_equal(np.asarray(over_gcd),
                                  np.broadcast_to(values.sum(2, keepdims=True), values.shape))
    np.testing.assert_array_equal(np.asarray(over_node),
                                  np.broadcast_to(values.sum(0, keepdims=True), values.shape))


# --- two processes x 4 devices: the node axis spans processes -------------------------------

_WORKER = """
import json, sys
import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

process_id, port = int(sys.argv[1]), int(sys.argv[2])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id, initialization_timeout=60)
import meshes

mesh = meshes.build_mesh("cpu8")
node_processes = [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(2)]
values = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2)  # [node, gpu, gcd]
spec = P("node", "gpu", "gcd")
x = jax.make_array_from_callback(values.shape, NamedSharding(mesh, spec), lambda i: values[i])
total = jax.jit(jax.shard_map(lambda b: lax.psum(b, ("node", "gpu", "gcd")), mesh=mesh,
                              in_specs=spec, out_specs=spec))(x)
local = sorted(float(np.asarray(s.data).item()) for s in total.addressable_shards)
print(json.dumps({"node_processes": node_processes, "local_totals": local}), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_node_axis_spans_processes_and_psum_is_global(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=SUBPROCESS_TIMEOUT_S)
            assert worker.returncode == 0, stderr[-3000:]
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for process_id, output in enumerate(outputs):
        assert output["node_processes"] == [[0], [1]], f"process {process_id}: {output}"
        assert output["local_totals"] == [36.0] * 4  # 1 + 2 + ... + 8 on each local device
