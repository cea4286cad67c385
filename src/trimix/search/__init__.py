"""Label-free weight selection: fused perplexity of many weight combinations, grid plus refinement."""

from trimix.search.features import head_logits
from trimix.search.partition import combination_nll
from trimix.search.scoring import FusedPerplexityScorer, ScoringText
from trimix.search.select import (
    Candidate,
    SelectionResult,
    build_candidates,
    search_weights,
    selection_texts,
    task_selection_texts,
)
from trimix.search.totals import ScoreTotals, average_perplexity

__all__ = [
    "Candidate",
    "FusedPerplexityScorer",
    "ScoreTotals",
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
