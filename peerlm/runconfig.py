"""What a training run is: its configs (``TrainConfig``, ``RunConfig``), its errors, the device it
runs on and how many steps its budget buys. ``peerlm.train`` runs it; both are importable from there.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from peerlm.config import ModelConfig, check_types, from_dict, to_dict
from peerlm.data import TokenDataset
from peerlm.flops import model_cost
from peerlm.parallel import runtime

__all__ = ["TrainConfig", "RunConfig", "TrainError", "TrainInterrupted", "DTYPES", "data_info", "model_section",
           "resolve_device", "autocast_dtype", "plan_steps"]

DTYPES = ("auto", "float32", "bfloat16")
EXPERT_UPDATES = ("step", "backward")


class TrainError(Exception):
    """A problem with a run a user can fix (its directory, budget or resume state)."""


class TrainDiverged(TrainError):
    """The training loss became NaN or inf: the run cannot go on as configured."""


class TrainInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint. A KeyboardInterrupt, so that code
    around ``train`` that catches Exception does not carry on as if the run were complete."""

    def __init__(self, signame: str, step: int, total: int, out: Path) -> None:
        super().__init__(f"stopped by {signame} after step {step}/{total}; checkpoint written in {out}")
        self.signame, self.step, self.total, self.out = signame, step, total, out
        self.signum = int(getattr(signal, signame))


@dataclass
class TrainConfig:
    """Optimisation and run-length settings; see the module docstring.

    Learning rates: ``lr`` is the trunk's peak; the expert tables (PEER ``w_down``/``w_up``, PKM
    ``values``) train at ``expert_lr_ratio * lr`` and the routing (query projections, query norms,
    sub-keys) at ``routing_lr_ratio * lr`` (``peerlm.optim``). Warmup is ``warmup`` steps when set,
    else ``warmup_frac`` of the run. Run length: exactly one of ``max_steps``, ``max_tokens`` and
    ``flops``; none has a default, so a budget is never cut short by a limit nobody set.
    ``expert_update``: ``"step"`` (the tables are updated with everything else), or ``"backward"``
    (with ``sparse_optimizer``: each table's row-sparse AdamW update runs inside the backward, and its
    gradient rows are never stored, ``peerlm.optim.update_in_backward``; the same update, but the
    tables' gradients are left out of the clipped norm, and it needs one micro-batch and one process).
    """

    lr: float = 1e-3
    expert_lr_ratio: float = 1.0
    routing_lr_ratio: float = 1.0
    weight_decay: float = 0.1
    expert_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int | None = None
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    flops: float | None = None
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    sparse_optimizer: bool = False
    expert_update: str = "step"
    log_every: int = 1
    tensorboard: bool = False
    parallel: str = "none"
    shard_experts: bool = False
    dist_timeout: float = 300.0

    LIMITS: ClassVar[tuple[str, ...]] = ("max_steps", "max_tokens", "flops")

    def __post_init__(self) -> None:
        check_types(self)
        self.betas = tuple(float(b) for b in self.betas)

        def bad(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("lr", "eps", "expert_lr_ratio", "routing_lr_ratio"):
            if not getattr(self, name) > 0:
                bad(name, "> 0")
        for name in ("weight_decay", "expert_weight_decay", "grad_clip", "ckpt_every"):
            if getattr(self, name) < 0:
                bad(name, ">= 0")
        if self.warmup is not None and self.warmup < 0:
            bad("warmup", ">= 0 steps or None (use warmup_frac)")
        if not 0 <= self.warmup_frac < 1:
            bad("warmup_frac", "in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "in [0, 1]")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "keep", "log_every"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")
        if not 0 <= self.seed < 2**63:  # numpy's and torch's generators take no negative seed
            bad("seed", "a whole number in [0, 2**63)")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, ">= 1 or None")
        if self.flops is not None and not self.flops > 0:
            bad("flops", "> 0 or None")
        given = [n for n in self.LIMITS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"TrainConfig sets {' and '.join(given)}: give exactly one run length "
                             "(max_steps, max_tokens or flops), set the others to none")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {DTYPES}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if self.parallel not in runtime.MODES:
            bad("parallel", f"one of {runtime.MODES}")
        if self.shard_experts and self.parallel == "none":
            raise ValueError("TrainConfig.shard_experts shards the expert tables over data-parallel ranks: "
                             "set train.parallel=ddp or fsdp too (and launch with torchrun), or "
                             "train.shard_experts=false for one process")
        if not self.dist_timeout > 0:
            bad("dist_timeout", "> 0 seconds")
        if self.expert_update not in EXPERT_UPDATES:
            bad("expert_update", f"one of {EXPERT_UPDATES}")
        if self.expert_update == "backward":
            needs = {"sparse_optimizer": (self.sparse_optimizer, "true"), "grad_accum": (self.grad_accum == 1, "1"),
                     "parallel": (self.parallel == "none", "none")}
            for name, (ok, value) in needs.items():
                if not ok:
                    raise ValueError(f"TrainConfig.expert_update=backward updates the expert tables with the "
                                     f"row-sparse AdamW inside each backward, which needs train.{name}={value} "
                                     f"(got {getattr(self, name)!r}); set it, or expert_update=step")

    def limit(self) -> tuple[str, float]:
        """(name, value) of the run length; TrainError when none is set."""
        for name in self.LIMITS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        raise TrainError("no run length: set one of --max-steps, --max-tokens or --flops "
                         "(or train.max_steps / train.max_tokens / train.flops)")

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else round(self.warmup_frac * total)


