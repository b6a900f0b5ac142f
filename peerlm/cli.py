"""The ``peerlm`` command: data, train, eval, generate, presets, flops, demo.

    peerlm data prepare --text notes.txt --out data/notes
    peerlm train --preset tiny --data data/notes --out runs/tiny --max-steps 100 --set train.lr=3e-3
    peerlm train --out runs/tiny --resume --max-steps 200     # continue, same config
    peerlm eval runs/tiny --text other.txt --json
    peerlm generate runs/tiny --prompt "Once upon" --max-new-tokens 40 --temperature 0.8 --top-k 50
    peerlm presets
    peerlm flops --preset peer-small
    peerlm demo --out runs/demo

A mistake of the user's (a bad option or value, a missing or damaged file, a checkpoint of another
model) prints one line ``peerlm: error: ...`` on stderr and exits with 2; ``--debug`` (or
PEERLM_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peerlm.checkpoint import CheckpointError
from peerlm.config import apply_overrides, get_preset, list_presets
from peerlm.data import DataError

__all__ = ["main", "build_parser"]

USER_ERRORS = (ValueError, DataError, CheckpointError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"peerlm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# ------------------------------------------------------------------------------------------ train


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    model, train = [], []
    for item in items:
        section, _, rest = item.partition(".")
        if section == "model" and rest:
            model.append(rest)
        elif section == "train" and rest:
            train.append(rest)
        else:
            raise ValueError(f"--set {item!r}: name a field of model or train, e.g. model.dim=256 or "
                             "train.lr=1e-3")
    return model, train


def build_run_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The RunConfig of a `train` invocation (preset or the resumed run's config, overrides, limits),
    and notes to print about choices made for the user."""
    from peerlm.data import TokenDataset
    from peerlm.train import RunConfig, TrainConfig, data_info

    model_sets, train_sets = _split_overrides(args.set or [])
    stored = Path(args.out) / "config.json"
    notes = []
    if args.preset is None:
        if not (args.resume and stored.is_file()):
            raise ValueError("--preset is required (see `peerlm presets`), except with --resume on an "
                             "existing run")
        run = RunConfig.from_dict(json.loads(stored.read_text("utf-8")))
        model, train, data_dir = run.model, run.train, args.data or run.data.get("dir")
    else:
        if args.data is None:
            raise ValueError("--data DIR is required (a directory made by `peerlm data prepare`)")
        model, train, data_dir = get_preset(args.preset), TrainConfig(), args.data
        vocab = TokenDataset(data_dir).vocab_size
        explicit = any(s.split("=", 1)[0].strip() == "vocab_size" for s in model_sets)
        if not explicit and vocab != model.vocab_size:
            model = dataclasses.replace(model, vocab_size=vocab)
            notes.append(f"note: model.vocab_size set to {vocab}, the vocabulary of {data_dir}")
    for section, sets in (("model", model_sets), ("train", train_sets)):
        try:
            if section == "model":
                model = apply_overrides(model, sets)
            else:
                train = apply_overrides(train, sets)
        except ValueError as e:
            raise ValueError(f"--set {section}.*: {e}") from None
    limits = {"max_steps": args.max_steps, "max_tokens": args.max_tokens, "flops": args.flops}
    given = [f"--{k.replace('_', '-')}" for k, v in limits.items() if v is not None]
    given += [f"--set train.{k}" for k in (s.split("=", 1)[0].strip() for s in train_sets) if k in limits]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both set the run length; give one of them")
    if given:  # the flag replaces whatever run length the preset, --set or the resumed run had
        train = dataclasses.replace(train, **limits)
    return RunConfig(model, train, data_info(data_dir)), notes


def _cmd_train(args: argparse.Namespace) -> int:
    from peerlm.train import train

    run, notes = build_run_config(args)
    summary = train(run, args.out, resume=args.resume, progress=not args.quiet, notes=notes)
    ppl = f", val ppl {summary['val_ppl']:.2f}" if summary.get("val_ppl") is not None else ""
    print(f"trained {args.out}: step {summary['step']}/{summary['total_steps']}, {summary['tokens']:,} "
          f"tokens, {summary['flops']:.3g} FLOPs in {summary['seconds']:.0f}s{ppl}")
    return 0


# ----------------------------------------------------------------------------------- eval / generate


