"""Log-likelihood scoring of a multiple-choice item with and without the shared-prefix cache.

An item is one prompt followed by each answer option; the options share the whole prompt. Side by
side on the same item: every option run whole (one forward per source per option) vs the prompt run
once per source and the options continued from its KV cache in one padded batch. Both score every
option under two fusions; the script prints the two times, their ratio and the largest relative
difference in the options' NLLs.

    python bench/shared_prefix.py --model tiny
    python bench/shared_prefix.py --model gemma --shots 2
"""

from __future__ import annotations

import argparse
import time

import torch
from common import load_trio, machine, save

from trimix.search import FusedPerplexityScorer, ScoringText
from trimix.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument(
        "--items", type=int, default=2, help="SIB-200 Uyghur test items, each timed both ways"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()

    sources = load_trio(args.model, args.device)
    vocab = len(sources[0].tokenizer)
    task = get_task("sib200_topic", "uig_Arab", n_shots=args.shots)
    weights = torch.tensor([[0.1, 0.9, 0.0], [1.0, 1.0, -1.0]])  # TriMix (paper) and Proxy Tuning

    def score(texts: list[ScoringText], share: bool) -> tuple[float, torch.Tensor, int]:
        start = time.perf_counter()
        scorer = FusedPerplexityScorer(sources, vocab, texts, progress=False, share_prefix=share)
        nll = scorer.score(weights).per_text
        return time.perf_counter() - start, nll, scorer.shared_prefix_tokens

    whole_s = shared_s = 0.0
    worst, prefix_tokens, total_tokens = 0.0, 0, 0
    for example in task.examples("test")[: args.items]:
        prompt = task.render(example).text
        texts = [ScoringText(c, f"{prompt} {c}", len(prompt)) for c in example.choices]
        score(texts, share=False)  # warm-up, and the once-per-model output-head check
        t_whole, nll_whole, _ = score(texts, share=False)
        t_shared, nll_shared, prefix = score(texts, share=True)
        whole_s, shared_s = whole_s + t_whole, shared_s + t_shared
        worst = max(worst, float(((nll_shared - nll_whole).abs() / nll_whole.abs()).max()))
        prefix_tokens += prefix
        total_tokens += sum(len(sources[0].tokenizer(t.text)["input_ids"]) for t in texts)

    n_items = min(args.items, len(task.examples("test")))
    print(
        f"# log-likelihood items, {args.model} trio, {args.shots}-shot SIB-200 topic, {n_items} items — {machine()}"
    )
    print(f"options run whole           {whole_s:8.2f} s  ({total_tokens} tokens through each source)")
    print(
        f"shared-prefix cache         {shared_s:8.2f} s  (prompt of ~{prefix_tokens // max(n_items, 1)} tokens "
        f"run once per item)   speedup {whole_s / shared_s:.1f}x"
    )
    print(f"largest relative difference in the options' NLLs: {worst:.1e}")
    save(
        args.json,
        {
            "model": args.model,
            "machine": machine(),
            "items": n_items,
            "whole_seconds": whole_s,
            "shared_prefix_seconds": shared_s,
            "speedup": whole_s / shared_s,
            "max_relative_difference": worst,
        },
    )


if __name__ == "__main__":
    main()
