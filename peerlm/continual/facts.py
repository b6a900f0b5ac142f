"""A synthetic fact set to learn: biographies of fictional people (the bioS setup of Allen-Zhu & Li,
"Physics of Language Models: Part 3.1", 2023), deterministic from a seed.

Each person has a unique full name (first, middle, last) and six attributes: birth date, birth city,
university, major, employer and the employer's city. Text comes from sentence templates per
attribute, split into two disjoint families:

- training templates: each person's biography is written ``paraphrases`` times, each time with a
  fresh draw of templates and a shuffled sentence order (the bioS "multi + permute" augmentation,
  which Allen-Zhu & Li found necessary for knowledge to be extractable);
- held-out templates, never in training: a biography per person with them (the ``heldout`` eval set,
  for perplexity) and one completion prompt per fact (the template's text up to the attribute).
- question prompts ("Q: Where was NAME born? A:"): the first half of the people have their
  questions answered in training ("Q: ... A: VALUE."), to teach the format; the tests ask the second
  half's questions only (bioS's QA split: extraction of knowledge seen only in biographies).

Learning is exact match: under greedy decoding the model continues a test prompt with exactly the
attribute's tokens. Greedy decoding reproduces the answer iff every answer token is the argmax given
the prompt and the answer's earlier tokens, so ``exact_match`` scores all prompts with one batched,
teacher-forced forward pass. Byte-level BPE splits at the space before the answer, so the answer's
tokens do not depend on the prompt.

``prepare_facts`` writes a prepared data directory with the base run's tokenizer (so the base run
accepts it): ``train.bin`` (the training biographies), no val split, ``eval/heldout.bin``, and
``facts.json`` (people and test prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from peerlm.data import DataError, prepare

__all__ = ["ATTRIBUTES", "Person", "make_people", "FactSet", "make_facts", "prepare_facts", "exact_match",
           "FACTS_FILE"]

FACTS_FILE = "facts.json"
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")

_FIRST = ("Alder", "Brisa", "Calder", "Dorela", "Emrys", "Fenna", "Galen", "Hesper", "Ilvo", "Jorun", "Kestrel",
          "Liora", "Marek", "Nerys", "Orrin", "Perrin", "Quilla", "Rosk", "Sabeth", "Tamsin", "Ulric", "Vesna",
          "Wendel", "Xanthe", "Yorick", "Zelda", "Anselm", "Brannoc", "Cerys", "Dagny")
_MIDDLE = ("Ash", "Bram", "Cove", "Dell", "Elm", "Fern", "Gale", "Heath", "Ives", "Jade", "Knox", "Lark",
           "Moss", "Nash", "Oak", "Pike", "Quinn", "Reed", "Sage", "Thorn")
_LAST = ("Abernathy", "Blackwood", "Corrigan", "Dunmore", "Everhart", "Fairweather", "Greystone", "Hollowell",
         "Ingleby", "Jessamine", "Kettering", "Lockridge", "Merriweather", "Northcott", "Oakenshaw", "Pemberton",
         "Quenby", "Ravensworth", "Stanmore", "Thistlewood", "Underhill", "Vantreight", "Whitlock", "Yardley",
         "Ashcombe", "Brightwater", "Coldridge", "Dunstable", "Eastlake", "Foxhollow")
_CITIES = ("Marlow Bay", "Port Edric", "Halvard", "Eastmere", "Corran Falls", "Westhaven", "Lindqvist",
           "Tarrow", "Bellmoor", "Oskarvik", "Sunderfield", "Greyhallow", "Amberly", "Kilnworth", "Redmarsh",
           "Dovecote", "Ironbridge", "Saltcombe", "Ravenmoor", "Highgate Vale")
_UNIVERSITIES = ("Northfield Institute", "the University of Halvard", "Eastmere College", "Bellmoor Polytechnic",
                 "the Tarrow Academy", "Corran University", "the Westhaven Institute of Science",
                 "Saltcombe College", "the University of Redmarsh", "Amberly Technical University",
                 "Kilnworth University", "the Oskarvik School of Arts")
_MAJORS = ("astronomy", "botany", "chemistry", "economics", "geology", "history", "linguistics", "mathematics",
           "medicine", "philosophy", "physics", "music", "architecture", "zoology", "law", "sculpture")
_EMPLOYERS = ("Harrowgate Mills", "the Lindqvist Shipping Company", "Brightwater Foundry", "Pemberton and Sons",
              "the Corran Observatory", "Ironbridge Printing House", "the Amberly Bank", "Greyhallow Railways",
              "Saltcombe Fisheries", "the Eastmere Hospital", "Dovecote Textiles", "the Redmarsh Gazette",
              "Kettering Instruments", "the Halvard Museum", "Oakenshaw Brewery", "the Tarrow Post Office")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")

# {name} and {value}; the value ends each template's sentence so that a prefix is a completion prompt
_TRAIN = {
    "birth_date": ("{name} was born on {value}.", "{name} came into the world on {value}.",
                   "The birthday of {name} is {value}.", "{name} celebrates a birthday every year on {value}."),
    "birth_city": ("{name} was born in {value}.", "{name} spent early childhood in {value}.",
                   "The birthplace of {name} is {value}.", "{name} grew up in {value}."),
    "university": ("{name} studied at {value}.", "{name} received an education at {value}.",
                   "{name} graduated from {value}.", "{name} attended {value}."),
    "major": ("{name} majored in {value}.", "At university {name} focused on {value}.",
              "{name} completed a degree in {value}.", "The field {name} studied was {value}."),
    "employer": ("{name} worked for {value}.", "{name} was employed by {value}.",
                 "{name} had a job at {value}.", "The employer of {name} was {value}."),
    "work_city": ("{name} worked in {value}.", "{name} had an office in {value}.",
                  "The workplace of {name} was in {value}.", "{name} commuted to work in {value}."),
}
_HELDOUT = {
    "birth_date": ("{name} first saw the light of day on {value}.", "Records show that {name} was born on {value}."),
    "birth_city": ("{name} is a native of {value}.", "Records show that {name} was born in {value}."),
    "university": ("{name} was a student at {value}.", "Records show that {name} studied at {value}."),
    "major": ("{name} took up the study of {value}.", "Records show that {name} majored in {value}."),
    "employer": ("{name} earned a living at {value}.", "Records show that {name} worked for {value}."),
    "work_city": ("{name} earned a living in {value}.", "Records show that {name} worked in {value}."),
}
_QUESTIONS = {
    "birth_date": "Q: When was {name} born? A:", "birth_city": "Q: Where was {name} born? A:",
    "university": "Q: Which university did {name} attend? A:", "major": "Q: What did {name} study? A:",
    "employer": "Q: Who employed {name}? A:", "work_city": "Q: Where did {name} work? A:",
}


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    work_city: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_people(count: int, seed: int = 0) -> list[Person]:
    """``count`` people with distinct names and attributes drawn uniformly, deterministic in ``seed``."""
    names = len(_FIRST) * len(_MIDDLE) * len(_LAST)
    if not 1 <= count <= names:
        raise ValueError(f"people must be in [1, {names}], got {count}")
    rng = random.Random(seed)
    picks = rng.sample(range(names), count)
    people = []
    for k in picks:
        f, rest = divmod(k, len(_MIDDLE) * len(_LAST))
        m, last = divmod(rest, len(_LAST))
        date = f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1900, 1999)}"
        people.append(Person(f"{_FIRST[f]} {_MIDDLE[m]} {_LAST[last]}", date, rng.choice(_CITIES),
                             rng.choice(_UNIVERSITIES), rng.choice(_MAJORS), rng.choice(_EMPLOYERS),
                             rng.choice(_CITIES)))
    return people


def _sentence(template: str, person: Person, attribute: str) -> str:
    return template.format(name=person.name, value=person.value(attribute))


def _prompt(template: str, person: Person) -> str:
    """The template's text before the value (no trailing space: the answer brings its own)."""
    return template.split("{value}")[0].format(name=person.name).rstrip()


