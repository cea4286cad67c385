"""Pure tensor math for logit fusion: no models, no tokenizers."""

from trimix.fusion.math import fuse_logits, fused_log_softmax, plausibility_mask
from trimix.fusion.spec import FusionSpec

__all__ = ["FusionSpec", "fuse_logits", "fused_log_softmax", "plausibility_mask"]
