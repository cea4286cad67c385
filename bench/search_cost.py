"""Weight-search cost, measured side by side in one run.

1. time: the 36-combination search (forwards + fused scoring) vs the sources' plain forward passes
   (full logits, as any perplexity evaluation runs them) on the same prompts; target <= 1.3.
2. memory: the peak extra memory of scoring 36 vs 400 combinations (a 20 x 20 grid) on the same
   prompts; target: flat (ratio about 1).

    python bench/search_cost.py --model tiny
    python bench/search_cost.py --model gemma --n-prompts 8 --shots 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

import psutil
import torch
from common import FINE_GRID, load_trio, machine, save, weight_matrix

from trimix.config import SearchConfig
from trimix.search import FusedPerplexityScorer, selection_texts


class PeakMemory:
    """Peak memory above the starting point while the block runs (RSS sampled on CPU; allocator on GPU)."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.process = psutil.Process()
            self.start = self.process.memory_info().rss
            self.peak = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.extra = self.peak - self.start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--n-prompts", type=int, default=20)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-mb", type=int, default=SearchConfig().chunk_mb, help="scoring memory budget")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="time each side this many times, interleaved; report the fastest",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    sources = load_trio(args.model, args.device)
    roles = [s.role for s in sources]
    vocab = len(sources[0].tokenizer)
    search = SearchConfig(task="sib200_topic", lang="uig_Arab", n_prompts=args.n_prompts, shots=args.shots)
    texts, _ = selection_texts(search)
    encoded = [sources[0].tokenizer(t.text, return_tensors="pt")["input_ids"] for t in texts]
    n_tokens = sum(int(e.numel()) for e in encoded)

    def forwards_alone() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in encoded:
                for s in sources:
                    s.model(input_ids=ids.to(s.input_device)).logits.float()
        return time.perf_counter() - start

    grid36 = weight_matrix(search, roles)

    def search36(share_prefix: bool = False) -> tuple[float, FusedPerplexityScorer]:
        # Like for like by default: every prompt runs whole, as the plain forwards do.
        start = time.perf_counter()
        scorer = FusedPerplexityScorer(
            sources,
            vocab,
            texts,
            chunk_bytes=args.chunk_mb * 2**20,
            progress=False,
            share_prefix=share_prefix,
        )
        scorer.score(grid36)
        return time.perf_counter() - start, scorer

    forwards_alone()  # warm-up
    # Interleaved and min-of-N on both sides, so a noisy neighbour slows neither side alone.
    forward_runs, search_runs = [], []
    for _ in range(max(1, args.repeats)):
        forward_runs.append(forwards_alone())
        seconds, scorer = search36()
        search_runs.append(seconds)
    forward_seconds, search_seconds = min(forward_runs), min(search_runs)
    ratios = sorted(s / f for s, f in zip(search_runs, forward_runs, strict=True))

    grid400 = weight_matrix(FINE_GRID, roles)
    with PeakMemory() as mem36:
        scorer.score(grid36)
    with PeakMemory() as mem400:
        start400 = time.perf_counter()
        scorer.score(grid400)
        seconds400 = time.perf_counter() - start400

    print(f"# weight-search cost, {args.model} trio, {len(texts)} prompts, {n_tokens} tokens — {machine()}")
    print(f"sources' forward passes alone          {forward_seconds:8.2f} s")
    print(
        f"search of {len(grid36)} combinations (forwards+scoring) {search_seconds:8.2f} s   "
        f"ratio {search_seconds / forward_seconds:.3f}  (target <= 1.3; fastest of {len(ratios)} each; "
        f"per-repeat ratios {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(f"  of which decoder forwards              {scorer.forward_seconds:8.2f} s")
    shared_seconds, shared = search36(share_prefix=True)
    print(
        f"same search, shared-prefix cache on (the default; {shared.shared_prefix_tokens} shared tokens) "
        f"{shared_seconds:8.2f} s   ratio {shared_seconds / forward_seconds:.3f}  (one run)"
    )
    print(f"scoring {len(grid400)} combinations (no forwards)  {seconds400:8.2f} s")
    print(f"peak extra memory, {len(grid36)} combinations       {mem36.extra / 2**20:8.1f} MiB")
    small = max(mem36.extra, mem400.extra) < 16 * 2**20  # below what RSS sampling can resolve
    memory_ratio = (
        "n/a (both under 16 MiB: allocator noise)" if small else f"{mem400.extra / max(mem36.extra, 1):.3f}"
    )
    print(
        f"peak extra memory, {len(grid400)} combinations      {mem400.extra / 2**20:8.1f} MiB   "
        f"ratio {memory_ratio}  (target: flat)"
    )
    save(
        args.json,
        {
            "model": args.model,
            "machine": machine(),
            "prompts": len(texts),
            "tokens": n_tokens,
            "forward_seconds": forward_seconds,
            "search_seconds": search_seconds,
            "time_ratio": search_seconds / forward_seconds,
            "time_ratios_per_repeat": ratios,
            "shared_prefix_tokens": shared.shared_prefix_tokens,
            "shared_prefix_search_seconds": shared_seconds,
            "chunk_mb": args.chunk_mb,
            "scoring_400_seconds": seconds400,
            "peak_mib_36": mem36.extra / 2**20,
            "peak_mib_400": mem400.extra / 2**20,
            "memory_ratio": mem400.extra / max(mem36.extra, 1),
        },
    )


if __name__ == "__main__":
    main()
