"""``trimix generate``: fused decoding of prompts from arguments, a file or stdin, written as JSONL."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trimix.cli.common import add_config_args, config_from_args, read_prompts
from trimix.decoding import FusedLM
from trimix.runinfo import prepare_output_dir, write_run_info

logger = logging.getLogger(__name__)

EXAMPLE = """example:
  trimix generate -c configs/gemma3_270m_demo_generate.yaml --prompt "Hello" --max-new-tokens 16
  trimix generate -c configs/qwen25_uyghur.yaml --weights-from runs/select/selection.json \\
      --prompts-file prompts.jsonl --output-dir runs/gen
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with fused sources",
        description="Generate text whose every token comes from the weighted sum of the sources' logits.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument(
        "--prompts-file", "-f", help="a .txt file (one prompt per line) or .jsonl with a 'prompt' field"
    )
    p.add_argument("--output-dir", "-o", help="write generations.jsonl, config.yaml and run.json here")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output-dir")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--inspect", type=int, dest="inspect_top_k", help="record each source's top-K candidates per token"
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fields = (
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "batch_size",
        "inspect_top_k",
    )
    extra = {f"generation.{f}": getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.stop:
        extra["generation.stop"] = args.stop
    config = config_from_args(args, extra)
    prompts = read_prompts(args.prompt, args.prompts_file)
    out_dir = prepare_output_dir(args.output_dir, overwrite=args.overwrite) if args.output_dir else None
    if out_dir is not None:
        write_run_info(out_dir, config, config.generation.seed)
    lm = FusedLM.from_config(config)
    texts = [p["prompt"] for p in prompts]
    if args.stream:
        for event in lm.stream(texts, config.generation):
            if len(texts) == 1:
                sys.stdout.write(event.text + ("\n" if event.finished else ""))
            else:
                print(
                    json.dumps(
                        {"id": prompts[event.index]["id"], "text": event.text, "finished": event.finished}
                    )
                )
            sys.stdout.flush()
        return 0
    sink = (out_dir / "generations.jsonl").open("w", encoding="utf-8") if out_dir else None
    try:
        generations = lm.generate(texts, config.generation, progress=not args.quiet)
        for prompt, generation in zip(prompts, generations, strict=True):
            line = json.dumps({"id": prompt["id"], **generation.to_dict()}, ensure_ascii=False)
            print(line)
            if sink:
                sink.write(line + "\n")
    finally:
        if sink:
            sink.close()
    if out_dir:
        logger.info("wrote %s", Path(out_dir) / "generations.jsonl")
    return 0
