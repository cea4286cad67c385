"""The decoding loops ``FusedLM`` runs a batch with: eager (growing caches; finished rows dropped),
static (preallocated caches and one in-place fused step, captured as a CUDA graph on a GPU) and
speculative (a drafter proposes, every fused source checks in one forward). Each yields one
:class:`~trimix.decoding.results.Step` per position; the stop checker decides when a row ends.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trimix.config import GenerationConfig
from trimix.decoding.results import Step
from trimix.decoding.sampling import STREAM_DRAFT, TokenChooser, sampling_key
from trimix.decoding.speculative import (
    K_AUTO_START,
    SpeculativeStats,
    describe_stats,
    frequent_tokens,
    next_k,
    verify_drafts,
)
from trimix.decoding.static import Batch, FusedStep, GraphSession, bucket_capacity, bucket_size
from trimix.decoding.stopping import StopChecker
from trimix.fusion import fused_scores

if TYPE_CHECKING:
    from trimix.decoding.fused import FusedLM

logger = logging.getLogger(__name__)


@torch.inference_mode()
def decode_eager(
    lm: FusedLM,
    encodings: list[dict[str, torch.Tensor]],
    gen: GenerationConfig,
    keys: torch.Tensor,
    tracker: StopChecker,
) -> Iterator[Step]:
    device = lm.fusion_device
    chooser = TokenChooser(gen)
    batch = len(tracker.rows)
    weights = torch.tensor([lm.weight_vector()] * batch, dtype=torch.float32, device=device)
    keys, counters = keys.to(device), torch.zeros(batch, dtype=torch.long, device=device)
    prefilled = [
        s.backend.prefill(e["input_ids"], e["attention_mask"])
        for s, e in zip(lm.sources, encodings, strict=True)
    ]
    logits, states = [p[0] for p in prefilled], [p[1] for p in prefilled]
    active = torch.arange(batch)
    alive = [i for i in range(batch) if not tracker.done(i)]
    if len(alive) < batch:  # rows with no room at all never decode
        active = torch.tensor(alive, dtype=torch.long)
        _keep(lm, states, active)
        logits = [x[active.to(x.device)] for x in logits]
    while active.numel():
        rows = active.to(device)
        source_logits = [x.to(device) for x in logits]
        scores = fused_scores(
            source_logits,
            weights[rows],
            lm.vocab_size,
            lm.plausibility_index,
            lm.plausibility_alpha,
            lm.combine,
        )
        tokens = chooser(scores, keys[rows], counters[rows])
        counters[rows] += 1
        finish = tracker.record(active.tolist(), tokens.tolist())
        inspection = (
            lm.inspect_step(source_logits, scores, tokens, gen.inspect_top_k) if gen.inspect_top_k else None
        )
        yield Step(active.tolist(), tokens.tolist(), finish, inspection)
        keep = torch.tensor([f is None for f in finish])
        if not keep.any():
            return
        if not keep.all():
            kept = keep.nonzero().squeeze(-1)
            active, tokens = active[kept], tokens[kept.to(tokens.device)]
            _keep(lm, states, kept)
        logits = [
            s.backend.advance(st, tokens[:, None])[:, -1] for s, st in zip(lm.sources, states, strict=True)
        ]


def _keep(lm: FusedLM, states: list[Any], rows: torch.Tensor) -> None:
    for source, state in zip(lm.sources, states, strict=True):
        source.backend.keep_rows(state, rows)


@torch.inference_mode()
def decode_static(
    lm: FusedLM,
    encodings: list[dict[str, torch.Tensor]],
    gen: GenerationConfig,
    keys: torch.Tensor,
    tracker: StopChecker,
    graphs: bool,
) -> Iterator[Step]:
    live = len(tracker.rows)
    widest = max(int(e["input_ids"].shape[1]) for e in encodings)
    needed = widest + max(r.budget for r in tracker.rows.values())
    batch, capacity = (bucket_size(live), bucket_capacity(needed)) if graphs else (live, needed)
    padded = Batch(
        [
            pad_rows(e["input_ids"], batch, s.tokenizer.pad_token_id)
            for s, e in zip(lm.sources, encodings, strict=True)
        ],
        [pad_rows(e["attention_mask"], batch, 0) for e in encodings],
    )
    chooser = TokenChooser(gen)
    eos = torch.tensor(tracker.eos, dtype=torch.long, device=lm.fusion_device)
    compiled = gen.compile if gen.compile is not None else graphs

    def make_step(backends: list[Any], states: list[Any]) -> FusedStep:
        return FusedStep(
            backends,
            states,
            lm.vocab_size,
            lm.plausibility_index,
            lm.plausibility_alpha,
            chooser,
            eos,
            int(lm.tokenizer.pad_token_id),
            compiled,
            lm.combine,
        )

    def create() -> GraphSession:
        return GraphSession([s.backend for s in lm.sources], batch, capacity, make_step, graphs)

    if graphs:
        key = (
            lm.roles,
            batch,
            capacity,
            lm.plausibility_index,
            lm.plausibility_alpha,
            lm.fusion.method,
            sampling_key(gen),
            tuple(tracker.eos),
            compiled,
        )
        session, fresh = lm.pool.sessions.get(key, create)
        if fresh:
            logger.info("engine graphs: new session for batch %d, %d cache columns", batch, capacity)
    else:
        session = create()
    weights = torch.tensor([lm.weight_vector()] * batch, dtype=torch.float32)
    all_keys = torch.cat([keys, torch.zeros(batch - live, dtype=torch.long)])
    session.load(padded, all_keys.to(lm.fusion_device), weights.to(lm.fusion_device), live)
    step = session.step_fn
    never = [i for i in range(live) if tracker.done(i)]
    if never:
        step.finished[torch.tensor(never, device=step.finished.device)] = True
    while True:
        active = [i for i in range(live) if not tracker.done(i)]
        if not active:
            return
        chosen = step.chosen.tolist()
        tokens = [chosen[i] for i in active]
        finish = tracker.record(active, tokens)
        inspection = None
        if gen.inspect_top_k:
            rows = torch.tensor(active, device=lm.fusion_device)
            inspection = lm.inspect_step(
                [x[rows] for x in step.source_logits],
                step.scores[rows],
                step.chosen[rows],
                gen.inspect_top_k,
            )
        yield Step(active, tokens, finish, inspection)
        ended = [i for i, f in zip(active, finish, strict=True) if f is not None]
        if ended:
            step.finished[torch.tensor(ended, device=step.finished.device)] = True
        if all(tracker.done(i) for i in range(live)):
            return
        session.step()


@torch.inference_mode()
def decode_speculative(
    lm: FusedLM,
    prompts: Sequence[str],
    encodings: list[dict[str, torch.Tensor]],
    gen: GenerationConfig,
    keys: torch.Tensor,
    tracker: StopChecker,
) -> Iterator[Step]:
    """Rounds of draft-then-verify on growing caches (see :mod:`trimix.decoding.speculative`)."""
    device, vocab = lm.fusion_device, lm.vocab_size
    chooser = TokenChooser(gen)
    batch = len(tracker.rows)
    draft_role = lm.drafter(gen)
    drafter = lm.pool.get(draft_role)
    draft_index = lm.roles.index(draft_role) if draft_role in lm.roles else None
    weights = torch.tensor([lm.weight_vector()] * batch, dtype=torch.float32, device=device)
    keys = keys.to(device)
    prefilled = [
        s.backend.prefill(e["input_ids"], e["attention_mask"])
        for s, e in zip(lm.sources, encodings, strict=True)
    ]
    states = [state for _, state in prefilled]
    if draft_index is None:
        enc = lm.encode(drafter, prompts)
        _, draft_state = drafter.backend.prefill(enc["input_ids"], enc["attention_mask"])
    else:
        draft_state = states[draft_index]
    all_states = states + ([draft_state] if draft_index is None else [])
    backends = [s.backend for s in lm.sources] + ([drafter.backend] if draft_index is None else [])
    draft_head, draft_ids = None, None
    if gen.speculative.draft_vocab is not None:
        draft_enc = enc if draft_index is None else encodings[draft_index]
        draft_ids = frequent_tokens(
            lm.pool.token_counts(draft_role, gen.speculative.draft_vocab_text),
            gen.speculative.draft_vocab,
            [
                *draft_enc["input_ids"][draft_enc["attention_mask"].bool()].tolist(),
                *_eos(lm, tracker).tolist(),
            ],
            vocab,
        )
        draft_head = drafter.backend.restricted_head(draft_ids)
        draft_ids = draft_ids.to(device)
        logger.info("the drafter proposes among %d of %d tokens", len(draft_ids), vocab)
    # The first token comes from the prefill, as in plain fused decoding.
    logits = [x.to(device) for x, _ in prefilled]
    scores = fused_scores(logits, weights, vocab, lm.plausibility_index, lm.plausibility_alpha, lm.combine)
    first = chooser(scores, keys, torch.zeros(batch, dtype=torch.long, device=device))
    alive = [i for i in range(batch) if not tracker.done(i)]
    finish = tracker.record(alive, first[alive].tolist())
    inspection = (
        lm.inspect_step([x[alive] for x in logits], scores[alive], first[alive], gen.inspect_top_k)
        if gen.inspect_top_k
        else None
    )
    yield Step(alive, first[alive].tolist(), finish, inspection)
    stats = {row: SpeculativeStats() for row in range(batch)}
    active = [row for row, reason in zip(alive, finish, strict=True) if reason is None]
    _keep_all(backends, all_states, torch.tensor(active, dtype=torch.long))
    pending = first[torch.tensor(active, dtype=torch.long, device=device)]
    k = gen.speculative.k if gen.speculative.k != "auto" else K_AUTO_START
    total = SpeculativeStats()
    while active:
        rows = torch.tensor(active, dtype=torch.long, device=device)
        room = min(tracker.rows[r].budget - len(tracker.tokens(r)) for r in active)
        k_round = max(0, min(k, room - 1))
        counters = torch.tensor([len(tracker.tokens(r)) for r in active], dtype=torch.long, device=device)
        before = [state.next_position.clone() for state in all_states]
        # draft_logits: what each draft was chosen from; drafter_logits: the drafter's full logits at the
        # k + 1 positions (the same unless the drafter proposes from a smaller vocabulary).
        token, draft_logits, draft_hidden, drafts = pending, [], [], []
        for j in range(k_round + 1):
            if draft_head is None:
                step_logits = drafter.backend.advance(draft_state, token[:, None])[:, -1].to(device)
                draft_logits.append(step_logits)
            else:
                hidden = drafter.backend.advance(draft_state, token[:, None], hidden=True)[:, -1]
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
                token = _draft_choice(lm, chooser, step_logits[:, :vocab], keys[rows], counters + j)
                drafts.append(token)
        sequence = torch.stack([pending, *drafts], dim=1)  # (b, k + 1)
        if draft_index is None:
            drafter_logits = None
        elif draft_head is None:
            drafter_logits = torch.stack(draft_logits, 1)
        else:
            drafter_logits = drafter.backend.head_logits(torch.stack(draft_hidden, 1)).to(device)
        source_logits = [
            drafter_logits if i == draft_index else source.backend.advance(states[i], sequence).to(device)
            for i, source in enumerate(lm.sources)
        ]
        scores = fused_scores(
            source_logits,
            weights[rows],
            vocab,
            lm.plausibility_index,
            lm.plausibility_alpha,
            lm.combine,
        )
        drafted = torch.stack(drafts, 1) if drafts else sequence[:, :0]
        target = warp_positions(chooser, scores)
        draft_scores = None  # greedy: drafts are checked against the fused argmax
        if chooser.do_sample:
            draft_scores = (
                warp_positions(chooser, torch.stack(draft_logits[:k_round], 1)[..., :vocab].float())
                if k_round
                else scores.new_zeros(len(active), 0, vocab)
            )
        accepted, following = verify_drafts(target, drafted, draft_scores, keys[rows], counters)
        # Row b emits its first accepted[b] drafts, then the token that follows them.
        emitted = torch.cat([drafted, following[:, None]], 1).scatter(
            1, accepted[:, None], following[:, None]
        )
        counts = accepted + 1
        yield from _emit_round(
            lm, active, emitted, counts, tracker, gen, source_logits, scores, stats, k_round, accepted
        )
        for row, a, kept in zip(active, accepted.tolist(), counts.tolist(), strict=True):
            stats[row].record(k_round, a, kept)
        continuing = [i for i, row in enumerate(active) if not tracker.done(row)]
        keep = torch.tensor(continuing, dtype=torch.long)
        _keep_all(backends, all_states, keep)
        for backend, state, old in zip(backends, all_states, before, strict=True):
            lengths = (old.to(keep.device)[keep] + 1 + accepted.to(keep.device)[keep]).to(old.device)
            backend.crop(state, lengths)
        pending = following[keep.to(device)]
        active = [active[i] for i in continuing]
        if gen.speculative.k == "auto":
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


def _draft_choice(
    lm: FusedLM, chooser: TokenChooser, logits: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
) -> torch.Tensor:
    return chooser(logits.float(), keys, counters, STREAM_DRAFT)


def _emit_round(
    lm: FusedLM,
    active: list[int],
    emitted: torch.Tensor,
    counts: torch.Tensor,
    tracker: StopChecker,
    gen: GenerationConfig,
    source_logits: list[torch.Tensor],
    scores: torch.Tensor,
    stats: dict[int, SpeculativeStats],
    k_round: int,
    accepted: torch.Tensor,
) -> Iterator[Step]:
    """Hand a round's tokens to the host bookkeeping position by position, so that an end-of-sequence,
    a stop string, the token budget or the context inside the accepted run ends the row exactly there."""
    tokens, counts = emitted.tolist(), counts.tolist()
    for position in range(max(counts)):
        rows = [i for i, row in enumerate(active) if position < counts[i] and not tracker.done(row)]
        if not rows:
            break
        picked = [tokens[i][position] for i in rows]
        finish = tracker.record([active[i] for i in rows], picked)
        inspection = None
        if gen.inspect_top_k:
            index = torch.tensor(rows, device=scores.device)
            inspection = lm.inspect_step(
                [x[index, position] for x in source_logits],
                scores[index, position],
                torch.tensor(picked, device=scores.device),
                gen.inspect_top_k,
            )
        yield Step([active[i] for i in rows], picked, finish, inspection)


def _eos(lm: FusedLM, tracker: StopChecker) -> torch.Tensor:
    return torch.tensor(tracker.eos, dtype=torch.long, device=lm.fusion_device)


def _keep_all(backends: list[Any], states: list[Any], rows: torch.Tensor) -> None:
    if (
        rows.numel()
        and rows.numel() == states[0].batch_size
        and bool((rows == torch.arange(rows.numel())).all())
    ):
        return
    for backend, state in zip(backends, states, strict=True):
        backend.keep_rows(state, rows)


def warp_positions(chooser: TokenChooser, scores: torch.Tensor) -> torch.Tensor:
    """Apply the chooser's warpers to ``(B, J, V)`` scores, position by position."""
    if not chooser.do_sample:
        return scores
    batch, positions, vocab = scores.shape
    return chooser.warp(scores.reshape(batch * positions, vocab)).reshape(batch, positions, vocab)


def pad_rows(tensor: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    extra = tensor.new_full((rows - tensor.shape[0], tensor.shape[1]), value)
    return torch.cat([tensor, extra])


def spread(logits: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Scores over ``ids`` ``(B, N)`` placed in a ``(B, vocab)`` row, ``-inf`` at every other token."""
    full = logits.new_full((logits.shape[0], vocab), float("-inf"))
    return full.index_copy_(1, ids, logits)
