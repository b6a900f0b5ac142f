"""`peerlm study ...`: the paper's comparisons, resumable from the committed records of finished runs.

    peerlm study isoflop --plan                 # the runs still to do, with a time estimate from calibration
    peerlm study isoflop                        # run them all (resumes; skips runs that have a record)
    peerlm study isoflop --max-runs 1           # one run, e.g. to commit its record before the next
    peerlm study isoflop --report               # summary.json, table.md and plots from the records
    peerlm study isoflop --time-steps           # time every recorded model under one load, then --report
    peerlm study isoflop --reproduce RUN_ID     # train a recorded run again; how close (reproduced.json)
    peerlm study isoflop-tuned --plan           # the second table: every method tuned by one protocol,
                                                # from the first table's optima; results/isoflop-tuned/
    peerlm study experts --plan                 # an ablation (experts, active, querynorm, expert-lr, placement),
                                                # isoFLOP study's compute-optimal PEER model; results/<name>/
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from peerlm.argtypes import real, whole
from peerlm.study.design import BUDGETS, METHODS, budget_name

__all__ = ["add_parser", "budget"]

# argparse reads an argument that starts with "-" as an option unless it looks like a negative number,
# and its own test for that misses exponents ("-2e12"); the study's commands have no option that looks
# like a number, so anything that starts with "-" and a digit is a value, and its type checks it
NEGATIVE_NUMBER = re.compile(r"^-\.?\d")


def budget(text: str) -> float:
    """The argparse type of ``--budget``: a finite, positive number of training FLOPs."""
    try:
        return real(0, lo_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"a budget must be a positive number of FLOPs (e.g. 2e12), got {text!r}") \
            from None


def _drive(study, write: Callable, args: argparse.Namespace) -> int:
    """--plan, --reproduce, --report, or run what is pending (then report once nothing is); ``study`` is
    the ``Runner`` of the study's plan."""
    alone = [o for o, v in (("--plan", args.plan), ("--report", args.report), ("--time-steps", args.time_steps),
                            ("--max-runs", args.max_runs is not None)) if v]
    if args.reproduce and alone:
        raise ValueError(f"--reproduce trains recorded runs again and does nothing else: drop {', '.join(alone)}, "
                         "or run that in a separate command")
    if args.plan:
        print(study.format_plan(calibrate=not args.no_calibrate))
        return 0
    if args.reproduce:
        from peerlm.study.reproduce import reproduce

        rows = reproduce(study, args.reproduce)
        print(f"added {len(rows)} row(s) to {study.results / 'reproduced.json'}")
        return 0
    if args.time_steps:
        print(f"wrote {study.time_steps()}")
        args.report = True
    if not args.report:
        study.run(max_runs=args.max_runs, progress=not args.quiet)
    if args.report or not study.pending():
        for path in write(study):
            print(f"wrote {path}")
    return 0


def _cmd_isoflop(args: argparse.Namespace) -> int:
    from peerlm.study.isoflop import isoflop_study
    from peerlm.study.report import write_report
    from peerlm.study.runner import main_log

    study = isoflop_study(args.results, work=args.work, budgets=tuple(args.budget or BUDGETS),
                  methods=tuple(args.method or METHODS), threads=args.threads, log=main_log, device=args.device)
    return _drive(study, write_report, args)


def _cmd_tuned(args: argparse.Namespace) -> int:
    from peerlm.study.runner import main_log
    from peerlm.study.tuned import tuned_study
    from peerlm.study.tuned_report import write_tuned_report

    if not Path(args.paper_results).is_dir():
        raise ValueError(f"--paper-results {args.paper_results} is not a folder; name the folder of the isoFLOP "
                         "study's records (the one holding runs/; default results/isoflop)")
    study = tuned_study(args.results, args.paper_results, work=args.work, budgets=tuple(args.budget or BUDGETS),
                        methods=tuple(args.method or METHODS), threads=args.threads, log=main_log, device=args.device)
    return _drive(study, write_tuned_report, args)


def _cmd_ablation(args: argparse.Namespace) -> int:
    from peerlm.study.ablation_report import write_ablation_report
    from peerlm.study.ablations import ablation_study
    from peerlm.study.isoflop import isoflop_study
    from peerlm.study.runner import main_log

    if not Path(args.isoflop_results).is_dir():
        what = "is not a folder" if Path(args.isoflop_results).exists() else "does not exist"
        raise ValueError(f"--isoflop-results {args.isoflop_results} {what}; name the folder of the isoFLOP study's "
                         "records (the one holding runs/; default results/isoflop)")
    iso = isoflop_study(args.isoflop_results, work=args.work, threads=args.threads, log=main_log, device=args.device)
    return _drive(ablation_study(args.study, args.results or f"results/{args.study}", iso), write_ablation_report, args)


