"""Speculative fusion's runner: rounds of draft-then-verify on growing caches, one batch from start to end.

The acceptance rule, the statistics and the adaptive k are the pure parts in
:mod:`trimix.decoding.speculative`; this module is the loop (a drafter proposes up to k tokens, every
fused source checks them in one forward, the caches are cropped to what each row kept) as a runner of
the scheduler (:mod:`trimix.decoding.scheduler`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from trimix.backends.base import HIDDEN, has_capability
from trimix.backends.sequences import SequenceBatch
from trimix.config import GenerationConfig
from trimix.decoding.results import Step
from trimix.decoding.runners import Admission, BatchRows, WholeBatch
from trimix.decoding.sampling import STREAM_DRAFT, TokenChooser
from trimix.decoding.speculative import (
    K_AUTO_START,
    SpeculativeStats,
    describe_stats,
    frequent_tokens,
    next_k,
    verify_drafts,
)
from trimix.decoding.text import is_token_ids
from trimix.errors import ConfigError

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM

logger = logging.getLogger(__name__)


class SpeculativeRunner(WholeBatch):
    def __init__(self, lm: FusedLM, admission: Admission, engine: GenerationConfig) -> None:
        rows = BatchRows(admission.checker, admission.rows)
        super().__init__(decode_speculative(lm, admission, rows, engine), admission.rows)


@torch.inference_mode()
def decode_speculative(
    lm: FusedLM, admission: Admission, rows: BatchRows, engine: GenerationConfig
) -> Iterator[Step]:
    """Rounds of draft-then-verify on growing caches (see :mod:`trimix.decoding.speculative`)."""
    device, vocab = lm.fusion_device, lm.vocab_size
    encodings, spec, inspect_k = admission.encodings, engine.speculative, admission.inspect_k
    chooser = TokenChooser(admission.settings[0])
    batch = len(rows)
    draft_role = lm.drafter(engine)
    drafter = lm.pool.get(draft_role)
    draft_index = lm.roles.index(draft_role) if draft_role in lm.roles else None
    weights, keys = admission.weights.to(device), admission.keys.to(device)
    # This runner's sequence ids are its batch rows (BatchRows maps them to the group's).
    ids = list(range(batch))
    sequences = [SequenceBatch(s.backend) for s in lm.sources]
    first_logits = [
        seqs.start(ids, e["input_ids"], e["attention_mask"])
        for seqs, e in zip(sequences, encodings, strict=True)
    ]
    if draft_index is None:
        enc = lm.encode(drafter, [_plain(lm, p) for p in admission.prompts])
        draft_sequences = SequenceBatch(drafter.backend)
        draft_sequences.start(ids, enc["input_ids"], enc["attention_mask"])
    else:
        draft_sequences = sequences[draft_index]
    every = sequences + ([draft_sequences] if draft_index is None else [])
    draft_head, draft_ids = None, None
    if spec.draft_vocab is not None:
        if not has_capability(drafter.backend, HIDDEN):
            raise ConfigError(
                f"speculative.draft_vocab needs a drafter whose backend gives hidden states; {draft_role!r}'s "
                "does not (llama.cpp, for one, computes the whole output head at every position, where a draft "
                "vocabulary would save nothing). Drop draft_vocab or draft with another source"
            )
        draft_enc = enc if draft_index is None else encodings[draft_index]
        draft_ids = frequent_tokens(
            lm.pool.token_counts(draft_role, spec.draft_vocab_text),
            spec.draft_vocab,
            [*draft_enc["input_ids"][draft_enc["attention_mask"].bool()].tolist(), *rows.eos],
            vocab,
        )
        draft_head = drafter.backend.restricted_head(draft_ids)
        draft_ids = draft_ids.to(device)
        logger.info("the drafter proposes among %d of %d tokens", len(draft_ids), vocab)
    # The first token comes from the prefill, as in plain fused decoding.
    logits = [x.to(device) for x in first_logits]
    scores = lm.fuse(logits, weights)
    first = chooser(scores, keys, torch.zeros(batch, dtype=torch.long, device=device))
    alive = [i for i in range(batch) if not rows.done(i)]
    finish = rows.record(alive, first[alive].tolist())
    inspection = (
        lm.inspect_step([x[alive] for x in logits], scores[alive], first[alive], inspect_k, weights[alive])
        if inspect_k
        else None
    )
    yield Step(
        alive, first[alive].tolist(), finish, inspection, scores=scores[alive] if admission.scores else None
    )
    stats = {row: SpeculativeStats() for row in range(batch)}
    active = [row for row, reason in zip(alive, finish, strict=True) if reason is None]
    for seqs in every:
        seqs.release(set(ids) - set(active))
    pending = first[torch.tensor(active, dtype=torch.long, device=device)]
    k = spec.k if spec.k != "auto" else K_AUTO_START
    total = SpeculativeStats()
    while active:
        index = torch.tensor(active, dtype=torch.long, device=device)
        # Each row drafts as many tokens as its own budget leaves room for (a row near its end does not
        # shorten the others' drafts); the round drafts the most any row wants, the rest are masked.
        limits = [max(0, min(k, rows.budget(r) - len(rows.tokens(r)) - 1)) for r in active]
        k_round = max(limits)
        limit = torch.tensor(limits, dtype=torch.long, device=device)
        counters = torch.tensor([len(rows.tokens(r)) for r in active], dtype=torch.long, device=device)
        before = [seqs.lengths() for seqs in every]
        # draft_logits: what each draft was chosen from; drafter_logits: the drafter's full logits at the
        # k + 1 positions (the same unless the drafter proposes from a smaller vocabulary).
        token, draft_logits, draft_hidden, drafts = pending, [], [], []
        for j in range(k_round + 1):
            if draft_head is None:
                step_logits = draft_sequences.step(token[:, None])[:, -1].to(device)
                draft_logits.append(step_logits)
            else:
                hidden = draft_sequences.step(token[:, None], hidden=True)[:, -1]
                draft_hidden.append(hidden)
                if j == k_round:
                    break
                restricted = draft_head(hidden).to(device)
                if not chooser.do_sample:  # greedy: the argmax among the draft vocabulary (ids are sorted)
                    token = draft_ids[restricted.float().argmax(-1)]
                    drafts.append(token)
                    continue
                # sampling: the proposal over the whole vocabulary, for the noise and the acceptance rule
                step_logits = spread(restricted, draft_ids, vocab)
                draft_logits.append(step_logits)
            if j < k_round:
                token = _draft_choice(lm, chooser, step_logits[:, :vocab], keys[index], counters + j)
                drafts.append(token)
        sequence = torch.stack([pending, *drafts], dim=1)  # (b, k + 1)
        valid = torch.arange(k_round + 1, device=device)[None, :] <= limit[:, None]  # a row's own drafts
        if draft_index is None:
            drafter_logits = None
        elif draft_head is None:
            drafter_logits = torch.stack(draft_logits, 1)
        else:
            drafter_logits = drafter.backend.head_logits(torch.stack(draft_hidden, 1)).to(device)
        source_logits = [
            drafter_logits if i == draft_index else sequences[i].step(sequence, valid).to(device)
            for i in range(len(lm.sources))
        ]
        scores = lm.fuse(source_logits, weights[index])
        drafted = torch.stack(drafts, 1) if drafts else sequence[:, :0]
        target = warp_positions(chooser, scores)
        draft_scores = None  # greedy: drafts are checked against the fused argmax
        if chooser.do_sample:
            draft_scores = (
                warp_positions(chooser, torch.stack(draft_logits[:k_round], 1)[..., :vocab].float())
                if k_round
                else scores.new_zeros(len(active), 0, vocab)
            )
        accepted, following = verify_drafts(target, drafted, draft_scores, keys[index], counters, limit)
        # Row b emits its first accepted[b] drafts, then the token that follows them.
        emitted = torch.cat([drafted, following[:, None]], 1).scatter(
            1, accepted[:, None], following[:, None]
        )
        counts = accepted + 1
        yield from _emit_round(
            lm, active, emitted, counts, rows, admission, source_logits, scores, weights[index]
        )
        for row, drafted_here, a, kept in zip(
            active, limits, accepted.tolist(), counts.tolist(), strict=True
        ):
            stats[row].record(drafted_here, a, kept)
        continuing = [i for i, row in enumerate(active) if not rows.done(row)]
        kept, ended = accepted.tolist(), [row for row in active if rows.done(row)]
        for seqs, old in zip(every, before, strict=True):
            seqs.release(ended)
            seqs.roll_back({active[i]: old[active[i]] + 1 + kept[i] for i in continuing})
        pending = following[torch.tensor(continuing, dtype=torch.long, device=device)]
        active = [active[i] for i in continuing]
        if spec.k == "auto":
            merged = SpeculativeStats()
            for row_stats in stats.values():
                merged.merge(row_stats)
            k = next_k(merged.accepted / merged.drafted if merged.drafted else None, k)
    for row_stats in stats.values():
        total.merge(row_stats)
    draft = {"draft": draft_role, "draft_vocab": None if draft_ids is None else len(draft_ids)}
    logger.info("speculative fusion: %s", describe_stats({**draft, **total.to_dict()}))
    yield Step(
        [],
        [],
        [],
        stats={row: {**draft, **st.to_dict()} for row, st in stats.items()},
    )


def _plain(lm: FusedLM, prompt: Any) -> str:
    """A prompt as a drafter outside the fusion reads it: a completion prompt as is; chat messages as
    the fused sources that do not read chat see them."""
    if isinstance(prompt, str):
        return prompt
    if is_token_ids(prompt):
        return lm.tokenizer.decode(prompt)
    return lm.render(prompt)[lm.roles[0]]


def _draft_choice(
    lm: FusedLM, chooser: TokenChooser, logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    return chooser(logits.float(), keys, counters, STREAM_DRAFT)


def _emit_round(
    lm: FusedLM,
    active: list[int],
    emitted: torch.Tensor,
    counts: torch.Tensor,
    rows: BatchRows,
    admission: Admission,
    source_logits: list[torch.Tensor],
    scores: torch.Tensor,
    weights: torch.Tensor,
) -> Iterator[Step]:
    """Hand a round's tokens to the host bookkeeping position by position, so that an end-of-sequence,
    a stop string, the token budget or the context inside the accepted run ends the row exactly there."""
    tokens, counts = emitted.tolist(), counts.tolist()
    for position in range(max(counts)):
        chosen = [i for i, row in enumerate(active) if position < counts[i] and not rows.done(row)]
        if not chosen:
            break
        picked = [tokens[i][position] for i in chosen]
        finish = rows.record([active[i] for i in chosen], picked)
        index = torch.tensor(chosen, device=scores.device)
        inspection = None
        if admission.inspect_k:
            inspection = lm.inspect_step(
                [x[index, position] for x in source_logits],
                scores[index, position],
                torch.tensor(picked, device=scores.device),
                admission.inspect_k,
                weights[index],
            )
        at = scores[index, position] if admission.scores else None
        yield Step([active[i] for i in chosen], picked, finish, inspection, scores=at)


def warp_positions(chooser: TokenChooser, scores: torch.Tensor) -> torch.Tensor:
    """Apply the chooser's warpers to ``(B, J, V)`` scores, position by position."""
    if not chooser.do_sample:
        return scores
    batch, positions, vocab = scores.shape
    return chooser.warp(scores.reshape(batch * positions, vocab)).reshape(batch, positions, vocab)


def spread(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Scores over ``ids`` ``(B, N)`` placed in a ``(B, vocab)`` row, ``-inf`` at every other token."""
    full = logits.new_full((logits.shape[0], vocab), float("-inf"))
    return full.index_copy_(1, ids, logits)
