"""The ``peerlm`` command: data, train, finetune, eval, generate, export, presets, flops, demo.

    peerlm data prepare --text notes.txt --out data/notes
    peerlm train --preset tiny --data data/notes --out runs/tiny --max-steps 100 --set train.lr=3e-3
    peerlm train --out runs/tiny --resume --max-steps 200     # continue, same config
    peerlm train --hf-model llama/ --data data/notes --out runs/llama --max-steps 100 --add-memory peer:num_experts=4096
    peerlm finetune runs/tiny --data data/facts --out runs/tiny-sparse --method sparse --slots 100 --max-steps 50
    peerlm eval runs/tiny --text other.txt --json
    peerlm generate runs/tiny --prompt "Once upon" --max-new-tokens 40 --temperature 0.8 --top-k 50
    peerlm export runs/tiny --hf hf/tiny                        # a transformers directory (extra hf)
    peerlm presets
    peerlm flops --preset peer-small
    peerlm flops --hf-model llama/ --add-memory peer:num_experts=4096   # a transformers model (extra hf)
    peerlm demo --out runs/demo
    peerlm retrofit --data data/v1024 --plan                    # PEER added to a trained dense model (extra hf)

A mistake of the user's (a bad option or value, a missing or damaged file, a checkpoint of another
model) and a failure of the machine (a full disk, a read-only directory, a device this build lacks)
print one line ``peerlm: error: ...`` on stderr and exit with 2, before anything is written where
the command can know in advance; where there is a way out (an intact older checkpoint, resuming) the
line names the command. ``--debug`` (anywhere on the line) or PEERLM_DEBUG=1 shows the traceback
instead. Numbers are range-checked as they are parsed (``peerlm.argtypes``). A training run stopped
by SIGTERM or SIGINT writes a checkpoint, says how to resume and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peerlm import __version__, argtypes
from peerlm.checkpoint import CheckpointDamaged, CheckpointError, CheckpointWriteError, checkpoint_step
from peerlm.config import get_preset, list_presets
from peerlm.data import DataError
from peerlm.fileio import DirectoryBusy
from peerlm.trainargs import build_run_config, hf_context_length, overrides

__all__ = ["main", "build_parser"]

USER_ERRORS = (ValueError, DataError, CheckpointError, DirectoryBusy, OSError)
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"peerlm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# ------------------------------------------------------------------------------------------ train


def _resume_command(out: str) -> str:
    """The command that continues the run: the torchrun one when this process is a rank of one."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1:
        nodes = [f"--nnodes={world // local}"] if world > local else []
        return shlex.join(["torchrun", *nodes, f"--nproc_per_node={local}", "-m", "peerlm", "train", "--out",
                           str(out), "--resume"])
    return shlex.join(["peerlm", "train", "--out", str(out), "--resume"])


def _cmd_train(args: argparse.Namespace) -> int:
    from peerlm.runconfig import TrainInterrupted
    from peerlm.train import train

    run, notes = build_run_config(args)
    go = train
    if run.model_kind == "hf":  # the same loop, with the builder of a transformers model
        from peerlm.hf.training import train_hf

        go = functools.partial(train_hf, verified=args.hf_model is not None)
    try:
        summary = go(run, args.out, resume=args.resume, progress=not args.quiet, notes=notes)
    except TrainInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 says it once
            print(f"peerlm: {e}; continue with `{_resume_command(args.out)}`", file=sys.stderr)
        return 128 + e.signum
    except CheckpointDamaged as e:
        if e.intact is None:
            raise
        damaged = shlex.quote(str(e.ckpt))
        raise CheckpointError(f"{e}: move the damaged one aside (`mv {damaged} {damaged}.damaged`) and run "
                              f"`{_resume_command(args.out)}` to continue from step "
                              f"{checkpoint_step(e.intact)}") from None
    except CheckpointWriteError as e:
        raise CheckpointError(f"{e}; once the directory takes the write again (free space, permissions), "
                              f"continue with `{_resume_command(args.out)}`") from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    if summary["steps_this_call"] == 0:
        print(f"nothing to train: {args.out} is complete at step {summary['step']}/{summary['total_steps']} "
              "of this run length; give a longer one (--max-steps, --max-tokens or --flops) to continue")
        return 0
    ppl = f", val ppl {summary['val_ppl']:.2f}" if summary.get("val_ppl") is not None else ""
    flops = f"{summary['flops']:.3g} FLOPs" if summary["flops"] is not None else "FLOPs not counted"
    print(f"trained {args.out}: step {summary['step']}/{summary['total_steps']}, {summary['tokens']:,} "
          f"tokens, {flops} in {summary['seconds']:.0f}s{ppl}")
    return 0