@dataclasses.dataclass(frozen=True)
class _Texts:
    """Documents generated in memory, as a data source for ``peerlm.data.prepare``."""

    name: str
    texts: tuple[str, ...]

    def documents(self) -> Iterator[tuple[str, str]]:
        for i, t in enumerate(self.texts):
            yield f"{self.name}/{i}", t

    def describe(self) -> dict[str, Any]:
        return {"kind": "generated", "name": self.name, "documents": len(self.texts)}


@dataclasses.dataclass
class FactSet:
    people: list[Person]
    train: list[str]  # training biographies (paraphrases)
    heldout: list[str]  # one biography per person with the held-out templates
    tests: list[dict[str, Any]]  # {"person", "attribute", "kind", "prompt", "answer"}
    settings: dict[str, Any]


def make_facts(people: int = 1000, paraphrases: int = 5, seed: int = 0) -> FactSet:
    """The fact set (see the module docstring), a pure function of its arguments."""
    if paraphrases < 1:
        raise ValueError(f"paraphrases must be >= 1, got {paraphrases}")
    persons = make_people(people, seed)
    rng = random.Random(seed + 1)
    train = []
    for _ in range(paraphrases):
        for p in persons:
            order = list(ATTRIBUTES)
            rng.shuffle(order)
            train.append(" ".join(_sentence(rng.choice(_TRAIN[a]), p, a) for a in order))
    half = len(persons) // 2
    for p in persons[:half]:
        train.append(" ".join(f"{_QUESTIONS[a].format(name=p.name)} {p.value(a)}." for a in ATTRIBUTES))
    heldout, tests = [], []
    for i, p in enumerate(persons):
        picks = {a: rng.choice(_HELDOUT[a]) for a in ATTRIBUTES}
        heldout.append(" ".join(_sentence(picks[a], p, a) for a in ATTRIBUTES))
        for a in ATTRIBUTES:
            tests.append({"person": i, "attribute": a, "kind": "completion", "prompt": _prompt(picks[a], p),
                          "answer": p.value(a)})
            if i >= half:
                tests.append({"person": i, "attribute": a, "kind": "question",
                              "prompt": _QUESTIONS[a].format(name=p.name), "answer": p.value(a)})
    return FactSet(persons, train, heldout, tests, {"people": people, "paraphrases": paraphrases, "seed": seed})


