"""``peerlm train --hf-model DIR``: a transformers causal LM trained by peerlm's loop, with or without
PEER / PKM memory added.

    plan_hf_run(DIR, DATA, memory=[...], context_length=None, train=TrainConfig(...)) -> RunConfig
    train_hf(run, OUT, resume=False, ...)

DIR is a local transformers model directory (``save_pretrained``: config.json, with weights or config
only). With weights the run starts from them; config only, transformers initialises the model, seeded
by ``train.seed``. Memory comes from the directory (a model saved after ``peerlm.hf.add_memory``) and
from ``memory``, one ``--add-memory`` spec each (``parse_memory``), added new with the layers' own init:

    KIND[:layers=I,J|middle][:mode=parallel|replace][:mlp_path=PATH][:OPTION=VALUE...]

KIND is ``peer`` or ``pkm``; ``layers`` the block indices (default ``middle``: block n_layers // 2);
``mode`` ``parallel`` (default: beside the MLP, its output scaled by a zero-initialised per-channel
scale, so the model starts as it was) or ``replace`` (the MLP swapped for the memory); OPTION any
field of ``PEERConfig`` / ``PKMConfig`` (``num_experts``, ``heads``, ``topk``, ``dim_key``, ...; their
defaults are the paper's, N = 1024^2), parsed as ``--set`` parses them (``num_experts=64**2``), e.g.
``peer:layers=1:mode=parallel:num_experts=4096``.

The run is an ordinary run directory trained by ``peerlm.train.train`` (one writer, atomic checkpoints,
exact ``--resume``, SIGTERM checkpoint, metrics.jsonl, validation); its config's ``model_kind`` is "hf"
and its ``model`` section a ``peerlm.hf.adapter.HFModelConfig``: the transformers config with its
memory, the training context (``model.context_length``, default the model's positions) and the source
directory's path and weight checksums, for the record. Resuming, ``peerlm eval`` and ``peerlm generate``
rebuild the model from that config and read the checkpoint's weights: they need the run directory
only. The optimizer is ``train``'s (``peerlm.train.run_optimizer``, as ``peerlm.hf.param_groups``):
tables at ``train.expert_lr_ratio`` x the LR, routing at ``train.routing_lr_ratio`` x. FLOP budgets
(``--flops``) and the logged FLOPs use ``peerlm.hf.flops`` for the families it knows; another family
trains by steps or tokens.

Checks before any work, each a one-line ValueError: DIR is a transformers causal-LM directory, every
memory spec is valid for the model, the data's tokenizer fits the model's vocabulary, the context fits
the model's positions, and a FLOP budget has a FLOP model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from peerlm.config import apply_overrides, to_dict
from peerlm.data import TokenDataset
from peerlm.fileio import sha256_file
from peerlm.runconfig import RunConfig, TrainConfig, data_info
from peerlm.train import StepHooks, run_optimizer, train

from .adapter import WEIGHT_NAMES, HFCausalLM, HFModelConfig, build_hf, causal_class, positions
from .flops import COSTED
from .memory import CONFIG_KEY, KINDS, MODES, memory_spec

__all__ = ["MEMORY_FORM", "parse_memory", "hf_model_config", "plan_hf_run", "train_hf"]

MEMORY_FORM = "KIND[:layers=I,J|middle][:mode=parallel|replace][:mlp_path=PATH][:OPTION=VALUE...]"


def parse_memory(text: str, n_layers: int | None) -> dict[str, Any]:
    """The ``add_memory`` arguments of one ``--add-memory`` spec (module docstring); ValueError naming
    the part that is wrong and the form."""
    kind, *items = text.strip().split(":")
    if kind not in KINDS:
        raise ValueError(f"--add-memory {text!r}: the kind comes first and is one of {', '.join(KINDS)}; form "
                         f"{MEMORY_FORM}")
    args: dict[str, Any] = {"kind": kind, "layers": "middle", "mode": "parallel"}
    options: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"--add-memory {text!r}: {item!r} is not OPTION=VALUE; form {MEMORY_FORM}")
        if key in ("layers", "mode", "mlp_path"):
            args[key] = value
        else:
            options.append(f"{key}={value}")
    if args["mode"] not in MODES:
        raise ValueError(f"--add-memory {text!r}: mode must be one of {', '.join(MODES)}, got {args['mode']!r}")
    if args["layers"] == "middle":
        if n_layers is None:
            raise ValueError(f"--add-memory {text!r}: the model's config has no num_hidden_layers, so 'middle' "
                             "is unknown; give layers=I")
        args["layers"] = [n_layers // 2]
    else:
        try:
            args["layers"] = [int(i) for i in args["layers"].split(",")]
        except ValueError:
            raise ValueError(f"--add-memory {text!r}: layers must be block indices such as 1 or 1,2, or middle, "
                             f"got {args['layers']!r}") from None
    try:
        layer = apply_overrides(KINDS[kind](), options)
    except ValueError as e:
        raise ValueError(f"--add-memory {text!r}: {e}") from None
    given = {o.split("=", 1)[0].strip() for o in options}
    args.update({k: v for k, v in to_dict(layer).items() if k in given})
    return args


def _transformers_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        what = "does not exist" if not model_dir.exists() else "has no config.json"
        raise ValueError(f"--hf-model {model_dir} {what}: pass a transformers model directory (written by "
                         "save_pretrained; config only is enough)")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 (transformers raises several kinds for a config it cannot read)
        raise ValueError(f"--hf-model {model_dir}/config.json is not a transformers config this version reads "
                         f"({' '.join(str(e).split())[:160]})") from None


def _weight_files(model_dir: Path) -> list[Path]:
    found = [model_dir / n for n in WEIGHT_NAMES if (model_dir / n).is_file()]
    shards = sorted(model_dir.glob("model-*.safetensors")) + sorted(model_dir.glob("pytorch_model-*.bin"))
    return found + shards


def _source(model_dir: Path, model_type: str) -> dict[str, Any]:
    files = _weight_files(model_dir)
    return {"path": str(model_dir.resolve()), "model_type": model_type,
            "weights": {f.name: sha256_file(f) for f in files} or None}


def hf_model_config(model_dir: str | os.PathLike[str], memory: Sequence[str] = (),
                    context_length: int | None = None) -> HFModelConfig:
    """The model section of a run of the model in ``model_dir`` with the ``--add-memory`` specs
    ``memory`` (no source recorded yet); ValueError for a directory that is not a transformers causal
    LM, a bad spec or a context longer than the model's positions."""
    model_dir = Path(model_dir)
    config = _transformers_config(model_dir)
    causal_class(config)  # a causal LM transformers knows
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    for spec_text in memory:
        spec = memory_spec(config, **parse_memory(spec_text, n_layers))
        setattr(config, CONFIG_KEY, [*(getattr(config, CONFIG_KEY, None) or []), spec])
    d = config.to_dict()
    d.pop("_name_or_path", None)  # where it was loaded from is the source's path, recorded apart
    if context_length is None:
        context_length = positions(d)
        if context_length is None:
            raise ValueError(f"--hf-model {model_dir}: its config names no maximum position; set "
                             "--set model.context_length=N")
    return HFModelConfig(d, context_length, {})