@dataclass
class RunConfig:
    """What ``config.json`` of a run holds. ``model`` is peerlm's own ``ModelConfig``, or, for a run
    that trains a transformers model (``model_kind`` "hf", written to JSON only then), its
    ``peerlm.hf.adapter.HFModelConfig``. ``data`` describes the prepared directory: its path,
    vocabulary and per-split token and UTF-8 byte counts (for bits per byte). ``finetune`` is empty
    for a run trained from scratch; a run that continues a trained one records there the run it
    started from and how it trains it (``peerlm.continual``)."""

    model: Any  # ModelConfig, or peerlm.hf.adapter.HFModelConfig
    train: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)

    MODEL_KINDS: ClassVar[tuple[str, ...]] = ("peerlm", "hf")

    def __post_init__(self) -> None:
        if self.model_kind == "hf":
            if self.train.parallel != "none":
                raise ValueError("a transformers model trains in one process; set train.parallel=none")
            return
        ffn = self.model.ffn
        if self.train.shard_experts and (ffn is None or ffn.KIND not in ("peer", "pkm")):
            raise ValueError("train.shard_experts shards PEER expert tables and PKM value tables, but this "
                             "model has none; use a peer or pkm preset or set train.shard_experts=false")

    @property
    def model_kind(self) -> str:
        """"peerlm" (a ``ModelConfig``) or "hf" (a transformers model)."""
        return "peerlm" if isinstance(self.model, ModelConfig) else getattr(self.model, "KIND", "?")

    def model_dict(self) -> dict[str, Any]:
        """The JSON of the model section (what checkpoints record and are checked against)."""
        return to_dict(self.model) if self.model_kind == "peerlm" else self.model.to_dict()

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token (``peerlm.flops``; ``peerlm.hf.flops`` for a transformers model of a
        known family); None where there is no FLOP model for the model."""
        if self.model_kind == "peerlm":
            return model_cost(self.model, self.model.context_length)["flops_train"]
        from peerlm.hf.flops import COSTED, hf_cost

        return hf_cost(self.model)["flops_train"] if self.model.model_type in COSTED else None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model_dict(), "train": to_dict(self.train), "data": self.data}
        if self.model_kind != "peerlm":
            out["model_kind"] = self.model_kind
        if self.finetune:
            out["finetune"] = self.finetune
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict) or "model" not in d or "train" not in d:
            raise ValueError("a run config needs 'model' and 'train' sections")
        return cls(model_section(d), from_dict(TrainConfig, d["train"]), d.get("data", {}), d.get("finetune", {}))


def model_section(config: dict[str, Any]) -> Any:
    """The model of a run config dict: a ``ModelConfig``, or for ``model_kind`` "hf" a
    ``peerlm.hf.adapter.HFModelConfig`` (ValueError / TypeError / KeyError when it is not valid)."""
    kind = config.get("model_kind", "peerlm")
    if kind not in RunConfig.MODEL_KINDS:
        raise ValueError(f"unknown model_kind {kind!r}; known: {', '.join(RunConfig.MODEL_KINDS)}")
    if kind == "hf":
        from peerlm.hf.adapter import HFModelConfig

        return HFModelConfig.from_dict(config["model"])
    return from_dict(ModelConfig, config["model"])


def data_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``data`` section of a RunConfig for a prepared directory."""
    ds = TokenDataset(data_dir)
    return {"dir": str(Path(data_dir).resolve()), "vocab_size": ds.vocab_size, "eot_id": ds.eot_id,
            "tokenizer_sha256": ds.tokenizer_sha256,
            "splits": {n: {"tokens": ds.num_tokens(n), "bytes": ds.num_bytes(n),
                           "eval": bool(ds.meta["splits"][n].get("eval", False))} for n in ds.splits}}


