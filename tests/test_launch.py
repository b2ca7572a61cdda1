"""Multi-process runs: 2 processes x 4 devices train exactly like 1 process x 8; the launcher never hangs."""
import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsys import launch
from jaxsys.loading import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300
STRATEGIES = ("fsdp", "zero3")  # XLA-scheduled collectives, and the explicit shard_map schedule
# LLVM's optimizations cost most of a subprocess's compile time and change nothing
# this file checks; both sides of each comparison compile with the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"

# Trains `tiny` on cpu8 for 5 steps per strategy from step-indexed batches, with a
# checkpoint per strategy; run alone it is 1 process x 8 devices, under the launcher
# one rank of 2 processes x 4 devices. Process 0 writes the losses.
_WORKER = """
import json, sys
from pathlib import Path
from jaxsys.launch import initialize_from_env
initialize_from_env()

import jax
import numpy as np
import meshes
from jaxsys.config import get_preset
import jaxsys.train
from jaxsys.train import TrainConfig, train

jaxsys.train.plot_losses = lambda *paths: None  # the loss curve is not what this test checks

class RandomBatches:
    def batch(self, step):
        return np.random.default_rng(1000 + step).integers(0, 259, (8, 17), dtype=np.int32)

out = Path(sys.argv[1])
mesh = meshes.build_mesh("cpu8")
report = {"processes": jax.process_count(), "local_devices": jax.local_device_count(),
          "node_processes": [sorted({d.process_index for d in mesh.devices[i].flat}) for i in range(2)],
          "losses": {}}
for strategy in sys.argv[2:]:
    tc = TrainConfig(steps=5, batch_size=8, seq_len=16, learning_rate=1e-3, warmup_steps=2,
                     strategy=strategy, log_every=100)
    report["losses"][strategy] = train(get_preset("tiny"), tc, mesh, RandomBatches(),
                                       ckpt_dir=out / strategy).losses
if jax.process_index() == 0:
    (out / "report.json").write_text(json.dumps(report))
"""


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training as 2 processes x 4 devices (launched) and 1 process x 8 devices."""
    tmp = tmp_path_factory.mktemp("launch")
    worker = tmp / "worker.py"
    worker.write_text(_WORKER)
    env = {"PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"}
    reference_log = tmp / "reference.log"
    with pytest.MonkeyPatch.context() as patch, open(reference_log, "w") as log:
        for name, value in env.items():
            patch.setenv(name, value)  # launch() hands its environment to the ranks
        # The reference runs beside the launched job, which waits on its collectives at times.
        reference = subprocess.Popen([sys.executable, str(worker), str(tmp / "one"), *STRATEGIES],
                                     cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = launch.launch(2, [str(tmp / "two"), *STRATEGIES], devices_per_process=4,
                                   program=[sys.executable, str(worker)], timeout=RUN_TIMEOUT_S)
            reference.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if reference.poll() is None:
                reference.kill()
                reference.wait()
    assert status == 0, "the launched run failed; its ranks' stderr is above"
    assert reference.returncode == 0, reference_log.read_text()[-3000:]
    return {name: json.loads((tmp / name / "report.json").read_text()) | {"dir": tmp / name}
            for name in ("one", "two")}


def test_two_processes_really_split_the_mesh(runs):
    assert (runs["one"]["processes"], runs["one"]["local_devices"]) == (1, 8)
    assert (runs["two"]["processes"], runs["two"]["local_devices"]) == (2, 4)
    assert runs["two"]["node_processes"] == [[0], [1]]  # the outermost level spans the processes


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_give_the_same_losses_and_parameters_as_one(runs, strategy):
    one, two = runs["one"]["losses"][strategy], runs["two"]["losses"][strategy]
    assert len(one) == len(two) == 5
    np.testing.assert_allclose(two, one, rtol=1e-6)
    # The checkpoints both runs wrote, restored onto one device of this process.
    reference, launched = (load_model(str(runs[name]["dir"] / strategy)) for name in ("one", "two"))
    assert reference.step == launched.step == 5
    worst = max(jax.tree.leaves(jax.tree.map(rel_diff, launched.params, reference.params)))
    assert worst <= 1e-6, f"parameters differ by {worst:.2e} (relative) after 5 steps"


# --- the launcher, with small programs instead of training -----------------------------------

def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_failing_rank_stops_the_others_and_the_launcher_exits_non_zero(capfd):
    # Rank 1 fails at start-up; rank 0 would wait for it in jax.distributed.initialize
    # for minutes: the launcher must stop it at once.
    program = _python("""
        import os, sys
        if os.environ["JAXSYS_PROCESS_ID"] == "1":
            print("bad argument", file=sys.stderr)
            sys.exit(3)
        from jaxsys.launch import initialize_from_env
        initialize_from_env()
        print("rank 0 should never get here")
    """)
    start = time.monotonic()
    status = launch.launch(2, [], devices_per_process=4, program=program, grace_s=2.0, timeout=RUN_TIMEOUT_S)
    assert status == 3
    assert time.monotonic() - start < 30
    out, err = capfd.readouterr()
    assert "should never get here" not in out
    assert "[rank 1] bad argument" in err


def test_a_rank_killed_by_a_signal_fails_the_job():
    program = _python("""
        import os, signal, time
        if os.environ["JAXSYS_PROCESS_ID"] == "2":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    """)
    start = time.monotonic()
    assert launch.launch(3, [], program=program, grace_s=2.0) == 128 + signal.SIGKILL
    assert time.monotonic() - start < 30


def test_only_rank_0_results_reach_stdout_and_ranks_see_their_ids(capfd):
    program = _python("""
        import os, sys
        env = os.environ
        rank = env["JAXSYS_PROCESS_ID"]
        print(f"out {rank} of {env['JAXSYS_NUM_PROCESSES']}, {env['JAXSYS_LOCAL_DEVICES']} devices, "
              f"coordinator {env['JAXSYS_COORDINATOR']}")
        print(f"log {rank}", file=sys.stderr)
        print(f"[Gloo] Rank {rank} is connected to 1 peer ranks.")  # as gloo does, on stdout
    """)
    assert launch.launch(2, [], devices_per_process=3, program=program) == 0
    out, err = capfd.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith("out 0 of 2, 3 devices, coordinator 127.0.0.1:")
    assert "[rank 1] out 1 of 2, 3 devices" in err  # another rank's stdout: on stderr, prefixed
    assert "[rank 0] log 0" in err and "[rank 1] log 1" in err
    assert "[rank 0] [Gloo] Rank 0 is connected" in err  # so that --json's line stays alone


def test_sigterm_to_the_launcher_reaches_every_rank():
    program = _python("""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as training does: save, then exit
        time.sleep(60)
    """)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.monotonic()
    assert launch.launch(2, [], program=program, grace_s=2.0) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 20


def test_timeout_stops_a_job_that_hangs():
    program = _python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)")
    start = time.monotonic()
    assert launch.launch(2, [], program=program, timeout=0.5, grace_s=0.5) == 124
    assert time.monotonic() - start < 15


# --- `jaxsys launch` arguments ---------------------------------------------------------------

def test_devices_per_process_follow_the_mesh():
    assert launch.devices_per_process(2, ["train"]) == 4  # cpu8 by default
    assert launch.devices_per_process(4, ["train", "--mesh", "cpu8"]) == 2
    assert launch.devices_per_process(48, ["comm", "--mesh=frontier"]) == 8
    assert launch.devices_per_process(2, ["train", "--mesh", "cpu8"], requested=4) == 4


@pytest.mark.parametrize("nproc, argv, requested, message", [
    (3, ["train", "--mesh", "cpu8"], None, "mesh cpu8 has 8 devices, which 3 processes cannot share evenly"),
    (2, ["train"], 2, "--nproc 2 x --devices-per-process 2 = 4 devices, but mesh cpu8 has 8"),
    (2, ["train", "--mesh", "nosuchmesh"], None, "unknown mesh preset 'nosuchmesh'"),
])
def test_devices_that_do_not_fit_the_mesh_are_a_clear_error(nproc, argv, requested, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        launch.devices_per_process(nproc, argv, requested)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="jaxsys")
    launch.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_the_command_after_double_dash_is_what_runs(monkeypatch):
    with pytest.raises(ValueError, match="--nproc must be positive"):
        launch.launch(0, ["train"])
    with pytest.raises(ValueError, match="--nproc must be positive"):  # before the mesh's device count
        launch.devices_per_process(0, ["train", "--mesh", "cpu8"])
    with pytest.raises(ValueError, match="--timeout must be a positive number of seconds"):
        launch.launch(2, ["train"], timeout=-1)  # it started the ranks, then stopped them at once
    calls = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv, **kw: calls.append((nproc, argv, kw)) or 0)
    args = _parse(["launch", "--nproc", "2", "--", "train", "--model", "tiny", "--mesh", "cpu8", "--json"])
    assert launch.run(args) == 0
    assert calls == [(2, ["train", "--model", "tiny", "--mesh", "cpu8", "--json"],
                      {"devices_per_process": 4, "timeout": None})]
    with pytest.raises(ValueError, match="no command to launch"):
        launch.run(_parse(["launch", "--nproc", "2", "--"]))


def test_initialize_from_env_is_a_no_op_outside_a_launch(monkeypatch):
    for name in (launch.ENV_COORDINATOR, launch.ENV_DISTRIBUTED):
        monkeypatch.delenv(name, raising=False)
    assert not launch.launched()
    assert launch.initialize_from_env() is False
    monkeypatch.setenv(launch.ENV_DISTRIBUTED, "auto")
    assert launch.launched()


def test_the_per_process_device_count_replaces_an_inherited_one():
    flag = "--xla_force_host_platform_device_count"
    assert launch._with_exact_device_count(f"--xla_foo=1 {flag}=8 --xla_bar", 4) == \
        f"--xla_foo=1 --xla_bar {flag}=4"
    assert launch._with_exact_device_count("", 2) == f"{flag}=2"


def test_jaxsys_launch_runs_train_as_ranks_of_one_job():
    from jaxsys import cli
    try:
        cli.build_parser().parse_args(["launch", "--nproc", "2", "--", "train"])
    except SystemExit:
        pytest.skip("`jaxsys launch` is not wired into jaxsys.cli yet")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "jaxsys.cli", *args], env=env,  # noqa: E731
                                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    bad = run("launch", "--nproc", "3", "--", "train", "--mesh", "cpu8")
    assert bad.returncode == 1
    assert "jaxsys launch: error: mesh cpu8 has 8 devices, which 3 processes cannot share evenly" in bad.stderr
    # Both ranks join the job (4 of the 8 devices each), then fail on the model: status 1, nothing hangs.
    failed = run("launch", "--nproc", "2", "--", "train", "--model", "no-such-model", "--mesh", "cpu8")
    assert failed.returncode == 1, failed.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] " in failed.stderr and f"process {rank} of 2: 4 local cpu devices, 8 in all" \
            in failed.stderr, failed.stderr[-3000:]
    assert "--model 'no-such-model' is neither a preset nor an existing path" in failed.stderr
    assert failed.stdout == ""
