"""Fused log-likelihood of texts and continuations (lm-evaluation-harness semantics), from one forward pass
per source per text whatever the number of fusions scored: the requests become scoring items, the
:class:`~trimix.search.scoring.FusedPerplexityScorer` scores them, linear methods all at once from the
factorised log-partition, other methods from the full logits with their own combination."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from trimix.backends.base import HIDDEN, has_capability, position_logits
from trimix.backends.loading import Source
from trimix.decoding.results import Loglikelihood
from trimix.decoding.text import prefix_token, rolling_windows, split_continuation
from trimix.errors import DataError
from trimix.fusion import Fusion
from trimix.fusion.methods import get_method

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM

LOGIT_BYTES = 1 << 30  # logits kept at once when scoring sources without hidden states


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


def logit_chunks(sources: Sequence[Source], items: list[Any], budget: int | None = None) -> list[list[Any]]:
    """Consecutive runs of ``items`` whose kept features fit ``budget`` bytes. A source without hidden
    states is scored from its logits, a vocabulary row per scored position (1 MiB for Gemma's 262,144
    entries), so many items at once would hold gigabytes; with hidden states all items go at once.
    ``budget`` defaults to ``LOGIT_BYTES``."""
    budget = LOGIT_BYTES if budget is None else budget
    per_position = sum(4 * s.backend.logit_rows for s in sources if not has_capability(s.backend, HIDDEN))
    if not per_position:
        return [items]
    chunks: list[list[Any]] = [[]]
    held = 0
    for item in items:
        size = per_position * (item.score_last or len(item.tokens))
        if chunks[-1] and held + size > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(item)
        held += size
    return chunks


def score_items(
    lm: FusedLM, items: list[Any], fusions: Sequence[Fusion], progress: bool
) -> list[list[Loglikelihood]]:
    """Every item's fused log-likelihood under each fusion (one list per fusion), in runs of items whose
    features fit memory (:func:`logit_chunks`)."""
    used = {r for fusion in fusions for r in fusion.weights if fusion.weight(r) != 0.0}
    roles = [r for r in lm.pool.roles if r in used]
    results: list[list[Loglikelihood]] = [[] for _ in fusions]
    for chunk in logit_chunks([lm.pool.get(r) for r in roles], items):
        for mine, theirs in zip(results, _score_chunk(lm, chunk, fusions, roles, progress), strict=True):
            mine += theirs
    return results


def _score_chunk(
    lm: FusedLM, items: list[Any], fusions: Sequence[Fusion], roles: list[str], progress: bool
) -> list[list[Loglikelihood]]:
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


@torch.inference_mode()
def prompt_logprobs(
    lm: FusedLM, ids: Sequence[int], top: int, block: int = 128
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each token after the first: its fused log-probability given the ones before, and the ``top`` most
    likely tokens there (id, log-probability). Every source reads ``ids`` as they are; the fusion is the
    model's without the plausibility rule (a decoding rule), as in :meth:`FusedLM.loglikelihood`. Uses the
    backends' core calls only (:func:`~trimix.backends.base.position_logits`, ``block`` tokens at a time).
    """
    ids = list(ids)
    device = lm.fusion_device
    weights = torch.tensor([lm.weight_vector()], dtype=torch.float32, device=device)
    tensor = torch.tensor([ids], dtype=torch.long)
    chunks = [position_logits(s.backend, tensor, len(ids) - 1, block) for s in lm.sources]
    out: list[tuple[float, list[tuple[int, float]]]] = []
    for logits in zip(*chunks, strict=True):  # every source's logits at the same positions
        fused = lm.fuse([x.to(device) for x in logits], weights, plausibility=False)[0].float()  # (k, V)
        logp = torch.log_softmax(fused, dim=-1)
        targets = torch.tensor(ids[1 + len(out) : 1 + len(out) + logp.shape[0]], device=device)
        chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
        values, best = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
        for lp, v, b in zip(chosen, values.tolist(), best.tolist(), strict=True):
            out.append((lp, list(zip(b, v, strict=True))))
    return out


class LikelihoodMethods:
    """:class:`~trimix.FusedLM`'s likelihood API (lm-evaluation-harness semantics), on the functions above."""

    sources: list[Source]
    fusion: Fusion
    pool: Any
    vocab_size: int

    def scorer(self, texts: Sequence[Any], *, roles: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """A :class:`~trimix.search.FusedPerplexityScorer` over ``roles`` (default: this model's sources):
        one forward per source per text, then any number of weight vectors scored from it."""
        from trimix.search.scoring import FusedPerplexityScorer

        sources = self.sources if roles is None else [self.pool.get(r) for r in roles]
        return FusedPerplexityScorer(sources, self.vocab_size, texts, **kwargs)

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], *, progress: bool = False
    ) -> list[Loglikelihood]:
        """Fused log-probability of each continuation given its context (lm-evaluation-harness semantics).

        The pair is encoded whole and the context alone; the continuation is the whole encoding's tokens
        after the context's (trailing spaces of the context move to the continuation, so the split falls
        on a token boundary); an empty context is replaced by the tokenizer's BOS (else EOS). The
        plausibility constraint is a decoding rule and does not apply here.

        Returns:
            One :class:`Loglikelihood` per request (natural log; ``is_greedy``: every continuation token
            is the fused argmax at its position).
        """
        return self.loglikelihood_by_fusion(requests, [self.fusion], progress=progress)[0]

    def loglikelihood_rolling(
        self, texts: Sequence[str], *, max_length: int | None = None, progress: bool = False
    ) -> list[float]:
        """Whole-text fused log-likelihood, every token predicted (lm-evaluation-harness semantics).

        The text is encoded without special tokens and scored after a prefix token (BOS, else EOS) in
        disjoint windows of at most ``max_length`` predicted tokens (default: the smallest context among
        the sources), each window conditioned on the tokens just before it.
        """
        per_text = self.loglikelihood_rolling_by_fusion(
            texts, [self.fusion], max_length=max_length, progress=progress
        )
        return [r.logprob for r in per_text[0]]

    def loglikelihood_by_fusion(
        self, requests: Sequence[tuple[str, str]], fusions: Sequence[Fusion], *, progress: bool = False
    ) -> list[list[Loglikelihood]]:
        """:meth:`loglikelihood` under several fusions of the loaded sources at once: one forward pass per
        source per request serves them all. Returns one list per fusion."""
        return score_items(self, continuation_items(self.sources[0], requests), fusions, progress)

    def loglikelihood_tokens(
        self, requests: Sequence[tuple[Sequence[int], int]], *, progress: bool = False
    ) -> list[Loglikelihood]:
        """Token-level likelihood: each request is ``(ids, n)``, the fused log-probability of the last ``n``
        ids given the ones before (for callers that tokenise themselves, such as lm-evaluation-harness)."""
        return score_items(self, token_items(requests), [self.fusion], progress)[0]

    def loglikelihood_rolling_by_fusion(
        self,
        texts: Sequence[str],
        fusions: Sequence[Fusion],
        *,
        max_length: int | None = None,
        progress: bool = False,
    ) -> list[list[Loglikelihood]]:
        """:meth:`loglikelihood_rolling` under several fusions at once (with each text's token count)."""
        limit = max_length or min((s.max_positions or 2048) for s in self.sources)
        items, owner = rolling_items(self.sources[0], texts, limit)
        per_fusion = score_items(self, items, fusions, progress)
        return [sum_windows(per_item, owner, len(texts)) for per_item in per_fusion]
