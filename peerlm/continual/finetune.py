"""``finetune``: continue a trained run on new data into a new run directory, with one of five methods.

    full     every parameter, AdamW (the base run's settings but the LR)
    lora     LoRA adapters on the trunk's linear layers (``peerlm.continual.lora``), AdamW; the run's
             checkpoints hold the adapters, and eval / generate read the merged weights
    memory   the PEER tables / PKM values only, every row the batch retrieves, row-sparse gradients and
             the lazy row-sparse AdamW (an untouched row is left exactly as it is); routing frozen
    sparse   sparse memory finetuning (``peerlm.continual.memory``): per step only the ``slots`` rows of
             highest TF-IDF against the base run's training data; SGD without momentum or weight decay
             (Lin et al. 2025: no optimizer state at all), or the lazy row-sparse AdamW
             (``optimizer="adamw"``: its step works on the chosen rows only, but its two moment tables
             are (N, d) each, allocated at the first step); routing frozen
    grow     PEER layers grown by ``grow`` sub-keys per half (``peerlm.continual.grow``); only the new
             experts and new sub-keys train (AdamW, row-sparse for the tables)

"Routing frozen" means the query projection, query norm and sub-keys take no gradient and the query
norm runs in eval mode (its statistics do not move). A frozen parameter stays bitwise equal to the
base run's (tested).

The run is an ordinary run directory trained by ``peerlm.train.train`` (one writer per directory,
atomic checkpoints, exact ``--resume``, SIGTERM checkpoint, metrics.jsonl, progress line); its
config records in ``finetune`` the base run, the checkpoint it started from and the method's
settings, so ``--resume`` needs only the output directory. The base run is only read: never written,
and refused while a training holds its lock.

A base run of a transformers model (``peerlm train --hf-model``, ``model_kind`` "hf") takes ``full``,
``memory`` and ``sparse``: the finetune's model section is the base's, its memory layers are found by
``memory_layers()`` as in peerlm's model; ``lora`` and ``grow`` act on peerlm's own layers and refuse it.

Checks before any work (each a one-line ``ValueError`` / ``DataError``): the base run has an intact
checkpoint and is not being trained; the output is not the base run; the data was prepared with the
base run's tokenizer; the method fits the model (``memory`` / ``sparse`` need PEER or PKM layers,
``grow`` PEER layers); ``slots`` is in [1, N].
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from peerlm.checkpoint import checkpoint_step, find_checkpoint, read_config, verify_checkpoint
from peerlm.checkpoint.local import WEIGHT_FILES
from peerlm.config import ModelConfig, PEERConfig, PKMConfig, from_dict, to_dict
from peerlm.continual.background import background_frequencies
from peerlm.continual.grow import KEY_INITS, GrowRows, grow_model, grown_config
from peerlm.continual.lora import TRUNK_TARGETS, attach_lora, lora_config
from peerlm.continual.memory import RoutingFrozen, SparseRows, table_parameters
from peerlm.data import DataError, TokenDataset
from peerlm.fileio import LOCK_NAME
from peerlm.model import Transformer, build_model
from peerlm.optim import GroupedOptimizer, RowSparseAdamW, build_optimizer, param_groups
from peerlm.runconfig import RunConfig, TrainConfig, data_info, model_section
from peerlm.rundir import RunDir, check_same_tokenizer, load_run, run_fingerprint
from peerlm.train import StepHooks, train

__all__ = ["METHODS", "OPTIMIZERS", "FinetuneSpec", "base_busy", "plan_finetune", "finetune_config", "finetune"]

METHODS = ("full", "lora", "memory", "sparse", "grow")
OPTIMIZERS = ("adamw", "sgd")
SGD_LR = 1.0  # default LR of SGD on table rows: gate-weighted row gradients are small


@dataclasses.dataclass
class FinetuneSpec:
    """How a finetune run trains its base; recorded as ``config.json``'s ``finetune`` section."""

    base: str
    checkpoint: str
    base_step: int | None
    method: str
    optimizer: str = "adamw"
    slots: int | None = None
    background: int = 100
    background_data: str | None = None
    background_batch_size: int | None = None
    grow: int | None = None
    key_init: str = "zero"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: list(TRUNK_TARGETS))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown finetune method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "sgd" and self.method != "sparse":
            raise ValueError("--optimizer sgd is for --method sparse; the other methods train with AdamW")
        if self.method == "sparse" and self.slots is None:
            raise ValueError("--method sparse needs --slots T (the rows updated per step and layer)")
        if self.slots is not None and self.slots < 1:
            raise ValueError(f"--slots must be >= 1, got {self.slots}")
        if self.background < 1:
            raise ValueError(f"--background must be >= 1 batches, got {self.background}")
        if self.method == "grow" and (self.grow is None or self.grow < 1):
            raise ValueError(f"--method grow needs --grow M >= 1 (sub-keys added per half), got {self.grow}")
        if self.key_init not in KEY_INITS:
            raise ValueError(f"--key-init must be one of {', '.join(KEY_INITS)}, got {self.key_init!r}")
        if self.method == "lora":
            lora_config(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def base_busy(run_dir: str | os.PathLike[str]) -> str | None:
    """What holds ``run_dir``'s writer lock (``peerlm.fileio.DirLock``), None when nobody does. Only
    reads: the lock file is opened read-only and probed with a shared lock, never created."""
    path = Path(run_dir) / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # no flock on this platform: DirLock cannot hold one either
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_method(spec: FinetuneSpec, cfg: Any) -> None:
    if not isinstance(cfg, ModelConfig):  # a transformers model (peerlm.hf.training)
        _check_hf_method(spec, cfg)
        return
    kind = cfg.ffn.KIND if cfg.ffn is not None else None
    if spec.method in ("memory", "sparse") and kind not in ("peer", "pkm"):
        raise ValueError(f"--method {spec.method} trains memory layers, and the base model has none "
                         f"({kind or 'dense'}); use --method full or lora")
    if spec.method == "grow" and kind != "peer":
        what = "PKM layers (growing a PKM is not supported)" if kind == "pkm" else f"no PEER layer ({kind or 'dense'})"
        raise ValueError(f"--method grow adds experts to PEER layers, and the base model has {what}")
    if spec.slots is not None:
        if kind not in ("peer", "pkm"):
            raise ValueError("--slots is for --method sparse on a model with memory layers")
        n_slots = cfg.ffn.num_experts if isinstance(cfg.ffn, PEERConfig) else cfg.ffn.num_keys
        if spec.slots > n_slots:
            raise ValueError(f"--slots {spec.slots} is more than the {n_slots} slots of each memory layer; "
                             f"give 1..{n_slots}")
    if spec.method == "lora":
        names = [n for n, m in _module_tree(cfg).named_modules() if isinstance(m, torch.nn.Linear)]
        if not any(n == t or n.endswith("." + t) for n in names for t in spec.lora_targets):
            raise ValueError(f"no linear layer of the base model matches the LoRA targets {spec.lora_targets}")


def _check_hf_method(spec: FinetuneSpec, cfg: Any) -> None:
    """The methods of a base run of a transformers model: full, memory and sparse (lora and grow act on
    the layers of peerlm's own model)."""
    if spec.method in ("lora", "grow"):
        raise ValueError(f"--method {spec.method} works on runs of peerlm's own models, and the base run trains "
                         f"a transformers {cfg.model_type} model; use --method full, memory or sparse")
    layers = [from_dict(PEERConfig if m["kind"] == "peer" else PKMConfig, m["options"]) for m in cfg.memory]
    if spec.method in ("memory", "sparse") and not layers:
        raise ValueError(f"--method {spec.method} trains memory layers, and the base model has none (a dense "
                         f"{cfg.model_type}); use --method full")
    if spec.slots is not None:
        if not layers:
            raise ValueError("--slots is for --method sparse on a model with memory layers")
        n_slots = min(c.num_experts if isinstance(c, PEERConfig) else c.num_keys for c in layers)
        if spec.slots > n_slots:
            raise ValueError(f"--slots {spec.slots} is more than the {n_slots} slots of a memory layer; "
                             f"give 1..{n_slots}")


def _model_dict(cfg: Any) -> dict[str, Any]:
    return to_dict(cfg) if isinstance(cfg, ModelConfig) else cfg.to_dict()


def _new_model(cfg: Any, device: torch.device) -> torch.nn.Module:
    """A model of ``cfg`` for a checkpoint to fill (peerlm's, or a transformers model's adapter)."""
    if isinstance(cfg, ModelConfig):
        return build_model(cfg, device)
    from peerlm.hf.adapter import build_hf

    return build_hf(cfg, device)


def _module_tree(cfg: ModelConfig) -> Transformer:
    """The model's module tree without storage (for checks)."""
    with torch.device("meta"):
        return Transformer(cfg)


def plan_finetune(base: str | os.PathLike[str], data_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                  spec_args: dict[str, Any], notes: list[str] | None = None) -> tuple[FinetuneSpec, dict]:
    """Phase 1 of a new finetune: every check that needs no work; returns the spec and the base
    checkpoint's run config. Writes nothing."""
    base, out = Path(base), Path(out)
    if not base.exists():
        raise ValueError(f"{base}: no such base run")
    run_dir = base.parent.parent if base.parent.name == "checkpoints" else base  # a checkpoint's run
    busy = base_busy(run_dir) or base_busy(base)
    if busy:
        raise ValueError(f"{base} is being written by a training ({busy}); finetune from it once that ends, "
                         "or from a copy of the run")
    if _inside(out, run_dir):
        raise ValueError(f"--out {out} is inside the base run {run_dir}; a finetune writes a new run directory, "
                         "never the base run")
    ckpt = find_checkpoint(base, notes)
    verify_checkpoint(ckpt, WEIGHT_FILES)
    base_config = read_config(ckpt)
    try:
        cfg = model_section(base_config)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{ckpt}/config.json has no valid model section ({e})") from None
    spec = FinetuneSpec(base=str(run_dir.resolve()), checkpoint=str(ckpt.resolve()), base_step=checkpoint_step(ckpt),
                        **spec_args)
    _check_method(spec, cfg)
    ds = TokenDataset(data_dir)
    check_same_tokenizer(run_fingerprint(base, base_config), ds.tokenizer_sha256, str(data_dir),
                         f"prepare the new text with the base run's tokenizer (`peerlm data prepare --tokenizer "
                         f"{base} ...`)")
    if ds.vocab_size > cfg.vocab_size:
        raise DataError(f"{data_dir} has {ds.vocab_size} token ids, more than the base model's {cfg.vocab_size}")
    if spec.method == "sparse":
        bg = spec.background_data or base_config.get("data", {}).get("dir")
        if not bg:
            raise ValueError(f"{base} records no training data for the background frequencies; pass "
                             "--background-data DIR")
        bds = TokenDataset(bg)
        check_same_tokenizer(run_fingerprint(base, base_config), bds.tokenizer_sha256, str(bg),
                             "pass --background-data with data of the base run's tokenizer")
        bds.windows_per_epoch(cfg.context_length)
        spec.background_data = str(Path(bg).resolve())
    if RunDir(out).latest_checkpoint() is not None:
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return spec, base_config


def finetune_config(spec: FinetuneSpec, base_config: dict, data_dir: str | os.PathLike[str],
                    train_overrides: dict[str, Any]) -> RunConfig:
    """The finetune's RunConfig: the base run's model (grown, for ``grow``) and training settings with
    one LR for every group, no warmup unless given, and ``train_overrides`` (run length, LR, ...)."""
    cfg = model_section(base_config)
    if spec.method == "grow":
        cfg = grown_config(cfg, spec.grow)
    base_train = from_dict(TrainConfig, base_config["train"]) if "train" in base_config else TrainConfig()
    lr = SGD_LR if spec.optimizer == "sgd" else base_train.lr
    fields = {**to_dict(base_train), "lr": lr, "expert_lr_ratio": 1.0, "routing_lr_ratio": 1.0,
              "warmup": 0, "sparse_optimizer": False, "expert_update": "step", "parallel": "none",
              "shard_experts": False,
              "max_steps": None, "max_tokens": None, "flops": None, "tensorboard": False}
    if spec.optimizer == "sgd":
        fields.update(weight_decay=0.0, expert_weight_decay=0.0)
    fields.update(train_overrides)
    t = from_dict(TrainConfig, fields)
    return RunConfig(cfg, t, data_info(data_dir), {"base_model": _model_dict(model_section(base_config)),
                                                   **spec.to_dict()})


# ------------------------------------------------------------------------------------------- build


def _freeze_all_but(model: Transformer, trainable: Sequence[torch.nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad = id(p) in keep


def _table_optimizer(model: Transformer, t: TrainConfig, sgd: bool) -> GroupedOptimizer:
    """One optimizer over the trainable parameters: the tables (row-sparse gradients) by SGD or the lazy
    row-sparse AdamW, any other trainable parameter (grown sub-keys) by AdamW."""
    groups = param_groups(model, t.lr, t.weight_decay, t.lr, t.expert_weight_decay, t.lr)
    tables = [g for g in groups if g["name"] == "experts"]
    rest = [g for g in groups if g["name"] != "experts"]
    if sgd:
        for g in tables:
            g["weight_decay"] = 0.0
        opts: list[Any] = [torch.optim.SGD(tables, lr=t.lr, momentum=0.0, weight_decay=0.0, foreach=False)]
    else:
        opts = [RowSparseAdamW(tables, lr=t.lr, betas=t.betas, eps=t.eps)]
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=t.lr, betas=t.betas, eps=t.eps, foreach=False))
    return GroupedOptimizer(opts)


class _LateHooks(StepHooks):
    """The method's step hooks, made once ``build`` has made the model they act on."""

    def __init__(self) -> None:
        self.inner: Any = None

    def begin_step(self, model: Transformer, step: int) -> None:
        if self.inner is not None:
            self.inner.begin_step(model, step)

    def before_update(self, model: Transformer, step: int) -> None:
        if self.inner is not None:
            self.inner.before_update(model, step)


def _load_base(spec: FinetuneSpec, device: torch.device) -> Transformer:
    """The base model (weights of the recorded checkpoint; a LoRA run's adapters merged)."""
    model, _ = load_run(spec.checkpoint, device)
    for p in model.parameters():
        p.requires_grad = True
    return model


def _builder(spec: FinetuneSpec, hooks: _LateHooks, log: Callable[[str], None],
             chosen: list | None) -> Callable[..., tuple[Transformer, Any]]:
    def build(cfg: ModelConfig, t: TrainConfig, device: torch.device, resuming: bool) -> tuple[Transformer, Any]:
        if spec.method == "grow":
            if resuming:
                model = build_model(cfg, device)
            else:
                model = grow_model(_load_base(spec, device), spec.grow, spec.key_init)
            base_n = {name: layer.n - spec.grow for name, layer in model.memory_layers()}
        elif resuming:
            model = _new_model(cfg, device)  # the checkpoint brings the weights
        else:
            model = _load_base(spec, device)  # through load_run: a LoRA base comes merged
            if _model_dict(model.cfg) != _model_dict(cfg):
                raise ValueError(f"{spec.checkpoint} holds another model than the run config names")
        model.train()
        if spec.method == "full":
            opt = build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, t.lr, t.expert_weight_decay,
                                  routing_lr=t.lr)
            return model, opt
        if spec.method == "lora":
            attach_lora(model, spec.lora_rank, spec.lora_alpha, spec.lora_dropout, spec.lora_targets)
            hooks.inner = RoutingFrozen()
            return model, build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps)
        layers = [m for _, m in model.memory_layers()]
        for m in layers:
            m.sparse_grad = True
        tables = [p for m in layers for p in table_parameters(m)]
        if spec.method == "grow":
            _freeze_all_but(model, tables + [m.keys.keys for m in layers])
            hooks.inner = GrowRows(model, base_n)
            return model, _table_optimizer(model, t, sgd=False)
        _freeze_all_but(model, tables)
        if spec.method == "memory":
            hooks.inner = RoutingFrozen()
        else:
            df = _background(spec, model if not resuming else None, cfg, device, log)
            hooks.inner = SparseRows(model, df, spec.background, spec.slots, chosen, micro_batches=t.grad_accum)
        return model, _table_optimizer(model, t, sgd=spec.optimizer == "sgd")

    return build