def _cmd_eval(args: argparse.Namespace) -> int:
    from peerlm.evaluate import evaluate_run, format_table, to_json
    from peerlm.train import TrainError, resolve_device

    try:
        device, _, _ = resolve_device(args.device, "float32")
    except (TrainError, RuntimeError) as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    results = evaluate_run(args.run, args.data, args.text or [], args.split, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, device=device)
    if not results:
        raise DataError("nothing to evaluate: the data directory has no held-out sets; pass --text FILE")
    print(to_json(results) if args.json else format_table(results, title=f"{args.run}"))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from peerlm.data import load_tokenizer
    from peerlm.evaluate import load_run
    from peerlm.generate import generate

    model, config = load_run(args.run)
    tok_file = Path(args.run) / "tokenizer.json"
    tok = load_tokenizer(tok_file if tok_file.is_file() else config.get("data", {}).get("dir", args.run))
    eot = config.get("data", {}).get("eot_id", 0)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   bos_id=eot, stop_id=eot)
    print(args.prompt + tok.decode(new))
    return 0


# ------------------------------------------------------------------------------------ presets / flops


def _cmd_presets(args: argparse.Namespace) -> int:
    from peerlm.flops import model_cost

    print(f"{'preset':<14}{'params':>12}{'active':>12}{'experts':>12}{'train FLOPs/tok':>17}  feed-forward")
    for name in list_presets():
        cfg = get_preset(name)
        c = model_cost(cfg)
        kind = "dense" if cfg.ffn is None else f"{cfg.ffn.KIND} in block(s) {cfg.sparse_blocks()}"
        print(f"{name:<14}{c['params']:>12,}{c['active_params']:>12,}{c['expert_params']:>12,}"
              f"{c['flops_train']:>17.3g}  {kind}")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from peerlm.flops import format_cost

    model_sets, train_sets = _split_overrides(args.set or [])
    if train_sets:
        raise ValueError("flops takes model.* overrides only")
    cfg = apply_overrides(get_preset(args.preset), model_sets)
    print(f"{args.preset}: params and forward FLOPs per token (multiply-add = 2)")
    print(format_cost(cfg, args.seq_len))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from peerlm.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, progress=not args.quiet)
    return 0


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from peerlm.data.cli import add_parser as add_data_parser
    from peerlm.study.cli import add_parser as add_study_parser

    parser = _Parser(prog="peerlm",
                     description="PEER (Mixture of A Million Experts) and baselines: small LMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_parser(sub)
    add_study_parser(sub)

    p = sub.add_parser("train", help="train a model on a prepared data directory",
                       description="Train a preset on prepared data; the run directory gets config.json, "
                                   "the tokenizer, metrics.jsonl and checkpoints.")
    p.add_argument("--preset", help="model preset (see `peerlm presets`)")
    p.add_argument("--data", metavar="DIR", help="a directory made by `peerlm data prepare`")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--max-tokens", type=int, help="training tokens")
    p.add_argument("--flops", type=float,
                   help="training FLOP budget (peerlm.flops: 3 x forward per token, sub-key scoring 1 x)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. model.dim=256 or train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity and bits per byte on held-out text",
                       description="Evaluate a run on the held-out sets of a data directory and/or "
                                   "text files.")
    p.add_argument("run", metavar="RUN", help="run directory (or a checkpoint directory)")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's)")
    p.add_argument("--text", action="append", metavar="PATH", help="a UTF-8 text file (repeatable)")
    p.add_argument("--split", action="append", metavar="NAME", help="only these splits of --data")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate only the first N tokens of each data set (cut at a document end)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run", description="Sample a continuation.")
    p.add_argument("run", metavar="RUN", help="run directory (or a checkpoint directory)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default: 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("presets", help="list model presets with parameters and FLOPs per token")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("flops", help="parameter and FLOP accounting of a preset")
    p.add_argument("--preset", required=True, help="model preset")
    p.add_argument("--set", action="append", metavar="model.FIELD=VALUE", help="override a model field")
    p.add_argument("--seq-len", type=int, default=None, help="attention length (default: the context)")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("demo", help="dense vs PEER at the same FLOP budget on real text (~10 min on 2 cores)",
                       description="Fetch and prepare the corpora, train dense-small and peer-small at one "
                                   "training FLOP budget, and compare held-out perplexity and bits per byte.")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="where data and runs go (default: runs/demo)")
    p.add_argument("--minutes", type=float, default=None,
                   help="size the FLOP budget so the whole demo takes about M minutes on this machine "
                        "(default: a fixed budget, ~4-5 min per model on 2 cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peerlm` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PEERLM_DEBUG", "") not in ("", "0")
    from peerlm.train import TrainError

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help, or a usage error already reported
        return e.code if isinstance(e.code, int) else 0
    except (*USER_ERRORS, TrainError) as e:
        if debug:
            raise
        print(f"peerlm: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peerlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
