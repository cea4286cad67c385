"""Logit fusion: the pure tensor math, the fusion object and the registered fusion methods (only torch)."""

from trimix.fusion.math import fuse_logits, fuse_rows, fused_scores, margin_contributions, plausibility_mask
from trimix.fusion.methods import METHODS, FusionMethod, get_method, register_method
from trimix.fusion.spec import PLAUSIBILITY_ALPHA, Fusion, Plausibility

__all__ = [
    "METHODS",
    "PLAUSIBILITY_ALPHA",
    "Fusion",
    "FusionMethod",
    "Plausibility",
    "fuse_logits",
    "fuse_rows",
    "fused_scores",
    "get_method",
    "margin_contributions",
    "plausibility_mask",
    "register_method",
]
