"""Capability ``"static"`` of the transformers backend: stepping a preallocated cache in place, so a CUDA
graph that captured one step replays it (see :mod:`trimix.decoding.static`)."""

from __future__ import annotations

from typing import Any

import torch

from trimix.backends.hf.state import HFState


class InPlaceSteps:
    """The in-place step and its bookkeeping, mixed into :class:`~trimix.backends.hf.HFBackend` (which
    provides ``decoder``, ``cache_keyword``, ``head_logits`` and the masks)."""

    decoder: Any
    cache_keyword: str
    _compiled: Any

    @torch.inference_mode()
    def step_in_place(self, state: HFState, tokens: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Feed ``(B, k)`` tokens on a preallocated cache, touching only tensors that keep their addresses.

        The cursor's columns and ``next_position`` are advanced in place, so a CUDA graph that captured
        this call replays it step after step. The host-side ``state.length`` is the caller's to advance.

        Args:
            state: a preallocated state whose ``cursor.cols`` is a ``(k,)`` tensor owned by the caller
                (the columns this call writes).
            tokens: ``(B, k)``.
            compiled: run the decoder through ``torch.compile`` (fuses the many small elementwise
                kernels of a layer; compiled once per batch and cache shape).

        Returns:
            Logits ``(B, k, R)`` after each token.
        """
        cols = state.cursor.cols
        width = tokens.shape[1]
        query = state.next_position[:, None] + torch.arange(width, device=tokens.device)
        state.valid.index_fill_(1, cols, True)
        state.positions.index_copy_(1, cols, query)
        decoder = self._compiled_decoder() if compiled else self.decoder
        out = decoder(
            input_ids=tokens,
            attention_mask=self._masks(state.valid, state.positions, query),
            position_ids=query,
            **{self.cache_keyword: state.cache},
            use_cache=True,
        )
        state.next_position.add_(width)
        cols.add_(width)
        return self.head_logits(out.last_hidden_state)

    def attach_cursor(self, state: HFState, cols: torch.Tensor) -> None:
        cols.fill_(state.length)
        state.cursor.cols = cols

    def stepped(self, state: HFState, width: int) -> None:
        state.length += width

    def snapshot(self, state: HFState) -> tuple[torch.Tensor, ...]:
        return (
            state.valid.clone(),
            state.positions.clone(),
            state.next_position.clone(),
            state.cursor.cols.clone(),
        )

    def restore(self, state: HFState, snapshot: tuple[torch.Tensor, ...]) -> None:
        valid, positions, next_position, cols = snapshot
        state.valid.copy_(valid)
        state.positions.copy_(positions)
        state.next_position.copy_(next_position)
        state.cursor.cols.copy_(cols)

    def _compiled_decoder(self) -> Any:
        if self._compiled is None:
            import torch._dynamo

            # One compiled entry per model, batch bucket and cache size; the default limit (8 per code
            # object, shared by every model of a family) would silently fall back to eager after that.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
            self._compiled = torch.compile(self.decoder, dynamic=False)
        return self._compiled
