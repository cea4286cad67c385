"""Speculative fusion: a drafter proposes k tokens, every fused source verifies them in one forward.

TriMix's good weights give the small CPT source most of the mass, so its own next token is usually
the fused model's next token. Each round the drafter (a fused source, or another model sharing the
tokenizer) proposes ``x_1..x_k`` one token at a time; every other fused source runs **one** forward
over ``[t, x_1..x_k]`` (``t`` the last committed token), which gives every source's logits at the
k + 1 positions; the fused distribution is formed at each (plausibility mask included); the longest
acceptable prefix is kept, plus one token from the fused distribution; every cache is cropped back
to what was kept (rows accept different numbers of tokens).

* Greedy: ``x_j`` is accepted while it is the fused argmax; the first mismatch is replaced by the
  fused argmax, so the output is exactly non-speculative fused greedy decoding.
* Sampling: ``x_j ~ q_j`` (the drafter's distribution after temperature/top-k/top-p) is accepted with
  probability ``min(1, p_j(x_j) / q_j(x_j))`` against the fused distribution ``p_j`` (after the
  plausibility mask and the same warpers); on rejection the token is drawn from the normalised residual
  ``max(0, p_j - q_j)``; when all k are accepted one more token is drawn from ``p_{k+1}``. Each emitted
  token is then distributed exactly as ``p`` (Leviathan et al., 2023; Chen et al., 2023). Draft,
  acceptance and residual draws use separate noise streams keyed by row and token index, so a run is
  reproducible; it is not token-equal to non-speculative sampling, only equal in distribution.

A draft vocabulary (``speculative.draft_vocab``) makes a draft step cheaper when the output projection
is a large part of the drafter (Gemma 3 270M: 63%): the drafter chooses among a fixed set of token ids
(:func:`frequent_tokens`) through only those rows of its head, and its full head runs once over the
k + 1 drafted positions, because as a fused source its exact logits enter the fusion. ``q`` is then the
drafter's distribution restricted to the set, still a valid proposal: greedy output stays identical and
sampling stays exact; a token outside the set is never drafted, only emitted by the fused choice.

This module holds the pure parts (the acceptance rule, statistics, the adaptive k); the round loop
lives in :mod:`trimix.decoding.drafting`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from trimix.decoding.sampling import STREAM_ACCEPT, STREAM_RESIDUAL, gumbel_noise, uniform_noise

K_AUTO_START, K_AUTO_MAX = 4, 8


def frequent_tokens(
    counts: Counter[int], size: int, always: Iterable[int] = (), vocab_size: int | None = None
) -> torch.Tensor:
    """The draft vocabulary: the ``size`` most frequent ids of ``counts`` (ties: the lower id) and every id
    of ``always``, sorted, without duplicates, all below ``vocab_size``."""
    usable = [(token, n) for token, n in counts.items() if vocab_size is None or 0 <= token < vocab_size]
    ranked = sorted(usable, key=lambda item: (-item[1], item[0]))[:size]
    chosen = {token for token, _ in ranked}
    chosen.update(t for t in always if vocab_size is None or 0 <= t < vocab_size)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def residual_distribution(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """``max(0, p - q)`` normalised over the last axis (``p`` itself where ``p <= q`` everywhere)."""
    residual = (target - draft).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-30), target)


def verify_drafts(
    target_scores: torch.Tensor,
    draft: torch.Tensor,
    draft_scores: torch.Tensor | None,
    keys: torch.Tensor,
    counters: torch.Tensor,
    limits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many drafted tokens each row keeps, and the token that follows them.

    Args:
        target_scores: ``(B, k + 1, V)`` the fused scores (warped, masked) after the last committed token
            and after each drafted token.
        draft: ``(B, k)`` the drafted tokens.
        draft_scores: ``(B, k, V)`` the drafter's warped scores each draft was sampled from; None for
            greedy decoding (drafts are then checked against the fused argmax).
        keys: ``(B,)`` row keys of the sampling noise.
        counters: ``(B,)`` the output index of each row's first drafted token.
        limits: ``(B,)`` how many of the k drafts belong to each row (a row with less room drafts fewer;
            the rest of its row is padding); None: all k.

    Returns:
        ``accepted`` ``(B,)`` in ``[0, k]`` and ``next_token`` ``(B,)``: the fused argmax (greedy), the
        residual draw at the first rejection, or a draw from ``p_{k+1}`` when every draft was kept.
    """
    k = draft.shape[1]
    own = None if limits is None else torch.arange(k, device=draft.device)[None, :] < limits[:, None]
    if k == 0:  # nothing drafted: one plain fused step
        accepted = torch.zeros(draft.shape[0], dtype=torch.long, device=draft.device)
        if draft_scores is None:
            return accepted, target_scores[:, 0].argmax(-1)
        noise = gumbel_noise(keys, counters, target_scores.shape[-1], STREAM_RESIDUAL)
        return accepted, (target_scores[:, 0] + noise).argmax(-1)
    if draft_scores is None:
        target = target_scores.argmax(-1)  # (B, k + 1)
        matches = target[:, :k] == draft
        accepted = _prefix_length(matches if own is None else matches & own)
        return accepted, target.gather(1, accepted[:, None]).squeeze(1)
    p = torch.softmax(target_scores, dim=-1)  # (B, k + 1, V)
    q = torch.softmax(draft_scores, dim=-1)  # (B, k, V)
    p_x = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_x = q.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.stack([uniform_noise(keys, counters + j, 1, STREAM_ACCEPT)[:, 0] for j in range(k)], 1)
    # Accept x_j when u_j < p_j(x_j) / q_j(x_j), i.e. with probability min(1, p_j(x_j) / q_j(x_j)) (written
    # without the division: q_x > 0 for every drafted token, and u < 1).
    kept = u * q_x < p_x
    accepted = _prefix_length(kept if own is None else kept & own)
    rows = torch.arange(draft.shape[0], device=draft.device)
    p_next = p[rows, accepted]  # (B, V)
    rejected = accepted < (k if limits is None else limits)  # a row that kept all its own drafts: p_{limit+1}
    q_next = q[rows, accepted.clamp_max(k - 1)] * rejected[:, None]
    choice = residual_distribution(p_next, q_next)
    noise = gumbel_noise(keys, counters + accepted, choice.shape[-1], STREAM_RESIDUAL)
    return accepted, (choice.log() + noise).argmax(-1)


