"""The synthetic fact set: deterministic, held-out text never trained on, the base run's tokenizer, and
exact match equal to greedy decoding."""

from __future__ import annotations

import json

from peerlm.cli import main
from peerlm.continual.facts import ATTRIBUTES, exact_match, load_tests, make_facts, make_people
from peerlm.data import TokenDataset
from peerlm.data.dataset import load_tokenizer
from peerlm.generate import generate
from peerlm.rundir import load_run


def test_facts_are_deterministic_and_people_distinct():
    a, b = make_facts(200, 3, seed=0), make_facts(200, 3, seed=0)
    assert a.train == b.train and a.tests == b.tests and a.heldout == b.heldout
    assert make_facts(200, 3, seed=1).train != a.train
    assert len({p.name for p in make_people(2000)}) == 2000


def test_held_out_templates_and_questions_are_never_in_training():
    facts = make_facts(100, 4)
    train = "\n".join(facts.train)
    completions = [t for t in facts.tests if t["kind"] == "completion"]
    questions = [t for t in facts.tests if t["kind"] == "question"]
    assert len(completions) == 100 * len(ATTRIBUTES) and len(questions) == 50 * len(ATTRIBUTES)
    for t in completions:
        assert t["prompt"] not in train  # the held-out template's wording with this person never appears
        assert f"{t['prompt']} {t['answer']}" not in train
    for t in questions:
        assert t["prompt"] not in train  # asked of people whose questions were never answered in training
    trained_qa = [p.name for p in facts.people[:50]]
    assert all(f"Q: When was {n} born? A:" in train for n in trained_qa)
    for p in facts.people:  # every fact is in the training text, with each attribute's value
        assert p.name in train and p.birth_date in train


def test_fact_set_uses_the_base_tokenizer_and_exact_match_is_greedy_decoding(bases, facts_dir):
    ds = TokenDataset(facts_dir)
    assert ds.tokenizer_sha256 == TokenDataset(json.loads((bases["peer"] / "config.json").read_text())["data"]["dir"]
                                               ).tokenizer_sha256
    assert ds.num_tokens("train") > 0 and ds.num_tokens("heldout") > 0
    model, _ = load_run(bases["peer"])
    tok = load_tokenizer(bases["peer"] / "tokenizer.json")
    T = model.cfg.context_length
    tests = [t for t in load_tests(facts_dir) if len(tok.encode(t["prompt"]).ids) + 5 <= T][:12]
    # a test whose answer is the base model's own greedy continuation must count as a hit
    made = []
    for t in tests:
        ids = tok.encode(t["prompt"]).ids
        cont = generate(model, ids, 4, temperature=0.0, bos_id=ds.eot_id, stop_id=None)
        made.append({**t, "answer": tok.decode(cont).strip(), "ids": cont})
    ok = [m for m in made if tok.encode(" " + m["answer"]).ids == m["ids"]]  # answers that re-tokenise alike
    assert ok
    assert exact_match(model, tok, ok, bos_id=ds.eot_id)["exact_match"] == 1.0
    wrong = [{**m, "answer": m["answer"] + "zq"} for m in ok]
    assert exact_match(model, tok, wrong, bos_id=ds.eot_id)["exact_match"] == 0.0
    res = exact_match(model, tok, load_tests(facts_dir), bos_id=ds.eot_id)
    assert res["tests"] + res["too_long"] == len(load_tests(facts_dir)) and res["tests"] >= len(ok)


def test_data_prepare_with_a_run_tokenizer_is_accepted_by_that_run(bases, tmp_path, capsys):
    text = tmp_path / "new.txt"
    text.write_text("a new text about the cat and the dog, " * 200)
    assert main(["data", "prepare", "--text", str(text), "--out", str(tmp_path / "d"), "--tokenizer",
                 str(bases["peer"]), "--quiet", "--val-fraction", "0.2"]) == 0
    base_fp = TokenDataset(json.loads((bases["peer"] / "config.json").read_text())["data"]["dir"]).tokenizer_sha256
    assert TokenDataset(tmp_path / "d").tokenizer_sha256 == base_fp
    assert main(["eval", str(bases["peer"]), "--data", str(tmp_path / "d"), "--quiet"]) == 0
