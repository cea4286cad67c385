"""``trimix lm-eval``: lm-evaluation-harness's own command line, with the ``trimix`` model registered and
trimix's task YAMLs (bundled SIB-200 languages) on the include path."""

from __future__ import annotations

import argparse
import os
import sys

from trimix.errors import ConfigError

EXAMPLE = """every option after `lm-eval` goes to lm-evaluation-harness unchanged; for example:
  trimix lm-eval --model trimix --model_args config=run.yaml,weights=large:0.1|small_cpt:0.9 \\
      --tasks trimix_sib200_topic_loglik_uig_Arab --output_path runs/lm-eval
  trimix lm-eval --model trimix --model_args config=run.yaml,weights_from=runs/sel/selection.json \\
      --tasks trimix_sib200_topic_gen --batch_size 8 --limit 50
  trimix lm-eval ls tasks          # lm-eval's own listing (trimix_* are trimix's tasks)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help="evaluate a fused model with lm-evaluation-harness (--model trimix); options pass through",
        description="Run lm-evaluation-harness with the `trimix` model registered. Needs `pip install "
        "'trimix[lm-eval]'`. Python users: `import trimix.lm_eval` before `lm_eval.simple_evaluate(model='trimix', ...)`.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    p.set_defaults(func=run, lm_eval_args=[])


def run(args: argparse.Namespace) -> int:
    try:
        from lm_eval._cli import HarnessCLI

        import trimix.lm_eval as backend
    except ImportError as exc:
        raise ConfigError(
            "trimix lm-eval needs lm-evaluation-harness: pip install 'trimix[lm-eval]'"
        ) from exc
    forwarded = list(args.lm_eval_args)
    if (
        forwarded
        and forwarded[0] not in {"run", "ls", "validate", "-h", "--help"}
        and "--include_path" not in forwarded
    ):
        forwarded += ["--include_path", backend.tasks_dir()]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # trimix's tasks read bundled files
    argv, sys.argv = sys.argv, ["lm-eval", *forwarded]
    try:
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    except ValueError as exc:  # lm-eval reports a user's mistake (an unknown task, a bad option) so
        if isinstance(exc, ConfigError):
            raise
        hint = "; `trimix lm-eval ls tasks` lists the tasks" if "task" in str(exc).lower() else ""
        raise ConfigError(f"lm-evaluation-harness: {exc}{hint}") from exc
    finally:
        sys.argv = argv
    return 0
