"""Fused log-likelihood of texts and continuations (lm-evaluation-harness semantics), from one forward pass
per source per text whatever the number of fusions scored: the requests become scoring items, the
:class:`~trimix.search.scoring.FusedPerplexityScorer` scores them, linear methods all at once from the
factorised log-partition, other methods from the full logits with their own combination."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from trimix.backends.loading import Source
from trimix.decoding.results import Loglikelihood
from trimix.decoding.text import prefix_token, rolling_windows, split_continuation
from trimix.errors import DataError
from trimix.fusion import Fusion
from trimix.fusion.methods import get_method

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM


def continuation_items(source: Source, requests: Sequence[tuple[str, str]]) -> list[Any]:
    """``(context, continuation)`` pairs as scoring items: the continuation's tokens are scored."""
    from trimix.search.scoring import ScoringText

    items = []
    for i, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = split_continuation(source, context, continuation)
        if not continuation_ids:
            raise DataError(f"request {i}: the continuation {continuation!r} encodes to no token")
        items.append(
            ScoringText(
                str(i),
                context + continuation,
                tokens=context_ids + continuation_ids,
                score_last=len(continuation_ids),
            )
        )
    return items


def token_items(requests: Sequence[tuple[Sequence[int], int]]) -> list[Any]:
    """``(ids, n)`` requests as scoring items: the last ``n`` ids are scored."""
    from trimix.search.scoring import ScoringText

    items = []
    for i, (ids, n) in enumerate(requests):
        if not 0 < n < len(ids):
            raise DataError(f"request {i}: scoring the last {n} of {len(ids)} tokens needs 0 < n < len(ids)")
        items.append(ScoringText(str(i), "", tokens=list(ids), score_last=n))
    return items


def rolling_items(source: Source, texts: Sequence[str], limit: int) -> tuple[list[Any], list[int]]:
    """Each text's disjoint windows (at most ``limit`` predicted tokens each, after a prefix token) as
    scoring items, and the text each item belongs to."""
    from trimix.search.scoring import ScoringText

    prefix = prefix_token(source.tokenizer)
    items, owner = [], []
    for i, text in enumerate(texts):
        tokens = source.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise DataError(f"text {i} encodes to no token")
        for context, targets in rolling_windows(tokens, prefix, limit):
            items.append(
                ScoringText(f"{i}:{len(items)}", text, tokens=context + targets, score_last=len(targets))
            )
            owner.append(i)
    return items, owner


def sum_windows(per_item: Sequence[Loglikelihood], owner: Sequence[int], n_texts: int) -> list[Loglikelihood]:
    """One result per text from its windows' results (log-probabilities and token counts add up)."""
    totals = [[0.0, True, 0] for _ in range(n_texts)]
    for i, result in zip(owner, per_item, strict=True):
        totals[i][0] += result.logprob
        totals[i][1] &= result.is_greedy
        totals[i][2] += result.n_tokens
    return [Loglikelihood(lp, greedy, n) for lp, greedy, n in totals]


def score_items(
    lm: FusedLM, items: list[Any], fusions: Sequence[Fusion], progress: bool
) -> list[list[Loglikelihood]]:
    """Every item's fused log-likelihood under each fusion (one list per fusion)."""
    used = {r for fusion in fusions for r in fusion.weights if fusion.weight(r) != 0.0}
    roles = [r for r in lm.pool.roles if r in used]
    scorer = lm.scorer(items, roles=roles, progress=progress, share_prefix=True)
    # Linear methods: every weight combination from one factorised pass. Others fuse the full logits
    # with their own combination, one fusion at a time (the forwards are still shared).
    results: list[list[Loglikelihood]] = [[] for _ in fusions]
    linear = [c for c, f in enumerate(fusions) if get_method(f.method).linear]
    batches: list[tuple[list[int], Any]] = [(linear, None)] if linear else []
    batches += [([c], get_method(f.method).combine) for c, f in enumerate(fusions) if c not in linear]
    for members, combine in batches:
        matrix = torch.tensor([fusions[c].vector(roles) for c in members], dtype=torch.float32)
        totals = scorer.score(matrix, greedy=True, combine=combine)
        for j, c in enumerate(members):
            results[c] = [
                Loglikelihood(
                    -float(totals.per_text[i, j]),
                    bool(totals.per_text_greedy[i, j]),
                    totals.tokens_per_text[i],
                )
                for i in range(len(items))
            ]
    return results
