"""A backend with no cache at all: each row's whole sequence is run again at every step.

:class:`RecomputeBackend` implements only the core of :class:`~trimix.backends.base.SourceBackend`
(prefill, advance, crop, keep, insert, release) over any causal LM given as a function from one row's
token ids ``(1, T)`` to its logits ``(1, T, R)`` — a Hugging Face model's forward, a pure-torch module,
a model trimix has no backend for. It is quadratic in the sequence length and meant for two things: the
ground truth that cached, batched backends must reproduce (rows are never padded, nothing is cached, so
nothing can leak between rows or steps), and the proof that the decoding core needs nothing beyond the
protocol (the tests decode through every entry point with it).

It declares none of the optional capabilities (hidden states and an output head, preallocated caches):
the static engine refuses it, and speculative fusion's draft vocabulary needs a drafter that has them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RecomputeState:
    """Each row's tokens (prompt and generated); nothing else."""

    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def next_position(self) -> torch.Tensor:
        return torch.tensor([int(r.numel()) for r in self.rows], dtype=torch.long)


class RecomputeBackend:
    """A causal LM run whole at every step (see the module docstring).

    Args:
        forward: token ids ``(1, T)`` to logits ``(1, T, R)``.
        tokenizer: the model's tokenizer.
        logit_rows: R, the logits per position (may exceed the tokenizer's vocabulary).
        eos_token_ids: the model's end-of-sequence ids.
        max_positions: its context length, when it has one.
        device: where its input ids go.
    """

    def __init__(
        self,
        forward: Forward,
        tokenizer: Any,
        logit_rows: int,
        *,
        eos_token_ids: Sequence[int] = (),
        max_positions: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.forward, self.tokenizer = forward, tokenizer
        self._logit_rows, self._max_positions = logit_rows, max_positions
        self._eos = list(eos_token_ids)
        self._device = torch.device(device)

    @property
    def logit_rows(self) -> int:
        return self._logit_rows

    @property
    def max_positions(self) -> int | None:
        return self._max_positions

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def num_parameters(self) -> int:
        module = self.forward if isinstance(self.forward, torch.nn.Module) else None
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int | None = None
    ) -> tuple[torch.Tensor, RecomputeState]:
        if capacity is not None:
            raise ValueError("RecomputeBackend has no preallocated caches (capacity)")
        mask = attention_mask.bool()
        state = RecomputeState([ids[keep].to(self.device) for ids, keep in zip(input_ids, mask, strict=True)])
        return torch.stack([self._logits(row)[-1] for row in state.rows]), state

    @torch.inference_mode()
    def advance(
        self, state: RecomputeState, tokens: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        width = tokens.shape[1]
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
        out = []
        for b, (row, new, keep) in enumerate(zip(state.rows, tokens, valid, strict=True)):
            fed = new[keep].to(self.device)
            state.rows[b] = torch.cat([row, fed])
            logits = self._logits(state.rows[b])[row.numel() :]
            if logits.shape[0] < width:  # right padding: rows fed fewer tokens
                logits = torch.cat([logits, logits.new_zeros(width - logits.shape[0], logits.shape[1])])
            out.append(logits)
        return torch.stack(out)

    def crop(self, state: RecomputeState, lengths: torch.Tensor) -> None:
        state.rows = [row[: int(n)] for row, n in zip(state.rows, lengths.tolist(), strict=True)]

    def keep_rows(self, state: RecomputeState, rows: torch.Tensor) -> None:
        state.rows = [state.rows[i] for i in rows.tolist()]

    def insert_rows(self, state: RecomputeState, new: RecomputeState) -> None:
        state.rows += new.rows

    def compact(self, state: RecomputeState) -> None:
        """Nothing to release: rows hold only their own tokens."""

    def _logits(self, row: torch.Tensor) -> torch.Tensor:
        return self.forward(row[None])[0]
