"""The evaluation harness: a methods x tasks x languages matrix, resumable, with reports."""

from trimix.evaluation.report import markdown_table, score_cells, write_report
from trimix.evaluation.runner import PREDICTIONS, RESUMED_FROM, SELECTIONS, Evaluator, read_predictions

__all__ = [
    "PREDICTIONS",
    "RESUMED_FROM",
    "SELECTIONS",
    "Evaluator",
    "markdown_table",
    "read_predictions",
    "score_cells",
    "write_report",
]