def _cmd_continual(args: argparse.Namespace) -> int:
    from peerlm.continual.study import continual_study
    from peerlm.continual.study_report import write_continual_report
    from peerlm.study.runner import main_log

    study = continual_study(args.results, args.isoflop_results, work=args.work, iso_work=args.isoflop_work,
                            threads=args.threads, log=main_log, device=args.device)
    if args.plan:
        print(study.format_plan())
        return 0
    if not args.report:
        study.run(max_runs=args.max_runs, progress=not args.quiet)
    if args.report or not study.pending():
        for path in write_continual_report(study):
            print(f"wrote {path}")
    return 0


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--threads", type=whole(1), default=1,
                   help="torch CPU threads per run (default 1: step times comparable across runs)")
    q.add_argument("--device", default="cpu", metavar="DEV",
                   help="where runs train and evaluate: cpu (default), cuda, cuda:N or auto; records from "
                        "different devices are comparable in loss, not in time")
    q.add_argument("--max-runs", type=whole(1), default=None, help="stop after this many runs")
    q.add_argument("--plan", action="store_true", help="print the runs still to do and an estimated time")
    q.add_argument("--no-calibrate", action="store_true", help="with --plan: skip the timing of a few steps")
    q.add_argument("--report", action="store_true", help="only write the reports from the records")
    q.add_argument("--time-steps", action="store_true",
                   help="time every recorded model's training step back to back (timing.json: the wall "
                        "times the reports compare), then write the reports; run on an idle machine")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--reproduce", action="append", metavar="RUN_ID",
                   help="train this recorded run again from its record and compare (repeatable; rows in "
                        "<results>/reproduced.json; the records are left as they are)")


def _isoflop_args(q: argparse.ArgumentParser, results: str) -> None:
    """The options of an isoFLOP table's command (records in ``results`` by default)."""
    q.add_argument("--results", default=results, metavar="DIR", help=f"records and reports (default: {results})")
    q.add_argument("--work", default=None, metavar="DIR",
                   help="data and checkpoints (default: $PEERLM_CACHE/study/isoflop)")
    q.add_argument("--budget", action="append", type=budget, metavar="FLOPS",
                   help=f"training FLOP budget (repeatable; default: {', '.join(budget_name(b) for b in BUDGETS)})")
    q.add_argument("--method", action="append", choices=METHODS, help="only these methods (repeatable)")
    _common(q)
    q._negative_number_matcher = NEGATIVE_NUMBER


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="the isoFLOP study and its tuned table, the ablations, continual learning",
                       description="Studies that reproduce the paper's comparisons, and the continual-learning "
                                   "study, each resumable from its records.")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    q = studies.add_parser("isoflop", help="dense vs MoE vs fine-grained MoE vs PKM vs PEER at equal FLOPs",
                           description="The isoFLOP study (the paper's Table 1): for each budget and "
                                       "method a ladder of model sizes; see peerlm/study/design.py.")
    _isoflop_args(q, "results/isoflop")
    q.set_defaults(func=_cmd_isoflop)
    q = studies.add_parser("isoflop-tuned", help="the isoFLOP study with every method tuned by one protocol",
                           description="The isoFLOP study's second table: each method's knobs tuned at its "
                                       "paper-settings optimum, the size re-laddered, four seeds; see "
                                       "peerlm/study/tuned.py.")
    q.add_argument("--paper-results", default="results/isoflop", metavar="DIR",
                   help="the paper-settings table's records (default: results/isoflop)")
    _isoflop_args(q, "results/isoflop-tuned")
    q.set_defaults(func=_cmd_tuned)
    q = studies.add_parser("continual", help="learning vs forgetting: full, lora, memory, sparse, grow finetuning",
                           description="Finetune the isoFLOP study's compute-optimal PEER, PKM and dense models "
                                       "on new facts and documents with each method and its knob swept; records "
                                       "learning and forgetting; see peerlm/continual/study.py.")
    q.add_argument("--results", default="results/continual", metavar="DIR",
                   help="records and reports (default: results/continual)")
    q.add_argument("--isoflop-results", default="results/isoflop", metavar="DIR",
                   help="the isoFLOP study's records, which name the bases (default: results/isoflop)")
    q.add_argument("--isoflop-work", default=None, metavar="DIR",
                   help="the isoFLOP study's work directory, which holds the bases' checkpoints "
                        "(default: $PEERLM_CACHE/study/isoflop)")
    q.add_argument("--work", default=None, metavar="DIR",
                   help="task data and finetune checkpoints (default: $PEERLM_CACHE/study/continual)")
    q.add_argument("--threads", type=whole(1), default=1, help="torch CPU threads (default 1)")
    q.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:N")
    q.add_argument("--max-runs", type=whole(1), default=None, help="stop after this many finetunes")
    q.add_argument("--plan", action="store_true", help="print the finetunes still to do")
    q.add_argument("--report", action="store_true", help="only write the reports from the records")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_continual)
    from peerlm.study.ablations import ABLATIONS

    for name, ablation in ABLATIONS.items():
        q = studies.add_parser(name, help=ablation.help, description=f"The {name} ablation; see "
                               "peerlm/study/ablations.py. Needs the isoFLOP study's PEER ladder at its "
                               "smaller budget.")
        q.add_argument("--results", default=None, metavar="DIR", help=f"records and reports (default: results/{name})")
        q.add_argument("--isoflop-results", default="results/isoflop", metavar="DIR",
                       help="the isoFLOP study's records (default: results/isoflop)")
        q.add_argument("--work", default=None, metavar="DIR",
                       help="the isoFLOP study's work directory (default: $PEERLM_CACHE/study/isoflop)")
        _common(q)
        q._negative_number_matcher = NEGATIVE_NUMBER
        q.set_defaults(func=_cmd_ablation)
