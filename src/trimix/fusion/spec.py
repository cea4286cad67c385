"""The resolved fusion of one run: which sources, which weights, which constraint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trimix.fusion.math import fuse_logits, plausibility_mask


@dataclass(frozen=True)
class FusionSpec:
    """Weights and plausibility constraint over N sources sharing a V-token vocabulary.

    Attributes:
        roles: source roles, in the order their logits are passed.
        weights: one finite weight per role.
        vocab_size: V; logits with more (padded) rows are cut to the first V columns.
        plausibility_index: index into ``roles`` of the source that judges plausibility, or None.
        plausibility_alpha: keep tokens with ``p >= alpha * p_max`` under that source.
    """

    roles: tuple[str, ...]
    weights: tuple[float, ...]
    vocab_size: int
    plausibility_index: int | None = None
    plausibility_alpha: float = 0.1

    def scores(self, source_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fused next-token scores (raw-logit space, float32) ``(B, V)``; implausible tokens are -inf.

        Args:
            source_logits: one ``(B, R_i)`` tensor per role with ``R_i >= V``, on one device.
        """
        sliced = [logits[..., : self.vocab_size] for logits in source_logits]
        fused = fuse_logits(sliced, self.weights)  # (B, V)
        if self.plausibility_index is not None:
            keep = plausibility_mask(sliced[self.plausibility_index], self.plausibility_alpha)
            fused = fused.masked_fill(~keep, float("-inf"))
        return fused
