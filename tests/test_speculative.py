"""Speculative fusion: greedy output identical to plain fused decoding, sampling exact in distribution."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import trio_config
from trimix import FusedLM, GenerationConfig, load_config
from trimix.decoding import speculative
from trimix.decoding.sampling import TokenChooser
from trimix.decoding.speculative import emission_probabilities, frequent_tokens, next_k, residual_distribution
from trimix.errors import ConfigError
from trimix.fusion import fused_scores
from trimix.testing import CORPUS

PROMPTS = [
    "Hello world, this is",
    "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. بۈگۈن ھاۋا",
    "The",
    "Translate the sentence into English. Answer: The quick brown fox",
]


def _lm(make_model, arch: str, weights=(0.1, 0.9), **fusion) -> FusedLM:
    trio = {
        "large": make_model(arch, seed=1, extra_rows=8),  # the Qwen2.5 row-count mismatch
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    raw = trio_config(trio, method="trimix", **fusion)
    raw["models"][0]["weight"], raw["models"][1]["weight"] = weights
    return FusedLM.from_config(load_config(raw))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("k", [1, 3, 6, "auto"])
def test_greedy_speculative_equals_plain_fused_decoding(make_model, arch, k) -> None:
    lm = _lm(make_model, arch, weights=(0.3, 0.9))
    gen = GenerationConfig(max_new_tokens=18, ignore_eos=True, batch_size=4)
    plain = lm.generate(PROMPTS, gen)
    fast = lm.generate(PROMPTS, gen, speculative={"k": k})
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    alone = lm.generate(PROMPTS[1:2], gen, speculative={"k": k})  # batch 1
    assert alone[0].token_ids == plain[1].token_ids
    stats = fast[0].stats
    assert stats["draft"] == "small_cpt" and stats["rounds"] > 0  # the largest weight drafts
    assert 0.0 <= stats["acceptance_rate"] <= 1.0


@pytest.mark.parametrize("case", ["plausibility", "stop", "eos", "three_sources", "outside_drafter"])
def test_greedy_speculative_cases(make_model, case) -> None:
    fusion = {"plausibility": {"role": "small_cpt", "alpha": 0.2}} if case == "plausibility" else {}
    lm = _lm(make_model, "gemma3", weights=(0.3, 0.8) if case == "three_sources" else (0.1, 0.9), **fusion)
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=4)
    free = lm.generate(PROMPTS, gen)
    spec: dict = {"k": 4}
    if case == "stop":
        gen = gen.model_copy(update={"stop": [free[1].text[3:5]]})
    if case == "eos":  # an end-of-sequence token in the middle of an accepted draft
        gen = gen.model_copy(update={"ignore_eos": False, "eos_token_ids": [free[0].token_ids[5]]})
    if case == "outside_drafter":
        spec["draft"] = "small_base"  # not fused at 0.1/0.9: an extra model with the same tokenizer
    plain = lm.generate(PROMPTS, gen)
    fast = lm.generate(PROMPTS, gen, speculative=spec)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in fast] == [g.finish_reason for g in plain]
    assert [g.text for g in fast] == [g.text for g in plain]
    if case in {"stop", "eos"}:
        assert {g.finish_reason for g in plain} & {"stop", "eos"}
    if case == "outside_drafter":
        assert fast[0].stats["draft"] == "small_base" and lm.roles == ("large", "small_cpt")


def test_speculative_stream_emits_the_same_tokens(make_model) -> None:
    lm = _lm(make_model, "qwen2")
    gen = GenerationConfig(max_new_tokens=10, ignore_eos=True, batch_size=4, speculative={"k": 3})
    streamed: dict[int, list[int]] = {}
    for event in lm.stream(PROMPTS, gen):
        if event.token_id >= 0:
            streamed.setdefault(event.index, []).append(event.token_id)
    assert [streamed[i] for i in range(len(PROMPTS))] == [g.token_ids for g in lm.generate(PROMPTS, gen)]


DISTRIBUTIONS = [
    ([0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]),
    ([0.1, 0.1, 0.8, 0.0], [0.7, 0.1, 0.1, 0.1]),
    ([0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.5, 0.0]),
    ([0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]),
    ([0.4, 0.6, 0.0, 0.0], [0.4, 0.6, 0.0, 0.0]),
]


@pytest.mark.parametrize(("p", "q"), DISTRIBUTIONS)
def test_one_position_emits_exactly_the_fused_distribution(p, q) -> None:
    p, q = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    torch.testing.assert_close(emission_probabilities(p, q), p)


def _accept_probability(p_x: float, q_x: float, grid: int = 200_000) -> float:
    """P(rule accepts) for U uniform in (0, 1), by evaluating the implementation's rule on a fine grid."""
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    return float(speculative.ACCEPTANCE_RULE(u, torch.tensor(p_x), torch.tensor(q_x)).double().mean())


