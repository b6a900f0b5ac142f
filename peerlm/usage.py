"""Expert (or memory slot) usage, the paper's two metrics, shared by PEER and PKM.

usage: the fraction of slots with non-zero accumulated gate mass; unevenness: KL(z || uniform) =
log N + sum_i z_i log z_i, with z the accumulated gate mass per slot normalised to sum 1 (0 log 0 = 0).
Two more, per token and averaged over tokens: distinct, the share of distinct slots among the h*k a
token retrieves (1 when no two heads pick the same slot; heads share one pool, so duplicates are
possible), and effective, exp of the entropy of the token's gates normalised to sum 1, the gates of
a slot picked by several heads added up (how many slots its output really mixes: h*k for equal
gates on distinct slots, 1 when one slot holds all the mass).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def usage_metrics(mass_N: Tensor) -> dict[str, float]:
    """Usage and unevenness (KL from uniform) of an accumulated gate-mass vector."""
    mass = mass_N.double()
    z = mass / mass.sum()
    plogp = torch.where(z > 0, z * torch.log(z.clamp_min(1e-300)), torch.zeros_like(z))
    return {
        "usage": float((mass > 0).double().mean()),
        "unevenness": float(math.log(mass.numel()) + plogp.sum()),
    }


class UsageTracking:
    """Mixin for an nn.Module with ``usage_slots`` slots: a float64 gate-mass buffer (not saved in
    checkpoints) and the per-token sums behind ``distinct`` and ``effective``, filled while
    ``track_usage`` is on (on the module's device: no host sync per forward). Call
    ``_init_usage(on)`` in ``__init__``."""

    usage_slots: int
    usage_mass: Tensor | None

    def _init_usage(self, on: bool) -> None:
        self.register_buffer("usage_mass", None, persistent=False)
        self.track_usage = on
        self._usage_tokens, self._usage_sums = 0, None  # sums over tokens of (distinct share, effective)

    @property
    def track_usage(self) -> bool:
        return self._track_usage

    @track_usage.setter
    def track_usage(self, on: bool) -> None:
        self._track_usage = bool(on)

    def _accumulate_usage(self, ids_THK: Tensor, gates_THK: Tensor) -> None:
        """Add each gate to the mass of the slot it selected, and each token's distinct share and
        effective slot count to their sums; ids and gates (tokens, heads, topk)."""
        if self.usage_mass is None or self.usage_mass.device != ids_THK.device:
            self.usage_mass = torch.zeros(self.usage_slots, dtype=torch.float64, device=ids_THK.device)
            self._usage_tokens, self._usage_sums = 0, torch.zeros(2, dtype=torch.float64, device=ids_THK.device)
        elif self._usage_sums.device != ids_THK.device:  # the module (and its buffer) moved
            self._usage_sums = self._usage_sums.to(ids_THK.device)
        if ids_THK.numel() == 0:
            return
        with torch.no_grad():
            g_TM = gates_THK.detach().reshape(ids_THK.shape[0], -1).double()
            self.usage_mass.index_add_(0, ids_THK.reshape(-1), g_TM.reshape(-1))
            ids_TM, order_TM = ids_THK.reshape(g_TM.shape).sort(dim=-1)
            new_TM = torch.ones_like(ids_TM, dtype=torch.bool)
            new_TM[:, 1:] = ids_TM[:, 1:] != ids_TM[:, :-1]  # first of each run of equal ids
            # gates of a slot two heads both picked are its one gate: merge them before the entropy
            slot_TM = new_TM.long().cumsum(dim=-1) - 1
            mass_TM = torch.zeros_like(g_TM).scatter_add_(1, slot_TM, g_TM.gather(1, order_TM))
            p_TM = mass_TM / mass_TM.sum(dim=-1, keepdim=True)
            entropy_T = -torch.where(p_TM > 0, p_TM * torch.log(p_TM.clamp_min(1e-300)), torch.zeros_like(p_TM)).sum(-1)
            self._usage_sums += torch.stack([new_TM.sum(dim=-1).double().sum() / ids_TM.shape[1],
                                             entropy_T.exp().sum()])
            self._usage_tokens += ids_TM.shape[0]

    def reset_usage(self) -> None:
        """Zero the accumulated gate mass and the per-token sums."""
        if self.usage_mass is not None:
            self.usage_mass.zero_()
            self._usage_sums.zero_()
        self._usage_tokens = 0

    def usage(self) -> dict[str, float]:
        """Usage, unevenness, distinct and effective over the tokens seen since the last reset (see the
        module docstring)."""
        if self.usage_mass is None or (not self.track_usage and float(self.usage_mass.sum()) == 0.0):
            raise RuntimeError(f"no usage recorded: set track_usage=True on the {type(self).__name__} layer "
                               "and run it")
        if float(self.usage_mass.sum()) == 0.0:
            raise RuntimeError(f"no usage recorded yet: this {type(self).__name__} layer has seen no tokens since "
                               "tracking began (or since reset_usage()); run it on a non-empty batch")
        distinct, effective = (self._usage_sums / self._usage_tokens).tolist()
        return usage_metrics(self.usage_mass) | {"distinct": distinct, "effective": effective}
