"""Choosing the next token from fused scores: greedy, or seeded sampling with temperature/top-k/top-p."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from trimix.config import GenerationConfig


class TokenSelector:
    """Maps fused scores ``(B, V)`` to next tokens ``(B,)``; seeded, so a run is reproducible.

    The warpers are transformers' own, so temperature, top-k and top-p behave exactly as in
    ``model.generate``; they only ever see the fused scores.
    """

    def __init__(self, generation: GenerationConfig, device: torch.device | str = "cpu") -> None:
        self.do_sample = generation.do_sample
        self.warpers = LogitsProcessorList()
        if self.do_sample:
            if generation.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(generation.temperature))
            if generation.top_k > 0:
                self.warpers.append(TopKLogitsWarper(generation.top_k))
            if generation.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(generation.top_p))
        self.generator = torch.Generator(device=device).manual_seed(generation.seed)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        warped = self.warpers(None, scores) if self.warpers else scores
        probs = torch.softmax(warped, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(-1)
