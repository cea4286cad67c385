"""The fused model and its decoding: per-source caches, left-padded batches, stops, streaming, CUDA graphs."""

from trimix.decoding.engine import (
    FusedLM,
    Generation,
    Loglikelihood,
    SourcePool,
    StreamEvent,
    TokenInspection,
)
from trimix.decoding.sampling import TokenChooser

__all__ = [
    "FusedLM",
    "Generation",
    "Loglikelihood",
    "SourcePool",
    "StreamEvent",
    "TokenChooser",
    "TokenInspection",
]
