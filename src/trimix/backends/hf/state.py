"""The state of a transformers source: its cache columns, which of them hold a row's real tokens and at
which positions, and the attention biases built from them (see :mod:`trimix.backends.hf`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class ColumnCursor:
    """The cache columns a preallocated cache's next forward writes to: ``cols`` ``(k,)`` long."""

    def __init__(self) -> None:
        self.cols: torch.Tensor | None = None


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values in tensors of ``capacity`` columns, written at the cursor's columns.

    The tensors are allocated once (zeros, so masked columns hold finite values) and never move,
    which CUDA-graph capture requires.
    """

    is_compileable = True
    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int, cursor: ColumnCursor) -> None:
        super().__init__()
        self.capacity = capacity
        self.cursor = cursor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(
            batch, value_states.shape[1], self.capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.cursor.cols, key_states)
        self.values.index_copy_(2, self.cursor.cols, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


@dataclass
class HFState:
    """A batch's cache and per-column bookkeeping.

    Attributes:
        cache: the transformers cache (growing, or preallocated :class:`SlotLayer`s).
        valid: ``(B, C)`` whether column c holds a real token of row b.
        positions: ``(B, C)`` that token's position in its row (0 where not valid).
        next_position: ``(B,)`` tokens each row holds, i.e. the position of its next token.
        length: columns in use (the next forward writes from here).
        capacity: columns allocated for a preallocated cache; None for a growing one.
        cursor: where a preallocated cache writes next.
    """

    cache: Cache
    valid: torch.Tensor
    positions: torch.Tensor
    next_position: torch.Tensor
    length: int
    capacity: int | None = None
    cursor: ColumnCursor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.next_position.shape[0])

    @property
    def is_static(self) -> bool:
        return self.capacity is not None


def attention_bias(
    valid: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive attention bias from token positions: 0 where a query may attend, the dtype's minimum elsewhere.

    Args:
        valid: ``(B, K)`` columns holding real tokens.
        positions: ``(B, K)`` the position of each column's token.
        query_positions: ``(B, Q)`` the positions of the queries.
        window: a sliding window (``p - q < window``), or None for full causal attention.
        dtype: the model's dtype.

    Returns:
        ``(B, 1, Q, K)``.
    """
    keys = positions[:, None, :]
    queries = query_positions[:, :, None]
    allowed = valid[:, None, :] & (keys <= queries)
    if window is not None:
        allowed &= queries - keys < window
    bias = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def shifted(state: HFState, shift: int, width: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A state's keys/values (alternating per layer), valid and positions, moved right by ``shift``
    columns inside ``width`` columns (new columns invalid)."""

    def place(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = width
        out = tensor.new_zeros(shape)
        used = min(state.length, tensor.shape[dim])
        index = [slice(None)] * tensor.dim()
        index[dim] = slice(shift, shift + used)
        source = [slice(None)] * tensor.dim()
        source[dim] = slice(0, used)
        out[tuple(index)] = tensor[tuple(source)]
        return out

    layers = []
    for layer in state.cache.layers:
        layers += [place(layer.keys, 2), place(layer.values, 2)]
    return layers, place(state.valid, 1), place(state.positions, 1)
