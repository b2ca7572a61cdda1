"""Multi-process runs: `jaxsys launch --nproc N -- train ...` on one machine, auto-detection on clusters.

JAX's own engine does the work: `jax.distributed.initialize` connects the
processes through a coordinator, every process runs the same program on the
global mesh (`meshes.build_mesh` sorts devices by process, so the outermost
levels span processes) and supplies its local shards of each batch. This module
adds the two pieces around it, in the manner of `torchrun`:

- `initialize_from_env()`, called by a command before it touches JAX, reads the
  variables the launcher sets (`JAXSYS_COORDINATOR`, `JAXSYS_NUM_PROCESSES`,
  `JAXSYS_PROCESS_ID`, `JAXSYS_LOCAL_DEVICES`) or, with `JAXSYS_DISTRIBUTED=auto`,
  lets JAX detect the cluster (SLURM, Open MPI; see `jax.distributed.initialize`).
  On CPU each process simulates its share of the devices and the processes
  exchange data over gloo.
- `launch()` starts N copies of a command on 127.0.0.1, prefixes their stderr
  with `[rank i]`, passes only rank 0's stdout through (so `--json` still prints
  one line), forwards SIGINT/SIGTERM, and, unlike a bare `&`-and-`wait`, stops
  the survivors when one process fails, so a crashed rank never leaves the others
  waiting forever in a collective.

This module does not import JAX at import time: the launcher itself never needs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("jaxsys.launch")

ENV_COORDINATOR = "JAXSYS_COORDINATOR"  # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "JAXSYS_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSYS_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXSYS_LOCAL_DEVICES"  # devices per process (simulated on CPU)
ENV_INIT_TIMEOUT = "JAXSYS_INIT_TIMEOUT"  # seconds to wait for every process to connect
ENV_DISTRIBUTED = "JAXSYS_DISTRIBUTED"  # "auto": cluster auto-detection by JAX
ENV_LAUNCHER_PID = "JAXSYS_LAUNCHER_PID"  # set by launch(): the ranks die with it

DEFAULT_INIT_TIMEOUT_S = 120
TERMINATE_GRACE_S = 10.0  # SIGTERM first, SIGKILL after this
POLL_INTERVAL_S = 0.05
_COUNT_FLAG = "--xla_force_host_platform_device_count"
_GLOO_NOTICE = "[Gloo] "


# --- inside each process --------------------------------------------------------------------

def launched() -> bool:
    """True when this process was started by `launch()` or asked for cluster auto-detection."""
    return ENV_COORDINATOR in os.environ or os.environ.get(ENV_DISTRIBUTED, "").lower() == "auto"


def _int_env(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} must be an integer; it is set by "
                         "`jaxsys launch` together with " + ENV_COORDINATOR) from None


def _with_exact_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` asking for exactly `count` CPU devices (an inherited count is replaced)."""
    kept = re.sub(re.escape(_COUNT_FLAG) + r"=\d+", "", xla_flags).split()
    return " ".join([*kept, f"{_COUNT_FLAG}={count}"])