# ----------------------------------------------------------------------------------- eval / generate


def _is_hf_export(path: str) -> bool:
    """Whether ``path`` is a directory of ``peerlm export --hf`` (its config.json's model type), read
    without importing transformers."""
    try:
        return json.loads((Path(path) / "config.json").read_text("utf-8")).get("model_type") == "peerlm"
    except (OSError, ValueError, AttributeError):
        return False


def _load_run(args: argparse.Namespace, device: Any = "cpu") -> tuple[Any, dict, list[str]]:
    """The model and config of ``args.run`` (a run, a checkpoint or an exported directory), and the
    lines that say which checkpoint it is (and any fallback), for the command to print once it has
    done its work (a failure stays one line). A damaged checkpoint's error names this same command on
    the intact older one."""
    from peerlm.rundir import load_run

    if _is_hf_export(args.run):
        from peerlm.hf.export import load_exported

        model, config = load_exported(args.run, device)
        return model, config, [f"peerlm: {args.command}: exported model of checkpoint step "
                               f"{config['checkpoint_step']} ({args.run})"]
    notes: list[str] = []
    try:
        model, config = load_run(args.run, device, notes)
    except CheckpointDamaged as e:
        if e.intact is None:
            raise
        argv = [str(e.intact) if a == args.run else a for a in args.argv]
        raise CheckpointError(f"{e}; `{shlex.join(['peerlm', *argv])}` reads it") from None
    notes.append(f"{args.command}: checkpoint step {config['checkpoint_step']} ({config['checkpoint']})")
    return model, config, [f"peerlm: {n.removeprefix('note: ')}" for n in notes]


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        from peerlm.hf.export import export_run
    except ImportError as e:
        raise ValueError(f"export --hf needs transformers ({e}); install the extra: pip install 'peerlm[hf]'") from None
    notes: list[str] = []
    try:
        config = export_run(args.run, args.hf, notes)
    except CheckpointDamaged as e:
        if e.intact is None:
            raise
        argv = [str(e.intact) if a == args.run else a for a in args.argv]
        raise CheckpointError(f"{e}; `{shlex.join(['peerlm', *argv])}` reads it") from None
    for n in notes:
        print(f"peerlm: {n.removeprefix('note: ')}", file=sys.stderr)
    if config.get("model_kind") == "hf":
        how = (f"peerlm.hf.from_pretrained({str(args.hf)!r}) (with its memory), or continue it with "
               f"`peerlm train --hf-model {shlex.quote(str(args.hf))}`")
    else:
        how = (f"AutoModelForCausalLM.from_pretrained({str(args.hf)!r}) after `import peerlm.hf`, or with "
               "trust_remote_code=True")
    print(f"exported {args.run} (checkpoint step {config['checkpoint_step']}) to {args.hf}: load it with {how}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from peerlm.evaluate import evaluate_run, format_table, to_json
    from peerlm.runconfig import TrainError, resolve_device

    try:
        device, _, _ = resolve_device(args.device, "float32")
    except (TrainError, RuntimeError) as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    model, config, said = _load_run(args, device)
    results = evaluate_run(args.run, args.data, args.text or [], args.split, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, device=device, model=model, config=config,
                           progress=not args.quiet)
    if not results:
        raise DataError("nothing to evaluate: the data directory has no held-out sets; pass --text FILE")
    title = f"{args.run} (checkpoint step {config['checkpoint_step']})"
    print(to_json(results) if args.json else format_table(results, title=title))
    print("\n".join(said), file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from peerlm.generate import generate
    from peerlm.rundir import run_tokenizer

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes of another encoding reach argv as lone surrogates
        raise ValueError(f"--prompt is not UTF-8 text (at character {e.start}); pass UTF-8 (e.g. set a UTF-8 "
                         "locale, or convert with iconv)") from None
    model, config, said = _load_run(args)
    tok = run_tokenizer(args.run, config)
    eot = config.get("data", {}).get("eot_id", 0)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    new = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                   bos_id=eot, stop_id=eot, progress=not args.quiet)
    print(args.prompt + tok.decode(new))
    print("\n".join(said), file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------ presets / flops


def _table(rows: list[list[str]], align: str) -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell, aligned by ``align`` (one
    ``<`` or ``>`` per column), two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(align))]
    return ["  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()
            for r in rows]


