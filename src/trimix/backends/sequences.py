"""A source's rows addressed by sequence id: the calls the decoding core's runners make.

The core drives every source through :class:`SequenceBatch` — ``start`` sequences from their prompts,
``step`` every sequence by ``k`` tokens, ``roll_back`` sequences to a length, ``release`` sequences, the
logits returned by ``start`` and ``step`` — and never reasons about a backend's row indices. Beneath it a
backend implements the batch-state core of :class:`~trimix.backends.base.SourceBackend` (prefill,
advance, crop, keep and insert rows): a fused step feeds every row of a group to a source in one call,
and a state is what makes that one call. A backend whose engine is keyed by sequence id itself
(llama.cpp) maps a state's rows onto its own sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from trimix.backends.base import DecodeState, SourceBackend


class SequenceBatch:
    """The sequences one source decodes for one group of rows, in the order they started.

    Args:
        backend: the source's backend.
        compact: give cache space back after sequences are released (a long-lived batch that rows join
            and leave, as the server's).
    """

    def __init__(self, backend: SourceBackend, compact: bool = False) -> None:
        self.backend, self.compact = backend, compact
        self.ids: list[int] = []
        self.state: DecodeState | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def start(
        self, ids: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """Start sequences ``ids`` from a left-padded prompt batch; the logits after each prompt ``(n, R)``
        (``options`` go to the backend's ``prefill``, e.g. ``hidden=True`` where it has hidden states)."""
        clash = set(ids) & set(self.ids)
        if clash or len(set(ids)) != len(ids):
            raise ValueError(f"sequence ids {sorted(clash) or list(ids)} are already decoding in this batch")
        logits, state = self.backend.prefill(input_ids, attention_mask, **options)
        if self.state is None or not self.ids:
            self.state = state
        else:
            self.backend.insert_rows(self.state, state)
        self.ids += list(ids)
        return logits

    def step(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
        """Feed ``(B, k)`` tokens to the sequences in :attr:`ids` order (``valid``: right padding); the
        logits after each ``(B, k, R)``."""
        if tokens.shape[0] != len(self.ids):
            raise ValueError(f"{tokens.shape[0]} rows of tokens for {len(self.ids)} sequences")
        return self.backend.advance(self.state, tokens, valid, **options)

    def lengths(self) -> dict[int, int]:
        """Tokens each sequence holds (prompt and generated)."""
        if self.state is None:
            return {}
        return dict(zip(self.ids, self.state.next_position.tolist(), strict=True))

    def roll_back(self, lengths: Mapping[int, int]) -> None:
        """Keep the first ``lengths[id]`` tokens of those sequences (drop rejected draft positions)."""
        if not lengths:
            return
        current = self.state.next_position
        target = current.clone()
        for row, seq in enumerate(self.ids):
            if seq in lengths:
                target[row] = int(lengths[seq])
        if bool((target > current).any()):
            raise ValueError("roll_back can only shorten sequences")
        self.backend.crop(self.state, target)

    def release(self, ids: Iterable[int]) -> list[int]:
        """Drop sequences (finished, cancelled); return the positions, in the old order, of those kept."""
        gone = set(ids)
        keep = [row for row, seq in enumerate(self.ids) if seq not in gone]
        if len(keep) == len(self.ids):
            return keep
        self.backend.keep_rows(self.state, torch.tensor(keep, dtype=torch.long))
        if self.compact:
            self.backend.compact(self.state)
        self.ids = [self.ids[row] for row in keep]
        return keep
