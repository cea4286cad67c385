"""A deliberately naive fused decoder: no KV cache, every source re-reads the whole sequence each step.

It exists as the ground truth that cached, batched decoding must reproduce (tests) and as the
no-cache baseline that research code uses for some families (benchmarks). It shares the fusion
(:class:`~trimix.fusion.FusionSpec`) and token choice (:class:`TokenSelector`) with the engine, and
nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trimix.config import GenerationConfig
from trimix.decoding.engine import FusedLM, left_padded_positions
from trimix.decoding.sampling import TokenSelector


@torch.inference_mode()
def generate_without_cache(
    lm: FusedLM, prompts: Sequence[str], generation: GenerationConfig
) -> list[list[int]]:
    """Greedy or sampled fused decoding that recomputes every source's full sequence at every step.

    Rows stop at EOS (the EOS token is kept, as in the engine); stop strings are not handled.

    Returns:
        The generated token ids of each prompt.
    """
    selector = TokenSelector(generation, device=lm.fusion_device)
    eos = set() if generation.ignore_eos else set(lm.eos_token_ids(generation))
    prompt_ids = {}
    for source in lm.sources:
        texts = [source.format_prompt(p) for p in prompts]
        enc = source.tokenizer(texts, add_special_tokens=source.adds_special_tokens)
        prompt_ids[source.role] = enc["input_ids"]
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(generation.max_new_tokens):
        step_logits = []
        for source in lm.sources:
            rows = [ids + gen for ids, gen in zip(prompt_ids[source.role], generated, strict=True)]
            width = max(len(r) for r in rows)
            pad = source.tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            out = source.model(
                input_ids=input_ids.to(source.input_device),
                attention_mask=mask.to(source.input_device),
                position_ids=left_padded_positions(mask).to(source.input_device),
                use_cache=False,
            )
            step_logits.append(out.logits[:, -1, :].to(lm.fusion_device))
        tokens = selector(lm.spec.scores(step_logits)).tolist()
        for i, token in enumerate(tokens):
            if not done[i]:
                generated[i].append(token)
                done[i] = token in eos
        if all(done):
            break
    return generated
