"""``shard_experts`` on a whole PEER LM: init, loss and every gradient on 2 ranks equal one process; a few
DDP + AdamW steps agree; distributed checkpoints of the shards reshard between 2 ranks and 1 process.

Each rank builds the unsharded reference itself (same seed) and compares; the tests run 2 gloo
processes through ``peerlm.parallel.launch.spawn``.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.nn.parallel import DistributedDataParallel as DDP

from peerlm.config import ModelConfig, get_preset
from peerlm.ffn import PKM
from peerlm.model import Transformer, build_model
from peerlm.optim import build_optimizer
from peerlm.parallel import shard_experts, sharded_parameter_names
from peerlm.parallel.launch import spawn
from peerlm.peer import PEER


def _config(kind: str = "peer", **options) -> ModelConfig:
    cfg = get_preset(f"tiny-{kind}")
    if options:
        cfg.ffn = type(cfg.ffn)(**{**vars(cfg.ffn), **options})
    return cfg


def _sharded_model(cfg: ModelConfig, seed: int, group=None) -> Transformer:
    """build_model's way (meta, to_empty, init_weights once) with the tables sharded before materialising."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shard_experts(model, group)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _reference(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg)


def _batch(cfg: ModelConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _columns(model: Transformer) -> dict[str, slice]:
    return {name: m.shard.columns for name, m in model.named_modules()
            if type(m) in (PEER, PKM) and m.shard is not None}


def _param_gaps(model: Transformer, ref: Transformer, grads: bool) -> dict[str, float]:
    cols = _columns(model)
    full = dict(ref.named_parameters())
    gaps = {}
    for name, p in model.named_parameters():
        a, b = (p.grad, full[name].grad) if grads else (p, full[name])
        a = a.to_dense() if a.is_sparse else a
        b = b.to_dense() if b.is_sparse else b
        layer = name.rsplit(".", 1)[0]
        if layer in cols:
            b = b[:, cols[layer]]
        gaps[name] = float((a - b).detach().abs().max())
    return gaps


def test_sharding_on_one_process_keeps_the_model():
    cfg = _config()
    ref, model = _reference(cfg, 0), _sharded_model(cfg, 0)
    assert max(_param_gaps(model, ref, grads=False).values()) == 0
    assert sharded_parameter_names(model) == ["blocks.0.ffn.w_down", "blocks.0.ffn.w_up"]
    idx, tgt = _batch(cfg, 2, 1)
    _, loss_ref = ref(idx, tgt)
    _, loss = model(idx, tgt)
    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), abs=1e-6)


def _same_batch_worker(rank: int, ranks: int) -> list[dict]:
    out = []
    cases = ({}, {"sparse_grad": True, "activation": "relu"}, {"kind": "pkm"}, {"kind": "pkm", "sparse_grad": True})
    for peer in cases:
        cfg = _config(**peer)
        ref, model = _reference(cfg, 0), _sharded_model(cfg, 0)
        init = _param_gaps(model, ref, grads=False)
        idx, tgt = _batch(cfg, 4, 1)  # every rank the same batch
        _, loss_ref = ref(idx, tgt)
        loss_ref.backward()
        _, loss = model(idx, tgt)
        loss.backward()
        ffn = model.blocks[0].ffn
        table = ffn.values if peer.get("kind") == "pkm" else ffn.w_down
        out.append({"peer": peer, "init": max(init.values()), "loss": abs(float(loss - loss_ref)),
                    "grads": _param_gaps(model, ref, grads=True), "sparse": table.grad.is_sparse,
                    "storage": table.numel() * ranks == ffn.usage_slots * cfg.dim})
    return out


@pytest.mark.distributed
def test_two_ranks_with_the_same_batch_give_the_loss_and_gradients_of_one():
    for results in spawn(_same_batch_worker, 2):
        for r in results:
            assert r["init"] == 0, r["peer"]  # bit for bit: the streamed init is the one-process draw
            assert r["loss"] < 1e-6, r
            assert r["storage"] and r["sparse"] == bool(r["peer"].get("sparse_grad")), r
            assert len(r["grads"]) == len(list(_reference(_config(**r["peer"]), 0).parameters()))
            for name, gap in r["grads"].items():
                assert gap < 1e-5, (r["peer"], name, gap)


