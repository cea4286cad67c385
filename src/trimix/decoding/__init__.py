"""The fused step loop: one KV cache per source, left-padded batches, stop conditions, streaming."""

from trimix.decoding.engine import FusedLM, Generation, StreamEvent, TokenInspection
from trimix.decoding.sampling import TokenSelector

__all__ = ["FusedLM", "Generation", "StreamEvent", "TokenInspection", "TokenSelector"]