def test_positions_one_to_k_emit_the_fused_distribution_exactly() -> None:
    """Enumerate a whole round (k = 2, context-independent p and q) with the implementation's rule."""
    p = [torch.tensor(x, dtype=torch.float64) for x in ([0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4])]
    q = [torch.tensor(x, dtype=torch.float64) for x in ([0.2, 0.2, 0.6], [0.5, 0.25, 0.25])]
    first, second = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for x1, x2 in itertools.product(range(3), range(3)):
        weight = float(q[0][x1] * q[1][x2])
        a1 = _accept_probability(float(p[0][x1]), float(q[0][x1]))
        a2 = _accept_probability(float(p[1][x2]), float(q[1][x2]))
        r1, r2 = residual_distribution(p[0], q[0]), residual_distribution(p[1], q[1])
        first[x1] += weight * a1
        first += weight * (1 - a1) * r1
        # The second emitted token: x2 if x1 and x2 are kept, the residual if x1 kept and x2 rejected;
        # after a rejection at position 1 the round ends and the next round's first draft comes from q1
        # (context-independent here), so that case contributes p2 through the same rule.
        second[x2] += weight * a1 * a2
        second += weight * a1 * (1 - a2) * r2
        second += weight * (1 - a1) * emission_probabilities(p[1], q[1])
    torch.testing.assert_close(first, p[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(second, p[1], atol=1e-4, rtol=0)


def _second_token_tv(lm: FusedLM, samples: int, **spec) -> float:
    """Total-variation distance between the empirical second token (given the most common first one) under
    speculative sampling and the exact fused distribution computed from one forward pass."""
    prompt = PROMPTS[0]
    gen = GenerationConfig(
        max_new_tokens=3, do_sample=True, temperature=1.0, top_k=6, seed=11, ignore_eos=True, batch_size=512
    )
    out = lm.generate([prompt] * samples, gen, speculative={"k": 1, **spec})
    firsts = torch.tensor([g.token_ids[0] for g in out])
    mode = int(firsts.mode().values)
    seconds = torch.tensor([g.token_ids[1] for g in out if g.token_ids[0] == mode])
    ids = lm.sources[0].tokenizer(prompt)["input_ids"] + [mode]
    logits = [s.model(input_ids=torch.tensor([ids])).logits[:, -1] for s in lm.sources]
    scores = fused_scores(logits, torch.tensor([lm.weight_vector()]), lm.vocab_size)
    exact = torch.softmax(TokenChooser(gen).warp(scores), -1)[0]
    empirical = torch.bincount(seconds, minlength=exact.numel()).double() / seconds.numel()
    tv = 0.5 * float((empirical - exact.double()).abs().sum())
    return tv


def test_speculative_sampling_matches_the_fused_distribution(make_model, monkeypatch) -> None:
    lm = _lm(make_model, "qwen2", weights=(0.6, 0.6))  # p differs from the drafter's q
    assert _second_token_tv(lm, 3000) < 0.08
    # A wrong rule (keep every draft) emits the drafter's distribution instead: the same test catches it.
    monkeypatch.setattr(
        speculative, "ACCEPTANCE_RULE", lambda u, p_x, q_x: torch.ones_like(u, dtype=torch.bool)
    )
    assert _second_token_tv(lm, 3000) > 0.15


def _draft_text(tmp_path: Path) -> str:
    path = tmp_path / "draft_vocab.txt"
    path.write_text("\n".join(CORPUS), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("arch", "drafter", "size"), [("qwen2", None, 12), ("gemma3", None, 40), ("llama", "small_base", 25)]
)
def test_greedy_speculative_with_a_small_draft_vocabulary_equals_plain(
    make_model, tmp_path, arch, drafter, size
) -> None:
    """A drafter restricted to a few frequent tokens proposes worse drafts, never a different output."""
    lm = _lm(make_model, arch, weights=(0.3, 0.9))
    gen = GenerationConfig(max_new_tokens=16, ignore_eos=True, batch_size=4)
    plain = lm.generate(PROMPTS, gen)
    spec = {
        "k": 3,
        "draft": drafter,
        "draft_vocab": size,
        "draft_vocab_text": [_draft_text(tmp_path), "sib200:eng_Latn:dev"],
    }
    fast = lm.generate(PROMPTS, gen, speculative=spec)
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert size < fast[0].stats["draft_vocab"] < lm.vocab_size // 2  # + the prompts' tokens and EOS
    full = lm.generate(PROMPTS, gen, speculative={"k": 3, "draft": drafter})
    assert sum(g.stats["accepted"] for g in fast) <= sum(g.stats["accepted"] for g in full)


def test_speculative_sampling_with_a_small_draft_vocabulary_matches_the_fused_distribution(
    make_model, tmp_path
) -> None:
    """Tokens the drafter cannot propose must still come out at their fused probability (the residual)."""
    lm = _lm(make_model, "qwen2", weights=(0.6, 0.6))
    assert _second_token_tv(lm, 3000, draft_vocab=8, draft_vocab_text=[_draft_text(tmp_path)]) < 0.08


def test_draft_vocabulary_keeps_the_most_frequent_and_the_required_tokens() -> None:
    counts = Counter({5: 10, 7: 10, 3: 4, 9: 1, 250: 99})
    chosen = frequent_tokens(counts, 2, always=[1, 9, 300], vocab_size=200)
    assert chosen.tolist() == [1, 5, 7, 9]  # 250 and 300 lie past the vocabulary; ties by lower id


def test_draft_vocabulary_needs_text() -> None:
    with pytest.raises(ConfigError, match="draft_vocab_text"):
        load_config(
            {
                "models": [{"model": "x", "role": "small_cpt"}],
                "generation": {"speculative": {"draft_vocab": 100}},
            }
        )


def test_speculative_sampling_is_reproducible(make_model) -> None:
    lm = _lm(make_model, "gemma3")
    gen = GenerationConfig(max_new_tokens=12, do_sample=True, top_p=0.9, seed=2, ignore_eos=True)
    a = lm.generate(PROMPTS, gen, speculative={"k": 3})
    b = lm.generate(PROMPTS, gen, speculative={"k": 3})
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_auto_k_follows_acceptance() -> None:
    assert next_k(None, 4) == 4
    assert next_k(0.2, 4) == 1 and next_k(0.999, 2) == 8
    assert next_k(0.5, 4) == 3 and next_k(0.8, 1) == 7
