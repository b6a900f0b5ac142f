"""Recorded runs trained again from their records alone, to measure reproducibility.

    peerlm study isoflop --reproduce 2e12_dense_L2d64_lr2_s2 --reproduce 2e12_pkm_L2d64_lr2_x10_s1
    peerlm study isoflop-tuned --reproduce RUN_ID            # a tuned record (or a first-table one it reuses)

Each run is trained and evaluated as the study would (its ``RunSpec`` from the record, whose model and
train configs must be the ones the code derives from it now; the study's prepared data, whose
fingerprint must match the record's where the record has one), in a work directory of its own beside
the study's (``<work>/../reproduce/<run_id>``). An interrupted call resumes there on the same
machine, code revision, device and threads (a note in that directory says which); anything else
starts the run afresh. The directory is removed once the run is compared, so a later call trains it
again. Nothing is written to the study's records: each comparison is a row of
``<results>/reproduced.json`` (added under a lock on its folder, atomically, after every run),
recorded against again: val loss and perplexity, last training loss, revision, machine, date,
device, precision, threads, training seconds, whether the data's fingerprint was checked, and whether
the val loss and the last training loss came out bit for bit the same. A re-trained run that
diverges gets a row that says so.

On one machine a run comes out bit for bit the same (the project's runs are deterministic: a record
re-trained twice here gives one result twice). On a machine with another CPU it need not, even with
the same code revision and data: the rows measure how far.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peerlm.config import to_dict
from peerlm.fileio import atomic_write_text
from peerlm.runconfig import autocast_dtype
from peerlm.rundir import RunDir
from peerlm.study.claims import RunClaimed, claim
from peerlm.study.records import Records, RecordStore, diverged, finite_json, same_train, spec_of
from peerlm.study.runner import Runner, git_revision, machine

__all__ = ["reproduce", "format_rows", "reproduced_lines"]


class _Records:
    """A plan that reads only its own store's records and plans nothing (``Runner`` asks its plan which
    records count; the study's plan would also count the records it reuses from elsewhere)."""

    def records(self, recs: Records) -> Records:
        return recs

    def runs(self, recs: Records) -> Iterable:
        return iter(())


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    val, train = rec["eval"].get("val", {}), rec["train"]
    device = train.get("device", "cpu")
    bf16 = autocast_dtype(device.split(":")[0], train.get("dtype", "auto")) is not None
    return {"val_loss": val.get("loss"), "val_perplexity": val.get("perplexity"),
            "last_train_loss": rec.get("last_train_loss"), "train_seconds": rec["train_seconds"],
            "git_revision": rec["git_revision"], "date": rec.get("date"), "machine": rec["machine"],
            "device": device, "precision": "bf16 autocast" if bf16 else "fp32", "threads": rec.get("threads")}


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``folder`` (waiting for it) while the block runs: every call
    that writes a file there takes it, whatever its work directory, and no lock file is left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _refusals(study: Runner, recs: Records, run_ids: list[str]) -> str | None:
    """Why these runs cannot be reproduced, before any work; None if they can."""
    missing = [r for r in run_ids if r not in recs]
    if missing:
        return (f"no record named {', '.join(missing)} in {study.runs_dir} (nor among the records its plan reuses); "
                f"name a file of {study.runs_dir} without .json")
    broken = [r for r in run_ids if diverged(recs[r])]
    if broken:
        return f"{', '.join(broken)} diverged: a diverged record has no val loss to reproduce"
    moved = [r for r in run_ids if recs[r]["model"] != to_dict(spec_of(recs[r]).model())
             or not same_train(recs[r]["train"], to_dict(spec_of(recs[r]).train()))]
    if moved:
        return (f"the code derives other configs from {', '.join(moved)} than the record holds (the recipe has "
                "changed since): reproduce it at the revision that wrote it (the record's git_revision)")
    return None


