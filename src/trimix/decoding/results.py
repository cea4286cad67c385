"""What decoding returns: generations, stream events, per-token inspection, likelihoods; and the per-step
record the decoding loops hand to ``generate`` and ``stream``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from trimix.decoding.stopping import FinishReason
from trimix.fusion import margin_contributions


@dataclass
class SourceCandidates:
    """One source's view of one generated position."""

    prob_of_chosen: float
    top: list[tuple[str, float]]


@dataclass
class TokenInspection:
    """Which source drove one generated token: the chosen token, every source's top candidates, and each
    source's share of the fused margin over the runner-up (``contributions``; the largest: ``leader``).
    Tokens are shown as text (a piece of a multi-byte character is marked ``⟨partial⟩``)."""

    token_id: int
    token: str
    fused_prob: float
    fused_top: list[tuple[str, float]]
    sources: dict[str, SourceCandidates]
    contributions: dict[str, float] = field(default_factory=dict)
    leader: str | None = None


@dataclass
class Generation:
    """The output for one prompt."""

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    inspection: list[TokenInspection] | None = None
    stats: dict[str, Any] | None = None  # speculative decoding: acceptance accounting of this prompt

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("inspection", "stats"):
            if data[optional] is None:
                data.pop(optional)
        return data


@dataclass
class StreamEvent:
    """One generated token of one prompt, as it is produced."""

    index: int
    token_id: int
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    generation: Generation | None = None  # the whole result, on a prompt's last event


@dataclass(frozen=True)
class Loglikelihood:
    """A continuation's fused log-probability given its context, and whether greedy decoding produces it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class Step:
    """One position of decoding, as a runner hands it to the scheduler (rows by their sequence ids)."""

    rows: list[int]  # the rows that got a token this step
    tokens: list[int]
    finish: list[FinishReason | None]
    inspection: list[TokenInspection] | None = None
    closed: list[tuple[int, FinishReason]] = field(default_factory=list)  # rows ended without a token
    stats: dict[int, dict[str, Any]] | None = None  # speculative accounting per row, sent once per batch
    texts: list[str] = field(default_factory=list)  # each row's text after this step (scheduler ``texts``)
    scores: torch.Tensor | None = None  # (rows, V) the fused scores each token was chosen from, on request
    failed: list[tuple[int, Exception]] = field(default_factory=list)  # rows refused at admission


@dataclass
class RowText:
    """Per-row bookkeeping shared by generate() and stream()."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    inspection: list[TokenInspection] = field(default_factory=list)
    stats: dict[str, Any] | None = None


def inspect_tokens(
    roles: Sequence[str],
    vocab: int,
    token_text: Callable[[int], str],
    source_logits: Sequence[torch.Tensor],
    scores: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    weights: torch.Tensor,
) -> list[TokenInspection]:
    """One :class:`TokenInspection` per row of a decoding step: each source's and the fused top-``k``
    candidates, and each source's share of the chosen token's margin over the runner-up."""
    fused_probs = torch.softmax(scores, dim=-1)
    source_probs = [torch.softmax(x[..., :vocab].float(), dim=-1) for x in source_logits]
    best_two = scores.topk(2, dim=-1).indices  # the runner-up: the best token other than the chosen one
    runner_up = torch.where(best_two[:, 0] == tokens, best_two[:, 1], best_two[:, 0])
    margins = margin_contributions([x[..., :vocab] for x in source_logits], weights, tokens, runner_up)
    result = []
    for i, token in enumerate(tokens.tolist()):

        def top(probs: torch.Tensor, i: int = i) -> list[tuple[str, float]]:
            values, ids = probs[i].topk(min(k, vocab))
            return [(token_text(int(t)), float(v)) for v, t in zip(values, ids, strict=True)]

        shares = dict(zip(roles, margins[i].tolist(), strict=True))
        result.append(
            TokenInspection(
                token_id=token,
                token=token_text(token),
                fused_prob=float(fused_probs[i, token]),
                fused_top=top(fused_probs),
                sources={
                    role: SourceCandidates(float(p[i, token]), top(p))
                    for role, p in zip(roles, source_probs, strict=True)
                },
                contributions=shares,
                leader=max(shares, key=shares.get) if shares else None,
            )
        )
    return result
