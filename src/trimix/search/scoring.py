"""Fused perplexity of many weight combinations from one forward pass per source per text.

The fused log-probability of a token is linear in the weights before the softmax but not after it,
so every combination needs its own log-sum-exp over the vocabulary. Holding the sources' logits for
every text would cost ``N x T x V`` floats per text (about 1 GB for three Gemma 3 270M sources on a
300-token prompt), so the scorer keeps each source's final hidden states (``T x H``) instead and
recomputes the output projection chunk by chunk. Memory is bounded by ``chunk_bytes`` whatever the
number of combinations, and later scoring passes (refinement rounds) run no forward pass at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from trimix.backends.loading import Source
from trimix.errors import ConfigError, DataError
from trimix.fusion.math import fuse_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringText:
    """A text to score; only tokens starting at or after ``score_from`` (a character offset) count."""

    id: str
    text: str
    score_from: int = 0


def combination_nll(
    source_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, combos_per_chunk: int
) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets`` under each fused combination.

    Args:
        source_logits: ``(N, T, V)`` raw logits of N sources at T positions.
        targets: ``(T,)`` the token ids that follow each position.
        weights: ``(C, N)`` one weight vector per combination.
        combos_per_chunk: how many combinations are fused at once (bounds memory to
            ``combos_per_chunk x T x V`` floats).

    Returns:
        ``(C,)`` float64 NLL sums (natural log).
    """
    total = torch.zeros(weights.shape[0], dtype=torch.float64)
    index = targets.view(1, -1, 1)
    for c0 in range(0, weights.shape[0], combos_per_chunk):
        fused = fuse_logits(source_logits, weights[c0 : c0 + combos_per_chunk])  # (c, T, V)
        chosen = fused.gather(-1, index.expand(fused.shape[0], -1, 1)).squeeze(-1)  # (c, T)
        total[c0 : c0 + fused.shape[0]] = (torch.logsumexp(fused, dim=-1) - chosen).double().sum(-1).cpu()
    return total


def head_logits(source: Source, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states: output projection plus any soft-capping.

    Family quirks are data: ``final_logit_softcapping`` (Gemma 2) is read from the config, and
    :class:`FusedPerplexityScorer` checks this function against a real forward before trusting it.
    """
    logits = source.model.get_output_embeddings()(hidden)
    cap = getattr(source.model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class _Encoded:
    text_id: str
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (P,) positions whose next token counts
    targets: torch.Tensor  # (P,)
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> (P, H) hidden states


@dataclass
class ScoreTotals:
    """NLL sums of C combinations over the same scored tokens."""

    nll: torch.Tensor  # (C,) float64
    n_tokens: int

    @property
    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.nll / max(self.n_tokens, 1))


class FusedPerplexityScorer:
    """Scores weight combinations by fused perplexity on a fixed set of texts.

    Args:
        sources: the fused sources, in weight-vector order.
        vocab_size: V, the shared tokenizer vocabulary (padded rows are cut).
        texts: the texts and which part of each counts.
        chunk_bytes: memory budget for one chunk of logits (sources' plus fused).
        progress: show a progress bar over texts on the forward pass.

    Raises:
        DataError: a text longer than a source's context, or no token to score.
        ConfigError: sources that would read different token sequences.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        vocab_size: int,
        texts: Sequence[ScoringText],
        chunk_bytes: int = 256 * 2**20,
        progress: bool = True,
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
        self.forward_seconds = 0.0
        self.encoded = [self._encode(t) for t in texts]
        self.n_tokens = sum(int(e.targets.numel()) for e in self.encoded)
        if self.n_tokens == 0:
            raise DataError("the texts leave no token to score (is `score: input` pointing past every text?)")
        self._verify_heads()
        self._run_forwards()

    def _encode(self, item: ScoringText) -> _Encoded:
        tokenizer = self.sources[0].tokenizer
        enc = tokenizer(item.text, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        for source in self.sources:
            limit = source.max_positions
            if limit is not None and ids.numel() > limit:
                raise DataError(
                    f"text {item.id!r} has {ids.numel()} tokens, {ids.numel() - limit} more than the context of "
                    f"source {source.role!r} ({limit}); shorten it or lower the number of exemplars"
                )
        starts = torch.tensor([start for start, _ in enc["offset_mapping"]])
        # Token j is predicted at position j - 1; the first token (BOS) is never predicted.
        counted = (starts[1:] >= item.score_from).nonzero().squeeze(-1)
        return _Encoded(item.id, ids, counted, ids[1:][counted])

    def _verify_heads(self) -> None:
        probe = self.encoded[0].input_ids[None, :16]
        with torch.inference_mode():
            for source in self.sources:
                ids = probe.to(source.input_device)
                full = source.model(input_ids=ids).logits[0]
                hidden = source.model.get_decoder()(input_ids=ids).last_hidden_state[0]
                again = head_logits(source, hidden)
                if not torch.allclose(full.float(), again.float(), atol=1e-3, rtol=1e-3):
                    raise ConfigError(
                        f"source {source.role!r} ({type(source.model).__name__}) computes logits in a way trimix's "
                        "search does not reproduce (an extra logit scaling?); please report this model family"
                    )

    @torch.inference_mode()
    def _run_forwards(self) -> None:
        start = time.perf_counter()
        bar = tqdm(self.encoded, desc="search: forward passes", unit="text", disable=not self.progress)
        for item in bar:
            for source in self.sources:
                ids = item.input_ids[None].to(source.input_device)
                hidden = source.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
                item.features[source.role] = hidden[item.positions.to(hidden.device)]  # (P, H)
        self.forward_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def score(self, weights: torch.Tensor, desc: str = "search: scoring") -> ScoreTotals:
        """Summed NLL of each row of ``weights`` ``(C, N)`` over all scored tokens."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        n_sources, n_combos = len(self.sources), weights.shape[0]
        combos_per_chunk = min(n_combos, 8)
        positions_per_chunk = max(
            1, self.chunk_elements // (self.vocab_size * (n_sources + combos_per_chunk))
        )
        total = torch.zeros(n_combos, dtype=torch.float64)
        for item in tqdm(self.encoded, desc=desc, unit="text", disable=not self.progress, leave=False):
            for p0 in range(0, item.targets.numel(), positions_per_chunk):
                p1 = p0 + positions_per_chunk
                logits = torch.stack(
                    [
                        head_logits(s, item.features[s.role][p0:p1])[..., : self.vocab_size]
                        .float()
                        .to(self.device)
                        for s in self.sources
                    ]
                )  # (N, P, V)
                targets = item.targets[p0:p1].to(self.device)
                total += combination_nll(logits, targets, weights.to(self.device), combos_per_chunk)
        return ScoreTotals(total, self.n_tokens)

    @property
    def text_ids(self) -> list[str]:
        return [e.text_id for e in self.encoded]
