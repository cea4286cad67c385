"""Equivalence tests for fused decoding on tiny Qwen2, Llama and Gemma3 models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import trio_config
from trimix import FusedLM, GenerationConfig, load_config
from trimix.decoding.reference import generate_without_cache

PROMPTS = [
    "Hello world, this is",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. بۈگۈن ھاۋا",
    "The",
    "Translate the sentence into English. Answer: The quick brown fox",
]


def _load(config: dict) -> FusedLM:
    return FusedLM.from_config(load_config(config))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_single_source_reproduces_generate(make_model, arch: str) -> None:
    folder = make_model(arch, seed=7)
    lm = _load(
        {"models": [{"model": str(folder), "role": "only"}], "fusion": {"method": "single", "role": "only"}}
    )
    ours = lm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    model, tok = lm.sources[0].model, lm.sources[0].tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    reference = out[:, enc["input_ids"].shape[1] :].tolist()
    assert [g.token_ids for g in ours] == reference


def test_single_source_stops_at_eos_like_generate(make_model) -> None:
    folder = make_model("qwen2", seed=7)
    lm = _load(
        {"models": [{"model": str(folder), "role": "only"}], "fusion": {"method": "single", "role": "only"}}
    )
    # Make a frequent token the EOS so that rows end at different steps.
    first = lm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    eos = first[0].token_ids[3]
    ours = lm.generate(PROMPTS, max_new_tokens=16, eos_token_ids=[eos])
    model, tok = lm.sources[0].model, lm.sources[0].tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(
        **enc, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    for gen, row in zip(ours, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert gen.token_ids == expected
        assert gen.finish_reason == ("eos" if eos in row else "length")
    free = first[0].token_ids
    assert ours[0].finish_reason == "eos" and ours[0].token_ids == free[: free.index(eos) + 1]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize(
    "fusion",
    [
        {"method": "proxy_tuning"},
        {"method": "trimix", "weights": (0.1, 0.9)},
        {"method": "trimix", "weights": (0.3, 1.0), "plausibility": {"role": "small_cpt", "alpha": 0.1}},
        {"method": "proxy_tuning", "plausibility": {"role": "large", "alpha": 0.3}},
    ],
)
def test_cached_batched_matches_naive_recompute(make_model, arch: str, fusion: dict) -> None:
    trio = {
        "large": make_model(arch, seed=1, extra_rows=8),
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    fusion = dict(fusion)
    weights = fusion.pop("weights", None)
    raw = trio_config(trio, **fusion)
    if weights:
        raw["models"][0]["weight"], raw["models"][1]["weight"] = weights
    lm = _load(raw)
    gen = GenerationConfig(max_new_tokens=14, ignore_eos=True)
    cached = [g.token_ids for g in lm.generate(PROMPTS, gen)]
    assert cached == generate_without_cache(lm, PROMPTS, gen)
    # Batch composition does not change what a prompt decodes to.
    one_by_one = [lm.generate([p], gen)[0].token_ids for p in PROMPTS]
    assert cached == one_by_one


def test_rows_finishing_early_are_dropped_and_rest_unchanged(trio) -> None:
    lm = _load(trio_config(trio))
    free = lm.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    eos = free[1].token_ids[2]
    gen = GenerationConfig(max_new_tokens=12, eos_token_ids=[eos])
    stopped = lm.generate(PROMPTS, gen)
    assert [g.token_ids for g in stopped] == generate_without_cache(lm, PROMPTS, gen)
    for a, b in zip(free, stopped, strict=True):
        cut = a.token_ids.index(eos) + 1 if eos in a.token_ids else len(a.token_ids)
        assert b.token_ids == a.token_ids[:cut]


def test_padded_rows_are_never_generated(make_model) -> None:
    folder = make_model("qwen2", seed=5, extra_rows=8)
    lm = _load(
        {"models": [{"model": str(folder), "role": "large"}], "fusion": {"method": "single", "role": "large"}}
    )
    # Make the padded rows the most likely tokens: fusion must still pick a real token.
    with torch.no_grad():
        lm.sources[0].model.lm_head.weight[lm.vocab_size :] *= 100
    outs = lm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert all(t < lm.vocab_size for g in outs for t in g.token_ids)


def test_sampling_is_seeded_and_varies_with_seed(trio) -> None:
    lm = _load(trio_config(trio))
    gen = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, ignore_eos=True)
    a = lm.generate(PROMPTS, seed=1, **gen)
    b = lm.generate(PROMPTS, seed=1, **gen)
    c = lm.generate(PROMPTS, seed=2, **gen)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_sampling_matches_naive_recompute(trio) -> None:
    lm = _load(trio_config(trio))
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, top_p=0.9, seed=3, ignore_eos=True)
    assert [g.token_ids for g in lm.generate(PROMPTS, gen)] == generate_without_cache(lm, PROMPTS, gen)


def test_stop_strings_truncate_text(trio) -> None:
    lm = _load(trio_config(trio))
    free = lm.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)
    stop = free[0].text[3:5]
    assert stop.strip()
    out = lm.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True, stop=[stop])
    assert out[0].finish_reason == "stop"
    assert out[0].text == free[0].text[: free[0].text.find(stop)]
    assert stop not in out[0].text


def test_stream_yields_the_same_tokens_and_text(trio) -> None:
    lm = _load(trio_config(trio))
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True, batch_size=3)
    full = lm.generate(PROMPTS, gen)
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    for event in lm.stream(PROMPTS, gen):
        tokens.setdefault(event.index, []).append(event.token_id)
        texts[event.index] = texts.get(event.index, "") + event.text
    assert [tokens[i] for i in range(len(PROMPTS))] == [g.token_ids for g in full]
    assert [texts[i] for i in range(len(PROMPTS))] == [g.text for g in full]


def test_inspection_reports_each_source(trio) -> None:
    lm = _load(trio_config(trio))
    out = lm.generate(PROMPTS[:1], max_new_tokens=3, ignore_eos=True, inspect_top_k=3)[0]
    assert out.inspection is not None and len(out.inspection) == 3
    step = out.inspection[0]
    assert set(step.sources) == {"large", "small_cpt", "small_base"}
    assert step.token_id == out.token_ids[0]
    assert step.fused_top[0][0] == step.token  # greedy picks the fused argmax
    ids = torch.tensor([lm.tokenizer(PROMPTS[0])["input_ids"]])
    for source in lm.sources:  # each source's own probability of the chosen token, from a plain forward
        cand = step.sources[source.role]
        with torch.no_grad():
            probs = torch.softmax(source.model(input_ids=ids).logits[0, -1, : lm.vocab_size], dim=-1)
        # The engine's prefill and this forward are float32 evaluations of the same logits z (|z| < ~3),
        # apart by at most ~n * 2^-24 * 3 ~ 1e-5 with n ~ 400 chained roundings; since d log p_i / d z_j is
        # at most 1 in magnitude for i = j and p_j otherwise, p moves by a relative 2e-5 at most (rel=1e-4:
        # a margin of five).
        assert len(cand.top) == 3
        assert cand.prob_of_chosen == pytest.approx(float(probs[step.token_id]), rel=1e-4)


def test_weight_zero_sources_are_not_loaded(trio) -> None:
    raw = trio_config(trio, method="single", role="small_cpt")
    lm = _load(raw)
    assert [s.role for s in lm.sources] == ["small_cpt"]


def test_chat_prompt_format_for_one_source(trio, tokenizer) -> None:
    raw = trio_config(trio)
    raw["models"][0]["prompt_format"] = "chat"
    lm = _load(raw)
    lm.sources[
        0
    ].tokenizer.chat_template = "<bos>{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}A:"
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    cached = [g.token_ids for g in lm.generate(PROMPTS[:3], gen)]
    assert cached == generate_without_cache(lm, PROMPTS[:3], gen)
    plain = [g.token_ids for g in _load(trio_config(trio)).generate(PROMPTS[:3], gen)]
    assert cached != plain


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 5},
        {"plausibility": True},
        {"stop_from_output": True},
        {"eos_from_output": True},
    ],
    ids=["greedy", "sampled", "plausibility", "stop", "eos"],
)
def test_static_engine_equals_eager_engine(make_model, arch: str, settings: dict) -> None:
    """The preallocated, in-place step that CUDA graphs replay gives the eager engine's tokens."""
    trio = {
        "large": make_model(arch, seed=1, extra_rows=8),
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    settings = dict(settings)
    fusion = {"method": "trimix"}
    if settings.pop("plausibility", False):
        fusion["plausibility"] = {"role": "small_cpt", "alpha": 0.2}
    raw = trio_config(trio, **fusion)
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    lm = _load(raw)
    gen = GenerationConfig(
        max_new_tokens=12,
        ignore_eos=True,
        batch_size=3,
        **{k: v for k, v in settings.items() if k not in {"stop_from_output", "eos_from_output"}},
    )
    free = lm.generate(PROMPTS, gen, engine="eager")
    if settings.get("stop_from_output"):
        gen = gen.model_copy(update={"stop": [free[1].text[2:4]]})
    if settings.get("eos_from_output"):
        gen = gen.model_copy(update={"ignore_eos": False, "eos_token_ids": [free[0].token_ids[3]]})
    eager = lm.generate(PROMPTS, gen, engine="eager")
    static = lm.generate(PROMPTS, gen, engine="static")
    assert [g.token_ids for g in static] == [g.token_ids for g in eager]
    assert [g.finish_reason for g in static] == [g.finish_reason for g in eager]
    assert [g.text for g in static] == [g.text for g in eager]
    if settings.get("stop_from_output") or settings.get("eos_from_output"):
        assert {g.finish_reason for g in eager} & {"stop", "eos"}


def test_sampled_rows_do_not_depend_on_their_batch(trio) -> None:
    lm = _load(trio_config(trio))
    gen = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, seed=4, ignore_eos=True)
    batched = lm.generate(PROMPTS, gen, batch_size=4)
    alone = [lm.generate([p], gen, row_ids=[i])[0] for i, p in enumerate(PROMPTS)]
    reordered = lm.generate(PROMPTS[::-1], gen, row_ids=list(range(len(PROMPTS)))[::-1], batch_size=2)[::-1]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone] == [g.token_ids for g in reordered]


