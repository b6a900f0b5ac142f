"""Run a function on P processes of this machine, each with a process group, and collect what they return.

For tests and benchmarks (training itself is launched with ``torchrun``). Rendezvous goes through a
file in a fresh temporary directory, so concurrent runs never compete for a port. ``gloo`` on CPU;
with ``nccl`` rank r uses ``cuda:r``. A rank that raises makes ``spawn`` raise (torch's
``ProcessRaisedException``, with the rank's traceback) after the other ranks are terminated, and a
collective left waiting for a dead rank gives up after ``timeout_s``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn"]


def _entry(rank: int, fn: Callable, ranks: int, backend: str, tmp: str, timeout_s: float, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    store = os.path.join(tmp, "rendezvous")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        torch.save(fn(rank, ranks, *args), os.path.join(tmp, f"result{rank}.pt"))
        # tear the group down together: a rank that closes its gloo connections while another still has
        # traffic on them could abort that rank ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, ranks: int, args: tuple = (), backend: str = "gloo", timeout_s: float = 60.0) -> list:
    """Call ``fn(rank, ranks, *args)`` in ``ranks`` fresh processes with an initialised default group.

    ``fn`` must be importable by name (a module-level function) and return what ``torch.save`` can
    write (tensors, numbers, containers of them); returns the values in rank order. Results go through
    files, not pipes, so that large ones cannot block a rank on its way out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_entry, args=(fn, ranks, backend, tmp, timeout_s, args), nprocs=ranks, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"result{r}.pt"), weights_only=False) for r in range(ranks)]
