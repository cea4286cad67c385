"""``trimix cpt``: continual pretraining of the small model on raw text, LoRA or full, resumable."""

from __future__ import annotations

import argparse
import json
import logging

import yaml

from trimix.config import CptConfig, SourceConfig, load_config
from trimix.errors import ConfigError
from trimix.runinfo import prepare_output_dir, write_run_info
from trimix.training import run_cpt

logger = logging.getLogger(__name__)

EXAMPLE = """example:
  trimix cpt --model embedded:gemma-3-270m --corpus src/trimix/data/corpora/uig_udt.txt \\
      --max-steps 60 -o runs/cpt-uig
  trimix cpt -o runs/cpt-uig --resume          # after Ctrl-C: continue where it stopped
  # then, in a run config: {model: runs/cpt-uig/adapter, role: small_cpt}
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cpt",
        help="continually pretrain the small model on raw text (LoRA by default)",
        description="Train the small model on raw low-resource-language text and save a source for fusion.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", "-c", help="run config: the `cpt` section and the source with role cpt.base_role"
    )
    p.add_argument("--model", help="the base model (overrides the config's source)")
    p.add_argument(
        "--corpus", action="append", help="a .txt (one document per line) or .jsonl file; repeatable"
    )
    p.add_argument("--text-field", help="JSONL field holding the text (default: text)")
    p.add_argument("--method", choices=["lora", "full"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument(
        "--merge", action="store_true", default=None, help="save the merged model instead of the adapter"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> tuple[SourceConfig, CptConfig, str, str | None, str]:
    saved = None
    if args.resume and not args.config:
        path = f"{args.output_dir}/config.yaml"
        try:
            with open(path, encoding="utf-8") as handle:
                saved = yaml.safe_load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"--resume: {path} not found; is {args.output_dir!r} a trimix cpt run?"
            ) from exc
        return (
            SourceConfig(**saved["base"]),
            CptConfig(**saved["cpt"]),
            saved.get("device", "cpu"),
            None,
            saved.get("dtype", "float32"),
        )
    cpt_raw: dict = {}
    base = None
    device, cache_dir, dtype = "cpu", None, "float32"
    if args.config:
        config = load_config(args.config)
        cpt_raw = config.cpt.model_dump()
        roles = [m.role for m in config.models]
        if args.model is None:
            if config.cpt.base_role not in roles:
                raise ConfigError(
                    f"cpt.base_role {config.cpt.base_role!r} is not a source; roles are {roles}"
                )
            base = config.source(config.cpt.base_role)
        device, cache_dir = config.device, config.cache_dir
        dtype = base.dtype if base is not None and base.dtype else config.dtype
    if args.model:
        base = SourceConfig(model=args.model, role="small_base")
    if base is None:
        raise ConfigError("name the base model: --model MODEL, or --config with a small_base source")
    fields = (
        "text_field",
        "method",
        "max_steps",
        "max_tokens",
        "block_size",
        "batch_size",
        "grad_accum",
        "learning_rate",
        "save_every",
        "seed",
        "gradient_checkpointing",
        "merge",
    )
    cpt_raw.update({f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    if args.corpus:
        cpt_raw["corpus"] = args.corpus
    if args.max_tokens is not None and args.max_steps is None:
        cpt_raw["max_steps"] = None
    try:
        cpt = CptConfig(**cpt_raw)
    except ValueError as exc:
        raise ConfigError(f"invalid cpt setting: {exc}") from exc
    return base, cpt, args.device or device, cache_dir, dtype


def run(args: argparse.Namespace) -> int:
    base, cpt, device, cache_dir, dtype = _settings(args)
    out_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite, resume=args.resume)
    if not args.resume:
        write_run_info(
            out_dir,
            {
                "base": base.model_dump(exclude_none=True),
                "cpt": cpt.model_dump(),
                "device": device,
                "dtype": dtype,
            },
            cpt.seed,
        )
    report = run_cpt(
        base,
        cpt,
        out_dir,
        dtype=dtype,
        device=device,
        cache_dir=cache_dir,
        resume=args.resume,
        progress=not args.quiet,
    )
    summary = {
        "output": report.output,
        "steps": report.steps,
        "tokens": report.tokens_seen,
        "wall_seconds": round(report.wall_seconds, 1),
        "perplexity_before": report.perplexity_before,
        "perplexity_after": report.perplexity_after,
    }
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
