"""Pydantic models for every YAML a user writes.

One file describes a run: the sources (``models``), how they are fused (``fusion``), how text is
generated (``generation``), and, for the commands that need them, the weight search (``search``),
continual pretraining (``cpt``) and evaluation (``eval``) sections. Defaults live here and only here.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trimix.data import sib200_spec
from trimix.errors import ConfigError, DataError
from trimix.fusion.methods import LARGE, PAPER_ROLES, SMALL_BASE, SMALL_CPT, get_method
from trimix.fusion.spec import PLAUSIBILITY_ALPHA, Fusion, Plausibility
from trimix.io import read_text

__all__ = ["LARGE", "PAPER_ROLES", "SMALL_BASE", "SMALL_CPT"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class SourceConfig(_Strict):
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


class PlausibilityConfig(_Strict):
    """Keep only tokens whose probability under ``role`` is >= ``alpha`` x that source's top one."""

    role: str
    alpha: float = Field(PLAUSIBILITY_ALPHA, gt=0.0, le=1.0)

    def resolve(self) -> Plausibility:
        return Plausibility(self.role, self.alpha)


def _registered_method(value: str) -> str:
    get_method(value)  # a ValueError naming the closest registered method
    return value


class FusionConfig(_Strict):
    """How the sources' logits are combined; ``method`` names a registered fusion method
    (``trimix ls methods``: weighted, single, proxy_tuning, trimix, ...)."""

    method: str = "trimix"
    role: str | None = None
    alpha: float = 1.0
    plausibility: PlausibilityConfig | None = None
    vocab: Literal["exact", "shared_prefix"] = "exact"
    weights_from: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return _registered_method(value)

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


class SpeculativeConfig(_Strict):
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


class GenerationConfig(_Strict):
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


class GridRange(_Strict):
    """An evenly spaced axis ``start, start + step, ..., <= stop``."""

    start: float
    stop: float
    step: float = Field(gt=0.0)

    def values(self) -> list[float]:
        count = math.floor((self.stop - self.start) / self.step + 1e-9) + 1
        return [round(self.start + i * self.step, 10) for i in range(max(count, 0))]


class SearchConfig(_Strict):
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


class LoraSettings(_Strict):
    """LoRA hyper-parameters; ``target_modules: null`` picks the family default (see training.cpt)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class CptConfig(_Strict):
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


class MethodSpec(_Strict):
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
        return _registered_method(value)

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


class TaskSpec(_Strict):
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


class ExecutorConfig(_Strict):
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


class EvalConfig(_Strict):
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


class TrimixConfig(_Strict):
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


def _sections() -> dict[str, type[BaseModel]]:
    """The config model a key's value is validated by, keyed by the key (for "did you mean" hints)."""
    return {
        "": TrimixConfig,
        "models": SourceConfig,
        "fusion": FusionConfig,
        "plausibility": PlausibilityConfig,
        "generation": GenerationConfig,
        "speculative": SpeculativeConfig,
        "search": SearchConfig,
        "grid": GridRange,
        "cpt": CptConfig,
        "lora": LoraSettings,
        "eval": EvalConfig,
        "methods": MethodSpec,
        "tasks": TaskSpec,
        "executor": ExecutorConfig,
    }


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """For an unknown key: the closest known key of the section it sits in."""
    parents = [str(p) for p in location[:-1] if not isinstance(p, int)]
    model = _sections().get(parents[-1] if parents else "")
    if model is None:
        return ""
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(model.model_fields)}"


def format_validation_error(error: ValidationError, origin: str, flags: dict[str, str] | None = None) -> str:
    """Render a pydantic error as 'origin: field.path: message' lines; a value set by a command-line flag
    is named by the flag (``flags``: dotted key -> flag)."""
    lines = [f"invalid configuration in {origin}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        flag = next(
            (f for key, f in (flags or {}).items() if where == key or where.startswith(key + ".")), None
        )
        if item["type"] == "extra_forbidden":
            message = f"unknown key{_did_you_mean(tuple(item['loc']))}"
        message = message.replace("Input should be", "must be").replace("must be a valid ", "must be a ")
        # The value itself, unless the key is missing or unknown, or the value is a whole section.
        shown = repr(got) if not isinstance(got, dict | list) else ""
        if len(shown) > 80:
            shown = shown[:77] + "..."
        quiet = item["type"] in {"missing", "extra_forbidden"} or not shown
        suffix = "" if quiet or shown in message else f" (got {shown})"
        lines.append(f"  {flag or where}: {message}{suffix}")
    return "\n".join(lines)


