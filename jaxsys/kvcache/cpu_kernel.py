"""A C++ kernel for XLA:CPU: attention of a few queries per sequence over its KV pages.

In jnp (`jaxsys.nanobatch.scan_attention`) each block of pages is first gathered into a
new array that the dots then read, every row runs as many blocks as the longest row
needs, and the block loop costs per iteration; on CPU the decode step spends more time
there than in its matmuls. The kernel (`csrc/paged_attention_cpu.cc`) reads each key and
value row once, in place, for exactly the row's own context, on XLA's intra-op threads.

It is built on first use with the machine's C++ compiler (`$CXX`, else `c++`) against the
XLA FFI headers that jaxlib ships, for this CPU (`-march=native`), and cached under
`$JAXSYS_CACHE_DIR` (default `~/.cache/jaxsys`) by a hash of the source, compiler, flags,
jaxlib and CPU. Where it cannot be built, `available()` is False (with one warning) and
callers keep the jnp formulation; `JAXSYS_CPU_KERNELS=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger("jaxsys.kvcache.cpu_kernel")

TARGET = "jaxsys_paged_attention_cpu"
SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_attention_cpu.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


def _cpu_fingerprint() -> str:
    """The CPU model and its instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel library (or find it cached) and return its path; raises if the compiler fails."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    import jaxlib
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), jaxlib.__version__,
                                    _cpu_fingerprint()]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or os.environ.get("JAXSYS_CACHE_DIR") or Path.home() / ".cache" / "jaxsys")
    name = f"paged_attention_cpu-{key}.so"
    path = cache_dir / "kernels" / name
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only or missing home: the machine's temporary directory instead
        path = Path(tempfile.gettempdir()) / f"jaxsys-kernels-{os.getuid()}" / name
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside its final name and renamed into place: concurrent builders never see half a library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA:CPU (built on the first call)."""
    if os.environ.get("JAXSYS_CPU_KERNELS", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxsysPagedAttentionCpu), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("the CPU paged-attention kernel is unavailable, using the jnp formulation: %s", e)
        return False
    return True


# Queries per (row, KV head) up to which the kernel serves a call. `python -m experiments.paged_attention_cpu`
# (16 rows at 140-260 tokens of context, three runs): against `scan_attention` it was 3.3-4.7x faster at 3 queries
# (a decode row) and 1.4-2.4x at 18 (a verify of 4 drafts), but 0.95-1.23x at 30 and 0.95-0.99x at 48; at 192
# (2 rows of a 64-token prefill chunk) 0.73-0.90x: XLA's batched dots reuse each key across many queries better
# than the kernel's per-query loop.
MAX_QUERIES = 24


def usable(queries: int, *dtypes) -> bool:
    """The kernel serves a call with `queries` per (row, KV head) on arrays of `dtypes`: XLA:CPU, float32."""
    return (jax.default_backend() == "cpu" and queries <= MAX_QUERIES
            and all(jnp.dtype(d) == jnp.float32 for d in dtypes) and available())


def paged_attention(q, k_pool, v_pool, table, start):
    """q [b, T, H, hd] over each row's keys at positions < start [b], pages `table` [b, W] of pools
    [kv_heads, num_pages, page_size, hd] -> (out [b, T, H, hd], lse [b, T, H]), float32; a row without keys
    gets (0, -inf). The same contract as `jaxsys.nanobatch.scan_attention`."""
    if not available():
        raise RuntimeError("the CPU paged-attention kernel is unavailable (see the warning logged when it was "
                           "built); use jaxsys.nanobatch.scan_attention")
    b, t, h, hd = q.shape
    result = (jax.ShapeDtypeStruct((b, t, h, hd), jnp.float32), jax.ShapeDtypeStruct((b, t, h), jnp.float32))
    return jax.ffi.ffi_call(TARGET, result)(q, k_pool, v_pool, table.astype(jnp.int32), start.astype(jnp.int32))