def autocast_dtype(device_type: str, dtype: str) -> torch.dtype | None:
    """The autocast dtype a run of ``dtype`` uses on a device of ``device_type``: bf16 on CUDA unless the
    run asked for float32; none elsewhere. ``resolve_device`` and the study's records both read it."""
    return torch.bfloat16 if device_type == "cuda" and dtype in ("auto", "bfloat16") else None


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None, str]:
    """(device, autocast dtype or None, the reason), decided in this one place."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "CUDA is available" if dev.type == "cuda" else "no CUDA device"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise TrainError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        why = "as configured"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"device {device!r} requested but CUDA is not available; use device=cpu")
            n = torch.cuda.device_count()
            if dev.index is not None and dev.index >= n:
                raise TrainError(f"device {device!r} requested but this machine has {n} CUDA device(s), "
                                 f"cuda:0..cuda:{n - 1}")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise TrainError(f"device {device!r} requested but this torch build or machine has no MPS "
                                 "(Apple GPU) device; use device=cpu")
        elif dev.type != "cpu":
            raise TrainError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "bfloat16" and dev.type != "cuda":
        raise TrainError("dtype=bfloat16 autocast is for CUDA only; use dtype=float32 or auto on CPU")
    amp = autocast_dtype(dev.type, dtype)
    prec = "bf16 autocast (fp32 weights, fp32 routing)" if amp else "fp32"
    return dev, amp, f"{dev} ({why}), {prec}"


def plan_steps(run: RunConfig) -> tuple[int, str]:
    """Number of optimizer steps and the limit that sets it (``TrainConfig.limit``)."""
    t, T = run.train, run.model.context_length
    tokens_per_step = t.batch_size * t.grad_accum * T
    name, value = t.limit()
    if name == "max_steps":
        steps = int(value)
    elif name == "max_tokens":
        steps = int(value // tokens_per_step)
    else:
        per_token = run.flops_per_token()
        if per_token is None:
            raise TrainError(f"a FLOP budget needs a model with a FLOP model, and {run.model.model_type} has none "
                             "(known: peerlm's own and the families of peerlm.hf.flops.COSTED); give "
                             "--max-steps or --max-tokens")
        steps = int(value // (per_token * tokens_per_step))
    if steps < 1:
        raise TrainError(f"the {name} budget buys less than one step of {tokens_per_step:,} tokens; "
                         "raise it or lower batch_size / grad_accum / context_length")
    return steps, name
