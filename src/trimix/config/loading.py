"""Reading a run file: YAML with unique keys, relative paths, did-you-mean errors, weights from flags and files."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trimix.config.models import (
    FusionConfig,
    GenerationConfig,
    GridRange,
    PlausibilityConfig,
    SearchConfig,
    SourceConfig,
    SpeculativeConfig,
)
from trimix.config.sections import (
    CptConfig,
    EvalConfig,
    ExecutorConfig,
    LoraSettings,
    MethodSpec,
    TaskSpec,
    TrimixConfig,
)
from trimix.errors import ConfigError
from trimix.fusion.methods import LARGE, PAPER_ROLES, SMALL_BASE, SMALL_CPT
from trimix.io import read_text


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
