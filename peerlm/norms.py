"""Query normalisation before product-key retrieval, and RMSNorm.

The paper (after PKM, Lample et al. 2019) puts BatchNorm on the query to spread queries over the keys
and raise expert usage. In a causal LM, train-time batch statistics are means over every token of the
batch, so the output at position t depends on tokens > t of its own sequence: a (small) leak of the
future into training. Choices, all computed in fp32:

- ``"batchnorm"``: the paper's choice. Train: batch statistics over all tokens; eval: running stats.
- ``"running"``: causal-safe. Train and eval normalise with running statistics accumulated from
  *previous* batches only; the current batch's statistics update the running estimate after use, and
  carry no gradient. No token ever sees statistics of its own sequence, so it is causal at train time.
  Trade-off: early in training the estimate lags the moving query distribution (momentum sets how
  much), and no gradient flows through the statistics, as in BatchNorm's eval mode.
- ``"none"``: identity.

Data parallel: with ``group`` set (``sync_query_norms``), the training statistics of both norms are
those of the group's tokens, not one rank's (as ``nn.SyncBatchNorm``, which needs a GPU): BatchNorm's
mean and variance come from differentiable all-reduces of sums (two passes, mean first, for the
rounding of one process), RunningNorm's update from all-reduced sums without gradient. Losses then do
not depend on the number of ranks. Every rank of the group must call the norm at the same point.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from peerlm.config import QUERY_NORMS


class _GroupSum(torch.autograd.Function):
    """Sum over the group's ranks; the gradient of every rank's input is the sum of the ranks' output
    gradients (each rank's loss depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _group_moments(x_TF: Tensor, group: dist.ProcessGroup, differentiable: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, token count) of the group's tokens; every rank gets the same."""
    def all_reduce(t: Tensor, group: dist.ProcessGroup) -> Tensor:
        if differentiable:
            return _GroupSum.apply(t, group)
        dist.all_reduce(t, group=group)
        return t

    sums = torch.cat([x_TF.sum(0), x_TF.new_full((1,), x_TF.shape[0])])
    sums = all_reduce(sums, group=group)
    n, mean = sums[-1], sums[:-1] / sums[-1].clamp_min(1)
    var = all_reduce(((x_TF - mean) ** 2).sum(0), group=group) / n.clamp_min(1)
    return mean, var, n


class RunningNorm(nn.Module):
    """Normalise features with running mean/var from earlier batches (causal at train time)."""

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.group: dist.ProcessGroup | None = None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def forward(self, x_in: Tensor) -> Tensor:  # (T, F) -> (T, F), computed in the norm's own dtype
        x = x_in.to(self.weight.dtype)
        y = (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias
        if self.training and self.group is not None:
            with torch.no_grad():
                mean, var, n = _group_moments(x.detach(), self.group, differentiable=False)
                if n > 1:
                    var = var * n / (n - 1)  # unbiased, as torch.var_mean
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        elif self.training and x.shape[0] > 1:
            with torch.no_grad():
                var, mean = torch.var_mean(x.detach(), dim=0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        return y.to(x_in.dtype)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (T, F) that tolerates a single token in training by using running stats;
    with ``group`` set, its training statistics are the group's (module docstring)."""

    group: dist.ProcessGroup | None = None

    def forward(self, x_in: Tensor) -> Tensor:  # computed in the norm's own dtype
        x = x_in.to(self.weight.dtype)
        if self.training and self.group is not None:
            y = self._group_forward(x)
        elif self.training and x.shape[0] <= 1:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            y = super().forward(x)
        return y.to(x_in.dtype)

    def _group_forward(self, x_TF: Tensor) -> Tensor:
        mean, var, n = _group_moments(x_TF, self.group, differentiable=True)
        if n <= 1:
            return F.batch_norm(x_TF, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
            self.num_batches_tracked += 1
        return (x_TF - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def make_query_norm(kind: str, num_features: int) -> nn.Module:
    """Build a query norm by name; see the module docstring for the choices."""
    if kind == "batchnorm":
        return BatchNorm(num_features)
    if kind == "running":
        return RunningNorm(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {kind!r}")


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
