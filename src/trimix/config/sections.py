"""Pydantic models of the command sections (``cpt``, ``eval``) and of a whole run file (:class:`TrimixConfig`)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trimix.config.models import (
    DType,
    FusionConfig,
    GenerationConfig,
    PlausibilityConfig,
    SearchConfig,
    SourceConfig,
    StrictModel,
    registered_method,
)
from trimix.errors import ConfigError
from trimix.fusion.methods import SMALL_BASE, get_method
from trimix.fusion.spec import Fusion


class LoraSettings(StrictModel):
    """LoRA hyper-parameters; ``target_modules: null`` picks the family default (see training.cpt)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class CptConfig(StrictModel):
    """Continual pretraining of the small model on raw text (``trimix cpt``)."""

    base_role: str = SMALL_BASE
    corpus: list[str] = Field(default_factory=list)
    text_field: str = "text"
    dedup: bool = True
    seed: int = 0
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    max_validation_lines: int = Field(200, ge=1)
    forgetting_text: str | None = "sib200:eng_Latn:dev"
    max_forgetting_lines: int = Field(100, ge=1)
    block_size: int = Field(128, ge=8)
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float | None = Field(None, gt=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    save_every: int = Field(50, ge=1)
    gradient_checkpointing: bool = False
    merge: bool = False
    # Learn this many new tokens for the corpus's language and add them to the model (mean-of-pieces
    # embeddings, trained with the LoRA); the result is a model + tokenizer folder (trimix.training.vocab).
    extend_vocab: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budget(self) -> CptConfig:
        if self.max_steps is None and self.max_tokens is None:
            self.max_steps = 100
        return self

    def steps(self) -> int:
        """Optimizer steps: ``max_steps``, or enough to see ``max_tokens`` tokens."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.batch_size * self.grad_accum * self.block_size
        return max(1, math.ceil((self.max_tokens or 0) / per_step))

    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)


class MethodSpec(StrictModel):
    """One row of an evaluation: a single source, Proxy Tuning, or TriMix with fixed or selected weights."""

    name: str
    method: str = "trimix"
    role: str | None = None
    alpha: float = 1.0
    weights: dict[str, float] | None = None
    select: bool = False
    # With select: which tokens the selection scores (default: search.score): the whole prompt, or only
    # the task's own text; both come from the same forward passes.
    select_score: Literal["prompt", "input"] | None = None
    plausibility: PlausibilityConfig | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return registered_method(value)

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        if self.select and self.weights:
            raise ValueError(f"method {self.name!r}: give `weights` or `select: true`, not both")
        if self.select and not get_method(self.method).linear:
            raise ValueError(
                f"method {self.name!r}: fusion method {self.method!r} recomputes its weights at every token, "
                "so the label-free weight search (fixed weights) does not apply; give `weights` instead"
            )
        return self

    def fusion(self) -> FusionConfig:
        return FusionConfig(
            method=self.method, role=self.role, alpha=self.alpha, plausibility=self.plausibility
        )


class TaskSpec(StrictModel):
    """One task family over some languages; ``options`` go to the task (root, path, pivot, direction...).

    Generation settings and the passage budget default to the paper's protocol for each task (first-line
    answers, 512-character passages, 256 for title generation, 384 for classification prompts in weight
    selection); set them here to change them. Every prediction row records the settings it was made with.
    """

    task: str
    langs: list[str] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    split: Literal["train", "dev", "test"] = "test"
    limit: int | None = Field(None, ge=1)
    scoring: Literal["generate", "loglikelihood"] = "generate"
    shots: int | None = Field(None, ge=0)
    prompt_lang: Literal["en", "zh"] = "en"
    max_new_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    max_chars: int | None = Field(None, ge=1)
    selection_max_chars: int | None = Field(None, ge=1)

    def task_options(self) -> dict[str, Any]:
        """Everything the task is built with, besides its language."""
        settings = {
            "max_new_tokens": self.max_new_tokens,
            "stop": tuple(self.stop) if self.stop is not None else None,
            "max_chars": self.max_chars,
            "selection_max_chars": self.selection_max_chars,
        }
        return {
            "n_shots": self.shots,
            "prompt_lang": self.prompt_lang,
            **{k: v for k, v in settings.items() if v is not None},
            **self.options,
        }


class ExecutorConfig(StrictModel):
    """Where evaluation units run (``trimix eval --executor``): this process, or a pool of Ray actors.

    Each Ray worker is an actor that loads every source once, with ``cpus_per_worker`` and
    ``gpus_per_worker`` reserved (Ray shows an actor only its GPUs, so the sources' ``device: cuda:0`` /
    ``cuda:1`` in the run config place them on the actor's first and second GPU: e.g.
    ``gpus_per_worker: 2`` with ``large`` on cuda:0 and both small sources on cuda:1). Ray gives an actor
    one thread unless told: ``threads_per_worker`` sets torch's threads, on Ray workers and in the local
    executor alike (float32 results move in their last bits with the thread count). Cells are cut into shards of
    ``shard_items`` items, scheduled over the pool; a unit whose worker died is retried up to
    ``retries`` times on a fresh worker.
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    threads_per_worker: int | None = Field(None, ge=1)
    shard_items: int | None = Field(None, ge=1)
    retries: int = Field(2, ge=0)
    cpus: int | None = Field(None, ge=1)  # size of a local Ray instance (default: every core)


class EvalConfig(StrictModel):
    """The evaluation matrix (``trimix eval``): methods x tasks x languages."""

    methods: list[MethodSpec] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=list)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _unique(self) -> EvalConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"eval method names must be unique; got {names}")
        return self


class TrimixConfig(StrictModel):
    """A whole run: sources, fusion and the per-command sections."""

    models: list[SourceConfig] = Field(min_length=1)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    cpt: CptConfig = Field(default_factory=CptConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dtype: DType = "float32"
    device: str = "cpu"
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _resolve(self) -> TrimixConfig:
        roles = [m.role for m in self.models]
        duplicates = sorted({r for r in roles if roles.count(r) > 1})
        if duplicates:
            raise ValueError(f"each source needs a unique `role`; {duplicates} appear more than once")
        fusion = self.fusion.resolve({m.role: m.weight for m in self.models})
        for source in self.models:  # the resolved config records every weight, derived ones included
            source.weight = fusion.weight(source.role)
        return self

    def resolved_fusion(self) -> Fusion:
        """The run's fusion: the method's weights for every source and the plausibility rule."""
        return self.fusion.resolve({m.role: m.weight for m in self.models})

    def weights(self) -> dict[str, float]:
        """The resolved weight of every source, by role."""
        return dict(self.resolved_fusion().weights)

    def source(self, role: str) -> SourceConfig:
        for m in self.models:
            if m.role == role:
                return m
        raise ConfigError(f"no source has role {role!r}; roles are {', '.join(m.role for m in self.models)}")


def resolve_weights(fusion: FusionConfig, given: dict[str, float | None]) -> dict[str, float]:
    """Turn a fusion method and the sources' optional weights into one weight per role.

    Raises:
        ValueError: when the method's roles are missing or explicit weights contradict it.
    """
    return dict(fusion.resolve(given).weights)
