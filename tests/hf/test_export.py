"""`peerlm export RUN --hf OUT`: the files, the tokenizer as transformers reads it, logits equal to
peerlm's, eval and generate on the exported directory, refusals and a damaged weight file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

import peerlm.hf  # noqa: E402 (also registers the classes)
from peerlm.cli import main  # noqa: E402
from peerlm.data import load_tokenizer  # noqa: E402
from peerlm.rundir import load_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import write_text  # noqa: E402

FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "configuration.py", "modeling.py"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny text, its prepared directory, a 3-step tiny-peer run, and its export, made with the CLI."""
    root = tmp_path_factory.mktemp("export")
    f = write_text(root / "f.txt", paragraphs=40)
    assert main(["data", "prepare", "--text", str(f), "--out", str(root / "d"), "--vocab-size", "300",
                 "--val-fraction", "0.1", "--quiet"]) == 0
    assert main(["train", "--preset", "tiny-peer", "--data", str(root / "d"), "--out", str(root / "r"),
                 "--max-steps", "3", "--quiet", "--set", "train.device=cpu"]) == 0
    assert main(["export", str(root / "r"), "--hf", str(root / "hf")]) == 0
    return root


def test_the_directory_and_its_config(exported):
    out = exported / "hf"
    assert {p.name for p in out.iterdir()} == FILES
    config = json.loads((out / "config.json").read_text())
    run = json.loads((exported / "r" / "config.json").read_text())
    assert config["model_type"] == "peerlm" and config["peerlm"] == run["model"]
    assert config["peerlm_run"]["data"]["tokenizer_sha256"] == run["data"]["tokenizer_sha256"]
    assert config["peerlm_run"]["checkpoint_step"] == 3
    assert (out / "tokenizer.json").read_bytes() == (exported / "r" / "tokenizer.json").read_bytes()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == generation["pad_token_id"] == 0
    assert not list(exported.glob(".hf.*"))  # no temporary directory left


def test_auto_tokenizer_encodes_as_peerlm(exported):
    ours = load_tokenizer(exported / "r" / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(exported / "hf")
    assert isinstance(theirs, PreTrainedTokenizerFast)  # a fast tokenizer (transformers 5: TokenizersBackend)
    assert theirs.eos_token == theirs.bos_token == theirs.pad_token == "<|endoftext|>"
    assert theirs.eos_token_id == 0
    texts = [(exported / "f.txt").read_text()[:3000], "  two  spaces\tand a tab\n\nnew lines  ",
             "naïve café, 東京 and emoji 🙂", "a literal <|endoftext|> in text is text", ""]
    for text in texts:
        want = ours.encode(text, add_special_tokens=False).ids
        assert theirs(text)["input_ids"] == want
        assert theirs.encode(text) == want
        assert theirs.decode(want) == ours.decode(want)
    assert 0 not in theirs.encode(texts[3])


def test_exported_logits_equal_peerlms(exported):
    model, _ = load_run(exported / "r")
    hf = AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    x = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.context_length))
    torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-5, rtol=0)
    assert hf.dtype == torch.float32


def test_eval_and_generate_read_the_exported_directory(exported, capsys):
    f = str(exported / "f.txt")
    results = {}
    for name in ("r", "hf"):
        capsys.readouterr()
        assert main(["eval", str(exported / name), "--text", f, "--json", "--quiet"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["hf"] == results["r"]
    assert main(["eval", str(exported / "hf"), "--json", "--quiet"]) == 0  # the run's own held-out split
    assert "perplexity" in json.loads(capsys.readouterr().out)
    outputs = {}
    for name in ("r", "hf"):
        assert main(["generate", str(exported / name), "--prompt", "the", "--max-new-tokens", "12",
                     "--temperature", "0", "--quiet"]) == 0
        captured = capsys.readouterr()
        outputs[name] = captured.out
    assert outputs["hf"] == outputs["r"] and outputs["hf"].startswith("the")
    assert "exported model of checkpoint step 3" in captured.err


def test_transformers_generate_equals_peerlm_generate(exported, capsys):
    """Greedy decoding of the exported model by transformers gives the text `peerlm generate` prints."""
    tok = AutoTokenizer.from_pretrained(exported / "hf")
    hf = AutoModelForCausalLM.from_pretrained(exported / "hf").eval()
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("the")]])  # peerlm starts a document with <|endoftext|>
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    new = [t for t in new.tolist() if t != tok.eos_token_id]  # stops at <|endoftext|>, as peerlm does
    capsys.readouterr()
    assert main(["generate", str(exported / "hf"), "--prompt", "the", "--max-new-tokens", "12", "--temperature", "0",
                 "--quiet"]) == 0
    assert capsys.readouterr().out == "the" + tok.decode(new) + "\n"


def _error(capsys, argv: list[str], match: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peerlm: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def test_refusals_and_a_damaged_weight_file(exported, capsys, tmp_path):
    _error(capsys, ["export", str(exported / "r"), "--hf", str(exported / "hf")],
           "exists and is not an empty directory; remove it or export to another directory")
    _error(capsys, ["export", str(tmp_path / "nothing"), "--hf", str(tmp_path / "out")], "nothing")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    assert main(["export", str(exported / "r"), "--hf", str(bad)]) == 0
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a tensor: only the recorded sha256 can tell
    weights.write_bytes(bytes(data))
    line = _error(capsys, ["eval", str(bad), "--json", "--quiet"], "model.safetensors is damaged (its sha256")
    assert f"peerlm export {exported / 'r'} --hf {bad}" in line
    weights.write_bytes(b"{not a safetensors file")
    config = json.loads((bad / "config.json").read_text())
    del config["peerlm_run"]["weights_sha256"]  # no record to compare with: the loader itself must refuse it
    (bad / "config.json").write_text(json.dumps(config))
    _error(capsys, ["generate", str(bad), "--prompt", "x", "--quiet"], "model.safetensors is damaged")
    weights.unlink()
    _error(capsys, ["eval", str(bad), "--quiet"], "model.safetensors is damaged (missing)")
    with_memory = peerlm.hf.add_memory(AutoModelForCausalLM.from_pretrained(exported / "hf"), "pkm", layers=[0],
                                       num_keys=256, heads=2, topk=4, dim_key=16)
    with_memory.save_pretrained(tmp_path / "memory")
    capsys.readouterr()
    _error(capsys, ["eval", str(tmp_path / "memory"), "--quiet"], "load it with peerlm.hf.from_pretrained")
