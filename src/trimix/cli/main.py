"""The single ``trimix`` entry point; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from trimix import __version__
from trimix.errors import Interrupted, TrimixError
from trimix.io import describe_os_error

logger = logging.getLogger("trimix")


def build_parser() -> argparse.ArgumentParser:
    from trimix.cli import cpt, demo, evaluate, generate, lm_eval, ls, select, serve

    parser = argparse.ArgumentParser(
        prog="trimix",
        description="Adapt LLMs to low-resource languages at test time by fusing several models' logits.",
    )
    parser.add_argument("--version", action="version", version=f"trimix {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO, -vv: DEBUG")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and results; no progress bars"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (generate, select, cpt, evaluate, demo, serve, lm_eval, ls):
        module.register(subparsers)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet or verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("trimix").setLevel(logging.INFO if not quiet and verbose == 0 else level)
    for noisy in ("transformers", "accelerate", "peft", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a job scheduler, `kill`) stops a run as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # everything after it belongs to lm-evaluation-harness
        args.lm_eval_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _setup_logging(args.verbose, args.quiet)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return int(args.func(args) or 0)
    except Interrupted as exc:  # Ctrl-C during training, checkpoint saved: interrupted, not bad input
        print(f"trimix {args.command}: interrupted: {exc}", file=sys.stderr)
        return 130
    except TrimixError as exc:
        print(f"trimix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a config built in code rather than read from a file
        print(f"trimix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the operating system refused: a full disk, a read-only folder, a bad path
        print(f"trimix {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it
        resumable = args.command in {"eval", "generate", "demo", "cpt"} and getattr(args, "output_dir", None)
        hint = (
            f"; the work finished so far is kept in {args.output_dir}: run the same command with --resume to continue"
            if resumable
            else ""
        )
        print(f"trimix {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
