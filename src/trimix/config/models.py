"""Pydantic models of a run's sources, fusion, generation and weight search (``models``, ``fusion``,
``generation``, ``search``). Defaults live here and in :mod:`trimix.config.sections` only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trimix.data import sib200_spec
from trimix.errors import ConfigError, DataError
from trimix.fusion.methods import LARGE, SMALL_BASE, SMALL_CPT, get_method
from trimix.fusion.spec import PLAUSIBILITY_ALPHA, Fusion, Plausibility

DType = Literal["auto", "float32", "bfloat16", "float16"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class SourceConfig(StrictModel):
    """One model whose next-token logits take part in the fusion.

    ``model`` is a local Hugging Face folder, a hub id, a ``.gguf`` file, a folder holding a PEFT
    adapter (its base is read from the adapter), or ``embedded:gemma-3-270m``.
    """

    model: str
    role: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    weight: float | None = None
    gguf_file: str | None = None
    adapter: str | None = None
    merge_adapter: bool = True
    tokenizer: str | None = None
    revision: str | None = None
    dtype: DType | None = None
    device: str | None = None
    device_map: str | dict[str, Any] | None = None
    trust_remote_code: bool = False
    prompt_format: Literal["raw", "chat"] = "raw"
    # as_written: when transformers' tokenizer class encodes text differently from the folder's
    # tokenizer.json, use the file's tokenizer (logged); library: always transformers' class.
    tokenizer_class: Literal["as_written", "library"] = "as_written"
    # hf: transformers (GGUF files dequantised once); llama_cpp: llama.cpp runs a .gguf file as it is
    # (pip install 'trimix[llama-cpp]'); auto: llama_cpp for a .gguf without adapter when it is installed.
    backend: Literal["hf", "llama_cpp", "auto"] = "hf"
    backend_options: dict[str, Any] = Field(default_factory=dict)  # llama_cpp: n_ctx, n_seq_max, n_threads

    @field_validator("weight", mode="before")
    @classmethod
    def _numeric_weight(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"weight must be a number; got {value!r} (write 1 or 0, not true or false)")
        return value

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"weight must be a finite number; got {value!r}")
        return value


class PlausibilityConfig(StrictModel):
    """Keep only tokens whose probability under ``role`` is >= ``alpha`` x that source's top one."""

    role: str
    alpha: float = Field(PLAUSIBILITY_ALPHA, gt=0.0, le=1.0)

    def resolve(self) -> Plausibility:
        return Plausibility(self.role, self.alpha)


def registered_method(value: str) -> str:
    get_method(value)  # a ValueError naming the closest registered method
    return value


class FusionConfig(StrictModel):
    """How the sources' logits are combined; ``method`` names a registered fusion method
    (``trimix ls methods``: weighted, single, proxy_tuning, trimix, ...)."""

    method: str = "trimix"
    role: str | None = None
    alpha: float = 1.0
    plausibility: PlausibilityConfig | None = None
    vocab: Literal["exact", "shared_prefix"] = "exact"
    weights_from: str | None = None
    # tokens: fuse next-token logits (one shared tokenizer); bytes: fuse next-byte log-probabilities
    # (any tokenizers, trimix.bytelevel); auto: tokens where the tokenizers agree, else bytes.
    space: Literal["auto", "tokens", "bytes"] = "auto"
    # Byte level: drop a tokenization of the text whose share of its probability falls below
    # byte_prune, keep at most byte_max_nodes per row and source (0 and null: exact, slower).
    byte_prune: float = Field(1e-4, ge=0.0, lt=1.0)
    byte_max_nodes: int | None = Field(8, ge=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return registered_method(value)

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"alpha must be finite; got {value!r}")
        return value

    def resolve(self, given: dict[str, float | None]) -> Fusion:
        """The fusion these settings make of the sources' written weights (role -> weight or None)."""
        return Fusion.resolve(
            self.method,
            given,
            role=self.role,
            alpha=self.alpha,
            plausibility=self.plausibility.resolve() if self.plausibility else None,
        )


