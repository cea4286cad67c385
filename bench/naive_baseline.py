"""Cached, batched fused decoding vs a naive fused decoder that keeps no KV cache, side by side in one run.

The naive decoder (trimix.decoding.reference) recomputes every source's whole sequence at every
step, as research code does for some families. Both produce the same tokens (asserted here); the
script prints our speedup at each number of new tokens.

    python bench/naive_baseline.py --model tiny --new-tokens 64 256
    python bench/naive_baseline.py --model gemma --new-tokens 64 --batch-size 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from common import fused, load_trio, machine, prompts, save

from trimix import GenerationConfig
from trimix.decoding.reference import generate_without_cache


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    lm = fused(load_trio(args.model, args.device), (0.1, 0.9, 0.0))
    batch = prompts(args.batch_size)
    print(f"# cached vs no-cache fused decoding, {args.model} trio, batch {args.batch_size} — {machine()}")
    print(f"{'new tokens':>10} {'cached s':>9} {'no-cache s':>10} {'speedup':>8}")
    rows = []
    for new_tokens in args.new_tokens:
        gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, batch_size=args.batch_size)
        lm.generate(batch[:1], gen.model_copy(update={"max_new_tokens": 2}))  # warm-up
        start = time.perf_counter()
        cached = [g.token_ids for g in lm.generate(batch, gen)]
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        naive = generate_without_cache(lm, batch, gen)
        naive_s = time.perf_counter() - start
        same = cached == naive
        print(
            f"{new_tokens:>10} {cached_s:>9.2f} {naive_s:>10.2f} {naive_s / cached_s:>7.1f}x"
            f"{'' if same else '  (outputs differ!)'}"
        )
        rows.append(
            {
                "new_tokens": new_tokens,
                "cached_seconds": cached_s,
                "naive_seconds": naive_s,
                "speedup": naive_s / cached_s,
                "same_tokens": same,
            }
        )
    save(args.json, {"model": args.model, "batch": args.batch_size, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
