"""A scoring pass's results: NLL sums per combination, per text and per token group, and perplexities."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch


def token_script(text: str) -> str:
    """The writing system of a token's text: the Unicode script name of its first letter ("LATIN",
    "ARABIC", "TIBETAN", "CJK", ...), "digit", or "other" (spaces, punctuation)."""
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            return "CJK" if name.startswith("CJK") else (name.split(" ")[0] if name else "other")
        if char.isdigit():
            return "digit"
    return "other"


@dataclass
class ScoreTotals:
    """NLL sums of C combinations over the same scored tokens."""

    nll: torch.Tensor  # (C,) float64
    n_tokens: int
    per_text: torch.Tensor | None = None  # (texts, C) float64
    tokens_per_text: list[int] | None = None
    per_text_greedy: torch.Tensor | None = None  # (texts, C) bool: every scored token is the fused argmax
    per_group: torch.Tensor | None = None  # (2, C) float64: NLL of template tokens (0) and task text (1)
    tokens_per_group: tuple[int, int] | None = None
    per_text_group: torch.Tensor | None = None  # (texts, 2, C) float64
    tokens_per_text_group: list[tuple[int, int]] | None = None

    @property
    def perplexity(self) -> torch.Tensor:
        """(C,) fused perplexity over every scored token."""
        return self.perplexities()

    def perplexities(self, group: int | None = None, average: str = "tokens") -> torch.Tensor:
        """(C,) fused perplexity over every scored token (``group`` None) or one token group (0 template,
        1 task text), pooled over tokens or averaged over texts (see :func:`average_perplexity`)."""
        if group is None:
            return average_perplexity(self.per_text, torch.tensor(self.tokens_per_text), average)
        counts = torch.tensor([c[group] for c in self.tokens_per_text_group])
        return average_perplexity(self.per_text_group[:, group], counts, average)


def average_perplexity(nll: torch.Tensor, counts: torch.Tensor, average: str = "tokens") -> torch.Tensor:
    """Perplexity of C combinations from per-text NLL sums ``(texts, C)`` over ``counts`` tokens per text.

    ``tokens``: ``exp(sum NLL / sum counts)``. ``texts``: ``exp(mean_t(NLL_t / counts_t))`` over the texts
    with at least one token. Texts of equal length give the same value either way.
    """
    counts = counts.to(nll.dtype)
    if average == "tokens":
        return torch.exp(nll.sum(0) / counts.sum().clamp(min=1))
    if average == "texts":
        scored = counts > 0
        return torch.exp((nll[scored] / counts[scored, None]).mean(0))
    raise ValueError(f"average must be 'tokens' or 'texts'; got {average!r}")
