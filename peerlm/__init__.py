"""peerlm: PEER (Parameter Efficient Expert Retrieval) layers, baselines and small language models."""

from peerlm.peer import PEER, peer_cost
from peerlm.retrieval import ProductKeys, product_key_topk

__all__ = ["PEER", "ProductKeys", "peer_cost", "product_key_topk"]
__version__ = "0.1.0"
