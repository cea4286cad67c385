"""The fused model and its decoding: per-source caches, left-padded batches, stops, streaming, CUDA graphs."""

from trimix.decoding.fused import FusedLM
from trimix.decoding.pool import SourcePool
from trimix.decoding.results import Generation, Loglikelihood, StreamEvent, TokenInspection
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