def prepare_facts(out: str | os.PathLike[str], tokenizer_json: bytes, people: int = 1000, paraphrases: int = 5,
                  seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write the prepared directory of the fact set, encoded with ``tokenizer_json`` (the base run's
    tokenizer.json bytes); returns its meta."""
    facts = make_facts(people, paraphrases, seed)
    doc = {"format": 1, "settings": facts.settings, "attributes": list(ATTRIBUTES),
           "people": [dataclasses.asdict(p) for p in facts.people], "tests": facts.tests}
    extra = {FACTS_FILE: (json.dumps(doc, indent=1) + "\n").encode("utf-8")}
    return prepare([_Texts("facts-train", tuple(facts.train))], Path(out), val_fraction=0.0,
                   eval_sets={"heldout": _Texts("facts-heldout", tuple(facts.heldout))}, seed=seed,
                   progress=progress, split_by="document", tokenizer_json=tokenizer_json, extra_files=extra)


def load_tests(data_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(data_dir) / FACTS_FILE
    try:
        return json.loads(path.read_text("utf-8"))["tests"]
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no {FACTS_FILE}: not a fact set (make one with `peerlm data facts`)") \
            from None
    except (ValueError, KeyError) as e:
        raise DataError(f"{path} is not a fact file ({e}); make it again with `peerlm data facts`") from None


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, tests: Sequence[dict[str, Any]], bos_id: int = 0,
                batch_size: int = 64) -> dict[str, Any]:
    """Share of ``tests`` whose answer greedy decoding reproduces exactly after the prompt (the start
    token ``bos_id`` first, as training pieces follow one), overall and by kind and attribute. A test
    whose prompt and answer do not fit the model's context is not scored (``too_long`` counts them);
    ValueError when none fits."""
    model.eval()
    device = next(model.parameters()).device
    T = model.cfg.context_length
    scored: list[dict[str, Any]] = []
    encoded = []
    for t in tests:
        p = [bos_id] + tokenizer.encode(t["prompt"]).ids
        a = tokenizer.encode(" " + t["answer"]).ids
        if len(p) + len(a) - 1 <= T:
            scored.append(t)
            encoded.append((p + a, len(p)))
    if not scored and tests:
        raise ValueError(f"no test prompt with its answer fits the model's context of {T} tokens")
    hits: list[bool] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(s) for s, _ in chunk) - 1
        x_BT = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (s, _) in enumerate(chunk):
            x_BT[i, : len(s) - 1] = torch.tensor(s[:-1])  # right padding: causal, so it changes nothing before
        pred_BT = model(x_BT.to(device))[0].argmax(-1).cpu()
        for i, (s, lo) in enumerate(chunk):
            hits.append(pred_BT[i, lo - 1:len(s) - 1].tolist() == s[lo:])
    out: dict[str, Any] = {"exact_match": sum(hits) / max(len(hits), 1), "tests": len(hits),
                           "too_long": len(tests) - len(scored)}
    for key in ("kind", "attribute"):
        groups: dict[str, list[bool]] = {}
        for t, h in zip(scored, hits):
            groups.setdefault(t[key], []).append(h)
        out[f"by_{key}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return out
