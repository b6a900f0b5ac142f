"""peerlm: PEER (Parameter Efficient Expert Retrieval) layers, baselines and small language models."""

import os

# Expert tables and their gradients are large CPU tensors, allocated afresh every step (a gradient
# row block of 0.5-2 GiB at N = 1024^2): on 4 KiB pages each step faults every page in again, which
# took half of a PEER layer's step there. PyTorch's own switch puts allocations of 2 MiB or more on
# transparent huge pages; it is read once, at torch's first allocation, so it is set here, before
# torch is imported, unless the environment says otherwise (THP_MEM_ALLOC_ENABLE=0 turns it off).
# Where torch was imported first, set it in the environment to get the same effect.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from peerlm.peer import PEER, peer_cost  # noqa: E402
from peerlm.retrieval import ProductKeys, product_key_topk  # noqa: E402

__all__ = ["PEER", "ProductKeys", "peer_cost", "product_key_topk"]
__version__ = "0.1.0"
