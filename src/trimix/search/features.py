"""What the scorer keeps per scored position of a text: a source's final hidden states (the output head
applied later, block by block), or its logits where the backend gives no hidden states."""

from __future__ import annotations

from typing import Any

import torch

from trimix.backends.base import HIDDEN, advance_selected, has_capability
from trimix.backends.loading import Source


def head_logits(source: Source, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The source's logits from the features the scorer kept: final hidden states through its output
    head, or (a backend without the ``hidden`` capability) the logits themselves, cut to ``out``'s width."""
    if not has_capability(source.backend, HIDDEN):
        logits = hidden if out is None else out.copy_(hidden[..., : out.shape[-1]])
        return logits
    return source.backend.head_logits(hidden, out=out)


def prefix_features(backend: Any, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Run one row ``ids`` ``(1, L)`` and return the features after each of the sorted ``positions``
    (``< L``) — final hidden states ``(P, H)``, or the logits ``(P, R)`` where the backend gives no hidden
    states, computed at those positions only where it declares ``"selected"`` — and the row's state."""
    ones = torch.ones_like(ids)
    if has_capability(backend, HIDDEN):
        hidden, state = backend.prefill(ids, ones, hidden=True)
        return hidden[0, positions.to(hidden.device)], state
    first, state = backend.prefill(ids[:, :1], ones[:, :1])
    parts = [first] if positions.numel() and int(positions[0]) == 0 else []
    if ids.shape[1] > 1:
        outputs = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        outputs[0, positions[positions > 0] - 1] = True
        parts.append(advance_selected(backend, state, ids[:, 1:], None, outputs))
    return torch.cat(parts) if parts else first[:0], state


def suffix_features(
    backend: Any, state: Any, tokens: torch.Tensor, valid: torch.Tensor, columns: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Feed right-padded ``tokens`` ``(B, k)`` to a state's rows; each row's features after the fed tokens
    at its ``columns`` (sorted), as :func:`prefix_features` gives them."""
    if has_capability(backend, HIDDEN):
        hidden = backend.advance(state, tokens, valid, hidden=True)
        return [hidden[row, cols.to(hidden.device)] for row, cols in enumerate(columns)]
    outputs = torch.zeros_like(tokens, dtype=torch.bool)
    for row, cols in enumerate(columns):
        outputs[row, cols] = True
    logits = advance_selected(backend, state, tokens, valid, outputs)
    return list(logits.split([int(c.numel()) for c in columns]))


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading ids two 1-d id tensors share."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n