def _ddp_worker(rank: int, ranks: int, steps: int) -> list[dict]:
    """Each rank half of the global batch; DDP for the trunk, the shards left out of it."""
    experts_group = dist.new_group()  # the layer's collectives never interleave with DDP's
    out = []
    # no query norm: its statistics would be each rank's own batch's (reducing them across ranks is
    # the training loop's part, as SyncBatchNorm does)
    for peer in ({"query_norm": "none"}, {"query_norm": "none", "sparse_grad": True}):
        cfg = _config(**peer)
        ref, model = _reference(cfg, 0), _sharded_model(cfg, 0, experts_group)
        DDP._set_params_and_buffers_to_ignore_for_model(model, sharded_parameter_names(model))
        ddp = DDP(model)
        # sparse_grad: peerlm's row-sparse AdamW on each rank's (N, D/P) shard
        opt_ref, opt = (build_optimizer(m, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)) for m in (ref, model))
        losses, losses_ref, first_grads = [], [], None
        idx, tgt = _batch(cfg, 2 * ranks, 10)  # one batch again and again: the loss must fall
        mine = slice(2 * rank, 2 * rank + 2)
        for step in range(steps):
            _, loss_ref = ref(idx, tgt)
            loss_ref.backward()
            _, loss = ddp(idx[mine], tgt[mine])
            loss.backward()
            if step == 0:
                first_grads = _param_gaps(model, ref, grads=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / ranks)
            losses_ref.append(float(loss_ref.detach()))
            opt.step(), opt_ref.step()
            opt.zero_grad(), opt_ref.zero_grad()
        out.append({"peer": peer, "losses": losses, "losses_ref": losses_ref, "grads": first_grads,
                    "params": _param_gaps(model, ref, grads=False), "optimizers": len(opt.optimizers)})
    return out


@pytest.mark.distributed
def test_two_ranks_with_half_the_batch_each_train_like_one():
    for results in spawn(_ddp_worker, 2, args=(3,)):
        for r in results:
            assert r["optimizers"] == (2 if r["peer"].get("sparse_grad") else 1)
            for name, gap in r["grads"].items():
                assert gap < 1e-5, (r["peer"], name, gap)
            assert r["losses"] == pytest.approx(r["losses_ref"], abs=1e-5)
            assert r["losses"][-1] < r["losses"][0] - 0.1  # it trains
            for name, gap in r["params"].items():
                assert gap < 1e-4, (r["peer"], name, gap)


def _checkpoint_worker(rank: int, ranks: int, out_dir: str, in_dir: str) -> dict:
    cfg = _config()
    model = _sharded_model(cfg, 0)
    state = model.state_dict()
    table = state["blocks.0.ffn.w_up"]
    layout = (type(table).__name__, tuple(table.shape), tuple(table.to_local().shape))
    dcp.save(state, checkpoint_id=out_dir)
    other = _sharded_model(cfg, 7)  # different weights, overwritten by the one-process checkpoint
    state = other.state_dict()
    dcp.load(state, checkpoint_id=in_dir)
    other.load_state_dict(state)
    return {"layout": layout, "loaded": _param_gaps(other, _reference(cfg, 5), grads=False)}


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoints_reshard_between_two_ranks_and_one_process(tmp_path):
    cfg = _config()
    one, two = os.fspath(tmp_path / "one"), os.fspath(tmp_path / "two")
    dcp.save(_reference(cfg, 5).state_dict(), checkpoint_id=one, no_dist=True)
    for r in spawn(_checkpoint_worker, 2, args=(two, one)):
        N, D = cfg.ffn.num_experts, cfg.dim
        assert r["layout"] == ("DTensor", (N, D), (N, D // 2))
        assert max(r["loaded"].values()) == 0
    model = _reference(cfg, 9)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=two, no_dist=True)
    model.load_state_dict(state)
    assert max(_param_gaps(model, _reference(cfg, 0), grads=False).values()) == 0
