"""trimix: test-time adaptation of LLMs to low-resource languages by fusing several LMs' logits."""

from __future__ import annotations

import logging

from trimix.config import GenerationConfig, SourceConfig, TrimixConfig, load_config
from trimix.decoding import FusedLM, Generation, Loglikelihood
from trimix.errors import TrimixError
from trimix.fusion import Fusion, Plausibility, fuse_logits, plausibility_mask

__version__ = "0.1.0"
__all__ = [
    "FusedLM",
    "Fusion",
    "Generation",
    "GenerationConfig",
    "Loglikelihood",
    "Plausibility",
    "SourceConfig",
    "TrimixConfig",
    "TrimixError",
    "__version__",
    "fuse_logits",
    "load",
    "load_config",
    "plausibility_mask",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(config: str | dict) -> FusedLM:
    """Load the fused model a YAML config (path or dict) describes: ``trimix.load("run.yaml").generate([...])``."""
    return FusedLM.from_config(load_config(config))
