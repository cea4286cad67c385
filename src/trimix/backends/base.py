"""The seam between trimix and one causal LM: what decoding, scoring and serving ask of a source.

Everything above this interface (the fused model, the weight search, speculative fusion, the
server) talks to a source through these calls and touches no model internals, so another backend
(a compiled or graph-captured one, a remote one) can stand behind it.

States are per batch: a left-padded prompt batch is prefilled into a state, which then advances by
``k >= 1`` tokens per row at a time, can be cropped back per row (rows keep different numbers of
tokens, as speculative decoding needs), can drop rows that finished, and can take in new rows
(continuous batching). A state's rows decode exactly as each row alone would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class DecodeState(Protocol):
    """One batch's cache and bookkeeping, opaque to callers except for these fields."""

    @property
    def batch_size(self) -> int: ...

    @property
    def next_position(self) -> torch.Tensor:
        """``(B,)`` tokens each row holds (prompt and generated), i.e. the position of its next token."""
        ...


@runtime_checkable
class SourceBackend(Protocol):
    """One causal LM and its tokenizer behind the calls trimix makes."""

    tokenizer: Any

    @property
    def logit_rows(self) -> int:
        """Logits per position (may exceed the tokenizer's vocabulary: padded rows)."""
        ...

    @property
    def max_positions(self) -> int | None:
        """The context length, when the model states one."""
        ...

    @property
    def device(self) -> torch.device:
        """Where input ids go."""
        ...

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run a left-padded batch ``(B, L)``; return the next-token logits ``(B, R)`` and the state.

        ``capacity`` preallocates a static cache of that many columns (None: a cache that grows).
        """
        ...

    def advance(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``(B, k)`` tokens to every row; return the logits after each, ``(B, k, R)``."""
        ...

    def crop(self, state: DecodeState, lengths: torch.Tensor) -> None:
        """Keep the first ``lengths[b]`` tokens of row b (drop rejected draft positions), exactly."""
        ...

    def keep_rows(self, state: DecodeState, rows: torch.Tensor) -> None:
        """Keep only the given rows, in that order."""
        ...

    def insert_rows(self, state: DecodeState, new: DecodeState) -> None:
        """Append the rows of another state of this backend (e.g. a freshly prefilled request)."""
        ...

    def compact(self, state: DecodeState) -> None:
        """Release cache space that no remaining row uses (after rows left a long-lived batch)."""
        ...

    def head_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output-head logits of final hidden states ``(..., H)``; with ``out`` ``(..., V)`` only the first V."""
        ...

    def restricted_head(self, ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A head over the rows ``ids`` only: maps hidden states ``(..., H)`` to ``(..., len(ids))``, equal
        to ``head_logits(hidden)[..., ids]`` (the rows are copied once, when this is called)."""
        ...
