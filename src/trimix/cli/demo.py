"""``trimix demo``: the complete pipeline offline on Gemma 3 270M and the bundled Uyghur data."""

from __future__ import annotations

import argparse

from trimix.demo import run_demo
from trimix.evaluation import RESUMED_FROM
from trimix.runinfo import locked_output_dir

EXAMPLE = """example:
  trimix demo                      # about 15 minutes on 2 CPU cores the first time; reruns reuse the adapters
  trimix demo --scale 4 -o runs/demo-x4    # every budget (training steps, items) four times larger
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole TriMix pipeline offline on Gemma 3 270M (CPT, selection, evaluation, report)",
        description="Gemma 3 270M from PyPI -> Uyghur CPT LoRA (small_cpt) and an English task LoRA (large) -> "
        "label-free weight selection on SIB-200 Uyghur dev -> evaluation of each source, Proxy Tuning and TriMix on "
        "topic classification, Uyghur->English translation and held-out Uyghur perplexity -> report.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", "-o", default="runs/demo")
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiply every budget (default 1: ~15 min on 2 cores)"
    )
    p.add_argument(
        "--backend",
        choices=["hf", "llama_cpp"],
        default="hf",
        help="what runs selection and evaluation: transformers (default) or llama.cpp on the quantized GGUF "
        "with the adapters merged in (pip install 'trimix[llama-cpp]')",
    )
    p.add_argument("--cache-dir", help="where conversions and adapters are cached (default ~/.cache/trimix)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an existing --output-dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a demo in --output-dir (after a kill), skipping finished items",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.scale <= 0:
        from trimix.errors import ConfigError

        raise ConfigError(f"--scale must be positive; got {args.scale}")
    with locked_output_dir(
        args.output_dir, overwrite=args.overwrite, resume=args.resume, progress_files=RESUMED_FROM
    ) as out_dir:
        print(
            run_demo(
                out_dir,
                scale=args.scale,
                cache_dir=args.cache_dir,
                progress=not args.quiet,
                resumed=args.resume,
                backend=args.backend,
            )
        )
    return 0
