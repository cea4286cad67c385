"""Properties of the fusion formula and the plausibility mask, on hand-written tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trimix.fusion import (
    Fusion,
    Plausibility,
    fuse_logits,
    fuse_rows,
    fused_scores,
    get_method,
    plausibility_mask,
)

weights_st = st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3)


def _logits(seed: int, n: int = 3, batch: int = 2, vocab: int = 11) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, vocab, generator=g) * 3 for _ in range(n)]


@given(seed=st.integers(0, 10_000), index=st.integers(0, 2))
def test_one_hot_weight_returns_that_source(seed: int, index: int) -> None:
    logits = _logits(seed)
    weights = [0.0, 0.0, 0.0]
    weights[index] = 1.0
    assert torch.equal(fuse_logits(logits, weights), logits[index])


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), w1=weights_st, w2=weights_st, c=st.floats(-2, 2))
def test_fusion_is_linear_in_weights(seed: int, w1: list[float], w2: list[float], c: float) -> None:
    logits = _logits(seed)
    combined = [a + c * b for a, b in zip(w1, w2, strict=True)]
    expected = fuse_logits(logits, w1) + c * fuse_logits(logits, w2)
    torch.testing.assert_close(fuse_logits(logits, combined), expected, rtol=1e-5, atol=1e-4)


def test_batched_weights_match_one_at_a_time() -> None:
    logits = _logits(0)
    grid = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [1.0, 1.0, -1.0]])
    batched = fuse_logits(logits, grid)  # (C, B, V)
    assert batched.shape == (3, 2, 11)
    for c in range(3):
        torch.testing.assert_close(batched[c], fuse_logits(logits, grid[c].tolist()))


def test_fusion_upcasts_and_leaves_inputs_alone() -> None:
    logits = [x.to(torch.bfloat16) for x in _logits(1)]
    before = [x.clone() for x in logits]
    fused = fuse_logits(logits, [0.3, 0.9, -0.2])
    assert fused.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(logits, before, strict=True))


def test_proxy_tuning_formula() -> None:
    large, cpt, base = _logits(2)
    torch.testing.assert_close(fuse_logits([large, cpt, base], [1.0, 1.0, -1.0]), large + (cpt - base))


def test_bad_weights_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        fuse_logits(_logits(0), [float("nan"), 0.5, 0.5])
    with pytest.raises(ValueError, match="2 weights for 3 sources"):
        fuse_logits(_logits(0), [0.5, 0.5])


@settings(deadline=None)
@given(seed=st.integers(0, 10_000), w1=weights_st, w2=weights_st)
def test_each_row_fuses_with_its_own_weights(seed: int, w1: list[float], w2: list[float]) -> None:
    logits = _logits(seed)
    per_row = fuse_rows(logits, torch.tensor([w1, w2]), None)
    # Row b under its own weights is exactly what fusing the whole batch with those weights gives row b.
    assert torch.equal(per_row[0], fuse_logits(logits, w1)[0])
    assert torch.equal(per_row[1], fuse_logits(logits, w2)[1])


@given(seed=st.integers(0, 10_000), alpha=st.floats(0.001, 1.0))
def test_plausibility_mask_matches_probability_definition(seed: int, alpha: float) -> None:
    logits = _logits(seed)[0]
    probs = torch.softmax(logits, -1)
    mask = plausibility_mask(logits, alpha)
    expected = probs >= alpha * probs.max(-1, keepdim=True).values
    # Equal except where p is within float rounding of the threshold.
    near = (probs - alpha * probs.max(-1, keepdim=True).values).abs() < 1e-6
    assert torch.equal(mask | near, expected | near)
    assert mask.gather(-1, logits.argmax(-1, keepdim=True)).all()


def test_plausibility_alpha_one_keeps_only_argmax() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert plausibility_mask(logits, 1.0).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        plausibility_mask(logits, 0.0)


def test_fused_scores_slice_padded_rows_and_mask() -> None:
    large = torch.tensor([[0.0, 1.0, 2.0, 50.0]])  # the 4th column is a padded row
    small = torch.tensor([[3.0, 0.0, 0.0]])
    weights = torch.tensor([[1.0, 1.0]])
    assert fused_scores([large, small], weights, 3).tolist() == [[3.0, 1.0, 2.0]]
    # Under `large`, token 0 has logit 0 < 2 - 1.5: implausible, so it is -inf despite the largest fused score.
    constrained = fused_scores([large, small], weights, 3, plausibility_index=0, alpha=math.exp(-1.5))
    assert constrained.tolist() == [[float("-inf"), 1.0, 2.0]]


def test_methods_resolve_the_paper_formulas() -> None:
    given = {"large": 0.3, "small_cpt": 0.9, "small_base": None}
    assert Fusion.resolve("trimix", given).weights == {
        "large": 0.3,
        "small_cpt": 0.9,
        "small_base": pytest.approx(-0.2),
    }
    proxy = Fusion.resolve("proxy_tuning", dict.fromkeys(given), alpha=0.5).weights
    assert proxy == {"large": 1.0, "small_cpt": 0.5, "small_base": -0.5}
    single = Fusion.resolve("single", dict.fromkeys(given), role="small_cpt")
    assert single.roles == ("small_cpt",) and single.weights["small_cpt"] == 1.0
    with pytest.raises(ValueError, match=r"Did you mean 'trimix'\?"):
        get_method("trimx")
    with pytest.raises(ValueError, match=r"sets it to -0\.2"):
        Fusion.resolve("trimix", {"large": 0.3, "small_cpt": 0.9, "small_base": 0.0})


def test_fusion_runs_only_weighted_sources_and_the_judge() -> None:
    fusion = Fusion(
        {"large": 0.1, "small_cpt": 0.9, "small_base": 0.0}, plausibility=Plausibility("small_base")
    )
    assert fusion.roles == ("large", "small_cpt", "small_base")
    assert Fusion({"large": 0.1, "small_cpt": 0.9, "small_base": 0.0}).roles == ("large", "small_cpt")
    with pytest.raises(ValueError, match="finite"):
        Fusion({"a": float("inf")})
    with pytest.raises(ValueError, match="nothing to decode"):
        Fusion({"a": 0.0})


def test_a_token_one_source_rules_out_stays_out_whatever_its_weight() -> None:
    """-inf from one source (a byte no token of a byte-level source spells) is never turned into +inf
    by a negative weight, nor into NaN by a zero one; finite logits are untouched."""
    from trimix.fusion.math import fused_scores

    inf = float("-inf")
    a = torch.tensor([[1.0, 2.0, inf, 0.5]])
    b = torch.tensor([[0.0, inf, 1.0, 0.5]])
    for w in ([1.1, -0.1], [0.0, 1.0], [1.0, 0.0]):
        scores = fused_scores([a, b], torch.tensor([w]), 4)
        assert torch.isneginf(scores[0, 1:3]).all() and torch.isfinite(scores[0, [0, 3]]).all()
        many = fuse_logits([a, b], torch.tensor([w, w]))
        assert torch.isneginf(many[:, 0, 1:3]).all() and torch.isfinite(many[:, 0, [0, 3]]).all()
