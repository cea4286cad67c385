"""Weight selection: vectorised fused perplexity against a direct computation, and the search's guarantees."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import trio_config
from trimix import FusedLM, load_config
from trimix.cli.main import main
from trimix.config import SearchConfig
from trimix.errors import ConfigError, DataError
from trimix.fusion import fuse_logits
from trimix.search import (
    FusedPerplexityScorer,
    ScoringText,
    average_perplexity,
    build_candidates,
    combination_nll,
    search_weights,
    selection_texts,
)

TEXTS = [
    ScoringText("a", "Hello world, this is a small test of fused decoding.", 0),
    ScoringText("b", "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. بۈگۈن ھاۋا ناھايىتى ياخشى", 12),
    ScoringText("c", "Topic: science, travel, politics, sports. Answer: The quick brown fox", 0),
]


@pytest.fixture(scope="module")
def lm(trio) -> FusedLM:
    return FusedLM.from_config(load_config(trio_config(trio)), load_all=True)


def direct_nll(
    lm: FusedLM, item: ScoringText, weights: list[float], task_text_only: bool = False
) -> tuple[float, int]:
    """Fuse and score one combination with full forwards: the definition, computed the slow way (only the
    tokens that start inside the item's task-text spans, with ``task_text_only``)."""
    enc = lm.tokenizer(item.text, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logits = [s.model(input_ids=ids).logits[0, :-1, : lm.vocab_size] for s in lm.sources]
    logp = torch.log_softmax(fuse_logits(logits, weights), dim=-1)
    starts = [start for start, _ in enc["offset_mapping"]][1:]
    total, count = 0.0, 0
    for position, start in enumerate(starts):
        if start >= item.score_from and (not task_text_only or any(a <= start < b for a, b in item.spans)):
            total -= float(logp[position, ids[0, position + 1]])
            count += 1
    return total, count


def test_vectorised_perplexity_equals_direct_computation(lm) -> None:
    combos = [[0.1, 0.9, 0.0], [0.5, 0.3, 0.2], [1.0, 1.0, -1.0], [0.3, 1.0, -0.3], [0.0, 0.0, 1.0]]
    # A tiny chunk budget forces many position and combination chunks.
    for chunk_bytes in (4096, 256 * 2**20):
        scorer = FusedPerplexityScorer(
            lm.sources, lm.vocab_size, TEXTS, chunk_bytes=chunk_bytes, progress=False
        )
        totals = scorer.score(torch.tensor(combos))
        for c, weights in enumerate(combos):
            pieces = [direct_nll(lm, t, weights) for t in TEXTS]
            assert totals.n_tokens == sum(n for _, n in pieces)
            assert totals.nll[c].item() == pytest.approx(sum(x for x, _ in pieces), rel=1e-5)


def _direct_combination_nll(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    fused = torch.einsum("cn,ntv->ctv", weights.double(), logits.double())
    picked = fused.gather(-1, targets.view(1, -1, 1).expand(fused.shape[0], -1, 1)).squeeze(-1)
    return (torch.logsumexp(fused, dim=-1) - picked).sum(-1)


@settings(max_examples=40, deadline=None)
@given(
    n_sources=st.integers(1, 4),
    n_combos=st.integers(1, 7),
    affine=st.booleans(),
    scale=st.sampled_from([0.5, 4.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_combination_nll_equals_fusing_each_combination(n_sources, n_combos, affine, scale, seed) -> None:
    """Every path of the factorised log-partition (one to three free sources, affine or not,
    negative weights, repeated weight values) against fusing and scoring each combination."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_sources, 5, 97, generator=generator) * scale
    targets = torch.randint(0, 97, (5,), generator=generator)
    values = torch.tensor([-1.0, -0.3, 0.0, 0.1, 0.5, 0.9, 1.0, 1.5])
    weights = values[torch.randint(0, len(values), (n_combos, n_sources), generator=generator)]
    if affine:
        weights[:, -1] = 1 - weights[:, :-1].sum(-1)
    got = combination_nll(logits, targets, weights)
    assert torch.allclose(got, _direct_combination_nll(logits, targets, weights), rtol=1e-5, atol=1e-3)


def test_combination_nll_recomputes_sums_that_would_underflow() -> None:
    # Two tokens that each source alone strongly prefers push the factor shifts ~400 nats above the
    # fused maximum of a Proxy-Tuning-like combination: the guarded positions are recomputed directly.
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    logits[0, :, 0] += 200
    logits[1, :, 1] += 200
    targets = torch.tensor([0, 1, 2, 3])
    weights = torch.tensor([[1.0, 1.0, -1.0], [0.5, 0.5, 0.0], [0.1, 0.9, 0.0]])
    got = combination_nll(logits, targets, weights)
    assert torch.allclose(got, _direct_combination_nll(logits, targets, weights), rtol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_shared_prefix_cache_gives_the_same_scores(make_model, arch) -> None:
    """Texts that share a long prefix (a passage before its options; few-shot exemplars) run it once per
    source and continue from its KV cache in right-padded batches, also past a Gemma3 sliding window
    (6 tokens here)."""
    paths = {
        "large": make_model(arch, seed=1, extra_rows=8),
        "small_cpt": make_model(arch, seed=2),
        "small_base": make_model(arch, seed=3),
    }
    lm = FusedLM.from_config(load_config(trio_config(paths)), load_all=True)
    prompt = (
        "Topic: science, travel, politics, sports. Text: the quick brown fox jumps over the lazy dog. Answer:"
    )
    options = ["science", "travel", "politics", "sports", "science and technology news", "geography"]
    options += ["entertainment", "health", "a"]  # nine remainders of 2 to 20 tokens: two padded batches
    texts = [ScoringText(o, f"{prompt} {o}", len(prompt)) for o in options]
    weights = torch.tensor([[1.0, 1.0, -1.0], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    shared = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False)
    whole = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False, share_prefix=False)
    assert shared.shared_prefix_tokens > 6 and whole.shared_prefix_tokens == 0
    assert torch.allclose(shared.score(weights).per_text, whole.score(weights).per_text, rtol=1e-5)


def test_each_context_under_several_continuations_runs_once(make_model) -> None:
    """Consecutive texts sharing more than what all texts share (a context under its answer options)
    form groups of their own; a text alone among them runs on the prefix every text shares."""
    paths = {
        role: make_model("qwen2", seed=seed) for seed, role in enumerate(("large", "small_cpt", "small_base"))
    }
    lm = FusedLM.from_config(load_config(trio_config(paths)), load_all=True)
    head = "Read the text and name its topic in one word. "
    contexts = [
        f"{head}Text: the quick brown fox jumps over the lazy dog. Topic:",
        f"{head}Text: rain fell on the hills all night long. Topic:",
    ]
    texts = [
        ScoringText(f"{c}{o}", f"{c} {o}", len(c)) for c in contexts for o in ("science", "travel", "sports")
    ]
    texts.insert(3, ScoringText("alone", f"{head}Something else entirely", len(head)))
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.9, -0.2]])
    shared = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False)
    whole = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False, share_prefix=False)
    assert shared.prefix_groups == 3  # two contexts, and the lone text with the shared instruction
    assert torch.allclose(shared.score(weights).per_text, whole.score(weights).per_text, rtol=1e-5)


def test_one_hot_combination_is_the_source_perplexity(lm) -> None:
    whole = [ScoringText(t.id, t.text) for t in TEXTS]
    scorer = FusedPerplexityScorer(lm.sources, lm.vocab_size, whole, progress=False)
    ppl = scorer.score(torch.eye(3)).perplexity
    for i, source in enumerate(lm.sources):
        nll, count = 0.0, 0
        for t in whole:
            ids = lm.tokenizer(t.text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = source.model(input_ids=ids).logits[0, :-1]
            if source.logit_rows == lm.vocab_size:  # the model's own loss, where no rows are padded
                loss = source.model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            else:  # padded rows are excluded from the softmax by design
                loss = torch.nn.functional.cross_entropy(
                    logits[:, : lm.vocab_size], ids[0, 1:], reduction="sum"
                )
            nll += float(loss)
            count += ids.shape[1] - 1
        assert ppl[i].item() == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_grid_matches_the_paper_and_derives_small_base() -> None:
    points, axes = build_candidates(SearchConfig(), ["large", "small_cpt", "small_base"])
    assert axes == ["large", "small_cpt"] and len(points) == 36
    assert {"large": 0.1, "small_cpt": 0.9, "small_base": 0.0} in points
    assert all(p["small_base"] == pytest.approx(1 - p["large"] - p["small_cpt"]) for p in points)
    ranged = SearchConfig(grid={"large": {"start": 0.0, "stop": 1.0, "step": 0.05}, "small_cpt": [0.5, 1.0]})
    assert len(build_candidates(ranged, ["large", "small_cpt", "small_base"])[0]) == 42


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (SearchConfig(grid={"large": [], "small_cpt": [0.5]}), "at least one finite value"),
        (SearchConfig(grid={"lrage": [0.1], "small_cpt": [0.5]}), "no source has"),
        (SearchConfig(grid={"large": [0.1]}), r"no weight to source\(s\) \['small_cpt'\]"),
    ],
)
def test_bad_search_spaces(search: SearchConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_candidates(search, ["large", "small_cpt", "small_base"])


def test_refinement_never_worse_and_selection_is_seeded(lm) -> None:
    search = SearchConfig(task="sib200_topic", lang="uig_Arab", n_prompts=3, shots=1, seed=5, refine_rounds=2)
    texts, origin = selection_texts(search)
    scorer = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False)
    result = search_weights(scorer, search, origin)
    assert result.selected.perplexity <= result.grid_best.perplexity
    assert result.grid_best.perplexity == min(c.perplexity for c in result.candidates if c.kind == "grid")
    assert any(c.kind == "refine" for c in result.candidates)
    no_refine = search.model_copy(update={"refine_rounds": 0})
    assert search_weights(scorer, no_refine, origin).selected == result.grid_best
    again, _ = selection_texts(search)
    assert [t.id for t in again] == [t.id for t in texts]
    other, _ = selection_texts(search.model_copy(update={"seed": 6}))
    assert [t.id for t in other] != [t.id for t in texts]
    assert set(result.singles) == {"large", "small_cpt", "small_base"} and result.proxy_tuning is not None


def test_prompts_never_contain_the_answer_and_tokens_split_into_template_and_task_text(lm) -> None:
    search = SearchConfig(task="sib200_topic", lang="uig_Arab", n_prompts=4, shots=2)
    texts, _ = selection_texts(search)
    assert all(t.text.endswith("Topic:") for t in texts)
    scorer = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False)
    template, task_text = scorer.token_groups()
    assert template > 0 and task_text > 0 and template + task_text == scorer.n_tokens
    assert "ARABIC" in scorer.script_counts(group=1) and "LATIN" in scorer.script_counts(group=0)
    result = search_weights(scorer, search.model_copy(update={"refine_rounds": 0}), {})
    assert set(result.by_mode) == {"prompt", "input"}
    assert result.token_split["template"] == template and result.token_split["task_text"] == task_text


@given(
    nll=st.lists(st.floats(0.0, 50.0), min_size=6, max_size=6),
    counts=st.lists(st.integers(1, 9), min_size=3, max_size=3),
)
@settings(max_examples=50, deadline=None)
def test_average_perplexity_by_tokens_and_by_texts(nll: list[float], counts: list[int]) -> None:
    sums = torch.tensor(nll, dtype=torch.float64).view(3, 2)
    n = torch.tensor(counts)
    pooled = average_perplexity(sums, n, "tokens")
    assert torch.allclose(pooled, torch.exp(sums.sum(0) / sum(counts)))
    by_text = average_perplexity(sums, n, "texts")
    expected = [math.exp(sum(float(sums[t, c]) / counts[t] for t in range(3)) / 3) for c in range(2)]
    assert by_text.tolist() == pytest.approx(expected, rel=1e-12)
    # Equal lengths: the same number either way. A text without scored tokens is left out of the mean.
    same = torch.tensor([counts[0]] * 3)
    assert torch.allclose(average_perplexity(sums, same, "tokens"), average_perplexity(sums, same, "texts"))
    padded = torch.cat([sums, torch.zeros(1, 2, dtype=torch.float64)])
    assert torch.allclose(average_perplexity(padded, torch.tensor([*counts, 0]), "texts"), by_text)


def test_selection_can_average_over_texts_as_the_authors_script_does(lm) -> None:
    search = SearchConfig(task="sib200_topic", lang="uig_Arab", n_prompts=4, shots=1, refine_rounds=0)
    texts, origin = selection_texts(search)
    scorer = FusedPerplexityScorer(lm.sources, lm.vocab_size, texts, progress=False)
    pooled = search_weights(scorer, search, origin)
    by_text = search_weights(scorer, search.model_copy(update={"average": "texts"}), origin)
    assert (pooled.average, by_text.average) == ("tokens", "texts")  # recorded in selection.json
    roles = list(lm.roles)
    # perplexity = exp(mean NLL), so its relative error is the mean NLL's absolute one; each float32 token
    # log-probability (fused logits of magnitude <= ~10) is exact to ~10 * 2^-24 ~ 6e-7 nats in either
    # computation, and rel=1e-5 leaves a margin of more than ten over their difference.
    for candidate in by_text.candidates[::9]:  # four grid points, computed the slow way
        weights = [candidate.weights[r] for r in roles]
        per_text = [direct_nll(lm, t, weights) for t in texts]
        assert candidate.perplexity == pytest.approx(
            math.exp(sum(total / count for total, count in per_text) / len(per_text)), rel=1e-5
        )
    assert [c.weights for c in by_text.candidates] == [c.weights for c in pooled.candidates]
    assert [c.perplexity for c in by_text.candidates] != [c.perplexity for c in pooled.candidates]
    # Task text only: each prompt's mean over its own task-text tokens (prompts without any left out).
    for candidate in by_text.candidates[::9]:
        weights = [candidate.weights[r] for r in roles]
        means = [total / count for total, count in (direct_nll(lm, t, weights, True) for t in texts) if count]
        assert means and candidate.by_mode["input"] == pytest.approx(
            math.exp(sum(means) / len(means)), rel=1e-5
        )


def test_clear_errors_for_long_and_empty_inputs(lm, tmp_path) -> None:
    with pytest.raises(
        DataError, match=r"has \d+ tokens, \d+ more than the context of source 'large' \(1024\)"
    ):
        FusedPerplexityScorer(lm.sources, lm.vocab_size, [ScoringText("x", "hello " * 1200)], progress=False)
    with pytest.raises(DataError, match="no token to score"):
        FusedPerplexityScorer(lm.sources, lm.vocab_size, [ScoringText("x", "hi", 99)], progress=False)
    short = FusedPerplexityScorer(lm.sources, lm.vocab_size, [ScoringText("x", "hello")], progress=False)
    with pytest.raises(DataError, match="tokens to score"):
        search_weights(short, SearchConfig(), {})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        selection_texts(SearchConfig(text_file=str(empty)))


def test_select_cli_writes_selection_usable_by_generate(lm, trio, tmp_path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**trio_config(trio), "search": {"lang": "uig_Arab", "shots": 1}}))
    out = tmp_path / "sel"
    assert (
        main(["select", "-c", str(config), "--n-prompts", "3", "--refine-rounds", "1", "-o", str(out)]) == 0
    )
    payload = json.loads((out / "selection.json").read_text())
    assert len([c for c in payload["candidates"] if c["kind"] == "grid"]) == 36
    assert payload["prompts"]["seed"] == 0 and len(payload["prompt_ids"]) == 3
    assert (out / "heatmap.png").stat().st_size > 10_000
    assert "selected" in capsys.readouterr().out
    selected = payload["selected"]  # the candidate of lowest perplexity, grid or refinement
    assert selected in payload["candidates"]
    assert selected["perplexity"] == min(c["perplexity"] for c in payload["candidates"])
    generated = tmp_path / "gen"
    args = ["generate", "-c", str(config), "--weights-from", str(out / "selection.json"), "-p", "Hello"]
    assert main([*args, "--max-new-tokens", "4", "-o", str(generated)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # generate recorded the selected weights and decoded with them: its tokens are a direct fused decode at
    # those weights, and not the decode at the config's own weights (Proxy Tuning's 1, 1, -1).
    recorded = yaml.safe_load((generated / "config.yaml").read_text())["models"]
    assert {m["role"]: m["weight"] for m in recorded} == selected["weights"]
    direct = lm.with_weights(method="weighted", **selected["weights"]).generate(["Hello"], max_new_tokens=4)
    assert line["token_ids"] == direct[0].token_ids and line["text"] == direct[0].text
    assert line["token_ids"] != lm.generate(["Hello"], max_new_tokens=4)[0].token_ids
