"""Fused perplexity of many weight combinations from one forward pass per source per text.

The fused log-probability of a token is linear in the weights before the softmax but not after it,
so every combination needs its own log-sum-exp over the vocabulary. Holding the sources' logits for
every text would cost ``N x T x V`` floats per text (about 1 GB for three Gemma 3 270M sources on a
300-token prompt), so the scorer keeps each source's final hidden states (``T x H``) instead and
recomputes the output projection block by block. Memory is bounded by ``chunk_bytes`` plus one
vocabulary row per distinct weight value, not by the number of combinations, and later scoring passes
(refinement rounds) run no forward pass at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from trimix.backends.base import FORK, HIDDEN, has_capability
from trimix.backends.loading import Source
from trimix.errors import ConfigError, DataError
from trimix.fusion.math import fuse_logits, rule_out_impossible
from trimix.search.features import common_prefix, head_logits, prefix_features, suffix_features
from trimix.search.partition import combination_nll
from trimix.search.totals import ScoreTotals, token_script

logger = logging.getLogger(__name__)
_MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a cache copy per text
_SUFFIX_BATCH = 8  # texts continued from one copy of the shared prefix's cache at a time
_SMALL_VOCAB = 4096  # logits per position up to which whole texts run side by side (byte-level sources)
_SMALL_VOCAB_BATCH = 16


@dataclass(frozen=True)
class ScoringText:
    """A text to score.

    Either ``text`` is tokenised (the tokenizer's specials included) and tokens starting at or after
    the character offset ``score_from`` count, or ``tokens`` gives the ids directly and the last
    ``score_last`` of them count (as for lm-evaluation-harness requests).
    """

    id: str
    text: str
    score_from: int = 0
    tokens: Sequence[int] | None = None
    score_last: int | None = None
    spans: tuple[tuple[int, int], ...] = ()  # character spans of the task's own text (the rest: template)


@dataclass
class _Encoded:
    text_id: str
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (P,) positions whose next token counts
    targets: torch.Tensor  # (P,)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> (P, H) hidden states
    groups: torch.Tensor | None = None  # (P,) 1 where the scored token is the task's own text, 0 template
    scripts: list[str] = field(default_factory=list)  # (P,) the writing system of each scored token


def _right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d id tensors as one right-padded batch ``(B, k)`` (padded with a real id) and its ``valid`` mask."""
    pad = int(next(r for r in rows if r.numel())[0])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    valid = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(r, dtype=torch.bool) for r in rows], batch_first=True, padding_value=False
    )
    return padded, valid


def _run_batched(backend: Any, role: str, items: list[_Encoded]) -> None:
    """Texts run whole side by side, right-padded, ``_SMALL_VOCAB_BATCH`` at a time: for sources whose
    logits are small enough to keep for every position (a byte-level source's 258), where each step of
    a batch costs about what one row's does."""
    for b0 in range(0, len(items), _SMALL_VOCAB_BATCH):
        batch = items[b0 : b0 + _SMALL_VOCAB_BATCH]
        first = torch.stack([item.input_ids[:1] for item in batch])
        logits, state = backend.prefill(first, torch.ones_like(first))
        rests = [item.input_ids[1:] for item in batch]
        after = None
        if max(r.numel() for r in rests):
            after = backend.advance(state, *_right_padded(rests))
        for row, item in enumerate(batch):
            whole = logits[row : row + 1] if after is None else torch.cat([logits[row : row + 1], after[row]])
            item.features[role] = whole[item.positions.to(whole.device)]


def _run_whole(backend: Any, role: str, items: list[_Encoded]) -> None:
    """Each text's features from a run of the whole text, no prefix shared."""
    for item in items:
        item.features[role], _ = prefix_features(backend, item.input_ids[None], item.positions)


