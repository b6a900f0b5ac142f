"""Optional GPU kernels. Nothing here imports Triton until a kernel runs, so peerlm works without it.

- ``peer_triton``: the PEER expert mixture in Triton (``PEER(impl="triton")``, what ``impl="auto"``
  picks on CUDA when Triton imports), forward and backward, with row-sparse table gradients.
- ``set_triton_reduction``: how its backward sums the table gradients, for every layer:
  ``"deterministic"`` (default; sort the (token, slot) pairs by expert id, reduce each run of equal
  ids in a fixed order, no atomics: bitwise reproducible) or ``"atomic"`` (fp32 atomic adds, no
  sort; the order of the adds, hence the rounding, changes from run to run).

Install Triton with the extra: ``pip install "peerlm[triton]"``.
"""

from __future__ import annotations

import functools
from typing import Any

TRITON_REDUCTIONS = ("deterministic", "atomic")
_reduction = "deterministic"


def set_triton_reduction(mode: str) -> str:
    """Choose the table-gradient reduction of ``impl="triton"``; returns the previous choice."""
    global _reduction
    if mode not in TRITON_REDUCTIONS:
        raise ValueError(f"triton reduction must be one of {TRITON_REDUCTIONS}, got {mode!r}")
    previous, _reduction = _reduction, mode
    return previous


def triton_reduction() -> str:
    """The table-gradient reduction ``impl="triton"`` uses now (see ``set_triton_reduction``)."""
    return _reduction


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (``impl="auto"`` picks the Triton path on CUDA only then)."""
    try:
        import triton  # noqa: F401
    except Exception:  # missing, or an install that fails to load: fall back to the fused path
        return False
    return True


def peer_experts_triton(*args: Any, **kwargs: Any):
    """``peerlm.kernels.peer_triton.peer_experts_triton``, imported on first use; see there."""
    try:
        from peerlm.kernels.peer_triton import peer_experts_triton as fn
    except ImportError as e:
        raise ImportError(f"impl='triton' needs Triton ({e}); install it with pip install 'peerlm[triton]' "
                          "or use impl='fused'") from e
    return fn(*args, **kwargs)