class SpeculativeConfig(StrictModel):
    """Speculative fusion: a drafter proposes ``k`` tokens, every fused source checks them in one forward.

    ``draft`` names a source of the run: a fused one, or one outside the fusion (any role under
    ``models``, e.g. with weight 0, sharing the tokenizer). None: the fused source with the largest
    weight, and among equals the one with the fewest parameters. ``k: auto`` adapts the draft length
    to the acceptance measured so far (between 1 and 8).

    ``draft_vocab: N`` lets the drafter propose only among the N tokens most frequent in
    ``draft_vocab_text`` (text files, JSONL, or ``sib200:LANG:SPLIT``), the prompts' own tokens and
    end-of-sequence: a draft step then multiplies by N rows of the output projection instead of the whole
    vocabulary (Gemma's 262k rows are 63% of its 270M parameters). The fused sources still score every
    token, so the output is unchanged (identical when greedy, exact in distribution when sampling); a
    token outside the list is simply never drafted.
    """

    draft: str | None = None
    k: int | Literal["auto"] = 4
    draft_vocab: int | None = Field(None, ge=1)
    draft_vocab_text: list[str] = Field(default_factory=list)

    @field_validator("draft_vocab_text", mode="before")
    @classmethod
    def _one_text(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("draft_vocab_text")
    @classmethod
    def _texts_exist(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                bundled = sib200_spec(text)
            except DataError as exc:
                raise ValueError(str(exc)) from None
            if bundled is None and not Path(text).expanduser().is_file():
                raise ValueError(f"{text!r} is not a file (relative paths in a config start with ./)")
        return value

    @model_validator(mode="after")
    def _vocab_needs_text(self) -> SpeculativeConfig:
        if self.draft_vocab is not None and not self.draft_vocab_text:
            raise ValueError(
                "speculative.draft_vocab needs draft_vocab_text: text in the languages you decode "
                "(e.g. the CPT corpus and sib200:eng_Latn:train), whose most frequent tokens the drafter keeps"
            )
        return self

    @field_validator("k")
    @classmethod
    def _k_range(cls, value: int | str) -> int | str:
        if value != "auto" and not 1 <= int(value) <= 16:
            raise ValueError(f"speculative.k must be 1-16 or 'auto'; got {value!r}")
        return value


class GenerationConfig(StrictModel):
    """Decoding settings shared by every prompt of a run."""

    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    eos_token_ids: list[int] | None = None
    ignore_eos: bool = False
    batch_size: int = Field(8, ge=1)
    inspect_top_k: int = Field(0, ge=0)
    # auto: CUDA graphs when every fused source sits on one GPU, else eager (see trimix.decoding.runners)
    engine: Literal["auto", "eager", "static", "graphs"] = "auto"
    # Static/graph engines: run each source's one-token forward through torch.compile, which fuses a
    # layer's small elementwise kernels (norms, rotary, activations) before the step is captured. Costs a
    # compilation per model, batch bucket and cache size (tens of seconds). None: on with graphs.
    compile: bool | None = None
    speculative: SpeculativeConfig | None = None
    # A prompt whose length plus max_new_tokens exceeds a source's context: refuse it before decoding
    # (error), or decode until the context is full and finish with reason "context" (stop).
    on_context_limit: Literal["error", "stop"] = "error"

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty; remove the empty string from `stop`")
        return value


# Generation fields that change what a prompt decodes to (recorded in evaluation fingerprints); the
# others (batch_size, engine, compile, speculative, inspect_top_k) change only how fast it is found.
RESULT_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_ids", "ignore_eos")


def resolve_generation(
    run: GenerationConfig | None, *layers: dict[str, Any] | None, origin: str = "generation setting"
) -> GenerationConfig:
    """The one precedence rule for generation settings: the run's ``generation`` section, then each layer
    in order — command flags or keyword arguments, then a request's fields (an evaluation task's own stop
    strings and token budget count as request fields). A field a layer leaves out, or gives as None,
    keeps the value below it.

    Raises:
        ConfigError: a value that is not valid for its field, named with ``origin`` and the value.
    """
    base = run or GenerationConfig()
    given = {k: v for layer in layers if layer for k, v in layer.items() if v is not None}
    if not given:
        return base
    unknown = sorted(set(given) - set(GenerationConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown {origin}(s) {unknown}; known: {sorted(GenerationConfig.model_fields)}")
    try:
        return GenerationConfig.model_validate({**base.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid {origin}(s): {problems}") from exc


PAPER_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


class GridRange(StrictModel):
    """An evenly spaced axis ``start, start + step, ..., <= stop``."""

    start: float
    stop: float
    step: float = Field(gt=0.0)

    def values(self) -> list[float]:
        count = math.floor((self.stop - self.start) / self.step + 1e-9) + 1
        return [round(self.start + i * self.step, 10) for i in range(max(count, 0))]


class SearchConfig(StrictModel):
    """Label-free weight selection by fused perplexity (``trimix select``).

    ``grid`` gives the candidate weights of the free roles; ``derived`` (if set) receives
    ``1 - sum`` of the others, as small_base does in TriMix; ``fixed`` pins any further role.
    """

    grid: dict[str, list[float] | GridRange] = Field(
        default_factory=lambda: {LARGE: list(PAPER_GRID), SMALL_CPT: list(PAPER_GRID)}
    )
    derived: str | None = SMALL_BASE
    fixed: dict[str, float] = Field(default_factory=dict)
    task: str | None = "sib200_topic"
    lang: str | None = None
    split: Literal["train", "dev", "test"] = "dev"
    shots: int | None = Field(None, ge=0)
    prompt_lang: Literal["en", "zh"] = "en"
    text_file: str | None = None
    n_prompts: int = Field(50, ge=1)
    seed: int = 0
    # prompt: every token of the rendered prompts; input: only the task's own text (passages, questions,
    # options, exemplar answers), not the template (instruction, field labels). Both are reported.
    score: Literal["prompt", "input"] = "prompt"
    # tokens: exp(total NLL / total scored tokens), every token weighs the same; texts: exp of the mean
    # over prompts of each prompt's mean NLL, as the TriMix authors' get_perplexity.py computes it (a short
    # prompt weighs as much as a long one). They agree when the prompts are equally long.
    average: Literal["tokens", "texts"] = "tokens"
    refine_rounds: int = Field(2, ge=0)
    # Memory for one block of the sources' logits while scoring. Larger blocks feed the output
    # projection more positions per matmul: on 2 CPU cores with three Gemma 3 270M sources, 1024 MB
    # (whole prompts) costs ~1.1-1.2x the plain forwards and 256 MB ~1.4x (bench/search_cost.py).
    chunk_mb: int = Field(1024, ge=1)

    def axes(self) -> dict[str, list[float]]:
        axes = {role: (v.values() if isinstance(v, GridRange) else list(v)) for role, v in self.grid.items()}
        for role, values in axes.items():
            if not values or not all(math.isfinite(x) for x in values):
                raise ValueError(f"search.grid.{role} must hold at least one finite value; got {values}")
        return axes