class FusedPerplexityScorer:
    """Scores weight combinations by fused perplexity on a fixed set of texts.

    Args:
        sources: the fused sources, in weight-vector order.
        vocab_size: V, the shared tokenizer vocabulary (padded rows are cut).
        texts: the texts and which part of each counts.
        chunk_bytes: memory budget for one block of the sources' logits; the log-partition adds one
            vocabulary-sized buffer per distinct weight value of each source, however many
            combinations those values form.
        progress: show a progress bar over texts on the forward pass.
        share_prefix: run a token prefix that every text shares once per source and continue each
            text from its KV cache (same hidden states; fewer forward tokens).

    Raises:
        DataError: a text longer than a source's context, or no token to score.
        ConfigError: sources that would read different token sequences.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        vocab_size: int,
        texts: Sequence[ScoringText],
        chunk_bytes: int = 1024 * 2**20,
        progress: bool = True,
        share_prefix: bool = True,
    ) -> None:
        if not texts:
            raise DataError("no texts to score; give at least one prompt")
        chat = [s.role for s in sources if s.config.prompt_format != "raw"]
        if chat:
            raise ConfigError(
                f"weight search scores one token sequence under every source, but {chat} use prompt_format 'chat'; "
                "set prompt_format: raw for the search (the paper feeds every source the same prompt)"
            )
        self.sources = list(sources)
        self.device = self.sources[0].input_device  # where logits are fused
        self.vocab_size = vocab_size
        self.chunk_elements = max(chunk_bytes // 4, vocab_size)
        self.progress = progress
        self.share_prefix = share_prefix
        self.shared_prefix_tokens = 0
        self.forward_seconds = 0.0
        self.encoded = [self._encode(t) for t in texts]
        self.n_tokens = sum(int(e.targets.numel()) for e in self.encoded)
        if self.n_tokens == 0:
            raise DataError("the texts leave no token to score (is `score: input` pointing past every text?)")
        self._run_forwards()

    def _encode(self, item: ScoringText) -> _Encoded:
        if item.tokens is not None:
            ids = torch.tensor(list(item.tokens), dtype=torch.long)
            self._check_length(item, ids)
            count = min(item.score_last or ids.numel() - 1, ids.numel() - 1)
            counted = torch.arange(ids.numel() - 1 - count, ids.numel() - 1)
            return _Encoded(item.id, ids, counted, ids[1:][counted])
        tokenizer = self.sources[0].tokenizer
        enc = tokenizer(item.text, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        self._check_length(item, ids)
        offsets = enc["offset_mapping"]
        starts = torch.tensor([start for start, _ in offsets])
        # Token j is predicted at position j - 1; the first token (BOS) is never predicted.
        counted = (starts[1:] >= item.score_from).nonzero().squeeze(-1)
        spans = item.spans
        scored = [offsets[int(p) + 1] for p in counted]
        groups = torch.tensor(
            [int(any(a <= start < b for a, b in spans)) for start, _ in scored], dtype=torch.long
        )
        scripts = [token_script(item.text[start:end]) for start, end in scored]
        return _Encoded(item.id, ids, counted, ids[1:][counted], groups=groups, scripts=scripts)

    def _check_length(self, item: ScoringText, ids: torch.Tensor) -> None:
        for source in self.sources:
            limit = source.max_positions
            if limit is not None and ids.numel() > limit:
                raise DataError(
                    f"text {item.id!r} has {ids.numel()} tokens, {ids.numel() - limit} more than the context of "
                    f"source {source.role!r} ({limit}); shorten it or lower the number of exemplars"
                )

    def _shared_prefix(self) -> int:
        """Leading tokens every text shares (instructions, few-shot exemplars, a passage before its
        options), kept below every text's length; 0 when too short to be worth a cache."""
        if len(self.encoded) < 2:
            return 0
        shared = min(int(e.input_ids.numel()) for e in self.encoded) - 1
        for item in self.encoded[1:]:
            shared = min(shared, common_prefix(item.input_ids, self.encoded[0].input_ids))
        return shared if shared >= _MIN_SHARED_PREFIX else 0

    def _prefix_groups(self) -> list[tuple[int, list[int]]]:
        """The texts as groups that run a shared token prefix once: ``(prefix length, text indices)``.

        Consecutive texts sharing at least ``_MIN_SHARED_PREFIX`` tokens more than every text shares (one
        context under several continuations, as log-likelihood choices come) form a group of their own;
        the rest share the prefix common to all texts (0: each runs whole)."""
        if not self.share_prefix:
            return [(0, list(range(len(self.encoded))))]
        everyone = self._shared_prefix()
        groups, rest, i = [], [], 0
        while i < len(self.encoded):
            shared, j = self.encoded[i].input_ids.numel() - 1, i + 1
            while j < len(self.encoded):
                ids = self.encoded[j].input_ids
                common = min(shared, ids.numel() - 1, common_prefix(ids, self.encoded[i].input_ids))
                if common < everyone + _MIN_SHARED_PREFIX:
                    break
                shared, j = common, j + 1
            if j - i > 1:
                groups.append((int(shared), list(range(i, j))))
            else:
                rest.append(i)
            i = j
        return groups + ([(everyone, rest)] if rest else [])

    @torch.inference_mode()
    def _run_forwards(self) -> None:
        """One forward per source per text; a prefix a group of texts shares runs once, and their
        remainders continue from its cache in right-padded batches (causal attention never lets a real
        token see the padding after it), which gives the same features as running every text whole."""
        start = time.perf_counter()
        groups = self._prefix_groups()
        bar = tqdm(
            total=len(self.encoded) * len(self.sources),
            desc="search: forward passes",
            unit="forward",
            disable=not self.progress,
        )
        for source in self.sources:
            backend = source.backend
            if not has_capability(backend, HIDDEN) and backend.logit_rows <= _SMALL_VOCAB:
                _run_batched(backend, source.role, self.encoded)
                bar.update(len(self.encoded))
                continue
            for prefix, members in groups:
                items = [self.encoded[i] for i in members]
                if not prefix or not has_capability(backend, FORK):
                    _run_whole(backend, source.role, items)
                else:
                    self._run_group(backend, source.role, prefix, items)
                bar.update(len(members))
        bar.close()
        self.shared_prefix_tokens = max((prefix for prefix, members in groups), default=0)
        self.prefix_groups = sum(1 for prefix, _ in groups if prefix)
        self.forward_seconds = time.perf_counter() - start

    def _run_group(self, backend: Any, role: str, prefix: int, items: list[_Encoded]) -> None:
        """Texts sharing their first ``prefix`` tokens: the prefix once, then the rest from forks of its
        state, ``_SUFFIX_BATCH`` texts at a time."""
        inside = torch.unique(torch.cat([item.positions[item.positions < prefix] for item in items]))
        kept, prefix_state = prefix_features(backend, items[0].input_ids[None, :prefix], inside)
        for b0 in range(0, len(items), _SUFFIX_BATCH):
            batch = items[b0 : b0 + _SUFFIX_BATCH]
            rests = [item.input_ids[prefix:] for item in batch]
            padded, valid = _right_padded(rests)
            columns = [item.positions[item.positions >= prefix] - prefix for item in batch]
            try:
                state = backend.fork(prefix_state, len(batch))
            except ConfigError:  # a backend with too few free rows for the batch: these texts run whole
                _run_whole(backend, role, batch)
                continue
            after = suffix_features(backend, state, padded, valid, columns)
            del state  # its rows' cache goes back before the next batch forks
            for item, features in zip(batch, after, strict=True):
                before = kept[torch.searchsorted(inside, item.positions[item.positions < prefix])]
                item.features[role] = torch.cat([before.to(features.device), features])

    @torch.inference_mode()
    def score(
        self,
        weights: torch.Tensor,
        desc: str = "search: scoring",
        greedy: bool = False,
        combine: Callable[..., torch.Tensor] | None = None,
    ) -> ScoreTotals:
        """Summed NLL of each row of ``weights`` ``(C, N)`` over all scored tokens; with ``greedy``, also
        whether every scored token of a text is the fused argmax under each combination.

        ``combine``: a fusion method's combination that is not a fixed weighted sum (its weights depend on
        the logits, ``FusionMethod.linear`` False): each combination is then fused from the full logits
        instead of the factorised log-partition."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        n_sources, n_combos = len(self.sources), weights.shape[0]
        # The output projection runs on blocks of positions sized by the memory budget (a GEMM; one
        # position at a time would re-read the whole head); the log-partition then walks each block one
        # position at a time (see combination_nll). Neither size depends on the number of combinations.
        positions_per_chunk = max(1, self.chunk_elements // (self.vocab_size * n_sources))
        longest = max(e.targets.numel() for e in self.encoded)
        block = torch.empty(n_sources, min(positions_per_chunk, longest), self.vocab_size, device=self.device)
        weights = weights.to(self.device)
        per_text = torch.zeros(len(self.encoded), n_combos, dtype=torch.float64)
        per_text_group = torch.zeros(len(self.encoded), 2, n_combos, dtype=torch.float64)
        all_greedy = torch.ones(len(self.encoded), n_combos, dtype=torch.bool)
        for text_index, item in enumerate(
            tqdm(self.encoded, desc=desc, unit="text", disable=not self.progress, leave=False)
        ):
            for p0 in range(0, item.targets.numel(), positions_per_chunk):
                p1 = p0 + positions_per_chunk
                count = min(p1, item.targets.numel()) - p0
                logits = block[:, :count]  # (N, P, V), reused across blocks: no fresh allocation
                for n, source in enumerate(self.sources):
                    head_logits(source, item.features[source.role][p0:p1], out=logits[n])
                targets = item.targets[p0:p1].to(self.device)
                if combine is not None:
                    for c in range(n_combos):
                        fused = rule_out_impossible(
                            combine(list(logits), weights[c].expand(count, n_sources), self.vocab_size),
                            [x[..., : self.vocab_size] for x in logits],
                        )
                        nll = (torch.logsumexp(fused, -1) - fused.gather(-1, targets[:, None])[:, 0]).double()
                        per_text[text_index, c] += nll.sum().cpu()
                        if item.groups is not None and item.groups.numel():
                            groups = item.groups[p0:p1].to(nll.device)
                            for g in range(2):
                                per_text_group[text_index, g, c] += nll[groups == g].sum().cpu()
                        if greedy:
                            all_greedy[text_index, c] &= bool((fused.argmax(-1) == targets).all())
                    continue
                if item.groups is not None and item.groups.numel():
                    sums = combination_nll(logits, targets, weights, item.groups[p0:p1], n_groups=2)
                    per_text_group[text_index] += sums
                    per_text[text_index] += sums.sum(0)
                else:
                    per_text[text_index] += combination_nll(logits, targets, weights)
                if greedy:
                    for c in range(n_combos):
                        picked = fuse_logits(logits, weights[c]).argmax(-1)
                        all_greedy[text_index, c] &= bool((picked == targets).all())
        grouped = [e.groups for e in self.encoded if e.groups is not None and e.groups.numel()]
        text_counts = self.token_groups_per_text()
        counts = self.token_groups() if grouped else None
        return ScoreTotals(
            per_text.sum(0),
            self.n_tokens,
            per_text,
            [int(e.targets.numel()) for e in self.encoded],
            all_greedy if greedy else None,
            per_text_group.sum(0) if grouped else None,
            counts,
            per_text_group if grouped else None,
            text_counts if grouped else None,
        )

    def token_groups_per_text(self) -> list[tuple[int, int]]:
        """Per text, its scored tokens of the prompt template and of the task's own text ((0, 0) for a
        text without the split)."""
        return [
            (int((e.groups == 0).sum()), int((e.groups == 1).sum())) if e.groups is not None else (0, 0)
            for e in self.encoded
        ]

    def token_groups(self) -> tuple[int, int]:
        """Scored tokens of the prompt template and of the task's own text."""
        per_text = self.token_groups_per_text()
        return sum(c[0] for c in per_text), sum(c[1] for c in per_text)

    def script_counts(self, group: int | None = None) -> dict[str, int]:
        """How many scored tokens each writing system has (in one group, or all)."""
        counts: dict[str, int] = {}
        for item in self.encoded:
            for position, script in enumerate(item.scripts):
                if group is None or (item.groups is not None and int(item.groups[position]) == group):
                    counts[script] = counts.get(script, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def text_ids(self) -> list[str]:
        return [e.text_id for e in self.encoded]
