"""How much llama.cpp's log-probabilities depend on how a text is split into decode calls.

llama.cpp's quantized matrix kernels are not batch-invariant: the logits after a token depend slightly
on how many tokens the same call computes. This feeds one text to the embedded Gemma 3 270M (Q4_K_M)
in different splits — a prefill of the first ``n`` tokens, then the rest in one call — and prints the
log-probability of the text's last token after each split, for both KV precisions. Transformers on the
dequantised model gives one number whatever the split (printed for reference).

    python bench/llama_cpp_invariance.py
"""

from __future__ import annotations

import argparse
import logging

import torch
from common import machine, prompts

from trimix import FusedLM, load_config


def last_token_logprob(backend, ids: torch.Tensor, first: int) -> float:
    """Prefill ``ids[:, :first]``, feed the rest but the last token in one call; the last token's log-prob."""
    _, state = backend.prefill(ids[:, :first], torch.ones_like(ids[:, :first]))
    logits = backend.advance(state, ids[:, first:-1])[0, -1]
    return float(torch.log_softmax(logits.float(), -1)[ids[0, -1]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 8, 16, 24, 28, 31, 32, 33])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    text = prompts(1)[0]
    print(f"# llama.cpp batch invariance, embedded Gemma 3 270M Q4_K_M — {machine()}")
    for name, backend, options in (
        ("transformers (float32)", "hf", {}),
        ("llama.cpp, f16 KV", "llama_cpp", {"n_threads": 2, "prompt_cache": 0}),
        ("llama.cpp, f32 KV", "llama_cpp", {"n_threads": 2, "prompt_cache": 0, "kv_type": "f32"}),
    ):
        model = {"model": "embedded:gemma-3-270m", "role": "only", "backend": backend}
        if options:
            model["backend_options"] = options
        lm = FusedLM.from_config(
            load_config({"models": [model], "fusion": {"method": "single", "role": "only"}})
        )
        ids = torch.tensor([lm.sources[0].tokenizer(text)["input_ids"]])
        values = [
            last_token_logprob(lm.sources[0].backend, ids, n) for n in args.splits if n < ids.shape[1] - 1
        ]
        print(
            f"{name:<24} {ids.shape[1]} tokens; last token log-prob over splits {args.splits[: len(values)]}: "
            + " ".join(f"{v:.4f}" for v in values)
            + f"  (range {max(values) - min(values):.4f})"
        )


if __name__ == "__main__":
    main()
