"""trimix calls transformers by the names of the installed release, so that no call of its own warns.

transformers renamed some keywords during 5.x (``past_key_values`` -> ``cache`` for a model's forward,
``gradient_checkpointing`` -> ``activation_checkpointing`` for ``TrainingArguments``); the new releases keep
the old names as aliases that emit a FutureWarning, the older ones know only the old names. These tests
run with whatever transformers is installed (e.g. ``PYTHONPATH=/tmp/tf_old`` with 5.17 on top of 5.25).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

import trimix
from conftest import trio_config
from trimix import FusedLM, load_config
from trimix.backends.hf import HFBackend, cache_keyword
from trimix.config import CptConfig, SourceConfig
from trimix.testing import CORPUS, build_model
from trimix.training import run_cpt
from trimix.training.cpt import checkpointing_keyword

# Old names that transformers 5.x deprecates in favour of new ones trimix must use where they exist.
RENAMED = {"past_key_values", "gradient_checkpointing", "gradient_checkpointing_kwargs"}
# "`name` is deprecated ..." (transformers' deprecate_kwarg, TrainingArguments, PreTrainedModel properties).
DEPRECATED_SUBJECT = re.compile(r"`([\w.]+)` is deprecated")


def _keywords_trimix_passes() -> set[str]:
    """Every keyword argument name that trimix's own code spells out in a call."""
    names: set[str] = set()
    for path in Path(trimix.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                names.update(k.arg for k in node.keywords if k.arg is not None)
    return names


def _trimix_deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    """The Future/DeprecationWarnings that name, as the deprecated thing, a keyword trimix passes (or one of
    the renamed keywords, however it is passed). Deprecations of names trimix does not use come from inside
    other libraries (e.g. PEFT reads ``model.is_gradient_checkpointing``) and are not trimix's to fix."""
    ours = _keywords_trimix_passes() | RENAMED
    found = []
    for w in caught:
        if not issubclass(w.category, (FutureWarning, DeprecationWarning)):
            continue
        if set(DEPRECATED_SUBJECT.findall(str(w.message))) & ours:
            found.append(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})")
    return found


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_cache_keyword_is_one_the_forward_names_and_fills_the_cache(tokenizer, arch: str) -> None:
    backend = HFBackend(build_model(arch, len(tokenizer)), tokenizer)
    parameters = inspect.signature(backend.decoder.forward).parameters
    assert backend.cache_keyword == cache_keyword(backend.decoder)
    assert backend.cache_keyword == ("cache" if "cache" in parameters else "past_key_values")
    # A forward with **kwargs would swallow a keyword it does not know; the cache must really be written.
    enc = tokenizer(["Hello world, this is"], return_tensors="pt")
    _, state = backend.prefill(enc["input_ids"], enc["attention_mask"])
    layer = state.cache.layers[0]
    assert layer.is_initialized and layer.keys.shape[-2] == enc["input_ids"].shape[1]
    _, static = backend.prefill(enc["input_ids"], enc["attention_mask"], capacity=16)
    assert bool(static.cache.layers[0].keys.abs().sum(-1)[..., : enc["input_ids"].shape[1]].gt(0).all())


def test_checkpointing_keyword_is_a_training_arguments_field() -> None:
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    keyword = checkpointing_keyword()
    assert keyword in fields
    assert keyword == "activation_checkpointing" or "activation_checkpointing" not in fields


def test_fused_decoding_emits_no_deprecation_of_trimix_calls(trio) -> None:
    lm = FusedLM.from_config(load_config(trio_config(trio)))
    # "always": overrides pytest's ignore::DeprecationWarning and the once-per-location registry.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = lm.generate(
            ["Hello world, this is", "The"], max_new_tokens=4, ignore_eos=True, engine="eager"
        )
        static = lm.generate(
            ["Hello world, this is", "The"], max_new_tokens=4, ignore_eos=True, engine="static"
        )
    assert [g.token_ids for g in eager] == [g.token_ids for g in static]
    assert _trimix_deprecations(caught) == []


def test_cpt_emits_no_deprecation_of_trimix_calls(make_model, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n", encoding="utf-8")
    base = SourceConfig(model=str(make_model("llama", seed=11)), role="small_base")
    cpt = CptConfig(
        corpus=[str(corpus)],
        block_size=16,
        batch_size=2,
        max_steps=2,
        save_every=100,
        warmup_ratio=0.0,
        gradient_checkpointing=True,
        lora={"r": 2, "alpha": 4, "dropout": 0.0},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run_cpt(base, cpt, tmp_path / "run", progress=False)
    assert report.steps == 2 and all(torch.isfinite(torch.tensor(report.train_loss)))
    assert _trimix_deprecations(caught) == []
    # PEFT's own read of the deprecated attribute is kept out of trimix's output (demo, cpt) as well.
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_the_check_catches_a_renamed_keyword() -> None:
    """The filter above catches the warnings trimix's calls used to emit under transformers 5.25, and lets
    through one that comes from inside PEFT."""
    messages = [
        "`past_key_values` is deprecated and will be removed in version 5.40.0 for `Qwen2Model.forward`. "
        "Use `cache` instead.",
        "`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. "
        "Use `is_activation_checkpointing` instead.",
    ]
    caught = [warnings.WarningMessage(m, FutureWarning, "modeling_utils.py", 1) for m in messages]
    found = _trimix_deprecations(caught)
    assert len(found) == 2 and "`past_key_values`" in found[0] and "`gradient_checkpointing`" in found[1]
