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
from trimix.io import decode_stdin, read_text


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config plus the overrides of the fusion every model-using command accepts."""
    parser.add_argument("--config", "-c", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--weights", help="explicit weights, e.g. large=0.1,small_cpt=0.9,small_base=0.0")
    parser.add_argument("--weights-from", help="the selection.json written by `trimix select`")
    parser.add_argument("--method", choices=list(METHODS), help="fusion method (see `trimix ls methods`)")
    parser.add_argument("--role", help="with --method single: the source to use")
    parser.add_argument("--device", help="run-level device (e.g. cpu, cuda:0)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="run-level dtype")


# Overridden fields whose flag is not named after the field's last part.
FLAG_NAMES = {"generation.inspect_top_k": "--inspect", "generation.speculative.k": "--speculative"}


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
    # Errors about a value a flag set name the flag (generation.max_new_tokens -> --max-new-tokens).
    flags = {key: FLAG_NAMES.get(key, "--" + key.split(".")[-1].replace("_", "-")) for key in overrides}
    return load_config(args.config, overrides=overrides, weights=weights, flags=flags)


def read_prompts(texts: list[str] | None, file: str | None) -> list[dict[str, Any]]:
    """Prompts from --prompt arguments, a text/JSONL file, or stdin; each as {"id", "prompt", "index"}
    (``index``: its position, which keys its sampling noise, so a resumed run samples as an unbroken one)."""
    if texts:
        for i, t in enumerate(texts):
            _check_encodable(t, f"--prompt number {i + 1}")
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise DataError(
                f"--prompt number {blank[0] + 1} is blank; give some text (a file or stdin skips blank lines)"
            )
        return [{"id": i, "prompt": t, "index": i} for i, t in enumerate(texts)]
    if file:
        text = read_text(file, "prompts file")
        return _parse_prompt_lines(text.splitlines(), file, Path(file).suffix == ".jsonl")
    if sys.stdin is None or sys.stdin.isatty():
        raise DataError(
            "no prompts: pass --prompt TEXT, --prompts-file FILE (.txt or .jsonl), or pipe text on stdin"
        )
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    return _parse_prompt_lines(decode_stdin(raw).splitlines(), "<stdin>", jsonl=False)


def _check_encodable(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate from a JSON escape, or bytes the shell could
    not decode as UTF-8): no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where} is not valid Unicode text (character {exc.start}: {text[exc.start]!r}, a lone surrogate "
            "or undecodable byte); give UTF-8 text"
        ) from None


def _parse_prompt_lines(lines: list[str], origin: str, jsonl: bool) -> list[dict[str, Any]]:
    prompts = []
    seen: dict[str, int] = {}  # id -> the line that gave it
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
        _check_encodable(row["prompt"], f"{origin}:{number}")
        key = str(row.get("id", len(prompts)))
        if key in seen:
            raise DataError(
                f"{origin}:{number}: prompt id {key!r} repeats line {seen[key]}; ids must be unique (results "
                "are keyed by them)"
            )
        seen[key] = number
        prompts.append({"id": row.get("id", len(prompts)), "prompt": row["prompt"]})
    if not prompts:
        raise DataError(f"{origin} holds no prompts")
    for index, prompt in enumerate(prompts):
        prompt["index"] = index
    ids = [str(p["id"]) for p in prompts]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise DataError(
            f"{origin}: prompt ids must be unique (results are keyed by them); {duplicated[:5]} repeat"
        )
    return prompts
