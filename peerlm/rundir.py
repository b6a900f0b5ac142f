"""The run directory: the one place that knows what a training run leaves on disk and how to read it.

    config.json        the resolved RunConfig: model, train, and the data it was trained on
    tokenizer.json     copied from the data directory, so eval and generate need nothing else
    metrics.jsonl      one JSON record per logged step and per validation, appended line by line
    checkpoints/       step-numbered checkpoints (``peerlm.checkpoint``)
    tb/                TensorBoard events, with ``train.tensorboard``

``RunDir`` names these paths and reads and writes the config and tokenizer; ``MetricsLog`` appends
to metrics.jsonl and, when a run starts or resumes, first cuts it back to what the resume point had
logged (nothing, for a run that starts from scratch), so a step is in the log once however often the
run was killed and started again, and times read from the log count only the attempt that produced
the weights. ``load_run`` builds a run's model from its newest checkpoint for eval and generate: peerlm's
``Transformer``, or, for a run whose config's ``model_kind`` is "hf", the transformers model it
records behind ``peerlm.hf.adapter.HFCausalLM`` (the same interface).

A run is only scored on ids of its own tokenizer: the run's tokenizer fingerprint (``tokenizer_sha256``
in its config, else the hash of its tokenizer.json) must match that of a data directory it meets and
of the tokenizer that encodes a text file (``check_same_tokenizer``); another tokenizer of the same
size would give valid-looking ids of other text, hence a plausible but meaningless perplexity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from peerlm.checkpoint import (
    WEIGHT_FILES,
    CheckpointError,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_weights,
    read_config,
    verify_checkpoint,
)
from peerlm.config import ModelConfig, from_dict, to_dict
from peerlm.data import DataError, load_tokenizer
from peerlm.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from peerlm.model import Transformer, build_model

__all__ = ["RunDir", "MetricsLog", "is_run_dir", "load_run", "run_fingerprint", "run_tokenizer",
           "run_tokenizer_file", "check_same_tokenizer"]


class RunDir:
    """The paths of a run directory and the reads and writes of its own files."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.json")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tb")

    def latest_checkpoint(self, notes: list[str] | None = None) -> Path | None:
        """The newest complete checkpoint (``peerlm.checkpoint.latest_checkpoint``), None if none."""
        return latest_checkpoint(self.checkpoints, notes) if self.checkpoints.is_dir() else None

    def read_config(self) -> dict[str, Any]:
        """config.json as a dict (ValueError naming the file when it is not JSON)."""
        try:
            return json.loads(self.config.read_text("utf-8"))
        except ValueError as e:
            raise ValueError(f"{self.config} is not valid JSON ({e}); restore it or start a new run") from None

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.config, json.dumps(config, indent=2) + "\n")

    def keep_tokenizer(self, data_dir: str | os.PathLike[str]) -> None:
        """Copy the data directory's tokenizer.json in, unless the run has one already."""
        if not self.tokenizer.is_file():
            atomic_write_bytes(self.tokenizer, (Path(data_dir) / "tokenizer.json").read_bytes())

    def open_metrics(self, resume_offset: int | None) -> MetricsLog:
        """metrics.jsonl for appending, cut back to ``resume_offset`` bytes (the size it had at the
        checkpoint resumed from; None: a fresh start, so nothing of an earlier attempt is kept)."""
        return MetricsLog(self.metrics, truncate_to=resume_offset or 0)

    def metric_records(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl in order (none when there is no log)."""
        if not self.metrics.is_file():
            return
        with open(self.metrics, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a training run (a config or checkpoints)."""
    run = RunDir(path)
    return run.checkpoints.exists() or run.config.is_file()


class MetricsLog:
    """metrics.jsonl, appended one whole line per write (O_APPEND) and flushed by the OS write."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        if truncate_to is not None and path.exists() and path.stat().st_size > truncate_to:
            with open(path, "r+b") as f:  # drop records written after the point we start from
                f.truncate(truncate_to)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode("utf-8"))

    def offset(self) -> int:
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------------ loading


def load_run(run_dir: str | os.PathLike[str], device: torch.device | str = "cpu",
             notes: list[str] | None = None, attempts: int = 3) -> tuple[Transformer, dict]:
    """The model of a run's newest checkpoint (or a checkpoint directory), in eval mode, and its run
    config dict with ``checkpoint`` (its path) and ``checkpoint_step`` added. Only the weights and config
    of the checkpoint are verified: that is all a model needs. ``notes``: a fallback to an older
    checkpoint (see ``peerlm.checkpoint.find_checkpoint``).

    A run that is still training deletes old checkpoints as it writes new ones; when the checkpoint
    being read disappears meanwhile, the newest one is read instead (up to ``attempts`` times)."""
    attempt = 1
    while True:
        said: list[str] = []  # this attempt's notes only, so that a retry does not repeat one
        ckpt = find_checkpoint(run_dir, said)
        existed = ckpt.is_dir()
        try:
            model_config = _load_checkpoint_model(ckpt, device)
        except (CheckpointError, OSError):
            if not existed or ckpt.exists():
                raise  # missing from the start, or damaged: not deleted under us
            if Path(run_dir).resolve() == ckpt.resolve() or attempt == attempts:
                raise CheckpointError(f"{ckpt} was deleted while it was read: the run is being written faster "
                                      "than it can be read; try again, or read a copy of the run") from None
            attempt += 1
            continue
        if notes is not None:
            notes.extend(said)
        return model_config


def _load_checkpoint_model(ckpt: Path, device: torch.device | str) -> tuple[Transformer, dict]:
    verify_checkpoint(ckpt, WEIGHT_FILES)
    config = read_config(ckpt)
    if config.get("model_kind", "peerlm") == "hf":  # a transformers model (peerlm.hf.adapter)
        return _load_hf_model(ckpt, config, device)
    try:
        cfg = from_dict(ModelConfig, config["model"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/config.json has no valid model section ({e})") from None
    model = build_model(cfg, device)
    lora = config.get("finetune", {}).get("method") == "lora"
    if lora:  # the checkpoint holds the adapters beside the frozen weights: attach them, load, merge
        from peerlm.continual.lora import attach_lora

        ft = config["finetune"]
        attach_lora(model, ft["lora_rank"], ft["lora_alpha"], ft["lora_dropout"], ft["lora_targets"])
    load_weights(ckpt, model, expected_model=to_dict(cfg), verify=False)
    if lora:
        from peerlm.continual.lora import merge_lora

        merge_lora(model)
        for p in model.parameters():
            p.requires_grad = True
    model.eval()
    config["checkpoint"] = str(ckpt)
    config["checkpoint_step"] = checkpoint_step(ckpt)
    return model, config


def _load_hf_model(ckpt: Path, config: dict, device: torch.device | str) -> tuple[torch.nn.Module, dict]:
    """A run of a transformers model: its model rebuilt from the recorded config, the checkpoint's weights."""
    try:
        from peerlm.hf.adapter import HFModelConfig, build_hf
    except ImportError as e:
        raise CheckpointError(f"{ckpt} holds a transformers model and needs transformers ({e}); install the "
                              "extra: pip install 'peerlm[hf]'") from None
    try:
        spec = HFModelConfig.from_dict(config["model"])
        model = build_hf(spec, device)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/config.json has no valid transformers model section ({e})") from None
    load_weights(ckpt, model, expected_model=spec.to_dict(), verify=False)
    model.eval()
    config["checkpoint"] = str(ckpt)
    config["checkpoint_step"] = checkpoint_step(ckpt)
    return model, config


def _run_dirs(run_dir: Path, config: dict) -> list[Path]:
    """The run directory itself and, for a checkpoint directory, the run it belongs to."""
    dirs = [run_dir]
    ckpt = Path(config.get("checkpoint", run_dir))
    if ckpt.parent.name == RunDir(ckpt.parent.parent).checkpoints.name:
        dirs.append(ckpt.parent.parent)
    return dirs


def run_fingerprint(run_dir: str | os.PathLike[str], config: dict) -> str | None:
    """The sha256 of the run's tokenizer: as its config records it, else (runs from before the
    record) of the tokenizer.json in the run directory; None when neither is there."""
    recorded = config.get("data", {}).get("tokenizer_sha256")
    if recorded:
        return recorded
    for d in _run_dirs(Path(run_dir), config):
        if RunDir(d).tokenizer.is_file():
            return sha256_file(RunDir(d).tokenizer)
    return None


def check_same_tokenizer(run_fp: str | None, data_fp: str | None, what: str, fix: str) -> None:
    """DataError when both fingerprints are known and differ."""
    if run_fp and data_fp and run_fp != data_fp:
        raise DataError(f"{what} was prepared with another tokenizer than the run (sha256 {data_fp[:12]} vs "
                        f"the run's {run_fp[:12]}): its token ids stand for other text; {fix}")


def run_tokenizer_file(run_dir: str | os.PathLike[str], config: dict,
                       data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The run's own tokenizer.json: the first of the run directory, ``data_dir`` or the run's recorded
    data directory whose fingerprint is the run's (any, for a run that records none)."""
    expected = run_fingerprint(run_dir, config)
    candidates = [RunDir(d).tokenizer for d in _run_dirs(Path(run_dir), config)]
    candidates += [Path(d) / "tokenizer.json" for d in (data_dir, config.get("data", {}).get("dir")) if d]
    wrong = []
    for f in candidates:
        if f.is_file():
            if expected is None or sha256_file(f) == expected:
                return f
            wrong.append(str(f))
    if wrong:
        raise DataError(f"{run_dir}: no tokenizer of this run found ({', '.join(wrong)} is another "
                        "tokenizer); evaluate with the run's own tokenizer.json in its directory")
    raise DataError(f"{run_dir}: no tokenizer.json in the run or its data directory")


def run_tokenizer(run_dir: str | os.PathLike[str], config: dict,
                  data_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The run's own tokenizer (``run_tokenizer_file``), loaded."""
    return load_tokenizer(run_tokenizer_file(run_dir, config, data_dir))