def _cmd_presets(args: argparse.Namespace) -> int:
    from peerlm.flops import model_cost

    rows = [["preset", "params", "active", "table params", "train FLOPs/tok", "feed-forward"]]
    for name in list_presets():
        cfg = get_preset(name)
        c = model_cost(cfg)
        kind = "dense" if cfg.ffn is None else f"{cfg.ffn.KIND} in block(s) {cfg.sparse_blocks()}"
        rows.append([name, f"{c['params']:,}", f"{c['active_params']:,}", f"{c['expert_params']:,}",
                     f"{c['flops_train']:.3g}", kind])
    print("\n".join(_table(rows, "<>>>><")))
    print("\nparams: all parameters; active: those used per token; table params: those in PEER expert\n"
          "tables and PKM value tables (MoE experts are ordinary MLPs, counted in params only)")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from peerlm.flops import format_cost

    if (args.preset is None) == (args.hf_model is None):
        raise ValueError("give one of --preset NAME and --hf-model DIR")
    if args.hf_model is not None:
        return _hf_flops(args)
    if args.add_memory:
        raise ValueError("--add-memory adds memory to a transformers model: it goes with --hf-model DIR")
    cfg = overrides(get_preset(args.preset), "model", args.set or [])
    print(f"{args.preset}: params and forward FLOPs per token (multiply-add = 2)")
    print(format_cost(cfg, args.seq_len))
    return 0


def _hf_flops(args: argparse.Namespace) -> int:
    try:
        from peerlm.hf.flops import hf_cost
        from peerlm.hf.training import hf_model_config
    except ImportError as e:
        raise ValueError(f"--hf-model needs transformers ({e}); install the extra: pip install 'peerlm[hf]'") from None
    spec = hf_model_config(args.hf_model, args.add_memory or [], hf_context_length(args.set or []))
    c = hf_cost(spec, args.seq_len)
    memory = f", with memory in block(s) {sorted(i for m in spec.memory for i in m['layers'])}" if spec.memory else ""
    print(f"{args.hf_model} ({spec.model_type}{memory}): params and FLOPs per token (multiply-add = 2)")
    rows = [["params", f"{c['params']:,}"], ["active params", f"{c['active_params']:,}"],
            ["table params", f"{c['expert_params']:,}"], ["forward FLOPs/token", f"{c['flops_forward']:.4g}"],
            ["train FLOPs/token", f"{c['flops_train']:.4g}"]]
    print("\n".join(_table(rows, "<>")))
    print(f"attention over T = {c['seq_len']}; train = 3 x forward, sub-key scoring 1 x (peerlm.hf.flops)")
    return 0


