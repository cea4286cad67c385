"""Times the TriMix authors' own decoding loop (github.com/luciusssss/TriMix, ``dexperts.TriMixQwen``).

Run by ``bench/reference_compare.py`` in a separate process whose ``PYTHONPATH`` puts the reference's
pinned transformers (4.47) and its checkout first; it imports nothing from trimix (whose transformers
5 and pydantic it would not find). It reads one JSON job and writes one JSON result:

    python bench/reference_worker.py job.json result.json

The job gives the saved models, the prompts as token ids (exactly what trimix feeds its sources, so
both sides decode the same inputs whatever either transformers version's tokenizer would do), the
weights, the plausibility rule and the batch sizes. The reference finishes a row only at its
tokenizer's end-of-sequence id; to decode a fixed number of tokens as trimix's ``ignore_eos`` does,
the worker gives it an end-of-sequence id no token has (-1). Nothing else of its loop is changed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def left_pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, as the reference's own tokenizer call makes them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def model_facts(model) -> dict[str, float]:
    """The settings that must match trimix's reading of the same folder (a transformers 5 config read
    by 4.47 can silently fall back to defaults)."""
    config = model.config
    return {
        "rope_theta": float(config.rope_theta),
        "rms_norm_eps": float(config.rms_norm_eps),
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_search(model, job: dict) -> dict:
    """The authors' weight search (get_perplexity.py) on the job's texts, with the models already loaded
    and resized by their TriMixQwen (get_perplexity.py resizes them the same way).

    Each source's logits come from their ``get_logits_and_perplexity`` (their tokenizer call, float32
    log-softmax over every output row, the small models' resized rows included); the combinations are
    scored as their script's main loop does — each text's mean NLL under ``a * L_large + b * L_cpt +
    (1 - a - b) * L_base``, then ``exp`` of the mean over texts — which is not importable from it.
    """
    import math

    from get_perplexity import get_logits_and_perplexity
    from transformers import AutoTokenizer

    device = job["device"]
    tokenizer = AutoTokenizer.from_pretrained(job["models"]["large"])
    grid = job["search_grid"]
    combos = [(a, b, 1 - a - b) for a in grid for b in grid]
    totals = [0.0] * len(combos)
    single = [0.0, 0.0, 0.0]
    labels = []
    synchronize(device)
    start = time.perf_counter()
    for text in job["search_texts"]:
        logits = []
        for i, source in enumerate((model.base, model.expert, model.antiexpert)):
            shifted, shift_labels, perplexity = get_logits_and_perplexity(
                source, tokenizer, text, device=device
            )
            logits.append(shifted.float())
            single[i] += perplexity
        target = shift_labels.to(device)
        labels.append(shift_labels[0].tolist())
        for c, (a, b, rest) in enumerate(combos):
            fused = (a * logits[0] + b * logits[1] + rest * logits[2]).to(device)
            logp = torch.log_softmax(fused, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            totals[c] += float(-logp.mean())
    synchronize(device)
    seconds = time.perf_counter() - start
    n = len(job["search_texts"])
    return {
        "seconds": seconds,
        "points": [
            {"weights": list(w), "perplexity": math.exp(t / n)} for w, t in zip(combos, totals, strict=True)
        ],
        "mean_single_perplexity": dict(
            zip(("large", "small_cpt", "small_base"), (x / n for x in single), strict=True)
        ),
        "token_ids": labels,
    }


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, job["reference_code"])
    import transformers
    from dexperts import TriMixQwen  # the reference's class for Qwen and Llama sources

    device = job["device"]
    model_kwargs: dict = {"torch_dtype": getattr(torch, job["dtype"])}
    if device != "cpu":
        model_kwargs["device_map"] = device
    # The loop reads only these two ids from its tokenizer (chat formatting is off: no "chat" in the paths).
    tokenizer = SimpleNamespace(eos_token_id=-1, pad_token_id=job["pad_token_id"])
    plausibility = job["plausibility"] or {"model": "none", "alpha": 0.1}
    start = time.perf_counter()
    model = TriMixQwen(
        base_model_name_or_path=job["models"]["large"],
        expert_model_name_or_path=job["models"]["small_cpt"],
        antiexpert_model_name_or_path=job["models"]["small_base"],
        tokenizer=tokenizer,
        base_weight=job["weights"][0],
        expert_weight=job["weights"][1],
        model_kwargs=model_kwargs,
        plausibility_model=plausibility["model"],
        plausibility_alpha=plausibility["alpha"],
    )
    load_s = time.perf_counter() - start
    sources = {"large": model.base, "small_cpt": model.expert, "small_base": model.antiexpert}
    prompts = job["prompts"]
    new_tokens = job["new_tokens"]

    def run(batch: int, count: int) -> list[list[int]]:
        out = []
        for first in range(0, count, batch):
            chunk = prompts[first : min(first + batch, count)]
            ids, mask = left_pad(chunk, job["pad_token_id"], device)
            with torch.inference_mode():
                full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens)
            out.extend(full[:, ids.shape[1] :].tolist())
        synchronize(device)
        return out

    rows = []
    for batch in job["batch_sizes"]:
        count = max(job["min_prompts"], batch)
        run(batch, batch)  # warm-up: allocator, kernels
        best, tokens = float("inf"), []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            tokens = run(batch, count)
            best = min(best, time.perf_counter() - start)
        rows.append(
            {
                "batch": batch,
                "prompts": count,
                "seconds": best,
                "tok_s": count * new_tokens / best,
                "tokens": tokens,
            }
        )
        print(f"reference batch {batch}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "load_s": load_s,
        "models": {role: model_facts(m) for role, m in sources.items()},
        "rows": rows,
    }
    if job.get("search_texts"):
        result["search"] = reference_search(model, job)
    Path(sys.argv[2]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
