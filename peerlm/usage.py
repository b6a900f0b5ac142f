"""Expert (or memory slot) usage, the paper's two metrics, shared by PEER and PKM.

usage: the fraction of slots with non-zero accumulated gate mass; unevenness: KL(z || uniform) =
log N + sum_i z_i log z_i, with z the accumulated gate mass per slot normalised to sum 1 (0 log 0 = 0).
Two more, per token and averaged over tokens: distinct, the share of distinct slots among the h*k a
token retrieves (1 when no two heads pick the same slot; heads share one pool, so duplicates are
possible), and effective, exp of the entropy of the token's h*k gates normalised to sum 1 (how many
slots its output really mixes: h*k for equal gates, 1 when one gate holds all the mass).
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
    checkpoints), filled while ``track_usage`` is on. Call ``_init_usage(on)`` in ``__init__``."""

    usage_slots: int
    usage_mass: Tensor | None

    def _init_usage(self, on: bool) -> None:
        self.register_buffer("usage_mass", None, persistent=False)
        self.track_usage = on
        self._usage_tokens, self._usage_distinct, self._usage_effective = 0, 0.0, 0.0

    @property
    def track_usage(self) -> bool:
        return self._track_usage

    @track_usage.setter
    def track_usage(self, on: bool) -> None:
        self._track_usage = bool(on)

    def _accumulate_usage(self, ids_THK: Tensor, gates_THK: Tensor) -> None:
        """Add each gate to the mass of the slot it selected, and count each token's distinct slots;
        ids and gates (tokens, heads, topk)."""
        if self.usage_mass is None or self.usage_mass.device != ids_THK.device:
            self.usage_mass = torch.zeros(self.usage_slots, dtype=torch.float64, device=ids_THK.device)
        with torch.no_grad():
            self.usage_mass.index_add_(0, ids_THK.reshape(-1), gates_THK.detach().reshape(-1).double())
            ids_TM = ids_THK.reshape(ids_THK.shape[0], -1).sort(dim=-1).values
            distinct_T = 1 + (ids_TM[:, 1:] != ids_TM[:, :-1]).sum(dim=-1)
            self._usage_tokens += ids_TM.shape[0]
            self._usage_distinct += float(distinct_T.double().sum()) / ids_TM.shape[1]
            g_TM = gates_THK.detach().reshape(ids_TM.shape).double()
            p_TM = g_TM / g_TM.sum(dim=-1, keepdim=True)
            entropy_T = -torch.where(p_TM > 0, p_TM * torch.log(p_TM.clamp_min(1e-300)), torch.zeros_like(p_TM)).sum(-1)
            self._usage_effective += float(entropy_T.exp().sum())

    def reset_usage(self) -> None:
        """Zero the accumulated gate mass."""
        if self.usage_mass is not None:
            self.usage_mass.zero_()
        self._usage_tokens, self._usage_distinct, self._usage_effective = 0, 0.0, 0.0

    def usage(self) -> dict[str, float]:
        """Usage and unevenness over the tokens seen since the last reset (see the module docstring)."""
        if self.usage_mass is None or float(self.usage_mass.sum()) == 0.0:
            raise RuntimeError(f"no usage recorded: set track_usage=True on the {type(self).__name__} layer "
                               "and run it")
        n = self._usage_tokens
        return usage_metrics(self.usage_mass) | {"distinct": self._usage_distinct / n,
                                                 "effective": self._usage_effective / n}
