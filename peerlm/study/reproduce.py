"""Recorded runs trained again from their records alone, to measure reproducibility.

    peerlm study isoflop --reproduce 2e12_dense_L2d64_lr2_s2 --reproduce 2e12_pkm_L2d64_lr2_x10_s1
    peerlm study isoflop-tuned --reproduce RUN_ID            # a tuned record (or a first-table one it reuses)

Each run is trained and evaluated as the study would (its ``RunSpec`` from the record, the study's
prepared data, whose fingerprint must match the record's), in a work directory of its own beside the
study's (``<work>/../reproduce/<run_id>``: an interrupted call resumes there; removed once the run is
compared, so a later call trains it again). Nothing is written to the study's records: each comparison is a row of
``<results>/reproduced.json`` (written after every run, atomically), recorded against again: val loss
and perplexity, last training loss, revision, machine, date, training seconds, and whether the val loss
and the last training loss came out bit for bit the same.

On the machine and revision that wrote a record, a run comes out bit for bit the same. On another
machine, even with the same code revision and data, a memory-layer run need not: retrieval's discrete
top-k turns last-bit differences in the scores into different experts, and the run becomes a different
sample, about a seed's worth apart. The rows measure how far.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peerlm.fileio import atomic_write_text
from peerlm.study.records import Records, RecordStore, diverged, spec_of
from peerlm.study.runner import Runner

__all__ = ["reproduce", "format_rows"]


class _Records:
    """A plan that reads only its own store's records and plans nothing (``Runner`` asks its plan which
    records count; the study's plan would also count the records it reuses from elsewhere)."""

    def records(self, recs: Records) -> Records:
        return recs

    def runs(self, recs: Records) -> Iterable:
        return iter(())


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    val = rec["eval"]["val"]
    return {"val_loss": val["loss"], "val_perplexity": val["perplexity"], "last_train_loss": rec.get("last_train_loss"),
            "train_seconds": rec["train_seconds"], "git_revision": rec["git_revision"], "date": rec.get("date"),
            "machine": rec["machine"]}


def reproduce(study: Runner, run_ids: list[str], out: Path | None = None, work: Path | None = None,
              tokens: int | None = None) -> list[dict[str, Any]]:
    """Train the recorded runs ``run_ids`` of ``study`` again and compare; returns the rows, also
    appended to ``out`` (default ``<results>/reproduced.json``) after each run. ``work`` holds the
    checkpoints (default ``reproduce/`` beside the study's work directory, which shares its data);
    ``tokens`` shortens every run (a smoke test of the path; its rows compare nothing)."""
    recs = study.records()
    missing = [r for r in run_ids if r not in recs]
    if missing:
        raise ValueError(f"no record named {', '.join(missing)} in {study.runs_dir} (nor among the records its plan "
                         f"reuses); name a file of {study.runs_dir} without .json")
    broken = [r for r in run_ids if diverged(recs[r])]
    if broken:
        raise ValueError(f"{', '.join(broken)} diverged: a diverged record has no val loss to reproduce")
    fingerprint = study.data_fingerprint(study.data_dir())
    other = [r for r in run_ids if recs[r].get("data") not in (None, fingerprint)]
    if other:
        raise ValueError(f"{', '.join(other)} trained on other data than {study.data_dir()} holds (its tokenizer "
                         "or split sizes differ): prepare the data with the study's settings into a new work "
                         "directory (--work) and reproduce there")
    work = Path(work) if work is not None else study.work.parent / "reproduce"
    out = Path(out) if out is not None else study.results / "reproduced.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    for run_id in run_ids:
        spec = spec_of(recs[run_id])
        if tokens is not None:
            spec = spec.with_(tokens=tokens)
        scratch = work / "records"
        shutil.rmtree(scratch, ignore_errors=True)  # a record left by an interrupted call would be returned
        runner = Runner(_Records(), RecordStore(scratch), work, threads=study.threads, log=study.log,
                        device=str(study.device))
        runner.data_dir = study.data_dir  # the study's data, wherever its work directory is
        again = runner.run_one(spec)
        old, new = _summary(recs[run_id]), _summary(again)
        same = all(new[k] == old[k] for k in ("val_loss", "last_train_loss"))
        rows.append({"run_id": run_id, "method": spec.method, "tokens": again["train_tokens"],
                     "recorded": old, "again": new,
                     "val_perplexity_ratio": new["val_perplexity"] / old["val_perplexity"], "same_bits": same})
        atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
        shutil.rmtree(work / spec.run_id, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        study.log(format_rows(rows[-1:]))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One line per row: the run, its val loss recorded and again, the perplexity ratio, same bits."""
    lines = []
    for r in rows:
        a, b = r["recorded"], r["again"]
        lines.append(f"{r['run_id']}: val loss {a['val_loss']!r} at {a['git_revision']} ({a['date']}), again "
                     f"{b['val_loss']!r} at {b['git_revision']} on {b['machine']}: val perplexity x"
                     f"{r['val_perplexity_ratio']:.4f}, {'the same bits' if r['same_bits'] else 'not the same bits'}")
    return "\n".join(lines)
