"""The fused model's likelihood interface against direct computations with the models' own forwards."""

from __future__ import annotations

import pytest
import torch

from conftest import FLOAT32_SUM_REL, trio_config
from trimix import FusedLM, load_config
from trimix.decoding.text import rolling_windows
from trimix.fusion import fuse_logits

REQUESTS = [
    ("Topic: science, travel, politics. Answer:", " sports"),
    ("ئۇيغۇر تىلى تۈركىي", " تىللار ئائىلىسىگە"),
    ("Hello world, this is ", "a small test"),  # trailing space moves to the continuation
    ("", "The quick brown fox"),  # empty context: conditioned on BOS
]


@pytest.fixture(scope="module")
def trio_lm(trio) -> FusedLM:
    raw = trio_config(trio, method="trimix")
    raw["models"][0]["weight"], raw["models"][1]["weight"] = 0.3, 0.9
    return FusedLM.from_config(load_config(raw))


def _split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's encoding of a request, written out independently."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.bos_token_id], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def _direct(lm: FusedLM, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = [s.model(input_ids=ids).logits[0, :-1, : lm.vocab_size] for s in lm.sources]
    fused = fuse_logits(logits, lm.weight_vector()).double()
    logp = torch.log_softmax(fused, -1)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    targets = ids[0, len(context_ids) :]
    total = sum(float(logp[p, t]) for p, t in zip(positions, targets.tolist(), strict=True))
    greedy = all(int(fused[p].argmax()) == t for p, t in zip(positions, targets.tolist(), strict=True))
    return total, greedy


def test_single_source_loglikelihood_equals_a_direct_computation(trio) -> None:
    lm = FusedLM.from_config(
        load_config(
            {
                "models": [{"model": str(trio["small_cpt"]), "role": "cpt"}],
                "fusion": {"method": "single", "role": "cpt"},
            }
        )
    )
    results = lm.loglikelihood(REQUESTS)
    for (context, continuation), result in zip(REQUESTS, results, strict=True):
        context_ids, continuation_ids = _split(lm.tokenizer, context, continuation)
        expected, greedy = _direct(lm, context_ids, continuation_ids)
        assert result.logprob == pytest.approx(expected, rel=FLOAT32_SUM_REL)
        assert result.is_greedy == greedy and result.n_tokens == len(continuation_ids)


def test_trimix_loglikelihood_is_fuse_then_log_softmax(trio_lm) -> None:
    for (context, continuation), result in zip(REQUESTS, trio_lm.loglikelihood(REQUESTS), strict=True):
        expected, greedy = _direct(trio_lm, *_split(trio_lm.tokenizer, context, continuation))
        assert result.logprob == pytest.approx(expected, rel=FLOAT32_SUM_REL)
        assert result.is_greedy == greedy


def test_a_greedy_continuation_is_reported_as_greedy(trio_lm) -> None:
    checked = 0
    for context in ("Hello world, this is", "The quick brown", "Numbers 0 1 2", "Translate the sentence"):
        generated = trio_lm.generate([context], max_new_tokens=3, ignore_eos=True)[0]
        continuation = trio_lm.tokenizer.decode(generated.token_ids)
        if _split(trio_lm.tokenizer, context, continuation)[1] != generated.token_ids:
            continue  # this text does not re-encode to the generated tokens; try another
        assert trio_lm.loglikelihood([(context, continuation)])[0].is_greedy
        checked += 1
    assert checked


@pytest.mark.parametrize("max_length", [None, 5])
def test_rolling_loglikelihood_predicts_every_token_once(trio_lm, max_length) -> None:
    text = "ئۇيغۇر تىلى تۈركىي تىللار ئائىلىسىگە مەنسۇپ. Hello world"
    tokens = trio_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = rolling_windows(tokens, trio_lm.tokenizer.bos_token_id, max_length or 10_000)
    assert [t for _, targets in windows for t in targets] == tokens
    expected = sum(_direct(trio_lm, context, targets)[0] for context, targets in windows)
    (result,) = trio_lm.loglikelihood_rolling([text], max_length=max_length)
    assert result == pytest.approx(expected, rel=FLOAT32_SUM_REL)
    if max_length is None:  # one window: the whole text after BOS
        whole, _ = _direct(trio_lm, [trio_lm.tokenizer.bos_token_id], tokens)
        assert result == pytest.approx(whole, rel=FLOAT32_SUM_REL)


def test_several_fusions_from_one_forward_equal_each_alone(trio_lm) -> None:
    fusions = [trio_lm.fusion, trio_lm.with_weights(large=0.1, small_cpt=0.9).fusion]
    together = trio_lm.loglikelihood_by_fusion(REQUESTS, fusions)
    for fusion, results in zip(fusions, together, strict=True):
        alone = trio_lm.with_fusion(fusion).loglikelihood(REQUESTS)
        assert [r.logprob for r in results] == pytest.approx([r.logprob for r in alone], rel=FLOAT32_SUM_REL)
