"""Checkpoints: round trip, keep-K, atomicity under a failure mid-write, clear errors on bad files."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import peerlm.checkpoint.core as core
import peerlm.checkpoint.local as local
from peerlm.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    capture_rng,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load,
    load_weights,
    restore_rng,
    save,
)
from peerlm.config import apply_overrides, get_preset, to_dict
from peerlm.model import build_model
from peerlm.optim import build_optimizer


def _trained(preset: str = "tiny-peer", sparse: bool = False, steps: int = 2):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    if sparse:
        model.blocks[0].ffn.sparse_grad = True
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), sparse_experts=sparse)
    for s in range(steps):
        x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s))
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return cfg, model, opt


def _config(cfg) -> dict:
    return {"model": to_dict(cfg), "train": {"lr": 1e-2}}


@pytest.mark.parametrize("sparse", [False, True])
def test_round_trip_weights_optimizer_rng_and_state(tmp_path, sparse):
    cfg, model, opt = _trained(sparse=sparse)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    path = save(tmp_path, 2, model, _config(cfg), opt, {"metrics": [1.5, 2.5], "pos": 2})
    expected_draws = (torch.rand(3), np.random.rand(), random.random())
    assert path.name == "step_00000002" and latest_checkpoint(tmp_path) == path

    cfg2, model2, opt2 = _trained(sparse=sparse, steps=1)  # different weights and state
    state = load(path, model2, opt2, expected_model=to_dict(cfg))
    assert state["step"] == 2 and state["train"] == {"metrics": [1.5, 2.5], "pos": 2}
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(model.blocks[0].ffn.norm.running_mean, model2.blocks[0].ffn.norm.running_mean)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    for o1, o2 in zip(sd1["optimizers"], sd2["optimizers"]):
        assert o1["param_groups"] == o2["param_groups"]
        assert o1["state"].keys() == o2["state"].keys()
        for k in o1["state"]:
            for name, v in o1["state"][k].items():
                assert torch.equal(v, o2["state"][k][name]), (k, name)
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.random.rand() == expected_draws[1] and random.random() == expected_draws[2]


def test_rng_capture_restore():
    state = capture_rng()
    a = (torch.randn(4), np.random.randn(2), random.random())
    restore_rng(state)
    b = (torch.randn(4), np.random.randn(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_keeps_last_k_and_latest(tmp_path):
    cfg, model, opt = _trained()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, _config(cfg), opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert find_checkpoint(tmp_path) == tmp_path / "step_00000004"
    # saving the same step again replaces it cleanly
    save(tmp_path, 4, model, _config(cfg), opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("where", ["state_file", "dir_rename", "pointer"])
def test_failure_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, where):
    cfg, model, opt = _trained()
    first = save(tmp_path, 1, model, _config(cfg), opt, {"n": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_replace, real_save = os.replace, local.save_file

    def failing_save(tensors, path):
        real_save(tensors, path)  # the temp file is written ...
        if path.endswith("state.safetensors"):
            raise KeyboardInterrupt("killed")  # ... then the process dies

    def failing_replace(src, dst):
        name = os.path.basename(str(dst))
        if (where == "dir_rename" and name.startswith("step_")) or (where == "pointer" and name == "latest"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    if where == "state_file":
        monkeypatch.setattr(local, "save_file", failing_save)
    else:
        monkeypatch.setattr(core.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, _config(cfg), opt, {"n": 2})
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    fresh = build_model(cfg)
    state = load(find_checkpoint(tmp_path), fresh, expected_model=to_dict(cfg))
    assert state["train"] == {"n": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the next save succeeds and cleans up whatever the failed one left
    save(tmp_path, 3, model, _config(cfg), opt)
    assert not list(tmp_path.glob(".step_*.tmp"))
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_truncated_and_corrupt_files_give_checkpoint_error(tmp_path):
    cfg, model, opt = _trained()
    path = save(tmp_path, 1, model, _config(cfg), opt)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_weights(path, build_model(cfg))
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(path, build_model(cfg))
    weights.write_bytes(data)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        load_weights(path, build_model(cfg))
    # without the manifest check, a damaged header is still caught by the reader
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(path, build_model(cfg), verify=False)


def test_different_model_gives_one_line_error(tmp_path):
    cfg, model, opt = _trained()
    path = save(tmp_path, 1, model, _config(cfg), opt)
    other = apply_overrides(cfg, ["dim=64"])
    with pytest.raises(CheckpointError, match=r"different model.*dim 32 vs 64") as e:
        load_weights(path, build_model(other), expected_model=to_dict(other))
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not fit"):  # no config given: shapes are checked
        load_weights(path, build_model(other))
    dense = get_preset("tiny")
    with pytest.raises(CheckpointError, match="missing|unexpected"):
        load_weights(path, build_model(dense))


def test_missing_and_bad_pointers(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path)
    cfg, model, opt = _trained()
    save(tmp_path, 1, model, _config(cfg), opt)
    (tmp_path / "latest").write_text("garbage\n")
    with pytest.raises(CheckpointError, match="corrupt"):
        latest_checkpoint(tmp_path)
    (tmp_path / "latest").unlink()  # no pointer: the newest complete checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    (tmp_path / "latest").write_text("step_00000009\n")  # a pointer to a vanished checkpoint
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_distributed_checkpoint_round_trip_and_atomic_failure_in_one_process(tmp_path, monkeypatch):
    from peerlm.checkpoint import distributed as dcp
    from peerlm.checkpoint import is_distributed, verify_checkpoint

    cfg, model, opt = _trained(sparse=True)
    first = dcp.save(tmp_path, 2, model, _config(cfg), opt, {"pos": 2})
    assert is_distributed(first) and latest_checkpoint(tmp_path) == first
    verify_checkpoint(first)
    _, model2, opt2 = _trained(sparse=True, steps=1)
    state = load(first, model2, opt2, expected_model=to_dict(cfg))
    assert state["step"] == 2 and state["train"] == {"pos": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    for o, o2 in zip(opt.optimizers, opt2.optimizers):
        for p, p2 in zip([p for g in o.param_groups for p in g["params"]],
                         [p for g in o2.param_groups for p in g["params"]]):
            for key, v in o.state[p].items():
                assert torch.equal(v, o2.state[p2][key]), key
    load_weights(first, build_model(cfg), expected_model=to_dict(cfg))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "publish", fail)  # the shards are written, the manifest is not
    with pytest.raises(CheckpointWriteError, match="No space left.*as it was"):
        dcp.save(tmp_path, 4, model, _config(cfg), opt, {"pos": 4})
    assert latest_checkpoint(tmp_path) == first and list_checkpoints(tmp_path) == [first]
    assert not list(tmp_path.glob(".*.tmp"))


def test_save_picks_the_format_from_the_model(tmp_path):
    """A plain model: the one-process format; a rank other than 0 of a data-parallel run writes nothing;
    a model with sharded tables: the distributed format (also without an optimizer), which loads back."""
    from peerlm.checkpoint import is_distributed
    from peerlm.parallel import shard_experts

    cfg, model, opt = _trained()
    assert save(tmp_path / "none", 1, model, _config(cfg), opt, main=False) is None
    assert not (tmp_path / "none").exists()
    plain = save(tmp_path / "plain", 1, model, _config(cfg), opt)
    assert not is_distributed(plain) and (plain / "model.safetensors").is_file()
    sharded = shard_experts(build_model(cfg))
    sharded.load_state_dict(model.state_dict())
    for main in (True, False):  # every rank writes its part of a distributed checkpoint
        out = save(tmp_path / f"sharded{main}", 1, sharded, _config(cfg), main=main)
        assert out is not None and is_distributed(out)
    fresh = build_model(cfg)
    load_weights(out, fresh, expected_model=to_dict(cfg))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    other = build_model(cfg)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load(out, other, build_optimizer(other, 1e-2, 0.1, (0.9, 0.95)))
