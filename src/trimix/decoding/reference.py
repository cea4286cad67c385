"""A deliberately naive fused decoder: no KV cache, one prompt at a time, every source re-reads it all.

It exists as the ground truth that cached, batched decoding must reproduce (tests) and as the
no-cache baseline that research code uses for some families (benchmarks). It calls each model's own
forward pass (transformers' masks and output head, not trimix's backend) on the unpadded sequence,
and shares only the fusion (:func:`~trimix.fusion.fused_scores`) and the token choice
(:class:`~trimix.decoding.sampling.TokenChooser`) with the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trimix.config import GenerationConfig
from trimix.decoding.fused import FusedLM
from trimix.decoding.sampling import TokenChooser, row_keys
from trimix.fusion import fused_scores


@torch.inference_mode()
def generate_without_cache(
    lm: FusedLM, prompts: Sequence[str], generation: GenerationConfig, row_ids: Sequence[int] | None = None
) -> list[list[int]]:
    """Greedy or sampled fused decoding that recomputes every source's full sequence at every step.

    Rows stop at EOS (the EOS token is kept, as in the engine); stop strings are not handled.

    Returns:
        The generated token ids of each prompt.
    """
    chooser = TokenChooser(generation)
    eos = set() if generation.ignore_eos else set(lm.eos_token_ids(generation))
    keys = row_keys(generation.seed, list(range(len(prompts))) if row_ids is None else row_ids)
    weights = torch.tensor([lm.weight_vector()], dtype=torch.float32, device=lm.fusion_device)
    alpha = lm.fusion.plausibility.alpha if lm.fusion.plausibility else 0.0
    results = []
    for i, prompt in enumerate(prompts):
        prompt_ids = {
            s.role: s.tokenizer(s.format_prompt(prompt), add_special_tokens=s.adds_special_tokens)[
                "input_ids"
            ]
            for s in lm.sources
        }
        generated: list[int] = []
        for t in range(generation.max_new_tokens):
            logits = [
                s.model(input_ids=torch.tensor([prompt_ids[s.role] + generated], device=s.input_device))
                .logits[:, -1]
                .to(lm.fusion_device)
                for s in lm.sources
            ]
            scores = fused_scores(logits, weights, lm.vocab_size, lm.plausibility_index, alpha, lm.combine)
            token = int(
                chooser(
                    scores, keys[i : i + 1].to(lm.fusion_device), torch.tensor([t], device=lm.fusion_device)
                )
            )
            generated.append(token)
            if token in eos:
                break
        results.append(generated)
    return results
