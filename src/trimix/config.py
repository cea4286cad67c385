"""Pydantic models for every YAML a user writes.

One file describes a run: the sources (``models``), how they are fused (``fusion``), how text is
generated (``generation``), and, for the commands that need them, the weight search (``search``),
continual pretraining (``cpt``) and evaluation (``eval``) sections. Defaults live here and only here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trimix.errors import ConfigError

LARGE, SMALL_CPT, SMALL_BASE = "large", "small_cpt", "small_base"
PAPER_ROLES = (LARGE, SMALL_CPT, SMALL_BASE)
DType = Literal["auto", "float32", "bfloat16", "float16"]
FusionMethod = Literal["weighted", "single", "proxy_tuning", "trimix"]
_WEIGHT_TOLERANCE = 1e-6


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

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"weight must be a finite number; got {value!r}")
        return value


class PlausibilityConfig(_Strict):
    """Keep only tokens whose probability under ``role`` is >= ``alpha`` x that source's top one."""

    role: str
    alpha: float = Field(0.1, gt=0.0, le=1.0)


class FusionConfig(_Strict):
    """How the sources' logits are combined.

    Methods:
        weighted: every used source carries an explicit ``weight``.
        single: weight 1 on ``fusion.role``; no other source is loaded.
        proxy_tuning: ``L_large + alpha * (L_small_cpt - L_small_base)`` (Liu et al., 2024).
        trimix: ``a * L_large + b * L_small_cpt + (1 - a - b) * L_small_base`` with ``a``, ``b`` the
            weights of ``large`` and ``small_cpt`` (the small_base weight is derived).
    """

    method: FusionMethod = "trimix"
    role: str | None = None
    alpha: float = 1.0
    plausibility: PlausibilityConfig | None = None
    vocab: Literal["exact", "shared_prefix"] = "exact"
    weights_from: str | None = None

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"alpha must be finite; got {value!r}")
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

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty; remove the empty string from `stop`")
        return value


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
    score: Literal["prompt", "input"] = "prompt"
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
    method: FusionMethod = "trimix"
    role: str | None = None
    alpha: float = 1.0
    weights: dict[str, float] | None = None
    select: bool = False
    plausibility: PlausibilityConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        if self.select and self.weights:
            raise ValueError(f"method {self.name!r}: give `weights` or `select: true`, not both")
        return self

    def fusion(self) -> FusionConfig:
        return FusionConfig(
            method=self.method, role=self.role, alpha=self.alpha, plausibility=self.plausibility
        )


class TaskSpec(_Strict):
    """One task family over some languages; ``options`` go to the task (root, path, pivot, direction...)."""

    task: str
    langs: list[str] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    split: Literal["train", "dev", "test"] = "test"
    limit: int | None = Field(None, ge=1)
    scoring: Literal["generate", "loglikelihood"] = "generate"
    shots: int | None = Field(None, ge=0)
    prompt_lang: Literal["en", "zh"] = "en"


class EvalConfig(_Strict):
    """The evaluation matrix (``trimix eval``): methods x tasks x languages."""

    methods: list[MethodSpec] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=list)
    seed: int = 0
    batch_size: int = Field(8, ge=1)

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
        plaus = self.fusion.plausibility
        if plaus is not None and plaus.role not in roles:
            raise ValueError(
                f"`fusion.plausibility.role` must be one of {', '.join(roles)}; got {plaus.role!r}. "
                "Omit `plausibility` to disable it."
            )
        weights = resolve_weights(self.fusion, {m.role: m.weight for m in self.models})
        for source in self.models:
            source.weight = weights[source.role]
        return self

    def weights(self) -> dict[str, float]:
        """The resolved weight of every source, by role."""
        return {m.role: float(m.weight or 0.0) for m in self.models}

    def source(self, role: str) -> SourceConfig:
        for m in self.models:
            if m.role == role:
                return m
        raise ConfigError(f"no source has role {role!r}; roles are {', '.join(m.role for m in self.models)}")


def _require_roles(method: str, given: dict[str, float | None], needed: tuple[str, ...]) -> None:
    missing = [r for r in needed if r not in given]
    if missing:
        raise ValueError(
            f"fusion method {method!r} needs sources with roles {', '.join(needed)}; missing {missing}. "
            "Add them under `models`, or use method 'weighted' with explicit weights."
        )
    extra = [r for r in given if r not in needed and given[r] not in (None, 0.0)]
    if extra:
        raise ValueError(
            f"fusion method {method!r} fuses only {', '.join(needed)}; source(s) {extra} carry a weight. "
            "Remove them, set their weight to 0, or use method 'weighted'."
        )


def _check_consistent(role: str, given: float | None, derived: float, method: str) -> None:
    if given is not None and abs(given - derived) > _WEIGHT_TOLERANCE:
        raise ValueError(
            f"source {role!r} has weight {given} but method {method!r} sets it to {derived:g}; "
            "remove that `weight` or use method 'weighted'."
        )


