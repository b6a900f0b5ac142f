"""Config dataclasses: validation, JSON round trip, overrides, presets."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import peerlm.config
from peerlm.config import (
    DenseConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    apply_overrides,
    from_dict,
    from_json,
    get_preset,
    list_presets,
    to_dict,
    to_json,
)


@pytest.mark.parametrize("name", list_presets())
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    text = json.dumps(to_dict(cfg))
    assert from_dict(ModelConfig, json.loads(text)) == cfg
    assert from_json(ModelConfig, to_json(cfg)) == cfg


def test_round_trip_keeps_types_and_kind():
    cfg = dataclasses.replace(get_preset("tiny-pkm"), placement=[0, 1], mlp=DenseConfig(48, "swiglu"))
    d = json.loads(to_json(cfg))
    assert d["ffn"]["kind"] == "pkm" and d["placement"] == [0, 1] and d["mlp"]["hidden"] == 48
    back = from_dict(ModelConfig, d)
    assert isinstance(back.ffn, PKMConfig) and back == cfg
    assert isinstance(from_dict(ModelConfig, {"rope_theta": 500}).rope_theta, float)


def test_get_preset_unknown_lists_names():
    with pytest.raises(ValueError, match="known presets: .*tiny.*peer-small"):
        get_preset("peer-smal")


def test_presets_returns_fresh_objects():
    a = get_preset("peer-small")
    a.ffn.topk = 1
    assert get_preset("peer-small").ffn.topk == 16


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "paper"])
def test_paired_presets_differ_only_in_ffn(size):
    names = {"tiny": ["tiny", "tiny-peer", "tiny-moe", "tiny-pkm"]}.get(
        size, [f"{k}-{size}" for k in ("dense", "peer", "moe", "pkm")] if size != "paper"
        else ["paper-dense", "paper-peer", "paper-moe", "paper-pkm"])
    trunks = []
    for name in names:
        d = to_dict(get_preset(name))
        d.pop("ffn")
        trunks.append(d)
    assert all(t == trunks[0] for t in trunks)
    kinds = [get_preset(n).ffn for n in names]
    assert kinds[0] is None and [type(k) for k in kinds[1:]] == [PEERConfig, MoEConfig, PKMConfig]


def test_paper_presets_match_the_paper():
    peer, moe, pkm = (get_preset(f"paper-{k}") for k in ("peer", "moe", "pkm"))
    assert peer.n_layers == 12 and peer.sparse_blocks() == [5]  # block 6 of 12, 1-based
    assert (peer.ffn.num_experts, peer.ffn.heads, peer.ffn.topk, peer.ffn.query_norm) == (1024**2, 8, 16,
                                                                                           "batchnorm")
    assert (pkm.ffn.num_keys, pkm.ffn.heads, pkm.ffn.topk) == (1024**2, 8, 32)
    assert pkm.ffn.query_norm == "batchnorm"
    assert (moe.ffn.num_experts, moe.ffn.routing) == (128, "expert")


@pytest.mark.parametrize("family", ["tiny", "small", "medium", "paper"])
def test_pkm_and_peer_share_their_retrieval_settings(family):
    """PKM and PEER presets differ in what a slot holds, not in how slots are found."""
    name = (lambda k: f"tiny-{k}") if family == "tiny" else (
        (lambda k: f"paper-{k}") if family == "paper" else (lambda k: f"{k}-{family}"))
    peer, pkm = get_preset(name("peer")).ffn, get_preset(name("pkm")).ffn
    assert (peer.dim_key, peer.shared_keys, peer.query_norm, peer.num_experts) == (
        pkm.dim_key, pkm.shared_keys, pkm.query_norm, pkm.num_keys)


def test_sparse_blocks():
    assert ModelConfig(n_layers=4, ffn=MoEConfig()).sparse_blocks() == [1]
    assert ModelConfig(n_layers=5, ffn=MoEConfig()).sparse_blocks() == [2]
    assert ModelConfig(n_layers=3, ffn=MoEConfig(), placement="all").sparse_blocks() == [0, 1, 2]
    assert ModelConfig(n_layers=4, ffn=MoEConfig(), placement=[3, 0]).sparse_blocks() == [0, 3]
    assert ModelConfig(n_layers=4, placement="all").sparse_blocks() == []  # dense model
    cfg = ModelConfig(n_layers=4, ffn=PKMConfig(num_keys=64, topk=4))
    kinds = [type(cfg.block_ffn(i)).__name__ for i in range(4)]
    assert kinds == ["DenseConfig", "PKMConfig", "DenseConfig", "DenseConfig"]


def test_dense_hidden_size():
    assert DenseConfig().hidden_size(256) == 1024
    assert DenseConfig(activation="swiglu").hidden_size(256) == 704  # 8/3 * 256 = 682.7 -> multiple of 64
    assert DenseConfig(hidden=100, activation="swiglu").hidden_size(256) == 100


INVALID = [
    (ModelConfig, {"dim": 100, "n_heads": 3}, "ModelConfig.dim .* divisible by n_heads"),
    (ModelConfig, {"dim": 12, "n_heads": 4}, "ModelConfig.n_heads .* odd head size"),
    (ModelConfig, {"vocab_size": 0}, "ModelConfig.vocab_size must be >= 1"),
    (ModelConfig, {"context_length": 0}, "ModelConfig.context_length must be >= 1"),
    (ModelConfig, {"n_layers": 0}, "ModelConfig.n_layers must be >= 1"),
    (ModelConfig, {"rope_theta": 0.0}, "ModelConfig.rope_theta must be > 0"),
    (ModelConfig, {"attn_impl": "flash"}, "ModelConfig.attn_impl must be one of"),
    (ModelConfig, {"placement": "first"}, "ModelConfig.placement must be one of"),
    (ModelConfig, {"placement": [4]}, r"distinct block ids in \[0, 4\)"),
    (ModelConfig, {"placement": [1, 1]}, "distinct block ids"),
    (ModelConfig, {"placement": []}, "distinct block ids"),
    (ModelConfig, {"dim": "256"}, "ModelConfig.dim: expected int, got str"),
    (ModelConfig, {"tie_embeddings": 1}, "ModelConfig.tie_embeddings: expected bool"),
    (ModelConfig, {"n_layers": True}, "ModelConfig.n_layers: expected int, got bool"),
    (ModelConfig, {"mlp": {"hidden": 4}}, "ModelConfig.mlp: expected a DenseConfig"),
    (ModelConfig, {"ffn": "peer"}, "ModelConfig.ffn: expected"),
    (DenseConfig, {"activation": "relu"}, "DenseConfig.activation must be one of"),
    (DenseConfig, {"hidden": 0}, "DenseConfig.hidden must be >= 1 or None"),
    (PEERConfig, {"num_experts": 1000}, "PEERConfig.num_experts must be a perfect square.*961 or 1024"),
    (PEERConfig, {"num_experts": 64, "topk": 9}, r"PEERConfig.topk must be in \[1, sqrt\(num_experts\)=8\]"),
    (PEERConfig, {"topk": 0}, "PEERConfig.topk must be in"),
    (PEERConfig, {"heads": 0}, "PEERConfig.heads must be >= 1"),
    (PEERConfig, {"dim_key": 7}, "PEERConfig.dim_key must be even"),
    (PEERConfig, {"activation": "tanh"}, "PEERConfig.activation must be one of"),
    (PEERConfig, {"gate": "relu"}, "PEERConfig.gate must be one of"),
    (PEERConfig, {"query_norm": "layernorm"}, "PEERConfig.query_norm must be one of"),
    (PEERConfig, {"impl": "cuda"}, "PEERConfig.impl must be one of"),
    (PEERConfig, {"shared_keys": "yes"}, "PEERConfig.shared_keys: expected bool"),
    (MoEConfig, {"num_experts": 0}, "MoEConfig.num_experts must be >= 1"),
    (MoEConfig, {"num_experts": 4, "topk": 5}, r"MoEConfig.topk must be in \[1, num_experts=4\]"),
    (MoEConfig, {"routing": "hash"}, "MoEConfig.routing must be one of"),
    (MoEConfig, {"routing": "expert", "capacity_factor": None}, "MoEConfig.capacity_factor must be set"),
    (MoEConfig, {"capacity_factor": 0.0}, "MoEConfig.capacity_factor must be > 0"),
    (MoEConfig, {"aux_loss_coef": -1.0}, "MoEConfig.aux_loss_coef must be >= 0"),
    (MoEConfig, {"z_loss_coef": -1.0}, "MoEConfig.z_loss_coef must be >= 0"),
    (PKMConfig, {"num_keys": 10}, "PKMConfig.num_keys must be a perfect square"),
    (PKMConfig, {"num_keys": 16, "topk": 5}, r"PKMConfig.topk must be in \[1, sqrt\(num_keys\)=4\]"),
    (PKMConfig, {"heads": 0}, "PKMConfig.heads must be >= 1"),
    (PKMConfig, {"dim_key": 3}, "PKMConfig.dim_key must be even"),
    (PKMConfig, {"query_norm": "bn"}, "PKMConfig.query_norm must be one of"),
]


@pytest.mark.parametrize("cls,kwargs,match", INVALID, ids=[m.split(" ")[0] + str(k) for _, k, m in INVALID])
def test_validation_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    if not any(isinstance(v, (dict, str)) and k in ("mlp", "ffn") for k, v in kwargs.items()):
        # the same error comes back from JSON, where bad values are most likely to arise
        with pytest.raises(ValueError, match=match):
            from_dict(cls, kwargs)


FROM_DICT_ERRORS = [
    ({"dimm": 256}, r"ModelConfig: unknown key 'dimm' \(did you mean 'dim'\?\); known keys: vocab_size"),
    ({"ffn": {"kind": "peer", "topc": 4}}, r"ModelConfig.ffn: unknown key 'topc' \(did you mean 'topk'\?\)"),
    ({"ffn": {"num_experts": 64}}, r"ModelConfig.ffn: needs a 'kind' among \['moe', 'peer', 'pkm'\]"),
    ({"ffn": {"kind": "mlp"}}, "needs a 'kind' among"),
    ({"mlp": {"kind": "peer"}}, "'kind' is 'peer' but a DenseConfig has kind 'dense'"),
    ({"ffn": {"kind": "moe", "topk": "2"}}, "ModelConfig.ffn.topk: expected int, got str '2'"),
    ({"placement": [1.5]}, r"ModelConfig.placement: expected str \| list\[int\]"),
    ({"placement": None}, r"ModelConfig.placement: expected str \| list\[int\], got None"),
    ({"dim": 256.0}, "ModelConfig.dim: expected a whole number, got 256.0; write 256"),
    ({"mlp": None}, "ModelConfig.mlp: expected a DenseConfig"),
]


@pytest.mark.parametrize("data,match", FROM_DICT_ERRORS)
def test_from_dict_rejects_unknown_keys_and_wrong_types(data, match):
    with pytest.raises(ValueError, match=match):
        from_dict(ModelConfig, data)


def test_from_dict_rejects_non_dict():
    with pytest.raises(ValueError, match="expected a dict"):
        from_dict(ModelConfig, [1, 2])


def test_apply_overrides_parses_by_type():
    base = get_preset("peer-small")
    cfg = apply_overrides(base, [
        "dim=128", "n_heads=2", "rope_theta=5e5", "tie_embeddings=false", "mlp.activation=swiglu",
        "mlp.hidden=300", "ffn.num_experts=256**2", "ffn.topk=8", "ffn.query_norm=running", "placement=0,3",
    ])
    assert (cfg.dim, cfg.n_heads, cfg.rope_theta, cfg.tie_embeddings) == (128, 2, 5e5, False)
    assert cfg.mlp == DenseConfig(hidden=300, activation="swiglu")
    assert (cfg.ffn.num_experts, cfg.ffn.topk, cfg.ffn.query_norm) == (65536, 8, "running")
    assert cfg.placement == [0, 3]
    assert base == get_preset("peer-small")  # the input is not modified
    assert apply_overrides(base, ["placement=[2]"]).placement == [2]
    assert apply_overrides(base, ["placement=3"]).placement == [3]
    assert apply_overrides(base, ["placement=all"]).placement == "all"
    assert apply_overrides(base, ["mlp.hidden=none"]).mlp.hidden is None
    assert apply_overrides(base, ["ffn.num_experts=1_048_576"]).ffn.num_experts == 2**20


def test_apply_overrides_switches_ffn_kind():
    base = get_preset("peer-small")
    cfg = apply_overrides(base, ["ffn=moe", "ffn.num_experts=4", "ffn.routing=token",
                                 "ffn.capacity_factor=none"])
    assert cfg.ffn == MoEConfig(num_experts=4, routing="token", capacity_factor=None)
    assert apply_overrides(base, ["ffn=none"]).ffn is None
    # validated once at the end: num_keys=64 alone would be invalid with PKM's default topk 32
    pkm = apply_overrides(get_preset("dense-small"), ["ffn=pkm", "ffn.num_keys=64", "ffn.topk=4"])
    assert (pkm.ffn.num_keys, pkm.ffn.topk) == (64, 4)


OVERRIDE_ERRORS = [
    ("dim", "must look like path.to.field=value"),
    ("dim=abc", "override 'dim=abc': dim: cannot parse 'abc' as int"),
    ("dim=2.5", "cannot parse '2.5' as int"),
    ("tie_embeddings=maybe", "cannot parse 'maybe' as bool"),
    ("dimm=4", r"unknown key 'dimm' \(did you mean 'dim'\?\)"),
    ("ffn.topc=4", r"ffn: unknown key 'topc' \(did you mean 'topk'\?\)"),
    ("ffn.topk=1000", r"PEERConfig.topk must be in \[1, sqrt\(num_experts\)=128\]"),
    ("ffn.kind=moe", "set ffn=<kind>"),
    ("ffn=lstm", r"or one of \['moe', 'peer', 'pkm'\]"),
    ("placement=9", "distinct block ids"),
    ("mlp=swiglu", "mlp is a DenseConfig; set its fields"),
    ("dim.x=1", "dim is not a config section"),
    ("ffn..topk=1", "empty field name"),
]


@pytest.mark.parametrize("override,match", OVERRIDE_ERRORS)
def test_apply_overrides_errors(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("peer-small"), [override])


def test_apply_overrides_on_none_section():
    with pytest.raises(ValueError, match="ffn is None; set ffn=<kind> first"):
        apply_overrides(get_preset("dense-small"), ["ffn.topk=2"])


def test_apply_overrides_is_generic_over_nesting():
    @dataclasses.dataclass
    class Run:
        model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
        lr: float = 1e-3
        steps: int = 10
        name: str = "run"
        betas: tuple[float, float] = (0.9, 0.95)

    run = apply_overrides(Run(), ["model.dim=128", "lr=3e-4", "steps=100", "name=x=y", "model.ffn=peer",
                                  "betas=0.8,0.99"])
    assert (run.model.dim, run.lr, run.steps, run.name, run.betas) == (128, 3e-4, 100, "x=y", (0.8, 0.99))
    assert isinstance(run.model.ffn, PEERConfig)
    with pytest.raises(ValueError, match=r"overrides \['model.dim=3'\]: ModelConfig.dim \(3\) must be"):
        apply_overrides(Run(), ["model.dim=3"])
    with pytest.raises(ValueError, match="cannot parse '0.8' as tuple"):
        apply_overrides(Run(), ["betas=0.8"])


def test_config_imports_no_layer_module():
    """The layers' option lists live with the configs, so config.py loads without any layer module (or
    torch). peerlm's package __init__ imports the PEER layer, so a bare package stands in for it here."""
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('peerlm'); pkg.__path__ = [{os.path.dirname(peerlm.config.__file__)!r}]\n"
        "sys.modules['peerlm'] = pkg\n"
        "import peerlm.config\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('peerlm.', 'torch')))\n"
        "assert loaded == ['peerlm.config', 'peerlm.configio'], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_layers_take_their_option_lists_from_the_config():
    from peerlm import fused, norms

    assert norms.QUERY_NORMS is peerlm.config.QUERY_NORMS
    assert tuple(fused.ACTIVATIONS) == peerlm.config.PEER_ACTIVATIONS
