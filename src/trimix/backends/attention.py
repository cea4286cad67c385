"""Grouped-query attention for trimix's explicit masks, without copying the cache per query head.

transformers' ``sdpa`` path copies every cached key and value once per query head of a group
(``repeat_kv``) whenever an attention mask is given (5.17 does so even for one query token). For a
7B model with 7 query heads per key-value head that is most of a decoding step's extra memory
traffic at batch 8 and more. Here the query heads of a group are folded into the query-length axis
instead, so each cached key and value is read once: the same dot products, a fraction of the bytes.

It is registered with transformers' ``AttentionInterface`` as ``trimix_sdpa``; backends switch CUDA
models to it (on CPUs the copy is cheap and transformers' own ``sdpa`` stays in place).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "trimix_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``(B, H, Q, D)`` over ``key``/``value`` ``(B, H_kv, K, D)`` with an additive
    or boolean mask ``(B, 1, Q, K)``; returns ``(B, Q, H, D)`` as transformers' attention functions do."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "trimix_sdpa does not support attention soft-capping; load the model with eager attention"
        )
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Query head h reads key-value head h // groups (transformers' repeat_kv order).
    folded = query.reshape(batch, kv_heads, groups * length, dim)
    mask = attention_mask
    if mask is None and length > 1 and getattr(module, "is_causal", True):
        # transformers passes no mask for an unpadded causal batch (sdpa's is_causal path, whose pattern is
        # aligned to the first key); folding the query heads into the length axis needs it spelled out.
        span = key.shape[2]
        rows = torch.arange(length, device=query.device)[:, None]
        mask = (torch.arange(span, device=query.device)[None, :] <= rows)[None, None]
        mask = mask.expand(batch, 1, length, span)
    if mask is not None:
        mask = (
            mask[:, :, None]
            .expand(batch, 1, groups, length, mask.shape[-1])
            .reshape(batch, 1, groups * length, -1)
        )
    out = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``trimix_sdpa`` available to every transformers model (idempotent). Masks that transformers
    builds itself (``model.generate``, a plain forward) are built as for ``sdpa``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
