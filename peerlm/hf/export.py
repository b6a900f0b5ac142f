"""A training run as a transformers model directory (``peerlm export RUN --hf OUT``), and back.

    OUT/config.json              PeerLMConfig (``peerlm``: the model config) with ``auto_map`` and
                                 ``peerlm_run``: the run's data section (tokenizer sha256, eot id, ...),
                                 its checkpoint step, where it came from, and model.safetensors' sha256
    OUT/model.safetensors        the weights (``model.`` + the Transformer's state dict)
    OUT/generation_config.json   <|endoftext|> (id 0) as the start, end and padding token
    OUT/tokenizer.json           the run's tokenizer.json, byte for byte (its fingerprint stays the run's)
    OUT/tokenizer_config.json    a transformers fast tokenizer over it (``PreTrainedTokenizerFast``), which
                                 encodes as peerlm does: no token added, "<|endoftext|>" in text is text
    OUT/configuration.py, modeling.py   the classes, for ``trust_remote_code=True`` (they import peerlm)

A run of a transformers model (``peerlm train --hf-model``) is written as that model: its own class's
config.json (with the memory it was given, ``peerlm_memory``, ``peerlm_run``, and <|endoftext|> as its
start, end and padding token, as it was trained) and weights, which
``peerlm.hf.from_pretrained`` and ``peerlm train --hf-model`` read back; the tokenizer files as above.

The directory is written whole in a temporary sibling and renamed into place, so OUT is either absent
or complete; an existing non-empty OUT is refused before anything is written.

``load_exported`` reads such a directory back as peerlm's ``Transformer`` and a run-config-like dict
(``model``, ``data``, ``checkpoint``, ``checkpoint_step``), which is what ``peerlm eval`` and
``peerlm generate`` need; a weight file that does not match its recorded sha256 or does not load is
reported in one line naming the export command that rewrites it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from peerlm.checkpoint import CheckpointError
from peerlm.config import ModelConfig, from_dict
from peerlm.data import EOT
from peerlm.fileio import atomic_write_text, fsync_dir, sha256_file
from peerlm.model import Transformer
from peerlm.rundir import load_run, run_tokenizer_file

from .configuration import PeerLMConfig
from .modeling import PeerLMForCausalLM

__all__ = ["export_run", "load_exported", "WEIGHTS"]

WEIGHTS = "model.safetensors"


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """transformers' progress bars off (the commands print their own lines), as they were after."""
    on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if on:
            hf_logging.enable_progress_bar()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; remove it or export to another directory")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} does not exist; create it or export to another directory")


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
               notes: list[str] | None = None) -> dict[str, Any]:
    """Write the newest checkpoint of ``run_dir`` (or a checkpoint directory) to ``out`` as a
    transformers directory (module docstring); return the run config dict it came from (with
    ``checkpoint`` and ``checkpoint_step``). ``notes``: a fallback to an older checkpoint."""
    out = Path(out)
    _check_out(out)
    model, config = load_run(run_dir, "cpu", notes)
    tokenizer = run_tokenizer_file(run_dir, config)
    data = config.get("data", {})
    eot = int(data.get("eot_id", 0))
    run_record = {"data": data, "checkpoint_step": config["checkpoint_step"], "source": str(Path(run_dir).resolve())}
    if config.get("model_kind") == "hf":  # a run of a transformers model (peerlm.hf.training) is written as itself
        hf_model = model.hf
        hf_model.config.use_cache = True
        hf_model.config.peerlm_run = run_record
        # it was trained on peerlm's data: <|endoftext|> starts, ends and pads, whatever the source config said
        hf_model.config.bos_token_id = hf_model.config.eos_token_id = hf_model.config.pad_token_id = eot
        hf_model.generation_config = GenerationConfig.from_model_config(hf_model.config)
    else:
        hf_config = PeerLMConfig(peerlm=config["model"], bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        hf_config.peerlm_run = run_record
        with torch.device("meta"):  # the loaded Transformer goes in as it is: nothing allocated twice
            hf_model = PeerLMForCausalLM(hf_config)
        hf_model.model = model
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _no_bars():
            hf_model.save_pretrained(tmp)
        fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                       split_special_tokens=True, model_max_length=model.cfg.context_length)
        fast.save_pretrained(tmp)
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")  # the run's own bytes, so its fingerprint holds
        written = json.loads((tmp / "config.json").read_text("utf-8"))
        if (tmp / WEIGHTS).is_file():  # one weight file (a large transformers model may write shards)
            written["peerlm_run"]["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        atomic_write_text(tmp / "config.json", json.dumps(written, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, out)  # onto an absent or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return config


def _damaged(path: Path, source: str | None, why: str) -> CheckpointError:
    fix = (f"export the run again: `peerlm export {shlex.quote(source)} --hf {shlex.quote(str(path))}` after "
           f"moving {shlex.quote(str(path))} aside") if source else "export the run again"
    return CheckpointError(f"{path / WEIGHTS} is damaged ({why}); {fix}")


def load_exported(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[Transformer, dict]:
    """The peerlm ``Transformer`` of an exported directory, in eval mode, and a run-config-like dict:
    ``model``, ``data`` (the run's), ``checkpoint`` (this directory) and ``checkpoint_step``."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text("utf-8"))
        run = raw.get("peerlm_run") or {}
        cfg = from_dict(ModelConfig, raw["peerlm"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}/config.json is not the config of an exported peerlm model ({e}); export "
                              "the run again with `peerlm export RUN --hf DIR`") from None
    if raw.get("peerlm_memory"):
        raise CheckpointError(f"{path} holds memory layers added by peerlm.hf.add_memory, which peerlm's own model "
                              "does not have; load it with peerlm.hf.from_pretrained")
    source = run.get("source")
    if not (path / WEIGHTS).is_file():
        raise _damaged(path, source, "missing")
    recorded = run.get("weights_sha256")
    if recorded and sha256_file(path / WEIGHTS) != recorded:
        raise _damaged(path, source, "its sha256 does not match the one config.json records")
    try:
        with _no_bars():
            hf_model = PeerLMForCausalLM.from_pretrained(path)
    except Exception as e:  # safetensors and transformers raise their own types for a file that does not parse
        raise _damaged(path, source, " ".join(str(e).split())[:160]) from None
    model = hf_model.model.to(device).eval()
    assert model.cfg == cfg, (model.cfg, cfg)
    config = {"model": raw["peerlm"], "data": run.get("data", {}), "checkpoint": str(path),
              "checkpoint_step": run.get("checkpoint_step")}
    return model, config
