"""Fused decoding throughput vs the ideal 1 / sum(1 / tps_i), measured side by side in one run.

tps_i is source i decoding alone with its KV cache (through trimix with weight 1, and through
`model.generate` for reference) on the same prompts, batch size and number of new tokens. The fused
run decodes the TriMix mix of all three. A ratio of 1.0 means fusion adds no cost beyond running
the sources; the target is >= 0.9.

    python bench/decode_throughput.py --model tiny --batch-sizes 1 8
    python bench/decode_throughput.py --model gemma --batch-sizes 1 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from common import best_time, fused, load_trio, machine, prompts, save

from trimix import GenerationConfig


def hf_generate_time(source, batch: list[str], new_tokens: int, repeats: int) -> float:
    tok = source.tokenizer
    enc = tok(batch, return_tensors="pt", padding=True, padding_side="left").to(source.input_device)

    def run() -> None:
        with torch.inference_mode():
            source.model.generate(
                **enc,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    return best_time(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    sources = load_trio(args.model, args.device)
    # Weights under which all three sources run (a weight of 0 would leave small_base out and flatter
    # the ratio); the cost of a step does not depend on the weights' values.
    weights = (0.3, 0.9, -0.2)
    mix = fused(sources, weights)
    rows = []
    print(f"# decode throughput, {args.model} trio, {args.new_tokens} new tokens, greedy — {machine()}")
    header = (
        f"{'batch':>5} {'source':>10} {'tps trimix':>11} {'tps HF gen':>11}   {'fused tps':>9} "
        f"{'ideal':>8} {'ratio':>6} {'ratio vs HF':>11} {'vs batch 1':>10}"
    )
    print(header)
    for batch_size in args.batch_sizes:
        batch = prompts(batch_size)
        gen = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, batch_size=batch_size)
        n_tokens = batch_size * args.new_tokens
        alone, alone_hf = {}, {}
        for source in sources:
            single = fused([source], (1.0,))
            alone[source.role] = n_tokens / best_time(
                lambda s=single, b=batch, g=gen: s.generate(b, g), args.repeats
            )
            alone_hf[source.role] = n_tokens / hf_generate_time(source, batch, args.new_tokens, args.repeats)
        fused_tps = n_tokens / best_time(lambda b=batch, g=gen: mix.generate(b, g), args.repeats)
        ideal = 1.0 / sum(1.0 / t for t in alone.values())
        ideal_hf = 1.0 / sum(1.0 / t for t in alone_hf.values())
        first_fused = rows[0]["fused_tps"] if rows else fused_tps
        for role in alone:
            print(f"{batch_size:>5} {role:>10} {alone[role]:>11.1f} {alone_hf[role]:>11.1f}")
        print(
            f"{batch_size:>5} {'fused':>10} {'':>11} {'':>11}   {fused_tps:>9.1f} {ideal:>8.1f} "
            f"{fused_tps / ideal:>6.3f} {fused_tps / ideal_hf:>11.3f} {fused_tps / first_fused:>9.2f}x"
        )
        rows.append(
            {
                "batch": batch_size,
                "alone_tps": alone,
                "alone_hf_generate_tps": alone_hf,
                "fused_tps": fused_tps,
                "ideal_tps": ideal,
                "ratio": fused_tps / ideal,
                "ratio_vs_hf_generate": fused_tps / ideal_hf,
                "fused_vs_first_batch": fused_tps / first_fused,
            }
        )
    print(
        f"weights {weights}; ratio = fused / ideal over trimix-alone runs; vs HF = over model.generate runs"
    )
    save(args.json, {"model": args.model, "new_tokens": args.new_tokens, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
