"""Resumable pipeline stages: each writes `NAME.jsonl` (its records) and `NAME.counts.json`.

The counts file is written last, after the records file is complete (both through a
temporary name and a rename), so its presence means the stage finished: a rerun reads the
records back instead of recomputing them. Counts carry the stage's wall `seconds` (a
training stage's own figure when it gives one). A stage that was cut off leaves no counts file
and runs again; training stages resume from their own checkpoints (`jaxsys.train`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("scalequest")


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Stages:
    """Runs named stages under one folder, skipping those that finished before."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, dict] = {}  # stage -> its counts, in the order stages ran
        self.skipped: list[str] = []

    def done(self, name: str) -> bool:
        return (self.root / f"{name}.counts.json").exists()

    def run(self, name: str, fn: Callable[[], tuple[list[dict], dict]]) -> list[dict]:
        """`fn()` -> (records, counts); or the saved records if the stage finished before."""
        records_path, counts_path = self.root / f"{name}.jsonl", self.root / f"{name}.counts.json"
        if self.done(name):
            self.counts[name] = json.loads(counts_path.read_text())
            self.skipped.append(name)
            log.info("stage %s: finished before, read %s", name, records_path)
            return read_jsonl(records_path)
        log.info("stage %s: running", name)
        t0 = time.perf_counter()
        records, counts = fn()
        counts = {**counts, "seconds": round(counts.get("seconds", time.perf_counter() - t0))}
        write_jsonl(records_path, records)
        tmp = counts_path.with_name(counts_path.name + ".tmp")
        tmp.write_text(json.dumps(counts, indent=1) + "\n")
        os.replace(tmp, counts_path)
        self.counts[name] = counts
        log.info("stage %s: %s", name, counts)
        return records

    def log_sitting(self, *, wall_s: float, cpu_s: float, finished: bool) -> None:
        """Appends one process's time to `sittings.jsonl`, with the stages it ran."""
        record = {"ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(wall_s), "cpu_s": round(cpu_s),
                  "stages_run": len(self.counts) - len(self.skipped), "finished": finished}
        with open(self.root / "sittings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def run_sittings(self) -> list[dict]:
        """The logged sittings of the latest run: those after the previous finished one, with
        later reruns that only read finished stages back left out."""
        path = self.root / "sittings.jsonl"
        sittings = read_jsonl(path) if path.exists() else []
        while len(sittings) > 1 and sittings[-1]["finished"] and sittings[-1]["stages_run"] == 0:
            sittings.pop()
        earlier = [i for i, s in enumerate(sittings[:-1]) if s["finished"]]
        return sittings[earlier[-1] + 1:] if earlier else sittings