def read_selected_weights(path: str | Path) -> dict[str, float]:
    """Read the weights chosen by ``trimix select`` from its ``selection.json``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"weights file {str(path)!r} does not exist; pass the selection.json of `trimix select`"
        )
    try:
        payload = json.loads(read_text(path, "weights file"))
        weights = payload["selected"]["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: expected the JSON written by `trimix select` with a 'selected.weights' object ({exc})"
        ) from exc
    if not isinstance(weights, dict):
        raise ConfigError(f"{path}: 'selected.weights' must map roles to numbers; got {weights!r}")
    bad = {
        k: v
        for k, v in weights.items()
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
    }
    if bad:
        raise ConfigError(
            f"{path}: 'selected.weights' must map roles to finite numbers; {bad} are not. "
            "Rerun `trimix select`, or fix the file"
        )
    return {str(k): float(v) for k, v in weights.items()}


def apply_weights(
    raw: dict[str, Any], weights: dict[str, float], origin: str = "--weights", method_given: bool = False
) -> None:
    """Set per-role weights on a raw (unvalidated) config dict, keeping the method's meaning.

    * Every source named: an explicit fusion. It stays TriMix when the weights are TriMix's
      (``small_base = 1 - large - small_cpt``) and becomes ``weighted`` otherwise — unless the method was
      named on the command line (``method_given``): then weights that contradict it are refused.
    * Under method ``trimix``, naming ``large`` and ``small_cpt`` (a and b) is TriMix: small_base is derived.
    * Anything else is ambiguous and refused, with both readings spelled out.

    Raises:
        ConfigError: unknown roles, or an ambiguous partial set of weights.
    """
    models = [m for m in raw.get("models", []) or [] if isinstance(m, dict)]
    known = [m.get("role") for m in models]
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ConfigError(f"{origin} names role(s) {unknown} that no source has; roles are {known}")
    fusion = raw.setdefault("fusion", {})
    method = fusion.get("method", "trimix")
    named = set(weights)
    if named >= set(known):
        for m in models:
            m["weight"] = weights[m["role"]]
        if not (method == "trimix" and _is_trimix_point(weights)):
            if method_given and method != "weighted":
                raise ConfigError(
                    f"--method {method} and {origin} disagree: {weights} are not weights of method {method!r} "
                    f"(TriMix derives small_base = 1 - large - small_cpt). Drop --method to fuse them as "
                    "'weighted', or give only large and small_cpt"
                )
            fusion["method"] = "weighted"
    elif method == "trimix" and {LARGE, SMALL_CPT} <= named <= set(PAPER_ROLES):
        for m in models:
            if m["role"] in weights:
                m["weight"] = weights[m["role"]]
            elif m["role"] == SMALL_BASE:
                m.pop("weight", None)  # derived: 1 - large - small_cpt
    else:
        raise ConfigError(_ambiguous_weights(origin, weights, known, method))
    fusion.pop("weights_from", None)


def _is_trimix_point(weights: dict[str, float]) -> bool:
    if not set(PAPER_ROLES) <= set(weights) or any(w for r, w in weights.items() if r not in PAPER_ROLES):
        return False
    return abs(weights[SMALL_BASE] - (1.0 - weights[LARGE] - weights[SMALL_CPT])) <= 1e-6


def _ambiguous_weights(origin: str, weights: dict[str, float], known: list[str], method: str) -> str:
    def show(values: dict[str, float]) -> str:
        return ", ".join(f"{r}={values[r]:g}" for r in known)

    given = ",".join(f"{r}={w:g}" for r, w in weights.items())
    readings = [
        f"read as 'weighted' with the unnamed sources at 0, it fuses {show(dict.fromkeys(known, 0.0) | weights)}"
    ]
    if {LARGE, SMALL_CPT} <= set(weights) <= set(PAPER_ROLES) <= set(known):
        derived = 1.0 - weights[LARGE] - weights[SMALL_CPT]
        trimix = dict.fromkeys(known, 0.0) | weights | {SMALL_BASE: derived}
        readings.insert(0, f"read as TriMix (small_base derived), it fuses {show(trimix)}")
    return (
        f"{origin} '{given}' names {len(weights)} of the {len(known)} sources while the fusion method is "
        f"{method!r}, so it is ambiguous: " + "; ".join(readings) + ". Name every source "
        f"(e.g. add {next(r for r in known if r not in weights)}=0), or pass --method trimix for the TriMix reading."
    )


def parse_weights_arg(
    text: str, pairs: str = ",", assign: str = "=", what: str = "--weights"
) -> dict[str, float]:
    """Parse ``large=0.1,small_cpt=0.9`` (or another separator pair, e.g. ``large:0.1|small_cpt:0.9``)."""
    weights: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(pairs))):
        role, sep, value = item.partition(assign)
        role = role.strip()
        if role in weights:
            raise ConfigError(
                f"{what} gives role {role!r} twice ({weights[role]:g} and {value.strip()}); give each role once"
            )
        try:
            if not sep:
                raise ValueError
            weights[role] = float(value)
        except ValueError as exc:
            example = pairs.join(f"{r}{assign}{w}" for r, w in (("large", 0.1), ("small_cpt", 0.9)))
            raise ConfigError(
                f"{what} expects role{assign}number pairs joined by {pairs!r}, like '{example}'; got {item!r}"
            ) from exc
        if not math.isfinite(weights[role]):
            raise ConfigError(f"{what}: the weight of {role!r} must be a finite number; got {value.strip()}")
    return weights


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # merge keys (<<) first, as the safe loader does
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def load_config(
    source: str | Path | dict[str, Any],
    overrides: dict[str, Any] | None = None,
    weights: dict[str, float] | None = None,
    flags: dict[str, str] | None = None,
    weights_origin: str = "--weights",
) -> TrimixConfig:
    """Read, merge and validate a run config.

    Args:
        source: a YAML path or an already-parsed dict.
        overrides: dotted keys to set before validation, e.g. ``{"generation.max_new_tokens": 8}``.
        weights: explicit per-role weights (see :func:`apply_weights` for how a partial set is read).
        flags: dotted key -> the command-line flag that set it, so that errors name the flag.
        weights_origin: what gave ``weights``, named by errors about them (lm-eval: its ``model_args``).

    Returns:
        The validated config with every source's weight resolved.

    Raises:
        ConfigError: a missing file, bad YAML, or an invalid value (the message names the field).
    """
    origin = "<dict>"
    if isinstance(source, dict):
        raw = json.loads(json.dumps(source))
    else:
        path = Path(source)
        origin = str(path)
        stream = path.is_fifo() or path.is_char_device()  # `-c <(...)`, `-c /dev/stdin`
        if not path.exists():
            raise ConfigError(f"config file {origin!r} does not exist")
        if path.is_dir():
            raise ConfigError(
                f"config file {origin!r} is a folder; pass the run's YAML file (e.g. {origin}/config.yaml)"
            )
        try:
            raw = yaml.load(read_text(path, "config file"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin} must hold a mapping with a `models` list at the top level")
        _check_section_shapes(raw, origin)
        _resolve_relative_paths(raw, Path.cwd() if stream else path.parent)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    weights_from = (raw.get("fusion") or {}).get("weights_from")
    origin_of_weights = weights_origin  # what a message about ``weights`` blames
    if weights_from and weights is None:
        weights = read_selected_weights(weights_from)
        origin_of_weights = f"fusion.weights_from ({weights_from})"
    if weights is not None:
        apply_weights(raw, weights, origin_of_weights, method_given="fusion.method" in (overrides or {}))
    try:
        return TrimixConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin, flags)) from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # absent, or null in the file (e.g. `speculative: null`)
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# The top-level sections that hold settings (a mapping each) and the example a message shows.
_SECTIONS = {
    "fusion": "fusion: {method: trimix}",
    "generation": "generation: {max_new_tokens: 16}",
    "search": "search: {task: sib200_topic}",
    "cpt": "cpt: {corpus: [uig.txt]}",
    "eval": "eval: {methods: [...], tasks: [...]}",
}


def _check_section_shapes(raw: dict[str, Any], origin: str) -> None:
    """A section written as a number or a list (``generation: 16``) is named before anything reads it."""
    for key, example in _SECTIONS.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"{origin}: `{key}` must be a mapping of settings, like `{example}`; got {value!r}"
            )
    models = raw.get("models")
    if models is not None and not isinstance(models, list):
        raise ConfigError(f"{origin}: `models` must be a list of sources (`- {{model: ..., role: ...}}`)")


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative local paths in a config file relative to that file, not to the shell's cwd."""

    def fix(value: str | None) -> str | None:
        if not value or not value.startswith(("./", "../")):
            return value
        return str((base / value).resolve())

    for m in raw.get("models", []) or []:
        if isinstance(m, dict):
            for key in ("model", "adapter", "tokenizer"):
                if isinstance(m.get(key), str):
                    m[key] = fix(m[key])
    fusion = raw.get("fusion")
    if isinstance(fusion, dict) and isinstance(fusion.get("weights_from"), str):
        fusion["weights_from"] = fix(fusion["weights_from"])
    search = raw.get("search")
    if isinstance(search, dict) and isinstance(search.get("text_file"), str):
        search["text_file"] = fix(search["text_file"])
    speculative = (raw.get("generation") or {}).get("speculative")
    if isinstance(speculative, dict) and isinstance(speculative.get("draft_vocab_text"), str | list):
        texts = speculative["draft_vocab_text"]
        speculative["draft_vocab_text"] = [
            fix(t) if isinstance(t, str) else t for t in ([texts] if isinstance(texts, str) else texts)
        ]
    cpt = raw.get("cpt")
    if isinstance(cpt, dict) and isinstance(cpt.get("corpus"), list):
        cpt["corpus"] = [fix(c) if isinstance(c, str) else c for c in cpt["corpus"]]
    for spec in (raw.get("eval") or {}).get("tasks", []) or []:
        options = spec.get("options") if isinstance(spec, dict) else None
        for key in ("root", "path", "train_path", "dev_path"):
            if isinstance(options, dict) and isinstance(options.get(key), str):
                options[key] = fix(options[key])
