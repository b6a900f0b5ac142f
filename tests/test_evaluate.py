"""Perplexity and bits per byte against hand computations; usage tracking; a run on a text file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peerlm.config import apply_overrides, get_preset
from peerlm.evaluate import evaluate_run, evaluate_tokens, format_table, memory_usage, to_json, tracking_usage
from peerlm.model import build_model


def _model(preset: str = "tiny-peer", **over):
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset(preset), [f"{k}={v}" for k, v in over.items()])
    return build_model(cfg).eval()


def test_uniform_model_gives_log_vocab_nats_per_token():
    model = _model("tiny")
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: every logit is 0, the distribution uniform
    tokens = np.arange(1, 101) % 250 + 1  # no EOT among the targets
    res = evaluate_tokens(model, tokens, batch_size=3, num_bytes=300, eot_id=0)
    V = model.cfg.vocab_size
    assert res["tokens"] == 100
    assert res["nats"] == pytest.approx(100 * math.log(V), rel=1e-6)
    assert res["perplexity"] == pytest.approx(V, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(100 * math.log(V) / (300 * math.log(2)), rel=1e-6)


def test_bits_per_byte_against_a_hand_computation():
    model = _model("tiny-peer")
    T = model.cfg.context_length
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, model.cfg.vocab_size, size=3 * T + 7)
    tokens[[5, 40, 70]] = 0  # document separators: context, never targets
    num_bytes = 1234
    res = evaluate_tokens(model, tokens, batch_size=2, num_bytes=num_bytes, eot_id=0)

    stream = [0] + tokens.tolist()
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, T):  # windows [start, start + T) predict the next token
            window = stream[start : start + T + 1]
            logits, _ = model(torch.tensor([window[:-1]]))
            logp = F.log_softmax(logits[0].double(), dim=-1)
            for t, target in enumerate(window[1:]):
                if target != 0:
                    nats -= float(logp[t, target])
                    count += 1
    assert res["tokens"] == count == len(tokens) - 3
    assert res["nats"] == pytest.approx(nats, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nats / (num_bytes * math.log(2)), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_batching_does_not_change_the_result():
    model = _model("tiny-peer")
    tokens = np.random.default_rng(1).integers(1, 250, size=200)
    a = evaluate_tokens(model, tokens, batch_size=1, num_bytes=500)
    b = evaluate_tokens(model, tokens, batch_size=16, num_bytes=500)
    assert a["tokens"] == b["tokens"] and a["nats"] == pytest.approx(b["nats"], rel=1e-5)


def test_out_of_vocabulary_ids_are_a_clear_error():
    model = _model("tiny")
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate_tokens(model, [1, 2, 10_000], num_bytes=3)


def test_usage_tracking_is_scoped():
    model = _model("tiny-peer")
    layer = model.blocks[0].ffn
    assert not layer.track_usage
    with tracking_usage(model):
        evaluate_tokens(model, np.arange(1, 60), num_bytes=60)
        usage = memory_usage(model)
    assert set(usage) == {"blocks.0.ffn"} and 0 < usage["blocks.0.ffn"]["usage"] <= 1
    assert usage["blocks.0.ffn"]["unevenness"] >= 0
    assert not layer.track_usage and float(layer.usage_mass.sum()) == 0
    assert memory_usage(model) == {}


def test_evaluate_run_on_sets_and_text(tmp_path):
    from test_train import make_run, write_text

    from peerlm.data import prepare
    from peerlm.train import train

    text = write_text(tmp_path / "t.txt")
    held = write_text(tmp_path / "held.txt", paragraphs=10, seed=5)
    prepare([text], tmp_path / "d", vocab_size=300, val_fraction=0.1, eval_sets={"held": held},
            progress=False)
    train(make_run(tmp_path / "d", max_steps=3), tmp_path / "r", progress=False, log=lambda s: None)
    res = evaluate_run(tmp_path / "r", tmp_path / "d", texts=[held])
    assert list(res) == ["val", "held", "held.txt"]
    # the eval set and the same file encoded afresh: the same text, so the same figures
    assert res["held"]["bytes"] == res["held.txt"]["bytes"] == len(held.read_text().strip().encode())
    assert res["held"]["nats"] == pytest.approx(res["held.txt"]["nats"], rel=1e-6)
    assert "usage" in res["val"] and "blocks.0.ffn" in res["val"]["usage"]
    table = format_table(res)
    assert "held.txt" in table and "bits/byte" in table
    assert '"val"' in to_json(res) and '"perplexity"' in to_json({"x": res["val"]})


def test_head_of_a_set_cuts_at_a_document_end_and_counts_its_bytes(tmp_path):
    from test_train import write_text

    from peerlm.data import TokenDataset, prepare
    from peerlm.evaluate import head_of

    prepare([write_text(tmp_path / "t.txt", paragraphs=200)], tmp_path / "d", vocab_size=300,
            val_fraction=0.3, segment_chars=256, split_by="segment", progress=False)  # many pieces, many separators
    ds = TokenDataset(tmp_path / "d")
    tok, ids = ds.tokenizer(), ds.tokens("val")
    whole, whole_bytes = head_of(ids, len(ids) + 10, ds.eot_id, tok)
    assert len(whole) == len(ids) and whole_bytes == ds.num_bytes("val")  # decoding recovers the byte count
    head, head_bytes = head_of(ids, len(ids) // 2, ds.eot_id, tok)
    assert len(ids) // 4 <= len(head) <= len(ids) // 2 and head[-1] == ds.eot_id
    assert head_bytes == len(tok.decode(head.tolist()).encode()) and 0 < head_bytes < whole_bytes
    cut, cut_bytes = head_of(ids, 7, ds.eot_id, tok)  # no separator in reach: a plain cut
    assert len(cut) == 7 and cut_bytes > 0
