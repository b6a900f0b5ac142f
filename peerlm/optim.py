"""Optimisation: parameter groups, the warmup + cosine schedule, and a row-sparse AdamW for expert tables.

Parameter groups (``param_groups``):
- ``decay``: matrices of attention, MLPs, routers, query projections; weight decay ``weight_decay``.
- ``no_decay``: norms, biases, the token embedding (and the tied head) and product sub-keys. Sub-keys
  are a lookup table compared by dot products; decaying them would only shrink the retrieval scores,
  i.e. flatten the softmax gates.
- ``experts``: PEER ``w_down``/``w_up`` and PKM ``values`` (``peerlm.ffn.expert_parameters``), with their
  own learning rate and ``expert_weight_decay`` (0 by default: a row is read by few tokens per batch,
  so a per-step decay would pull rarely retrieved experts to zero regardless of their use).
- ``routing`` / ``routing_no_decay``: what decides which experts a token retrieves, i.e. the query
  projections (decayed like other matrices) and the sub-keys and query-norm affines (not decayed) of
  PEER and PKM layers (``peerlm.ffn.routing_parameters``), with their own learning rate. Adam moves every
  element by about lr per step whatever its scale, and sub-keys start at std sqrt(2/d_key) (0.125 at
  d_key 128): at a trunk LR of 2e-3 they travel their own scale in about 60 steps, and retrieval
  collapses onto a fraction of the experts. A routing LR below the trunk's keeps the keys near their
  well-spread init while the experts learn.

``RowSparseAdamW`` consumes the sparse COO gradients PEER produces with ``sparse_grad=True`` and
touches only the U rows present: their m, v, parameter rows and a per-row step count, which gives each
row the bias correction of its own number of updates. Cost per step is O(U * d), not O(N * d).
Choices:
- An untouched row is left exactly as it is: no momentum drift, no decay (LazyAdam semantics). A row
  updated at every step follows torch.optim.AdamW bit for bit on the PyTorch ops, and to float rounding
  where the CPU kernel's one-pass update (``row_adamw_``) runs instead (both tested).
- Weight decay is applied only to the touched rows, at the step's full ``lr * weight_decay``. A row
  retrieved at a fraction f of steps decays about f times as fast as under dense AdamW; with the default
  expert decay of 0 this does not arise.
- Dense gradients are accepted too (every row counts as touched), so PKM values or a model built
  without ``sparse_grad`` can share the optimizer.

``update_in_backward`` moves a row-sparse AdamW's (or a plain SGD's) table updates into the backward that
computes the tables' gradients: each distinct row's gradient is summed and applied at once, and the
batch's gradient rows are never stored (on the CPU kernels' path: ``bag_update_``), which saves their
memory (U x D per table) and two passes over them. The update equals the one ``step`` would make with
the same gradient, bit for bit. What it gives up, as every optimizer step in the backward does: the
tables' gradients are not there to clip with the others or to accumulate over micro-batches.

``GroupedOptimizer`` puts torch's AdamW (dense groups) and the row-sparse one (expert group) behind one
``step``/``zero_grad``/``state_dict``/``param_groups``, so the training loop and checkpoints see one object.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from peerlm.bags import row_updates
from peerlm.ffn import expert_parameters, memory_layers, routing_parameters
from peerlm.kernels.cpu import advise_huge_pages, usable
from peerlm.norms import BatchNorm, RMSNorm, RunningNorm
from peerlm.retrieval import ProductKeys

__all__ = [
    "param_groups", "lr_factor", "set_lr", "RowSparseAdamW", "GroupedOptimizer", "build_optimizer",
    "clip_grad_norm", "coalesced", "update_in_backward", "InBackward",
]

# norms, embeddings and product keys (whose sub-keys are routing, not weights) take no weight decay
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.GroupNorm, RMSNorm, RunningNorm, BatchNorm,
                     ProductKeys)


def _is_no_decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith("bias") or isinstance(module, _NO_DECAY_MODULES)


def param_groups(model: nn.Module, lr: float, weight_decay: float, expert_lr: float | None = None,
                 expert_weight_decay: float = 0.0, routing_lr: float | None = None) -> list[dict[str, Any]]:
    """The groups of the module docstring (empty groups are dropped); each carries ``name`` and
    ``base_lr`` (the peak the schedule scales). ``expert_lr`` / ``routing_lr`` None: ``lr``."""
    experts = list(expert_parameters(model))
    routing = {id(p) for p in routing_parameters(model)}
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "routing": [], "routing_no_decay": []}
    seen: set[int] = {id(p) for p in experts}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            no_decay = _is_no_decay(module, name, p)
            if id(p) in routing:
                buckets["routing_no_decay" if no_decay else "routing"].append(p)
            else:
                buckets["no_decay" if no_decay else "decay"].append(p)
    expert_lr = lr if expert_lr is None else expert_lr
    routing_lr = lr if routing_lr is None else routing_lr
    groups = [
        {"name": "decay", "params": buckets["decay"], "lr": lr, "base_lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": buckets["no_decay"], "lr": lr, "base_lr": lr, "weight_decay": 0.0},
        {"name": "routing", "params": buckets["routing"], "lr": routing_lr, "base_lr": routing_lr,
         "weight_decay": weight_decay},
        {"name": "routing_no_decay", "params": buckets["routing_no_decay"], "lr": routing_lr,
         "base_lr": routing_lr, "weight_decay": 0.0},
        {"name": "experts", "params": [p for p in experts if p.requires_grad], "lr": expert_lr,
         "base_lr": expert_lr, "weight_decay": expert_weight_decay},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``: linear warmup over ``warmup`` steps
    (step 0 gets 1/warmup, never 0, so the first update counts), then a cosine from 1 down to
    ``min_lr_ratio`` at ``total_steps - 1``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer | GroupedOptimizer, factor: float) -> None:
    """Set every group's lr to its ``base_lr`` times ``factor``."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def coalesced(grad: Tensor) -> Tensor:
    """``grad.coalesce()`` of a sparse COO gradient, without its sort and sum where the indices are
    already distinct and ascending: peerlm's own row-sparse gradients are built that way and flagged
    coalesced, but autograd's accumulation into ``.grad`` drops the flag, and coalescing 60k rows again
    cost more than the optimizer's update (28 ms a table at N = 1024^2, d 128)."""
    if grad.is_coalesced():
        return grad
    idx = grad._indices()
    if grad.sparse_dim() == 1 and bool((idx[0, 1:] > idx[0, :-1]).all()):
        return torch.sparse_coo_tensor(idx, grad._values(), grad.shape, is_coalesced=True, check_invariants=False)
    return grad.coalesce()


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW over row-sparse gradients of (N, D) tables; see the module docstring for the semantics."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for g in self.param_groups:
            for p in g["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowSparseAdamW updates rows of 2-D tables, got shape {tuple(p.shape)}")

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)  # per row
            for name in ("exp_avg", "exp_avg_sq"):  # read at random rows, as the table is: huge pages
                state[name] = torch.empty_like(p, memory_format=torch.preserve_format)
                advise_huge_pages(state[name])
                state[name].zero_()
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (the torch.optim signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                grad = p.grad
                if grad.is_sparse:
                    if grad.sparse_dim() != 1:
                        raise ValueError(f"RowSparseAdamW needs row-sparse gradients (sparse_dim 1), got "
                                         f"sparse_dim {grad.sparse_dim()}; convert with grad.to_sparse(1)")
                    grad = coalesced(grad)
                    rows_U, grad_UD = grad.indices()[0], grad.values()
                    if rows_U.numel() == 0:
                        continue
                else:
                    rows_U, grad_UD = None, grad
                self._update(p, state, rows_U, grad_UD, g["lr"], beta1, beta2, g["eps"], g["weight_decay"])
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch keeps any state named "step" where it was loaded (it expects a scalar); ours is per row
        # and must sit with its parameter, e.g. a CPU-loaded checkpoint resumed on CUDA
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(p.device)

    def _scratch(self, p: Tensor, name: str, rows: int, dtype: torch.dtype) -> Tensor:
        """A reusable (rows, ...) buffer for ``p``'s step: fresh (U, d) temporaries at every step cost
        more in page faults than the arithmetic on them. Not part of the optimizer state."""
        bufs = self._workspace.setdefault(id(p), {})
        buf = bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.dtype != dtype:
            shape = (rows + rows // 4,) + (() if dtype == torch.int64 else tuple(p.shape[1:]))
            buf = bufs[name] = torch.empty(shape, dtype=dtype, device=p.device)
        return buf[:rows]

    def _update(self, p: Tensor, state: dict[str, Tensor], rows_U: Tensor | None, grad_UD: Tensor, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """One AdamW step on the given rows (all rows when ``rows_U`` is None).

        The arithmetic mirrors torch's single-tensor AdamW op for op (same rounding), with the
        scalar bias corrections replaced by per-row ones computed in float64, then cast as torch does.
        Where peerlm's CPU kernels run (contiguous float CPU tables), ``row_adamw_`` does the same
        arithmetic in one pass over each touched row in place: equal to these ops to float rounding
        (an ulp here and there, where the compiler fuses a multiply-add), not bit for bit.
        """
        dense = rows_U is None
        kernels = None if dense else usable(p.data, grad_UD)
        if kernels is not None and p.is_contiguous():  # the same update in one pass (peerlm/kernels/cpu_optim.cpp)
            with torch.profiler.record_function("peerlm::row_adamw_"):
                kernels.row_adamw_(p.data, state["exp_avg"], state["exp_avg_sq"], state["step"], rows_U.contiguous(),
                                   grad_UD.contiguous(), lr, beta1, beta2, eps, weight_decay)
            return
        U = p.shape[0] if dense else rows_U.numel()
        if not hasattr(self, "_workspace"):
            self._workspace: dict[int, dict[str, Tensor]] = {}

        def gather(name: str, src: Tensor) -> Tensor:
            out = None if dense else self._scratch(p, name, U, src.dtype)
            return src if dense else torch.index_select(src, 0, rows_U, out=out)

        step_U = gather("step", state["step"]).add_(1) if not dense else state["step"] + 1
        m_UD, v_UD = gather("m", state["exp_avg"]), gather("v", state["exp_avg_sq"])
        grad_UD = grad_UD.to(p.dtype)
        m_UD.lerp_(grad_UD, 1 - beta1)
        v_UD.mul_(beta2).addcmul_(grad_UD, grad_UD, value=1 - beta2)
        t_U1 = step_U.to(torch.float64).unsqueeze(1)
        bias_correction1 = 1 - beta1**t_U1
        bias_correction2_sqrt = ((1 - beta2**t_U1) ** 0.5).to(p.dtype)
        neg_step_size = (-(lr / bias_correction1)).to(p.dtype)  # (U, 1)
        denom_UD = v_UD.sqrt() if dense else torch.sqrt(v_UD, out=self._scratch(p, "denom", U, p.dtype))
        denom_UD.div_(bias_correction2_sqrt).add_(eps)
        update_UD = (m_UD * neg_step_size if dense
                     else torch.mul(m_UD, neg_step_size, out=self._scratch(p, "update", U, p.dtype)))
        update_UD.div_(denom_UD)  # (-step_size * m) / denom, rounded as torch's addcdiv rounds it
        if dense:
            if weight_decay != 0:
                p.data.mul_(1 - lr * weight_decay)
            p.data.add_(update_UD)
            state["step"].copy_(step_U)
            return
        if weight_decay != 0:
            p_UD = gather("p", p.data).mul_(1 - lr * weight_decay).add_(update_UD)
            p.data.index_copy_(0, rows_U, p_UD)
        else:  # rows are distinct: one add per element, the same rounding, no gather of p
            p.data.index_add_(0, rows_U, update_UD)
        state["step"].index_copy_(0, rows_U, step_U)
        state["exp_avg"].index_copy_(0, rows_U, m_UD)
        state["exp_avg_sq"].index_copy_(0, rows_U, v_UD)


class _TableUpdate:
    """``bags.RowUpdate`` of a table: its optimizer's update, with the settings its group has when the
    backward runs (the group is looked up then: ``load_state_dict`` replaces the group dicts). It holds
    the optimizer weakly and the table not at all, so a registered model and optimizer are freed as
    usual (the optimizer's going removes its tables from ``row_updates``)."""

    def __init__(self, opt: torch.optim.Optimizer, group_index: int):
        self._opt, self.group_index = weakref.ref(opt), group_index

    def _parts(self) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        opt = self._opt()
        if opt is None:  # not reached: the optimizer's finalizer unregisters its tables first
            raise RuntimeError("the optimizer update_in_backward registered for this table was deleted")
        return opt, opt.param_groups[self.group_index]

    def fused_(self, p: Tensor, rows_TD: Tensor, target_TK: Tensor, weights_TK: Tensor, rows_U: Tensor) -> bool:
        opt, g = self._parts()
        kernels = usable(p.data, rows_TD, weights_TK)
        if kernels is None or not p.is_contiguous():
            return False
        args = (rows_TD.contiguous(), target_TK.contiguous(), weights_TK.contiguous(), rows_U.contiguous(), p.data)
        with torch.profiler.record_function("peerlm::bag_update_"):
            if isinstance(opt, RowSparseAdamW):
                state = opt._init_state(p)
                kernels.bag_update_(*args, state["exp_avg"], state["exp_avg_sq"], state["step"], g["lr"],
                                    *g["betas"], g["eps"], g["weight_decay"])
            else:
                kernels.bag_update_(*args, None, None, None, g["lr"])
        return True

    def apply_(self, p: Tensor, rows_U: Tensor, grad_UD: Tensor) -> None:
        opt, g = self._parts()
        with torch.no_grad():
            if isinstance(opt, RowSparseAdamW):
                opt._update(p, opt._init_state(p), rows_U, grad_UD, g["lr"], *g["betas"], g["eps"], g["weight_decay"])
            else:
                p.data.index_add_(0, rows_U, grad_UD.to(p.dtype), alpha=-g["lr"])


class InBackward:
    """The handle ``update_in_backward`` returns: ``remove()`` gives the tables' updates back to ``step``."""

    def __init__(self, params: list[Tensor]):
        self._params = [weakref.ref(p) for p in params]

    def remove(self) -> None:
        _unregister(self._params)


def _unregister(refs: list[weakref.ref]) -> None:
    for ref in refs:
        p = ref()
        if p is not None:
            row_updates.pop(p, None)


def update_in_backward(optimizer: torch.optim.Optimizer) -> InBackward:
    """Make ``optimizer`` update its tables inside the backward that computes their gradients (see the
    module docstring), for tables of peerlm's PEER and PKM layers on their fused paths (``impl="fused"``
    or ``"auto"`` off CUDA). ``optimizer``: a ``RowSparseAdamW``, or a ``torch.optim.SGD`` without
    momentum, weight decay or ``maximize`` (the rule its sparse gradients take). Its learning rates
    are read when the backward runs, so ``set_lr`` before the forward applies to that step.

    The tables then get no ``.grad``: ``step()`` updates whatever gradient does reach it (a path that
    does not update in the backward, such as Triton's, the sharded one or a backward traced by
    ``torch.compile``, still trains, at ``step``),
    clipping (``clip_grad_norm``) no longer sees the tables' gradients, and with micro-batches each
    backward is a step of its own. One process only: data parallelism would need the tables' gradients
    reduced over ranks before they are applied. A layer called twice before one backward gets two
    updates, the earlier call's backward reading the table the later one updated (peerlm's models call
    each layer once). It lasts while the optimizer lives, or until the handle's ``remove()``."""
    if isinstance(optimizer, torch.optim.SGD):
        for g in optimizer.param_groups:
            bad = {k: g[k] for k in ("momentum", "weight_decay", "maximize", "nesterov") if g.get(k)}
            if bad:
                raise ValueError(f"update_in_backward takes SGD without momentum, weight decay, maximize or "
                                 f"nesterov (the rule of its sparse gradients), got {bad}; use RowSparseAdamW "
                                 "for a stateful update")
    elif not isinstance(optimizer, RowSparseAdamW):
        raise TypeError(f"update_in_backward takes peerlm.optim.RowSparseAdamW or torch.optim.SGD, got "
                        f"{type(optimizer).__name__}")
    params = []
    for i, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if p.dim() != 2:
                raise ValueError(f"update_in_backward updates rows of 2-D tables, got shape {tuple(p.shape)}")
            row_updates[p] = _TableUpdate(optimizer, i)
            params.append(p)
    handle = InBackward(params)
    weakref.finalize(optimizer, _unregister, handle._params)
    return handle


class GroupedOptimizer:
    """Several optimizers driven as one: joint ``param_groups``, ``step``, ``zero_grad`` and state dicts."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"kinds": [type(o).__name__ for o in self.optimizers],
                "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = [type(o).__name__ for o in self.optimizers]
        if state.get("kinds") != kinds:
            raise ValueError(f"optimizer state is for {state.get('kinds')}, this run uses {kinds}")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, expert_lr: float | None = None, expert_weight_decay: float = 0.0,
                    sparse_experts: bool = False, routing_lr: float | None = None,
                    in_backward: bool = False) -> GroupedOptimizer:
    """torch AdamW on every group; with ``sparse_experts`` the expert group goes to ``RowSparseAdamW``,
    which ``in_backward`` makes update the tables in the backward (``update_in_backward``).

    The dense groups use torch's fused AdamW (one kernel over all tensors: at the study's 256^2 tables
    about 7x faster on CPU than the per-tensor loop, which made the optimizer 15% of a PEER step). It
    rounds differently from the per-tensor loop in the last bit, not in the update rule.
    """
    groups = param_groups(model, lr, weight_decay, expert_lr, expert_weight_decay, routing_lr)
    # torch's AdamW rejects sparse gradients: a layer built with sparse_grad=True needs the row-sparse one
    layers = memory_layers(model)
    sparse_experts = sparse_experts or any(getattr(m, "sparse_grad", False) for _, m in layers)
    sparse = [g for g in groups if sparse_experts and g["name"] == "experts"]
    dense = [g for g in groups if g not in sparse]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense, lr=lr, betas=betas, eps=eps, fused=True)]
    if in_backward and not sparse:
        raise ValueError("in_backward updates the expert tables with the row-sparse AdamW: give sparse_experts=True "
                         "(and a model with PEER or PKM layers)")
    if sparse:
        opts.append(RowSparseAdamW(sparse, lr=lr, betas=betas, eps=eps))
        if in_backward:
            update_in_backward(opts[-1])
    return GroupedOptimizer(opts)


@torch.no_grad()
def clip_grad_norm(params: Iterable[Tensor], max_norm: float, group: Any = None,
                   sharded: Iterable[Tensor] = ()) -> float:
    """Clip the global L2 norm of dense and sparse gradients together; returns the norm before clipping.

    Sparse gradients are coalesced first (gradient accumulation leaves duplicate rows, whose values
    must be summed before squaring). ``max_norm <= 0`` only measures. Scaling follows
    ``torch.nn.utils.clip_grad_norm_``: by max_norm / (norm + 1e-6) when that is below 1.

    Data parallel: with a process ``group``, the gradients of the parameters in ``sharded`` (column
    shards of expert tables) and DTensor gradients (FSDP) are this rank's parts of the whole, so their
    squared norms are summed over the group; every other gradient is the same on every rank and counts
    once. The norm, and so the clipping, is then that of one process training on the group's batch.
    """
    shard_ids = {id(p) for p in sharded}
    grads: list[Tensor] = []
    local: list[bool] = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = coalesced(p.grad)
        grads.append(p.grad)
        local.append(id(p) in shard_ids)
    if group is None and not grads:
        return 0.0

    def part(g: Tensor) -> Tensor:
        if hasattr(g, "to_local"):  # a DTensor: its local shard
            g = g.to_local()
        return torch.linalg.vector_norm(g.values() if g.is_sparse else g, dtype=torch.float32)

    norms = [part(g) for g in grads]
    if group is None:
        norm = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
    else:
        split = [hasattr(g, "to_local") or own for g, own in zip(grads, local)]
        device = norms[0].device if norms else torch.device("cpu")
        squares = torch.zeros(2, dtype=torch.float32, device=device)
        for n, own in zip(norms, split):
            squares[1 if own else 0] += n.to(device) ** 2
        replicated = squares[0].clone()
        torch.distributed.all_reduce(squares, group=group)
        norm = float(torch.sqrt(replicated + squares[1]))
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:  # sparse: scale the values in place (``mul_`` would uncoalesce the tensor)
                g = g.to_local() if hasattr(g, "to_local") else g
                (g.values() if g.is_sparse else g).mul_(coef)
    return norm