def _prefix_length(matches: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True in each row of ``(B, k)``."""
    return matches.long().cumprod(dim=1).sum(dim=1)


@dataclass
class SpeculativeStats:
    """Acceptance accounting of one row (or summed over rows)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    proposed_at: list[int] = field(default_factory=list)  # drafts proposed at position j (1-based index j-1)
    accepted_at: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        grow = drafted - len(self.proposed_at)
        if grow > 0:
            self.proposed_at += [0] * grow
            self.accepted_at += [0] * grow
        for j in range(drafted):
            self.proposed_at[j] += 1
            self.accepted_at[j] += int(j < accepted)

    def merge(self, other: SpeculativeStats) -> None:
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        for j in range(len(other.proposed_at)):
            if j >= len(self.proposed_at):
                self.proposed_at.append(0)
                self.accepted_at.append(0)
            self.proposed_at[j] += other.proposed_at[j]
            self.accepted_at[j] += other.accepted_at[j]

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_length": self.accepted / self.rounds if self.rounds else None,
            "tokens_per_round": self.emitted / self.rounds if self.rounds else None,
            "acceptance_by_position": [
                a / n if n else None for a, n in zip(self.accepted_at, self.proposed_at, strict=True)
            ],
        }


def next_k(acceptance: float | None, current: int) -> int:
    """``k: auto``: the draft length whose expected accepted run is worth drafting, from the acceptance rate.

    With per-position acceptance ``a``, position j is reached with probability ``a^(j-1)``; drafting
    stops where that falls under 1/4: ``k = floor(log(1/4) / log(a)) + 1``, between 1 and 8.
    """
    if acceptance is None:
        return current
    if acceptance >= 0.999:
        return K_AUTO_MAX
    if acceptance <= 0.0:
        return 1
    return max(1, min(K_AUTO_MAX, int(math.log(0.25) / math.log(acceptance)) + 1))


def describe_stats(stats: dict[str, object]) -> str:
    """One readable line of speculative accounting (``SpeculativeStats.to_dict()`` plus the ``draft`` role
    and, with a draft vocabulary, its ``draft_vocab`` size), for the log and ``generate --inspect``."""

    def number(value: object, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    vocab = f", draft vocabulary {stats['draft_vocab']}" if stats.get("draft_vocab") else ""
    positions = " ".join(number(a, 2) for a in stats.get("acceptance_by_position") or [])
    return (
        f"draft {stats['draft']}{vocab}, {stats['rounds']} rounds, acceptance {number(stats['acceptance_rate'], 2)}, "
        f"mean accepted length {number(stats['mean_accepted_length'], 2)}, by position {positions or 'n/a'}"
    )
