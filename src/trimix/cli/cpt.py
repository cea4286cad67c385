"""``trimix cpt``: continual pretraining of the small model on raw text, LoRA or full, resumable."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from trimix.config import CptConfig, SourceConfig, format_validation_error, load_config
from trimix.errors import ConfigError
from trimix.io import read_documents, read_text
from trimix.runinfo import describe_change, fingerprint, folder_lock, prepare_output_dir, write_run_info
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
    p.add_argument(
        "--extend-vocab",
        type=int,
        metavar="N",
        help="learn N new tokens for the corpus's language and add them to the model (saves a model folder)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --output-dir"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


_CPT_FLAGS = {
    "text_field": "--text-field",
    "extend_vocab": "--extend-vocab",
    "method": "--method",
    "max_steps": "--max-steps",
    "max_tokens": "--max-tokens",
    "block_size": "--block-size",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "learning_rate": "--lr",
    "save_every": "--save-every",
    "seed": "--seed",
    "gradient_checkpointing": "--gradient-checkpointing",
    "merge": "--merge",
}


def corpus_digest(paths: list[str], text_field: str) -> str | None:
    """The corpus's content (every document of every file, in order; not the files' names or dates), so
    --resume refuses a corpus that changed since the run started. None when there is no corpus yet (the
    run then fails on that with its own message)."""
    if not paths:
        return None
    return fingerprint({"documents": [read_documents(p, text_field) for p in paths]})


def _saved_run(output_dir: str) -> dict:
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found; is {output_dir!r} a trimix cpt run?")
    saved = yaml.safe_load(read_text(path, "run config"))
    if not isinstance(saved, dict) or "cpt" not in saved or "base" not in saved:
        raise ConfigError(f"--resume: {path} is not the config of a trimix cpt run")
    return saved


def _settings(args: argparse.Namespace) -> dict:
    """The run's settings (base, cpt, device, dtype, cache_dir): from -c, --model and the flags; with
    --resume, the saved ones, and any flag or config that disagrees with them is refused."""
    saved = _saved_run(args.output_dir) if args.resume else None
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
    elif saved is not None:
        cpt_raw = dict(saved["cpt"])
        base = SourceConfig(**saved["base"])
        device, dtype = saved.get("device", "cpu"), saved.get("dtype", "float32")
    if args.model:
        base = SourceConfig(model=args.model, role="small_base")
    if base is None:
        raise ConfigError("name the base model: --model MODEL, or --config with a small_base source")
    flags = {f: getattr(args, f) for f in _CPT_FLAGS if getattr(args, f) is not None}
    cpt_raw.update(flags)
    if args.corpus:
        cpt_raw["corpus"] = args.corpus
    if args.max_tokens is not None and args.max_steps is None:
        cpt_raw["max_steps"] = None
    try:
        cpt = CptConfig(**cpt_raw)
    except ValidationError as exc:  # named by the flag that set the value, else by its cpt.* key
        named = {field: flag for field, flag in _CPT_FLAGS.items() if field in flags}
        raise ConfigError(format_validation_error(exc, "the cpt section and flags", named)) from None
    settings = {
        "base": base.model_dump(exclude_none=True),
        "cpt": cpt.model_dump(),
        "device": args.device or device,
        "dtype": dtype,
        "corpus_digest": corpus_digest(cpt.corpus, cpt.text_field),
    }
    if saved is not None:
        if "corpus_digest" not in saved:  # a run recorded before digests: its corpus cannot be checked
            logger.warning(
                "%s records no corpus digest; --resume cannot check the corpus is unchanged", args.output_dir
            )
            saved = {**saved, "corpus_digest": settings["corpus_digest"]}
        if (
            saved["corpus_digest"] != settings["corpus_digest"]
            and saved.get("cpt", {}).get("corpus") == cpt.corpus
        ):
            raise ConfigError(
                f"--resume: the corpus {', '.join(cpt.corpus)} changed since the run in {args.output_dir!r} "
                "started (same files, other content); continuing would train on a mix. Restore it, or start "
                "a new run with --overwrite"
            )
        stored = {key: saved.get(key) for key in settings}
        if changes := "; ".join(describe_change(stored, settings)):
            raise ConfigError(
                f"--resume continues the run in {args.output_dir!r} with the settings it was started with; these "
                f"differ: {changes}. Drop them to continue, or start a new run with --overwrite"
            )
    return settings | {"cache_dir": cache_dir}


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    cpt = CptConfig(**settings["cpt"])
    out_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite, resume=args.resume)
    with folder_lock(out_dir):
        recorded = {k: settings[k] for k in ("base", "cpt", "device", "dtype", "corpus_digest")}
        write_run_info(out_dir, recorded, cpt.seed, resumed=args.resume, fingerprint=fingerprint(recorded))
        report = run_cpt(
            SourceConfig(**settings["base"]),
            cpt,
            out_dir,
            dtype=settings["dtype"],
            device=settings["device"],
            cache_dir=settings["cache_dir"],
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
