"""Uncertainty of evaluation scores: seeded bootstrap intervals and paired differences, pure functions.

Every metric is written as per-item sufficient statistics plus a function of their sum, so a resample
of items is one matrix product: accuracy is ``(correct, 1)``; ROUGE-L ``(F1, 1)``; perplexity
``(nll, tokens)``; chrF, chrF++ and BLEU use sacrebleu's own per-sentence statistics and its own
score-from-statistics, so a resampled corpus score is exactly what sacrebleu would compute on the
resampled sentences (the corpus statistic is recomputed, not averaged).

An interval is the percentile interval of ``n_resamples`` resamples of the items (95% by default),
with the standard error (the resamples' standard deviation). Below ``MIN_ITEMS`` items no interval is
given: a bootstrap of a handful of items describes the handful, not the population.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_ITEMS = 20
N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class ItemStatistics:
    """Per-item sufficient statistics ``(n, k)`` and the score of their sum (0-100, perplexity excepted)."""

    stats: np.ndarray
    score_of: Callable[[np.ndarray], float]

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    def score(self) -> float:
        return self.score_of(self.stats.sum(0))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval and standard error (None below the minimum of items)."""

    value: float
    low: float | None
    high: float | None
    se: float | None
    n: int
    resamples: int = N_RESAMPLES
    seed: int = SEED
    level: float = LEVEL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def excludes_zero(self) -> bool | None:
        return None if self.low is None else bool(self.low > 0 or self.high < 0)

    def format(self, digits: int = 2) -> str:
        if self.low is None:
            return f"{self.value:.{digits}f} (n={self.n})"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def accuracy_stats(correct: Sequence[bool]) -> ItemStatistics:
    stats = np.array([[float(bool(c)), 1.0] for c in correct]).reshape(-1, 2)
    return ItemStatistics(stats, lambda s: 100.0 * s[0] / s[1] if s[1] else 0.0)


def mean_stats(values: Sequence[float]) -> ItemStatistics:
    """Per-item scores averaged (ROUGE-L F1)."""
    stats = np.array([[float(v), 1.0] for v in values]).reshape(-1, 2)
    return ItemStatistics(stats, lambda s: s[0] / s[1] if s[1] else 0.0)


def _pairs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """``(n, 2)`` per-item (a, b) rows, e.g. an item's NLL and the tokens or bytes it covers."""
    return np.array([[float(x), float(y)] for x, y in zip(a, b, strict=True)]).reshape(-1, 2)


def perplexity_stats(nll: Sequence[float], tokens: Sequence[int]) -> ItemStatistics:
    return ItemStatistics(_pairs(nll, tokens), lambda s: float(np.exp(s[0] / max(s[1], 1.0))))


def bits_per_byte_stats(nll: Sequence[float], n_bytes: Sequence[int]) -> ItemStatistics:
    """Total NLL (nats) over total UTF-8 bytes, in bits: comparable across tokenizers, unlike perplexity."""
    return ItemStatistics(_pairs(nll, n_bytes), lambda s: float(s[0] / max(s[1], 1.0) / np.log(2.0)))


def sacrebleu_stats(metric: Any, predictions: Sequence[str], references: Sequence[str]) -> ItemStatistics:
    """Per-sentence statistics of a sacrebleu corpus metric (CHRF, BLEU) and its score of their sum."""
    stats = np.array(
        metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.float64
    )

    def score_of(total: np.ndarray) -> float:
        return float(metric._compute_score_from_stats([int(v) for v in np.rint(total)]).score)

    return ItemStatistics(stats, score_of)


def _resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` how often each item is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap(
    items: ItemStatistics, resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """The score with a percentile bootstrap interval over items (none below ``MIN_ITEMS`` items)."""
    value = items.score()
    if items.n < MIN_ITEMS:
        return Interval(value, None, None, None, items.n, resamples, seed, level)
    sums = _resample_counts(items.n, resamples, seed) @ items.stats
    scores = np.array([items.score_of(row) for row in sums])
    low, high = np.quantile(scores, [(1 - level) / 2, (1 + level) / 2])
    return Interval(
        value, float(low), float(high), float(scores.std(ddof=1)), items.n, resamples, seed, level
    )


def paired_bootstrap(
    a: ItemStatistics, b: ItemStatistics, resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """``score(a) - score(b)`` on the same items (rows aligned), each resample drawing the same items for
    both; the interval excludes zero when the difference holds up under resampling."""
    if a.n != b.n:
        raise ValueError(f"paired items must align; got {a.n} and {b.n}")
    value = a.score() - b.score()
    if a.n < MIN_ITEMS:
        return Interval(value, None, None, None, a.n, resamples, seed, level)
    counts = _resample_counts(a.n, resamples, seed)
    sums_a, sums_b = counts @ a.stats, counts @ b.stats
    diffs = np.array([a.score_of(x) - b.score_of(y) for x, y in zip(sums_a, sums_b, strict=True)])
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return Interval(value, float(low), float(high), float(diffs.std(ddof=1)), a.n, resamples, seed, level)
