"""Bootstrap intervals: reproducible, calibrated on synthetic data, and kept by the report."""

from __future__ import annotations

import numpy as np
import pytest

from trimix.metrics import chrf_pp, metric_statistics
from trimix.metrics.bootstrap import MIN_ITEMS, accuracy_stats, bootstrap, paired_bootstrap


def test_intervals_are_seeded_and_contain_the_estimate() -> None:
    stats = accuracy_stats(np.random.default_rng(0).random(60) < 0.4)
    a, b = bootstrap(stats), bootstrap(stats)
    assert a == b and a.low <= a.value <= a.high and a.se > 0
    assert bootstrap(stats, seed=1) != a  # another seed, another (similar) interval


def test_too_few_items_get_no_interval() -> None:
    small = bootstrap(accuracy_stats([True, False] * ((MIN_ITEMS - 1) // 2)))
    assert small.low is None and small.format().endswith(f"(n={small.n})")


def test_corpus_metric_resamples_recompute_the_corpus_statistic() -> None:
    rows = [{"prediction": f"the cat {i} sat", "reference": f"the cat {i} sat down"} for i in range(25)]
    stats = metric_statistics("chrf_pp", rows)
    assert stats.score() == pytest.approx(
        chrf_pp([r["prediction"] for r in rows], [r["reference"] for r in rows])
    )
    interval = bootstrap(stats)
    assert interval.low <= interval.value <= interval.high


def test_paired_difference_detects_a_real_difference() -> None:
    rng = np.random.default_rng(3)
    better = rng.random(200) < 0.7
    worse = better & (rng.random(200) < 0.75)  # the same items, 25% of the successes lost
    diff = paired_bootstrap(accuracy_stats(better), accuracy_stats(worse))
    assert diff.value > 0 and diff.excludes_zero()


def test_no_difference_is_covered_at_about_the_nominal_rate() -> None:
    """Two methods with the same per-item success probability: the 95% paired interval should contain 0 in
    about 95% of simulated studies (tolerance: 88-99% over 200 studies of 60 items)."""
    rng = np.random.default_rng(7)
    covered = 0
    studies = 200
    for study in range(studies):
        a, b = rng.random(60) < 0.6, rng.random(60) < 0.6
        diff = paired_bootstrap(accuracy_stats(a), accuracy_stats(b), resamples=400, seed=study)
        covered += not diff.excludes_zero()
    assert 0.88 <= covered / studies <= 0.99
