"""``trimix eval`` and ``trimix report``: run the evaluation matrix; rebuild its tables and plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from trimix.cli.common import add_config_args, config_from_args
from trimix.errors import ConfigError
from trimix.evaluation import RESUMED_FROM, Evaluator, write_report
from trimix.evaluation.report import compare_runs
from trimix.runinfo import locked_output_dir, write_run_info

logger = logging.getLogger(__name__)

EVAL_EXAMPLE = """example:
  trimix eval -c configs/qwen25_uyghur.yaml -o runs/eval-uig
  trimix eval -c configs/qwen25_uyghur.yaml -o runs/eval-uig --resume     # after a kill: nothing lost
  trimix eval -c configs/qwen25_uyghur.yaml -o runs/eval-uig --executor ray --ray-address HEAD:6379
  trimix report runs/eval-uig
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate methods x tasks x languages (the config's `eval` section)",
        description="Evaluate each method (single sources, Proxy Tuning, TriMix fixed or selected) on each task "
        "and language, appending every prediction to predictions.jsonl, then write report.md/json/png.",
        epilog=EVAL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument(
        "--resume", action="store_true", help="continue a run in --output-dir, skipping finished items"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start afresh, removing the predictions of a previous run"
    )
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="with --resume: redo the cells whose settings changed since their rows were written",
    )
    p.add_argument("--limit", type=int, help="evaluate at most N items per task and language")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="run cells in this process (default) or on Ray workers (see eval.executor in the config)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (HOST:PORT); default: start a local instance")
    p.set_defaults(func=run_eval)

    r = subparsers.add_parser(
        "report",
        help="rebuild report.md/json/png of an eval run from its predictions.jsonl",
        epilog="examples:\n  trimix report runs/eval-uig\n"
        "  trimix report runs/demo-llama-cpp --against runs/demo-hf   # the same evaluation, two backends",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("run_dir")
    r.add_argument(
        "--against",
        metavar="BASE_RUN",
        help="also compare with another run of the same evaluation: run minus base per cell, with paired "
        "bootstrap intervals (written to RUN_DIR/against-BASE.md)",
    )
    r.set_defaults(func=run_report)


# Fusion flags every model-using command accepts that evaluation has no use for (flag -> argparse dest).
FUSION_FLAGS = {
    "--weights": "weights",
    "--weights-from": "weights_from",
    "--method": "method",
    "--role": "role",
}


def run_eval(args: argparse.Namespace) -> int:
    unused = [flag for flag, value in FUSION_FLAGS.items() if getattr(args, value)]
    if unused:
        raise ConfigError(
            f"trimix eval does not use {', '.join(unused)}: each method under eval.methods carries its own "
            "fusion (method, weights or select: true). Set the weights there, or use trimix generate"
        )
    if args.resume and not args.overwrite and not Path(args.output_dir).expanduser().is_dir():
        raise ConfigError(
            f"--resume: {args.output_dir!r} does not exist, so there is nothing to continue; "
            "drop --resume to start a new run there"
        )
    config = config_from_args(args)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit must be a positive number of items; got {args.limit}")
        for spec in config.eval.tasks:
            spec.limit = args.limit
    if args.rerun_changed and not args.resume:
        raise ConfigError("--rerun-changed goes with --resume")
    with locked_output_dir(
        args.output_dir, overwrite=args.overwrite, resume=args.resume, progress_files=RESUMED_FROM
    ) as out_dir:
        evaluator = Evaluator(
            config,
            out_dir,
            progress=not args.quiet,
            rerun_changed=args.rerun_changed,
            executor=args.executor,
            ray_address=args.ray_address,
        )
        try:
            write_run_info(out_dir, config, config.eval.seed, resumed=args.resume)
            evaluator.run()
        finally:
            evaluator.close()
        table, _ = write_report(out_dir)
    print(table)
    print(f"report.md, report.json, report.png and predictions.jsonl in {out_dir}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    table, _ = write_report(args.run_dir)
    print(table)
    if args.against:
        comparison, _ = compare_runs(args.run_dir, args.against)
        print()
        print(comparison)
    return 0
