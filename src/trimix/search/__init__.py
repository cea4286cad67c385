"""Label-free weight selection: fused perplexity of many weight combinations, grid plus refinement."""

from trimix.search.partition import combination_nll
from trimix.search.scoring import FusedPerplexityScorer, ScoringText, average_perplexity, head_logits
from trimix.search.select import (
    Candidate,
    SelectionResult,
    build_candidates,
    search_weights,
    selection_texts,
    task_selection_texts,
)

__all__ = [
    "Candidate",
    "FusedPerplexityScorer",
    "ScoringText",
    "SelectionResult",
    "average_perplexity",
    "build_candidates",
    "combination_nll",
    "head_logits",
    "search_weights",
    "selection_texts",
    "task_selection_texts",
]
