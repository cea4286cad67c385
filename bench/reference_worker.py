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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
        "rows": rows,
    }
    Path(sys.argv[2]).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
