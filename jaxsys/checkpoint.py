"""Checkpoints on orbax: async saves, keep-last-N, atomic steps, mesh-independent restore.

A checkpoint folder holds one sub-folder per step with three items: `params`
(the model pytree), `opt_state` (optimizer moments and counters) and `meta`
(JSON: model config, train config, tokenizer, strategy and mesh it was saved
from). Orbax writes each step into a temporary folder and renames it when
complete, so a crash or a full disk never leaves a half-written step that looks
valid, and earlier steps are never touched. Restores take target shardings, so a
checkpoint saved on one mesh shape restores onto any other.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def check_writable(directory: Path) -> None:
    """Fail early, before any training, if `directory` cannot take a checkpoint."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        what = "is full" if e.errno == errno.ENOSPC else "is not writable"
        raise CheckpointError(f"checkpoint folder {directory} {what} ({e.strerror or e}); "
                              "free space, fix its permissions, or pick another --ckpt-dir") from e


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.isdigit() and (path / "meta").exists()


def resolve(path: str | os.PathLike) -> tuple[Path, int]:
    """(checkpoint root, step) for a root folder (latest step) or a step folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist")
    if _is_step_dir(path):
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if _is_step_dir(p)) if path.is_dir() else []
    if not steps:
        raise CheckpointError(f"no checkpoint in {path}: expected step folders (e.g. {path}/100) "
                              "with params/opt_state/meta, written by `jaxsys train --ckpt-dir`")
    return path, steps[-1]


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` opens an existing folder for restoring without writing anything to it."""
        self.directory = Path(directory).absolute()
        if not read_only:
            check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep_last, enable_async_checkpointing=async_save and not read_only,
            create=not read_only, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Starts an async save of `step`; a failure of an earlier save surfaces here."""
        try:
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)))
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
            raise self._write_error(step, e) from e

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(None, e) from e

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception:  # noqa: BLE001 - closing after a failed save must not mask that error
            pass

    def _write_error(self, step, e: Exception) -> CheckpointError:
        kept = ", ".join(map(str, self.all_steps())) or "none"
        where = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointError(f"could not write {where} to {self.directory} ({e}); earlier checkpoints "
                               f"are intact (steps: {kept}); free space or pick another --ckpt-dir")

    def read_meta(self, step: int) -> dict[str, Any]:
        return read_meta(self.directory / str(step))

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores onto the shardings carried by the abstract (ShapeDtypeStruct) trees."""
        args = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: {e}); "
                "it may be incomplete, corrupt, or from a different model config; "
                "pick another step folder or checkpoint") from e
        return restored["params"], restored.get("opt_state") if abstract_opt_state is not None else None


def read_meta(step_dir: Path) -> dict[str, Any]:
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint metadata {step_dir}/meta is missing or corrupt ({e}); "
                              "pick another step folder or checkpoint") from e


def abstract_tree(shapes, shardings):
    """ShapeDtypeStructs with target shardings, the restore target for orbax."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
