"""``peerlm finetune``: a new run from a trained run's newest intact checkpoint, on new data.

    peerlm finetune runs/peer --data data/facts --out runs/peer-sparse --method sparse --slots 500 --max-steps 200
    peerlm finetune runs/peer --data data/facts --out runs/peer-lora --method lora --lora-rank 8 --epochs 2
    peerlm finetune runs/peer --data data/facts --out runs/peer-grow --method grow --grow 16 --max-steps 200
    peerlm finetune --out runs/peer-sparse --resume --max-steps 400    # continue (the base is not needed)

See ``peerlm.continual.finetune`` for the methods and their guarantees.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Any

from peerlm import argtypes, trainargs

__all__ = ["add_parser", "add_facts_parser"]


def _resume_command(out: str) -> str:
    return shlex.join(["peerlm", "finetune", "--out", str(out), "--resume"])


def _train_overrides(args: argparse.Namespace, context: int, batch_size: int, data_dir: str) -> dict[str, Any]:
    """Run length and optimisation flags as TrainConfig fields."""
    from peerlm.data import TokenDataset

    limits = {"--max-steps": args.max_steps, "--max-tokens": args.max_tokens, "--epochs": args.epochs}
    given = [k for k, v in limits.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} both set the run length; give one of them")
    out: dict[str, Any] = {}
    for flag, field in (("lr", "lr"), ("batch_size", "batch_size"), ("warmup", "warmup"), ("seed", "seed"),
                        ("eval_every", "eval_every"), ("ckpt_every", "ckpt_every")):
        if getattr(args, flag) is not None:
            out[field] = getattr(args, flag)
    if given:
        out.update(max_steps=None, max_tokens=None, flops=None)
    if args.max_steps is not None:
        out["max_steps"] = args.max_steps
    elif args.max_tokens is not None:
        out["max_tokens"] = args.max_tokens
    elif args.epochs is not None:
        windows = TokenDataset(data_dir).windows_per_epoch(context)
        out["max_steps"] = max(1, math.ceil(args.epochs * windows / out.get("batch_size", batch_size)))
    return out


def _spec_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.method is None:
        raise ValueError("--method is required: one of full, lora, memory, sparse, grow")
    spec: dict[str, Any] = {"method": args.method}
    optimizer = args.optimizer or ("sgd" if args.method == "sparse" else "adamw")
    spec["optimizer"] = optimizer
    for name in ("slots", "background", "background_data", "background_batch_size", "grow", "key_init",
                 "lora_rank", "lora_alpha", "lora_dropout"):
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    if args.lora_targets is not None:
        spec["lora_targets"] = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return spec


def _cmd_finetune(args: argparse.Namespace) -> int:
    from peerlm.checkpoint import CheckpointError
    from peerlm.config import from_dict, to_dict
    from peerlm.continual.finetune import finetune, finetune_config, plan_finetune
    from peerlm.runconfig import RunConfig, TrainConfig, TrainInterrupted, data_info
    from peerlm.rundir import RunDir

    notes: list[str] = []
    if args.resume:
        if args.base is not None or args.method is not None:
            raise ValueError("--resume continues the run in --out as it was configured; give no BASE_RUN or "
                             "--method")
        rd = RunDir(args.out)
        if not rd.config.is_file():
            raise ValueError(f"{args.out} holds no run to resume (no config.json)")
        try:
            run = RunConfig.from_dict(rd.read_config())
        except (ValueError, TypeError) as e:
            raise ValueError(f"{rd.config} is not a valid run config ({' '.join(str(e).split())[:200]})") from None
        if not run.finetune:
            raise ValueError(f"{args.out} is not a finetune run; continue it with `peerlm train --out "
                             f"{args.out} --resume`")
        data_dir = args.data or run.data.get("dir")
        fields = {**to_dict(run.train),
                  **_train_overrides(args, run.model.context_length, run.train.batch_size, data_dir)}
        run = RunConfig(run.model, from_dict(TrainConfig, fields), data_info(data_dir), run.finetune)
    else:
        if args.base is None:
            raise ValueError("BASE_RUN is required (the trained run to start from), except with --resume")
        if args.data is None:
            raise ValueError("--data DIR is required (a directory prepared with the base run's tokenizer)")
        spec, base_config = plan_finetune(args.base, args.data, args.out, _spec_args(args), notes)
        base_train = base_config.get("train", {})
        overrides = _train_overrides(args, base_config["model"]["context_length"], base_train.get("batch_size", 8),
                                     args.data)
        if not {"max_steps", "max_tokens"} & set(overrides):
            raise ValueError("no run length: give one of --max-steps, --max-tokens or --epochs")
        run = finetune_config(spec, base_config, args.data, overrides)
    if args.set:
        run = RunConfig(run.model, trainargs.overrides(run.train, "train", args.set), run.data, run.finetune)
    try:
        summary = finetune(run, args.out, resume=args.resume, progress=not args.quiet, notes=notes)
    except TrainInterrupted as e:
        print(f"peerlm: {e}; continue with `{_resume_command(args.out)}`", file=sys.stderr)
        return 128 + e.signum
    except CheckpointError as e:
        raise CheckpointError(f"{e}; continue with `{_resume_command(args.out)}` once fixed") from None
    if summary["steps_this_call"] == 0:
        print(f"nothing to train: {args.out} is complete at step {summary['step']}/{summary['total_steps']}; "
              "give a longer run length to continue")
        return 0
    ppl = f", val ppl {summary['val_ppl']:.2f}" if summary.get("val_ppl") is not None else ""
    print(f"finetuned {args.out} ({run.finetune['method']} from {run.finetune['base']}): step "
          f"{summary['step']}/{summary['total_steps']}, {summary['tokens']:,} tokens in {summary['seconds']:.0f}s{ppl}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune", help="continue a trained run on new data into a new run (full, lora, memory, sparse, grow)",
        description="Start from the newest intact checkpoint of BASE_RUN, train on --data with --method and "
                    "write the new run directory --out (the base run is only read). The run has every "
                    "guarantee of `peerlm train`: one writer, atomic checkpoints, --resume, SIGTERM "
                    "checkpoint, metrics.jsonl. Eval and generate read it like any run.")
    p.add_argument("base", nargs="?", metavar="BASE_RUN", help="the trained run directory to start from")
    p.add_argument("--data", metavar="DIR", help="prepared data with the base run's tokenizer")
    p.add_argument("--out", required=True, metavar="RUN", help="the new run directory")
    p.add_argument("--method", choices=("full", "lora", "memory", "sparse", "grow"),
                   help="what trains: every parameter, LoRA adapters, the memory tables, the TF-IDF top rows "
                        "of the tables, or new experts")
    p.add_argument("--max-steps", type=argtypes.positive_int, help="optimizer steps")
    p.add_argument("--max-tokens", type=argtypes.positive_int, help="training tokens")
    p.add_argument("--epochs", type=argtypes.positive_float, help="passes over --data's training split")
    p.add_argument("--lr", type=argtypes.positive_float,
                   help="peak LR (default: the base run's for AdamW, 1.0 for SGD)")
    p.add_argument("--batch-size", type=argtypes.positive_int, help="default: the base run's")
    p.add_argument("--warmup", type=argtypes.nonnegative_int, help="warmup steps (default 0)")
    p.add_argument("--seed", type=argtypes.seed, help="default: the base run's")
    p.add_argument("--eval-every", type=argtypes.positive_int, help="validation interval in steps")
    p.add_argument("--ckpt-every", type=argtypes.nonnegative_int, help="checkpoint interval in steps")
    p.add_argument("--set", action="append", type=argtypes.setting("train"), metavar="train.FIELD=VALUE",
                   help="override any training field (repeatable)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"),
                   help="sparse: sgd (default, no momentum or decay) or the lazy row-sparse adamw")
    p.add_argument("--slots", type=argtypes.positive_int, help="sparse: rows updated per step and layer (t)")
    p.add_argument("--background", type=argtypes.positive_int,
                   help="sparse: background batches of the base run's training data for df (default 100)")
    p.add_argument("--background-data", metavar="DIR", help="sparse: background data (default: the base run's)")
    p.add_argument("--background-batch-size", type=argtypes.positive_int,
                   help="sparse: windows per background batch (default: the base run's batch size)")
    p.add_argument("--grow", type=argtypes.positive_int, metavar="M", help="grow: sub-keys added per half")
    p.add_argument("--key-init", choices=("zero", "random"),
                   help="grow: new sub-keys zero (output unchanged at step 0, default) or drawn like the init")
    p.add_argument("--lora-rank", type=argtypes.positive_int, help="lora: rank r (default 8)")
    p.add_argument("--lora-alpha", type=argtypes.positive_float, help="lora: alpha (default 16)")
    p.add_argument("--lora-dropout", type=argtypes.fraction, help="lora: dropout (default 0)")
    p.add_argument("--lora-targets", metavar="A,B", help="lora: module name suffixes (default: attn.qkv, "
                   "attn.proj, ffn.fc, ffn.gate, ffn.proj)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)
    return p



def _cmd_facts(args: argparse.Namespace) -> int:
    import json

    from peerlm.continual.facts import exact_match, load_tests
    from peerlm.data import TokenDataset
    from peerlm.rundir import check_same_tokenizer, load_run, run_fingerprint, run_tokenizer

    ds = TokenDataset(args.data)
    tests = load_tests(args.data)
    notes: list[str] = []
    model, config = load_run(args.run, "cpu", notes)
    check_same_tokenizer(run_fingerprint(args.run, config), ds.tokenizer_sha256, args.data,
                         "make the fact set with this run's tokenizer (`peerlm data facts --tokenizer RUN`)")
    tok = run_tokenizer(args.run, config, args.data)
    res = exact_match(model, tok, tests, bos_id=ds.eot_id, batch_size=args.batch_size)
    res["checkpoint_step"] = config["checkpoint_step"]
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for n in notes:
        print(f"peerlm: {n.removeprefix('note: ')}", file=sys.stderr)
    print(f"{args.run} (step {res['checkpoint_step']}): exact match {res['exact_match']:.1%} of {res['tests']} "
          "held-out prompts")
    for key in ("by_kind", "by_attribute"):
        print("  " + ", ".join(f"{k} {v:.1%}" for k, v in res[key].items()))
    return 0


def add_facts_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("facts", help="exact match of a run on a fact set's held-out prompts",
                              description="Greedy-decoding exact match of the attributes of a fact set "
                                          "(`peerlm data facts`) on its held-out completion and question prompts.")
    p.add_argument("run", metavar="RUN", help="run directory (or a checkpoint directory)")
    p.add_argument("--data", required=True, metavar="DIR", help="the fact set's prepared directory")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=64, help="prompts per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_facts)
    return p