def resolve_weights(fusion: FusionConfig, given: dict[str, float | None]) -> dict[str, float]:
    """Turn a fusion method and the sources' optional weights into one weight per role.

    Args:
        fusion: the fusion section.
        given: role -> the ``weight`` written in the config (``None`` where omitted).

    Returns:
        role -> finite weight (0 for sources the method does not use).

    Raises:
        ValueError: when the method's roles are missing or explicit weights contradict it.
    """
    method = fusion.method
    resolved = dict.fromkeys(given, 0.0)
    if method == "weighted":
        missing = [r for r, w in given.items() if w is None]
        if missing:
            raise ValueError(
                f"fusion method 'weighted' needs a `weight` on every source; {missing} have none. "
                "Give them a weight (0 to leave a source out) or use method 'trimix'."
            )
        resolved.update({r: float(w) for r, w in given.items() if w is not None})
    elif method == "single":
        if fusion.role not in given:
            raise ValueError(
                f"fusion method 'single' needs `fusion.role` naming a source ({', '.join(given)}); "
                f"got {fusion.role!r}"
            )
        for role, w in given.items():
            _check_consistent(role, w, 1.0 if role == fusion.role else 0.0, method)
        resolved[fusion.role] = 1.0
    elif method == "proxy_tuning":
        _require_roles(method, given, PAPER_ROLES)
        derived = {LARGE: 1.0, SMALL_CPT: fusion.alpha, SMALL_BASE: -fusion.alpha}
        for role, w in derived.items():
            _check_consistent(role, given[role], w, method)
        resolved.update(derived)
    else:  # trimix
        _require_roles(method, given, PAPER_ROLES)
        a, b = given[LARGE], given[SMALL_CPT]
        if a is None or b is None:
            raise ValueError(
                "fusion method 'trimix' needs `weight` on the large (a) and small_cpt (b) sources; "
                f"got large={a}, small_cpt={b}. Run `trimix select` to choose them, or set e.g. 0.1 and 0.9."
            )
        derived_base = 1.0 - a - b
        _check_consistent(SMALL_BASE, given[SMALL_BASE], derived_base, method)
        resolved.update({LARGE: a, SMALL_CPT: b, SMALL_BASE: derived_base})
    return resolved


def format_validation_error(error: ValidationError, origin: str) -> str:
    """Render a pydantic error as 'origin: field.path: message' lines."""
    lines = [f"invalid configuration in {origin}:"]
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        suffix = f" (got {got!r})" if item["type"] in {"extra_forbidden", "literal_error"} else ""
        lines.append(f"  {where}: {message}{suffix}")
    return "\n".join(lines)


def read_selected_weights(path: str | Path) -> dict[str, float]:
    """Read the weights chosen by ``trimix select`` from its ``selection.json``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"weights file {str(path)!r} does not exist; pass the selection.json of `trimix select`"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        weights = payload["selected"]["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: expected the JSON written by `trimix select` with a 'selected.weights' object ({exc})"
        ) from exc
    return {str(k): float(v) for k, v in weights.items()}


def apply_weights(raw: dict[str, Any], weights: dict[str, float]) -> None:
    """Set explicit per-role weights on a raw (unvalidated) config dict and switch to 'weighted'."""
    known = {m.get("role") for m in raw.get("models", [])}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ConfigError(f"weights name role(s) {unknown} that no source has; roles are {sorted(known)}")
    for m in raw.get("models", []):
        m["weight"] = weights.get(m.get("role"), 0.0)
    fusion = raw.setdefault("fusion", {})
    fusion["method"] = "weighted"
    fusion.pop("weights_from", None)


def parse_weights_arg(text: str) -> dict[str, float]:
    """Parse ``large=0.1,small_cpt=0.9`` into a dict."""
    weights: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        role, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[role.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(
                f"--weights expects role=number pairs like 'large=0.1,small_cpt=0.9'; got {item!r}"
            ) from exc
    return weights


def load_config(
    source: str | Path | dict[str, Any],
    overrides: dict[str, Any] | None = None,
    weights: dict[str, float] | None = None,
) -> TrimixConfig:
    """Read, merge and validate a run config.

    Args:
        source: a YAML path or an already-parsed dict.
        overrides: dotted keys to set before validation, e.g. ``{"generation.max_new_tokens": 8}``.
        weights: explicit per-role weights that replace the fusion method (method becomes 'weighted').

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
        if not path.is_file():
            raise ConfigError(f"config file {origin!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin} must hold a mapping with a `models` list at the top level")
        _resolve_relative_paths(raw, path.parent)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    weights_from = (raw.get("fusion") or {}).get("weights_from")
    if weights_from and weights is None:
        weights = read_selected_weights(weights_from)
    if weights is not None:
        apply_weights(raw, weights)
    try:
        return TrimixConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


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
    cpt = raw.get("cpt")
    if isinstance(cpt, dict) and isinstance(cpt.get("corpus"), list):
        cpt["corpus"] = [fix(c) if isinstance(c, str) else c for c in cpt["corpus"]]
    for spec in (raw.get("eval") or {}).get("tasks", []) or []:
        options = spec.get("options") if isinstance(spec, dict) else None
        for key in ("root", "path", "train_path", "dev_path"):
            if isinstance(options, dict) and isinstance(options.get(key), str):
                options[key] = fix(options[key])
