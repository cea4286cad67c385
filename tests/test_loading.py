"""Source loading (local folders, PEFT adapters, hub ids offline) and vocabulary checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CORPUS, build_tokenizer
from trimix import FusedLM, load_config
from trimix.backends import load_source
from trimix.backends.loading import SOURCE_CARD
from trimix.backends.vocab import check_vocabularies
from trimix.config import SourceConfig
from trimix.errors import SourceLoadError, VocabularyMismatchError


def _source(model: str, role: str = "x", **kw) -> SourceConfig:
    return SourceConfig(model=model, role=role, weight=1.0, **kw)


def test_hub_id_offline_fails_with_clear_message() -> None:
    with pytest.raises(SourceLoadError, match=r"'no-such-org/no-such-model'.*--local-dir DIR.*model: DIR"):
        load_source(_source("no-such-org/no-such-model"))


def test_missing_local_path_fails_with_clear_message(tmp_path) -> None:
    with pytest.raises(SourceLoadError, match="does not exist"):
        load_source(_source(str(tmp_path / "nope")))
    with pytest.raises(SourceLoadError, match="GGUF file"):
        load_source(_source(str(tmp_path / "model.gguf")))


def test_unknown_embedded_model() -> None:
    with pytest.raises(SourceLoadError, match=r"unknown embedded model 'nope'.*gemma-3-270m"):
        load_source(_source("embedded:nope"))


def test_dtype_is_per_source(make_model) -> None:
    source = load_source(_source(str(make_model("qwen2", seed=2)), dtype="bfloat16"))
    assert next(source.model.parameters()).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def adapter_dir(make_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = make_model("llama", seed=4)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    (folder / SOURCE_CARD).write_text(json.dumps({"base": {"model": str(base_dir)}}))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    return base_dir, folder, ids, expected


@pytest.mark.parametrize("merge", [True, False])
def test_peft_adapter_on_a_base(adapter_dir, merge: bool) -> None:
    base_dir, folder, ids, expected = adapter_dir
    source = load_source(_source(str(base_dir), adapter=str(folder), merge_adapter=merge))
    with torch.no_grad():
        torch.testing.assert_close(source.model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_adapter_folder_is_a_source_by_itself(adapter_dir) -> None:
    _, folder, ids, expected = adapter_dir
    source = load_source(_source(str(folder)))
    with torch.no_grad():
        torch.testing.assert_close(source.model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_bad_adapter_path(make_model, tmp_path) -> None:
    with pytest.raises(SourceLoadError, match="not a PEFT adapter folder"):
        load_source(_source(str(make_model("llama", seed=4)), adapter=str(tmp_path)))


def test_vocab_row_mismatch_trio_fuses_over_tokenizer_vocab(trio, tokenizer) -> None:
    lm = FusedLM.from_config(
        load_config(
            {
                "models": [{"model": str(p), "role": r} for r, p in trio.items()],
                "fusion": {"method": "proxy_tuning"},
            }
        )
    )
    rows = {s.role: s.logit_rows for s in lm.sources}
    assert rows["large"] == len(tokenizer) + 8 and rows["small_cpt"] == len(tokenizer)
    assert lm.vocab_size == len(tokenizer)


def test_tokenizers_of_different_size_fail_clearly(tokenizer) -> None:
    other = build_tokenizer(vocab_size=150)
    with pytest.raises(VocabularyMismatchError, match=r"sizes differ.*shared_prefix"):
        check_vocabularies({"a": tokenizer, "b": other}, {"a": 200, "b": 150})


def test_shared_prefix_mode_checks_the_shared_ids(tokenizer) -> None:
    smaller = build_tokenizer(vocab_size=150)
    # BPE merges are learned in order, so the 150-token tokenizer is a prefix of the 200-token one.
    assert (
        check_vocabularies({"a": tokenizer, "b": smaller}, {"a": 208, "b": 150}, mode="shared_prefix") == 150
    )


def test_disagreeing_tokenizers_name_the_first_difference(tokenizer) -> None:
    """Two tokenizers of the same size and specials whose vocabularies differ: two ordinary tokens trade ids
    (so the sizes agree by construction), and the error names the lower of the two ids and both tokens."""
    import re

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    low, high = 57, 140  # past the four specials
    token_low, token_high = tokenizer.convert_ids_to_tokens([low, high])
    vocab[token_low], vocab[token_high] = high, low
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    assert len(other) == len(tokenizer)
    assert other.convert_ids_to_tokens([low, high]) == [token_high, token_low]
    message = re.escape(f"disagree: id {low} is {token_low!r} for a but {token_high!r} for b")
    with pytest.raises(VocabularyMismatchError, match=message):
        check_vocabularies({"a": tokenizer, "b": other}, {"a": 200, "b": 200})


def test_model_with_fewer_rows_than_tokenizer(tokenizer) -> None:
    with pytest.raises(VocabularyMismatchError, match="fewer logits"):
        check_vocabularies({"a": tokenizer}, {"a": 100})


def test_prompt_longer_than_context(trio) -> None:
    lm = FusedLM.from_config(
        load_config(
            {
                "models": [{"model": str(trio["large"]), "role": "large"}],
                "fusion": {"method": "single", "role": "large"},
            }
        )
    )
    with pytest.raises(
        ValueError,
        match=r"tokens for source 'large'; with max_new_tokens 2 it needs \d+ positions, more than the source's context of 1024",
    ):
        lm.generate(["hello " * 1200], max_new_tokens=2)
    # Near the limit: refused up front by default, or decoded until the context is full when asked.
    n = next(n for n in range(1, 1024) if len(lm.tokenizer("hello " * n)["input_ids"]) + 8 > 1024)
    tokens = len(lm.tokenizer("hello " * n)["input_ids"])
    assert tokens + 1 <= 1024
    with pytest.raises(ValueError, match="more than the source's context"):
        lm.generate(["hello " * n], max_new_tokens=8)
    out = lm.generate(["hello " * n], max_new_tokens=8, ignore_eos=True, on_context_limit="stop")[0]
    assert out.finish_reason == "context" and len(out.token_ids) == 1024 - tokens


def _same_vocabulary_other_behaviour(tokenizer, **change):
    """A copy of the tiny tokenizer with one property changed (normaliser or special tokens)."""
    import copy

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    if change.get("lowercase"):
        backend.normalizer = normalizers.Lowercase()
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    specials.update(change.get("specials", {}))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def test_same_vocabulary_but_other_normaliser_is_refused(tokenizer) -> None:
    lowered = _same_vocabulary_other_behaviour(tokenizer, lowercase=True)
    with pytest.raises(VocabularyMismatchError, match="encode the same text differently"):
        check_vocabularies({"a": tokenizer, "b": lowered}, {"a": 200, "b": 200})


def test_special_token_mismatch_is_named(tokenizer) -> None:
    other = _same_vocabulary_other_behaviour(tokenizer, specials={"eos_token": "<pad>"})
    with pytest.raises(VocabularyMismatchError, match=r"special token eos_token_id is 2 for a but 0 for b"):
        check_vocabularies({"a": tokenizer, "b": other}, {"a": 200, "b": 200})


def _byte_level_qwen2_folder(folder):
    """A tiny Qwen2 model whose tokenizer.json has a plain byte-level pre-tokenizer (digits merged), the
    case transformers' Qwen2Tokenizer would silently re-split with its own regex."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trimix.testing import build_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, " 800 800 800 1000 2000 x x"] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    build_model("qwen2", len(fast)).save_pretrained(folder)
    fast.save_pretrained(folder)
    return tok


def test_tokenizer_is_loaded_as_its_file_defines_it(tmp_path, caplog) -> None:
    raw = _byte_level_qwen2_folder(tmp_path)
    with caplog.at_level("WARNING", logger="trimix.backends.loading"):
        source = load_source(SourceConfig(model=str(tmp_path), role="large"))
    written = raw.encode(" 800 x").ids
    assert source.tokenizer(" 800 x", add_special_tokens=False)["input_ids"] == written
    assert "encodes text differently" in caplog.text and "tokenizer_class: library" in caplog.text
    library = load_source(SourceConfig(model=str(tmp_path), role="large", tokenizer_class="library"))
    assert library.tokenizer(" 800 x", add_special_tokens=False)["input_ids"] != written
