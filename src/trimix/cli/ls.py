"""``trimix ls``: what trimix knows by name (tasks, metrics, embedded models, bundled languages)."""

from __future__ import annotations

import argparse

from trimix.backends.locations import EMBEDDED_MODELS
from trimix.data import sib200_languages
from trimix.fusion import METHODS
from trimix.metrics import CORPUS_METRICS
from trimix.tasks import TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ls",
        help="list tasks, fusion methods, metrics, embedded models or bundled languages",
        epilog="example:\n  trimix ls tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", choices=["tasks", "methods", "metrics", "models", "languages"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.what == "tasks":
        for name, cls in sorted(TASKS.items()):
            print(f"{name:<30} {cls.description}")
    elif args.what == "methods":
        for name, method in METHODS.items():
            roles = f" (roles: {', '.join(method.required_roles)})" if method.required_roles else ""
            print(f"{name:<14} {method.summary}{roles}")
    elif args.what == "metrics":
        for name in ["accuracy", *sorted(CORPUS_METRICS), "perplexity", "bits_per_byte"]:
            print(name)
    elif args.what == "models":
        for name in EMBEDDED_MODELS:
            print(f"embedded:{name}")
    else:
        print(" ".join(sib200_languages()))
    return 0
