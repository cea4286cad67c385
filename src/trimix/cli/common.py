"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from trimix.config import TrimixConfig, load_config, parse_weights_arg, read_selected_weights
from trimix.errors import ConfigError, DataError
from trimix.fusion import METHODS


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config plus the overrides of the fusion every model-using command accepts."""
    parser.add_argument("--config", "-c", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--weights", help="explicit weights, e.g. large=0.1,small_cpt=0.9,small_base=0.0")
    parser.add_argument("--weights-from", help="the selection.json written by `trimix select`")
    parser.add_argument("--method", choices=list(METHODS), help="fusion method (see `trimix ls methods`)")
    parser.add_argument("--role", help="with --method single: the source to use")
    parser.add_argument("--device", help="run-level device (e.g. cpu, cuda:0)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="run-level dtype")


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> TrimixConfig:
    """Load --config and apply the command-line overrides (one flag overrides one field)."""
    overrides: dict[str, Any] = dict(extra or {})
    if args.method:
        overrides["fusion.method"] = args.method
    if args.role:
        overrides["fusion.role"] = args.role
    if args.device:
        overrides["device"] = args.device
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.weights and args.weights_from:
        raise ConfigError("pass either --weights or --weights-from, not both")
    weights = None
    if args.weights:
        weights = parse_weights_arg(args.weights)
    elif args.weights_from:
        weights = read_selected_weights(args.weights_from)
    return load_config(args.config, overrides=overrides, weights=weights)


def read_prompts(texts: list[str] | None, file: str | None) -> list[dict[str, Any]]:
    """Prompts from --prompt arguments, a text/JSONL file, or stdin; each as {"id", "prompt"}."""
    if texts:
        return [{"id": i, "prompt": t} for i, t in enumerate(texts)]
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"prompts file {file!r} does not exist")
        return _parse_prompt_lines(
            path.read_text(encoding="utf-8").splitlines(), file, path.suffix == ".jsonl"
        )
    if sys.stdin is None or sys.stdin.isatty():
        raise DataError(
            "no prompts: pass --prompt TEXT, --prompts-file FILE (.txt or .jsonl), or pipe text on stdin"
        )
    return _parse_prompt_lines(sys.stdin.read().splitlines(), "<stdin>", jsonl=False)


def _parse_prompt_lines(lines: list[str], origin: str, jsonl: bool) -> list[dict[str, Any]]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append({"id": len(prompts), "prompt": line.replace("\\n", "\n")})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{origin}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DataError(f'{origin}:{number}: each line needs a string field "prompt"')
        prompts.append({"id": row.get("id", len(prompts)), "prompt": row["prompt"]})
    if not prompts:
        raise DataError(f"{origin} holds no prompts")
    return prompts
