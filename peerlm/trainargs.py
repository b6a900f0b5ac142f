"""The RunConfig of a ``peerlm train`` command line: a preset on prepared data, or the resumed run's
stored config; ``--set SECTION.FIELD=VALUE`` overrides (parsed by ``peerlm.config.apply_overrides``);
one run length (``--max-steps``, ``--max-tokens`` or ``--flops``); or a transformers model with
memory (``--hf-model DIR --add-memory SPEC``, extra ``hf``). Every mistake is a ValueError naming the
flag and the fix, raised before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peerlm import argtypes
from peerlm.checkpoint import CheckpointError
from peerlm.config import apply_overrides, get_preset

__all__ = ["build_run_config", "overrides", "hf_context_length"]


def overrides(cfg: Any, section: str, items: Sequence[tuple[str, str]]) -> Any:
    sets = [item for sec, item in items if sec == section]
    try:
        return apply_overrides(cfg, sets)
    except ValueError as e:
        raise ValueError(f"--set {section}.*: {e}") from None


def _stored_run(out: str) -> tuple[Any, Path] | None:
    """The run config of the run in ``out`` and the file it came from: its config.json, else (deleted,
    say) the one its newest checkpoint holds; None when neither is there."""
    from peerlm.checkpoint import read_config
    from peerlm.runconfig import RunConfig
    from peerlm.rundir import RunDir

    rd = RunDir(out)
    if rd.config.is_file():
        source, read = rd.config, rd.read_config
    else:
        ckpt = rd.latest_checkpoint()
        if ckpt is None:
            return None
        source, read = ckpt / "config.json", lambda: read_config(ckpt)
    try:
        return RunConfig.from_dict(read()), source
    except (CheckpointError, ValueError, TypeError) as e:  # JSON syntax or a config that does not validate
        raise ValueError(f"{source} is not a valid run config ({' '.join(str(e).split())[:200]}); pass "
                         "--preset and --data to rebuild it") from None


def build_run_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The RunConfig of a `train` invocation (preset or the resumed run's config, overrides, limits),
    and notes to print about choices made for the user."""
    from peerlm.data import TokenDataset
    from peerlm.runconfig import RunConfig, TrainConfig, data_info
    from peerlm.rundir import RunDir

    sets = args.set or []
    stored = RunDir(args.out).config
    notes = []
    if args.hf_model is not None:
        if args.preset is not None:
            raise ValueError("--hf-model and --preset both name the model; give one of them")
        return _hf_run_config(args), notes
    if args.add_memory:
        raise ValueError("--add-memory adds memory to a transformers model: it goes with --hf-model DIR")
    if args.preset is None:
        found = _stored_run(args.out) if args.resume else None
        if found is None:
            raise ValueError("--preset is required (see `peerlm presets`), except with --resume on an "
                             f"existing run{'' if args.resume else ' (add --resume to continue one)'}")
        run, stored = found
        model, train, data_dir = run.model, run.train, args.data or run.data.get("dir")
    else:
        if args.data is None:
            raise ValueError("--data DIR is required (a directory made by `peerlm data prepare`)")
        model, train, data_dir = get_preset(args.preset), TrainConfig(), args.data
        vocab = TokenDataset(data_dir).vocab_size
        explicit = any(sec == "model" and item.split("=", 1)[0].strip() == "vocab_size" for sec, item in sets)
        if not explicit and vocab != model.vocab_size:
            model = dataclasses.replace(model, vocab_size=vocab)
            notes.append(f"note: model.vocab_size set to {vocab}, the vocabulary of {data_dir}")
    if not data_dir:
        raise ValueError(f"{stored} names no data directory; pass --data DIR")
    train_keys = {item.split("=", 1)[0].strip(): item.split("=", 1)[1].strip() for sec, item in sets
                  if sec == "train" and "=" in item}
    if train.shard_experts and train_keys.get("parallel") == "none" and "shard_experts" not in train_keys:
        # one process has no ranks to shard the tables over: the checkpoint's shards load whole
        sets = [*sets, ("train", "shard_experts=false")]
        notes.append("note: train.shard_experts set to false with train.parallel=none (one process)")
    model, train = _model_overrides(model, sets), overrides(train, "train", sets)
    train = _limits(args, train, sets)
    return RunConfig(model, train, data_info(data_dir)), notes


def _model_overrides(model: Any, sets: Sequence[tuple[str, str]]) -> Any:
    """``--set model.*`` on peerlm's ModelConfig; a transformers model takes ``model.context_length`` only."""
    if getattr(model, "KIND", None) != "hf":
        return overrides(model, "model", sets)
    context = hf_context_length(sets)
    return model if context is None else dataclasses.replace(model, context_length=context)


def hf_context_length(sets: Sequence[tuple[str, str]]) -> int | None:
    """The ``--set model.context_length=N`` of a transformers run (None when not given); any other model
    field is refused: the architecture is the model's config.json's."""
    context = None
    for sec, item in sets:
        if sec != "model":
            continue
        key, _, value = item.partition("=")
        if key.strip() != "context_length":
            raise ValueError(f"--set model.{item}: a transformers model takes model.context_length only; its "
                             "architecture is its config.json's")
        try:
            context = argtypes.positive_int(value.strip())
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--set model.context_length: {e}") from None
    return context


def _limits(args: argparse.Namespace, train: Any, sets: Sequence[tuple[str, str]]) -> Any:
    """``train`` with the run length of ``--max-steps`` / ``--max-tokens`` / ``--flops`` (one at most)."""
    limits = {"max_steps": args.max_steps, "max_tokens": args.max_tokens, "flops": args.flops}
    given = [f"--{k.replace('_', '-')}" for k, v in limits.items() if v is not None]
    given += [f"--set train.{k}" for k in (item.split("=", 1)[0].strip() for sec, item in sets if sec == "train")
              if k in limits]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both set the run length; give one of them")
    if any(v is not None for v in limits.values()):  # the flag replaces the preset's, --set's or the run's
        train = dataclasses.replace(train, **limits)
    return train


def _hf_run_config(args: argparse.Namespace) -> Any:
    """The RunConfig of `train --hf-model DIR` (``peerlm.hf.training.plan_hf_run``)."""
    from peerlm.runconfig import TrainConfig

    if args.data is None:
        raise ValueError("--data DIR is required (a directory made by `peerlm data prepare`)")
    try:
        from peerlm.hf.training import plan_hf_run
    except ImportError as e:
        raise ValueError(f"--hf-model needs transformers ({e}); install the extra: pip install 'peerlm[hf]'") from None
    sets = args.set or []
    train = _limits(args, overrides(TrainConfig(), "train", sets), sets)
    return plan_hf_run(args.hf_model, args.data, args.add_memory or [], hf_context_length(sets), train)