def _cmd_retrofit(args: argparse.Namespace) -> int:
    try:
        from peerlm.hf.retrofit import RetrofitPlan, plan_lines, run_retrofit, write_report
    except ImportError as e:
        raise ValueError(f"retrofit needs transformers ({e}); install the extra: pip install 'peerlm[hf]'") from None
    plan = RetrofitPlan(Path(args.data), Path(args.out), Path(args.results), tuple(args.seeds), args.base_flops,
                        args.heal_flops, args.steps)
    if args.plan:
        print("\n".join(plan_lines(plan)))
    elif args.report:
        print(write_report(plan).read_text("utf-8"), end="")
    else:
        done = run_retrofit(plan, progress=not args.quiet)
        print(f"retrofit: {done} run(s) done now; table: {plan.results / 'table.md'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from peerlm.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, progress=not args.quiet)
    return 0


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from peerlm.continual.cli import add_facts_parser
    from peerlm.continual.cli import add_parser as add_finetune_parser
    from peerlm.data.cli import add_parser as add_data_parser
    from peerlm.study.cli import add_parser as add_study_parser

    parser = _Parser(prog="peerlm",
                     description="PEER (Mixture of A Million Experts) and baselines: small LMs.")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks of errors (accepted anywhere on the command line)")
    parser.add_argument("--version", action="version", version=f"peerlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_parser(sub)
    add_study_parser(sub)
    add_finetune_parser(sub)
    add_facts_parser(sub)

    p = sub.add_parser("train", help="train a model on a prepared data directory",
                       description="Train a preset on prepared data; the run directory gets config.json, "
                                   "the tokenizer, metrics.jsonl and checkpoints. SIGTERM or Ctrl-C ends "
                                   "the current step, writes a checkpoint and says how to resume.")
    p.add_argument("--preset", help="model preset (see `peerlm presets`)")
    p.add_argument("--hf-model", metavar="DIR",
                   help="train a transformers causal LM from a local directory (save_pretrained; config only "
                        "is enough) instead of a preset (extra hf; peerlm.hf.training)")
    p.add_argument("--add-memory", action="append", metavar="SPEC",
                   help="with --hf-model: add PEER / PKM memory, "
                        "KIND[:layers=I,J|middle][:mode=parallel|replace][:OPTION=VALUE...], e.g. "
                        "peer:layers=1:mode=parallel:num_experts=4096 (repeatable)")
    p.add_argument("--data", metavar="DIR", help="a directory made by `peerlm data prepare`")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--max-steps", type=argtypes.positive_int, help="optimizer steps")
    p.add_argument("--max-tokens", type=argtypes.positive_int, help="training tokens (e.g. 1e6)")
    p.add_argument("--flops", type=argtypes.real(0, lo_open=True, example="5e13"),
                   help="training FLOP budget (peerlm.flops: 3 x forward per token, sub-key scoring 1 x)")
    p.add_argument("--set", action="append", type=argtypes.setting("model", "train"), metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. model.dim=256 or train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity and bits per byte on held-out text",
                       description="Evaluate a run on the held-out sets of a data directory and/or "
                                   "text files.")
    p.add_argument("run", metavar="RUN", help="run directory, checkpoint directory or `export --hf` directory")
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's)")
    p.add_argument("--text", action="append", metavar="PATH", help="a UTF-8 text file (repeatable)")
    p.add_argument("--split", action="append", metavar="NAME", help="only these splits of --data")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=8,
                   help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=argtypes.positive_int, default=None,
                   help="evaluate only the first N tokens of each data set and text (cut at a document end)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample text from a run", description="Sample a continuation.")
    p.add_argument("run", metavar="RUN", help="run directory, checkpoint directory or `export --hf` directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=argtypes.nonnegative_int, default=100,
                   help="tokens to add (default: 100)")
    p.add_argument("--temperature", type=argtypes.nonnegative_float, default=1.0,
                   help="0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=argtypes.positive_int, default=None,
                   help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=argtypes.probability, default=None, help="nucleus sampling threshold, in (0, 1]")
    p.add_argument("--seed", type=argtypes.seed, default=None, help="seed of the sampler")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model directory",
                       description="Write a run's newest checkpoint (or a checkpoint directory) as a transformers "
                                   "directory: config.json, model.safetensors, generation_config.json and the "
                                   "tokenizer (extra `hf`). `eval` and `generate` read it too.")
    p.add_argument("run", metavar="RUN", help="run directory (or a checkpoint directory)")
    p.add_argument("--hf", required=True, metavar="OUT", help="the directory to write (absent or empty)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("presets", help="list model presets with parameters and FLOPs per token")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("flops", help="parameter and FLOP accounting of a preset or a transformers model")
    p.add_argument("--preset", help="model preset")
    p.add_argument("--hf-model", metavar="DIR", help="a transformers model directory (a family of peerlm.hf.flops)")
    p.add_argument("--add-memory", action="append", metavar="SPEC",
                   help="with --hf-model: memory as `train --add-memory` adds it (repeatable)")
    p.add_argument("--set", action="append", type=argtypes.setting("model"), metavar="model.FIELD=VALUE",
                   help="override a model field (with --hf-model: model.context_length only)")
    p.add_argument("--seq-len", type=argtypes.positive_int, default=None,
                   help="attention length (default: the context)")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("retrofit", help="PEER added to a pretrained dense transformers model and healed, vs dense",
                       description="Pretrain a small dense Llama with `train --hf-model`, add PEER to its middle "
                                   "block (parallel and replace) and heal, against training the dense model on "
                                   "for the same FLOPs; records and table under --results (peerlm.hf.retrofit). "
                                   "Resumable: rerun to continue.")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared data directory (with held-out sets)")
    p.add_argument("--out", default="runs/retrofit", metavar="DIR", help="runs (default: runs/retrofit)")
    p.add_argument("--results", default="results/retrofit", metavar="DIR",
                   help="records, table.md, summary.json (default: results/retrofit)")
    p.add_argument("--seeds", type=argtypes.seed, nargs="+", default=[0, 1], help="seeds (default: 0 1)")
    p.add_argument("--base-flops", type=argtypes.real(0, lo_open=True, example="8e12"), default=8e12,
                   help="pretraining FLOPs of the dense base (default: 8e12)")
    p.add_argument("--heal-flops", type=argtypes.real(0, lo_open=True, example="2e12"), default=2e12,
                   help="training FLOPs of each arm after the base (default: 2e12)")
    p.add_argument("--steps", type=argtypes.positive_int, default=None,
                   help="a smoke test: every run this many steps instead of the FLOP budgets")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the runs, their commands and states; run nothing")
    mode.add_argument("--report", action="store_true", help="write table.md and summary.json from the records")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_retrofit)

    p = sub.add_parser("demo", help="dense vs PEER at the same FLOP budget on real text (~10 min on 2 cores)",
                       description="Fetch and prepare the corpora, train dense-small and peer-small at one "
                                   "training FLOP budget, and compare held-out perplexity and bits per byte.")
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="where data and runs go (default: runs/demo)")
    p.add_argument("--minutes", type=argtypes.positive_float, default=None,
                   help="size the FLOP budget so the whole demo takes about M minutes on this machine "
                        "(default: a fixed budget, ~4-5 min per model on 2 cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
        if e.filename2:
            text = f"{e.filename} -> {e.filename2}: {e.strerror}"
    return " ".join(text.split())


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (a global flag, so accepted in any position; not after ``--``),
    and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `peerlm` console script; returns the exit code."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("PEERLM_DEBUG", "") not in ("", "0")
    from peerlm.runconfig import TrainError, TrainInterrupted

    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(args.func(args) or 0)
    except SystemExit as e:  # --help, or a usage error already reported
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # the reader went away (`peerlm presets | head`): what it took was enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (*USER_ERRORS, TrainError) as e:
        if debug:
            raise
        print(f"peerlm: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OUT_OF_MEMORY as e:
        if debug:
            raise
        print(f"peerlm: error: out of memory ({_one_line(e)[:160]}); lower the batch size or the model size",
              file=sys.stderr)
        return 2
    except TrainInterrupted as e:
        print(f"peerlm: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("peerlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
