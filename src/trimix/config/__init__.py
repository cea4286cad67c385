"""Pydantic models for every YAML a user writes, and reading them.

One file describes a run: the sources (``models``), how they are fused (``fusion``), how text is
generated (``generation``), and, for the commands that need them, the weight search (``search``),
continual pretraining (``cpt``) and evaluation (``eval``) sections. Defaults live in
:mod:`~trimix.config.models` and :mod:`~trimix.config.sections` only; :mod:`~trimix.config.loading`
reads a file into them.
"""

from trimix.config.loading import (
    apply_weights,
    format_validation_error,
    load_config,
    parse_weights_arg,
    read_selected_weights,
)
from trimix.config.models import (
    PAPER_GRID,
    RESULT_FIELDS,
    DType,
    FusionConfig,
    GenerationConfig,
    GridRange,
    PlausibilityConfig,
    SearchConfig,
    SourceConfig,
    SpeculativeConfig,
    StrictModel,
    resolve_generation,
)
from trimix.config.sections import (
    CptConfig,
    EvalConfig,
    ExecutorConfig,
    LoraSettings,
    MethodSpec,
    TaskSpec,
    TrimixConfig,
    resolve_weights,
)
from trimix.fusion.methods import LARGE, PAPER_ROLES, SMALL_BASE, SMALL_CPT

__all__ = [
    "LARGE",
    "PAPER_GRID",
    "PAPER_ROLES",
    "RESULT_FIELDS",
    "SMALL_BASE",
    "SMALL_CPT",
    "CptConfig",
    "DType",
    "EvalConfig",
    "ExecutorConfig",
    "FusionConfig",
    "GenerationConfig",
    "GridRange",
    "LoraSettings",
    "MethodSpec",
    "PlausibilityConfig",
    "SearchConfig",
    "SourceConfig",
    "SpeculativeConfig",
    "StrictModel",
    "TaskSpec",
    "TrimixConfig",
    "apply_weights",
    "format_validation_error",
    "load_config",
    "parse_weights_arg",
    "read_selected_weights",
    "resolve_generation",
    "resolve_weights",
]
