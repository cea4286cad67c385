"""Does lower dev perplexity mean a better task score? Rank every grid candidate both ways and correlate.

For one task and language (default: SIB-200 topic classification in Uyghur, the demo's task), every
candidate of the paper's 6 x 6 grid (small_base derived) is scored

* by the fused perplexity of unlabeled dev prompts, scoring the whole prompt and scoring only the
  task's own text (the label-free selection criterion, both modes from one forward pass), and
* by accuracy on test items, choosing the label with the highest fused log-likelihood (every
  candidate from one forward pass per source per item; no generation).

It prints Spearman's rank correlation between "lower perplexity" and "higher accuracy" across the
candidates, with a bootstrap 95% interval that resamples dev prompts and test items together. A
positive correlation whose interval excludes zero supports selecting by perplexity at this scale.

    python bench/selection_study.py --model gemma             # the demo's trio (trains its adapters if missing)
    python bench/selection_study.py --model tiny --test-items 40
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import demo_trio

from trimix import Fusion
from trimix.config import SearchConfig
from trimix.search import build_candidates, selection_texts
from trimix.tasks import get_task

logger = logging.getLogger("bench")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties)."""

    def ranks(v: np.ndarray) -> np.ndarray:
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # average the ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    a, b = ranks(x), ranks(y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="gemma")
    parser.add_argument("--task", default="sib200_topic")
    parser.add_argument("--lang", default="uig_Arab")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--dev-prompts", type=int, default=12)
    parser.add_argument("--test-items", type=int, default=60)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--plot", help="write a scatter plot (PNG) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start = time.perf_counter()

    lm = demo_trio(args.model, method="proxy_tuning", weights={})
    roles = ["large", "small_cpt", "small_base"]
    search = SearchConfig(
        task=args.task, lang=args.lang, shots=args.shots, n_prompts=args.dev_prompts, seed=args.seed
    )
    points, _ = build_candidates(search, roles)
    weights = torch.tensor([[p[r] for r in roles] for p in points])

    texts, _ = selection_texts(search)
    totals = lm.scorer(texts, roles=roles, progress=False).score(weights)
    per_text = totals.per_text_group.numpy()  # (texts, 2, C): template and task-text NLL
    tokens = np.array(
        [
            [int((e.groups == g).sum()) for g in (0, 1)]
            for e in lm.scorer(texts, roles=roles, progress=False).encoded
        ]
    )  # (texts, 2)

    task = get_task(args.task, args.lang, n_shots=args.shots)
    items = task.examples("test")
    rng = np.random.default_rng(args.seed)
    items = [
        items[i] for i in sorted(rng.choice(len(items), min(args.test_items, len(items)), replace=False))
    ]
    fusions = [Fusion(p, "trimix") for p in points]
    correct = np.zeros((len(items), len(points)), dtype=bool)
    for i, example in enumerate(items):
        prompt = task.render(example).text
        results = lm.loglikelihood_by_fusion([(prompt, f" {c}") for c in example.choices], fusions)
        for c, per_option in enumerate(results):
            best = max(range(len(example.choices)), key=lambda k: per_option[k].logprob)
            correct[i, c] = task.is_correct(example.choices[best], example)

    def figures(text_idx: np.ndarray, item_idx: np.ndarray) -> dict[str, float]:
        nll = per_text[text_idx].sum(0)  # (2, C)
        count = tokens[text_idx].sum(0)  # (2,)
        ppl_prompt = np.exp(nll.sum(0) / count.sum())
        ppl_text = np.exp(nll[1] / max(count[1], 1))
        accuracy = correct[item_idx].mean(0)
        return {"prompt": spearman(-ppl_prompt, accuracy), "text": spearman(-ppl_text, accuracy)}

    observed = figures(np.arange(len(texts)), np.arange(len(items)))
    draws = {"prompt": [], "text": []}
    for _ in range(args.resamples):
        got = figures(rng.integers(0, len(texts), len(texts)), rng.integers(0, len(items), len(items)))
        for mode in draws:
            draws[mode].append(got[mode])
    intervals = {
        m: [float(np.nanquantile(v, 0.025)), float(np.nanquantile(v, 0.975))] for m, v in draws.items()
    }
    nll_all = per_text.sum(0)
    ppl_prompt = np.exp(nll_all.sum(0) / tokens.sum())
    ppl_text = np.exp(nll_all[1] / tokens[:, 1].sum())
    accuracy = 100 * correct.mean(0)
    best_by = {
        "prompt": points[int(ppl_prompt.argmin())],
        "text": points[int(ppl_text.argmin())],
        "test accuracy (oracle)": points[int(accuracy.argmax())],
    }
    print(f"# selection study: {args.task} {args.lang}, {args.model} trio, {len(points)} grid candidates")
    print(
        f"# dev prompts {len(texts)} ({int(tokens[:, 0].sum())} template + {int(tokens[:, 1].sum())} task-text tokens)"
    )
    print(f"# test items {len(items)} (label log-likelihood accuracy)")
    for mode, label in (("prompt", "whole prompt"), ("text", "task text only")):
        low, high = intervals[mode]
        print(
            f"Spearman(lower dev ppl [{label}], higher test acc) = {observed[mode]:.3f}  [95% CI {low:.3f}, {high:.3f}]"
        )
    for name, point in best_by.items():
        i = points.index(point)
        print(
            f"best by {name:<24} a={point['large']:g} b={point['small_cpt']:g}: test acc {accuracy[i]:.1f}%"
        )
    print(
        f"accuracy over the grid: min {accuracy.min():.1f}%, max {accuracy.max():.1f}%; {time.perf_counter() - start:.0f} s"
    )
    payload = {
        "args": vars(args),
        "candidates": [
            {"weights": p, "dev_ppl_prompt": float(a), "dev_ppl_text": float(b), "test_accuracy": float(c)}
            for p, a, b, c in zip(points, ppl_prompt, ppl_text, accuracy, strict=True)
        ],
        "spearman": observed,
        "interval_95": intervals,
        "best": best_by,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        for ax, values, label in (
            (axes[0], ppl_prompt, "whole prompt"),
            (axes[1], ppl_text, "task text only"),
        ):
            ax.scatter(values, accuracy, s=14)
            ax.set_xlabel(f"dev perplexity, {label} (lower: selected)")
            mode = "prompt" if label == "whole prompt" else "text"
            ax.set_title(
                f"rho = {observed[mode]:.2f} [{intervals[mode][0]:.2f}, {intervals[mode][1]:.2f}]", fontsize=9
            )
        axes[0].set_ylabel("test accuracy (%)")
        fig.suptitle(f"{args.task} {args.lang}: {len(points)} TriMix weight candidates", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
