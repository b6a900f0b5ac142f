"""The record store of a study: one small JSON record per finished run under ``<results>/runs/``
(committed, so that anyone can redo the reports), and ``<results>/timing.json`` (every recorded
model's training step timed back to back under one load: ``Runner.time_steps``).

A record names its run (``run_id``, ``phase``, ``spec``: the ``RunSpec`` fields it was trained from),
holds the configs it trained with, its cost, its training summary and its evaluation; ``Runner``
writes it once the run is evaluated, atomically, so a record on disk is always a finished run.

A run whose training loss became NaN or inf, or whose validation loss is not finite, is finished too:
its record says ``"diverged": "<why>"`` (and holds no evaluation when training stopped), so that the
plan does not train it again and never chooses it (``diverged``, ``choice_loss``). A record written
before that mark existed, with a NaN validation loss, counts as diverged all the same.

Every record is checked as it is read (``read_record``): a file that is not JSON, or JSON without
the fields the plans and reports read, is a ``RecordError`` naming the file and the way out.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from peerlm.config import ModelConfig, from_dict, to_dict
from peerlm.fileio import atomic_write_text
from peerlm.runconfig import TrainConfig
from peerlm.study.design import METHODS, SIZES, RunSpec

__all__ = ["RecordStore", "Records", "RecordError", "read_record", "check_record", "spec_of", "val_loss",
           "diverged", "choice_loss", "finite_json", "same_train"]

Records = dict[str, dict[str, Any]]  # run id -> record


class RecordError(ValueError):
    """A file under a study's ``runs/`` that is not a record the study can read."""


_NUMBER = (int, float)
_SPEC_FIELDS = {"budget": _NUMBER, "method": str, "size": str, "lr_mult": _NUMBER, "expert_ratio": _NUMBER,
                "seed": int, "sparse_optimizer": bool}
# what the plans and the reports read of every record (a diverged one included)
_FIELDS = {"run_id": str, "phase": str, "spec": dict, "model": dict, "train": dict, "eval": dict,
           "params": _NUMBER, "active_params": _NUMBER, "flops_train_per_token": _NUMBER, "steps": _NUMBER,
           "train_tokens": _NUMBER, "epochs": _NUMBER, "train_seconds": _NUMBER, "tokens_per_second": _NUMBER,
           "git_revision": str, "machine": str}
_EVAL_FIELDS = ("loss", "perplexity", "bits_per_byte", "tokens")


