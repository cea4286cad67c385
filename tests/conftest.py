"""Fixtures: tiny, offline, random-initialised models built once per run (see trimix.testing)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import PreTrainedTokenizerFast

from trimix.testing import CORPUS, build_tokenizer, save_tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))
__all__ = ["CORPUS", "FLOAT32_SUM_REL", "assert_same_rows", "build_tokenizer", "run_cli"]

# Property tests: the same examples on every machine and run (derandomize), no per-example deadline (a
# 2-core CI machine under load is not a bug). HYPOTHESIS_PROFILE=explore draws new random examples.
settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Relative tolerance for float32 sums of log-probabilities computed by two correct paths that batch,
# pad or thread the work differently (or run on CPUs with different kernels: AVX-512, AVX2, default).
# Each log-softmax term carries a few ulps of its log-normaliser (|log Z| <= ~10 nats on the tiny
# models: ~4 * 10 * 2^-24 ~ 2.4e-6 nats) and a sum of n terms adds at most n ulps of the running sum,
# while each term is >= ~1 nat on random 2,000-entry models: relative error <= ~3e-6. Measured: 1.5e-7
# (AVX-512 against AVX2 on a 71-nat sum). 1e-5 keeps a 3x margin over the bound.
FLOAT32_SUM_REL = 1e-5


def assert_same_rows(a, b, path: str = "rows") -> None:
    """Equal, recursively: floats to FLOAT32_SUM_REL (absolute floor 1e-6 near zero), all else exactly.

    For results files written by two runs that batched or threaded the same work differently: texts,
    labels, ids and tokens must be identical; stored NLLs and the scores built from them agree to float32
    precision.
    """
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=FLOAT32_SUM_REL, abs=1e-6), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_rows(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_rows(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_cli(capsys, args: list) -> tuple[int, str]:
    """Run ``trimix ARGS`` in this process: its exit code (argparse's own refusals included) and stderr,
    which must hold no traceback."""
    from trimix.cli.main import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse refuses a flag or choice itself (exit 2, usage and the reason)
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def row_key(row: dict) -> tuple:
    """A predictions row's identity (method, task cell, item): sort two runs' rows into the same order."""
    return (row.get("method"), row.get("task"), row.get("lang"), str(row.get("id")))


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


# MiLiC-Eval-shaped items (test, dev and train_1 alike) for the task readers and prompt tests.
UG = [
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ.",
    "بۈگۈن ھاۋا ناھايىتى ياخشى.",
    "مەكتەپتە ئوقۇغۇچىلار كىتاب ئوقۇدى.",
]


def _mc(i: int) -> dict:
    return {
        "id": f"rc{i}",
        "context": [UG[i % 3], UG[(i + 1) % 3]],
        "question": "Who?",
        "options": ["A1", "B1", "C1", "D1"],
        "answer": "ABCD"[i % 4],
    }


MILIC = {
    "reading_comprehension": [_mc(i) for i in range(4)],
    "response_selection": [{k: v for k, v in _mc(i).items() if k != "question"} for i in range(4)],
    "text_classification": [
        {
            "id": f"tc{i}",
            "text": UG[i % 3],
            "label": {"en": ["sports", "health"][i % 2], "zh": ["体育", "健康"][i % 2]},
        }
        for i in range(4)
    ],
    "title_generation_200": [
        {"id": f"tg{i}", "content": UG[i % 3] * 3, "title": UG[i % 3][:12]} for i in range(4)
    ],
    "math": [
        {
            "id": f"m{i}",
            "question": f"{UG[0]} {i} + 2?",
            "cot": {"en": f"{i} + 2 = {i + 2}. {i + 2}", "zh": f"{i} 加 2 等于 {i + 2}。{i + 2}"},
            "answer": str(i + 2),
        }
        for i in range(4)
    ],
    "translation_dialogue": [
        {"id": f"t{i}", "ug": UG[i % 3], "en": f"sentence {i}", "zh": f"句子{i}"} for i in range(4)
    ],
}


@pytest.fixture(scope="session")
def milic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("milic")
    for folder, items in MILIC.items():
        target = root / folder / "ug"
        target.mkdir(parents=True)
        for name in ("test", "dev", "train_1"):
            (target / f"{name}.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return root
