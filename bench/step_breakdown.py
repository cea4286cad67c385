"""Where a fused decoding step spends its time: each source's forward, the fusion, token choice, the rest.

Timers wrap the sources' forward calls, the fusion (``fused_scores``) and the token choice
(``TokenChooser.__call__``) for one run of
fused greedy decoding; "bookkeeping" is the remainder of the wall time (tokenisation, masks, cache
row selection, stop checks, Python).

    python bench/step_breakdown.py --model tiny --batch-size 8
    python bench/step_breakdown.py --model gemma --batch-size 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from common import fused, load_trio, machine, prompts, save

from trimix import GenerationConfig
from trimix.decoding import engine, sampling

totals: dict[str, float] = defaultdict(float)


@contextmanager
def timed(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        totals[name] += time.perf_counter() - start


def wrap(owner, attribute: str, name: str) -> None:
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        with timed(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    sources = load_trio(args.model, args.device)
    lm = fused(sources, (0.3, 0.9, -0.2))  # all three run
    batch = prompts(args.batch_size)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=args.batch_size)
    lm.generate(batch, gen.model_copy(update={"max_new_tokens": 2}))  # warm-up
    for source in sources:
        wrap(source.model, "forward", f"forward {source.role}")
    wrap(engine, "fused_scores", "fusion (weighted sum, mask)")
    wrap(sampling.TokenChooser, "__call__", "token choice")
    start = time.perf_counter()
    lm.generate(batch, gen)
    wall = time.perf_counter() - start
    accounted = sum(totals.values())
    totals["bookkeeping (rest)"] = wall - accounted
    print(
        f"# per-step breakdown, {args.model} trio, batch {args.batch_size}, {args.new_tokens} new tokens "
        f"(prefill included in the forwards) — {machine()}"
    )
    for name, seconds in totals.items():
        print(
            f"{name:<30} {seconds:8.3f} s  {100 * seconds / wall:5.1f} %  {1000 * seconds / args.new_tokens:8.2f} ms/step"
        )
    print(f"{'total':<30} {wall:8.3f} s")
    save(
        args.json,
        {
            "model": args.model,
            "batch": args.batch_size,
            "new_tokens": args.new_tokens,
            "machine": machine(),
            "seconds": dict(totals),
            "wall": wall,
        },
    )


if __name__ == "__main__":
    main()
