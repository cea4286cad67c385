"""The fusion formula, in one place.

TriMix (eq. 1 of the paper) and Proxy Tuning are weighted sums of next-token **raw logits**:
``L = sum_i w_i * L_i``. Softmax is shift-invariant per source only when the weights sum to 1, so
the two are not the same as mixing log-probabilities; both methods define the sum on raw logits and
so does this module. Every function here upcasts to float32 and never edits its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def fuse_logits(
    logits: Sequence[torch.Tensor] | torch.Tensor, weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Weighted sum of raw next-token logits, for one weight vector or many at once.

    Args:
        logits: N tensors of the same shape ``(..., V)`` (raw logits, any float dtype), or one stacked
            tensor ``(N, ..., V)``. They must live on one device.
        weights: ``(N,)`` for one fusion, or ``(C, N)`` for C fusions at once (the weight search).

    Returns:
        float32 tensor ``(..., V)`` for ``(N,)`` weights, or ``(C, ..., V)`` for ``(C, N)`` weights.

    Raises:
        ValueError: when the number of weights differs from the number of sources, or a weight is
            not finite.
    """
    w = torch.as_tensor(weights, dtype=torch.float32)
    n_sources = logits.shape[0] if isinstance(logits, torch.Tensor) else len(logits)
    if w.shape[-1] != n_sources:
        raise ValueError(f"got {w.shape[-1]} weights for {n_sources} sources")
    if not torch.isfinite(w).all():
        raise ValueError(f"fusion weights must be finite; got {w.tolist()}")
    if w.dim() == 1:
        # One fusion: multiply then add, source by source, as fuse_rows does for a decoding step.
        values = w.tolist()
        fused = logits[0].float() * values[0]
        for source_logits, weight in zip(logits[1:], values[1:], strict=True):
            fused += source_logits.float() * weight
        return rule_out_impossible(fused, logits)
    stacked = (logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits), dim=0)).float()
    fused = torch.tensordot(w.to(stacked.device), stacked, dims=([-1], [0]))
    return fused.masked_fill_(torch.isneginf(stacked).any(0), float("-inf"))


def fuse_rows(logits: Sequence[torch.Tensor], weights: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Fuse each row of a batch with its own weights: ``out[b] = sum_i weights[b, i] * logits[i][b, :V]``.

    This is the decoding step's formula (every row of a batch may carry other weights, as requests
    to a server do). Each term is a multiply and then an add, in source order, so the eager and the
    CUDA-graph decoders, which both call this function, round identically.

    Args:
        logits: N tensors ``(B, ..., R_i)`` of raw logits with ``R_i >= V`` (padded rows are cut).
        weights: ``(B, N)`` float32 weights on the logits' device.
        vocab: V, the number of token ids fused; None keeps every column.

    Returns:
        float32 ``(B, ..., V)``.
    """
    extra = (1,) * (logits[0].dim() - 1)
    fused = logits[0][..., :vocab].float() * weights[:, 0].view(-1, *extra)
    for i, source_logits in enumerate(logits[1:], start=1):
        fused += source_logits[..., :vocab].float() * weights[:, i].view(-1, *extra)
    return fused


def rule_out_impossible(fused: torch.Tensor, logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """``fused`` with ``-inf`` wherever a source gives ``-inf``: what one source rules out stays out,
    whatever the sign of its weight (a byte-level source rules out bytes no token of it spells; a
    negative weight would otherwise turn its ``-inf`` into ``+inf``). Token-level logits are finite,
    so this changes nothing there. Edits ``fused`` in place and returns it."""
    for source_logits in logits:
        fused.masked_fill_(torch.isneginf(source_logits), float("-inf"))
    return fused


def plausibility_mask(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Tokens whose probability is at least ``alpha`` times the top token's probability.

    ``p_v >= alpha * p_max`` is ``logit_v >= logit_max + log(alpha)`` because softmax's normaliser
    cancels, so no softmax is computed.

    Args:
        logits: raw logits ``(..., V)`` of the source that judges plausibility.
        alpha: in ``(0, 1]``; 1 keeps only the argmax (and ties).

    Returns:
        bool tensor ``(..., V)``; every row keeps at least its argmax.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"plausibility alpha must be in (0, 1]; got {alpha}")
    scores = logits.float()
    threshold = scores.max(dim=-1, keepdim=True).values + math.log(alpha)
    return scores >= threshold


def fused_scores(
    logits: Sequence[torch.Tensor],
    weights: torch.Tensor,
    vocab: int,
    plausibility_index: int | None = None,
    alpha: float = 0.1,
    combine: Callable[[Sequence[torch.Tensor], torch.Tensor, int | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The scores a decoder chooses from: fused raw logits, implausible tokens set to ``-inf``.

    Args:
        logits: one ``(B, ..., R_i)`` tensor per source, ``R_i >= vocab``.
        weights: ``(B, N)`` per-row weights.
        vocab: V.
        plausibility_index: the source that judges plausibility (None: no constraint).
        alpha: keep tokens with ``p >= alpha * p_max`` under that source.
        combine: the fusion method's combination (``FusionMethod.combine``); None: the weighted sum.

    Returns:
        float32 ``(B, ..., V)``.
    """
    fused = rule_out_impossible(
        (combine or fuse_rows)(logits, weights, vocab), [x[..., :vocab] for x in logits]
    )
    if plausibility_index is not None:
        keep = plausibility_mask(logits[plausibility_index][..., :vocab], alpha)
        fused = fused.masked_fill(~keep, float("-inf"))
    return fused


def margin_contributions(
    logits: Sequence[torch.Tensor], weights: torch.Tensor, chosen: torch.Tensor, runner_up: torch.Tensor
) -> torch.Tensor:
    """How much each source contributed to choosing ``chosen`` over ``runner_up`` (raw-logit space).

    The fused margin ``f[chosen] - f[runner_up] = sum_i w_i (L_i[chosen] - L_i[runner_up])`` splits exactly
    into one term per source. A difference of two logits of one source does not depend on the source's
    arbitrary logit shift, and the weight (possibly negative) is part of the term, so the terms compare
    across sources: the largest is the source that did most to pick the token.

    Args:
        logits: one ``(B, R_i)`` tensor per source.
        weights: ``(B, N)``.
        chosen, runner_up: ``(B,)`` token ids.

    Returns:
        ``(B, N)`` float32.
    """
    columns = []
    for i, source_logits in enumerate(logits):
        values = source_logits.float()
        gap = values.gather(-1, chosen[:, None]) - values.gather(-1, runner_up[:, None])
        columns.append(weights[:, i : i + 1] * gap)
    return torch.cat(columns, dim=1)