def test_with_weights_shares_sources_and_keeps_the_method(trio) -> None:
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.1, 0.9
    lm = _load(raw)
    assert lm.roles == ("large", "small_cpt")  # small_base has weight 0: not loaded
    other = lm.with_weights(large=0.3, small_cpt=0.9)
    assert other.fusion.weights == {"large": 0.3, "small_cpt": 0.9, "small_base": pytest.approx(-0.2)}
    assert other.pool is lm.pool and other.sources[0] is lm.sources[0]  # no reload
    assert "small_base" in lm.pool.sources  # loaded on demand from the config
    from trimix.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no source has|names role"):
        lm.with_weights(huge=1.0)
    with pytest.raises(ConfigError, match="needs a `weight` on every source"):
        lm.with_weights(method="weighted", large=1.0)


def test_inspected_tokens_read_as_text_not_vocabulary_symbols(tokenizer) -> None:
    """Byte-level BPE names ``ھ`` by two byte symbols (``Ú``, ``¾``) and ``ئۇيغۇر`` as ``Ø¦ÛĩÙĬ...``;
    a SentencePiece token keeps its word-initial space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trimix.decoding.text import readable_token

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["ئۇيغۇر تىلى"] * 50 + ["hello world"] * 50, trainer)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe)
    (whole,) = byte_level("ئۇيغۇر")["input_ids"]
    assert byte_level.convert_ids_to_tokens(whole) != "ئۇيغۇر"  # the symbols the issue complained of
    assert readable_token(byte_level, whole) == "ئۇيغۇر"
    halves = byte_level("ھ")["input_ids"]
    assert [readable_token(byte_level, t) for t in halves] == ["⟨partial⟩", "⟨partial⟩"]
    assert [readable_token(byte_level, t) for t in byte_level(" تىلى")["input_ids"]] == [" تىلى"]
    first = tokenizer("ئۇيغۇر", add_special_tokens=False)["input_ids"][0]  # SentencePiece-style, '▁ئ'
    assert readable_token(tokenizer, first) == " ئ"


def test_generate_inspect_prints_a_readable_table(trio, tmp_path, capsys) -> None:
    import yaml

    from trimix.cli.main import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trio_config(trio)), encoding="utf-8")
    code = main(
        ["generate", "-c", str(config), "-p", "ئۇيغۇر تىلى", "--max-new-tokens", "4", "--inspect", "2"]
    )
    assert code == 0
    captured = capsys.readouterr()
    (row,) = [json.loads(line) for line in captured.out.splitlines()]
    table = captured.err.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("prompt 0: 4 tokens"))
    steps = table[start + 2 : start + 6]
    for step, inspected in zip(steps, row["inspection"], strict=True):
        assert step.split()[0].isdigit() and inspected["leader"] in step
        assert f"{inspected['fused_prob']:.2f}" in step
    assert not any(ch in captured.err for ch in "ØÙÚ")  # no byte-level vocabulary symbols