def reproduce(study: Runner, run_ids: list[str], out: Path | None = None, work: Path | None = None,
              tokens: int | None = None) -> list[dict[str, Any]]:
    """Train the recorded runs ``run_ids`` of ``study`` again and compare; returns the rows this call
    added, each also added to ``out`` (default ``<results>/reproduced.json``) as its run ends. ``work``
    holds the checkpoints (default ``reproduce/`` beside the study's work directory); ``tokens``
    shortens every run (a smoke test of the path; its rows compare nothing, so they need an ``out`` of
    their own). A run that another process is reproducing is skipped with a note."""
    if tokens is not None and out is None:
        raise ValueError("a shortened run (tokens=...) compares nothing: give it an out file of its own, not the "
                         "study's reproduced.json, which the reports show")
    recs = study.records()
    why = _refusals(study, recs, run_ids)
    if why:
        raise ValueError(why)
    data = study.data_dir()
    fingerprint = study.data_fingerprint(data)
    other = [r for r in run_ids if recs[r].get("data") not in (None, fingerprint)]
    if other:
        raise ValueError(f"{', '.join(other)} trained on other data than {data} holds (its tokenizer or split "
                         "sizes differ): prepare the data with the study's settings into a new work directory "
                         "(--work) and reproduce there")
    work = Path(work) if work is not None else study.work.parent / "reproduce"
    out = Path(out) if out is not None else study.results / "reproduced.json"
    who = {"machine": machine(study.device), "git_revision": git_revision(), "device": str(study.device),
           "threads": study.threads}
    added = []
    for run_id in run_ids:
        spec = spec_of(recs[run_id])
        if tokens is not None:
            spec = spec.with_(tokens=tokens)
        try:
            with claim(work.parent / "claims" / f"{spec.run_id}.claim", spec.run_id):  # the runner's own claim
                row = _one(study, recs[run_id], spec, work, who, fingerprint)
                with _locked(out.parent):
                    rows = json.loads(out.read_text()) if out.is_file() else []
                    atomic_write_text(out, json.dumps(finite_json(rows + [row]), indent=1, allow_nan=False) + "\n")
                (work / f"{spec.run_id}.who.json").unlink(missing_ok=True)  # first: a checkpoint without it is
                shutil.rmtree(work / spec.run_id, ignore_errors=True)       # never resumed
        except RunClaimed as e:
            study.log(f"reproduce: {run_id} skipped: {e}")
            continue
        added.append(row)
        study.log(format_rows([row]))
    return added


def _one(study: Runner, rec: dict[str, Any], spec, work: Path, who: dict[str, Any],
         fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec`` (``rec``'s run) in ``work`` and return its row; the caller holds its claim."""
    note = work / f"{spec.run_id}.who.json"
    ckpt = work / spec.run_id
    resumed = RunDir(ckpt).checkpoints.is_dir() and note.is_file() and json.loads(note.read_text()) == who
    if not resumed:  # a directory left by another machine, revision, device or thread count: start afresh
        shutil.rmtree(ckpt, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(note, json.dumps(who) + "\n")
    with tempfile.TemporaryDirectory(dir=work) as scratch:  # this call's record, apart from other calls'
        runner = Runner(_Records(), RecordStore(scratch), work, threads=study.threads, log=study.log,
                        device=str(study.device))
        runner.data_dir = study.data_dir  # the study's data, wherever its work directory is
        again = runner.run_one(spec)
    old, new = _summary(rec), _summary(again)
    row = {"run_id": rec["run_id"], "method": spec.method, "tokens": again["train_tokens"], "recorded": old,
           "again": new, "resumed": resumed, "data_checked": rec.get("data") == fingerprint}
    if diverged(again):
        return row | {"diverged": again["diverged"], "val_perplexity_ratio": None, "same_bits": False}
    same = all(new[k] == old[k] for k in ("val_loss", "last_train_loss"))
    return row | {"val_perplexity_ratio": new["val_perplexity"] / old["val_perplexity"], "same_bits": same}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One line per row: the run, its val loss recorded and again, the perplexity ratio, same bits."""
    lines = []
    for r in rows:
        a, b = r["recorded"], r["again"]
        head = (f"{r['run_id']}: val loss {a['val_loss']!r} at {a['git_revision']} ({a['date']}), again "
                f"{b['val_loss']!r} at {b['git_revision']} on {b['machine']}")
        if r.get("diverged"):
            lines.append(f"{head}: diverged ({r['diverged']})")
        else:
            lines.append(f"{head}: val perplexity x{r['val_perplexity_ratio']:.4f}, "
                         f"{'the same bits' if r['same_bits'] else 'not the same bits'}")
    return "\n".join(lines)


def reproduced_lines(results: Path) -> list[str]:
    """The reports' section on ``<results>/reproduced.json``: a table of its rows (no lines without it)."""
    path = Path(results) / "reproduced.json"
    if not path.is_file():
        return []
    lines = ["", "Recorded runs trained again from their records (`--reproduce`; rows in reproduced.json): val "
             "perplexity recorded and again, their ratio, and whether the val loss and the last training loss "
             "came out bit for bit the same. On one machine they do; on another CPU a memory-layer run becomes "
             "a different run.", "",
             "| run | recorded: revision, date, machine, precision | again: revision, date, machine, precision | "
             "val recorded | val again | again / recorded | same bits |", "|---|---|---|---|---|---|---|"]
    for r in json.loads(path.read_text()):
        a, b = r["recorded"], r["again"]
        ratio = "diverged" if r.get("diverged") else f"{r['val_perplexity_ratio']:.4f}"
        again = "" if b["val_perplexity"] is None else f"{b['val_perplexity']:.2f}"
        # rows from before the precision field were all fp32 on the CPU
        lines.append(f"| {r['run_id']} | {a['git_revision']}, {(a['date'] or '')[:10]}, {a['machine']}, "
                     f"{a.get('precision', 'fp32')} | {b['git_revision']}, {(b['date'] or '')[:10]}, {b['machine']}, "
                     f"{b.get('precision', 'fp32')} | {a['val_perplexity']:.2f} | "
                     f"{again} | {ratio} | {'yes' if r['same_bits'] else 'no'} |")
    return lines