def initialize_from_env() -> bool:
    """Joins the multi-process run described by the environment; False when there is none.

    Call it before any JAX computation (importing jax is fine). With the
    launcher's variables it sets this process's simulated CPU device count to
    `JAXSYS_LOCAL_DEVICES` (replacing any inherited count), picks gloo for CPU
    collectives and calls `jax.distributed.initialize` with explicit addresses
    (on GPUs, process i owns local devices [i*D, (i+1)*D)). With
    `JAXSYS_DISTRIBUTED=auto` it calls `jax.distributed.initialize()` and lets JAX
    read SLURM or Open MPI variables. It then starts the backends, so a later
    `meshes.ensure_host_device_count` cannot change the per-process count, and
    checks that every process has joined. Calling it again returns True.
    """
    if not launched():
        return False
    _exit_with_launcher()
    import jax

    if jax.distributed.is_initialized():  # already joined (a second call)
        return True
    timeout = int(os.environ.get(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S))
    # Harmless on GPU/TPU (it configures only the CPU client); without it, a
    # multi-process CPU computation fails to find any collectives implementation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if ENV_COORDINATOR in os.environ:
        num_processes, process_id = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        local_devices = int(os.environ[ENV_LOCAL_DEVICES]) if os.environ.get(ENV_LOCAL_DEVICES) else None
        if local_devices is not None:
            os.environ["XLA_FLAGS"] = _with_exact_device_count(os.environ.get("XLA_FLAGS", ""), local_devices)
            if "JAX_NUM_CPU_DEVICES" in os.environ:  # it would override the flag
                os.environ["JAX_NUM_CPU_DEVICES"] = str(local_devices)
        address = os.environ[ENV_COORDINATOR]
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes,
            process_id=process_id, initialization_timeout=timeout,
            # One machine: listen on loopback only (JAX's default, [::], exposes the
            # coordinator on every interface and fails where IPv6 is off).
            coordinator_bind_address=address if address.startswith("127.0.0.1:") else None,
            local_device_ids=(list(range(process_id * local_devices, (process_id + 1) * local_devices))
                              if local_devices is not None else None),
            # Everything is given; do not let a surrounding SLURM job fill in its own values.
            cluster_detection_method="deactivate")
    else:
        local_devices = None
        try:
            jax.distributed.initialize(initialization_timeout=timeout)
        except ValueError as e:  # JAX found no cluster to read the coordinator and ranks from
            raise ValueError(f"{ENV_DISTRIBUTED}=auto: {e}; JAX detects SLURM (srun) and Open MPI (mpirun) "
                             "jobs; elsewhere start the processes with `jaxsys launch`") from e
    devices = jax.devices()  # starts the backends, so no later flag changes the device count
    platform = devices[0].platform
    if platform == "cpu" and local_devices is not None and jax.local_device_count() != local_devices:
        raise RuntimeError(f"process {jax.process_index()} has {jax.local_device_count()} CPU devices, not "
                           f"{ENV_LOCAL_DEVICES}={local_devices}: JAX started before initialize_from_env()")
    log.info("process %d of %d: %d local %s devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), platform, len(devices))
    return True


# --- the launcher ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the coordinator binds it shortly after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _child_env(rank: int, nproc: int, port: int, devices_per_process: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV_DISTRIBUTED, None)
    env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(nproc),
                ENV_PROCESS_ID: str(rank), ENV_LAUNCHER_PID: str(os.getpid())})
    if devices_per_process is not None:
        env[ENV_LOCAL_DEVICES] = str(devices_per_process)
    # The children import this same jaxsys (and meshes beside it), installed or not.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _exit_with_launcher() -> None:
    """Asks Linux to SIGKILL this rank when its launcher dies, so that no rank is left behind.

    The ranks sit in their own session (a terminal's Ctrl-C reaches them once,
    through the launcher), so without this a launcher killed by SIGKILL (a CI
    timeout, the OOM killer) would orphan them. Done here, in the child, rather
    than in a pre-exec hook, which is unsafe when the launching process has threads.
    """
    launcher = os.environ.get(ENV_LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the request took effect
        os._exit(128 + int(signal.SIGKILL))


def _pump(stream, rank: int, lock: threading.Lock, *, results: bool = False) -> None:
    """Copies a child's output line by line: results to our stdout, logs to stderr with its rank.

    `results` marks rank 0's stdout. Gloo prints its connection notices on stdout
    ("[Gloo] Rank 0 is connected to ..."), which would break `--json`'s one line;
    they go to stderr like every other log line.
    """
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        with lock:
            if results and not line.startswith(_GLOO_NOTICE):
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                sys.stderr.write(f"[rank {rank}] {line.rstrip(chr(10))}\n")
                sys.stderr.flush()
    stream.close()


def _exit_status(returncode: int) -> int:
    """A shell-style status: a child killed by signal S (returncode -S) becomes 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live child, then SIGKILL whatever is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def launch(nproc: int, argv: Sequence[str], *, devices_per_process: int | None = None,
           timeout: float | None = None, program: Sequence[str] | None = None,
           grace_s: float = TERMINATE_GRACE_S) -> int:
    """Runs `nproc` copies of `program argv` as one multi-process JAX job; returns an exit status.

    Args:
      nproc: processes to start, with process ids 0..nproc-1 and a coordinator on a free
        127.0.0.1 port.
      argv: arguments after the program, e.g. ["train", "--model", "tiny"].
      devices_per_process: devices each process owns (simulated CPU devices; on GPUs a
        contiguous block of local ids). None leaves device visibility alone.
      timeout: seconds after which the whole job is stopped (status 124); None waits.
      program: the command the arguments follow; default `python -m jaxsys.cli`.
      grace_s: seconds between SIGTERM and SIGKILL when the survivors are stopped.

    Returns:
      0 when every process exits 0. When one fails (non-zero exit or killed), the others
      are stopped and the failed rank's status is returned (128 + S for signal S).
      SIGINT/SIGTERM sent to the launcher go to every process (which checkpoint and exit);
      a second one kills them.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be positive, got {nproc}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be positive, got {devices_per_process}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    program = list(program) if program is not None else [sys.executable, "-m", "jaxsys.cli"]
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    signals_seen: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda s, _f: signals_seen.append(s))
    status = 0
    try:
        for rank in range(nproc):
            # Rank 0's stdout becomes ours; the others' stdout joins their stderr, prefixed.
            child = subprocess.Popen(
                [*program, *argv], env=_child_env(rank, nproc, port, devices_per_process),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE if rank == 0 else subprocess.STDOUT,
                start_new_session=True)  # a terminal's Ctrl-C reaches them once, through us
            procs.append(child)
            streams = [(child.stdout, rank == 0)] + ([(child.stderr, False)] if rank == 0 else [])
            for stream, results in streams:
                pumps.append(threading.Thread(target=_pump, args=(stream, rank, lock),
                                              kwargs={"results": results}, daemon=True))
                pumps[-1].start()
        log.info("started %d processes (coordinator 127.0.0.1:%d, %s devices each): %s", nproc, port,
                 devices_per_process if devices_per_process is not None else "all visible",
                 " ".join([*program, *argv]))
        deadline = time.monotonic() + timeout if timeout is not None else None
        forwarded = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                status = _exit_status(codes[failed]) or 1
                survivors = sum(code is None for code in codes)
                log.error("rank %d exited with status %d; stopping the other %d process(es)",
                          failed, status, survivors)
                _stop(procs, grace_s)
                break
            if all(code == 0 for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                log.error("timeout: the job ran past %.0f s; stopping its processes", timeout)
                _stop(procs, grace_s)
                status = 124
                break
            while forwarded < len(signals_seen):
                signum = signals_seen[forwarded]
                forwarded += 1
                if forwarded == 1:
                    log.warning("%s: forwarding it to every process (send it again to kill them)",
                                signal.Signals(signum).name)
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signum)
                else:
                    log.warning("%s again: killing every process", signal.Signals(signum).name)
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
            time.sleep(POLL_INTERVAL_S)
    finally:
        _stop(procs, grace_s=0.0)  # normally a no-op; after an exception nothing survives us
        for thread in pumps:
            thread.join(timeout=5.0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status == 0 and signals_seen:
        status = 128 + signals_seen[0]
    return status


# --- `jaxsys launch` ------------------------------------------------------------------------

def _mesh_arg(argv: Sequence[str], default: str = "cpu8") -> str:
    """The value of --mesh in a command's arguments (`--mesh X` or `--mesh=X`)."""
    for i, arg in enumerate(argv):
        if arg == "--mesh" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mesh="):
            return arg.split("=", 1)[1]
    return default


def devices_per_process(nproc: int, argv: Sequence[str], requested: int | None = None) -> int:
    """Devices each of `nproc` processes owns so that together they form the command's --mesh."""
    import meshes
    topology = meshes.load_topology(_mesh_arg(argv))
    needed = topology.num_devices
    if requested is None:
        if nproc < 1:
            raise ValueError(f"--nproc must be positive, got {nproc}")
        if needed % nproc:
            raise ValueError(f"mesh {topology.name} has {needed} devices, which {nproc} processes cannot "
                             f"share evenly; pick an --nproc that divides {needed}")
        return needed // nproc
    if nproc * requested != needed:
        raise ValueError(f"--nproc {nproc} x --devices-per-process {requested} = {nproc * requested} "
                         f"devices, but mesh {topology.name} has {needed}; every device of the mesh "
                         "must belong to exactly one process")
    return requested


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a command as N processes of one JAX job on this machine",
        description="Starts N processes of `jaxsys COMMAND ...` joined by jax.distributed (gloo "
                    "collectives on CPU). If one process fails, the others are stopped and the "
                    "launcher exits non-zero. On a cluster, run the command under srun/mpirun with "
                    f"{ENV_DISTRIBUTED}=auto instead.",
        usage="jaxsys launch --nproc N [--devices-per-process D] [--timeout S] -- COMMAND [ARGS ...]")
    p.add_argument("--nproc", type=int, required=True, help="number of processes")
    p.add_argument("--devices-per-process", type=int, default=None, metavar="D",
                   help="devices each process owns (default: the --mesh device count / N)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop the whole job after S seconds (exit status 124)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the jaxsys command each process runs, e.g. train --model tiny")


def run(args) -> int:
    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ValueError("no command to launch; give one after --, e.g. "
                         "jaxsys launch --nproc 2 -- train --model tiny --mesh cpu8")
    if argv[0] == "launch":
        raise ValueError("jaxsys launch cannot launch itself; give the command each process runs")
    per_process = devices_per_process(args.nproc, argv, args.devices_per_process)
    return launch(args.nproc, argv, devices_per_process=per_process, timeout=args.timeout)
