"""The embedded default (Gemma 3 270M, Q4_K_M GGUF) decoded by llama.cpp against transformers, side by side.

Both backends read the same file: transformers dequantises it to float32 once (cached), llama.cpp runs
it quantized. Measured in one run, one backend after the other, on the same Uyghur prompts (SIB-200
dev), greedy, the same number of new tokens (end-of-sequence ignored):

* one source, batch 1 and 8;
* three sources fused (the file loaded three times, TriMix weights 0.1 / 0.9 / 0): the cost of a
  fusion of the demo's shape (its adapters aside: llama.cpp does not apply them yet).

Then the likelihood side, on the three fused sources: the weight search's cost (one forward per source
per prompt, then the paper's 36-point grid scored) on Uyghur prompts, and log-likelihood requests of
the demo's shape (a context under each of the 7 SIB-200 topic labels), in seconds per backend.

Printed: tokens per second of each backend, the ratio, and how many greedy tokens the two agree on
(quantized arithmetic is not the dequantized float32 model's, so they may part after a while). The
llama.cpp prompt cache is off, so every timed prefill is computed.

    python bench/llama_cpp_speed.py --new-tokens 32 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from common import machine, prompts, save

from trimix import FusedLM, load_config
from trimix.config import PAPER_GRID
from trimix.search import ScoringText

logger = logging.getLogger("bench")


def build(backend: str, roles: list[str], threads: int) -> FusedLM:
    models = []
    for role in roles:
        model = {"model": "embedded:gemma-3-270m", "role": role, "backend": backend}
        if backend == "llama_cpp":
            model["backend_options"] = {
                "n_threads": threads,
                "n_ctx": 8192,
                "n_seq_max": 16,
                "prompt_cache": 0,
            }
        models.append(model)
    if len(roles) == 1:
        fusion = {"method": "single", "role": roles[0]}
    else:
        models[0]["weight"], models[1]["weight"], models[2]["weight"] = 0.1, 0.9, 0.0
        fusion = {"method": "weighted"}
    return FusedLM.from_config(load_config({"models": models, "fusion": fusion}), load_all=True)


def run(lm: FusedLM, texts: list[str], new_tokens: int) -> tuple[float, list[list[int]]]:
    lm.generate(texts[:1], max_new_tokens=2, ignore_eos=True)  # warm-up
    start = time.perf_counter()
    out = lm.generate(texts, max_new_tokens=new_tokens, ignore_eos=True, batch_size=len(texts))
    seconds = time.perf_counter() - start
    return len(texts) * new_tokens / seconds, [g.token_ids for g in out]


LABELS = ("science/technology", "travel", "politics", "sports", "health", "entertainment", "geography")


def likelihood_costs(lm: FusedLM, texts: list[str]) -> dict[str, float]:
    """Seconds for the weight search's forward passes + grid scoring, and for log-likelihood choices."""
    grid = torch.tensor([[a, b, 1.0 - a - b] for a in PAPER_GRID for b in PAPER_GRID], dtype=torch.float32)
    start = time.perf_counter()
    items = [ScoringText(str(i), t) for i, t in enumerate(texts)]
    scorer = lm.scorer(items, roles=list(lm.pool.roles), progress=False)
    scorer.score(grid, desc="grid")
    search = time.perf_counter() - start
    requests = [(f"Text: {t}\nThe topic of the text is", f" {label}") for t in texts for label in LABELS]
    start = time.perf_counter()
    lm.loglikelihood(requests)
    return {"search": search, "loglikelihood": time.perf_counter() - start, "requests": len(requests)}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of tokens decoded identically before the two backends first part, per row."""
    same = 0
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            if s != t:
                break
            same += 1
    return same / sum(len(x) for x in a)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--search-prompts", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    print(
        f"# llama.cpp vs transformers, embedded Gemma 3 270M Q4_K_M, {args.new_tokens} new tokens — {machine()}"
    )
    print(
        f"{'sources':>8} {'batch':>6} {'hf tok/s':>10} {'llama.cpp tok/s':>16} {'ratio':>7} {'same tokens':>12}"
    )
    for roles in (["only"], ["large", "small_cpt", "small_base"]):
        models = {backend: build(backend, roles, args.threads) for backend in ("hf", "llama_cpp")}
        for batch in args.batch_sizes:
            texts = prompts(batch)
            hf_speed, hf_tokens = run(models["hf"], texts, args.new_tokens)
            cpp_speed, cpp_tokens = run(models["llama_cpp"], texts, args.new_tokens)
            same = agreement(hf_tokens, cpp_tokens)
            rows.append(
                {"sources": len(roles), "batch": batch, "hf": hf_speed, "llama_cpp": cpp_speed, "same": same}
            )
            print(
                f"{len(roles):>8} {batch:>6} {hf_speed:>10.1f} {cpp_speed:>16.1f} {cpp_speed / hf_speed:>7.2f} {same:>12.0%}"
            )
        if len(roles) == 3:
            texts = prompts(args.search_prompts)
            costs = {backend: likelihood_costs(lm, texts) for backend, lm in models.items()}
            print(f"\n{'likelihood (3 sources)':<44} {'hf s':>8} {'llama.cpp s':>12} {'ratio':>7}")
            for key, label in (
                ("search", f"weight search: {len(texts)} prompts, 36-point grid"),
                ("loglikelihood", f"log-likelihood: {costs['hf']['requests']} requests (7 labels each)"),
            ):
                hf_s, cpp_s = costs["hf"][key], costs["llama_cpp"][key]
                print(f"{label:<44} {hf_s:>8.1f} {cpp_s:>12.1f} {hf_s / cpp_s:>7.2f}")
            rows.append({"likelihood": costs})
        del models
    save(args.json, {"machine": machine(), "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