def plan_hf_run(model_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                memory: Sequence[str] = (), context_length: int | None = None,
                train: TrainConfig | None = None) -> RunConfig:
    """The RunConfig of a new run of the model in ``model_dir`` on ``data_dir`` with the ``--add-memory``
    specs ``memory``; every check of the module docstring, nothing written."""
    model_dir = Path(model_dir)
    spec = hf_model_config(model_dir, memory, context_length)
    ds = TokenDataset(data_dir)
    if spec.vocab_size < ds.vocab_size:
        raise ValueError(f"--hf-model {model_dir} has a vocabulary of {spec.vocab_size} ids but {data_dir}'s "
                         f"tokenizer has {ds.vocab_size}: prepare the data with --vocab-size <= {spec.vocab_size} "
                         f"or use a model with vocab_size >= {ds.vocab_size}")
    t = train or TrainConfig()
    if t.flops is not None and spec.model_type not in COSTED:
        raise ValueError(f"--flops needs a FLOP model, and there is none for model type {spec.model_type!r} "
                         f"(known: {', '.join(COSTED)}); give --max-steps or --max-tokens")
    spec = dataclasses.replace(spec, source=_source(model_dir, spec.model_type))
    return RunConfig(spec, t, data_info(data_dir))


def _source_weights(spec: HFModelConfig, verified: bool) -> Path | None:
    """The directory to load a fresh run's weights from (None: config only), its files checked against
    the recorded checksums unless ``verified`` (just checked, in this process)."""
    recorded = spec.source.get("weights")
    if not recorded:
        return None
    path = Path(spec.source["path"])
    if not verified:
        now = {f.name: sha256_file(f) for f in _weight_files(path)} if path.is_dir() else {}
        if now != recorded:
            raise ValueError(f"the run starts from the weights in {path}, which are gone or changed since the run "
                             "was planned, and it has no checkpoint yet; start it again with --hf-model DIR")
    return path


def _builder(verified: bool) -> Callable[..., tuple[HFCausalLM, Any]]:
    def build(spec: HFModelConfig, t: TrainConfig, device: torch.device,
              resuming: bool) -> tuple[HFCausalLM, Any]:
        weights = None if resuming else _source_weights(spec, verified)  # resuming: the checkpoint's weights
        model = build_hf(spec, device, weights)
        return model, run_optimizer(model, t)

    return build


def train_hf(run: RunConfig, out: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None, notes: Sequence[str] = (),
             hooks: StepHooks | None = None, verified: bool = False) -> dict[str, Any]:
    """Train the transformers-model ``run`` (from ``plan_hf_run``, or such a run's stored config) into
    ``out`` with ``peerlm.train.train``; returns its summary. ``verified``: the source directory's weights
    were checked against the run config in this process (``plan_hf_run``)."""
    if run.model_kind != "hf":
        raise ValueError("train_hf trains runs of transformers models; train this one with peerlm.train.train")
    return train(run, out, resume=resume, stop_at=stop_at, progress=progress, log=log, notes=notes,
                 build=_builder(verified), hooks=hooks)
