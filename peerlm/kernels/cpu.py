"""CPU kernels for the fused path: product-key top-k and the two embedding-bag sums of the expert
tables (``cpu.cpp``), and the tables' row-sparse optimizer updates (``cpu_optim.cpp``). PyTorch's own
ops for these pay a fixed cost per row (``torch.topk`` over 256 sub-key scores) or sort every
(token, slot) pair first (embedding-bag backward); on a CPU they were most of a PEER or PKM training
step.

The files are compiled on first use into one extension with ``torch.utils.cpp_extension`` (a C++
compiler and ``ninja``, a dependency, about a minute once; torch caches the build under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where it cannot be built, or with
``PEERLM_CPU_KERNELS=0``, every caller falls back to the PyTorch ops the kernels replace, with one line
on stderr saying why: the results are the same up to the order of floating-point sums (and, for
exactly tied scores, which tied id comes first), which the tests check.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["advise_huge_pages", "cpu_kernels", "cpu_model", "machine_tag", "usable"]

# and cpu_rows.h, which both include: ninja tracks it (the build runs in every new process)
_SOURCES = [Path(__file__).with_name(name) for name in ("cpu.cpp", "cpu_optim.cpp")]
_lock = threading.Lock()


def machine_tag() -> str:
    """A short hash of the CPU's model and instruction-set flags: the build uses ``-march=native``, so a
    cached build is only loaded by a machine that can run it (a shared cache serves each kind apart)."""
    import hashlib
    import platform

    text = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def cpu_model() -> str:
    """The CPU's model name as the OS reports it ("AMD EPYC", say), or the architecture where it does not."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _build() -> ModuleType | None:
    if os.environ.get("PEERLM_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"peerlm_cpu_kernels_{machine_tag()}", sources=[str(p) for p in _SOURCES],
                    # -fno-math-errno: std::sqrt need not set errno, so the AdamW row loop vectorizes
                    # (the same IEEE square roots and quotients, twice as fast); nothing else changes
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch ops still work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"peerlm: CPU kernels unavailable ({first}); using PyTorch's ops "
              "(slower; PEERLM_CPU_KERNELS=0 silences this)", file=sys.stderr)
        return None


def cpu_kernels() -> ModuleType | None:
    """The compiled module (``pk_topk``, ``bag_dot``, ``bag_scatter``, ``row_adamw_``), or None where
    unavailable."""
    with _lock:
        return _build()


def usable(*tensors: Tensor) -> ModuleType | None:
    """The kernels, when every tensor is a plain (not a subclass such as DTensor), strided float32 /
    float64 CPU tensor of one dtype, nothing is recorded for autograd and no tracing (``torch.compile``)
    is under way; else None."""
    if torch.compiler.is_compiling() or not tensors:
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (not _plain_cpu(t) or t.dtype not in (torch.float32, torch.float64) or t.dtype != tensors[0].dtype
                or (grad and t.requires_grad)):
            return None
    return cpu_kernels()


def _plain_cpu(t: Tensor) -> bool:
    """A strided CPU tensor or parameter whose memory is its own (not a subclass such as DTensor)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and t.device.type == "cpu"


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Ask Linux to back a large CPU tensor that is read at random rows, an expert table or its
    optimizer state, with 2 MiB transparent huge pages (``madvise(MADV_HUGEPAGE)`` over the whole
    2 MiB pages it spans). Every retrieved row is then a TLB hit far more often: at N = 1024^2 a table is
    512 MiB to 2 GiB, which 4 KiB pages cover only with a miss per row. Pages not yet touched get huge
    pages when first written (so call it before initialising), touched ones when the kernel collapses
    them. Only this tensor is affected, unlike PyTorch's ``THP_MEM_ALLOC_ENABLE``, which applies to every
    allocation of 2 MiB or more. Does nothing (returns False) off Linux, for tensors under 4 MiB, on
    other devices, or where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage``)."""
    if not _plain_cpu(t) or not t.is_contiguous() or t.numel() * t.element_size() < 2 * _HUGE_PAGE:
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    start = t.data_ptr()
    first = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    end = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    return end > first and madvise(first, end - first, _MADV_HUGEPAGE) == 0
