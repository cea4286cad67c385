"""Speculative fusion vs plain fused decoding, side by side in one run, with the accounting behind it.

On the embedded default trio as `trimix demo` builds it (small_cpt: the Uyghur CPT LoRA; large: the
English-task LoRA; small_base: Gemma 3 270M; the adapters are trained once and cached), greedy, on
Uyghur and English prompts from the bundled SIB-200 data:

* tokens/s of plain fused decoding and of speculative fusion (the largest-weight source drafts k
  tokens, the others verify them in one forward), at batch 1 and 8, and whether the outputs are identical;
* mean accepted length, acceptance rate and acceptance per draft position;
* the cost of one draft step (the drafter's one-token forward) and of one k-token verify step (a
  verifier's forward over k + 1 tokens), and the speed that follows from them and the acceptance:
  per round, k + 1 draft steps and one verify step per other source yield (accepted + 1) tokens.

    python bench/speculative.py                          # paper weights 0.1/0.9 and the demo's selections
    python bench/speculative.py --model tiny --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import best_time, demo_trio

from trimix import FusedLM, GenerationConfig
from trimix.data import UYGHUR_CORPUS, read_sib200

logger = logging.getLogger("bench")


def prompts(lang: str, n: int) -> list[str]:
    """The first half of SIB-200 dev sentences: the model continues real text of the language."""
    rows = read_sib200(lang, "dev")[:n]
    return [r.text[: max(20, len(r.text) // 2)] for r in rows]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def step_costs(lm: FusedLM, drafter: str, k: int, draft_vocab: int = 0, repeats: int = 5) -> dict[str, float]:
    """Seconds of one drafter step (1 token) and one verify step (k + 1 tokens) per other source, batch 1;
    with a draft vocabulary of N tokens also the drafter's step through an N-row head and its full head
    over the k + 1 drafted positions."""
    text = prompts("uig_Arab", 1)[0]
    costs = {}
    tokens = torch.randint(10, min(1000, lm.vocab_size), (1, k + 1))
    for source in [lm.pool.get(drafter), *[s for s in lm.sources if s.role != drafter]]:
        enc = source.tokenizer([text], return_tensors="pt")
        backend = source.backend

        def advance_seconds(width: int, hidden: bool = False, backend=backend, enc=enc) -> float:
            """Median time to advance a freshly prefilled state by ``width`` tokens (the first a warm-up)."""
            samples = []
            for _ in range(repeats + 1):
                _, state = backend.prefill(enc["input_ids"], enc["attention_mask"])
                samples.append(timed(partial(backend.advance, state, tokens[:, :width], hidden=hidden))[0])
            return statistics.median(samples[1:])

        for width, name in ((1, "step"), (k + 1, f"verify_{k + 1}")):
            costs[f"{source.role}_{name}_s"] = advance_seconds(width)
        if source.role == drafter and draft_vocab:
            head = backend.restricted_head(torch.arange(draft_vocab))
            _, state = backend.prefill(enc["input_ids"], enc["attention_mask"])
            hidden = backend.advance(state, tokens, hidden=True)
            with torch.inference_mode():
                small = best_time(partial(head, hidden[:, :1]), repeats)
                full = best_time(partial(backend.head_logits, hidden), repeats)
            costs[f"{source.role}_restricted_step_s"] = advance_seconds(1, hidden=True) + small
            costs[f"{source.role}_head_{k + 1}_s"] = full
    return costs


def measure(
    lm: FusedLM, texts: list[str], batch: int, new_tokens: int, settings: dict[str, object]
) -> dict[str, object]:
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, batch_size=batch)
    lm.generate(texts[:1], gen.model_copy(update={"max_new_tokens": 2}))  # warm-up
    plain_s, plain = timed(lambda: lm.generate(texts, gen))
    speculative = GenerationConfig.model_validate({**gen.model_dump(), "speculative": settings})
    spec_s, spec = timed(lambda: lm.generate(texts, speculative))
    tokens = sum(len(g.token_ids) for g in plain)
    merged = {"rounds": 0, "drafted": 0, "accepted": 0, "proposed_at": [], "accepted_at": []}
    for g in spec:
        stats = g.stats or {}
        merged["rounds"] += stats.get("rounds") or 0
        merged["drafted"] += stats.get("drafted") or 0
        merged["accepted"] += stats.get("accepted") or 0
    by_position = [g.stats["acceptance_by_position"] for g in spec if g.stats]
    positions = max((len(p) for p in by_position), default=0)
    per_position = [
        statistics.mean([p[j] for p in by_position if len(p) > j and p[j] is not None] or [float("nan")])
        for j in range(positions)
    ]
    return {
        "batch": batch,
        "k": settings["k"],
        "draft_vocab": (spec[0].stats or {}).get("draft_vocab") or 0,  # with the prompts' tokens and EOS
        "plain_tok_s": tokens / plain_s,
        "speculative_tok_s": tokens / spec_s,
        "speedup": plain_s / spec_s,
        "identical": [g.token_ids for g in plain] == [g.token_ids for g in spec],
        "acceptance_rate": merged["accepted"] / merged["drafted"] if merged["drafted"] else None,
        "mean_accepted_length": merged["accepted"] / merged["rounds"] if merged["rounds"] else None,
        "tokens_per_round": tokens / merged["rounds"] if merged["rounds"] else None,
        "acceptance_by_position": per_position,
        "drafter": spec[0].stats["draft"] if spec[0].stats else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "gemma"], default="gemma")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per language (batch 8 uses them all)")
    parser.add_argument("--k", nargs="+", default=["4"], help="draft lengths (or auto)")
    parser.add_argument(
        "--selection",
        default="runs/demo/selections/sib200_topic_uig_Arab.json",
        help="a selection.json whose weights (both scoring modes) are measured too",
    )
    parser.add_argument(
        "--draft-vocab",
        nargs="+",
        type=int,
        default=[0],
        help="draft vocabulary sizes to measure (0: the whole vocabulary); see speculative.draft_vocab",
    )
    parser.add_argument(
        "--draft-vocab-text",
        nargs="+",
        default=[str(UYGHUR_CORPUS), "sib200:eng_Latn:train"],
        help="text whose most frequent tokens form the draft vocabulary (not the prompts: they are dev sentences)",
    )
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(torch.get_num_threads())

    base = demo_trio(args.model)
    settings = {"paper 0.1/0.9": base}
    selection = Path(args.selection)
    if selection.is_file():
        saved = json.loads(selection.read_text())
        for mode, chosen in (saved.get("by_mode") or {}).items():
            settings[f"selected ({mode})"] = base.with_weights(method="weighted", **chosen["weights"])
    else:
        print(f"# {selection} not found (run `trimix demo` first): measuring the paper weights only")
    ks = [k if k == "auto" else int(k) for k in args.k]
    rows = []
    print(
        f"# speculative fusion, {args.model} trio, greedy, {args.new_tokens} new tokens, {torch.get_num_threads()} threads"
    )
    for name, lm in settings.items():
        drafter = lm.drafter(GenerationConfig(speculative={"k": 4}))
        for k in ks:
            for draft_vocab in args.draft_vocab:
                spec: dict[str, object] = {"k": k}
                if draft_vocab:
                    spec |= {"draft_vocab": draft_vocab, "draft_vocab_text": args.draft_vocab_text}
                costs = step_costs(lm, drafter, k if k != "auto" else 4, draft_vocab)
                for lang in ("uig_Arab", "eng_Latn"):
                    texts = prompts(lang, args.prompts)
                    for batch, chunk in ((1, texts[:2]), (8, texts)):
                        row = {
                            "weights": name,
                            "fused": list(lm.roles),
                            "lang": lang,
                            **measure(lm, chunk, batch, args.new_tokens, spec),
                            **costs,
                        }
                        rows.append(row)
                        print(
                            f"{name:<20} {lang} batch {batch} k={k} draft vocab {row['draft_vocab'] or 'all'}: "
                            f"plain {row['plain_tok_s']:.2f} tok/s, speculative {row['speculative_tok_s']:.2f} "
                            f"({row['speedup']:.2f}x), identical {row['identical']}, accepted/round "
                            f"{row['mean_accepted_length']:.2f}, acceptance {row['acceptance_rate']:.2f}",
                            flush=True,
                        )
    print(
        "\n| weights | fused sources | lang | batch | k | draft vocab | plain tok/s | speculative tok/s | speedup | identical "
        "| acceptance | accepted/round | by position | draft step s | verify step s | round predicted from step costs |"
    )
    print("|---" * 16 + "|")
    for r in rows:
        print(_table_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def _table_row(r: dict[str, object]) -> str:
    """One markdown row; the last column is the batch-1 accounting: the seconds a round costs from the
    step costs, and the tokens/s it predicts at the measured tokens per round."""
    drafter, k = r["drafter"], r["k"] if r["k"] != "auto" else 4
    verify = {
        key.split("_verify")[0]: v
        for key, v in r.items()
        if "_verify_" in key and key.split("_verify")[0] != drafter
    }
    if r["draft_vocab"]:
        draft = r[f"{drafter}_restricted_step_s"]
        round_s = (k + 1) * draft + r[f"{drafter}_head_{k + 1}_s"] + sum(verify.values())
    else:
        draft = r[f"{drafter}_step_s"]
        round_s = (k + 1) * draft + sum(verify.values())
    predicted = f"{round_s:.3f} s -> {r['tokens_per_round'] / round_s:.1f} tok/s" if r["batch"] == 1 else ""
    positions = " ".join(f"{p:.2f}" for p in r["acceptance_by_position"])
    return (
        f"| {r['weights']} | {', '.join(r['fused'])} | {r['lang']} | {r['batch']} | {r['k']} | {r['draft_vocab'] or 'all'} | "
        f"{r['plain_tok_s']:.2f} | {r['speculative_tok_s']:.2f} | {r['speedup']:.2f} | {r['identical']} | "
        f"{r['acceptance_rate']:.2f} | {r['mean_accepted_length']:.2f} | {positions} | {draft:.3f} | "
        f"{', '.join(f'{role} {v:.3f}' for role, v in verify.items())} | {predicted} |"
    )


if __name__ == "__main__":
    main()