def _kind(types: type | tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", dict: "an object", bool: "true or false"}
    return names[types[0] if isinstance(types, tuple) else types]


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to isinstance, never a number here
        return types is bool
    return isinstance(value, types)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(rec: Any) -> str | None:
    """What is wrong with ``rec`` as a study record (None: nothing): a missing field or one of
    another type, among those the plans and reports read."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    for key, types in _FIELDS.items():
        if key not in rec:
            return f"no {key!r} field"
        if not _is(rec[key], types):
            return f"{key!r} is {_short(rec[key])}, not {_kind(types)}"
    spec = rec["spec"]
    for key, types in _SPEC_FIELDS.items():
        if key not in spec:
            return f"no spec.{key} field"
        if not _is(spec[key], types):
            return f"spec.{key} is {_short(spec[key])}, not {_kind(types)}"
    if spec["method"] not in METHODS or spec["size"] not in {s.name for s in SIZES}:
        return f"spec names the method {spec['method']!r} on the size {spec['size']!r}, not a study model"
    if not (isinstance(spec.get("overrides", []), list) and all(isinstance(o, str) for o in spec.get("overrides", []))):
        return f"spec.overrides is {_short(spec['overrides'])}, not a list of strings"
    if spec.get("tokens") is not None and not _is(spec["tokens"], int):
        return f"spec.tokens is {_short(spec['tokens'])}, not a whole number"
    try:
        from_dict(ModelConfig, rec["model"])
    except (KeyError, TypeError, ValueError) as e:
        return f"'model' is not a model config ({e})"
    if not _is(rec["train"].get("expert_lr_ratio"), _NUMBER):
        return "train.expert_lr_ratio is missing or not a number"
    if "diverged" in rec and not isinstance(rec["diverged"], str):
        return f"'diverged' is {_short(rec['diverged'])}, not a string"
    for name, ev in rec["eval"].items():
        if not isinstance(ev, dict):
            return f"eval.{name} is {_short(ev)}, not an object"
        for f in _EVAL_FIELDS:
            if f not in ev:
                return f"no eval.{name}.{f} field"
            if ev[f] is not None and not _is(ev[f], _NUMBER):
                return f"eval.{name}.{f} is {_short(ev[f])}, not a number"
    if "val" not in rec["eval"] and "diverged" not in rec:
        return "no eval.val (and not marked diverged)"
    return None


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The record in ``path``, checked (``check_record``) and named after its file; ``RecordError``
    naming the file and what to do when it is not one."""
    path = Path(path)
    fix = (f"move it out of {path.parent} (or delete it) and run the study again to train {path.stem} "
           "again, or restore the file from version control")
    try:
        rec = json.loads(path.read_text("utf-8"))
    except UnicodeDecodeError:
        raise RecordError(f"{path} is not a study record (not UTF-8 text); {fix}") from None
    except ValueError as e:
        what = "an empty file" if not path.read_bytes().strip() else f"not JSON: {e}"
        raise RecordError(f"{path} is not a study record ({what}); {fix}") from None
    wrong = check_record(rec)
    if wrong is None and rec["run_id"] != path.stem:
        wrong = f"its run_id {rec['run_id']!r} is not its file name's"
    if wrong is not None:
        raise RecordError(f"{path} is not a study record ({wrong}); {fix}")
    return rec


class RecordStore:
    """The records and the step timings of one study under ``results`` (a folder, or not there yet:
    it is made by the first record)."""

    def __init__(self, results: str | os.PathLike[str]):
        self.results = Path(results)
        for d in (self.results, self.runs_dir):
            if d.exists() and not d.is_dir():
                raise ValueError(f"{d} is a file, not a study's results folder; name a folder for the records "
                                 "and reports (it is made if it does not exist)")

    @property
    def runs_dir(self) -> Path:
        return self.results / "runs"

    def records(self) -> Records:
        out = {}
        if self.runs_dir.is_dir():
            for f in sorted(self.runs_dir.glob("*.json")):
                out[f.stem] = read_record(f)
        return out

    def write(self, rec: dict[str, Any]) -> Path:
        """Write ``rec`` as ``runs/<run_id>.json``, atomically (NaN and inf as null: strict JSON)."""
        wrong = check_record(rec)
        if wrong is not None:
            raise ValueError(f"not a study record ({wrong})")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.runs_dir / f"{rec['run_id']}.json"
        atomic_write_text(path, json.dumps(finite_json(rec), indent=1, allow_nan=False) + "\n")
        return path

    @property
    def timing_path(self) -> Path:
        return self.results / "timing.json"

    def timing(self) -> dict[str, Any] | None:
        """``timing.json`` as written by ``write_timing``, or None."""
        if not self.timing_path.is_file():
            return None
        fix = "delete it and run `--time-steps` again (until then the reports use the runs' own step times)"
        try:
            timing = json.loads(self.timing_path.read_text("utf-8"))
        except ValueError as e:
            raise RecordError(f"{self.timing_path} is not a step timing (not JSON: {e}); {fix}") from None
        if not (isinstance(timing, dict) and isinstance(timing.get("meta"), dict)
                and isinstance(timing.get("step_seconds"), dict)):
            raise RecordError(f"{self.timing_path} is not a step timing (not the object `--time-steps` writes); "
                              f"{fix}")
        return timing

    def write_timing(self, meta: dict[str, Any], step_seconds: dict[str, float]) -> Path:
        atomic_write_text(self.timing_path, json.dumps({"meta": meta, "step_seconds": step_seconds}, indent=1) + "\n")
        return self.timing_path


def val_loss(rec: dict[str, Any]) -> float:
    """The loss a study chooses by: on the whole validation split (NaN for a diverged run without one)."""
    loss = rec["eval"].get("val", {}).get("loss")
    return float("nan") if loss is None else loss


def diverged(rec: dict[str, Any]) -> bool:
    """Whether the run diverged: marked so, or (records from before the mark) its val loss is not finite."""
    return "diverged" in rec or not math.isfinite(val_loss(rec))


def choice_loss(rec: dict[str, Any]) -> float:
    """What a sweep compares runs by: the val loss, and inf for a diverged run, so that it is worse
    than any run that did not diverge and never the best of a sweep that has one."""
    return math.inf if diverged(rec) else val_loss(rec)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN and inf float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def spec_of(rec: dict[str, Any]) -> RunSpec:
    """The RunSpec a record was trained from."""
    s = rec["spec"]
    return RunSpec(rec["phase"], s["budget"], s["method"], s["size"], s["lr_mult"], s["expert_ratio"], s["seed"],
                   s["sparse_optimizer"], tuple(s.get("overrides", ())), s.get("tokens"), s.get("routing_ratio"))


def same_train(recorded: dict[str, Any], derived: dict[str, Any]) -> bool:
    """Whether a record's train config is the one derived now: the same fields but the device (a run on
    another device is the same run), where a field newer than the record counts at its default."""
    defaults = to_dict(TrainConfig())
    return set(recorded) <= set(derived) and all(
        recorded.get(k, defaults[k]) == v for k, v in derived.items() if k != "device")