def _background(spec: FinetuneSpec, model: Transformer | None, cfg: ModelConfig, device: torch.device,
                log: Callable[[str], None]) -> dict:
    """Background df of the base model (``model`` when it holds the base weights, else loaded)."""
    base = model if model is not None else _load_base(spec, device)
    bcfg = read_config(spec.checkpoint)
    bt = bcfg.get("train", {})
    ds = TokenDataset(spec.background_data)
    batch = spec.background_batch_size or bt.get("batch_size", 8)
    return background_frequencies(base, spec.checkpoint, ds, spec.background, batch, cfg.context_length,
                                  bt.get("seed", 0), log)


def finetune(run: RunConfig, out: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
             progress: bool = True, log: Callable[[str], None] | None = None, notes: Sequence[str] = (),
             chosen: list | None = None) -> dict[str, Any]:
    """Train the finetune ``run`` (from ``finetune_config``, or a finetune run's stored config on
    ``resume``) into ``out``; returns ``peerlm.train.train``'s summary. ``chosen`` (a list) receives the
    rows ``sparse`` chose at each step."""
    if not run.finetune:
        raise ValueError("this run config has no finetune section; train it with `peerlm train`")
    spec = FinetuneSpec.from_dict(run.finetune)
    if _inside(Path(out), Path(spec.base)):
        raise ValueError(f"--out {out} is inside the base run {spec.base}; a finetune writes a new run "
                         "directory, never the base run")
    hooks = _LateHooks()
    say = log or (lambda s: tqdm.write(s, file=sys.stdout))
    return train(run, out, resume=resume, stop_at=stop_at, progress=progress, log=log, notes=notes,
                 build=_builder(spec, hooks, say, chosen), hooks=hooks)
