"""Fixtures: tiny, offline, random-initialised models built once per run (see trimix.testing)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from trimix.testing import CORPUS, build_tokenizer, save_tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))
__all__ = ["CORPUS", "build_tokenizer"]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def make_model(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> Callable[..., Path]:
    """Factory: ``make_model(arch, seed, extra_rows=0)`` -> folder of a saved tiny model + tokenizer."""
    built: dict[tuple[str, int, int], Path] = {}

    def make(arch: str = "qwen2", seed: int = 0, extra_rows: int = 0) -> Path:
        key = (arch, seed, extra_rows)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{arch}-s{seed}-r{extra_rows}")
            built[key] = save_tiny_model(folder, arch, tokenizer, seed=seed, extra_rows=extra_rows)
        return built[key]

    return make


@pytest.fixture(scope="session")
def trio(make_model: Callable[..., Path]) -> dict[str, Path]:
    """A Qwen2 trio: large (8 padded rows, as Qwen2.5-7B), small_cpt and small_base (no padding)."""
    return {
        "large": make_model("qwen2", seed=1, extra_rows=8),
        "small_cpt": make_model("qwen2", seed=2),
        "small_base": make_model("qwen2", seed=3),
    }


def trio_config(trio: dict[str, Path], **fusion) -> dict:
    return {
        "models": [{"model": str(path), "role": role} for role, path in trio.items()],
        "fusion": fusion or {"method": "proxy_tuning"},
        "generation": {"max_new_tokens": 6},
    }
