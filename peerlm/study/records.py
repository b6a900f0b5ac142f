"""The record store of a study: one small JSON record per finished run under ``<results>/runs/``
(committed, so that anyone can redo the reports), and ``<results>/timing.json`` (every recorded
model's training step timed back to back under one load: ``Runner.time_steps``).

A record names its run (``run_id``, ``phase``, ``spec``: the ``RunSpec`` fields it was trained from),
holds the configs it trained with, its cost, its training summary and its evaluation; ``Runner``
writes it once the run is evaluated, atomically, so a record on disk is always a finished run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peerlm.fileio import atomic_write_text
from peerlm.study.design import RunSpec

__all__ = ["RecordStore", "Records", "spec_of", "val_loss"]

Records = dict[str, dict[str, Any]]  # run id -> record


class RecordStore:
    """The records and the step timings of one study under ``results``."""

    def __init__(self, results: str | os.PathLike[str]):
        self.results = Path(results)

    @property
    def runs_dir(self) -> Path:
        return self.results / "runs"

    def records(self) -> Records:
        out = {}
        if self.runs_dir.is_dir():
            for f in sorted(self.runs_dir.glob("*.json")):
                out[f.stem] = json.loads(f.read_text("utf-8"))
        return out

    def write(self, rec: dict[str, Any]) -> Path:
        """Write ``rec`` as ``runs/<run_id>.json``, atomically."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.runs_dir / f"{rec['run_id']}.json"
        atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
        return path

    @property
    def timing_path(self) -> Path:
        return self.results / "timing.json"

    def timing(self) -> dict[str, Any] | None:
        """``timing.json`` as written by ``write_timing``, or None."""
        return json.loads(self.timing_path.read_text("utf-8")) if self.timing_path.is_file() else None

    def write_timing(self, meta: dict[str, Any], step_seconds: dict[str, float]) -> Path:
        atomic_write_text(self.timing_path, json.dumps({"meta": meta, "step_seconds": step_seconds}, indent=1) + "\n")
        return self.timing_path


def val_loss(rec: dict[str, Any]) -> float:
    """The loss a study chooses by: on the whole validation split."""
    return rec["eval"]["val"]["loss"]


def spec_of(rec: dict[str, Any]) -> RunSpec:
    """The RunSpec a record was trained from."""
    s = rec["spec"]
    return RunSpec(rec["phase"], s["budget"], s["method"], s["size"], s["lr_mult"], s["expert_ratio"], s["seed"],
                   s["sparse_optimizer"], tuple(s.get("overrides", ())), s.get("tokens"))
